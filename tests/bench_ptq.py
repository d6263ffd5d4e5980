"""Benchmark tables of docs/benchmarks.md and docs/choosing-a-backend.md; the measuring is fxquant.bench's.

Run: ``python tests/bench_ptq.py`` (or ``make bench``): the 8 models below on fbgemm and qnnpack, 1 thread, via
``fxquant bench`` (same as ``fxquant bench --models ... --backends fbgemm,qnnpack``; options ``--models``,
``--backends``, ``--runs``, ``--calib-batches``, ``--size``, ``--markdown PATH``). The suite behind it, with the
every-model run, thread counts, MiniLM and ONNX Runtime columns, is ``fxquant bench --suite zoo`` (docs/cli.md).

``--x86``: the x86 table instead (fp32, torch.ao fbgemm, fxquant fbgemm, fxquant x86 on oneDNN, ONNX Runtime's
``quantize_static`` int8 on the exported fp32 model with the same calibration batches), with the targets'
verdicts; quantizers and ONNX Runtime helper from fxquant.bench. 1 thread, batch 1, median of interleaved rounds,
SQNR vs fp32 on a batch of 4. Models: random init (seeded), BN statistics re-estimated by 8 train-mode forwards on
random batches. torch.ao is imported by the benchmark, never by the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from typing import Any, Callable

import torch

import fxquant
from fxquant import bench
from fxquant.bench import ort_quantize_static, quantize_fxquant
from fxquant.report import interleaved_latency
from fxquant.zoo import torchvision_model

from bench_torch_ao import quantize_torch_ao  # tests/ is on sys.path when this file runs

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "googlenet", "regnet_x_400mf",
          "efficientnet_b0", "shufflenet_v2_x1_0"]


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


def _onednn_table() -> Any:
    """The x86 table on oneDNN wherever its kernels run: the default one on a VNNI CPU, and the one
    ``make_x86_config(assume_onednn=True)`` builds (7-bit activations) where the default x86 is fbgemm's (no VNNI)."""
    from fxquant.backends import cpu, get_backend_config
    from fxquant.backends.x86 import make_x86_config

    return make_x86_config(assume_onednn=True) if cpu.onednn_int8_missing() is None else get_backend_config("x86")


def bench_x86(name: str, runs: int, calib_batches: int, size: int) -> X86Row:
    """fp32, torch.ao fbgemm, fxquant fbgemm, fxquant x86 (oneDNN) and ONNX Runtime int8 on one model."""
    import tempfile

    torch.manual_seed(0)
    model = torchvision_model(name, image_size=size)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, size, size, generator=gen) for _ in range(calib_batches)]
    x = torch.randn(1, 3, size, size, generator=gen)
    ao = _on_engine("fbgemm", quantize_torch_ao(model, "fbgemm", x, calib).module)
    fbgemm = _on_engine("fbgemm", quantize_fxquant(model, "fbgemm", x, calib).module)
    x86 = _on_engine("x86", quantize_fxquant(model, _onednn_table(), x, calib).module)
    with tempfile.TemporaryDirectory() as tmp:
        ort_q = ort_quantize_static(model, x, calib, tmp)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--backends", default="fbgemm,qnnpack")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--markdown", default="", help="also write the tables to this file (fxquant bench --markdown)")
    ap.add_argument("--x86", action="store_true",
                    help="the x86 table instead: fxquant x86 (oneDNN) beside fxquant and torch.ao fbgemm and ONNX "
                         "Runtime int8 (quantize_static, QDQ, per-channel)")
    args = ap.parse_args(argv)
    if not args.x86:
        return bench.main(["--models", args.models, "--backends", args.backends, "--runs", str(args.runs),
                           "--calib-batches", str(args.calib_batches), "--input-size", str(args.size)]
                          + (["--markdown", args.markdown] if args.markdown else []))
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    x86_rows = []
    for name in args.models.split(","):
        x86_rows.append(bench_x86(name, args.runs, args.calib_batches, args.size))
        print(" | ".join(_x86_cells(x86_rows[-1])), flush=True)
    print("\n" + x86_markdown(x86_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
