"""ONNX export: QuantizeLinear / DequantizeLinear around float ops (the "QDQ" format ONNX Runtime runs in int8).

:func:`export_onnx` builds the reference representation (:func:`fxquant.convert_to_reference_fx`) of a
calibrated prepared model and exports it with ``torch.onnx.export(dynamo=True)``: ``torch.export`` keeps the
:mod:`fxquant.qdq` operators as single nodes, and a translation table given to the exporter writes each as
ONNX ``QuantizeLinear`` / ``DequantizeLinear`` (per-axis for per-channel weights, opset 18 by default).
Weights stay int8 initializers followed by a ``DequantizeLinear``, which is what ONNX Runtime's QDQ
transformer looks for: its graph optimizer fuses ``DQ -> Conv -> Q`` into ``QLinearConv``, ``DQ -> MatMul ->
Q`` into ``QLinearMatMul`` / ``MatMulIntegerToFloat``, and so on (``docs/export.md`` lists what it did to our
models).

Why this route and not the exporters' own support for ``torch.fake_quantize_per_*_affine``: that support
accepts only the ranges (0, 255), (-128, 127) and (0, 127) (qnnpack's weights are -127..127), and a fake
quantizer on a float weight leaves ONNX Runtime a float initializer to quantize; ours stores the integers.
Narrow ranges get a ``Clip`` after ``QuantizeLinear`` (ONNX saturates to the full dtype range).

One rewrite makes the file compute what the int8 kernels do where the float reading would not: average pooling
and ``mean`` on a quantized tensor are written on the integer grid
(:class:`fxquant.passes.reference.IntegerPoolingPass`), so that an exact half (the mean of 2x2 values) rounds to
even as fbgemm's integer mean does, not by float noise either way.

Example:
    >>> import torch, fxquant                                              # doctest: +SKIP
    >>> fxquant.export_onnx(prepared, (x,), "model.onnx")                  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Callable, Union

import torch
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.passes.reference import IntegerPoolingPass

__all__ = ["export_onnx", "onnx_translation_table", "DEFAULT_OPSET"]

#: QuantizeLinear with per-axis scales needs opset >= 13; 18 is what torch's exporter targets
DEFAULT_OPSET = 18

_FULL_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int32: (-(2**31), 2**31 - 1)}


def onnx_translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: :mod:`fxquant.qdq` -> ONNX ops."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    import fxquant.qdq  # noqa: F401  (registers torch.ops.fxquant)

    def clip(q: Any, quant_min: int, quant_max: int, dtype: Any) -> Any:
        lo, hi = {ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127)}.get(dtype, (quant_min, quant_max))
        if (quant_min, quant_max) == (lo, hi):
            return q
        return op.Clip(q, op.Cast(quant_min, to=dtype), op.Cast(quant_max, to=dtype))

    def quantize_per_tensor(x: Any, scale: float, zero_point: int, quant_min: int, quant_max: int,
                            dtype: Any) -> Any:
        q = op.QuantizeLinear(x, op.Constant(value_float=scale), op.Cast(zero_point, to=dtype))
        return clip(q, quant_min, quant_max, dtype)

    def dequantize_per_tensor(q: Any, scale: float, zero_point: int) -> Any:
        return op.DequantizeLinear(q, op.Constant(value_float=scale), op.CastLike(zero_point, q))

    def quantize_per_channel(x: Any, scales: Any, zero_points: Any, axis: int, quant_min: int, quant_max: int,
                             dtype: Any) -> Any:
        q = op.QuantizeLinear(x, scales, op.Cast(zero_points, to=dtype), axis=axis)
        return clip(q, quant_min, quant_max, dtype)

    def dequantize_per_channel(q: Any, scales: Any, zero_points: Any, axis: int) -> Any:
        return op.DequantizeLinear(q, scales, op.CastLike(zero_points, q), axis=axis)

    ops = torch.ops.fxquant
    return {ops.quantize_per_tensor.default: quantize_per_tensor,
            ops.dequantize_per_tensor.default: dequantize_per_tensor,
            ops.quantize_per_channel.default: quantize_per_channel,
            ops.dequantize_per_channel.default: dequantize_per_channel}


def _reference_of(model: nn.Module, fn: str) -> fx.GraphModule:
    from fxquant.api import STATE_KEY
    from fxquant.reference import convert_to_reference_fx

    state = model.meta.get(STATE_KEY) if isinstance(model, fx.GraphModule) else None
    if state is None:
        raise FxQuantError(f"{fn} expects a calibrated model from fxquant.prepare_fx (or prepare_qat_fx), or its "
                           f"fxquant.convert_to_reference_fx result; got {type(model).__name__}")
    if state.stage == "converted":
        raise FxQuantError(f"{fn}: this model is already converted to int8 kernels, which ONNX cannot express; "
                           "export the calibrated prepared model it came from (the same qparams: fxquant builds the "
                           "reference form from it), or fxquant.convert_to_reference_fx(prepared)")
    if state.stage == "reference":
        return copy.deepcopy(model)  # rewritten below: never the user's model
    return convert_to_reference_fx(model)


def export_onnx(model: nn.Module, example_inputs: Any, path: Union[str, os.PathLike], *,
                opset_version: int = DEFAULT_OPSET, dynamic_batch: bool = False,
                input_names: Union[list[str], None] = None, output_names: Union[list[str], None] = None) -> Any:
    """Write ``model`` as an ONNX QDQ model.

    Args:
        model: a calibrated prepared model (:func:`fxquant.prepare_fx` + calibration, or a trained
            :func:`fxquant.prepare_qat_fx` model) or its reference form; not modified.
        example_inputs: a tuple of positional inputs (traced by ``torch.export``).
        path: the ``.onnx`` file to write.
        opset_version: ONNX opset (>= 13: per-axis QuantizeLinear).
        dynamic_batch: make dimension 0 of every input dynamic.
        input_names, output_names: names of the graph inputs / outputs.

    Returns:
        The ``torch.onnx.ONNXProgram`` (``.model`` is the ONNX IR model).
    """
    if opset_version < 13:
        raise FxQuantError(f"export_onnx: per-channel QuantizeLinear / DequantizeLinear need opset >= 13, got "
                           f"opset_version={opset_version}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    ref = IntegerPoolingPass().run(_reference_of(model, "export_onnx").eval()).graph_module
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if isinstance(t, torch.Tensor) else None for t in example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's and onnxscript's own chatter
        program = torch.onnx.export(ref, tuple(example_inputs), dynamo=True, opset_version=opset_version,
                                    custom_translation_table=onnx_translation_table(), dynamic_shapes=dynamic_shapes,
                                    input_names=input_names, output_names=output_names, verbose=False)
    program.save(os.fspath(path))
    return program
