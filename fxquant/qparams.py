"""Quantization arithmetic: ranges -> (scale, zero_point), quantize, dequantize, fake-quantize.

Everything here is plain tensor math on top of ``torch`` (no ``torch.ao``). The affine mapping is

    q = clamp(round(x / scale) + zero_point, quant_min, quant_max)
    x' = (q - zero_point) * scale

with round-half-to-even and ``x * (1 / scale)`` in float32, which is what ``torch.quantize_per_tensor`` / ``torch.quantize_per_channel`` do,
so :func:`quantize_int` agrees with them bit for bit.

Example:
    >>> import torch
    >>> from fxquant.qparams import qparams_from_range
    >>> qp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), dtype=torch.quint8)
    >>> float(qp.scale), int(qp.zero_point)
    (0.01568627543747425, 64)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

__all__ = [
    "QParams",
    "QUANTIZED_DTYPES",
    "PER_CHANNEL_SCHEMES",
    "SYMMETRIC_SCHEMES",
    "dtype_range",
    "qparams_from_range",
    "quantize",
    "quantize_int",
    "dequantize",
    "fake_quantize",
    "sqnr",
]

#: quantized dtype -> (storage dtype of its integer representation, full quant_min, full quant_max)
QUANTIZED_DTYPES: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.quint8: (torch.uint8, 0, 255),
    torch.qint8: (torch.int8, -128, 127),
    torch.qint32: (torch.int32, -(2**31), 2**31 - 1),
    torch.uint8: (torch.uint8, 0, 255),
    torch.int8: (torch.int8, -128, 127),
    torch.int32: (torch.int32, -(2**31), 2**31 - 1),
}
_PLAIN_TO_QUANTIZED = {torch.uint8: torch.quint8, torch.int8: torch.qint8, torch.int32: torch.qint32}

PER_CHANNEL_SCHEMES = (torch.per_channel_affine, torch.per_channel_symmetric)
SYMMETRIC_SCHEMES = (torch.per_tensor_symmetric, torch.per_channel_symmetric)

#: smallest scale handed out unless the caller asks for another one (float32 machine epsilon)
DEFAULT_EPS = float(torch.finfo(torch.float32).eps)


def dtype_range(dtype: torch.dtype, reduce_range: bool = False,
                quant_min: Optional[int] = None, quant_max: Optional[int] = None) -> tuple[int, int]:
    """The integer range ``(quant_min, quant_max)`` used for ``dtype``.

    Args:
        dtype: ``torch.quint8``, ``torch.qint8``, ``torch.qint32`` (or their plain counterparts).
        reduce_range: drop one bit (7-bit activations, as fbgemm needs on CPUs without VNNI).
        quant_min, quant_max: explicit bounds; they must lie inside the dtype's range.

    Returns:
        The inclusive integer bounds.
    """
    if dtype not in QUANTIZED_DTYPES:
        raise ValueError(f"dtype {dtype} is not a quantized dtype; use one of torch.quint8, torch.qint8, torch.qint32")
    _, lo, hi = QUANTIZED_DTYPES[dtype]
    if quant_min is not None or quant_max is not None:
        if quant_min is None or quant_max is None:
            raise ValueError("quant_min and quant_max must be given together")
        if not (lo <= quant_min < quant_max <= hi):
            raise ValueError(f"quant_min/quant_max ({quant_min}, {quant_max}) must satisfy "
                             f"{lo} <= quant_min < quant_max <= {hi} for {dtype}")
        return quant_min, quant_max
    if reduce_range:
        if lo == 0:
            return 0, hi // 2
        return lo // 2, hi // 2
    return lo, hi


@dataclasses.dataclass(frozen=True)
class QParams:
    """The quantization parameters of one tensor.

    Attributes:
        scale: float32 tensor, shape ``[]`` (per tensor) or ``[C]`` (per channel).
        zero_point: int64 tensor of the same shape.
        dtype: the quantized dtype (``torch.quint8``, ``torch.qint8``, ``torch.qint32``).
        qscheme: a ``torch.qscheme`` (``torch.per_tensor_affine`` ...).
        quant_min, quant_max: the integer range actually used.
        axis: the channel axis for per-channel schemes, else ``None``.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    dtype: torch.dtype
    qscheme: torch.qscheme = torch.per_tensor_affine
    quant_min: int = 0
    quant_max: int = 255
    axis: Optional[int] = None

    @property
    def is_per_channel(self) -> bool:
        return self.qscheme in PER_CHANNEL_SCHEMES

    def scalar(self) -> tuple[float, int]:
        """``(scale, zero_point)`` as Python numbers (per-tensor only)."""
        if self.is_per_channel:
            raise ValueError("scalar() is only defined for per-tensor qparams")
        return float(self.scale), int(self.zero_point)


