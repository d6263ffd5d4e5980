"""Benchmark: fxquant vs torch.ao FX vs fp32 on torchvision models, same process, same inputs, interleaved.

Run: ``python tests/bench_ptq.py`` (or ``make bench``); ``--models resnet18,mobilenet_v2``,
``--backends fbgemm,qnnpack``, ``--runs 20``, ``--markdown docs/benchmarks.md`` to write the table there.
``--x86``: the x86 table instead (fp32, torch.ao fbgemm, fxquant fbgemm, fxquant x86 on oneDNN, ONNX Runtime's
``quantize_static`` int8 on the exported fp32 model with the same calibration batches), with the targets' verdicts.

Per model and backend: prepare+convert seconds, median latency (1 thread, interleaved rounds) of fp32,
torch.ao int8 and fxquant int8, output SQNR of both int8 models vs fp32, state_dict size vs fp32.
Models: random init (seeded), BN statistics re-estimated by 8 train-mode forwards on random batches.
torch.ao is imported here, never in the library.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import warnings
from typing import Any, Callable

import torch

import fxquant
from fxquant.report import interleaved_latency, state_dict_bytes
from fxquant.zoo import torchvision_model  # noqa: E402

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "googlenet", "regnet_x_400mf",
          "efficientnet_b0", "shufflenet_v2_x1_0"]


@dataclasses.dataclass
class Row:
    model: str
    backend: str
    compile_ao: float
    compile_fxq: float
    ms_fp32: float
    ms_ao: float
    ms_fxq: float
    sqnr_ao: float
    sqnr_fxq: float
    size_ratio_ao: float
    size_ratio_fxq: float


def _quantize(prepare: Callable, convert: Callable, model: torch.nn.Module, mapping: Any, x: torch.Tensor,
              calib: list[torch.Tensor], **kw: Any) -> tuple[torch.nn.Module, float]:
    start = time.perf_counter()
    prepared = prepare(copy.deepcopy(model), mapping, (x,), **kw)
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        for batch in calib:
            prepared(batch)
    start = time.perf_counter()
    quantized = convert(prepared, **kw)
    return quantized, compile_s + time.perf_counter() - start


def bench_one(name: str, backend: str, runs: int, calib_batches: int, size: int) -> Row:
    from torch.ao.quantization import get_default_qconfig_mapping as ao_mapping
    from torch.ao.quantization.quantize_fx import convert_fx as ao_convert
    from torch.ao.quantization.quantize_fx import prepare_fx as ao_prepare

    torch.manual_seed(0)
    model = torchvision_model(name, image_size=size)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, size, size, generator=gen) for _ in range(calib_batches)]
    x = torch.randn(1, 3, size, size, generator=gen)
    torch.backends.quantized.engine = backend
    ao_q, ao_s = _quantize(ao_prepare, ao_convert, model, ao_mapping(backend), x, calib)
    fx_q, fx_s = _fxq(model, backend, x, calib)
    torch.backends.quantized.engine = backend
    with torch.no_grad():
        ref, out_ao, out_fx = model(calib[0]), ao_q(calib[0]), fx_q(calib[0])
    t = interleaved_latency([lambda: model(x), lambda: ao_q(x), lambda: fx_q(x)], runs=runs, threads=1)
    fp32_size = state_dict_bytes(model)
    return Row(name, backend, ao_s, fx_s, t[0] * 1e3, t[1] * 1e3, t[2] * 1e3, fxquant.sqnr(ref, out_ao),
               fxquant.sqnr(ref, out_fx), state_dict_bytes(ao_q) / fp32_size, state_dict_bytes(fx_q) / fp32_size)


def _fxq(model: torch.nn.Module, backend: str, x: torch.Tensor, calib: list[torch.Tensor]) -> tuple[Any, float]:
    start = time.perf_counter()
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend), (x,), backend_config=backend)
    compile_s = time.perf_counter() - start
    fxquant.calibrate(prepared, calib, progress=False)
    start = time.perf_counter()
    quantized = fxquant.convert_fx(prepared)
    return quantized, compile_s + time.perf_counter() - start


# ------------------------------------------------------------------ x86: oneDNN vs fbgemm vs torch.ao vs ONNX Runtime
@dataclasses.dataclass
class X86Row:
    model: str
    ms_fp32: float
    ms_ao: float
    ms_fbgemm: float
    ms_x86: float
    ms_ort: float
    sqnr_ao: float
    sqnr_fbgemm: float
    sqnr_x86: float
    sqnr_ort: float


def _on_engine(engine: str, model: Callable) -> Callable:
    """Run ``model`` under ``engine`` (each converted model checks the engine it was packed for)."""
    def run(x: torch.Tensor) -> Any:
        torch.backends.quantized.engine = engine
        return model(x)
    return run


def _ort_int8(model: torch.nn.Module, x: torch.Tensor, calib: list[torch.Tensor], workdir: str) -> Callable:
    """ONNX Runtime's quantize_static (QDQ, per-channel int8 weights, uint8 activations, MinMax) on the fp32 model
    exported with torch.onnx.export, calibrated on the same batches; returns a callable on torch tensors."""
    import os

    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": b.numpy()} for b in calib])

        def get_next(self) -> Any:
            return next(self.batches, None)

    import logging

    ort.set_default_logger_severity(3)  # no per-initializer warnings
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" notice
    fp32, int8 = os.path.join(workdir, "fp32.onnx"), os.path.join(workdir, "int8.onnx")
    torch.onnx.export(model, (x,), fp32, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}},
                      dynamo=False, opset_version=17)
    quantize_static(fp32, int8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(int8, opts, providers=["CPUExecutionProvider"])
    return lambda t: torch.from_numpy(session.run(None, {"x": np.ascontiguousarray(t.numpy())})[0])


def bench_x86(name: str, runs: int, calib_batches: int, size: int) -> X86Row:
    """fp32, torch.ao fbgemm, fxquant fbgemm, fxquant x86 (oneDNN) and ONNX Runtime int8 on one model."""
    import tempfile

    from torch.ao.quantization import get_default_qconfig_mapping as ao_mapping
    from torch.ao.quantization.quantize_fx import convert_fx as ao_convert
    from torch.ao.quantization.quantize_fx import prepare_fx as ao_prepare

    torch.manual_seed(0)
    model = torchvision_model(name, image_size=size)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, size, size, generator=gen) for _ in range(calib_batches)]
    x = torch.randn(1, 3, size, size, generator=gen)
    torch.backends.quantized.engine = "fbgemm"
    ao_q, _ = _quantize(ao_prepare, ao_convert, model, ao_mapping("fbgemm"), x, calib)
    fbgemm = _on_engine("fbgemm", _fxq(model, "fbgemm", x, calib)[0])
    ao = _on_engine("fbgemm", ao_q)
    x86 = _on_engine("x86", _fxq(model, "x86", x, calib)[0])
    with tempfile.TemporaryDirectory() as tmp:
        ort_q = _ort_int8(model, x, calib, tmp)
    with torch.no_grad():
        ref = model(calib[0])
        outs = [f(calib[0]) for f in (ao, fbgemm, x86, ort_q)]
    fns = [model, ao, fbgemm, x86, ort_q]
    t = interleaved_latency([lambda f=f: f(x) for f in fns], runs=runs, threads=1)
    ms = [v * 1e3 for v in t]
    return X86Row(name, *ms, *[fxquant.sqnr(ref, o) for o in outs])


X86_HEADER = ("model", "fp32 ms", "ao fbgemm ms", "fxq fbgemm ms", "fxq x86 ms", "ORT int8 ms", "x86/ao",
              "x86/ORT", "SQNR ao", "SQNR fxq fbgemm", "SQNR fxq x86", "SQNR ORT")


def _x86_cells(r: X86Row) -> tuple[str, ...]:
    return (r.model, f"{r.ms_fp32:.2f}", f"{r.ms_ao:.2f}", f"{r.ms_fbgemm:.2f}", f"{r.ms_x86:.2f}", f"{r.ms_ort:.2f}",
            f"{r.ms_x86 / r.ms_ao:.2f}x", f"{r.ms_x86 / r.ms_ort:.2f}x", f"{r.sqnr_ao:.1f}", f"{r.sqnr_fbgemm:.1f}",
            f"{r.sqnr_x86:.1f}", f"{r.sqnr_ort:.1f}")


def x86_markdown(rows: list[X86Row]) -> str:
    """The x86 table with a geomean row and the targets' verdicts."""
    import math

    lines = ["| " + " | ".join(X86_HEADER) + " |", "|" + "---|" * len(X86_HEADER)]
    lines += ["| " + " | ".join(_x86_cells(r)) + " |" for r in rows]
    geo = lambda vals: math.exp(sum(math.log(v) for v in vals) / len(vals))  # noqa: E731
    lines.append(f"| geomean | | | | | | {geo([r.ms_x86 / r.ms_ao for r in rows]):.2f}x | "
                 f"{geo([r.ms_x86 / r.ms_ort for r in rows]):.2f}x | | | | |")
    lines += ["", f"- x86/ao geomean {geo([r.ms_x86 / r.ms_ao for r in rows]):.2f}x (target <= 0.85x); models slower "
              f"than torch.ao: {[r.model for r in rows if r.ms_x86 > r.ms_ao] or 'none'}",
              f"- SQNR x86 < fxquant fbgemm: {[r.model for r in rows if r.sqnr_x86 < r.sqnr_fbgemm] or 'none'}; "
              f"SQNR x86 >= ORT on {sum(r.sqnr_x86 >= r.sqnr_ort for r in rows)}/{len(rows)} models"]
    return "\n".join(lines)


