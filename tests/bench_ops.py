"""Where fxquant's int8 time differs from torch.ao's: per-op CPU time of both int8 models of a zoo model.

Run: ``python tests/bench_ops.py --models efficientnet_b0,swin_t`` (``--help`` for the rest).

Per model, in one process on ``fxquant bench``'s inputs and quantizers (``fxquant.bench``): batch-1 latency of
both int8 models in ``--runs`` interleaved rounds (``fxquant.report.interleaved_rounds``), their medians and the
median of the ratio within a round (``paired_ratio``), then ``--profiles`` forwards of each under
``torch.profiler`` (alternating, so a slow stretch of the machine hits both) and the ops whose self CPU time per
forward differs most between the two, with their call counts. Where both run the same kernels the rows differ
only by noise; where one quantizes an op the other leaves float, the op names say so (``quantized::linear``
against ``aten::addmm``, a ``dequantize`` / ``quantize_per_tensor`` pair around a float op).

Timings come from a shared machine: read them within one run, not across runs.
"""

from __future__ import annotations

import os
import statistics
import sys
import warnings
from collections import defaultdict
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_compile import zoo_parser  # noqa: E402  (the options the zoo-model scripts share)


def op_times(module: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[float, int]]:
    """Self CPU milliseconds and calls per op name of one forward of ``module``."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        module(x)
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}


def compare(name: str, backend: str, input_size: int, runs: int, profiles: int, top: int) -> list[str]:
    """The lines printed for one model."""
    from fxquant import bench
    from fxquant.report import interleaved_rounds, paired_ratio
    from fxquant.zoo import torchvision_model

    case = bench._sized(bench.Case(model=name, backend=backend, image_size=input_size, calib_batches=2))
    model = torchvision_model(name, image_size=case.image_size)
    calib, x = bench._inputs(case)
    torch.backends.quantized.engine = backend
    fxq = bench.quantize_fxquant(model, backend, x, calib).module
    ao = bench.quantize_torch_ao(model, backend, x, calib).module
    fxq_s, ao_s = interleaved_rounds([lambda: fxq(x), lambda: ao(x)], runs=runs, threads=1)
    totals: dict[str, dict[str, list[float]]] = {"fxq": defaultdict(lambda: [0.0, 0]),
                                                  "ao": defaultdict(lambda: [0.0, 0])}
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(profiles):
            for label, module in (("fxq", fxq), ("ao", ao)) if i % 2 == 0 else (("ao", ao), ("fxq", fxq)):
                for op, (ms, calls) in op_times(module, x).items():
                    totals[label][op][0] += ms / profiles
                    totals[label][op][1] += calls / profiles
    finally:
        torch.set_num_threads(old)
    fx_ms, ao_ms = statistics.median(fxq_s) * 1e3, statistics.median(ao_s) * 1e3
    lines = [f"## {name} ({backend}, input {case.image_size}, 1 thread)", "",
             f"int8 latency, {runs} interleaved rounds: fxquant {fx_ms:.2f} ms, torch.ao {ao_ms:.2f} ms (medians); "
             f"fxq/ao {paired_ratio(fxq_s, ao_s):.3f}x (median of the ratio within a round)", "",
             f"ops with the largest difference in self CPU ms per forward (mean of {profiles} profiled forwards each):",
             "", "| op | fxquant ms | calls | torch.ao ms | calls | fxquant - torch.ao ms |", "|---|---|---|---|---|---|"]
    ops = set(totals["fxq"]) | set(totals["ao"])
    for op in sorted(ops, key=lambda k: -abs(totals["fxq"][k][0] - totals["ao"][k][0]))[:top]:
        (f_ms, f_n), (a_ms, a_n) = totals["fxq"][op], totals["ao"][op]
        lines.append(f"| `{op}` | {f_ms:.3f} | {f_n:.0f} | {a_ms:.3f} | {a_n:.0f} | {f_ms - a_ms:+.3f} |")
    return lines + [""]


def main(argv: Optional[list[str]] = None) -> int:
    ap = zoo_parser(__doc__)
    ap.add_argument("--runs", type=int, default=21, help="interleaved latency rounds (default 21)")
    ap.add_argument("--profiles", type=int, default=4, help="profiled forwards of each model (default 4)")
    ap.add_argument("--top", type=int, default=8, help="ops listed per model (default 8)")
    args = ap.parse_args(argv)
    if min(args.runs, args.profiles, args.top) < 1:
        ap.error("--runs, --profiles and --top must be at least 1")
    from fxquant import bench

    if not bench._ao_available():
        ap.error("the torch.ao reference is not available (needs tests/bench_torch_ao.py and torch.ao.quantization)")
    warnings.filterwarnings("ignore", category=UserWarning)   # torch.ao's deprecation warnings, once per model
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in args.models:
        print("\n".join(compare(name, args.backend, args.input_size, args.runs, args.profiles, args.top)),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