def qparams_from_range(min_val: torch.Tensor, max_val: torch.Tensor, *, dtype: torch.dtype = torch.quint8,
                       qscheme: torch.qscheme = torch.per_tensor_affine, reduce_range: bool = False,
                       quant_min: Optional[int] = None, quant_max: Optional[int] = None,
                       eps: float = DEFAULT_EPS, axis: Optional[int] = None) -> QParams:
    """Scale and zero point that cover ``[min_val, max_val]`` (widened to include 0.0).

    0.0 is always exactly representable: the zero point is an integer inside the range. For symmetric
    schemes the zero point is 0 for signed dtypes and the middle of the range for unsigned ones.

    Args:
        min_val, max_val: observed bounds, scalars (per tensor) or 1-d tensors (per channel).
        dtype, qscheme, reduce_range, quant_min, quant_max: the integer grid (see :func:`dtype_range`).
        eps: the smallest scale returned (a constant tensor would otherwise give scale 0).
        axis: the channel axis, recorded for per-channel schemes.

    Returns:
        :class:`QParams`.
    """
    qmin, qmax = dtype_range(dtype, reduce_range, quant_min, quant_max)
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val {tuple(min_val.shape)} and max_val {tuple(max_val.shape)} differ in shape")
    if not bool(torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("cannot compute qparams from a non-finite range (NaN or Inf seen); check the data")
    if bool((min_val > max_val).any()):
        raise ValueError(f"min_val must be <= max_val, got {min_val.tolist()} > {max_val.tolist()}")
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    eps_t = torch.tensor(eps, dtype=torch.float32)
    if qscheme in SYMMETRIC_SCHEMES:
        max_abs = torch.maximum(-min_neg, max_pos)
        scale = torch.maximum(max_abs / ((qmax - qmin) / 2.0), eps_t)
        mid = 0 if qmin < 0 else (qmin + qmax + 1) // 2
        zero_point = torch.full_like(scale, mid, dtype=torch.int64)
    else:
        scale = torch.maximum((max_pos - min_neg) / float(qmax - qmin), eps_t)
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax).to(torch.int64)
    per_channel = qscheme in PER_CHANNEL_SCHEMES
    return QParams(scale=scale, zero_point=zero_point, dtype=dtype, qscheme=qscheme, quant_min=qmin,
                   quant_max=qmax, axis=(0 if axis is None else axis) if per_channel else None)