HEADER = ("model", "backend", "prep+conv s ao", "prep+conv s fxq", "fp32 ms", "ao int8 ms", "fxq int8 ms",
          "fxq/ao latency", "fxq speedup vs fp32", "SQNR ao dB", "SQNR fxq dB", "size ao", "size fxq")


def _cells(r: Row) -> tuple[str, ...]:
    return (r.model, r.backend, f"{r.compile_ao:.2f}", f"{r.compile_fxq:.2f}", f"{r.ms_fp32:.2f}", f"{r.ms_ao:.2f}",
            f"{r.ms_fxq:.2f}", f"{r.ms_fxq / r.ms_ao:.2f}x", f"{r.ms_fp32 / r.ms_fxq:.2f}x", f"{r.sqnr_ao:.1f}",
            f"{r.sqnr_fxq:.1f}", f"{r.size_ratio_ao:.3f}", f"{r.size_ratio_fxq:.3f}")


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--backends", default="fbgemm,qnnpack")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--markdown", default="", help="also write the table to this file")
    ap.add_argument("--x86", action="store_true",
                    help="the x86 table instead: fxquant x86 (oneDNN) beside fxquant and torch.ao fbgemm and ONNX "
                         "Runtime int8 (quantize_static, QDQ, per-channel)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)  # compile times too are measured on one thread, as the latencies are
    if args.x86:
        x86_rows = []
        for name in args.models.split(","):
            x86_rows.append(bench_x86(name, args.runs, args.calib_batches, args.size))
            print(" | ".join(_x86_cells(x86_rows[-1])), flush=True)
        print("\n" + x86_markdown(x86_rows))
        return
    rows = []
    for name in args.models.split(","):
        for backend in args.backends.split(","):
            row = bench_one(name, backend, args.runs, args.calib_batches, args.size)
            rows.append(row)
            print(" | ".join(_cells(row)), flush=True)
    table = markdown(rows)
    print("\n" + table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("# Benchmarks\n\nCommand: `python tests/bench_ptq.py " + " ".join(argv or sys.argv[1:])
                    + "`\n\n1 torch thread (compile and run), batch 1 latency (median of interleaved rounds), SQNR on a batch of 4, "
                    f"{args.calib_batches} calibration batches of 4, input {args.size}x{args.size}, "
                    "random-init torchvision models with BN statistics re-estimated.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
