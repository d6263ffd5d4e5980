"""Benchmark: distributed calibration wall time with 1 and 2 ranks (processes on this machine, gloo, 1 thread each).

Run ``python tests/bench_distributed.py`` (``--model resnet18 --batches 16 --batch-size 8 --repeats 2``). For
each qconfig, the same ``--batches`` batches of calibration data are calibrated by 1 rank (all of them) and by
2 ranks (half each) with ``fxquant.calibrate(..., distributed=True)``; the runs alternate (1, 2, 1, 2, ...)
and the table shows the median. "calibrate" is the wall time of that call on the slowest rank (process start
and model building excluded; it includes the lock-step syncs after each batch for moving averages and the
final merge), "final merge alone" the time of one ``sync_observers`` call, timed on its own afterwards. The
int8 models of all ranks are compared (SHA-1 of weights, qparams and output).

Models: ``fxquant.zoo.torchvision_model`` (random init, seeded, batch norm statistics re-estimated); inputs:
seeded random images, the same for 1 and 2 ranks. On a shared 2-core machine the 2-rank figure includes
competition with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxquant  # noqa: E402
from fxquant.observers import MovingAverageMinMaxObserver, PerChannelMinMaxObserver  # noqa: E402
from fxquant.qconfig import QConfig, QConfigMapping  # noqa: E402

BACKEND = "fbgemm"
QCONFIGS = {
    "default (histogram)": lambda: fxquant.get_default_qconfig_mapping(BACKEND),
    "moving average (lock step)": lambda: QConfigMapping().set_global(QConfig(
        activation=MovingAverageMinMaxObserver.with_args(dtype=torch.quint8, reduce_range=True),
        weight=PerChannelMinMaxObserver.with_args())),
}


def worker(out: str, model_name: str, qconfig: str, batches: int, batch_size: int, image_size: int) -> None:
    import torch.distributed as dist

    from dist_example import model_digest
    from fxquant.zoo import torchvision_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = torchvision_model(model_name, image_size=image_size, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(batch_size, 3, image_size, image_size, generator=g) for _ in range(batches)]
    prepared = fxquant.prepare_fx(model, QCONFIGS[qconfig](), (data[0],), backend_config=BACKEND)
    dist.barrier()
    start = time.perf_counter()
    fxquant.calibrate(prepared, data[rank::world], progress=False, distributed=True)
    calibrate_s = time.perf_counter() - start
    digest = model_digest(fxquant.convert_fx(prepared), data[0][:2])
    dist.barrier()
    start = time.perf_counter()
    fxquant.sync_observers(prepared)  # timed alone (it merges again: the result is not used)
    sync_s = time.perf_counter() - start
    times = [None] * world
    dist.all_gather_object(times, (calibrate_s, sync_s, digest))
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def run(args: argparse.Namespace, qconfig: str, ranks: int) -> tuple[float, float, bool]:
    from dist_example import launch

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/times.json"
        launch([__file__, "--worker", out, "--model", args.model, "--qconfig", qconfig, "--batches",
                str(args.batches), "--batch-size", str(args.batch_size), "--image-size", str(args.image_size)],
               nprocs=ranks, timeout=600)
        times = json.loads(Path(out).read_text())
    return max(t[0] for t in times), max(t[1] for t in times), len({t[2] for t in times}) == 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--qconfig", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.qconfig, args.batches, args.batch_size, args.image_size)
        return
    import os

    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{args.model}, {args.batches} batches of {args.batch_size}x3x{args.image_size}x{args.image_size}, "
          f"backend {BACKEND}, gloo on loopback, 1 thread per rank, median of {args.repeats} alternating runs\n")
    print("| qconfig | ranks | batches per rank | calibrate (s) | final merge alone (s) | speed-up | "
          "int8 models identical on all ranks |")
    print("|---|---|---|---|---|---|---|")
    for qconfig in QCONFIGS:
        runs: dict[int, list[tuple[float, float, bool]]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for ranks in (1, 2):
                runs[ranks].append(run(args, qconfig, ranks))
        base = statistics.median(r[0] for r in runs[1])
        for ranks in (1, 2):
            cal = statistics.median(r[0] for r in runs[ranks])
            sync = statistics.median(r[1] for r in runs[ranks])
            same = "yes" if all(r[2] for r in runs[ranks]) else "NO"
            print(f"| {qconfig} | {ranks} | {args.batches // ranks} | {cal:.2f} | {sync:.3f} | {base / cal:.2f}x "
                  f"| {same} |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
