"""Observers: identity forward, statistics, merging, errors, persistence, and torch.ao as a reference."""

from __future__ import annotations

import doctest
import io
import pickle
import warnings
from typing import Callable

import numpy as np
import pytest
import torch
import torch.fx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import fxquant.observers
from fxquant import _histogram
from fxquant.observers import (FixedQParamsObserver, FloatQParamsObserver, HistogramObserver, MinMaxObserver,
                               MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver, NoDataError,
                               ObserverBase, ObserverFactory, PerChannelMinMaxObserver, PlaceholderObserver)
from fxquant.qparams import QParams, dequantize, quantize_int

DATA_FACTORIES: dict[str, ObserverFactory] = {
    "minmax": MinMaxObserver.with_args(),
    "minmax_sym_qint8": MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
    "minmax_reduced": MinMaxObserver.with_args(reduce_range=True),
    "moving": MovingAverageMinMaxObserver.with_args(averaging_constant=0.3),
    "per_channel": PerChannelMinMaxObserver.with_args(ch_axis=1),
    "per_channel_last": PerChannelMinMaxObserver.with_args(ch_axis=-1, dtype=torch.quint8,
                                                           qscheme=torch.per_channel_affine),
    "moving_per_channel": MovingAveragePerChannelMinMaxObserver.with_args(averaging_constant=0.5),
    "histogram": HistogramObserver.with_args(bins=128),
    "histogram_sym": HistogramObserver.with_args(bins=64, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
}
ALL_FACTORIES: dict[str, ObserverFactory] = {
    **DATA_FACTORIES,
    "placeholder_fp16": PlaceholderObserver.with_args(dtype=torch.float16),
    "placeholder_dynamic": PlaceholderObserver.with_args(dtype=torch.quint8, is_dynamic=True),
    "fixed": FixedQParamsObserver.with_args(scale=1.0 / 256, zero_point=0),
}
SHAPE = (4, 3, 5)  # every per-channel ch_axis above is valid for it
seeds = st.integers(0, 2**16)


def _batch(seed: int, shape: tuple[int, ...] = SHAPE, spread: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * spread * float(torch.rand((), generator=g) + 0.1) \
        + float(torch.randn((), generator=g))


def _assert_same_qparams(a: QParams, b: QParams) -> None:
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    assert (a.dtype, a.qscheme, a.quant_min, a.quant_max, a.axis) == (b.dtype, b.qscheme, b.quant_min, b.quant_max,
                                                                        b.axis)


def _qparams_or_error(obs: ObserverBase) -> object:
    try:
        return obs.qparams()
    except ValueError as err:  # placeholders have none
        return str(err)


def _mse(x: torch.Tensor, qp: QParams) -> float:
    return float(((dequantize(quantize_int(x, qp), qp) - x) ** 2).mean())


# ----- identity forward and tracing ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_FACTORIES)
def test_forward_returns_its_input_unchanged(name):
    obs = ALL_FACTORIES[name]()
    x = _batch(0).requires_grad_(True)
    before = x.detach().clone()
    assert obs(x) is x
    assert torch.equal(x.detach(), before)
    assert obs(torch.empty(0, 3, 5)).numel() == 0


class _Net(nn.Module):
    def __init__(self, obs: nn.Module) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 5)
        self.block = nn.Sequential(nn.ReLU(), obs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.linear(x)) + 1


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ObserverBase) or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("name", ["minmax", "per_channel", "histogram", "placeholder_fp16", "fixed"])
@pytest.mark.parametrize("tracer", ["default", "leaf"])
def test_observer_traces_as_one_call_module_node(name, tracer):
    model = _Net(ALL_FACTORIES[name]())
    if tracer == "default":  # the default tracer would trace into the observer; it records itself as a leaf
        gm = torch.fx.symbolic_trace(model)
    else:
        gm = torch.fx.GraphModule(model, _LeafTracer().trace(model))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["linear", "block.0", "block.1"]
    x = _batch(1)
    assert torch.equal(gm(x), model(x))
    assert gm.get_submodule("block.1").has_data