def _broadcast(t: torch.Tensor, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def quantize_int(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize ``x`` to a plain integer tensor (uint8/int8/int32), no quantized tensor type involved.

    Agrees bit for bit with ``torch.quantize_per_tensor(...).int_repr()`` (and per channel).
    """
    storage, _, _ = QUANTIZED_DTYPES[qp.dtype]
    scale = _broadcast(qp.scale.to(torch.float32), x, qp.axis)
    zp = _broadcast(qp.zero_point, x, qp.axis)
    # torch's kernels multiply by the float32 reciprocal of the scale (not divide): do the same, bit for bit
    q = torch.round(x.to(torch.float32) * torch.reciprocal(scale)) + zp
    # clamp in float (|q| may exceed int64), then again in int64: float32(2**31 - 1) rounds up to 2**31, which
    # would wrap around in int32 instead of saturating as torch does for qint32
    q = torch.clamp(q, qp.quant_min, qp.quant_max).to(torch.int64)
    return torch.clamp(q, qp.quant_min, qp.quant_max).to(storage)


#: per-channel tensors from this many elements on are quantized by :func:`_quantize_rows` (below it, one torch
#: call costs less than the loop's per-block calls)
_ROWS_MIN_NUMEL = 1 << 14
#: the float32 block :func:`_quantize_rows` works in: small enough to stay in cache, large enough that the
#: per-call cost of its five torch ops is small against their work
_ROWS_BLOCK_BYTES = 1 << 19


def _quantize_rows(x: torch.Tensor, qp: QParams, qdtype: torch.dtype) -> torch.Tensor:
    """Per-channel quantization along axis 0, in blocks of rows: multiply by the float32 reciprocal of the scale,
    round half to even, add the zero point, clamp to ``[quant_min, quant_max]``, as torch's kernel computes each
    value (bit for bit, tests/test_qparams.py), but with vectorized torch ops on a block that stays in cache;
    ``torch.quantize_per_channel`` works value by value, a large share of converting big linear layers."""
    storage = QUANTIZED_DTYPES[qdtype][0]
    rows = x.reshape(x.shape[0], -1)
    inv = torch.reciprocal(qp.scale.to(torch.float32)).unsqueeze(1)
    zero_point = qp.zero_point.to(torch.int64)
    zp = zero_point.to(torch.float32).unsqueeze(1) if bool(zero_point.any()) else None  # symmetric: no add
    # the quantized tensor first, its integers written through a plain view of its memory: building it from an
    # integer tensor (torch._make_per_channel_quantized_tensor) copies every byte into new memory once more
    q = torch._empty_per_channel_affine_quantized(tuple(x.shape), scales=qp.scale.to(torch.float64),
                                                  zero_points=zero_point, axis=0, dtype=qdtype, device=x.device)
    out = torch.empty(0, dtype=storage, device=x.device).set_(q.untyped_storage(), 0, rows.shape, (rows.shape[1], 1))
    step = max(1, _ROWS_BLOCK_BYTES // (4 * rows.shape[1]))
    block = torch.empty(min(step, rows.shape[0]), rows.shape[1], device=x.device)
    for i in range(0, rows.shape[0], step):
        j = min(i + step, rows.shape[0])
        b = block[: j - i]
        torch.mul(rows[i:j], inv[i:j], out=b)
        b.round_()
        if zp is not None:
            b.add_(zp[i:j])
        out[i:j].copy_(b.clamp_(qp.quant_min, qp.quant_max))
    return q


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize ``x`` to a ``torch`` quantized tensor (the representation fbgemm/qnnpack kernels take)."""
    qdtype = _PLAIN_TO_QUANTIZED.get(qp.dtype, qp.dtype)
    _, lo, hi = QUANTIZED_DTYPES[qdtype]
    if (qp.is_per_channel and qp.axis == 0 and qdtype in (torch.qint8, torch.quint8) and x.dtype == torch.float32
            and x.device.type == "cpu" and x.is_contiguous() and x.numel() >= _ROWS_MIN_NUMEL and x.dim() > 1):
        return _quantize_rows(x.detach(), qp, qdtype)
    if (qp.quant_min, qp.quant_max) != (lo, hi):  # a narrower grid than the dtype's: clamp to it first
        scale = _broadcast(qp.scale.to(torch.float32), x, qp.axis)
        zp = _broadcast(qp.zero_point, x, qp.axis)
        x = torch.minimum(torch.maximum(x, (qp.quant_min - zp) * scale), (qp.quant_max - zp) * scale)
    if qp.is_per_channel:
        return torch.quantize_per_channel(x, qp.scale.to(torch.float64), qp.zero_point, qp.axis, qdtype)
    return torch.quantize_per_tensor(x, float(qp.scale), int(qp.zero_point), qdtype)


def dequantize(q: torch.Tensor, qp: Optional[QParams] = None) -> torch.Tensor:
    """Back to float32: a quantized tensor on its own, or a plain integer tensor with its ``qp``."""
    if q.is_quantized:
        return q.dequantize()
    if qp is None:
        raise ValueError("dequantize of a plain integer tensor needs its QParams")
    scale = _broadcast(qp.scale.to(torch.float32), q, qp.axis)
    zp = _broadcast(qp.zero_point, q, qp.axis)
    return (q.to(torch.float32) - zp) * scale


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize then dequantize in float, differentiable by the straight-through estimator.

    The gradient is 1 where ``round(x / scale) + zero_point`` falls inside ``[quant_min, quant_max]`` and 0
    outside (the clamped region), as in QAT literature. Uses torch's native fake-quant kernels.
    """
    if qp.is_per_channel:
        return torch.fake_quantize_per_channel_affine(
            x, qp.scale.to(torch.float32), qp.zero_point.to(torch.int32), qp.axis, qp.quant_min, qp.quant_max)
    return torch.fake_quantize_per_tensor_affine(
        x, qp.scale.reshape(()).to(torch.float32), qp.zero_point.reshape(()).to(torch.int32),
        qp.quant_min, qp.quant_max)


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - approx|^2)``."""
    ref = reference.detach().to(torch.float64)
    err = ref - approx.detach().to(torch.float64)
    noise = float((err * err).sum())
    signal = float((ref * ref).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()
