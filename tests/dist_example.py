"""Distributed calibration (and QAT) of the digits CNN, one process per rank: the example of docs/distributed.md.

Launch it with torchrun, on one machine::

    torchrun --nproc_per_node=2 tests/dist_example.py            # calibration: each rank a shard of the data
    torchrun --nproc_per_node=2 tests/dist_example.py --qat      # + QAT under DistributedDataParallel

or on two machines (run on each; ``--node_rank`` 0 and 1, ``--master_addr`` the address of node 0)::

    torchrun --nnodes=2 --nproc_per_node=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \\
        tests/dist_example.py

Every rank prints the SHA-1 of its int8 model (weights, qparams and its output on the test images); they are
equal. :func:`launch` starts the same processes without torchrun (the tests and the benchmark use it): the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), gloo on loopback, a
free port, a time limit, and every process killed if one fails.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxquant  # noqa: E402
import fxquant.distributed as fxdist  # noqa: E402

BACKEND = "fbgemm"


def model_digest(model: torch.nn.Module, x: torch.Tensor) -> str:
    """SHA-1 of a converted model's state dict and of its output on ``x`` (equal iff bit-identical)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    with torch.no_grad():
        buf.write(model(x).numpy().tobytes())
    return hashlib.sha1(buf.getvalue()).hexdigest()


def shard(x: torch.Tensor, batch: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's part of each global batch of ``batch`` rows (rows ``rank::world`` of it)."""
    return [x[i:i + batch][rank::world] for i in range(0, len(x), batch)]


def calibrate_example(rank: int, world: int, fp32_epochs: int = 3) -> str:
    from bench_qat import DigitsCNN, digits, fp32_model

    x_tr, y_tr, x_te, _ = digits()
    model = fp32_model(x_tr, y_tr, width=8, seed=0, epochs=fp32_epochs).eval()  # seeded: the same model on every rank
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(BACKEND), (x_tr[:32],),
                                  backend_config=BACKEND)
    fxquant.calibrate(prepared, shard(x_tr[:512], 64, rank, world), progress=False, distributed=True)
    assert isinstance(model, DigitsCNN)
    return model_digest(fxquant.convert_fx(prepared), x_te)


def qat_example(rank: int, world: int, epochs: int = 2) -> str:
    from bench_qat import digits, fp32_model

    x_tr, y_tr, x_te, y_te = digits()
    model = fp32_model(x_tr, y_tr, width=8, seed=0, epochs=3)
    prepared = fxquant.prepare_qat_fx(model.train(), fxquant.get_default_qat_qconfig_mapping(BACKEND),
                                      (x_tr[:32],), backend_config=BACKEND)
    prepared = fxdist.convert_sync_batchnorm(prepared)          # folded batch norms: global batch statistics
    fxdist.sync_each_step(prepared)                             # observers: global batch ranges every step
    ddp = torch.nn.parallel.DistributedDataParallel(prepared)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=3e-5)
    g = torch.Generator().manual_seed(0)                        # the same order on every rank
    for _ in range(epochs):
        order = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(order), 32):
            idx = order[i:i + 32][rank::world]                  # this rank's half of the global batch
            loss = F.cross_entropy(ddp(x_tr[idx]), y_tr[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    fxquant.disable_observer(prepared)
    fxdist.sync_observers(prepared)                             # no-op for synced ranges; histograms would merge
    quantized = fxquant.convert_fx(prepared.eval())
    if rank == 0:
        acc = 100.0 * float((quantized(x_te).argmax(1) == y_te).float().mean())
        print(f"int8 test accuracy after QAT on {world} rank(s): {acc:.2f}%", flush=True)
    return model_digest(quantized, x_te)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--qat", action="store_true", help="also run QAT under DistributedDataParallel")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")                             # RANK, WORLD_SIZE, MASTER_* from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        print(f"rank {rank}/{world}: calibrated int8 model {calibrate_example(rank, world)}", flush=True)
        if args.qat:
            print(f"rank {rank}/{world}: QAT int8 model {qat_example(rank, world)}", flush=True)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ launching without torchrun

def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it; another process may still take it before us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: Sequence[str], nprocs: int = 2, timeout: float = 120.0,
           env: Optional[dict[str, str]] = None) -> list[subprocess.CompletedProcess]:
    """Run ``python *argv`` in ``nprocs`` processes with torchrun's environment (gloo on loopback).

    Every process is killed when the time limit passes or as soon as one of them fails (so none waits for a
    dead peer); a port taken between choosing and binding it is retried with another one.

    Returns:
        One ``CompletedProcess`` per rank (``returncode``, ``stdout``, ``stderr``), in rank order.

    Raises:
        RuntimeError: a process failed or the time limit passed (with every rank's output).
    """
    for attempt in range(3):
        port = free_port()
        base = {**os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs), "GLOO_SOCKET_IFNAME": "lo",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with tempfile.TemporaryDirectory() as tmp:  # files, not pipes: a full pipe would block a rank
            logs = [(open(f"{tmp}/{r}.out", "w+"), open(f"{tmp}/{r}.err", "w+")) for r in range(nprocs)]
            procs = [subprocess.Popen([sys.executable, *argv], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                                      stdout=out, stderr=err, text=True) for r, (out, err) in enumerate(logs)]
            results = _wait_all(procs, logs, timeout)
        failed = [r for r in results if r.returncode != 0]
        if failed and attempt < 2 and any("address already in use" in r.stderr.lower() for r in results):
            continue
        if failed:
            report = "\n".join(f"--- rank {i} (exit {r.returncode})\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
                               for i, r in enumerate(results))
            raise RuntimeError(f"distributed run {' '.join(argv)} failed:\n{report}")
        return results
    raise AssertionError("unreachable")


def _wait_all(procs: list[subprocess.Popen], logs: list[tuple[Any, Any]],
              timeout: float) -> list[subprocess.CompletedProcess]:
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = []
    for p, files in zip(procs, logs):
        p.wait()
        stdout, stderr = (_read(f) for f in files)
        code = p.returncode if p.returncode is not None else -9
        if code < 0 and time.monotonic() > deadline:
            stderr += f"\n[killed: time limit of {timeout:.0f} s]"
        out.append(subprocess.CompletedProcess(p.args, code, stdout, stderr))
    return out


def _read(f: Any) -> str:
    f.seek(0)
    text = f.read()
    f.close()
    return text


if __name__ == "__main__":
    main()
