"""Properties of the quantization arithmetic in :mod:`fxquant.qparams` (torch's own kernels as the reference)."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant.qparams as qparams_module
from fxquant.qparams import (DEFAULT_EPS, PER_CHANNEL_SCHEMES, SYMMETRIC_SCHEMES, QParams, dequantize, dtype_range,
                             fake_quantize, qparams_from_range, quantize, quantize_int, sqnr)

DTYPES = [torch.quint8, torch.qint8, torch.qint32]
PER_TENSOR = [torch.per_tensor_affine, torch.per_tensor_symmetric]
ALL_SCHEMES = PER_TENSOR + list(PER_CHANNEL_SCHEMES)
GRIDS = list(itertools.product(DTYPES, ALL_SCHEMES, [False, True]))
# qint32 arithmetic runs in float32 (as torch's kernels do): with |q| near 2**31 a float32 step is 256 quanta, so
# the half-a-step bound only holds for the 8-bit grids
GRIDS_8BIT = [g for g in GRIDS if g[0] != torch.qint32]

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


@pytest.fixture(autouse=True)
def _quiet_quantized_tensor_deprecation():
    """torch 2.14 warns on every quantized-tensor creation; the reference comparisons create many."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _range(a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(min(a, b)), torch.tensor(max(a, b))


def _per_tensor(qp: QParams, c: int) -> QParams:
    """Channel ``c`` of per-channel qparams as per-tensor qparams."""
    scheme = torch.per_tensor_symmetric if qp.qscheme in SYMMETRIC_SCHEMES else torch.per_tensor_affine
    return QParams(qp.scale[c], qp.zero_point[c], qp.dtype, scheme, qp.quant_min, qp.quant_max)


@settings(max_examples=60)
@given(a=finite, b=finite, grid=st.sampled_from(GRIDS_8BIT), seed=st.integers(0, 2**16))
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(a, b, grid, seed):
    dtype, qscheme, reduce_range = grid
    lo, hi = _range(a, b)
    qp = qparams_from_range(lo.reshape(1), hi.reshape(1), dtype=dtype, qscheme=qscheme, reduce_range=reduce_range) \
        if qscheme in PER_CHANNEL_SCHEMES else qparams_from_range(lo, hi, dtype=dtype, qscheme=qscheme,
                                                                 reduce_range=reduce_range)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # the range always includes 0
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([lo.reshape(1), hi.reshape(1), lo + (hi - lo) * torch.rand(500, generator=g)]).reshape(1, -1)
    err = (dequantize(quantize_int(x, qp), qp) - x).abs().max()
    # half a step, plus float32 rounding of x * (1 / scale) relative to the largest |x|
    assert err <= qp.scale.max() * 0.5 + 4e-7 * max(float(hi), float(-lo)) + 1e-30


@pytest.mark.parametrize("dtype,qscheme,reduce_range", GRIDS)
def test_zero_is_exactly_representable(dtype, qscheme, reduce_range):
    lo = torch.tensor([-3.0, 0.5, -1e-9, -7.25, 0.0, -2e3])
    hi = torch.tensor([5.0, 9.0, 1e-9, -0.5, 0.0, 1e-3])
    per_channel = qscheme in PER_CHANNEL_SCHEMES
    for c in range(lo.numel()):
        a, b = (lo, hi) if per_channel else (lo[c], hi[c])
        qp = qparams_from_range(a, b, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range)
        assert bool(((qp.zero_point >= qp.quant_min) & (qp.zero_point <= qp.quant_max)).all())
        zeros = torch.zeros(lo.numel(), 3) if per_channel else torch.zeros(3)
        back = dequantize(quantize_int(zeros, qp), qp)
        assert torch.equal(back, torch.zeros_like(back))
        if dtype != torch.qint32:
            assert torch.equal(quantize(zeros, qp).dequantize(), torch.zeros_like(zeros))
        if per_channel:
            break


@settings(max_examples=40)
@given(bounds=st.lists(st.tuples(finite, finite), min_size=1, max_size=6), grid=st.sampled_from(GRIDS),
       seed=st.integers(0, 2**16))
