"""Calibrators: exact histograms (growth, merging, state), range choices on known distributions, qconfigs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxquant
from fxquant import _histogram
from fxquant.calibrators import (Calibrator, EntropyObserver, MSEObserver, PerChannelMSEObserver,
                                 PerChannelPercentileObserver, PercentileObserver, get_calibration_qconfig,
                                 get_calibration_qconfig_mapping)
from fxquant.observers import MinMaxObserver, NoDataError
from fxquant.qparams import fake_quantize

PER_TENSOR = {
    "entropy": EntropyObserver.with_args(bins=256),
    "entropy_sym": EntropyObserver.with_args(bins=256, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
    "percentile": PercentileObserver.with_args(percentile=99.0, bins=256),
    "percentile_sym": PercentileObserver.with_args(bins=128, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
    "mse": MSEObserver.with_args(bins=256),
    "mse_sym": MSEObserver.with_args(bins=256, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
}
PER_CHANNEL = {
    "pc_mse": PerChannelMSEObserver.with_args(ch_axis=1, bins=128),
    "pc_percentile": PerChannelPercentileObserver.with_args(ch_axis=-1, bins=64, percentile=99.0),
}
ALL = {**PER_TENSOR, **PER_CHANNEL}
STATE = ("histogram", "bin_exp", "first_bin", "min_val", "max_val", "zero_count", "nonfinite_count", "batches")


def _data(seed: int, shape: tuple[int, ...] = (4, 3, 50), spread: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * spread + float(torch.randn((), generator=g))


def _same_state(a: nn.Module, b: nn.Module) -> None:
    for name in STATE:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ---------------------------------------------------------------------------------------- exact histograms

@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**16), st.floats(1e-3, 1e3)), min_size=1, max_size=5),
       st.sampled_from(sorted(ALL)), st.data())
def test_merge_equals_one_observer_over_all_data(batches, name, data):
    """Any partition of the batches over observers, merged in any order, is the observer that saw everything."""
    xs = [_data(seed, spread=spread) for seed, spread in batches]
    whole = ALL[name]()
    for x in xs:
        whole(x)
    owners = data.draw(st.lists(st.integers(0, 2), min_size=len(xs), max_size=len(xs)))
    parts = [ALL[name]() for _ in range(3)]
    for x, owner in zip(xs, owners):
        parts[owner](x)
    order = data.draw(st.permutations(range(3)))
    merged = parts[order[0]]
    for i in order[1:]:
        merged.merge_(parts[i])
    _same_state(merged, whole)
    assert int(merged.histogram.sum()) == sum(x.numel() for x in xs)
    assert torch.equal(merged.qparams().scale, whole.qparams().scale)


def test_histogram_grows_without_losing_counts():
    obs = PercentileObserver(bins=64)
    small, wide = torch.linspace(0, 1, 1000), torch.linspace(-50, 200, 777)
    obs(small)
    assert obs.histogram.sum() == 1000
    obs(wide)
    assert obs.histogram.sum() == 1777
    # every count is in the bin that holds its value: recount all values on the final grid
    recount = _histogram.pow2_count(torch.cat([small, wide]).unsqueeze(0), obs.bin_exp, obs.first_bin, 64)
    assert torch.equal(recount, obs.histogram)
    width = 2.0 ** int(obs.bin_exp)
    assert int(obs.first_bin) * width <= -50 and (int(obs.first_bin) + 64) * width > 200


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**16), st.floats(1e-6, 1e6), st.floats(1.0, 1e4), st.sampled_from([16, 100, 256]))
def test_regrid_is_exact(seed, spread, growth, bins):
    x = _data(seed, (3, 200), spread)
    exp, first = _histogram.pow2_layout(x.amin(1), x.amax(1), bins)
    counts = _histogram.pow2_count(x, exp, first, bins)
    assert torch.equal(counts.sum(1), torch.full((3,), 200))
    lo, hi = x.amin(1) * growth, x.amax(1) * growth
    new_exp, new_first = _histogram.pow2_layout(torch.minimum(lo, x.amin(1)), torch.maximum(hi, x.amax(1)), bins, exp)
    moved = _histogram.pow2_regrid(counts, exp, first, new_exp, new_first)
    assert torch.equal(moved, _histogram.pow2_count(x, new_exp, new_first, bins))


def test_layout_uses_at_least_half_the_bins():
    for span in (1e-5, 0.3, 1.0, 7.0, 123.4, 1e6):
        x = torch.tensor([[-span / 3, span * 2 / 3]])
        exp, first = _histogram.pow2_layout(x.amin(1), x.amax(1), 512)
        used = span / 2.0 ** int(exp)
        assert 256 - 2 <= used <= 512


# ------------------------------------------------------------------------------------------ KL reference

def _kl_reference(h: np.ndarray, m: int) -> int:
    """TensorRT's loop, written plainly."""
    n = int(np.nonzero(h)[0][-1]) + 1
    h = h[:n].astype(np.float64)
    if n <= m:
        return n
    best = (math.inf, None)
    for i in range(m, n + 1):
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        q = np.zeros(i)
        edges = [math.ceil(c * i / m) for c in range(m + 1)]
        for c in range(m):
            seg = h[edges[c]:edges[c + 1]]
            nz = (seg > 0).sum()
            if nz:
                q[edges[c]:edges[c + 1]] = np.where(seg > 0, seg.sum() / nz, 0)
        pn, mask = p / p.sum(), p > 0
        if q.sum() == 0 or (q[mask] == 0).any():
            continue
        qn = q / q.sum()
        kl = float((pn[mask] * np.log(pn[mask] / qn[mask])).sum())
        if kl < best[0] - 1e-12:
            best = (kl, i)
    return best[1] if best[1] is not None else n


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=3, max_size=80), st.integers(2, 12))
def test_kl_search_matches_reference_loop(counts, levels):
    h = np.array(counts)
    if h.sum() == 0:
        return
    assert _histogram.kl_clip(torch.tensor(h), levels) == _kl_reference(h, levels)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=300), st.floats(1.0, 64.0))