# ----- persistence -------------------------------------------------------------------------------------------
@settings(max_examples=10)
@given(seed=seeds, nan=st.booleans())
@pytest.mark.parametrize("name", ALL_FACTORIES)
def test_state_dict_round_trip_into_a_fresh_observer(name, seed, nan):
    factory = ALL_FACTORIES[name]
    obs = factory()
    for k in range(3):
        x = _batch(seed + k)
        if nan:
            x[0, 0, 0] = float("nan")
        obs(x)
    buffer = io.BytesIO()
    torch.save(obs.state_dict(), buffer)
    buffer.seek(0)
    fresh = factory()
    fresh.load_state_dict(torch.load(buffer))
    for key, value in obs.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    a, b = _qparams_or_error(obs), _qparams_or_error(fresh)
    if isinstance(a, QParams):
        _assert_same_qparams(a, b)
        more = _batch(seed + 7)  # and both continue identically
        obs(more), fresh(more)
        _assert_same_qparams(obs.qparams(), fresh.qparams())
    else:
        assert a == b


def test_loading_an_empty_state_dict_resets_a_per_channel_observer():
    used = PerChannelMinMaxObserver(ch_axis=1)
    used(_batch(0))
    used.load_state_dict(PerChannelMinMaxObserver(ch_axis=1).state_dict())
    assert not used.has_data and used.min_val.shape == (0,)


# ----- the factory -------------------------------------------------------------------------------------------
def test_with_args_factory():
    f = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    assert repr(f) == "MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)"
    assert f.cls is MinMaxObserver and f.kwargs == {"dtype": torch.qint8, "qscheme": torch.per_tensor_symmetric}
    obs = f()
    assert isinstance(obs, MinMaxObserver) and obs.dtype == torch.qint8 and obs.quant_min == -128
    assert f() is not obs  # a new observer per call
    g = pickle.loads(pickle.dumps(f))
    assert g == f and hash(g) == hash(f) and repr(g) == repr(f)
    h = f.with_overrides(reduce_range=True)
    assert h.kwargs["reduce_range"] and "reduce_range" not in f.kwargs
    assert h().quant_min == -64 and f(reduce_range=True).quant_min == -64
    assert f.with_args(reduce_range=True) == h
    assert repr(PerChannelMinMaxObserver.with_args()) == "PerChannelMinMaxObserver.with_args()"
    with pytest.raises(TypeError, match="averaging_constant"):
        MinMaxObserver.with_args(averaging_constant=0.1)


# ----- configuration errors ----------------------------------------------------------------------------------
def test_configuration_errors_say_what_to_use():
    with pytest.raises(ValueError, match="PerChannelMinMaxObserver"):
        MinMaxObserver(qscheme=torch.per_channel_affine)
    with pytest.raises(ValueError, match="MinMaxObserver for per-tensor"):
        PerChannelMinMaxObserver(qscheme=torch.per_tensor_symmetric)
    with pytest.raises(ValueError, match="per-channel"):
        MovingAveragePerChannelMinMaxObserver(qscheme=torch.per_tensor_affine)
    with pytest.raises(ValueError, match="per-tensor"):
        HistogramObserver(qscheme=torch.per_channel_symmetric)
    with pytest.raises(ValueError, match="not supported"):
        PerChannelMinMaxObserver(qscheme=torch.per_channel_affine_float_qparams)
    with pytest.raises(ValueError, match="not a quantized dtype"):
        MinMaxObserver(dtype=torch.float16)
    with pytest.raises(ValueError, match="must satisfy"):
        MinMaxObserver(dtype=torch.qint8, quant_min=0, quant_max=255)
    with pytest.raises(ValueError, match="averaging_constant"):
        MovingAverageMinMaxObserver(averaging_constant=0.0)
    with pytest.raises(ValueError, match="bins"):
        HistogramObserver(bins=0)
    with pytest.raises(ValueError, match="zero_point"):
        FixedQParamsObserver(scale=0.1, zero_point=300)


def test_per_channel_input_errors_name_the_observer():
    obs = PerChannelMinMaxObserver(ch_axis=2)
    obs.where = "weight of 'fc'"
    with pytest.raises(ValueError, match=r"weight of 'fc'.*ch_axis=2 is out of range"):
        obs(torch.zeros(3, 4))
    obs(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="one observer watches one tensor"):
        obs(torch.zeros(2, 3, 5))