def test_per_channel_equals_per_tensor_slice_by_slice(bounds, grid, seed):
    dtype, qscheme, reduce_range = grid
    if qscheme not in PER_CHANNEL_SCHEMES:
        qscheme = {torch.per_tensor_affine: torch.per_channel_affine,
                   torch.per_tensor_symmetric: torch.per_channel_symmetric}[qscheme]
    lo = torch.tensor([min(a, b) for a, b in bounds])
    hi = torch.tensor([max(a, b) for a, b in bounds])
    qp = qparams_from_range(lo, hi, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, axis=1)
    assert qp.axis == 1 and qp.scale.shape == (len(bounds),)
    x = torch.randn(3, len(bounds), 4, generator=torch.Generator().manual_seed(seed)) * (hi - lo).reshape(1, -1, 1)
    q = quantize_int(x, qp)
    tensor_scheme = torch.per_tensor_symmetric if qscheme in SYMMETRIC_SCHEMES else torch.per_tensor_affine
    for c in range(len(bounds)):
        single = qparams_from_range(lo[c], hi[c], dtype=dtype, qscheme=tensor_scheme, reduce_range=reduce_range)
        assert torch.equal(single.scale, qp.scale[c]) and torch.equal(single.zero_point, qp.zero_point[c])
        assert torch.equal(quantize_int(x[:, c], single), q[:, c])


def _with_ties(x: torch.Tensor, scale: float, zero_point: int, g: torch.Generator) -> torch.Tensor:
    """Replace a third of ``x`` with exact ``.5`` ties of ``x / scale`` (scale is a power of two here)."""
    ties = (torch.randint(-300, 300, x.shape, generator=g).to(torch.float32) + 0.5) * scale
    return torch.where(torch.rand(x.shape, generator=g) < 0.33, ties, x)


@settings(max_examples=60)
@given(dtype=st.sampled_from(DTYPES), log2_scale=st.integers(-12, 4), zp_frac=st.floats(0, 1),
       random_scale=st.booleans(), seed=st.integers(0, 2**16))
def test_quantize_int_matches_torch_per_tensor_bit_for_bit(dtype, log2_scale, zp_frac, random_scale, seed):
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = dtype_range(dtype)
    scale = 2.0 ** log2_scale
    zero_point = int(qmin + zp_frac * (qmax - qmin))
    x = _with_ties(torch.randn(2000, generator=g) * 200 * scale, scale, zero_point, g)
    if random_scale:  # a scale that is not a power of two: ties of x * (1/scale) come from rounding
        scale = float(torch.rand((), generator=g)) * scale + 1e-6
    # saturation; beyond ~2**31 quanta torch's own 8-bit kernels overflow (int32 conversion), so stay below
    big = 1e12 if dtype == torch.qint32 else 1e9
    x = torch.cat([x, torch.tensor([0.0, big, -big, 3e6, -3e6, qmax, qmin]) * scale])
    qp = QParams(torch.tensor(scale), torch.tensor(zero_point), dtype, torch.per_tensor_affine, qmin, qmax)
    reference = torch.quantize_per_tensor(x, float(qp.scale), zero_point, dtype).int_repr()
    assert torch.equal(quantize_int(x, qp), reference)
    assert torch.equal(quantize(x, qp).int_repr(), reference)


@settings(max_examples=40)
@given(dtype=st.sampled_from(DTYPES), axis=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_quantize_int_matches_torch_per_channel_bit_for_bit(dtype, axis, seed):
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = dtype_range(dtype)
    shape = [3, 4, 5]
    channels = shape[axis]
    scale = 2.0 ** torch.randint(-8, 2, (channels,), generator=g).to(torch.float32)
    scale = torch.where(torch.rand(channels, generator=g) < 0.5, scale * torch.rand(channels, generator=g) + 1e-4,
                        scale)
    zp = torch.randint(qmin, qmax, (channels,), generator=g)
    bshape = [1, 1, 1]
    bshape[axis] = -1
    x = torch.randn(shape, generator=g) * 100 * scale.reshape(bshape)
    ties = (torch.randint(-200, 200, shape, generator=g) + 0.5) * scale.reshape(bshape)
    x = torch.where(torch.rand(shape, generator=g) < 0.3, ties, x)
    big = torch.where(torch.rand(shape, generator=g) < 0.5, 1e9, -1e9) * scale.reshape(bshape)
    x = torch.where(torch.rand(shape, generator=g) < 0.05, big, x)  # saturation (see the per-tensor test)
    qp = QParams(scale, zp, dtype, torch.per_channel_affine, qmin, qmax, axis)
    reference = torch.quantize_per_channel(x, scale.to(torch.float64), zp, axis, dtype).int_repr()
    assert torch.equal(quantize_int(x, qp), reference)
    assert torch.equal(quantize(x, qp).int_repr(), reference)


@settings(max_examples=50)
@given(a=finite, b=finite, grid=st.sampled_from(GRIDS), eps=st.sampled_from([DEFAULT_EPS, 1e-4, 2.0 ** -12]))
def test_scale_is_at_least_eps_and_symmetric_zero_points(a, b, grid, eps):
    dtype, qscheme, reduce_range = grid
    lo, hi = _range(a, b)
    if qscheme in PER_CHANNEL_SCHEMES:
        lo, hi = lo.reshape(1), hi.reshape(1)
    qp = qparams_from_range(lo, hi, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, eps=eps)
    assert qp.scale.dtype == torch.float32 and qp.zero_point.dtype == torch.int64
    assert bool((qp.scale >= torch.tensor(eps, dtype=torch.float32)).all())
    if qscheme in SYMMETRIC_SCHEMES:
        expected = 0 if dtype != torch.quint8 else (64 if reduce_range else 128)
        assert bool((qp.zero_point == expected).all())


def test_symmetric_qint8_of_a_constant_zero_tensor():
    qp = qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), dtype=torch.qint8,
                            qscheme=torch.per_tensor_symmetric)
    assert qp.scalar() == (pytest.approx(DEFAULT_EPS), 0)