def test_coarsen_keeps_counts_and_reaches_its_density(counts, min_mean):
    h = torch.tensor(counts)
    coarse, factor = _histogram.coarsen(h, min_mean)
    assert int(coarse.sum()) == int(h.sum()) and factor & (factor - 1) == 0
    for j in range(coarse.numel()):
        assert int(coarse[j]) == int(h[j * factor:(j + 1) * factor].sum())
    nonzero = torch.nonzero(coarse).flatten()
    span = int(nonzero[-1]) + 1 if nonzero.numel() else 0
    assert span <= 1 or int(h.sum()) >= min_mean * span


# --------------------------------------------------------------------------- ranges on known distributions

def _gaussian(n: int = 400_000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_percentile_of_a_gaussian():
    obs = PercentileObserver(percentile=99.0, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    obs(_gaussian())
    amax = float(obs.qparams().scale) * 127.5
    assert abs(amax - 2.576) < 0.03  # the 99th percentile of |N(0, 1)|


def test_percentile_cuts_outliers_and_keeps_the_bulk():
    x = torch.cat([torch.rand(100_000, generator=torch.Generator().manual_seed(1)), torch.tensor([1000.0] * 3)])
    obs = PercentileObserver()  # 99.99: 3 outliers in 100003 are cut
    obs(x)
    hi = float(obs.qparams().scale) * 255
    assert 0.99 <= hi <= 1.02


def test_entropy_on_relu_gaussian_keeps_the_bulk():
    obs = EntropyObserver()
    obs(_gaussian().relu())
    hi = float(obs.qparams().scale) * 255
    assert 3.0 < hi <= float(obs.max_val) + 1e-6
    plain = EntropyObserver(skip_zeros=False)  # the zero spike drives plain KL to its smallest cut-off
    plain(_gaussian().relu())
    assert float(plain.qparams().scale) * 255 < hi


def test_entropy_never_clips_below_its_levels():
    x = torch.cat([torch.rand(10_000, generator=torch.Generator().manual_seed(2)), torch.tensor([50.0])])
    obs = EntropyObserver()
    obs(x)
    assert float(obs.qparams().scale) * 255 >= 50.0 * 256 / 2048 - 1e-3


def _error(x: torch.Tensor, obs: nn.Module) -> float:
    return float(((fake_quantize(x, obs.qparams()) - x) ** 2).mean())


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from(["gauss", "laplace", "relu", "outlier"]),
       st.sampled_from([torch.per_tensor_affine, torch.per_tensor_symmetric]))
def test_mse_is_no_worse_than_minmax(seed, kind, qscheme):
    """On data it saw, the MSE range loses no more than min/max (scored at bin centres: 2% slack)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20_000, generator=g)
    if kind == "laplace":
        x = torch.sign(x) * torch.empty(20_000).exponential_(generator=g)
    elif kind == "relu":
        x = x.relu()
    elif kind == "outlier":
        x[:3] = 40.0
    dtype = torch.qint8 if qscheme == torch.per_tensor_symmetric else torch.quint8
    mse, minmax = MSEObserver(dtype=dtype, qscheme=qscheme), MinMaxObserver(dtype=dtype, qscheme=qscheme)
    mse(x)
    minmax(x)
    assert _error(x, mse) <= _error(x, minmax) * 1.02 + 1e-12


def test_mse_clips_a_gaussian_sensibly():
    x = _gaussian()
    obs = MSEObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    obs(x)
    amax = float(obs.qparams().scale) * 127.5
    assert 2.5 < amax < float(x.abs().max())


def test_per_channel_mse_clips_each_channel_on_its_own():
    w = torch.randn(4, 5_000, generator=torch.Generator().manual_seed(3)) * torch.tensor([[0.01], [1.0], [5.0], [100.0]])
    w[1, 0] = 300.0  # one far outlier: clipping it would cost more than the rounding it saves; it is kept
    obs = PerChannelMSEObserver()
    obs(w)
    amax = obs.qparams().scale * 127.5
    top = w.abs().amax(1)
    gauss = torch.tensor([True, False, True, True])
    ratio = amax[gauss] / torch.tensor([0.01, 5.0, 100.0])
    assert torch.all((ratio > 2.5) & (amax[gauss] < top[gauss]))  # Gaussian channels: clipped below their max
    assert amax[1] > 200.0
    for r in range(4):
        row = PerChannelMSEObserver()
        row(w[r:r + 1])
        assert torch.equal(row.qparams().scale, obs.qparams().scale[r:r + 1])  # rows are independent


def test_per_channel_percentile_per_row():
    w = torch.stack([torch.linspace(-1, 1, 10_001), torch.linspace(-5, 5, 10_001)])
    obs = PerChannelPercentileObserver(percentile=99.0)
    obs(w)
    amax = obs.qparams().scale * 127.5
    assert torch.allclose(amax, torch.tensor([0.99, 4.95]), rtol=0.02)
    assert obs.qparams().axis == 0


# ------------------------------------------------------------------------------- the observer protocol

@pytest.mark.parametrize("name", sorted(ALL))
def test_state_dict_round_trip_and_determinism(name):
    obs = ALL[name]()
    for seed in range(3):
        obs(_data(seed, spread=10.0 ** seed))
    fresh = ALL[name]()
    fresh.load_state_dict(obs.state_dict())
    _same_state(fresh, obs)
    a, b = obs.qparams(), fresh.qparams()
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point) and a.axis == b.axis
    again = ALL[name]()
    for seed in range(3):
        again(_data(seed, spread=10.0 ** seed))
    assert torch.equal(again.qparams().scale, a.scale)


@pytest.mark.parametrize("name", sorted(ALL))
def test_nan_inf_are_counted_and_ignored(name):
    x = _data(0)
    dirty = x.clone()
    dirty[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    clean = x.clone()
    clean[0, 0, :3] = clean[0, 0, 3]  # remove the three positions from the comparison's data instead
    obs = ALL[name]()
    obs(dirty)
    assert int(obs.nonfinite_count) == 3
    assert int(obs.histogram.sum()) == x.numel() - 3
    obs.qparams()


@pytest.mark.parametrize("name", sorted(ALL))
def test_no_data_and_bad_merges(name):
    obs = ALL[name]()
    with pytest.raises(NoDataError, match="calibrat"):
        obs.qparams()
    with pytest.raises(TypeError, match="classes differ"):
        obs.merge_(MinMaxObserver())


def test_merge_refuses_other_arguments_and_channel_counts():
    with pytest.raises(ValueError, match="configurations differ"):
        PercentileObserver(percentile=99.0).merge_(PercentileObserver(percentile=99.9))
    a, b = PerChannelMSEObserver(), PerChannelMSEObserver()
    a(torch.randn(4, 3))
    b(torch.randn(5, 3))
    with pytest.raises(ValueError, match="channels"):
        a.merge_(b)
    with pytest.raises(ValueError, match="one observer watches one tensor"):
        a(torch.randn(5, 3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=30.0)
    with pytest.raises(ValueError, match="bins"):
        MSEObserver(bins=2)
    with pytest.raises(ValueError, match="per-channel"):
        PerChannelMSEObserver(qscheme=torch.per_tensor_symmetric)


def test_constant_and_zero_tensors():
    for value in (0.0, 3.0, -2.0):
        for name in sorted(ALL):
            obs = ALL[name]()
            obs(torch.full((4, 3, 5), value))
            qp = obs.qparams()
            assert bool(torch.all(qp.scale > 0))


# ---------------------------------------------------------------------------------------------- qconfigs

@pytest.mark.parametrize("activation", [m.value for m in Calibrator])
def test_every_calibrator_quantizes_a_model(activation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    model.eval()
    data = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    weight = "mse" if activation in ("entropy", "mse") else "percentile" if activation == "percentile" else "minmax"
    mapping = get_calibration_qconfig_mapping("x86", activation, weight, per_channel=activation != "minmax")
    prepared = fxquant.prepare_fx(model, mapping, (data[0],), backend_config="x86")
    fxquant.calibrate(prepared, data, progress=False)
    quantized = fxquant.convert_fx(prepared)
    with torch.no_grad():
        assert fxquant.sqnr(model(data[0]), quantized(data[0])) > 25.0


def test_calibration_qconfig_grids_and_errors():
    qc = get_calibration_qconfig("qnnpack", activation="percentile", weight="mse", per_channel=False, percentile=99.9)
    act, w = qc.activation(), qc.weight()
    assert (type(act), act.percentile, type(w), w.qscheme) == (PercentileObserver, 99.9, MSEObserver,
                                                                torch.per_tensor_symmetric)
    assert (w.quant_min, w.quant_max) == (-127, 127)  # qnnpack's weight grid
    with pytest.raises(ValueError, match="unknown activation calibrator 'kl'"):
        get_calibration_qconfig(activation="kl")
    with pytest.raises(ValueError, match="weights are static"):
        get_calibration_qconfig(weight="moving_average")


def test_docs_calibration_page_code_runs():
    """The python blocks of docs/calibration.md, top to bottom in one namespace (their asserts are the checks)."""
    import os
    import re

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "calibration.md")
    with open(path) as f:
        codes = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(codes) >= 3
    namespace: dict = {}
    for i, code in enumerate(codes):
        exec(compile(code, f"calibration.md[block {i}]", "exec"), namespace)
    assert namespace["report"].shifts and namespace["rounding"].layers