# ----- no data -----------------------------------------------------------------------------------------------
NO_DATA_FEEDS: dict[str, Callable[[], list[torch.Tensor]]] = {
    "nothing": lambda: [],
    "empty": lambda: [torch.empty(0, 3, 5)],
    "nan": lambda: [torch.full(SHAPE, float("nan"))],
    "inf": lambda: [torch.full(SHAPE, float("inf")), torch.full(SHAPE, float("-inf"))],
}


@pytest.mark.parametrize("feed", NO_DATA_FEEDS)
@pytest.mark.parametrize("name", DATA_FACTORIES)
def test_no_data_error_names_the_observer_and_what_to_do(name, feed):
    obs = DATA_FACTORIES[name]()
    obs.where = "output of node 'layer1.0.conv1'"
    for x in NO_DATA_FEEDS[feed]():
        assert obs(x) is x
    assert not obs.has_data
    for call in (obs.qparams, obs.calculate_qparams):
        with pytest.raises(NoDataError, match=r"output of node 'layer1\.0\.conv1'.*fxquant\.calibrate"):
            call()
    assert int(obs.nonfinite_count) == sum(int((~torch.isfinite(x)).sum()) for x in NO_DATA_FEEDS[feed]())
    assert int(obs.batches) == 0


def test_per_channel_no_data_lists_the_empty_channels():
    obs = PerChannelMinMaxObserver(ch_axis=0)
    x = torch.randn(3, 4)
    x[1] = float("nan")
    obs(x)
    assert not obs.has_data
    with pytest.raises(NoDataError, match=r"channel\(s\) \[1\]"):
        obs.qparams()


def _finite_equivalent(x: torch.Tensor, obs: ObserverBase) -> torch.Tensor:
    """``x`` without its non-finite elements, as far as ``obs``'s statistics can tell."""
    finite = torch.isfinite(x)
    if isinstance(obs, PerChannelMinMaxObserver):  # replace by a finite value of the same channel
        axis = obs.ch_axis % x.dim()
        filler = torch.where(finite, x, torch.inf).amin(dim=[d for d in range(x.dim()) if d != axis], keepdim=True)
        return torch.where(finite, x, filler)
    return x[finite]


@settings(max_examples=15)
@given(seed=seeds, fraction=st.floats(0.01, 0.5))
@pytest.mark.parametrize("name", DATA_FACTORIES)
def test_nan_and_inf_are_ignored_and_counted(name, seed, fraction):
    dirty_obs, clean_obs = DATA_FACTORIES[name](), DATA_FACTORIES[name]()
    expected_bad = 0
    for k in range(2):
        x = _batch(seed + k)
        g = torch.Generator().manual_seed(seed + k)
        bad = torch.rand(SHAPE, generator=g) < fraction
        bad[0, 0, 0] = True
        bad[1:, 1:, 1:] = False  # every channel keeps finite values
        junk = torch.tensor([float("nan"), float("inf"), float("-inf")])[torch.randint(0, 3, SHAPE, generator=g)]
        dirty = torch.where(bad, junk, x)
        dirty_obs(dirty)
        clean_obs(_finite_equivalent(dirty, clean_obs))
        expected_bad += int(bad.sum())
    assert int(dirty_obs.nonfinite_count) == expected_bad
    _assert_same_qparams(dirty_obs.qparams(), clean_obs.qparams())


# ----- merging -----------------------------------------------------------------------------------------------
@settings(max_examples=15)
@given(seed=seeds, n_a=st.integers(0, 3), n_b=st.integers(0, 3))
@pytest.mark.parametrize("name", ["minmax", "minmax_sym_qint8", "per_channel", "per_channel_last", "float_rows"])
def test_merge_equals_one_observer_over_both_data_sets(name, seed, n_a, n_b):
    factory = DATA_FACTORIES.get(name) or FloatQParamsObserver.with_args(dtype=torch.quint4x2)
    a, b, both = factory(), factory(), factory()
    for k in range(n_a + n_b):
        x = _batch(seed + k, spread=float(k + 1))
        x[0, 0, 0] = float("nan")
        (a if k < n_a else b)(x)
        both(x)
    merged = a.merge_(b)
    assert merged is a
    for key, value in both.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key
    if both.has_data:
        _assert_same_qparams(merged.qparams(), both.qparams())


