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

Where ONNX Runtime's uint8 x int8 kernels can saturate (x86-64 without VNNI: they sum pairs of products in int16,
:func:`fxquant.backends.cpu.onnx_runtime_u8s8_saturates`), the weights of convs / linears that read activations
with codes above 127 (full 8-bit grids; 7-bit ``reduce_range`` grids cannot saturate) are written as uint8 with
zero point ``128`` (``q + 128``: the same float weights), which ORT runs with its exact uint8 x uint8 kernels.

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
from typing import Any, Callable, Optional, Union

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


def _activation_codes_fit_7_bits(x: Any) -> bool:
    """Whether the activation ``x`` a conv / linear reads holds uint8 codes no larger than 127: it is (through max
    pooling, reshapes and the like) the dequantize of a ``quantize_per_tensor`` to uint8 with ``quant_max <= 127``
    (the export clips it there). Unknown producers count as wider."""
    from fxquant.qdq import QUANTIZE_OPS

    dq = torch.ops.fxquant.dequantize_per_tensor.default
    while isinstance(x, fx.Node) and x.op == "call_function" and x.target is not dq and x.args:
        x = x.args[0]
    if not (isinstance(x, fx.Node) and x.target is dq and isinstance(x.args[0], fx.Node)):
        return False
    q = x.args[0]
    return (q.target is QUANTIZE_OPS[0] and len(q.args) >= 6 and q.args[5] == torch.uint8
            and int(q.args[4]) <= 127)


def _replace_attr(ref: fx.GraphModule, user: fx.Node, node: fx.Node, value: torch.Tensor) -> None:
    """Point ``user`` at a new buffer holding ``value`` instead of the ``get_attr`` ``node``; the old buffer goes
    once nothing reads it (an unused buffer would still be exported as an initializer)."""
    old = str(node.target)
    name = old.replace(".", "_") + "_u8"
    ref.register_buffer(name, value)
    with ref.graph.inserting_before(node):
        user.replace_input_with(node, ref.graph.get_attr(name))
    if not node.users:
        ref.graph.erase_node(node)
    if "." not in old and not any(n.op == "get_attr" and n.target == old for n in ref.graph.nodes):
        delattr(ref, old)


def _unsigned_weights(ref: fx.GraphModule) -> int:
    """Rewrite in place the int8 weights of the convs / linears of ``ref`` whose activation can hold codes above
    127 as uint8 ``q + 128`` with zero points ``+ 128`` (the same float weights): ORT then fuses them into
    ``QLinearConv`` / ``QGemm`` with uint8 x uint8 kernels, exact where its uint8 x int8 ones sum pairs in int16.
    Only weights whose zero points are all equal (ORT's QLinearConv needs one zero point per filter tensor).
    Returns how many weights it rewrote."""
    from fxquant.passes.reference import quantized_weight_calls

    rewritten = 0
    transposed = {torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
                  torch.nn.functional.conv_transpose3d}
    for call in quantized_weight_calls(ref):
        w = call.args[1]
        if (call.target in transposed or _activation_codes_fit_7_bits(call.args[0]) or len(w.users) != 1
                or not isinstance(w.args[0], fx.Node) or w.args[0].op != "get_attr"):
            continue
        q = getattr(ref, str(w.args[0].target))
        zp = w.args[2]
        zps = getattr(ref, str(zp.target)) if isinstance(zp, fx.Node) else torch.tensor(zp)
        if q.dtype != torch.int8 or bool((zps != zps.flatten()[0]).any()):
            continue
        _replace_attr(ref, w, w.args[0], (q.to(torch.int16) + 128).to(torch.uint8))
        if isinstance(zp, fx.Node):
            _replace_attr(ref, w, zp, zps.to(torch.int64) + 128)
        else:
            w.update_arg(2, int(zp) + 128)
        rewritten += 1
    if rewritten:
        ref.recompile()
    return rewritten


def export_onnx(model: nn.Module, example_inputs: Any, path: Union[str, os.PathLike], *,
                opset_version: int = DEFAULT_OPSET, dynamic_batch: bool = False,
                input_names: Union[list[str], None] = None, output_names: Union[list[str], None] = None,
                unsigned_weights: Optional[bool] = None) -> Any:
    """Write ``model`` as an ONNX QDQ model.

    Args:
        model: a calibrated prepared model (:func:`fxquant.prepare_fx` + calibration, or a trained
            :func:`fxquant.prepare_qat_fx` model) or its reference form; not modified.
        example_inputs: a tuple of positional inputs (traced by ``torch.export``).
        path: the ``.onnx`` file to write.
        opset_version: ONNX opset (>= 13: per-axis QuantizeLinear).
        dynamic_batch: make dimension 0 of every input dynamic.
        input_names, output_names: names of the graph inputs / outputs.
        unsigned_weights: write the weights of convs / linears that read full 8-bit activations as uint8 with
            zero point 128 (ORT's exact uint8 x uint8 kernels) instead of int8. ``None``: where ORT's uint8 x int8
            kernels can saturate on this CPU (:func:`fxquant.backends.cpu.onnx_runtime_u8s8_saturates`: x86-64
            without VNNI); the file is then meant for such CPUs (on VNNI CPUs ORT runs it exactly, a little slower).

    Returns:
        The ``torch.onnx.ONNXProgram`` (``.model`` is the ONNX IR model).
    """
    if opset_version < 13:
        raise FxQuantError(f"export_onnx: per-channel QuantizeLinear / DequantizeLinear need opset >= 13, got "
                           f"opset_version={opset_version}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    ref = IntegerPoolingPass().run(_reference_of(model, "export_onnx").eval()).graph_module
    if unsigned_weights is None:
        from fxquant.backends.cpu import onnx_runtime_u8s8_saturates

        unsigned_weights = onnx_runtime_u8s8_saturates()
    if unsigned_weights:
        _unsigned_weights(ref)
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
