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

import torch

__all__ = ["bin_counts", "rebin", "search_clip_range"]

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


@dataclasses.dataclass(frozen=True)
class _PrefixSums:
    """Prefix sums of count, count * center and count * center^2 (bin units), each of length ``bins + 1``."""

    n: torch.Tensor
    nc: torch.Tensor
    ncc: torch.Tensor

    @classmethod
    def of(cls, counts: torch.Tensor) -> "_PrefixSums":
        n = counts.to(torch.float64)
        centers = torch.arange(n.numel(), dtype=torch.float64, device=n.device) + 0.5
        zero = n.new_zeros(1)
        return cls(torch.cat([zero, n.cumsum(0)]), torch.cat([zero, (n * centers).cumsum(0)]),
                   torch.cat([zero, (n * centers * centers).cumsum(0)]))


def _clipped_below(sums: _PrefixSums, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error of clipping the bins whose center is below ``lo`` up to ``lo``, and their count."""
    k = torch.ceil(lo - 0.5).clamp(0, sums.n.numel() - 1).to(torch.int64)
    err = sums.ncc[k] - 2 * lo * sums.nc[k] + lo * lo * sums.n[k]
    return err.clamp(min=0), sums.n[k]


def _clipped_above(sums: _PrefixSums, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error of clipping the bins whose center is above ``hi`` down to ``hi``, and the count up to ``hi``."""
    j = (torch.floor(hi - 0.5) + 1).clamp(0, sums.n.numel() - 1).to(torch.int64)
    n, nc, ncc = (s[-1] - s[j] for s in (sums.n, sums.nc, sums.ncc))
    return (ncc - 2 * hi * nc + hi * hi * n).clamp(min=0), sums.n[j]


def _expected_error(sums: _PrefixSums, lo: torch.Tensor, hi: torch.Tensor, levels: int,
                    outer: bool = False) -> torch.Tensor:
    """Expected total squared error of quantizing onto ``levels`` steps over ``[lo, hi]`` (bin units).

    Values outside the range are clipped to its ends (error: their distance to the end); values inside get
    uniform rounding noise ``step**2 / 12``. A bin counts as outside when its center is.

    Args:
        sums: prefix sums of the histogram.
        lo, hi: 1-d candidate bounds.
        levels: ``quant_max - quant_min``.
        outer: evaluate every ``(lo[i], hi[j])`` pair (a matrix) instead of the pairs ``(lo[i], hi[i])``.

    Returns:
        The errors (``inf`` where ``hi <= lo``).
    """
    err_lo, n_below = _clipped_below(sums, lo)
    err_hi, n_upto = _clipped_above(sums, hi)
    if outer:
        lo, err_lo, n_below = lo[:, None], err_lo[:, None], n_below[:, None]
    step = (hi - lo) / levels
    cost = err_lo + err_hi + (n_upto - n_below) * (step * step / 12.0)
    return cost.masked_fill(step <= 0, math.inf)


def _best_pair(sums: _PrefixSums, lo_edges: torch.Tensor, hi_edges: torch.Tensor, zero: float,
               levels: int) -> tuple[int, int]:
    """Edge indices ``(s, t)`` (into the given candidate lists) with the least error for ``[min(s, 0), max(t, 0)]``."""
    lo = lo_edges.to(torch.float64).clamp(max=zero)
    hi = hi_edges.to(torch.float64).clamp(min=zero)
    flat = int(torch.argmin(_expected_error(sums, lo, hi, levels, outer=True)))
    return flat // hi_edges.numel(), flat % hi_edges.numel()


def _window(center: int, radius: int, bins: int, device: torch.device) -> torch.Tensor:
    return torch.arange(max(center - radius, 0), min(center + radius, bins) + 1, device=device)


def search_clip_range(counts: torch.Tensor, zero: float, levels: int, symmetric: bool) -> tuple[float, float]:
    """The clipping range ``[lo, hi]`` (bin units) with the least expected squared quantization error.

    Candidates are ranges between bin edges that contain 0 (a bound on the far side of 0 is moved onto it,
    as the quantizer would). Symmetric schemes search the half-width of ``[-m, m]`` over all edges at once;
    affine schemes search ``(lo, hi)`` pairs on a grid of at most 129 x 129 edges (small enough for torch to
    run each op single-threaded), then every edge pair within one grid step of the best one.

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
    edges = torch.arange(bins + 1, dtype=torch.float64, device=counts.device)
    if symmetric:
        half = (edges - zero).abs()
        best = half[torch.argmin(_expected_error(sums, zero - half, zero + half, levels))]
        return zero - float(best), zero + float(best)
    step = max(1, math.ceil(bins / _COARSE_EDGES))
    grid = torch.unique(torch.cat([edges[::step], edges[-1:]])).to(torch.int64)
    s, t = _best_pair(sums, grid, grid, zero, levels)
    lo_cands = _window(int(grid[s]), step, bins, counts.device)
    hi_cands = _window(int(grid[t]), step, bins, counts.device)
    s, t = _best_pair(sums, lo_cands, hi_cands, zero, levels)
    return min(float(lo_cands[s]), zero), max(float(hi_cands[t]), zero)