@pytest.mark.parametrize("name", ["moving", "moving_per_channel"])
def test_moving_average_merge_is_the_batch_weighted_mean(name):
    factory = DATA_FACTORIES[name]
    a, b, empty = factory(), factory(), factory()
    for k in range(3):
        a(_batch(k))
    b(_batch(10) * 5)
    expected_min = (3 * a.min_val + 1 * b.min_val) / 4
    expected_max = (3 * a.max_val + 1 * b.max_val) / 4
    copy_of_b = factory()
    copy_of_b.load_state_dict(b.state_dict())
    a.merge_(b)
    torch.testing.assert_close(a.min_val, expected_min)
    torch.testing.assert_close(a.max_val, expected_max)
    assert int(a.batches) == 4
    empty.merge_(copy_of_b)  # merging into an observer that saw nothing copies the other
    assert torch.equal(empty.min_val, b.min_val) and torch.equal(empty.max_val, b.max_val)
    before = a.min_val.clone()
    a.merge_(factory())  # and merging an empty one changes nothing
    assert torch.equal(a.min_val, before)


def test_merge_rejects_other_classes_and_configurations():
    with pytest.raises(TypeError, match="classes differ"):
        MinMaxObserver().merge_(MovingAverageMinMaxObserver())
    with pytest.raises(ValueError, match="configurations differ"):
        MinMaxObserver().merge_(MinMaxObserver(reduce_range=True))
    with pytest.raises(ValueError, match="configurations differ"):
        HistogramObserver(bins=8).merge_(HistogramObserver(bins=16))
    a, b = PerChannelMinMaxObserver(), PerChannelMinMaxObserver()
    a(torch.zeros(3, 2)), b(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="3 channels"):
        a.merge_(b)
    with pytest.raises(ValueError, match="configurations differ"):
        FixedQParamsObserver(0.1, 0).merge_(FixedQParamsObserver(0.2, 0))


def _laplace(n: int, scale: float, shift: float, seed: int) -> torch.Tensor:
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.5
    return (shift - scale * torch.sign(u) * torch.log1p(-2 * u.abs())).to(torch.float32)


@settings(max_examples=8)
@given(seed=seeds, scale_b=st.floats(0.2, 5.0), shift_b=st.floats(-3.0, 3.0),
       symmetric=st.booleans())
def test_histogram_merge_matches_one_observer_over_both(seed, scale_b, shift_b, symmetric):
    kwargs = dict(bins=512, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric) if symmetric else dict(bins=512)
    a_data, b_data = _laplace(20_000, 1.0, 0.0, seed), _laplace(10_000, scale_b, shift_b, seed + 1)
    a_data[:3] = float("nan")
    a, b, both = HistogramObserver(**kwargs), HistogramObserver(**kwargs), HistogramObserver(**kwargs)
    a(a_data), b(b_data), both(a_data), both(b_data)
    merged = a.merge_(b)
    n_finite = 30_000 - 3
    assert int(merged.histogram.sum()) == int(both.histogram.sum()) == n_finite  # counts are exact
    assert torch.equal(merged.min_val, both.min_val) and torch.equal(merged.max_val, both.max_val)
    assert int(merged.nonfinite_count) == 3 and int(merged.batches) == 2
    # Re-binning b's histogram onto the union range moves each of b's elements by at most one union bin
    # (b's bins are no wider than the union's), so the two histograms' cumulative counts differ by at most
    # the largest count of one of b's bins plus 1 (rounding). The searched range can therefore move by a few
    # bins where the error curve is flat around its minimum: the scale may differ by a few bin widths over
    # the number of levels, and the error it gives on the data must stay within 1% of the single observer's.
    width = float(both.max_val - both.min_val) / 512
    gap = (merged.histogram.cumsum(0) - both.histogram.cumsum(0)).abs().max()
    assert int(gap) <= int(b.histogram.max()) + 1
    qm, qs = merged.qparams(), both.qparams()
    assert abs(float(qm.scale) - float(qs.scale)) <= 4 * width / (qs.quant_max - qs.quant_min)
    data = torch.cat([a_data[3:], b_data])
    assert _mse(data, qm) <= 1.01 * _mse(data, qs)


