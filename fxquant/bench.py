"""Benchmark: fxquant vs torch.ao vs fp32 on torchvision models (``fxquant bench``, ``python -m fxquant.bench``).

Per model and backend, in one process on the same inputs: prepare+convert seconds of torch.ao and fxquant,
median batch-1 latency of fp32, torch.ao int8 and fxquant int8 (interleaved rounds, 1 thread by default),
output SQNR of both int8 models vs fp32, and state_dict size vs fp32. A summary line gives the geometric
means of fxquant/torch.ao latency and compile time, the figures the project's targets are stated in.

Models are random-init torchvision models with batch-norm statistics re-estimated (fxquant.zoo): nothing
is downloaded. torch.ao.quantization is the reference and is imported here, inside the benchmark only, never
by the library; without it (``--no-ao``, or a torch without it) the torch.ao columns read "-".
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

import fxquant
from fxquant.report import interleaved_latency, state_dict_bytes

__all__ = ["MODELS", "Case", "Result", "Quantized", "bench_case", "summary", "table", "add_arguments", "run", "main"]

#: default models: a residual net, a depthwise/inverted-residual net, and channel shuffles
MODELS = ("resnet18", "mobilenet_v2", "shufflenet_v2_x1_0")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: a model, a backend and the measurement settings."""

    model: str
    backend: str = "fbgemm"
    image_size: int = 224
    calib_batches: int = 4
    runs: int = 20
    threads: int = 1


@dataclasses.dataclass
class Quantized:
    """One int8 model and what producing it cost."""

    module: nn.Module
    compile_s: float


@dataclasses.dataclass
class Result:
    """Measurements of one case; ``ao_*`` are ``None`` when torch.ao was not run."""

    case: Case
    fp32_ms: float
    fxq_ms: float
    fxq_compile_s: float
    fxq_sqnr: float
    fxq_size: float
    ao_ms: Optional[float] = None
    ao_compile_s: Optional[float] = None
    ao_sqnr: Optional[float] = None
    ao_size: Optional[float] = None


def _with_fxquant(model: nn.Module, backend: str, x: torch.Tensor, calib: list[torch.Tensor]) -> Quantized:
    start = time.perf_counter()
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend), (x,), backend_config=backend)
    compile_s = time.perf_counter() - start
    fxquant.calibrate(prepared, calib, progress=False)
    start = time.perf_counter()
    quantized = fxquant.convert_fx(prepared)
    return Quantized(quantized, compile_s + time.perf_counter() - start)


def _with_torch_ao(model: nn.Module, backend: str, x: torch.Tensor, calib: list[torch.Tensor]) -> Quantized:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = backend
    start = time.perf_counter()
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(backend), (x,))  # torch.ao mutates it
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        for batch in calib:
            prepared(batch)
    start = time.perf_counter()
    quantized = convert_fx(prepared)
    return Quantized(quantized, compile_s + time.perf_counter() - start)


def bench_case(case: Case, with_ao: bool = True) -> Result:
    """Build the model, quantize it with fxquant (and torch.ao), and measure all of them side by side."""
    from fxquant.zoo import torchvision_model

    model = torchvision_model(case.model, image_size=case.image_size)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, case.image_size, case.image_size, generator=gen) for _ in range(case.calib_batches)]
    x = torch.randn(1, 3, case.image_size, case.image_size, generator=gen)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(case.threads)  # compile is timed on the same threads as the latencies
    try:
        ao = _with_torch_ao(model, case.backend, x, calib) if with_ao else None
        fxq = _with_fxquant(model, case.backend, x, calib)
    finally:
        torch.set_num_threads(old_threads)
    torch.backends.quantized.engine = case.backend
    fns: list[Callable[[], Any]] = [lambda: model(x), lambda: fxq.module(x)]
    if ao is not None:
        fns.append(lambda: ao.module(x))
    times = interleaved_latency(fns, runs=case.runs, threads=case.threads)
    with torch.no_grad():
        ref = model(calib[0])
        fxq_sqnr = float(fxquant.sqnr(ref, fxq.module(calib[0])))
        ao_sqnr = float(fxquant.sqnr(ref, ao.module(calib[0]))) if ao is not None else None
    fp32_size = state_dict_bytes(model)
    result = Result(case, times[0] * 1e3, times[1] * 1e3, fxq.compile_s, fxq_sqnr, state_dict_bytes(fxq.module) / fp32_size)
    if ao is not None:
        result.ao_ms, result.ao_compile_s, result.ao_sqnr = times[2] * 1e3, ao.compile_s, ao_sqnr
        result.ao_size = state_dict_bytes(ao.module) / fp32_size
    return result


