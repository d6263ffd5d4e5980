"""Facts about the CPU that decide backend defaults (read once, cached)."""

from __future__ import annotations

import functools
import platform
from typing import Optional

__all__ = ["has_vnni", "onednn_int8_missing", "onnx_runtime_u8s8_saturates", "x86_onednn_passed_over"]


@functools.lru_cache(maxsize=None)
def has_vnni() -> bool:
    """Whether the CPU has AVX512-VNNI or AVX-VNNI (int8 dot products without int16 saturation).

    Without VNNI, fbgemm's u8 x s8 kernels accumulate pairs in int16 and can saturate, which is why
    fbgemm's activations then use 7 bits (``reduce_range``). With VNNI the full 8 bits are safe.
    """
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni"})
    except OSError:
        return False
    return False


@functools.lru_cache(maxsize=None)
def onnx_runtime_u8s8_saturates() -> bool:
    """Whether ONNX Runtime's CPU kernels for uint8 activations x int8 weights (``QLinearConv``, ``QGemm``, ...) can
    saturate here: on x86-64 without VNNI its MLAS kernels multiply with ``VPMADDUBSW``, which sums each pair of
    u8 x s8 products in int16 (ORT's quantization docs: use ``reduce_range`` or the U8U8 format there). Activation
    codes up to 127 cannot saturate (127 * 128 * 2 < 2**15); its uint8 x uint8 kernels widen to int16 first and
    are exact on every CPU. :func:`fxquant.export_onnx` writes uint8 weights for convs / linears that read wider
    activations where this is true."""
    return platform.machine().lower() in ("x86_64", "amd64", "x86", "i386", "i686") and not has_vnni()


@functools.lru_cache(maxsize=None)
def onednn_int8_missing() -> Optional[str]:
    """``None`` where oneDNN's int8 kernels (``torch.ops.onednn.qconv_pointwise`` / ``qlinear_pointwise`` on plain
    uint8 tensors) run here, else why not: a torch build without oneDNN or without those ops, or a kernel that
    fails a one-element probe. A model converted for the oneDNN table needs them (``EngineError`` otherwise)."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    ops = getattr(torch.ops, "onednn", None)
    for name in ("qconv_prepack", "qconv_pointwise", "qlinear_prepack", "qlinear_pointwise"):
        if ops is None or not hasattr(ops, name):
            return f"this torch build has no torch.ops.onednn.{name}"
    try:
        w = torch.ones(1, 1, 1, 1, dtype=torch.int8)
        packed = ops.qconv_prepack(w, torch.ones(1), 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
        y = ops.qconv_pointwise(torch.full((1, 1, 1, 1), 3, dtype=torch.uint8), 1.0, 0, packed, torch.ones(1),
                                torch.zeros(1, dtype=torch.int32), None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0, None,
                                "none", [], "")
    except RuntimeError as exc:  # a build whose kernels are registered but do not run on this CPU
        return f"oneDNN's int8 conv fails here ({str(exc).splitlines()[0]})"
    if int(y.flatten()[0]) != 3:
        return f"oneDNN's int8 conv computes 1 x 3 = {int(y.flatten()[0])} here"
    return None


def x86_onednn_passed_over() -> Optional[str]:
    """``None`` where the default ``x86`` table is oneDNN's, else why it is fbgemm's: oneDNN's int8 kernels missing
    (:func:`onednn_int8_missing`), or a CPU without VNNI.

    Without VNNI oneDNN's u8 x s8 pairs sum in int16, as fbgemm's do: with 7-bit activations (which the oneDNN
    table asks for there) no pair saturates and the kernels are exact, but the models ran slower than on fbgemm's
    kernels (at abc7770, ``python tests/bench_ptq.py --x86 --runs 9 --models
    resnet18,resnet50,mobilenet_v2,mobilenet_v3_large,efficientnet_b0`` on an AMD EPYC with AVX2: slower on 3 of 5,
    mobilenet_v3_large by about 30%). ``make_x86_config(assume_onednn=True)`` still builds the oneDNN table there."""
    missing = onednn_int8_missing()
    if missing:
        return missing
    if not has_vnni():
        return ("the CPU has no VNNI (oneDNN's int8 kernels sum u8 x s8 pairs in int16 there, and whole models ran "
                "slower on them than on fbgemm's: 3 of 5 measured)")
    return None