@settings(max_examples=10)
@given(seed=seeds)
def test_histogram_merge_is_exact_when_the_ranges_agree(seed):
    a_data, b_data = _laplace(5000, 1.0, 0.0, seed), _laplace(5000, 0.5, 0.3, seed + 1)
    ends = torch.tensor([-20.0, 30.0])  # same min and max in both: nothing is re-binned
    a_data, b_data = torch.cat([a_data, ends]), torch.cat([b_data, ends])
    a, b, both = HistogramObserver(bins=256), HistogramObserver(bins=256), HistogramObserver(bins=256)
    a(a_data), b(b_data), both(a_data), both(b_data)
    a.merge_(b)
    assert torch.equal(a.histogram, both.histogram)
    _assert_same_qparams(a.qparams(), both.qparams())


# ----- histogram specifics -----------------------------------------------------------------------------------
@settings(max_examples=25)
@given(batches=st.lists(st.tuples(st.floats(-100, 100), st.floats(1e-3, 1e3), st.integers(0, 300),
                                  st.booleans()), min_size=1, max_size=6), seed=seeds)
def test_histogram_range_grows_without_losing_counts(batches, seed):
    obs = HistogramObserver(bins=97)
    g = torch.Generator().manual_seed(seed)
    seen = []
    for shift, spread, n, with_nan in batches:
        x = torch.randn(n, generator=g) * spread + shift
        if with_nan and n:
            x[0] = float("nan")
        obs(x)
        seen.append(x[torch.isfinite(x)])
    everything = torch.cat(seen)
    assert int(obs.histogram.sum()) == everything.numel()
    assert bool((obs.histogram >= 0).all())
    if everything.numel():
        assert float(obs.min_val) == float(everything.min()) and float(obs.max_val) == float(everything.max())


def test_rebin_splits_counts_proportionally():
    h = torch.tensor([4, 0, 2, 6])
    assert _histogram.rebin(h, 0.0, 4.0, 0.0, 8.0).tolist() == [4, 8, 0, 0]
    assert _histogram.rebin(h, 0.0, 4.0, -4.0, 4.0).tolist() == [0, 0, 4, 8]
    assert _histogram.rebin(h, 0.0, 4.0, 0.0, 4.0).tolist() == h.tolist()
    assert _histogram.rebin(torch.tensor([6, 0, 0, 0]), 1.0, 1.0, 0.0, 4.0).tolist() == [0, 6, 0, 0]  # point mass
    # 10 counts spread over [1, 2); new edges -1, 0.25, 1.5, 2.75, 4: half of them on each side of 1.5
    assert _histogram.rebin(torch.tensor([0, 10, 0, 0]), 0.0, 4.0, -1.0, 4.0).tolist() == [0, 5, 5, 0]
    assert _histogram.rebin(torch.tensor([0, 3, 0, 0]), 0.0, 4.0, -1.0, 4.0).sum() == 3  # integral, exact total
    with pytest.raises(ValueError, match="must contain"):
        _histogram.rebin(h, 0.0, 4.0, 1.0, 4.0)


def test_histogram_clips_a_few_huge_outliers():
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(500_000, generator=g), torch.randn(500_000, generator=g)]
    data[1][:3] = torch.tensor([30.0, -30.0, 25.0])  # squared clipping error < the noise they would cause
    hist, minmax = HistogramObserver(), MinMaxObserver()
    for x in data:
        hist(x), minmax(x)
    q_hist, q_minmax = hist.qparams(), minmax.qparams()
    assert float(q_hist.scale) < 0.5 * float(q_minmax.scale)
    x = torch.cat(data)
    assert _mse(x, q_hist) < _mse(x, q_minmax)


def test_histogram_keeps_the_full_range_without_outliers():
    x = torch.linspace(-1.0, 3.0, 10_001)
    hist, minmax = HistogramObserver(), MinMaxObserver()
    hist(x), minmax(x)
    assert float(hist.qparams().scale) >= 0.97 * float(minmax.qparams().scale)
    constant = HistogramObserver()
    constant(torch.full((10,), 2.5))
    _assert_same_qparams(constant.qparams(), _minmax_of(2.5))  # a point mass: nothing to search


def _minmax_of(value: float) -> QParams:
    obs = MinMaxObserver()
    obs(torch.tensor([value]))
    return obs.qparams()


def test_histogram_symmetric_and_positive_data():
    sym = HistogramObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    sym(_laplace(10_000, 1.0, 0.5, 0))
    assert int(sym.qparams().zero_point) == 0
    positive = HistogramObserver()
    positive(_laplace(10_000, 1.0, 0.0, 1).abs() + 2.0)  # all > 0: the range is widened down to 0
    qp = positive.qparams()
    assert int(qp.zero_point) == 0
    assert torch.equal(dequantize(quantize_int(torch.zeros(1), qp), qp), torch.zeros(1))