HEADER = ("model", "backend", "compile s ao", "compile s fxq", "fp32 ms", "ao int8 ms", "fxq int8 ms",
          "fxq/ao latency", "fxq speed-up vs fp32", "SQNR ao dB", "SQNR fxq dB", "size ao", "size fxq")


def _f(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _cells(r: Result) -> tuple[str, ...]:
    ratio = r.fxq_ms / r.ao_ms if r.ao_ms else None
    return (r.case.model, r.case.backend, _f(r.ao_compile_s, ".2f"), f"{r.fxq_compile_s:.2f}", f"{r.fp32_ms:.2f}",
            _f(r.ao_ms, ".2f"), f"{r.fxq_ms:.2f}", _f(ratio, ".2f") + ("x" if ratio else ""),
            f"{r.fp32_ms / r.fxq_ms:.2f}x", _f(r.ao_sqnr, ".1f"), f"{r.fxq_sqnr:.1f}", _f(r.ao_size, ".3f"),
            f"{r.fxq_size:.3f}")


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary(results: Sequence[Result]) -> str:
    """Geometric means over the cases: fxquant/torch.ao latency and compile time, fp32/fxquant speed-up."""
    lines = [f"fxquant int8 speed-up vs fp32, geomean: {_geomean([r.fp32_ms / r.fxq_ms for r in results]):.2f}x "
             f"(slower than fp32 on {sum(r.fxq_ms > r.fp32_ms for r in results)} of {len(results)})"]
    with_ao = [r for r in results if r.ao_ms is not None and r.ao_compile_s]
    if with_ao:
        lat = _geomean([r.fxq_ms / r.ao_ms for r in with_ao])  # type: ignore[operator]
        comp = _geomean([r.fxq_compile_s / r.ao_compile_s for r in with_ao])  # type: ignore[operator]
        lines.append(f"fxquant/torch.ao int8 latency, geomean: {lat:.2f}x (target <= 0.9x)")
        lines.append(f"fxquant/torch.ao prepare+convert time, geomean: {comp:.2f}x (target <= 0.5x on every model; "
                     f"worst {max(r.fxq_compile_s / r.ao_compile_s for r in with_ao):.2f}x)")  # type: ignore[operator]
    return "\n".join(lines)


def table(results: Sequence[Result], markdown: bool = False) -> str:
    """The results as an aligned text table, or as a markdown table."""
    rows = [HEADER] + [_cells(r) for r in results]
    if markdown:
        out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``python -m fxquant.bench`` and ``fxquant bench``)."""
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated torchvision names (default {','.join(MODELS)})")
    ap.add_argument("--backends", default="fbgemm", help="comma-separated: fbgemm, x86, qnnpack (default fbgemm)")
    ap.add_argument("--runs", type=int, default=20, help="timed interleaved rounds per model (default 20)")
    ap.add_argument("--calib-batches", type=int, default=4, help="calibration batches of 4 (default 4)")
    ap.add_argument("--input-size", type=int, default=224, help="input height and width (default 224)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for compile and latency (default 1)")
    ap.add_argument("--no-ao", action="store_true", help="skip torch.ao (fxquant vs fp32 only)")
    ap.add_argument("--markdown", default="", metavar="PATH", help="also write the table as markdown to PATH")


def _ao_available() -> bool:
    try:
        import torch.ao.quantization.quantize_fx  # noqa: F401
    except ImportError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed ``args``; prints one line per case as it goes, then the table."""
    warnings.simplefilter("ignore")
    with_ao = not args.no_ao and _ao_available()
    cases = [Case(m.strip(), b.strip(), args.input_size, args.calib_batches, args.runs, args.threads)
             for m in args.models.split(",") if m.strip() for b in args.backends.split(",") if b.strip()]
    results = []
    for case in cases:
        results.append(bench_case(case, with_ao))
        print(" | ".join(_cells(results[-1])), flush=True)
    text = (f"\n{table(results)}\n\n{summary(results)}\n"
            f"({args.threads} thread(s), batch 1, median of {args.runs} interleaved rounds, input {args.input_size}; "
            "a shared machine: compare ratios within one run, not absolute times across runs)")
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table(results, markdown=True) + "\n\n" + summary(results).replace("\n", "  \n") + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fxquant.bench [options]``."""
    ap = argparse.ArgumentParser(prog="python -m fxquant.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
