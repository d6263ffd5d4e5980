"""Prepare+convert time only: torch.ao vs fxquant on zoo models, each round printed.

Run: ``python tests/bench_compile.py --models vit_h_14,vit_l_32`` (``--help`` for the rest).

The rounds are ``fxquant bench``'s (``fxquant.bench._compile_rounds``): the same model build, inputs, warm-up,
interleaving (torch.ao, then fxquant, each after ``gc.collect()``), 1 torch thread, calibration not counted.
What ``fxquant bench`` adds after them (SQNR, size, latency) is left out, so a large model's compile ratio can be
looked at in minutes, and each round is shown rather than only the median. ``--calib-batches`` (default 1, the
bench's default is 4) sets how much calibration runs between prepare and convert; it is not timed.

Each model runs in a fresh subprocess, so one model's memory state does not carry into the next. Timings come
from a shared machine: compare within one run, and read the spread of the rounds before the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Optional

import torch

from fxquant.report import paired_ratio


def rounds(model_name: str, backend: str, runs: int, calib_batches: int, input_size: int) -> dict:
    """The compile rounds of one model in this process: ``{"ao": [s, ...], "fxq": [s, ...], "ao_error": str}``."""
    from fxquant import bench
    from fxquant.zoo import torchvision_model

    case = bench._sized(bench.Case(model=model_name, backend=backend, image_size=input_size,
                                   calib_batches=calib_batches, compile_runs=runs, with_ao=bench._ao_available()))
    model = torchvision_model(model_name, image_size=case.image_size)
    calib, x = bench._inputs(case)
    out: dict = {"model": model_name, "ao": [], "fxq": []}

    def on_round(ao_s: Optional[float], fxq_s: float) -> None:
        if ao_s is not None:
            out["ao"].append(ao_s)
        out["fxq"].append(fxq_s)
        ratio = f"{fxq_s / ao_s:.3f}x" if ao_s else "-"
        print(f"  {model_name} round {len(out['fxq'])}: torch.ao {ao_s or float('nan'):.2f} s, "
              f"fxquant {fxq_s:.2f} s, {ratio}", file=sys.stderr, flush=True)

    torch.set_num_threads(1)
    bench._warm_up(backend, case.with_ao)
    _, _, out["ao_error"] = bench._compile_rounds(model, case, x, calib, on_round=on_round)
    return out


def zoo_parser(doc: str) -> argparse.ArgumentParser:
    """The options the zoo-model scripts share (this one and ``bench_ops.py``): ``--models``, ``--backend``,
    ``--input-size``; ``doc``'s first paragraph is the description."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--models", required=True, type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                    help="comma-separated torchvision names")
    ap.add_argument("--backend", default="fbgemm", choices=("fbgemm", "x86", "qnnpack"))
    ap.add_argument("--input-size", type=int, default=96, help="pixels (vit/swin/maxvit always 224; default 96)")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    ap = zoo_parser(__doc__)
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds per model (default 3)")
    ap.add_argument("--calib-batches", type=int, default=1, help="calibration batches of 4 (default 1)")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.runs < 1 or args.calib_batches < 1:
        ap.error("--runs and --calib-batches must be at least 1")
    if args.one:
        print(json.dumps(rounds(args.one, args.backend, args.runs, args.calib_batches, args.input_size)))
        return 0
    rows = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--models", name, "--one", name, "--backend", args.backend,
               "--runs", str(args.runs), "--calib-batches", str(args.calib_batches),
               "--input-size", str(args.input_size)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            rows.append(f"| {name} | failed (exit {proc.returncode}) | | | | |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        fxq = statistics.median(r["fxq"])
        ao = statistics.median(r["ao"]) if r["ao"] else float("nan")
        spread = f"{min(r['fxq']):.2f}-{max(r['fxq']):.2f}"
        ratio = f"{paired_ratio(r['fxq'], r['ao']):.3f}x" if len(r["ao"]) == len(r["fxq"]) else "-"
        rows.append(f"| {name} | {ao:.2f} | {fxq:.2f} | {spread} | {ratio} | {r['ao_error'] or ''} |")
    print(f"prepare+convert, {args.backend}, 1 thread, median of {args.runs} interleaved rounds (the ratio: median "
          f"of the ratio within a round), {args.calib_batches} calibration batch(es) of 4 between prepare and convert "
          "(not timed)")
    print("| model | torch.ao s | fxquant s | fxquant rounds s | ratio | torch.ao error |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
