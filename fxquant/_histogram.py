"""Histogram arithmetic behind :class:`fxquant.observers.HistogramObserver` (private helpers).

A histogram here is an ``int64`` tensor of ``bins`` counts over ``[lo, hi]`` with equal-width bins. Three
operations:

* :func:`bin_counts` counts a batch of finite values into a histogram over a given range;
* :func:`rebin` moves a histogram onto a wider range. The old histogram is read as a piecewise-linear
  cumulative count (values spread uniformly inside each bin); the new histogram's cumulative counts are that
  function at the new edges, rounded to integers. Every count is split proportionally between the new bins it
  overlaps, counts stay integral and the total is conserved exactly;
* :func:`search_clip_range` picks the clipping range that minimises the expected squared quantization error.

Positions inside :func:`search_clip_range` are measured in *bin units* (0 at ``lo``, ``bins`` at ``hi``) so the
prefix sums stay well conditioned whatever the data's scale.

Example:
    >>> import torch
    >>> h = bin_counts(torch.tensor([0.0, 1.0, 2.0, 3.0]), 0.0, 4.0, bins=4)
    >>> h.tolist(), rebin(h, 0.0, 4.0, 0.0, 8.0).tolist()
    ([1, 1, 1, 1], [2, 2, 0, 0])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["bin_counts", "rebin", "search_clip_range", "pow2_layout", "pow2_count", "pow2_regrid", "fold_abs", "kl_clip",
           "coarsen", "percentile_edges"]

#: elements per torch.histc call: float32 counts stay exact integers up to 2**24
_HISTC_CHUNK = 2**24
#: the coarse pass of :func:`search_clip_range` evaluates at most this many edges per bound
_COARSE_EDGES = 128


def bin_counts(x: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    """Histogram of the finite values ``x`` over ``[lo, hi]``.

    Args:
        x: finite values, all inside ``[lo, hi]`` (values outside are not counted).
        lo, hi: the histogram range; ``hi == lo`` puts everything into bin 0 (a point mass at ``lo``).
        bins: number of equal-width bins.

    Returns:
        ``int64`` counts of shape ``[bins]`` on ``x``'s device.
    """
    flat = x.reshape(-1)
    counts = torch.zeros(bins, dtype=torch.int64, device=x.device)
    if hi <= lo:
        counts[0] = flat.numel()
        return counts
    # torch.histc is several times faster than bincount; its float counts are exact up to 2**24 per call
    for chunk in flat.to(torch.float32).split(_HISTC_CHUNK):
        counts += torch.histc(chunk, bins, lo, hi).to(torch.int64)
    return counts


def rebin(counts: torch.Tensor, lo: float, hi: float, new_lo: float, new_hi: float) -> torch.Tensor:
    """Move a histogram over ``[lo, hi]`` onto the same number of bins over ``[new_lo, new_hi]``.

    ``[new_lo, new_hi]`` must contain ``[lo, hi]``. Counts are split in proportion to the overlap of old and
    new bins, then rounded through the cumulative sum, so the total count is conserved exactly.

    Args:
        counts: ``int64`` histogram, shape ``[bins]``.
        lo, hi: its range (``hi == lo``: a point mass at ``lo``).
        new_lo, new_hi: the target range.

    Returns:
        ``int64`` counts of shape ``[bins]``.
    """
    if new_lo > lo or new_hi < hi:
        raise ValueError(f"rebin target [{new_lo}, {new_hi}] must contain the source range [{lo}, {hi}]")
    bins = counts.numel()
    total = int(counts.sum())
    if total == 0 or (lo == new_lo and hi == new_hi):
        return counts.clone()
    if hi <= lo:  # a point mass: it lands in the one new bin that contains it
        where = torch.full((1,), lo, dtype=torch.float64, device=counts.device)
        return bin_counts(where, new_lo, new_hi, bins) * total
    edges = torch.linspace(new_lo, new_hi, bins + 1, dtype=torch.float64, device=counts.device)
    old_pos = ((edges - lo) * (bins / (hi - lo))).clamp_(0, bins)  # new edges in old bin units
    idx = old_pos.floor().to(torch.int64).clamp_(max=bins - 1)
    old = counts.to(torch.float64)
    cumulative = torch.cat([old.new_zeros(1), old.cumsum(0)])
    at_edges = (cumulative[idx] + (old_pos - idx) * old[idx]).round_().to(torch.int64)
    at_edges[0] = 0
    at_edges[-1] = total
    return at_edges.diff()


# The search runs in numpy: its arrays are small (at most 129 x 129 candidate pairs, or ``bins + 1`` edges) and it
# is a chain of some 40 elementwise steps, where torch's per-op dispatch cost dominated (0.75 ms per observer,
# 70 ms of regnet_x_400mf's convert; numpy: about a quarter of that).

@dataclasses.dataclass(frozen=True)
class _PrefixSums:
    """Prefix sums of count, count * center and count * center^2 (bin units), each of length ``bins + 1``."""

    n: np.ndarray
    nc: np.ndarray
    ncc: np.ndarray

    @classmethod
    def of(cls, counts: torch.Tensor) -> "_PrefixSums":
        n = counts.detach().cpu().numpy().astype(np.float64)
        centers = np.arange(n.size, dtype=np.float64) + 0.5
        cum = np.zeros((3, n.size + 1))
        np.cumsum(n, out=cum[0, 1:])
        np.cumsum(n * centers, out=cum[1, 1:])
        np.cumsum(n * centers * centers, out=cum[2, 1:])
        return cls(cum[0], cum[1], cum[2])


def _clipped_below(sums: _PrefixSums, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared error of clipping the bins whose center is below ``lo`` up to ``lo``, and their count."""
    k = np.clip(np.ceil(lo - 0.5), 0, sums.n.size - 1).astype(np.int64)
    err = sums.ncc[k] - 2 * lo * sums.nc[k] + lo * lo * sums.n[k]
    return np.maximum(err, 0), sums.n[k]


