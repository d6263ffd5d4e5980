"""The quantization report: size, latency, accuracy, and which ops stayed float and why.

Example:
    >>> rep = fxquant.report(float_model, quantized, (x,))   # doctest: +SKIP
    >>> print(rep)                                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import io
import statistics
import time
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from fxquant.passes.context import RECORD_KEY, FloatReason
from fxquant.qparams import sqnr

__all__ = ["QuantReport", "report", "float_ops", "state_dict_bytes", "interleaved_latency", "interleaved_rounds",
           "round_order", "paired_ratio"]


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def round_order(n: int, r: int) -> list[int]:
    """The order in which round ``r`` of :func:`interleaved_rounds` calls ``n`` functions: rotated by ``r // 2``,
    and reversed in odd rounds.

    A rotation alone keeps the cyclic order, so every function would always run right after the same one (in
    ``fxquant bench``, fxquant's int8 model always after the fp32 model, whose larger weights have just evicted
    the caches). With the reversals, over ``2n`` rounds every function runs in every position equally often and,
    for up to three functions, after each of the others equally often (for three, the six rounds are the six
    permutations).

    Example:
        >>> [round_order(3, r) for r in range(4)]
        [[0, 1, 2], [2, 1, 0], [1, 2, 0], [0, 2, 1]]
    """
    order = [(r // 2 + k) % n for k in range(n)]
    return order[::-1] if r % 2 else order


def interleaved_rounds(fns: Sequence[Callable[[], Any]], runs: int = 20, warmup: int = 2,
                       threads: int = 1) -> list[list[float]]:
    """Seconds of each call of each function, ``runs`` per function, timed in interleaved rounds (in the orders
    of :func:`round_order`) under ``threads`` threads: ``out[i][r]`` is function ``i`` in round ``r``, so the
    calls of one round ran back to back and can be compared pairwise (see :func:`paired_ratio`)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times: list[list[float]] = [[] for _ in fns]
        with torch.no_grad():
            for _ in range(warmup):
                for f in fns:
                    f()
            for r in range(runs):
                for i in round_order(len(fns), r):
                    start = time.perf_counter()
                    fns[i]()
                    times[i].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(old)
    return times


def interleaved_latency(fns: Sequence[Callable[[], Any]], runs: int = 20, warmup: int = 2,
                        threads: int = 1) -> list[float]:
    """Median seconds per call of each function, timed in interleaved rounds (in the orders of
    :func:`round_order`) under ``threads`` threads."""
    return [statistics.median(t) for t in interleaved_rounds(fns, runs, warmup, threads)]


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over rounds of ``a[r] / b[r]``: the ratio of two functions timed in the same interleaved
    rounds (:func:`interleaved_rounds`). A machine that runs slower for a few seconds slows both calls of a
    round, so the ratio within a round holds where the ratio of the two medians, taken from different rounds,
    can swing.

    Example:
        >>> paired_ratio([1.0, 3.0, 1.1], [2.0, 6.0, 2.0])
        0.5
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratio needs two equally long, non-empty lists of times, got {len(a)} and {len(b)}")
    return statistics.median(x / y for x, y in zip(a, b))


def float_ops(quantized: fx.GraphModule) -> list[FloatReason]:
    """Every compute node of a converted model that runs in float, with the reason."""
    modules = dict(quantized.named_modules())
    out: list[FloatReason] = []
    for node in quantized.graph.nodes:
        rec = node.meta.get(RECORD_KEY)
        if node.op not in ("call_module", "call_function", "call_method") or rec is None:
            continue
        if rec.quantized_inputs or rec.quantized_output or not rec.is_tensor:
            continue
        if rec.entry is not None and rec.entry.is_dynamic and rec.float_reason is None:
            continue  # a dynamic / weight-only kernel: float in and out, quantized inside
        op = (type(modules[str(node.target)]).__name__ if node.op == "call_module"
              else getattr(node.target, "__name__", str(node.target)))
        if rec.float_reason:
            reason = rec.float_reason
        elif rec.entry is None:
            reason = "the backend table has no quantized kernel for it"
        elif rec.qconfig is None:
            reason = "its qconfig is None"
        else:
            reason = "its inputs are float (nothing quantized feeds it)"
        out.append(FloatReason(node.name, op, reason))
    return out


@dataclasses.dataclass
class QuantReport:
    """Figures comparing a float model and its quantized version on the same inputs."""

    size_fp32: int
    size_int8: int
    latency_fp32: float
    latency_int8: float
    sqnr_db: float
    float_ops: list[FloatReason]
    threads: int

    def __str__(self) -> str:
        rows = [
            ("", "fp32", "int8", "ratio"),
            ("state_dict size (MB)", f"{self.size_fp32 / 1e6:.2f}", f"{self.size_int8 / 1e6:.2f}",
             f"{self.size_int8 / self.size_fp32:.3f}x"),
            (f"latency ({self.threads} thread, ms)", f"{self.latency_fp32 * 1e3:.2f}", f"{self.latency_int8 * 1e3:.2f}",
             f"{self.latency_fp32 / self.latency_int8:.2f}x speed-up"),
            ("output SQNR vs fp32 (dB)", "", f"{self.sqnr_db:.2f}", ""),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"ops left in float: {len(self.float_ops)}")
        for f in self.float_ops:
            lines.append(f"  {f.node} ({f.op}): {f.reason}")
        return "\n".join(lines)


def _output_sqnr(ref: Any, out: Any) -> float:
    """SQNR over every floating-point tensor of the outputs (tuples, dicts and model outputs included)."""
    from torch.utils._pytree import tree_leaves

    pairs = [(r, o) for r, o in zip(tree_leaves(ref), tree_leaves(out))
             if isinstance(r, torch.Tensor) and r.is_floating_point()]
    if not pairs:
        raise ValueError("the model's outputs hold no floating-point tensor to compare")
    return sqnr(torch.cat([r.flatten() for r, _ in pairs]), torch.cat([o.flatten().float() for _, o in pairs]))


def report(float_model: nn.Module, quantized: fx.GraphModule, inputs: tuple[Any, ...], runs: int = 20,
           threads: int = 1, verbose: bool = True) -> QuantReport:
    """Compare ``float_model`` and ``quantized`` on ``inputs``; print the table if ``verbose``.

    Args:
        float_model: the original float model (eval mode).
        quantized: the result of ``convert_fx``.
        inputs: a tuple of positional inputs.
        runs: timed rounds (median reported).
        threads: torch threads while timing.
        verbose: print the report.

    Returns:
        The :class:`QuantReport`.
    """
    with torch.no_grad():
        ref = float_model(*inputs)
        out = quantized(*inputs)
    fp32, int8 = interleaved_latency([lambda: float_model(*inputs), lambda: quantized(*inputs)], runs, threads=threads)
    rep = QuantReport(state_dict_bytes(float_model), state_dict_bytes(quantized), fp32, int8, _output_sqnr(ref, out),
                      float_ops(quantized), threads)
    if verbose:
        print(rep)
    return rep
