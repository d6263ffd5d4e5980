"""Reference passes: an observed graph -> its reference representation, and that form decomposed.

``ReferencePass`` contract:
    * input: a calibrated observed GraphModule (after ``freeze_qat`` for a QAT model);
    * output: the same float graph where every observer became a ``quantize`` -> ``dequantize`` pair of
      :mod:`fxquant.qdq` operators with its qparams (plain integer tensors in between), and every quantized
      conv / linear / transposed conv (``+ ReLU``) a functional call on ``dequantize(weight_int)``, its weight
      stored as a plain int8 buffer (``<module>_weight_int``, per-channel scales and zero points beside it);
    * a node written in its readers' output grid (observe's grid groups: cats, read directly or through pooling) gets a
      ``quantize`` -> ``dequantize`` with that grid after it, as the int8 producer writes there (the cat's own pair
      then changes nothing; exporters see each producer followed by its quantize);
    * shares-input ops that leave their input's grid (``OpEntry.leaves_grid``: average pooling, mean, clamps,
      interpolation) get a ``quantize`` -> ``dequantize`` with their input's qparams on their output, as the
      int8 kernel rounds to that grid (QAT simulates the same with ``SharedFakeQuantize``);
    * weights are quantized with ``NodeRecord.weight_qparams`` where the freeze pass or AdaRound set them, else
      with a fresh weight observer of the node's qconfig (as lowering does);
    * the model computes exactly the fake-quant simulation: the prepared model with each observer applying
      ``fake_quantize`` with its qparams and each weight fake-quantized (bit for bit: same float32 math);
    * dynamic / weight-only nodes stay float modules (their activations are quantized at run time);
    * observers that saw nothing raise :class:`~fxquant.errors.ConvertError` listing them all.

``IntegerPoolingPass`` contract (for exporters; :func:`fxquant.export_onnx` runs it): every span
``dequantize(q, s, zp) -> ops -> quantize(s, zp)`` whose ops are single-user, commute with a positive scale
(average / adaptive average pooling, mean, ReLU, max pooling, reshapes) and hold at least one average becomes
``dequantize(q, 1, zp) -> ops -> quantize(1, zp)``, its ``dequantize(s, zp)`` users unchanged: the same integers as
the int8 kernels' integer mean, exact halves rounded to even (the float reading lands a rounding error either side
of them); idempotent.

``DecomposeQDQPass`` contract: every :mod:`fxquant.qdq` call becomes the plain aten ops it stands for
(``mul`` by the float32 reciprocal of the scale, ``round``, ``add``, ``clamp``, ``to(uint8)``; ``to(float32)``,
``sub``, ``mul``), bit for bit the same values; idempotent.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.backends import ops
from fxquant.backends.config import Observation
from fxquant.errors import ConvertError
from fxquant.fused import float_type, materialize_folds
from fxquant.passes.base import PassResult, recompile
from fxquant.passes.context import QuantContext, modules_of, record
from fxquant.passes.observe import (grid_takers, is_observer_node, layer_weight_qparams, observer_qparams,
                                    reads_only_grid_takers)
from fxquant.qdq import DEQUANTIZE_OPS, QUANTIZE_OPS
from fxquant.qparams import QParams, quantize_int

__all__ = ["ReferencePass", "IntegerPoolingPass", "DecomposeQDQPass", "quantized_weight_calls"]

_Q = torch.ops.fxquant
_STORAGE = {torch.quint8: torch.uint8, torch.qint8: torch.int8, torch.qint32: torch.int32}
_CONVS: dict[type, Callable[..., torch.Tensor]] = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_TRANSPOSED: dict[type, Callable[..., torch.Tensor]] = {nn.ConvTranspose1d: F.conv_transpose1d,
                                                       nn.ConvTranspose2d: F.conv_transpose2d,
                                                       nn.ConvTranspose3d: F.conv_transpose3d}


def _attr(gm: fx.GraphModule, base: str, value: torch.Tensor) -> str:
    """Register ``value`` as a buffer of the root module under a fresh name derived from ``base``."""
    name, i = base.replace(".", "_"), 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}".replace(".", "_"), i + 1
    gm.register_buffer(name, value)
    return name


def _qdq(gm: fx.GraphModule, x: fx.Node, qp: QParams, base: str) -> fx.Node:
    """Insert ``quantize(x)`` -> ``dequantize`` with ``qp`` after ``x``; returns the dequantize node."""
    graph = gm.graph
    dtype = _STORAGE.get(qp.dtype, qp.dtype)
    if qp.is_per_channel:
        scale = graph.get_attr(_attr(gm, f"{base}_scale", qp.scale.detach().to(torch.float32).clone()))
        zp = graph.get_attr(_attr(gm, f"{base}_zero_point", qp.zero_point.detach().to(torch.int64).clone()))
        q = graph.call_function(_Q.quantize_per_channel.default,
                                (x, scale, zp, qp.axis, qp.quant_min, qp.quant_max, dtype))
        dq = graph.call_function(_Q.dequantize_per_channel.default, (q, scale, zp, qp.axis))
    else:
        s, z = qp.scalar()
        q = graph.call_function(_Q.quantize_per_tensor.default, (x, s, z, qp.quant_min, qp.quant_max, dtype))
        dq = graph.call_function(_Q.dequantize_per_tensor.default, (q, s, z))
    record(q).quantized_output = True
    record(dq).quantized_inputs = True
    record(dq).is_tensor = True
    return dq


@dataclasses.dataclass(frozen=True)
class ReferencePass:
    """Observers -> quantize/dequantize pairs, quantized weights stored as int8 (see module docstring)."""

    name: str = "reference"
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: QuantContext) -> PassResult:
        modules = modules_of(gm)
        qparams = observer_qparams(gm, modules, "convert_to_reference_fx")
        takers = grid_takers(gm.graph)
        for node in list(gm.graph.nodes):  # written in their readers' grid (cats' inputs): that grid after them
            rec = record(node)
            if (rec.quantizable and rec.entry.observation is Observation.OWN and rec.observer in qparams
                    and not any(is_observer_node(u, modules) for u in node.users)
                    and reads_only_grid_takers(node, takers) and not qparams[rec.observer].is_per_channel):
                with gm.graph.inserting_before(node.next):
                    dq = _qdq(gm, node, qparams[rec.observer], f"{node.name}_in_grid")
                node.replace_all_uses_with(dq, delete_user_cb=lambda u: u is not dq.args[0])
        for node in list(gm.graph.nodes):
            rec = record(node)
            if is_observer_node(node, modules):
                with gm.graph.inserting_before(node.next):
                    dq = _qdq(gm, node.args[0], qparams[str(node.target)], str(node.target))
                node.replace_all_uses_with(dq)
                gm.graph.erase_node(node)
            elif rec.quantizable and not rec.entry.is_dynamic:
                if rec.entry.weight is not None and node.op == "call_module":
                    self._weighted(gm, node, modules)
                elif (rec.entry.observation is Observation.SHARES_INPUT and rec.entry.leaves_grid
                      and rec.observer in qparams and not any(is_observer_node(u, modules) for u in node.users)):
                    with gm.graph.inserting_before(node.next):
                        dq = _qdq(gm, node, qparams[rec.observer], f"{node.name}_requantize")
                    node.replace_all_uses_with(dq, delete_user_cb=lambda u: u is not dq.args[0])
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        materialize_folds(gm)  # convs it keeps float hold their folded weights, as convert_fx's do
        recompile(gm)
        return PassResult(gm, True)

    @staticmethod
    def _weighted(gm: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module]) -> None:
        module = modules[str(node.target)]
        op = getattr(module, "op", module)
        relu = op is not module
        kind = float_type(op)
        fn = _CONVS.get(kind) or _TRANSPOSED.get(kind) or (F.linear if kind is nn.Linear else None)
        if fn is None:
            raise ConvertError(f"convert_to_reference_fx: node '{node.name}' is a quantized {type(op).__name__}, "
                               "which has no reference form (conv, transposed conv and linear have); leave it float "
                               "with qconfig_mapping.set_module_name(name, None)")
        rec = record(node)
        qp = layer_weight_qparams(rec, op)
        base = str(node.target).replace(".", "_")
        graph = gm.graph
        with graph.inserting_before(node):
            w_int = graph.get_attr(_attr(gm, f"{base}_weight_int", quantize_int(op.weight.detach().float(), qp)))
            record(w_int).quantized_output = True
            w = _dequantize_weight(gm, w_int, qp, base)
            bias = None if op.bias is None else graph.get_attr(_attr(gm, f"{base}_bias", op.bias.detach().clone()))
            out = graph.call_function(fn, (node.args[0], w, bias, *_conv_args(op, fn)))
            if relu:
                out = graph.call_function(F.relu, (out,))
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)


def _dequantize_weight(gm: fx.GraphModule, w_int: fx.Node, qp: QParams, base: str) -> fx.Node:
    graph = gm.graph
    if qp.is_per_channel:
        scale = graph.get_attr(_attr(gm, f"{base}_weight_scale", qp.scale.detach().to(torch.float32).clone()))
        zp = graph.get_attr(_attr(gm, f"{base}_weight_zero_point", qp.zero_point.detach().to(torch.int64).clone()))
        w = graph.call_function(_Q.dequantize_per_channel.default, (w_int, scale, zp, qp.axis))
    else:
        s, z = qp.scalar()
        w = graph.call_function(_Q.dequantize_per_tensor.default, (w_int, s, z))
    record(w).quantized_inputs = True
    return w


def _conv_args(op: nn.Module, fn: Callable[..., torch.Tensor]) -> tuple[Any, ...]:
    if fn is F.linear:
        return ()
    if float_type(op) in _TRANSPOSED:
        return (tuple(op.stride), tuple(op.padding), tuple(op.output_padding), op.groups, tuple(op.dilation))
    return (tuple(op.stride), tuple(op.padding), tuple(op.dilation), op.groups)


def quantized_weight_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """The conv / linear calls of a reference graph whose weight is a dequantized int8 buffer (for pattern
    matching: ``dequantize(get_attr) -> op``)."""
    targets = {F.linear, *_CONVS.values(), *_TRANSPOSED.values()}
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets and len(n.args) > 1
            and isinstance(n.args[1], fx.Node) and n.args[1].target in DEQUANTIZE_OPS]


@dataclasses.dataclass(frozen=True)
class IntegerPoolingPass:
    """Average pooling and ``mean`` of a reference graph on the integer grid (see module docstring).

    The reference form writes a quantized average pool as ``dequantize(q, s, zp) -> avg_pool -> quantize(s, zp)
    -> dequantize(s, zp)``: the mean of the float values ``s * (q - zp)``, multiplied by ``1 / s`` and rounded. The
    int8 kernels (PyTorch's quantized avg / adaptive avg pool, ``mean``) average the integers and round that. Both
    are the same number except at exact halves (the mean of two or four values: a quarter of a 2x2 pool's outputs),
    where the float path lands a rounding error above or below the half and the integer path rounds half to even;
    ONNX Runtime, which runs the float ops between DequantizeLinear and QuantizeLinear, would differ from fxquant's
    int8 model there. Pooling is positively homogeneous, so the same integers come out of ``dequantize(q, 1, zp) ->
    avg_pool -> quantize(1, zp)`` exactly (sums of integers, division by the window, round half to even), followed
    by ``dequantize(s, zp)``. Rewrites in place.
    """

    name: str = "integer_pooling"
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: Optional[QuantContext] = None) -> PassResult:
        averages = (ops.AVGPOOL, ops.ADAPTIVE_AVGPOOL, ops.MEAN)
        homogeneous = averages + (ops.RELU, ops.MAXPOOL, ops.FLATTEN, ops.RESHAPE, ops.PERMUTE, ops.TRANSPOSE,
                                  ops.CONTIGUOUS, ops.SQUEEZE, ops.UNSQUEEZE, ops.DROPOUT, ops.IDENTITY)
        graph, modified = gm.graph, False
        for quant in [n for n in graph.nodes if n.target is _Q.quantize_per_tensor.default]:
            _, scale, zero_point, quant_min, quant_max, dtype = quant.args
            if scale == 1.0:  # on the integer grid already (rewritten before, or a unit scale)
                continue
            span, node = [], quant.args[0]
            while (isinstance(node, fx.Node) and len(node.users) == 1 and node.args
                   and record(node).entry is not None and record(node).entry.op in homogeneous):
                span.append(node)
                node = node.args[0]
            if not (span and isinstance(node, fx.Node) and node.target is _Q.dequantize_per_tensor.default
                    and tuple(node.args[1:3]) == (scale, zero_point)
                    and any(record(n).entry.op in averages for n in span)
                    and all(u.target is _Q.dequantize_per_tensor.default for u in quant.users)):
                continue
            with graph.inserting_before(span[-1]):
                unit = graph.call_function(_Q.dequantize_per_tensor.default, (node.args[0], 1.0, zero_point))
            record(unit).quantized_inputs = True
            record(unit).is_tensor = True
            span[-1].replace_input_with(node, unit)
            quant.args = (quant.args[0], 1.0, zero_point, quant_min, quant_max, dtype)
            modified = True
        if modified:
            graph.eliminate_dead_code()
            graph.lint()
            recompile(gm)
        return PassResult(gm, modified)


@dataclasses.dataclass(frozen=True)
class DecomposeQDQPass:
    """Expand :mod:`fxquant.qdq` calls into plain aten ops on integer tensors (see module docstring)."""

    name: str = "decompose_qdq"
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: Optional[QuantContext] = None) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in QUANTIZE_OPS + DEQUANTIZE_OPS:
                continue
            with gm.graph.inserting_before(node):
                new = (_decompose_quantize if node.target in QUANTIZE_OPS else _decompose_dequantize)(gm, node)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            modified = True
        if modified:
            gm.graph.eliminate_dead_code()
            gm.delete_all_unused_submodules()
            recompile(gm)
        return PassResult(gm, modified)


def _broadcast_consts(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, Any]:
    """Per-channel scale / zero point as buffers shaped to broadcast along the axis (``[C, 1, 1]`` for axis 0
    of a 3-d-or-more tensor), or the per-tensor numbers."""
    if node.target in (_Q.quantize_per_tensor.default, _Q.dequantize_per_tensor.default):
        return float(node.args[1]), int(node.args[2])
    scale = getattr(gm, str(node.args[1].target)).to(torch.float32)
    zp = getattr(gm, str(node.args[2].target)).to(torch.int64)
    ndim = _ndim(gm, node.args[0])
    axis = int(node.args[3]) % ndim
    shape = [1] * ndim
    shape[axis] = -1
    g = gm.graph
    return (g.get_attr(_attr(gm, f"{node.name}_scale", scale.reshape(shape).clone())),
            g.get_attr(_attr(gm, f"{node.name}_zero_point", zp.reshape(shape).clone())))


def _ndim(gm: fx.GraphModule, x: fx.Node) -> int:
    if x.op == "get_attr":
        return getattr(gm, str(x.target)).dim()
    meta = x.meta.get("tensor_meta")
    if meta is None:
        raise ConvertError(f"decompose: the rank of '{x.name}' is unknown (no shape metadata); per-channel "
                           "quantization of an activation needs it")
    return len(meta.shape)


def _decompose_quantize(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    g = gm.graph
    x = node.args[0]
    qmin, qmax, dtype = node.args[-3:]
    scale, zp = _broadcast_consts(gm, node)
    if isinstance(scale, float):  # the float32 reciprocal, as torch's quantize kernels multiply by it
        inv: Any = float(torch.reciprocal(torch.tensor(scale, dtype=torch.float32)))
    else:
        value = torch.reciprocal(getattr(gm, str(scale.target)))
        inv = g.get_attr(_attr(gm, f"{node.name}_inv_scale", value))
    y = g.call_function(torch.round, (g.call_function(operator.mul, (x, inv)),))
    y = g.call_function(torch.clamp, (g.call_function(operator.add, (y, zp)), qmin, qmax))
    out = g.call_method("to", (y, dtype))
    record(out).quantized_output = True
    return out


def _decompose_dequantize(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    g = gm.graph
    scale, zp = _broadcast_consts(gm, node)
    y = g.call_method("to", (node.args[0], torch.float32))
    record(y).quantized_inputs = True
    return g.call_function(operator.mul, (g.call_function(operator.sub, (y, zp)), scale))