def _clipped_above(sums: _PrefixSums, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared error of clipping the bins whose center is above ``hi`` down to ``hi``, and the count up to ``hi``."""
    j = np.clip(np.floor(hi - 0.5) + 1, 0, sums.n.size - 1).astype(np.int64)
    n, nc, ncc = (s[-1] - s[j] for s in (sums.n, sums.nc, sums.ncc))
    return np.maximum(ncc - 2 * hi * nc + hi * hi * n, 0), sums.n[j]


def _expected_error(sums: _PrefixSums, lo: Any, hi: Any, levels: int, outer: bool = False) -> np.ndarray:
    """Expected total squared error of quantizing onto ``levels`` steps over ``[lo, hi]`` (bin units).

    Values outside the range are clipped to its ends (error: their distance to the end); values inside get
    uniform rounding noise ``step**2 / 12``. A bin counts as outside when its center is.

    Args:
        sums: prefix sums of the histogram.
        lo, hi: 1-d candidate bounds (arrays or CPU tensors).
        levels: ``quant_max - quant_min``.
        outer: evaluate every ``(lo[i], hi[j])`` pair (a matrix) instead of the pairs ``(lo[i], hi[i])``.

    Returns:
        The errors (``inf`` where ``hi <= lo``).
    """
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    err_lo, n_below = _clipped_below(sums, lo)
    err_hi, n_upto = _clipped_above(sums, hi)
    if outer:
        lo, err_lo, n_below = lo[:, None], err_lo[:, None], n_below[:, None]
    step = (hi - lo) / levels
    cost = err_lo + err_hi + (n_upto - n_below) * (step * step / 12.0)
    return np.where(step <= 0, math.inf, cost)


def _best_pair(sums: _PrefixSums, lo_edges: np.ndarray, hi_edges: np.ndarray, zero: float,
               levels: int) -> tuple[int, int]:
    """Edge indices ``(s, t)`` (into the given ascending candidate lists) with the least error for
    ``[min(s, 0), max(t, 0)]``, the first in row-major order where several tie.

    Every edge on the far side of 0 gives the same bound (all of them, for a ReLU's output), so each distinct
    bound is evaluated once, at the first edge that gives it: the matrix of all pairs would repeat those rows and
    columns, and its first minimum lies at the first of a repeat. Low bounds: the edges below 0, then 0 at the
    first edge at or above it; high bounds: 0 at the first edge (when any lies at or below 0), then the edges
    above it."""
    k = int(np.searchsorted(lo_edges, zero))  # lo_edges[k:] all become 0: keep lo_edges[k] only
    lo = np.minimum(lo_edges[:k + 1].astype(np.float64), zero)
    j = int(np.searchsorted(hi_edges, zero, side="right"))  # hi_edges[:j] all become 0: keep hi_edges[0] only
    hi = np.maximum(hi_edges[max(j - 1, 0):].astype(np.float64), zero)
    flat = int(np.argmin(_expected_error(sums, lo, hi, levels, outer=True)))
    t = flat % hi.size
    return flat // hi.size, t if j == 0 or t == 0 else t + j - 1


def _window(center: int, radius: int, bins: int) -> np.ndarray:
    return np.arange(max(center - radius, 0), min(center + radius, bins) + 1)


def search_clip_range(counts: torch.Tensor, zero: float, levels: int, symmetric: bool) -> tuple[float, float]:
    """The clipping range ``[lo, hi]`` (bin units) with the least expected squared quantization error.

    Candidates are ranges between bin edges that contain 0 (a bound on the far side of 0 is moved onto it,
    as the quantizer would). Symmetric schemes search the half-width of ``[-m, m]`` over all edges at once;
    affine schemes search ``(lo, hi)`` pairs on a grid of at most 129 x 129 edges, then every edge pair within
    one grid step of the best one.

    Args:
        counts: the histogram, shape ``[bins]``, not all zero.
        zero: the position of 0.0 in bin units (may lie outside ``[0, bins]``).
        levels: ``quant_max - quant_min``.
        symmetric: search ranges symmetric around 0.

    Returns:
        ``(lo, hi)`` in bin units, ``lo <= zero <= hi``.
    """
    bins = counts.numel()
    sums = _PrefixSums.of(counts)
    edges = np.arange(bins + 1)
    if symmetric:
        half = np.abs(edges - zero)
        best = half[np.argmin(_expected_error(sums, zero - half, zero + half, levels))]
        return zero - float(best), zero + float(best)
    step = max(1, math.ceil(bins / _COARSE_EDGES))
    grid = np.unique(np.concatenate([edges[::step], edges[-1:]]))
    s, t = _best_pair(sums, grid, grid, zero, levels)
    lo_cands = _window(int(grid[s]), step, bins)
    hi_cands = _window(int(grid[t]), step, bins)
    s, t = _best_pair(sums, lo_cands, hi_cands, zero, levels)
    return min(float(lo_cands[s]), zero), max(float(hi_cands[t]), zero)


# ------------------------------------------------------------------------------------ exact (power-of-two) grids
#
# The calibrators of :mod:`fxquant.calibrators` keep histograms on a grid anchored at 0.0: row ``r`` has bin
# width ``2**exp[r]`` and its column ``j`` counts the values in ``[(first[r] + j) * w, (first[r] + j + 1) * w)``.
# Dividing by a power of two is exact in floating point, so every value lands in the bin that contains it; a
# wider range doubles the width (``exp += d``), which merges whole bins (column ``k`` -> ``k // 2**d``): no count
# is split or approximated. The layout depends only on the range of everything seen, so merging two histograms
# equals one histogram of all their data, in any order.

#: the smallest bin width is 2**_EXP_FLOOR (an all-zero tensor gets it); keeps x * 2**-exp finite in float32
_EXP_FLOOR = -100
#: shifts larger than this map every column of a histogram onto columns -1 / 0
_MAX_SHIFT = 40


def pow2_layout(lo: torch.Tensor, hi: torch.Tensor, bins: int, at_least: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The finest power-of-two grid whose ``bins`` columns cover ``[min(lo, 0), max(hi, 0)]``, row by row.

    Args:
        lo, hi: 1-d float tensors, the range of each row (finite).
        bins: columns per row.
        at_least: 1-d ``int64`` lower bounds for the exponents (the current grid: widths only grow).

    Returns:
        ``(exp, first)``: ``int64`` tensors; row ``r`` has width ``2**exp[r]`` and first column ``first[r]``.
    """
    lo0 = lo.to(torch.float64).clamp(max=0.0)
    hi0 = hi.to(torch.float64).clamp(min=0.0)
    span = hi0 - lo0
    guess = torch.floor(torch.log2(torch.where(span > 0, span / bins, torch.ones_like(span)))) - 1
    exp = torch.where(span > 0, guess, torch.full_like(span, _EXP_FLOOR)).clamp(min=_EXP_FLOOR).to(torch.int64)
    if at_least is not None:
        exp = torch.maximum(exp, at_least.to(exp.device))
    for _ in range(4):  # the guess is at most two steps short; each step halves the columns needed
        width = torch.pow(2.0, exp.to(torch.float64))
        needed = torch.floor(hi0 / width) - torch.floor(lo0 / width) + 1
        exp = torch.where(needed > bins, exp + 1, exp)
    width = torch.pow(2.0, exp.to(torch.float64))
    if bool((torch.floor(hi0 / width) - torch.floor(lo0 / width) + 1 > bins).any()):
        raise AssertionError("pow2_layout: no fitting grid found")  # pragma: no cover - guarded by the guess
    return exp, torch.floor(lo0 / width).to(torch.int64)


def pow2_count(rows: torch.Tensor, exp: torch.Tensor, first: torch.Tensor, bins: int) -> torch.Tensor:
    """Exact counts of the finite values ``rows`` (``[R, N]``) on the grids ``(exp, first)``.

    Every value must lie inside its row's grid (as :func:`pow2_layout` guarantees for the range it was given).

    Returns:
        ``int64`` counts ``[R, bins]``.
    """
    inv = torch.pow(2.0, -exp.to(torch.float64)).to(rows.dtype).unsqueeze(1)
    if rows.shape[0] == 1 and bins & (bins - 1) == 0 and int(first.abs().max()) < 2**20:
        # one row, power-of-two bins: torch.histc is several times faster than bincount and exact here, as
        # (x * 2**-exp - first) / bins * bins only rescales by powers of two
        shifted = rows[0] * inv[0] - first.to(rows.dtype)
        counts = torch.zeros(bins, dtype=torch.int64, device=rows.device)
        for chunk in shifted.split(_HISTC_CHUNK):
            counts += torch.histc(chunk, bins, 0, bins).to(torch.int64)
        return counts.unsqueeze(0)
    cols = torch.floor(rows * inv).to(torch.int64) - first.unsqueeze(1)
    cols = cols.clamp_(0, bins - 1)  # only a value within rounding of the top edge can reach bins
    offsets = torch.arange(rows.shape[0], device=rows.device).unsqueeze(1) * bins
    flat = torch.bincount((cols + offsets).reshape(-1), minlength=rows.shape[0] * bins)
    return flat.reshape(rows.shape[0], bins)


def pow2_regrid(counts: torch.Tensor, exp: torch.Tensor, first: torch.Tensor, new_exp: torch.Tensor,
                new_first: torch.Tensor) -> torch.Tensor:
    """Move counts ``[R, bins]`` from grids ``(exp, first)`` onto coarser grids ``(new_exp, new_first)``.

    ``new_exp >= exp`` row by row and the new grids must cover the old data. Whole bins merge: exact.
    """
    rows, bins = counts.shape
    shift = (new_exp - exp).clamp(0, _MAX_SHIFT)
    absolute = first.unsqueeze(1) + torch.arange(bins, device=counts.device).unsqueeze(0)
    cols = torch.div(absolute, torch.pow(2, shift).unsqueeze(1), rounding_mode="floor") - new_first.unsqueeze(1)
    keep = counts > 0
    if bool((cols[keep] < 0).any() or (cols[keep] >= bins).any()):
        raise ValueError("pow2_regrid: the new grid does not cover the old counts")
    cols = cols.clamp(0, bins - 1) + torch.arange(rows, device=counts.device).unsqueeze(1) * bins
    out = torch.zeros(rows * bins, dtype=counts.dtype, device=counts.device)
    out.scatter_add_(0, cols.reshape(-1), counts.reshape(-1))
    return out.reshape(rows, bins)


def fold_abs(counts: torch.Tensor, zero_col: int) -> torch.Tensor:
    """The histogram of ``|x|`` from a row whose column ``zero_col`` starts at 0.0 (an exact grid edge).

    Column ``j >= zero_col`` counts into ``j - zero_col``, column ``j < zero_col`` into ``zero_col - 1 - j``.
    """
    right, left = counts[zero_col:], counts[:zero_col].flip(0)
    out = torch.zeros(max(right.numel(), left.numel()), dtype=counts.dtype, device=counts.device)
    out[:right.numel()] += right
    out[:left.numel()] += left
    return out


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * torch.log(x.clamp(min=1e-300)), torch.zeros_like(x))


def kl_clip(counts: torch.Tensor, levels: int) -> int:
    """TensorRT's entropy calibration: how many bins of a one-sided histogram to keep.

    For each candidate ``i`` (from ``levels`` to the last non-empty bin), the reference ``P`` is the first ``i``
    bins with every count beyond folded into bin ``i - 1`` (clipping), and the candidate ``Q`` is the first ``i``
    bins merged into ``levels`` chunks and spread back evenly over each chunk's non-empty bins (quantizing). The
    ``i`` with the least ``KL(P || Q)`` (both normalised) wins; ties go to the smaller ``i``. All candidates are
    evaluated at once from prefix sums.

    Args:
        counts: a histogram whose column 0 starts at 0.0 (e.g. of ``|x|``).
        levels: quantization bins on this side (128 for int8 magnitudes, 256 for one-sided uint8).

    Returns:
        The upper edge of the clipping range, in bins (``counts`` columns).
    """
    nonzero = torch.nonzero(counts).flatten()
    n = int(nonzero[-1]) + 1 if nonzero.numel() else 0
    if n <= levels:
        return n
    h = counts[:n].to(torch.float64)
    zero = h.new_zeros(1)
    cum, nz = torch.cat([zero, h.cumsum(0)]), torch.cat([zero, (h > 0).to(torch.float64).cumsum(0)])
    plogp = torch.cat([zero, _xlogx(h).cumsum(0)])
    i = torch.arange(levels, n + 1, device=counts.device)
    tail, last = cum[n] - cum[i], h[i - 1]
    sum_plogp = plogp[i - 1] + _xlogx(last + tail)
    steps = torch.arange(levels + 1, device=counts.device).unsqueeze(0) * i.unsqueeze(1)
    edges = torch.div(steps + levels - 1, levels, rounding_mode="floor")  # chunk c: bins [ceil(c*i/m), ceil((c+1)*i/m))
    chunk = cum[edges[:, 1:]] - cum[edges[:, :-1]]
    chunk_nz = (nz[edges[:, 1:]] - nz[edges[:, :-1]]).clamp(min=1)
    sum_plogq = _xlogx(chunk).sum(1) - (chunk * torch.log(chunk_nz)).sum(1)
    sum_plogq += torch.where(tail > 0, tail * torch.log((chunk[:, -1] / chunk_nz[:, -1]).clamp(min=1e-300)), zero)
    total, kept = cum[n], cum[i]
    kl = (sum_plogp - sum_plogq) / total - torch.log(total) + torch.log(kept.clamp(min=1e-300))
    kl = torch.where(((tail > 0) & (last == 0)) | (kept == 0), torch.full_like(kl, math.inf), kl)
    return int(i[torch.argmin(kl)])


def coarsen(counts: torch.Tensor, min_mean: float) -> tuple[torch.Tensor, int]:
    """Merge pairs of bins of a one-sided histogram until its non-empty span averages ``min_mean`` counts per bin.

    Returns:
        ``(coarse counts, factor)``: coarse bin ``j`` covers the original bins ``[j * factor, (j + 1) * factor)``.
    """
    factor = 1
    nonzero = torch.nonzero(counts).flatten()
    span = int(nonzero[-1]) + 1 if nonzero.numel() else 0
    total = float(counts.sum())
    while span > 1 and total < min_mean * span:
        counts = torch.nn.functional.pad(counts, (0, counts.numel() % 2)).reshape(-1, 2).sum(1)
        span, factor = (span + 1) // 2, factor * 2
    return counts, factor


def percentile_edges(counts: torch.Tensor, lower: Optional[float], upper: float) -> tuple[int, int]:
    """Bin edges holding the given fractions of the counts below them.

    Args:
        counts: a histogram row.
        lower: the fraction of counts allowed below the lower edge (``None``: lower edge 0).
        upper: the fraction of counts that must lie below the upper edge.

    Returns:
        ``(lo, hi)`` edge indices, ``0 <= lo < hi <= len(counts)``.
    """
    cum = counts.to(torch.float64).cumsum(0)
    total = float(cum[-1])
    hi = int(torch.searchsorted(cum, torch.tensor(upper * total, dtype=torch.float64, device=cum.device))) + 1
    lo = 0 if lower is None else int(torch.searchsorted(
        cum, torch.tensor(lower * total, dtype=torch.float64, device=cum.device), right=True))
    hi = min(hi, counts.numel())
    return min(lo, hi - 1), hi