def test_histogram_search_is_near_the_exhaustive_optimum():
    obs = HistogramObserver()
    obs(torch.cat([_laplace(50_000, 1.0, 0.5, 3), _laplace(100, 8.0, 0.0, 4)]))
    lo, hi, bins = float(obs.min_val), float(obs.max_val), obs.bins
    zero = -lo / ((hi - lo) / bins)
    sums = _histogram._PrefixSums.of(obs.histogram)
    edges = torch.arange(bins + 1, dtype=torch.float64)
    exhaustive = _histogram._expected_error(sums, edges.clamp(max=zero), edges.clamp(min=zero), 255, outer=True).min()
    lo_u, hi_u = _histogram.search_clip_range(obs.histogram, zero, 255, symmetric=False)
    found = _histogram._expected_error(sums, torch.tensor([lo_u], dtype=torch.float64),
                                       torch.tensor([hi_u], dtype=torch.float64), 255)
    assert float(found[0]) <= 1.001 * float(exhaustive)


def _pairs_evaluated(monkeypatch) -> list[int]:
    sizes: list[int] = []
    real = _histogram._expected_error

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        sizes.append(out.size)
        return out

    monkeypatch.setattr(_histogram, "_expected_error", counted)
    return sizes


def test_histogram_search_evaluates_a_coarse_grid_and_one_window_not_every_pair(monkeypatch):
    """2048 bins: a 129 x 129 grid of bounds and the 33 x 33 window around its best pair, not the 2049**2 pairs of
    every edge; a ReLU's output has one low bound (0), so the grid is one row."""
    sizes = _pairs_evaluated(monkeypatch)
    signed = HistogramObserver(bins=2048)
    signed(_laplace(100_000, 1.0, 0.2, 0))
    signed.qparams()
    assert len(sizes) == 2 and sizes[0] <= 129 * 129 and sizes[1] <= 33 * 33
    sizes.clear()
    relu = HistogramObserver(bins=2048)
    relu(_laplace(100_000, 1.0, 0.2, 0).relu())
    relu.qparams()
    assert len(sizes) == 2 and sizes[0] <= 129 and sizes[1] <= 33


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=300), st.floats(-50.0, 350.0),
       st.lists(st.integers(0, 300), min_size=1, max_size=40, unique=True),
       st.lists(st.integers(0, 300), min_size=1, max_size=40, unique=True))
def test_histogram_best_pair_is_the_first_minimum_of_every_pair(counts, zero, lo_edges, hi_edges):
    """The search skips bounds that clipping at 0 makes equal; it still names the pair that the first minimum of
    the matrix of all candidate pairs names."""
    hist = torch.tensor(counts, dtype=torch.int64)
    sums = _histogram._PrefixSums.of(hist)
    lo_e, hi_e = np.array(sorted(lo_edges)), np.array(sorted(hi_edges))
    every = _histogram._expected_error(sums, np.minimum(lo_e, zero), np.maximum(hi_e, zero), 255, outer=True)
    flat = int(np.argmin(every))
    assert _histogram._best_pair(sums, lo_e, hi_e, zero, 255) == (flat // hi_e.size, flat % hi_e.size)


# ----- moving averages and the others ------------------------------------------------------------------------
def test_moving_average_first_batch_sets_then_moves_by_the_constant():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.25)
    obs(torch.tensor([-1.0, 2.0]))
    assert (float(obs.min_val), float(obs.max_val)) == (-1.0, 2.0)
    obs(torch.tensor([-5.0, 6.0, float("nan")]))
    assert (float(obs.min_val), float(obs.max_val)) == (-2.0, 3.0)
    obs(torch.full((3,), float("nan")))  # a batch without finite data moves nothing
    assert (float(obs.min_val), float(obs.max_val), int(obs.batches)) == (-2.0, 3.0, 2)


def test_negative_ch_axis_gives_a_non_negative_axis():
    neg, pos = PerChannelMinMaxObserver(ch_axis=-2), PerChannelMinMaxObserver(ch_axis=1)
    x = _batch(3)
    neg(x), pos(x)
    _assert_same_qparams(neg.qparams(), pos.qparams())
    assert neg.qparams().axis == 1 and neg.calculate_qparams()[0].shape == (3,)


