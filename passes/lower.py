"""Lowering pass: observed graph -> graph of quantized kernels, with quantize/dequantize at the borders.

Contract:
    * input: a calibrated observed GraphModule (every observer has seen data);
    * output: a new GraphModule with no observers, where each quantizable node runs its table entry's
      kernel (or the same op natively on quantized tensors for shares-input / fixed-qparams ops), a
      ``Quantize`` where float enters a quantized region, ``.dequantize()`` where it leaves; every tensor
      is quantized at most once and dequantized at most once, so dequantize -> quantize pairs never appear;
    * observers that saw nothing make it raise :class:`~fxquant.errors.ConvertError` listing them all;
    * weights are quantized with ``NodeRecord.weight_qparams`` where a QAT model's freeze pass set them (the
      trained fake quantizer's qparams) or AdaRound did (the grid it chose the rounding on), else with a fresh
      weight observer of the node's qconfig.
    * dynamic / weight-only nodes (``OpEntry.is_dynamic``) become their kernel module with float input and
      output, built from the float module and the qconfig's weight observer (no calibration data needed);
    * a clamp (relu, relu6, hardtanh, constant clamp) whose input is observed after it (so the clamp is its only
      reader), on a grid that spans its dtype and whose bounds lie outside the codes that grid holds, is no op: its output is the input's quantized
      value, recorded as computing the clamp (``NodeRecord.computes``). Observe puts a producer's observer after
      its clamp, so a conv -> relu6 writes into [0, 6] and the clamp goes;
    * an op whose inputs were all written in its output grid (``OpEntry.inputs_take_output_grid``) runs as the
      call it is, on the quantized views (a cat copies integers);
    * no dead nodes: values the model computes but never uses (a dead branch in the user's code) are dropped;
    * the kernel layer decides how values cross the border and how ops without a kernel run: quantized tensors
      dequantize themselves (``.dequantize()``), plain integer tensors through the layer's dequantize module; a
      shares-input / fixed-qparams op runs as it is on the quantized value, or through the module the layer
      returns for it (``kernels.native``); every kernel gets the qparams of its inputs (``LoweringSpec.inputs``);
    * kernel fusions (``BackendConfig.kernel_fusions``): a conv / linear whose only user is the consumer of a
      listed pair is built into the consumer's kernel (a oneDNN post-op, or the residual add), with the consumer's
      output qparams; for an add, the other operand is copied first unless nothing reads it later and it is a
      tensor a kernel allocated (oneDNN writes the sum into it). Where they apply is found with the public
      pattern API: :func:`kernel_fusion_patterns` turns each listed pair into a
      :class:`~fxquant.passes.matching.Pattern` on the observed graph (looking through observers); the
      planner keeps the matches whose values have qparams and whose module the kernel layer supports.

The graph is rebuilt in one forward walk. Each old value has up to two views in the new graph, a float
one and a quantized one, made on first use and cached.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
from typing import Any, ClassVar, Optional

import torch
from torch import fx, nn

from fxquant.backends import ops
from fxquant.backends.config import BackendConfig, KernelFusion, Observation, OpEntry
from fxquant.backends.kernels import LoweringSpec, get_kernels
from fxquant.backends.kernels.onednn_ops import OpCall
from fxquant.errors import ConvertError
from fxquant.fused import materialize_folds
from fxquant.passes.base import PassResult, recompile
from fxquant.passes.context import RECORD_KEY, NodeRecord, QuantContext, modules_of, record
from fxquant.passes.dynamic import dynamic_spec
from fxquant.passes.matching import Entry, Match, Op, Pattern, find
from fxquant.passes.observe import is_observer_node, layer_weight_qparams, observer_qparams, tensor_inputs
from fxquant.qparams import QUANTIZED_DTYPES, QParams

__all__ = ["LowerPass", "KernelFusionPattern", "kernel_fusion_patterns"]

#: ``x.shape``, ``x.ndim``, ``x.size()``, ``x.dim()``: the same answer on the quantized view
_SHAPE_QUERY = Op(ops.SIZE, "shape_query",
                  check=lambda n, m: n.op != "call_function" or n.args[1:2] in (("shape",), ("ndim",)))


def _tag(node: fx.Node, quantized_output: bool, quantized_inputs: bool, like: Optional[fx.Node] = None) -> None:
    """Give a new node its own record (a copy of ``like``'s, if given) marking its quantized ends."""
    rec = dataclasses.replace(record(like)) if like is not None else NodeRecord()
    rec.quantized_output, rec.quantized_inputs = quantized_output, quantized_inputs
    node.meta[RECORD_KEY] = rec


class _Builder:
    """Rebuilds the graph; holds the old->new value maps (one context object instead of many arguments)."""

    def __init__(self, gm: fx.GraphModule, ctx: QuantContext) -> None:
        self.old = gm
        self.ctx = ctx
        self.modules = modules_of(gm)
        self.kernels = get_kernels(ctx.backend)
        self.graph = fx.Graph()
        self.new_modules: dict[str, nn.Module] = {}
        self.as_float: dict[fx.Node, fx.Node] = {}
        self.as_quant: dict[fx.Node, fx.Node] = {}
        self.qparams: dict[fx.Node, QParams] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.fusions: dict[fx.Node, _Fusion] = {}  # consumer -> the kernel fusion that computes it
        self.producers: set[fx.Node] = set()  # nodes computed inside their consumer's kernel
        # modules called from several places: each call gets its own kernel under its own name (the module's
        # name stays with the float module, for a call that stays float)
        self.call_sites = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")

    def kernel_name(self, node: fx.Node) -> str:
        """Where the kernel replacing ``node`` lives: the module's own name when it is called once."""
        if node.op == "call_module" and self.call_sites[str(node.target)] == 1:
            return str(node.target)
        return self._module_name(node.name)

    # ------------------------------------------------------------------ values
    def source(self, n: fx.Node) -> fx.Node:
        """The value an observer node stands for (observers are identities)."""
        return _source(n, self.modules)

    def flt(self, n: Any) -> Any:
        """The float view of an old value (dequantizing once if it only exists quantized)."""
        if not isinstance(n, fx.Node):
            return n
        n = self.source(n)
        if n not in self.as_float:
            q = self.as_quant[n]
            module = self.kernels.dequantize(self.qparams[n]) if n in self.qparams else None
            if module is None:  # a quantized tensor dequantizes itself
                node = self.graph.call_method("dequantize", (q,))
            else:  # a plain integer tensor: the kernel layer's module, holding its qparams
                name = self._module_name(f"{n.name}_dequantize")
                self.new_modules[name] = module
                node = self.graph.call_module(name, (q,))
            _tag(node, False, True)
            self.as_float[n] = node
        return self.as_float[n]

    def qnt(self, n: fx.Node) -> fx.Node:
        """The quantized view of an old value (quantizing once with its observed qparams)."""
        n = self.source(n)
        if n not in self.as_quant and n.op == "get_attr":  # a constant: quantize it once, now
            name = self._module_name(f"{n.name}_quantized")
            self.constants[name] = self.kernels.quantize(self.qparams[n])(_get_attr(self.old, str(n.target)))
            node = self.graph.get_attr(name)
            _tag(node, True, False)
            self.as_quant[n] = node
        if n not in self.as_quant:
            name = self._module_name(f"{n.name}_quantize")
            self.new_modules[name] = self.kernels.quantize(self.qparams[n])
            node = self.graph.call_module(name, (self.as_float[n],))
            _tag(node, True, False)
            self.as_quant[n] = node
        return self.as_quant[n]

    def any_view(self, n: Any) -> Any:
        """The float view if there is one, else the quantized one (for shape queries, which agree on both)."""
        if isinstance(n, fx.Node) and self.source(n) not in self.as_float and self.source(n) in self.as_quant:
            return self.as_quant[self.source(n)]
        return self.flt(n)

    def has_quant(self, n: Any) -> bool:
        return isinstance(n, fx.Node) and (self.source(n) in self.as_quant or self.source(n) in self.qparams)

    def _module_name(self, base: str) -> str:
        name, i = base.replace(".", "_"), 1
        while name in self.new_modules or name in self.modules:
            name, i = f"{base}_{i}".replace(".", "_"), i + 1
        return name

    def map_float(self, args: Any) -> Any:
        return fx.node.map_arg(args, self.flt)


@dataclasses.dataclass(frozen=True)
class _Fusion:
    """A planned kernel fusion: ``producer`` (conv / linear) computed inside ``consumer``'s kernel."""

    fusion: KernelFusion
    producer: fx.Node
    accum: Optional[fx.Node] = None  # the other operand of a fused add
    accum_read_later: bool = False  # another op reads the added tensor after the add, or the producer reads it
    # (the kernel writes into it)


def _real_users(n: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node]:
    """The users of ``n``, looking through its observers."""
    out: list[fx.Node] = []
    for u in n.users:
        out.extend(_real_users(u, modules) if is_observer_node(u, modules) else [u])
    return out


def _shape(n: fx.Node) -> Optional[tuple]:
    meta = n.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _source(n: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """The value an observer node stands for (observers are identities)."""
    while is_observer_node(n, modules):
        n = n.args[0]
    return n


def _sources(node: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node]:
    """The tensor inputs of ``node`` that are nodes, looking through observers."""
    return [_source(t, modules) for t in (tensor_inputs(node) or []) if isinstance(t, fx.Node)]


def _calls_module(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module"


@dataclasses.dataclass(frozen=True)
class _Operands:
    """The extra check of a kernel-fusion pattern: the producer is the consumer's tensor input ``position``; for
    an add, the other operand is another tensor of the producer's shape (the accumulator the kernel adds in)."""

    position: int
    accumulate: bool

    def __call__(self, match: Match, modules: dict[str, nn.Module]) -> bool:
        inputs, producer = _sources(match["consumer"], modules), match["producer"]
        if len(inputs) <= self.position or inputs[self.position] is not producer:
            return False
        if not self.accumulate:
            return True
        if len(inputs) < 2:  # x + 1.0
            return False
        accum = inputs[1 - self.position]
        return accum is not producer and _shape(accum) is not None and _shape(accum) == _shape(producer)


@dataclasses.dataclass(frozen=True)
class KernelFusionPattern:
    """Where one of the table's kernel fusions can apply: a pattern on the observed graph.

    Attributes:
        fusion: the table's :class:`~fxquant.backends.config.KernelFusion`.
        pattern: steps ``"producer"`` (a module call annotated with the fusion's producer entry, used only by the
            consumer) and ``"consumer"`` (annotated with its consumer entry), looking through observers; its
            ``extra_check`` wants the producer at ``position`` among the consumer's tensor inputs and, for an
            add, another operand of the producer's shape.
        position: the consumer's tensor input the producer feeds (an add's producer may be either operand).
    """

    fusion: KernelFusion
    pattern: Pattern
    position: int = 0

    def accumulator(self, match: Match, modules: dict[str, nn.Module]) -> Optional[fx.Node]:
        """The other operand of a fused add (the tensor the kernel adds in); ``None`` for a unary consumer."""
        if not self.fusion.accumulates:
            return None
        return _sources(match["consumer"], modules)[1 - self.position]


def kernel_fusion_patterns(backend: BackendConfig) -> tuple[KernelFusionPattern, ...]:
    """The table's kernel fusions as patterns, in table order (an add's two positions: the first operand first).

    Lowering fuses, for each consumer in graph order, the first match (first position, then table order) whose
    values have qparams and whose module the kernel layer supports.

    Example:
        >>> from fxquant.backends import get_backend_config
        >>> from fxquant.backends.config import KernelFusion
        >>> table = get_backend_config("fbgemm").replace(kernel_fusions=(
        ...     KernelFusion("conv2d", "hardswish", "conv2d+hardswish"), KernelFusion("conv2d", "add", "conv2d+add")))
        >>> for p in kernel_fusion_patterns(table):
        ...     print(p.fusion.target, p.position, [(op.name, op.args) for op in p.pattern.ops])
        conv2d+hardswish 0 [('producer', ()), ('consumer', ('producer',))]
        conv2d+add 0 [('producer', ()), ('consumer', ('producer',))]
        conv2d+add 1 [('producer', ()), ('consumer', (None, 'producer'))]
    """
    out = []
    for fusion in backend.kernel_fusions:
        accumulate = fusion.accumulates
        for position in (0, 1) if accumulate else (0,):
            steps = (Op(Entry(fusion.producer), "producer", check=_calls_module),
                     Op(Entry(fusion.consumer), "consumer", args=(None,) * position + ("producer",)))
            pattern = Pattern(steps, extra_check=_Operands(position, accumulate), through=is_observer_node)
            out.append(KernelFusionPattern(fusion, pattern, position))
    return tuple(out)


def _plan_one(b: _Builder, kp: KernelFusionPattern, match: Match, order: dict[fx.Node, int]) -> Optional[_Fusion]:
    """The fusion of a pattern match, if its values have qparams and the kernel layer supports the module."""
    consumer, producer = match["consumer"], match["producer"]
    if consumer not in b.qparams and record(consumer).entry.observation is Observation.OWN:
        return None
    if producer in b.producers or b.source(producer.args[0]) not in b.qparams:
        return None
    if b.kernels.supports(kp.fusion.target, b.modules[str(producer.target)]):
        return None
    accum = kp.accumulator(match, b.modules)
    if accum is None:
        return _Fusion(kp.fusion, producer)
    if accum not in b.qparams:
        return None
    others = [u for u in _real_users(accum, b.modules) if u is not consumer]
    later = any(order.get(u, len(order)) > order[consumer] for u in others)
    # a user that is not a kernel (a reshape, ...) may return a view of the tensor the kernel writes into
    aliased = any(record(u).entry is None or record(u).entry.lowering is None for u in others)
    # the producer itself reads it (conv(a) + a): the kernel would write the sum over the input it still reads
    own_input = producer in others
    return _Fusion(kp.fusion, producer, accum,
                   later or aliased or own_input or accum.op in ("placeholder", "get_attr"))


def _share_qparams(b: _Builder) -> None:
    """Shares-input ops get their input's qparams, in one forward walk (a fusion into one needs them)."""
    for node in b.old.graph.nodes:
        if is_observer_node(node, b.modules) or node.op not in ("call_function", "call_method", "call_module"):
            continue
        if record(node).entry is not None and record(node).entry.observation is Observation.SHARES_INPUT:
            src = (tensor_inputs(node) or [None])[0]
            if isinstance(src, fx.Node) and b.source(src) in b.qparams:
                b.qparams.setdefault(node, b.qparams[b.source(src)])


def _plan_fusions(b: _Builder) -> None:
    """Plan the table's ``kernel_fusions`` (see ``KernelFusion``): the matches of their patterns, per consumer in
    graph order, the first that :func:`_plan_one` accepts."""
    if not b.ctx.backend.kernel_fusions:
        return
    _share_qparams(b)
    order = {n: i for i, n in enumerate(b.old.graph.nodes)}
    records = (n.meta.get(RECORD_KEY) for n in b.old.graph.nodes)
    present = {rec.entry.name for rec in records if rec is not None and rec.quantizable}
    found: dict[fx.Node, list[tuple[tuple[int, int], KernelFusionPattern, Match]]] = {}
    for rank, kp in enumerate(kernel_fusion_patterns(b.ctx.backend)):
        if not {kp.fusion.producer, kp.fusion.consumer} <= present:  # a step no node can match: skip the search
            continue
        for match in find(b.old, kp.pattern, b.modules):
            found.setdefault(match["consumer"], []).append(((kp.position, rank), kp, match))
    for consumer in sorted(found, key=order.__getitem__):
        for _, kp, match in sorted(found[consumer], key=lambda c: c[0]):
            plan = _plan_one(b, kp, match, order)
            if plan is not None:
                b.fusions[consumer] = plan
                b.producers.add(plan.producer)
                break


def _fresh(b: _Builder, new: fx.Node) -> bool:
    """Whether the new graph's ``new`` is a tensor a kernel module allocated (not a view of another one)."""
    return new.op == "call_module" and b.new_modules.get(str(new.target)) is not None


def _observer_qparams(builder: _Builder) -> None:
    by_name = observer_qparams(builder.old, builder.modules, "convert_fx")
    for node in builder.old.graph.nodes:
        if is_observer_node(node, builder.modules):  # a grid group's observer: one QParams object for all its calls
            builder.qparams[builder.source(node)] = by_name[str(node.target)]
    for node in builder.old.graph.nodes:  # observed after the clamp it feeds (observe's _clamp_after) or by its group
        rec = node.meta.get(RECORD_KEY)
        if (node not in builder.qparams and rec is not None and rec.entry is not None
                and rec.entry.observation is Observation.OWN and rec.observer in by_name):
            builder.qparams[node] = by_name[rec.observer]


@dataclasses.dataclass(frozen=True)
class LowerPass:
    """Lower an observed graph to quantized kernels (see module docstring)."""

    name: str = "lower"
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: QuantContext) -> PassResult:
        b = _Builder(gm, ctx)
        _observer_qparams(b)
        _plan_fusions(b)
        for node in gm.graph.nodes:
            if is_observer_node(node, b.modules):
                continue
            if node.op == "placeholder":
                default = node.args[0] if node.args else inspect.Signature.empty
                new = b.graph.placeholder(str(node.target), type_expr=node.type, default_value=default)
                new.meta = dict(node.meta)
                _tag(new, False, False, like=node)
                b.as_float[node] = new
            elif node.op == "output":
                b.graph.output(b.map_float(node.args[0]))
            elif node.op == "get_attr":
                b.as_float[node] = b.graph.get_attr(str(node.target))
                b.new_modules.setdefault(str(node.target), None)
            elif not self._lower(b, node):
                self._copy_float(b, node)
        # float modules left float are copied, so the converted model shares nothing with the prepared one
        root = {name: _float_copy(b.modules[name]) for name in _used_targets(b.graph) if name not in b.new_modules}
        root.update({k: v for k, v in b.new_modules.items() if v is not None})
        for name, source in _constant_names(b).items():
            root[name] = copy.deepcopy(_get_attr(gm, source))
        root.update(b.constants)
        # the class convert_fx returns, built here: wrapping it afterwards would generate and compile the code again
        from fxquant.serialization import QuantGraphModule  # imports fxquant.passes: not at module level

        new_gm = QuantGraphModule(root, b.graph, class_name=type(gm).__name__)
        if new_gm.graph.eliminate_dead_code():  # the user's dead branches (no_dead_nodes runs after every pass)
            new_gm.delete_all_unused_submodules()
            recompile(new_gm)
        return PassResult(new_gm, True)

    @staticmethod
    def _copy_float(b: _Builder, node: fx.Node) -> None:
        new = b.graph.create_node(node.op, node.target, b.map_float(node.args), b.map_float(node.kwargs), node.name)
        new.meta = dict(node.meta)
        _tag(new, False, False, like=node)
        b.as_float[node] = new

    def _lower(self, b: _Builder, node: fx.Node) -> bool:
        rec = record(node)
        if not rec.quantizable:
            return False
        entry = rec.entry
        if entry.is_dynamic:
            return self._lower_dynamic(b, node, rec)
        inputs = tensor_inputs(node) or []
        if entry.observation is Observation.NONE:
            if not _SHAPE_QUERY.matches(node, b.modules):
                return False
            new = b.graph.create_node(node.op, node.target, fx.node.map_arg(node.args, b.any_view),
                                      b.map_float(node.kwargs), node.name)
            _tag(new, False, True, like=node)
            b.as_float[node] = new
            return True
        if entry.observation is Observation.SHARES_INPUT:
            if not inputs or not b.has_quant(inputs[0]):
                return False
            if node in b.fusions:  # relu6 / gelu computed by the kernel in front
                return self._lower_fused(b, node)
            src = b.source(inputs[0])
            grid = b.qparams.get(src)
            if _observed_after(node, src, b.modules) and _clamp_is_identity(node, b.modules, grid):
                # the kernel in front saturates at the bounds already: no op (and nothing else reads its input,
                # whose tensor its output now is: a kernel writing into one would change both)
                b.qparams[node] = grid
                b.as_quant[node] = b.qnt(inputs[0])
                record(b.as_quant[node]).computes = node.name
                return True
            b.qparams.setdefault(node, b.qparams[b.source(inputs[0])])  # shares its input's grid
            first = b.qnt(node.args[0])
            if b.kernels.needs_contiguous_input(entry.name):
                first = b.graph.call_method("contiguous", (first,))
                _tag(first, True, True)
            self._emit_native(b, node, entry.name, first)
            return True
        if rec.observer is None or not all(b.has_quant(t) for t in inputs):
            return False
        out_qp = b.qparams[node]
        reason = _ratio_reason(entry, [b.qparams.get(b.source(t)) for t in inputs], out_qp)
        if reason:
            b.ctx.keep_float(node, entry.name, reason)
            return False
        if node in b.fusions:
            return self._lower_fused(b, node)
        qargs = fx.node.map_arg(node.args, lambda a: b.qnt(a) if a in inputs else b.flt(a))
        if entry.lowering is None:  # fixed-qparams ops (sigmoid, tanh, hardsigmoid)
            self._emit_native(b, node, entry.name, qargs[0], qargs[1:])
            return True
        if entry.inputs_take_output_grid and all(b.qparams.get(b.source(t)) is out_qp for t in inputs):
            # every input was written in the output grid (observe's grid_groups): the call as it is
            # (torch.cat) copies the integers, on quantized tensors and plain uint8 alike
            self._emit(b, node, node.op, node.target, qargs, b.map_float(node.kwargs))
            return True
        module = b.modules.get(str(node.target)) if node.op == "call_module" else None
        reason = _static_args_reason(entry, node, module)
        if reason:
            b.ctx.keep_float(node, entry.name, reason)
            return False
        if node in b.producers:  # runs inside its consumer's kernel (a oneDNN post-op)
            return True
        spec = self._spec(b, node, rec, out_qp)
        self._emit_kernel(b, node, spec, _kernel_args(entry, qargs))
        return True

    @staticmethod
    def _emit_kernel(b: _Builder, node: fx.Node, spec: LoweringSpec, args: tuple) -> None:
        name = b.kernel_name(node)
        try:
            b.new_modules[name] = b.kernels.build(spec)
        except ConvertError as exc:  # a kernel that refuses its grids: name the node
            raise ConvertError(f"node '{node.name}': {exc}") from None
        b.new_modules[name].where = f"node '{node.name}'"  # named in the kernel's input checks
        LowerPass._emit(b, node, "call_module", name, args, {})

    def _emit_native(self, b: _Builder, node: fx.Node, entry_name: str, first: fx.Node, rest: tuple = ()) -> None:
        """A shares-input / fixed-qparams op on the quantized view: as it is, or through the kernel layer's
        module for it (plain integer tensors: relu as max with the zero point, averages on the integers, ...)."""
        rest = tuple(b.map_float(node.args[1:])) if not rest else tuple(rest)
        kwargs = b.map_float(node.kwargs)
        call = OpCall(node.op, b.modules[str(node.target)] if node.op == "call_module" else node.target)
        module = b.kernels.native(entry_name, call, b.qparams.get(b.source(node.args[0])), b.qparams.get(node))
        if module is None:
            target = b.kernels.native_method(node.target) if node.op == "call_method" else node.target
            self._emit(b, node, node.op, target, (first,) + rest, kwargs)
            return
        name = b._module_name(node.name)  # one module per call: a module called twice has two grids
        b.new_modules[name] = module
        self._emit(b, node, "call_module", name, (first,) + rest, kwargs)

    def _lower_fused(self, b: _Builder, consumer: fx.Node) -> bool:
        """The consumer of a kernel fusion: one kernel computes producer and consumer (see ``KernelFusion``)."""
        plan = b.fusions[consumer]
        producer, prec = plan.producer, record(plan.producer)
        x = producer.args[0]
        spec = self._spec(b, producer, prec, b.qparams[consumer])
        inputs = [b.qparams[b.source(x)]] + ([b.qparams[b.source(plan.accum)]] if plan.accum is not None else [])
        args = [b.qnt(x)] + ([b.qnt(plan.accum)] if plan.accum is not None else [])
        clone = plan.accum is not None and not _fresh(b, b.as_quant[b.source(plan.accum)])
        spec = dataclasses.replace(spec, target=plan.fusion.target, inputs=tuple(inputs),
                                   kwargs={**spec.kwargs, "clone_accum": clone or plan.accum_read_later})
        self._emit_kernel(b, producer, spec, tuple(args))
        b.as_quant[consumer] = b.as_quant.pop(producer)
        _tag(b.as_quant[consumer], True, True, like=consumer)
        return True

    @staticmethod
    def _lower_dynamic(b: _Builder, node: fx.Node, rec: NodeRecord) -> bool:
        """Dynamic / weight-only branch: the kernel module takes and returns float (activations are quantized
        inside it at run time, or not at all), so no quantize / dequantize surrounds it."""
        name = b.kernel_name(node)
        b.new_modules[name] = b.kernels.build(dynamic_spec(rec.entry, rec.qconfig, b.modules[str(node.target)],
                                                           b.ctx.backend))
        new = b.graph.create_node("call_module", name, b.map_float(node.args), b.map_float(node.kwargs), node.name)
        new.meta = dict(node.meta)
        _tag(new, False, False, like=node)
        b.as_float[node] = new
        return True

    @staticmethod
    def _emit(b: _Builder, node: fx.Node, op: str, target: Any, args: Any, kwargs: Any) -> None:
        new = b.graph.create_node(op, target, tuple(args), dict(kwargs), node.name)
        _tag(new, True, True, like=node)
        b.as_quant[node] = new

    @staticmethod
    def _spec(b: _Builder, node: fx.Node, rec: NodeRecord, out_qp: QParams) -> LoweringSpec:
        module = b.modules.get(str(node.target)) if node.op == "call_module" else None
        weight_qp = None
        if rec.entry.weight is not None and module is not None:
            weight_qp = layer_weight_qparams(rec, getattr(module, "op", module))
        inputs = tuple(b.qparams.get(b.source(t)) for t in (tensor_inputs(node) or []) if isinstance(t, fx.Node))
        return LoweringSpec(rec.entry.lowering, module, weight_qp, out_qp, _op_args(rec.entry, node, module), inputs)


def _float_copy(module: nn.Module) -> nn.Module:
    """A copy of a module the converted model keeps float; a conv that folds a batch norm on read
    (:class:`fxquant.fused.FoldedConv2d`) becomes a plain conv holding the folded weights, computed once."""
    out = copy.deepcopy(module)
    materialize_folds(out)
    return out


def _observed_after(clamp: fx.Node, src: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``src`` is observed after ``clamp`` (observe's ``_clamp_after``, which takes only a clamp that is
    ``src``'s one reader): its grid was then calibrated on the clamp's output, so it lies inside the clamp's bounds
    whatever the data (a clamp after a max pool, on the grid of the conv in front, would be a no-op or not
    depending on the calibration data)."""
    after = [u for u in clamp.users if is_observer_node(u, modules)]
    return len(after) == 1 and record(src).observer == str(after[0].target)


def _clamp_is_identity(node: fx.Node, modules: dict[str, nn.Module], grid: Optional[QParams]) -> bool:
    """Whether the clamp ``node`` (relu, relu6, hardtanh, clamp) leaves the quantized ``grid`` as it is: both
    bounds, rounded to the grid as the quantized op rounds them (times the float32 reciprocal of the scale, half
    to even), lie at or beyond the codes a kernel's output can hold, give or take the one code an observer's
    zero-point rounding can put the grid's end past a bound (the kept clamp would round that bound to the code
    half a step inside it, dropping it leaves the code half a step outside: the same distance).

    Only grids that span their dtype (the kernels saturate at the dtype's range): a 7-bit grid (``reduce_range``)
    holds codes up to 127 while a kernel may write up to 255, so its clamp stays. With :func:`_observed_after` this
    keeps the decision a matter of the graph and the qconfig, not of the calibration data (``fxquant.load`` rebuilds the graph from other data and must get
    the same one)."""
    bounds = ops.clamp_bounds(node, modules)
    if (bounds is None or grid is None or grid.is_per_channel or grid.dtype not in QUANTIZED_DTYPES
            or QUANTIZED_DTYPES[grid.dtype][1:] != (grid.quant_min, grid.quant_max)):
        return False
    scale, zero_point = grid.scalar()
    inverse = torch.reciprocal(torch.tensor(scale, dtype=torch.float32))
    lo, hi = (zero_point + float(torch.round(torch.tensor(b, dtype=torch.float32) * inverse))
              if abs(b) != float("inf") else b for b in bounds)
    return lo <= grid.quant_min + 1 and hi >= grid.quant_max - 1


def _op_args(entry: OpEntry, node: fx.Node, module: Optional[nn.Module]) -> dict[str, Any]:
    """The entry's ``op_args`` read from the module (module form) or the call's arguments (functional form)."""
    out: dict[str, Any] = {}
    for name, pos, default in entry.op_args:
        if module is not None and hasattr(getattr(module, "op", module), name):
            out[name] = getattr(getattr(module, "op", module), name)
        elif name in node.kwargs:
            out[name] = node.kwargs[name]
        elif node.op != "call_module" and len(node.args) > pos:
            out[name] = node.args[pos]
        else:
            out[name] = default
    return out


def _static_args_reason(entry: OpEntry, node: fx.Node, module: Optional[nn.Module]) -> Optional[str]:
    """Why the kernel cannot take this call's arguments (computed at run time, or missing), if it cannot."""
    for name, value in _op_args(entry, node, module).items():
        if isinstance(value, fx.Node) or value is None:
            return f"its argument '{name}' is {'computed at run time' if value is not None else 'not given'}"
    return None


def _kernel_args(entry: OpEntry, qargs: tuple) -> tuple:
    if entry.lowering in ("cat", "stack"):
        return (qargs[0],)
    if entry.quantized_args is not None:
        return tuple(qargs[i] for i in entry.quantized_args)
    return tuple(qargs)


def _ratio_reason(entry: OpEntry, in_qps: list[Optional[QParams]], out_qp: QParams) -> Optional[str]:
    bounds = entry.constraints.input_output_scale_ratio
    if bounds is None:
        return None
    out_scale = float(out_qp.scale)
    for qp in in_qps:
        if qp is None:
            continue
        ratio = float(qp.scale) / out_scale
        if not bounds[0] <= ratio < bounds[1]:
            return (f"input/output scale ratio {ratio:.3g} is outside the kernel's [{bounds[0]:g}, {bounds[1]:g}) "
                    "(the kernel would assert)")
    return None


def _used_targets(graph: fx.Graph) -> list[str]:
    return [str(n.target) for n in graph.nodes if n.op == "call_module"]


def _constant_names(b: _Builder) -> dict[str, str]:
    """The converted model's name for each float attribute its graph reads (``get_attr``), and where the prepared
    model has it. A tensor read from a module that became a kernel (``self.conv.weight`` beside the quantized
    conv) is renamed to a top-level attribute: the kernel module has no float weight to hold it."""
    kernels = {k for k, v in b.new_modules.items() if v is not None}
    names: dict[str, str] = {}
    renamed: dict[str, str] = {}  # one new name per source: two reads of one tensor still read one attribute
    for node in b.graph.nodes:
        if node.op != "get_attr" or b.new_modules.get(str(node.target), 0) is not None:
            continue
        source = str(node.target)
        parts = source.split(".")
        if any(".".join(parts[:i]) in kernels for i in range(1, len(parts))):
            if source not in renamed:
                name, k = source.replace(".", "_"), 0
                while name in b.new_modules or name in names or name in b.constants or hasattr(b.old, name):
                    k += 1
                    name = f"{source.replace('.', '_')}_{k}"
                renamed[source] = name
            node.target = renamed[source]
        names[str(node.target)] = source
    return names


def _get_attr(gm: fx.GraphModule, name: str) -> Any:
    obj: Any = gm
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj
