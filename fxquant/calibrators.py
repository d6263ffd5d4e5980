"""Calibrators: observers that choose a clipping range from an exact histogram (entropy, percentile, MSE).

All of them keep, per tensor (one row) or per channel (one row per channel), a histogram on a grid anchored at
0.0 whose bin width is a power of two (:mod:`fxquant._histogram`). A batch with a wider range doubles the
width, merging whole bins, so no count is ever split, approximated or dropped: ``histogram.sum()`` is the
number of finite values seen, and the state after any sequence of batches and merges depends only on the data
(order and partitioning do not matter). The range is chosen when :meth:`~fxquant.observers.ObserverBase.qparams`
is called:

========================================= =================================================================
:class:`EntropyObserver`                  TensorRT's KL-divergence search over cut-offs (activations)
:class:`PercentileObserver`               the given percentile of the values (99.99 by default)
:class:`MSEObserver`                      the range with the least quantization MSE (activations)
:class:`PerChannelPercentileObserver`     the percentile of each channel (weights)
:class:`PerChannelMSEObserver`            the least-MSE range of each channel (weights)
========================================= =================================================================

Distributed calibration (the merge/state API, the same for every calibrator here):

* the statistics are the buffers ``histogram`` (``int64 [rows, bins]``), ``bin_exp`` and ``first_bin``
  (``int64 [rows]``: row ``r``'s column ``j`` counts ``[(first_bin + j) * 2**bin_exp, ...)``), ``min_val`` /
  ``max_val`` (``float32 [rows]``, exact extremes) and the base class's ``nonfinite_count`` / ``batches``;
  ``state_dict()`` / ``load_state_dict()`` round-trip them exactly (per-channel buffers are resized on load);
* ``a.merge_(b)`` folds ``b``'s statistics into ``a``; it is exact, commutative and associative: merging the
  observers of N ranks (e.g. after ``torch.distributed.all_gather_object`` of their state dicts, loaded into
  fresh observers of the same arguments) gives bit-for-bit the observer that saw all the data;
* observers of different classes or arguments refuse to merge (``TypeError`` / ``ValueError``).

Example:
    >>> import torch
    >>> from fxquant.calibrators import PercentileObserver
    >>> obs = PercentileObserver(percentile=99.0)
    >>> _ = obs(torch.cat([torch.linspace(0, 1, 10_000), torch.tensor([100.0])]))
    >>> round(float(obs.qparams().scale) * 255, 2)   # the outlier is clipped away
    1.0
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar, Optional, Union

import torch

from fxquant import _histogram
from fxquant.backends import BackendConfig
from fxquant.observers import (HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, ObserverBase,
                               ObserverFactory, PerChannelMinMaxObserver, _finite_aminmax)
from fxquant.qconfig import QConfig, QConfigMapping, _backend, _grid, _min_scale, _with_table_weight_rules
from fxquant.qparams import DEFAULT_EPS, PER_CHANNEL_SCHEMES, SYMMETRIC_SCHEMES, QParams, qparams_from_range

__all__ = ["EntropyObserver", "PercentileObserver", "MSEObserver", "PerChannelPercentileObserver",
           "PerChannelMSEObserver", "Calibrator", "get_calibration_qconfig", "get_calibration_qconfig_mapping"]

#: the MSE search tries fractions k / _MSE_STEPS of the observed extremes, then _MSE_STEPS finer ones around the
#: best (steps of 1 / _MSE_STEPS**2); two-sided affine grids try every (lower, upper) pair of fractions
_MSE_STEPS = 16
#: elements of one step of the MSE search (candidates x rows x used bins)
_MSE_CHUNK = 2**22


class _ExactHistogramObserver(ObserverBase):
    """Exact power-of-two histograms, one row per tensor or per channel; subclasses choose the range."""

    histogram: torch.Tensor
    bin_exp: torch.Tensor
    first_bin: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor
    quant_min: int
    quant_max: int
    zero_count: torch.Tensor
    _resizable_buffers: ClassVar[tuple[str, ...]] = ("histogram", "bin_exp", "first_bin", "min_val", "max_val",
                                                     "zero_count")

    def __init__(self, bins: int, **kwargs: Any) -> None:
        if int(bins) < 8:
            raise ValueError(f"{type(self).__name__} needs bins >= 8, got {bins}")
        super().__init__(**kwargs)
        self.bins = int(bins)
        rows = 1 if self._per_channel is False else 0
        self.register_buffer("histogram", torch.zeros(rows, self.bins, dtype=torch.int64))
        self.register_buffer("bin_exp", torch.full((rows,), _histogram._EXP_FLOOR, dtype=torch.int64))
        self.register_buffer("first_bin", torch.zeros(rows, dtype=torch.int64))
        self.register_buffer("min_val", torch.full((rows,), float("inf")))
        self.register_buffer("max_val", torch.full((rows,), float("-inf")))
        self.register_buffer("zero_count", torch.zeros(rows, dtype=torch.int64))

    def _config(self) -> dict[str, Any]:
        return {"bins": self.bins, **super()._config()}

    @property
    def has_data(self) -> bool:
        return self.min_val.numel() > 0 and bool((self.min_val <= self.max_val).all())

    # ----- statistics ------------------------------------------------------------------------------------
    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1)

    def _observe(self, x: torch.Tensor) -> None:
        rows = self._rows(x).to(torch.float32)
        mn, mx, nonfinite = _finite_aminmax(rows, dim=1)
        self.nonfinite_count += nonfinite
        if not bool(torch.isfinite(mn).any()):
            return
        self.batches += 1
        self._grow(torch.minimum(self.min_val, mn.to(self.min_val.device)),
                   torch.maximum(self.max_val, mx.to(self.max_val.device)), self.bin_exp)
        if nonfinite:
            rows = torch.where(torch.isfinite(rows), rows, torch.full_like(rows, float("nan")))
        self.histogram += _count_finite(rows, self.bin_exp, self.first_bin, self.bins).to(self.histogram.device)
        self.zero_count += (rows == 0).sum(1).to(self.zero_count.device)

    def _grow(self, new_min: torch.Tensor, new_max: torch.Tensor, at_least: torch.Tensor) -> None:
        """Move the histograms onto the grids that cover ``[new_min, new_max]`` (and zero)."""
        seen = new_min <= new_max
        zero = torch.zeros_like(new_min)
        exp, first = _histogram.pow2_layout(torch.where(seen, new_min, zero), torch.where(seen, new_max, zero),
                                            self.bins, at_least)
        self.histogram.copy_(_histogram.pow2_regrid(self.histogram, self.bin_exp, self.first_bin, exp, first))
        self.bin_exp.copy_(exp)
        self.first_bin.copy_(first)
        self.min_val.copy_(new_min)
        self.max_val.copy_(new_max)

    def _merge_stats(self, other: ObserverBase) -> None:
        assert isinstance(other, _ExactHistogramObserver)
        if not other.has_data:
            return
        if self.histogram.shape != other.histogram.shape:
            raise ValueError(f"cannot merge into {self._describe()}: it has {self.histogram.shape[0]} rows "
                             f"(channels) and the other observer {other.histogram.shape[0]}")
        dev = self.histogram.device
        o_hist, o_exp, o_first = other.histogram.to(dev), other.bin_exp.to(dev), other.first_bin.to(dev)
        self._grow(torch.minimum(self.min_val, other.min_val.to(dev)),
                   torch.maximum(self.max_val, other.max_val.to(dev)), torch.maximum(self.bin_exp, o_exp))
        self.histogram += _histogram.pow2_regrid(o_hist, o_exp, o_first, self.bin_exp, self.first_bin)
        self.zero_count += other.zero_count.to(dev)

    def _reset_stats(self) -> None:
        self.histogram.zero_()
        self.bin_exp.fill_(_histogram._EXP_FLOOR)
        self.first_bin.zero_()
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))
        self.zero_count.zero_()

    # ----- the range ---------------------------------------------------------------------------------------
    def qparams(self) -> QParams:
        if not self.has_data:
            raise self._no_data()
        lo, hi = self._choose_range()
        lo = torch.maximum(lo.to(torch.float32), self.min_val)
        hi = torch.minimum(hi.to(torch.float32), self.max_val)
        return self._qparams_from(torch.minimum(lo, hi), hi)

    def _qparams_from(self, lo: torch.Tensor, hi: torch.Tensor) -> QParams:
        if self._per_channel is False:
            lo, hi = lo.reshape(()), hi.reshape(())
        return qparams_from_range(lo, hi, dtype=self.dtype, qscheme=self.qscheme, quant_min=self.quant_min,
                                  quant_max=self.quant_max, eps=self.eps, axis=self._axis())

    def _axis(self) -> Optional[int]:
        return None

    def _choose_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` per row, in real units (subclasses)."""
        raise NotImplementedError

    def _to_real(self, row: int, units: float) -> float:
        """A position in bins of row ``row`` as a real value."""
        return (int(self.first_bin[row]) + units) * 2.0 ** int(self.bin_exp[row])

    @property
    def _symmetric(self) -> bool:
        return self.qscheme in SYMMETRIC_SCHEMES

    def _one_sided(self, row: int) -> bool:
        return bool(self.min_val[row] >= 0) or bool(self.max_val[row] <= 0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_val={self.min_val.tolist()}, max_val={self.max_val.tolist()}"


def _count_finite(rows: torch.Tensor, exp: torch.Tensor, first: torch.Tensor, bins: int) -> torch.Tensor:
    """:func:`fxquant._histogram.pow2_count` for rows that may hold NaN (not counted)."""
    finite = ~torch.isnan(rows)
    if bool(finite.all()):
        return _histogram.pow2_count(rows, exp.to(rows.device), first.to(rows.device), bins)
    counts = torch.zeros(rows.shape[0], bins, dtype=torch.int64, device=rows.device)
    for r in range(rows.shape[0]):  # only batches with NaN/Inf take this path
        values = rows[r][finite[r]].unsqueeze(0)
        if values.numel():
            counts[r] = _histogram.pow2_count(values, exp[r:r + 1].to(rows.device), first[r:r + 1].to(rows.device),
                                              bins)[0]
    return counts


class _PerChannelRows:
    """Mixin: one histogram row per slice along ``ch_axis``."""

    ch_axis: int
    input_ndim: torch.Tensor
    histogram: torch.Tensor

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if not -x.dim() <= self.ch_axis < x.dim():
            raise ValueError(f"{name}: ch_axis={self.ch_axis} is out of range for an input of shape "
                             f"{tuple(x.shape)}; pass ch_axis for the channel dimension of the observed tensor")
        channels, known = x.shape[self.ch_axis], int(self.input_ndim)
        if known and (known != x.dim() or channels != self.histogram.shape[0]):
            raise ValueError(f"{name}: got an input of shape {tuple(x.shape)} after inputs with {known} dims and "
                             f"{self.histogram.shape[0]} channels; one observer watches one tensor")
        if not known:
            self._resize(channels)
            self.input_ndim.fill_(x.dim())
        return x.movedim(self.ch_axis, 0).reshape(channels, -1)

    def _resize(self, channels: int) -> None:
        dev = self.histogram.device
        with torch.inference_mode(False):  # a first batch under inference mode: later batches write into these
            self.histogram = torch.zeros(channels, self.histogram.shape[1], dtype=torch.int64, device=dev)
            self.bin_exp = torch.full((channels,), _histogram._EXP_FLOOR, dtype=torch.int64, device=dev)
            self.first_bin = torch.zeros(channels, dtype=torch.int64, device=dev)
            self.min_val = torch.full((channels,), float("inf"), device=dev)
            self.max_val = torch.full((channels,), float("-inf"), device=dev)
            self.zero_count = torch.zeros(channels, dtype=torch.int64, device=dev)

    def _axis(self) -> Optional[int]:
        return self.ch_axis % int(self.input_ndim) if self.ch_axis < 0 else self.ch_axis


# ------------------------------------------------------------------------------------------------ entropy

class EntropyObserver(_ExactHistogramObserver):
    """Per-tensor range from TensorRT's entropy calibration: the cut-off with the least KL divergence.

    A one-sided histogram (trimmed at the largest value) is searched over every cut-off from ``levels`` bins to
    all of them (:func:`fxquant._histogram.kl_clip`): the cut-off whose clipped-then-quantized distribution loses
    the least information wins. Symmetric grids search ``|x|`` with half the grid's steps (TensorRT's int8:
    128); affine grids search each side of zero on its own, each with its share of the steps (in proportion to
    the observed extremes: all 256 for one-sided data such as ReLU outputs).

    When to use it: activations of classification networks, whose bulk matters more than rare large values
    (TensorRT's default for CNNs). It keeps at least ``levels / bins`` of the largest value, so a single far
    outlier is not cut away; prefer :class:`PercentileObserver` or :class:`MSEObserver` then.

    Args:
        bins: histogram bins (2048, TensorRT's); the data span at least half of them.
        skip_zeros: leave exact zeros out of the search (as pytorch-quantization's ``skip_zeros``). A ReLU
            output is often half zeros; that spike makes the plain KL search pick the smallest cut-off it
            may (``levels`` bins) whatever the rest of the data look like. Zeros are exact on every grid.
        others: see :class:`fxquant.observers.ObserverBase` (per-tensor schemes).

    Merging and state: see :mod:`fxquant.calibrators` (exact, order-independent).

    Example:
        >>> obs = EntropyObserver()
        >>> _ = obs(torch.randn(100_000, generator=torch.Generator().manual_seed(0)).relu())
        >>> 2.5 < float(obs.qparams().scale) * 255 < float(obs.max_val)
        True
    """

    def __init__(self, bins: int = 2048, skip_zeros: bool = True, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, reduce_range: bool = False,
                 quant_min: Optional[int] = None, quant_max: Optional[int] = None, eps: float = DEFAULT_EPS,
                 is_dynamic: bool = False) -> None:
        self.skip_zeros = bool(skip_zeros)
        super().__init__(bins, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min,
                         quant_max=quant_max, eps=eps, is_dynamic=is_dynamic)

    def _config(self) -> dict[str, Any]:
        return {"skip_zeros": self.skip_zeros, **super()._config()}

    def _choose_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        steps, zero = self.quant_max - self.quant_min + 1, -int(self.first_bin[0])
        row = self.histogram[0].clone()
        if self.skip_zeros:  # exact zeros (ReLU's spike) are on the grid: no error, not part of the search
            row[zero] -= self.zero_count[0].to(row.device)
        if self._symmetric:  # TensorRT: |x| on the half grid
            t = abs(self._to_real(0, zero + _kl_side(_histogram.fold_abs(row, zero), steps // 2)))
            return torch.tensor([-t]), torch.tensor([t])
        # affine: each side searched on its own, with its share of the grid's steps (all of them for one-sided data)
        neg, pos = -min(float(self.min_val[0]), 0.0), max(float(self.max_val[0]), 0.0)
        pos_steps = round(steps * pos / (pos + neg)) if pos + neg > 0 else steps
        hi = _kl_side(row[zero:], max(pos_steps, 1)) if pos > 0 else 0
        lo = _kl_side(row[:zero].flip(0), max(steps - pos_steps, 1)) if neg > 0 else 0
        return torch.tensor([self._to_real(0, zero - lo)]), torch.tensor([self._to_real(0, zero + hi)])


#: the entropy search needs a dense histogram: bins are merged in pairs until the data average this many per bin
_KL_MIN_MEAN = 16


def _kl_side(counts: torch.Tensor, levels: int) -> int:
    """:func:`fxquant._histogram.kl_clip` on a histogram coarsened to :data:`_KL_MIN_MEAN` counts per bin (a small
    tensor, such as a squeeze-excitation vector, would otherwise be a few isolated counts the search cuts off)."""
    coarse, factor = _histogram.coarsen(counts, _KL_MIN_MEAN)
    return _histogram.kl_clip(coarse, levels) * factor


# --------------------------------------------------------------------------------------------- percentile

def _check_percentile(percentile: float) -> float:
    if not 50.0 < float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    return float(percentile)


class _PercentileRange:
    """Mixin: the range holding ``percentile`` % of the values of each row."""

    percentile: float
    histogram: torch.Tensor
    first_bin: torch.Tensor

    def _choose_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.percentile / 100.0
        lows, highs = [], []
        for r in range(self.histogram.shape[0]):
            zero = -int(self.first_bin[r])
            if self._symmetric or self._one_sided(r):  # type: ignore[attr-defined]
                _, t = _histogram.percentile_edges(_histogram.fold_abs(self.histogram[r], zero), None, q)
                lo_u, hi_u = zero - t, zero + t
            else:
                lo_u, hi_u = _histogram.percentile_edges(self.histogram[r], 1.0 - q, q)
            lows.append(self._to_real(r, lo_u))  # type: ignore[attr-defined]
            highs.append(self._to_real(r, hi_u))  # type: ignore[attr-defined]
        return torch.tensor(lows, dtype=torch.float64), torch.tensor(highs, dtype=torch.float64)


class PercentileObserver(_PercentileRange, _ExactHistogramObserver):
    """Per-tensor range holding ``percentile`` % of the values (NVIDIA pytorch-quantization's percentile).

    Symmetric grids and one-sided data take the percentile of ``|x|``; two-sided data on an affine grid cut
    ``100 - percentile`` % from each tail. Bounds are bin edges of the exact histogram (at least ``bins / 2``
    bins over the data), rounded outwards.

    When to use it: activations with rare extreme values (outlier tokens or pixels), where min/max wastes the
    grid; 99.99 suits large activation maps, use 99.9 or lower for small ones. It ignores the error it causes,
    so on well-behaved data :class:`MSEObserver` or :class:`EntropyObserver` usually do better.

    Args:
        percentile: in ``(50, 100]``; 100 is min/max.
        bins: histogram bins.
        others: see :class:`fxquant.observers.ObserverBase` (per-tensor schemes).

    Merging and state: see :mod:`fxquant.calibrators` (exact, order-independent).
    """

    def __init__(self, percentile: float = 99.99, bins: int = 2048, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, reduce_range: bool = False,
                 quant_min: Optional[int] = None, quant_max: Optional[int] = None, eps: float = DEFAULT_EPS,
                 is_dynamic: bool = False) -> None:
        self.percentile = _check_percentile(percentile)
        super().__init__(bins, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min,
                         quant_max=quant_max, eps=eps, is_dynamic=is_dynamic)

    def _config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, **super()._config()}


class PerChannelPercentileObserver(_PerChannelRows, _PercentileRange, _ExactHistogramObserver):
    """Per-channel range holding ``percentile`` % of each channel's values (for weights).

    As :class:`PercentileObserver`, one histogram per slice along ``ch_axis``.

    When to use it: weights with a few outlier values per channel; for most weights :class:`PerChannelMSEObserver`
    (which weighs the error it causes) is the better choice.

    Args:
        percentile: in ``(50, 100]``.
        ch_axis: the channel dimension (negative counts from the end).
        bins: histogram bins per channel.
        others: see :class:`fxquant.observers.ObserverBase`; defaults ``qint8`` per-channel symmetric.

    Merging and state: see :mod:`fxquant.calibrators`; channel counts must agree.
    """

    _per_channel = True
    input_ndim: torch.Tensor

    def __init__(self, percentile: float = 99.99, ch_axis: int = 0, bins: int = 2048,
                 dtype: torch.dtype = torch.qint8, qscheme: torch.qscheme = torch.per_channel_symmetric,
                 reduce_range: bool = False, quant_min: Optional[int] = None, quant_max: Optional[int] = None,
                 eps: float = DEFAULT_EPS, is_dynamic: bool = False) -> None:
        self.percentile = _check_percentile(percentile)
        super().__init__(bins, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min,
                         quant_max=quant_max, eps=eps, is_dynamic=is_dynamic)
        self.ch_axis = ch_axis
        self.register_buffer("input_ndim", torch.zeros((), dtype=torch.int64))

    def _config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "ch_axis": self.ch_axis, **super()._config()}

    def _merge_stats(self, other: ObserverBase) -> None:
        _merge_per_channel(self, other)


# -------------------------------------------------------------------------------------------------- MSE

def _merge_per_channel(obs: Any, other: Any) -> None:
    if other.has_data and not obs.histogram.shape[0]:
        obs._resize(other.histogram.shape[0])
        obs.input_ndim.copy_(other.input_ndim)
    _ExactHistogramObserver._merge_stats(obs, other)


class _MSERange:
    """Mixin: the range with the least squared quantization error over the histogram (bin centres)."""

    histogram: torch.Tensor
    bin_exp: torch.Tensor
    first_bin: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor

    def _centres(self) -> torch.Tensor:
        cols = torch.arange(self.histogram.shape[1], dtype=torch.float64, device=self.histogram.device)
        width = torch.pow(2.0, self.bin_exp.to(torch.float64)).unsqueeze(1)
        return (self.first_bin.to(torch.float64).unsqueeze(1) + cols.unsqueeze(0) + 0.5) * width

    def _errors(self, lo: torch.Tensor, hi: torch.Tensor, centres: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Squared error of each candidate: ``lo``/``hi`` are ``[R, K]``; returns ``[R, K]``."""
        qp = qparams_from_range(lo.float(), hi.float(), dtype=self.dtype, qscheme=self.qscheme,  # type: ignore[attr-defined]
                                quant_min=self.quant_min, quant_max=self.quant_max, eps=self.eps)  # type: ignore[attr-defined]
        scale, zp = qp.scale.unsqueeze(2), qp.zero_point.to(torch.float32).unsqueeze(2)
        x = centres.unsqueeze(1)
        q = torch.clamp(torch.round(x / scale) + zp, qp.quant_min, qp.quant_max)
        return (((q - zp) * scale - x) ** 2 * counts.unsqueeze(1)).sum(2, dtype=torch.float64)

    def _best(self, lo: torch.Tensor, hi: torch.Tensor, centres: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Index ``[R, 1]`` of the candidate with the least error (the first of equals)."""
        chunk = max(1, _MSE_CHUNK // counts.numel())  # candidates per step: bounded memory
        errors = torch.cat([self._errors(lo[:, k:k + chunk], hi[:, k:k + chunk], centres, counts)
                            for k in range(0, lo.shape[1], chunk)], dim=1)
        return errors.argmin(1, keepdim=True)

    def _choose_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo0 = self.min_val.to(torch.float64).clamp(max=0.0).unsqueeze(1)
        hi0 = self.max_val.to(torch.float64).clamp(min=0.0).unsqueeze(1)
        # exact zeros (a ReLU's half of the data) are scored at 0.0, not at the centre of the bin above it
        rows = torch.arange(self.histogram.shape[0], device=self.histogram.device)
        hist = self.histogram.clone()
        hist[rows, -self.first_bin] -= self.zero_count
        hist = torch.cat([hist, self.zero_count.unsqueeze(1)], dim=1)
        centres = torch.cat([self._centres(), torch.zeros_like(lo0)], dim=1)
        centres, counts = _nonzero_columns(centres, hist)
        two_d = self.histogram.shape[0] == 1 and self.qscheme not in SYMMETRIC_SCHEMES \
            and bool(lo0 < 0) and bool(hi0 > 0)  # type: ignore[attr-defined]
        steps = torch.arange(1, _MSE_STEPS + 1, dtype=torch.float64) / _MSE_STEPS
        offsets = (torch.arange(_MSE_STEPS, dtype=torch.float64) - (_MSE_STEPS - 1) / 2) * 2 / _MSE_STEPS ** 2
        c_lo = c_hi = steps.expand(lo0.shape[0], -1)  # fractions of the observed extremes: coarse, then fine
        for _ in range(2):
            a, b = (c_lo.repeat_interleave(c_hi.shape[1], 1), c_hi.repeat(1, c_lo.shape[1])) if two_d else (c_lo, c_lo)
            best = self._best(a * lo0, b * hi0, centres, counts)
            f_lo, f_hi = a.gather(1, best), b.gather(1, best)
            c_lo = torch.cat([f_lo, (f_lo + offsets).clamp(1.0 / _MSE_STEPS ** 2, 1.0)], dim=1)
            c_hi = torch.cat([f_hi, (f_hi + offsets).clamp(1.0 / _MSE_STEPS ** 2, 1.0)], dim=1)
        return (f_lo * lo0).squeeze(1), (f_hi * hi0).squeeze(1)


def _nonzero_columns(centres: torch.Tensor, histogram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's non-empty columns first, cut to the longest such row (zero counts pad the rest)."""
    nonzero = histogram > 0
    width = max(int(nonzero.sum(1).max()), 1)
    order = torch.sort((~nonzero).to(torch.int8), dim=1, stable=True).indices[:, :width]
    return centres.gather(1, order).to(torch.float32), histogram.gather(1, order).to(torch.float32)


class MSEObserver(_MSERange, _ExactHistogramObserver):
    """Per-tensor range with the least mean squared quantization error over everything observed.

    Every candidate range is quantized for real (this observer's grid, rounding, clamping, zero-point rounding)
    and scored on the histogram's bin centres. Candidates shrink the observed range towards zero in steps of
    1/128; for two-sided data on an affine grid the lower and upper cut-offs are searched independently
    (48 x 48 pairs).

    When to use it: a strong default for activations when the output error matters uniformly (regression,
    feature maps, two-sided activations); it trades clipping against rounding directly.
    :class:`fxquant.observers.HistogramObserver` optimises a similar objective with an analytic noise model.

    Args:
        bins: histogram bins.
        others: see :class:`fxquant.observers.ObserverBase` (per-tensor schemes).

    Merging and state: see :mod:`fxquant.calibrators` (exact, order-independent).
    """

    def __init__(self, bins: int = 2048, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, reduce_range: bool = False,
                 quant_min: Optional[int] = None, quant_max: Optional[int] = None, eps: float = DEFAULT_EPS,
                 is_dynamic: bool = False) -> None:
        super().__init__(bins, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min,
                         quant_max=quant_max, eps=eps, is_dynamic=is_dynamic)


class PerChannelMSEObserver(_PerChannelRows, _MSERange, _ExactHistogramObserver):
    """Per-channel range with the least squared quantization error of each channel (for weights).

    Each channel's range shrinks towards zero in steps of 1/128 of its own extremes; the step with the least
    error of quantizing that channel wins.

    When to use it: weights, per-channel or (with a per-tensor observer of the same kind) whenever a few
    large weights stretch a channel's range; it never picks a range worse than min/max on the histogram.

    Args:
        ch_axis: the channel dimension (negative counts from the end).
        bins: histogram bins per channel.
        others: see :class:`fxquant.observers.ObserverBase`; defaults ``qint8`` per-channel symmetric.

    Merging and state: see :mod:`fxquant.calibrators`; channel counts must agree.

    Example:
        >>> w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
        >>> w[0, 0] = 40.0                                   # one outlier in channel 0
        >>> obs = PerChannelMSEObserver()
        >>> _ = obs(w)
        >>> bool(obs.qparams().scale[0] < 40.0 / 127)         # clipped
        True
    """

    _per_channel = True
    input_ndim: torch.Tensor

    def __init__(self, ch_axis: int = 0, bins: int = 2048, dtype: torch.dtype = torch.qint8,
                 qscheme: torch.qscheme = torch.per_channel_symmetric, reduce_range: bool = False,
                 quant_min: Optional[int] = None, quant_max: Optional[int] = None, eps: float = DEFAULT_EPS,
                 is_dynamic: bool = False) -> None:
        super().__init__(bins, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min,
                         quant_max=quant_max, eps=eps, is_dynamic=is_dynamic)
        self.ch_axis = ch_axis
        self.register_buffer("input_ndim", torch.zeros((), dtype=torch.int64))

    def _config(self) -> dict[str, Any]:
        return {"ch_axis": self.ch_axis, **super()._config()}

    def _merge_stats(self, other: ObserverBase) -> None:
        _merge_per_channel(self, other)


# ------------------------------------------------------------------------------------- qconfig helpers

class Calibrator(str, enum.Enum):
    """The calibration methods, by name (``get_calibration_qconfig(activation="entropy")``)."""

    MINMAX = "minmax"
    MOVING_AVERAGE = "moving_average"
    HISTOGRAM = "histogram"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"
    MSE = "mse"


def _activation_class(method: Calibrator) -> type:
    return {Calibrator.MINMAX: MinMaxObserver, Calibrator.MOVING_AVERAGE: MovingAverageMinMaxObserver,
            Calibrator.HISTOGRAM: HistogramObserver, Calibrator.ENTROPY: EntropyObserver,
            Calibrator.PERCENTILE: PercentileObserver, Calibrator.MSE: MSEObserver}[method]


def _weight_class(method: Calibrator, per_channel: bool) -> type:
    table = {Calibrator.MINMAX: (MinMaxObserver, PerChannelMinMaxObserver),
             Calibrator.PERCENTILE: (PercentileObserver, PerChannelPercentileObserver),
             Calibrator.MSE: (MSEObserver, PerChannelMSEObserver)}
    if method not in table:
        raise ValueError(f"weight calibrator {method.value!r} is not available; weights are static, use one of "
                         f"{[m.value for m in table]}")
    return table[method][int(per_channel)]


def _method(name: Union[str, Calibrator], role: str) -> Calibrator:
    try:
        return Calibrator(name)
    except ValueError:
        raise ValueError(f"unknown {role} calibrator {name!r}; use one of {[m.value for m in Calibrator]}") from None


def get_calibration_qconfig(backend: Union[str, BackendConfig] = "x86", activation: Union[str, Calibrator] = "histogram",
                            weight: Union[str, Calibrator] = "minmax", per_channel: bool = True,
                            **activation_args: Any) -> QConfig:
    """A post-training QConfig on a backend's grids with the chosen calibrators.

    Args:
        backend: ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` or a :class:`fxquant.backends.BackendConfig`.
        activation: a :class:`Calibrator` name for activations (``"histogram"`` is the backend default).
        weight: ``"minmax"``, ``"percentile"`` or ``"mse"`` for weights.
        per_channel: per-channel weights (the backend's per-channel grid) or one symmetric scale per tensor.
        activation_args: extra arguments of the activation observer (``percentile=99.9``, ``bins=4096``,
            ``averaging_constant=0.1``).

    Returns:
        The :class:`fxquant.qconfig.QConfig`.

    Example:
        >>> qc = get_calibration_qconfig("x86", activation="entropy", weight="mse")
        >>> type(qc.activation()).__name__, type(qc.weight()).__name__
        ('EntropyObserver', 'PerChannelMSEObserver')
    """
    cfg = _backend(backend)
    act_cls = _activation_class(_method(activation, "activation"))
    weight_cls = _weight_class(_method(weight, "weight"), per_channel)
    scheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
    if per_channel and cfg.weight.qscheme in PER_CHANNEL_SCHEMES:
        scheme = cfg.weight.qscheme
    weight_grid = _grid(dataclasses.replace(cfg.weight, qscheme=scheme), _min_scale(cfg, "weight_min_scale"))
    act: ObserverFactory = act_cls.with_args(**_grid(cfg.default_activation(), _min_scale(cfg)), **activation_args)
    return QConfig(activation=act, weight=weight_cls.with_args(**weight_grid))


def get_calibration_qconfig_mapping(backend: Union[str, BackendConfig] = "x86",
                                    activation: Union[str, Calibrator] = "histogram",
                                    weight: Union[str, Calibrator] = "minmax", per_channel: bool = True,
                                    **activation_args: Any) -> QConfigMapping:
    """``QConfigMapping().set_global(get_calibration_qconfig(...))`` plus the table's per-op weight rules.

    Example:
        >>> m = get_calibration_qconfig_mapping("fbgemm", activation="percentile", percentile=99.9)
        >>> m.global_qconfig.activation().percentile
        99.9
    """
    cfg = _backend(backend)
    qconfig = get_calibration_qconfig(cfg, activation, weight, per_channel, **activation_args)
    return _with_table_weight_rules(QConfigMapping().set_global(qconfig), cfg, False)