def test_placeholder_and_fixed_qparams_observers():
    fp16 = PlaceholderObserver(dtype=torch.float16)
    fp16.where = "input of 'fc'"
    fp16(torch.randn(3))
    assert fp16.has_data and fp16.dtype == torch.float16
    with pytest.raises(ValueError, match=r"input of 'fc'.*no qparams"):
        fp16.calculate_qparams()
    dynamic = PlaceholderObserver(dtype=torch.quint8, is_dynamic=True)
    assert (dynamic.quant_min, dynamic.quant_max, dynamic.is_dynamic) == (0, 255, True)
    fixed = FixedQParamsObserver(scale=2.0 / 256, zero_point=128)
    fixed(torch.randn(10) * 100)
    scale, zp = fixed.calculate_qparams()
    assert fixed.has_data and scale.tolist() == [2.0 / 256] and zp.tolist() == [128]
    assert scale.dtype == torch.float32 and zp.dtype == torch.int64
    fixed.merge_(FixedQParamsObserver(scale=2.0 / 256, zero_point=128))
    assert fixed.qparams().scalar() == (2.0 / 256, 128)


@pytest.mark.parametrize("name", DATA_FACTORIES)
def test_reset_forgets_everything(name):
    obs = DATA_FACTORIES[name]()
    x = _batch(0)
    x[0, 0, 0] = float("nan")
    obs(x)
    assert obs.has_data
    obs.reset()
    assert not obs.has_data and int(obs.nonfinite_count) == 0 and int(obs.batches) == 0
    obs(_batch(1))
    fresh = DATA_FACTORIES[name]()
    fresh(_batch(1))
    _assert_same_qparams(obs.qparams(), fresh.qparams())


def test_repr_shows_the_configuration_and_where():
    obs = PerChannelMinMaxObserver(ch_axis=1)
    obs.where = "weight of 'conv'"
    text = repr(obs)
    assert "ch_axis=1" in text and "torch.per_channel_symmetric" in text and "weight of 'conv'" in text


def test_module_doctests():
    for module in (fxquant.observers, _histogram):
        assert doctest.testmod(module).failed == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", DATA_FACTORIES)
def test_observers_on_cuda_agree_with_cpu(name):
    cpu, cuda = DATA_FACTORIES[name](), DATA_FACTORIES[name]().cuda()
    for k in range(3):
        x = _batch(k)
        x[0, 0, 0] = float("nan")
        cpu(x), cuda(x.cuda())
    a, b = cpu.qparams(), cuda.qparams()
    assert torch.equal(a.scale, b.scale.cpu()) and torch.equal(a.zero_point, b.zero_point.cpu())
    assert int(cuda.nonfinite_count) == 3


# ----- torch.ao as the reference -----------------------------------------------------------------------------
def _ao():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.quantization.observer as ao_observer
    return ao_observer


GRIDS = [  # (dtype, qscheme, reduce_range); symmetric quint8 with reduce_range differs by design (module docs)
    (torch.quint8, torch.per_tensor_affine, False), (torch.quint8, torch.per_tensor_affine, True),
    (torch.qint8, torch.per_tensor_affine, False), (torch.qint8, torch.per_tensor_symmetric, False),
    (torch.qint8, torch.per_tensor_symmetric, True), (torch.quint8, torch.per_tensor_symmetric, False),
]
PER_CHANNEL = {torch.per_tensor_affine: torch.per_channel_affine,
               torch.per_tensor_symmetric: torch.per_channel_symmetric}
AO_PAIRS = {
    "MinMaxObserver": (MinMaxObserver, {}),
    "MovingAverageMinMaxObserver": (MovingAverageMinMaxObserver, {"averaging_constant": 0.2}),
    "PerChannelMinMaxObserver": (PerChannelMinMaxObserver, {"ch_axis": 1}),
    "MovingAveragePerChannelMinMaxObserver": (MovingAveragePerChannelMinMaxObserver,
                                              {"ch_axis": 2, "averaging_constant": 0.2}),
}