@pytest.mark.parametrize("dtype,reduce_range,expected", [
    (torch.quint8, False, (0, 255)), (torch.quint8, True, (0, 127)),
    (torch.qint8, False, (-128, 127)), (torch.qint8, True, (-64, 63)),
    (torch.qint32, False, (-(2**31), 2**31 - 1)), (torch.qint32, True, (-(2**30), 2**30 - 1)),
    (torch.uint8, True, (0, 127)), (torch.int8, False, (-128, 127)),
])
def test_dtype_range(dtype, reduce_range, expected):
    assert dtype_range(dtype, reduce_range) == expected


def test_explicit_quant_range_is_used_and_checked():
    assert dtype_range(torch.quint8, quant_min=0, quant_max=15) == (0, 15)
    assert dtype_range(torch.qint8, True, quant_min=-127, quant_max=127) == (-127, 127)
    with pytest.raises(ValueError, match="given together"):
        dtype_range(torch.quint8, quant_min=0)
    with pytest.raises(ValueError, match="must satisfy"):
        dtype_range(torch.qint8, quant_min=0, quant_max=255)
    with pytest.raises(ValueError, match="must satisfy"):
        dtype_range(torch.quint8, quant_min=10, quant_max=10)


@pytest.mark.parametrize("lo,hi,message", [
    (float("nan"), 1.0, "non-finite"), (0.0, float("inf"), "non-finite"), (-float("inf"), 0.0, "non-finite"),
    (2.0, 1.0, "min_val must be <= max_val"),
])
def test_bad_ranges_are_errors(lo, hi, message):
    with pytest.raises(ValueError, match=message):
        qparams_from_range(torch.tensor(lo), torch.tensor(hi))


def test_bad_dtype_and_shapes_are_errors():
    with pytest.raises(ValueError, match="not a quantized dtype"):
        qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), dtype=torch.float32)
    with pytest.raises(ValueError, match="differ in shape"):
        qparams_from_range(torch.zeros(2), torch.ones(3), qscheme=torch.per_channel_affine)
    with pytest.raises(ValueError, match="NaN or Inf"):
        qparams_from_range(torch.tensor([0.0, float("nan")]), torch.ones(2), qscheme=torch.per_channel_affine)
    with pytest.raises(ValueError, match="per-tensor"):
        qparams_from_range(torch.zeros(2), torch.ones(2), qscheme=torch.per_channel_affine).scalar()
    with pytest.raises(ValueError, match="needs its QParams"):
        dequantize(torch.zeros(3, dtype=torch.uint8))


def _affine(dtype: torch.dtype, lo: float, hi: float, per_channel: bool) -> QParams:
    if per_channel:
        return qparams_from_range(torch.tensor([lo, lo / 2]), torch.tensor([hi, hi * 2]), dtype=dtype,
                                  qscheme=torch.per_channel_affine, axis=1)
    return qparams_from_range(torch.tensor(lo), torch.tensor(hi), dtype=dtype)


@settings(max_examples=30)
@given(lo=st.floats(-10, -0.1), hi=st.floats(0.1, 10), dtype=st.sampled_from([torch.quint8, torch.qint8]),
       per_channel=st.booleans(), seed=st.integers(0, 2**16))
