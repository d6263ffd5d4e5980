"""x86: oneDNN int8 kernels on plain uint8 / int8 tensors (no quantized tensor types), for x86 CPUs with VNNI.

Facts encoded here (measured on this machine, tests/test_x86_onednn.py):
* conv 1d/2d/3d and linear run on ``torch.ops.onednn`` kernels with per-channel (or per-tensor) symmetric int8
  weights: the kernels take no weight zero point;
* activations are full 8-bit uint8 on CPUs with VNNI (VNNI sums u8 x s8 products in int32: no saturation, so
  neither 7-bit activations nor fbgemm's 7-bit depthwise weights are needed); without VNNI oneDNN sums pairs of
  u8 x s8 products in int16 like fbgemm, so activations use 7 bits there (``reduce_range_without_vnni``, as
  fbgemm's table), with which no pair saturates (2 x 127 x 128 < 2**15) and weights keep 8 bits, and conv /
  linear outputs are clamped to the grid's top code 127; this table is built there only with ``assume_onednn``
  (the whole models ran slower than on fbgemm's kernels: :func:`fxquant.backends.cpu.x86_onednn_passed_over`);
* depthwise convs of any channel count stay on the fast path (fbgemm leaves it below multiples of 8);
* a 2-d conv / linear whose only user is hardswish, relu6 or silu (gelu: linear only) runs it as a oneDNN
  post-op (conv1d takes relu only, conv3d no post-op: measured, the kernels reject the others);
  a 2-d conv or linear whose only user is an add (+ relu) adds the other operand inside the kernel (oneDNN's
  ``sum`` post-op): the ``kernel_fusions`` below; the conv's own output is then never quantized;
* silu is quantized here (its own observer), so that it can fuse into the conv in front (efficientnet);
* the dynamic and weight-only entries are fbgemm's (quantized-tensor weights; the per-token linear runs on oneDNN).

Where oneDNN's int8 kernels cannot run or do not pay off (a torch build without them, a CPU without VNNI, a kernel
that fails a probe: :func:`fxquant.backends.cpu.x86_onednn_passed_over`), :func:`make_x86_config` returns
fbgemm's table under the name ``x86`` (engine ``x86``, quantized tensors) and warns once, naming the reason.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.backends import cpu
from fxquant.backends.common import cnn_entries, dynamic_entries
from fxquant.backends.config import (BackendConfig, Constraints, DTypeConfig, KernelFusion, Observation, OpEntry,
                                     OpKind, QSpec, WeightRule)
from fxquant.backends.fbgemm import make_fbgemm_config

__all__ = ["make_x86_config", "SILU", "X86_KERNEL_FUSIONS"]

SILU = OpKind("silu", modules=(nn.SiLU,), functions=(F.silu,))

#: (producer entry, consumer entry) pairs oneDNN runs as one kernel (see KernelFusion)
X86_KERNEL_FUSIONS: tuple[KernelFusion, ...] = tuple(
    KernelFusion(p, c, f"{p}+{c}") for p, consumers in (
        ("conv2d", ("hardswish", "relu6", "silu", "add", "add_relu")),
        ("linear", ("hardswish", "relu6", "silu", "gelu", "add", "add_relu"))) for c in consumers)


def make_x86_config(*, assume_onednn: bool = False) -> BackendConfig:
    """The x86 table: oneDNN on plain integer tensors, or fbgemm's table where oneDNN's int8 kernels are missing or
    the CPU has no VNNI (:func:`fxquant.backends.cpu.x86_onednn_passed_over`). ``assume_onednn`` builds the oneDNN
    table whatever this machine has (7-bit activations without VNNI; docs/choosing-a-backend.md); a model converted
    with it runs only where oneDNN's int8 kernels do."""
    missing = None if assume_onednn else cpu.x86_onednn_passed_over()
    if missing:
        warnings.warn(f"backend 'x86': {missing}; using fbgemm's kernels on quantized tensors instead "
                      "(the 'fbgemm' table, under the name 'x86')", RuntimeWarning, stacklevel=2)
        return make_fbgemm_config(name="x86", engine="x86").replace(
            doc=f"fbgemm kernels on quantized tensors (oneDNN fallback: {missing}).")
    symmetric = WeightRule(dtype=torch.qint8, qschemes=(torch.per_channel_symmetric, torch.per_tensor_symmetric))
    entries = cnn_entries(symmetric, Constraints())
    u8 = DTypeConfig(input=torch.quint8, output=torch.quint8)
    entries += (OpEntry("silu", SILU, Observation.OWN, (u8,), ((SILU,),), lowering="silu", quantized_args=(0,),
                        doc="SiLU (fused into the conv or linear in front)"),)
    entries += dynamic_entries(WeightRule(dtype=torch.qint8), Constraints())
    return BackendConfig(
        name="x86", engine="x86", entries=entries, kernels="onednn", kernel_fusions=X86_KERNEL_FUSIONS,
        activation=QSpec(torch.quint8, torch.per_tensor_affine), reduce_range_without_vnni=True,
        weight=QSpec(torch.qint8, torch.per_channel_symmetric),
        doc="oneDNN int8 kernels on plain uint8 tensors (torch.ops.onednn); x86 CPUs with VNNI. Where oneDNN's int8 "
            "kernels are missing or slower (a CPU without VNNI, or a torch build without them), 'x86' is the fbgemm "
            "table under this name (7-bit activations without VNNI), with a warning that says why; this oneDNN "
            "table is then built only by make_x86_config(assume_onednn=True), with 7-bit activations there.")
