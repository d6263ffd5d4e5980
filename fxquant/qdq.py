"""Quantize / dequantize as graph operators on plain integer tensors: ``torch.ops.fxquant.*``.

The reference representation (:func:`fxquant.convert_to_reference_fx`) marks every quantized tensor with a
``quantize`` -> ``dequantize`` pair of these operators, and stores weights as plain int8 tensors followed by a
``dequantize``. They take and return ordinary tensors (``uint8`` / ``int8`` / ``int32`` integers, ``float32``
values): no quantized tensor type is involved, so ``torch.export``, ONNX exporters and any backend that
pattern-matches ``dequantize -> op -> quantize`` can read them.

=====================================================================  =========================================
operator                                                               computes
=====================================================================  =========================================
``quantize_per_tensor(x, scale, zero_point, quant_min, quant_max, dtype)``  ``clamp(round(x * (1/scale)) + zp, qmin, qmax)``
``dequantize_per_tensor(q, scale, zero_point)``                         ``(q - zp) * scale`` in float32
``quantize_per_channel(x, scales, zero_points, axis, quant_min, ...)``  the same with one scale per slice of ``axis``
``dequantize_per_channel(q, scales, zero_points, axis)``                the same
=====================================================================  =========================================

The arithmetic is :func:`fxquant.qparams.quantize_int` / :func:`~fxquant.qparams.dequantize` (float32, multiply
by the float32 reciprocal of the scale, round half to even), so a ``quantize`` node gives the same integers as
``torch.quantize_per_tensor(...).int_repr()`` and a q -> dq pair equals ``torch.fake_quantize_per_tensor_affine``
bit for bit.

Example:
    >>> import torch, fxquant.qdq
    >>> q = torch.ops.fxquant.quantize_per_tensor(torch.tensor([0.0, 0.5, 9.0]), 0.1, 3, 0, 255, torch.uint8)
    >>> q
    tensor([ 3,  8, 93], dtype=torch.uint8)
    >>> torch.ops.fxquant.dequantize_per_tensor(q, 0.1, 3)
    tensor([0.0000, 0.5000, 9.0000])
"""

from __future__ import annotations

import torch

from fxquant.qparams import QParams, dequantize, quantize_int

__all__ = ["QUANTIZE_OPS", "DEQUANTIZE_OPS", "quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel",
           "dequantize_per_channel", "to_qparams"]

_STORAGE = {torch.uint8: torch.quint8, torch.int8: torch.qint8, torch.int32: torch.qint32}


def to_qparams(scale: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype, quant_min: int, quant_max: int,
               axis: int | None) -> QParams:
    """The :class:`~fxquant.qparams.QParams` an operator call stands for (``dtype`` the plain storage dtype)."""
    scheme = torch.per_channel_affine if axis is not None else torch.per_tensor_affine
    return QParams(scale=scale.to(torch.float32), zero_point=zero_point.to(torch.int64), dtype=_STORAGE[dtype],
                   qscheme=scheme, quant_min=quant_min, quant_max=quant_max, axis=axis)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _STORAGE:
        raise ValueError(f"fxquant quantize: dtype must be torch.uint8, torch.int8 or torch.int32, got {dtype}")


@torch.library.custom_op("fxquant::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float) to integers of ``dtype`` on the grid ``scale``, ``zero_point``, clamped to the range."""
    _check_dtype(dtype)
    qp = to_qparams(torch.tensor(scale), torch.tensor(zero_point), dtype, quant_min, quant_max, None)
    return quantize_int(x, qp)


@quantize_per_tensor.register_fake
def _(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int,
      dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(x, dtype=dtype)


@torch.library.custom_op("fxquant::dequantize_per_tensor", mutates_args=())
def dequantize_per_tensor(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Integers back to float32: ``(q - zero_point) * scale``."""
    return (q.to(torch.float32) - zero_point) * torch.tensor(scale, dtype=torch.float32)


@dequantize_per_tensor.register_fake
def _(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.custom_op("fxquant::quantize_per_channel", mutates_args=())
def quantize_per_channel(x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int,
                         quant_min: int, quant_max: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-channel :func:`quantize_per_tensor`: slice ``i`` of ``axis`` uses ``scales[i]``, ``zero_points[i]``."""
    _check_dtype(dtype)
    return quantize_int(x, to_qparams(scales, zero_points, dtype, quant_min, quant_max, axis % x.dim()))


@quantize_per_channel.register_fake
def _(x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int, quant_min: int, quant_max: int,
      dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(x, dtype=dtype)


@torch.library.custom_op("fxquant::dequantize_per_channel", mutates_args=())
def dequantize_per_channel(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                           axis: int) -> torch.Tensor:
    """Per-channel :func:`dequantize_per_tensor`."""
    return dequantize(q, to_qparams(scales, zero_points, torch.int8, -128, 127, axis % q.dim()))


@dequantize_per_channel.register_fake
def _(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.empty_like(q, dtype=torch.float32)


#: the call_function targets of quantize / dequantize nodes in a reference graph
QUANTIZE_OPS = (torch.ops.fxquant.quantize_per_tensor.default, torch.ops.fxquant.quantize_per_channel.default)
DEQUANTIZE_OPS = (torch.ops.fxquant.dequantize_per_tensor.default, torch.ops.fxquant.dequantize_per_channel.default)