def test_fake_quantize_straight_through_gradient(lo, hi, dtype, per_channel, seed):
    qp = _affine(dtype, lo, hi, per_channel)
    x = (torch.randn(6, 2, 50, generator=torch.Generator().manual_seed(seed)) * 2 * max(hi, -lo))
    x.requires_grad_(True)
    fake_quantize(x, qp).sum().backward()
    bshape = (1, -1, 1) if per_channel else ()
    unclamped = torch.round(x.detach() * torch.reciprocal(qp.scale.reshape(bshape))) + qp.zero_point.reshape(bshape)
    inside = ((unclamped >= qp.quant_min) & (unclamped <= qp.quant_max)).to(torch.float32)
    assert torch.equal(x.grad, inside)
    assert 0 < float(inside.mean()) < 1  # both regions are exercised


@settings(max_examples=30)
@given(lo=st.floats(-10, 0), hi=st.floats(0, 10), dtype=st.sampled_from([torch.quint8, torch.qint8]),
       per_channel=st.booleans(), seed=st.integers(0, 2**16))
def test_fake_quantize_equals_dequantize_of_quantize(lo, hi, dtype, per_channel, seed):
    qp = _affine(dtype, lo, hi, per_channel)
    x = torch.randn(6, 2, 50, generator=torch.Generator().manual_seed(seed)) * 1.5 * max(hi, -lo, 1e-3)
    expected = quantize(x, qp).dequantize()
    assert torch.equal(fake_quantize(x, qp), expected)
    assert torch.equal(dequantize(quantize_int(x, qp), qp), expected)


def test_sqnr():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert sqnr(x, x) == float("inf")
    assert sqnr(x, x + 0.1 * x) == pytest.approx(20.0, abs=1e-6)


@pytest.mark.parametrize("shape", [(300, 200), (64, 32, 3, 3), (3, 40000), (2048, 100)])
@pytest.mark.parametrize("scheme,dtype", [(torch.per_channel_symmetric, torch.qint8),
                                          (torch.per_channel_affine, torch.qint8),
                                          (torch.per_channel_affine, torch.quint8)])
def test_blocked_per_channel_quantize_equals_torchs_bit_for_bit(shape, scheme, dtype):
    """quantize() takes large per-channel tensors in cache-sized blocks of rows with vectorized ops; every code
    must equal torch.quantize_per_channel's: exact half steps (ties to even), values beyond the range (clamped)."""
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=gen) * torch.rand(shape[0], generator=gen).view(-1, *[1] * (len(shape) - 1))
    rows = w.view(shape[0], -1)
    assert w.numel() >= qparams_module._ROWS_MIN_NUMEL  # the blocked path runs
    qp = qparams_from_range(rows.amin(1) / 2, rows.amax(1) / 2, dtype=dtype, qscheme=scheme, axis=0)  # clips
    rows[:, :4] = torch.tensor([0.5, 1.5, -2.5, 7.5]) * qp.scale.unsqueeze(1)  # ties
    rows[0, 4:6] = torch.tensor([1e30, -1e30])
    got = quantize(w, qp)
    want = torch.quantize_per_channel(w, qp.scale.double(), qp.zero_point, 0, dtype)
    assert got.dtype == want.dtype and got.qscheme() == want.qscheme() and got.q_per_channel_axis() == 0
    assert torch.equal(got.int_repr(), want.int_repr())
    assert torch.equal(got.q_per_channel_scales(), want.q_per_channel_scales())
    assert torch.equal(got.q_per_channel_zero_points(), want.q_per_channel_zero_points())


def test_blocked_per_channel_quantize_keeps_a_narrower_grid():
    """fbgemm's depthwise weights use [-64, 63] of qint8: the blocked path clamps codes to the grid's range, as
    quantize_int does."""
    w = torch.randn(256, 1, 9, 9, generator=torch.Generator().manual_seed(1))
    rows = w.view(256, -1)
    qp = qparams_from_range(rows.amin(1) / 3, rows.amax(1) / 3, dtype=torch.qint8,
                            qscheme=torch.per_channel_symmetric, quant_min=-64, quant_max=63, axis=0)
    got = quantize(w, qp).int_repr()
    assert int(got.min()) == -64 and int(got.max()) == 63
    assert torch.equal(got, quantize_int(w, qp))