@settings(max_examples=6)
@given(seed=seeds)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", AO_PAIRS)
def test_same_qparams_as_torch_ao(name, grid, seed):
    dtype, qscheme, reduce_range = grid
    ours_cls, extra = AO_PAIRS[name]
    if "PerChannel" in name:
        qscheme = PER_CHANNEL[qscheme]
    kwargs = dict(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, **extra)
    ours = ours_cls(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = getattr(_ao(), name)(**kwargs)
        for k in range(3):
            x = _batch(seed + k, spread=float(k + 1))
            ours(x), reference(x)
        ref_scale, ref_zp = reference.calculate_qparams()
    scale, zp = ours.calculate_qparams()
    assert torch.equal(ours.min_val, reference.min_val) and torch.equal(ours.max_val, reference.max_val)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(zp, ref_zp.to(torch.int64))


def test_probe_builds_an_observer_once_per_factory_for_reading_settings() -> None:
    from fxquant.observers import probe

    built: list[int] = []

    class Counting(MinMaxObserver):
        def __init__(self, **kwargs):  # type: ignore[no-untyped-def]
            built.append(1)
            super().__init__(**kwargs)

    factory = Counting.with_args(dtype=torch.quint8)
    first = probe(factory)
    assert probe(factory) is first and first.dtype == torch.quint8 and len(built) == 1
    other = Counting.with_args(dtype=torch.qint8)   # an equal-looking but distinct factory is built on its own
    assert probe(other).dtype == torch.qint8 and len(built) == 2


# ----- large weights: the range is reduced a block of rows at a time --------------------------------------------
@pytest.fixture
def small_range_blocks(monkeypatch):
    """Blocks of a few rows: the blocked path on test-sized tensors, with many blocks and a ragged last one."""
    monkeypatch.setattr(fxquant.observers, "_RANGE_BLOCK_BYTES", 1 << 10)


@pytest.mark.usefixtures("small_range_blocks")
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=seeds, rows=st.integers(1, 700), cols=st.sampled_from([3, 5, 640, 2049]), poison=st.booleans())
@example(seed=0, rows=700, cols=3, poison=True)  # 85 rows per block, a ragged last one
@example(seed=1, rows=300, cols=5, poison=False)
def test_blocked_row_range_equals_two_plain_reductions(seed, rows, cols, poison):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 10
    if poison:  # non-finite values in some rows: the blocked reductions must see them as the plain ones do
        x[torch.randint(0, rows, (3,), generator=g), torch.randint(0, cols, (3,), generator=g)] = float("nan")
        x[0, 0] = float("inf")
    mn, mx = fxquant.observers._row_range(x, 1)
    assert torch.allclose(mn, x.amin(dim=1), equal_nan=True, rtol=0, atol=0)
    assert torch.allclose(mx, x.amax(dim=1), equal_nan=True, rtol=0, atol=0)
    fmn, fmx, bad = fxquant.observers._finite_aminmax(x, dim=1)
    finite = torch.isfinite(x)
    assert bad == int((~finite).sum())
    has = finite.any(dim=1)
    assert torch.equal(fmn[has], torch.where(finite, x, torch.inf).amin(dim=1)[has])
    assert torch.equal(fmx[has], torch.where(finite, x, -torch.inf).amax(dim=1)[has])


@pytest.mark.usefixtures("small_range_blocks")
def test_blocked_row_range_of_a_tensor_that_requires_grad():
    """A weight that requires grad, reduced with grad mode on, takes the blocked path too: its reductions write
    into preallocated rows (out=), which autograd refuses, so it reduces the weight detached."""
    w = nn.Parameter(torch.randn(300, 200))
    with torch.enable_grad():
        mn, mx, bad = fxquant.observers._finite_aminmax(w, dim=1)
    assert bad == 0 and not mn.requires_grad
    assert torch.equal(mn, w.detach().amin(dim=1)) and torch.equal(mx, w.detach().amax(dim=1))


@pytest.mark.usefixtures("small_range_blocks")
@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_blocked_row_range_ignores_the_default_device(device):
    """The per-row results live on the input's device, whatever torch.set_default_device says (a user who set
    another default device and converts a CPU model)."""
    x = torch.randn(300, 200, device="cpu")
    with torch.device(device):
        mn, mx = fxquant.observers._row_range(x, 1)
    assert mn.device == x.device and torch.equal(mn, x.amin(dim=1)) and torch.equal(mx, x.amax(dim=1))
