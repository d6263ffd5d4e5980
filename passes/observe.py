"""Observer insertion pass: one observer per tensor that a quantized op reads or writes.

Contract:
    * input: an annotated GraphModule;
    * output: observers (identity modules) inserted after every tensor that enters or leaves a quantized
      op; all users of an observed tensor read it through its observer; ops that share their input's
      qparams get none of their own; fixed-qparams ops get a fixed observer; the float function is unchanged;
    * each node's record names the observer of its output (``NodeRecord.observer``);
    * never two observers on one tensor; idempotent (observed tensors are not observed again);
    * quantization-aware training (``ctx.is_qat``): the qconfig's activation factory gives FakeQuantize
      modules, which count as observers (:data:`fxquant.fake_quantize.OBSERVER_TYPES`); fixed-qparams ops
      get a FakeQuantize around their fixed observer; shares-input ops that leave their input's grid
      (``OpEntry.leaves_grid``: average pooling, mean, ...) get a ``SharedFakeQuantize`` of their input's
      fake quantizer on their output, as their quantized kernel rounds to that grid; each QAT module
      (:mod:`fxquant.qat`) of a quantized node gets its ``weight_fake_quant`` from ``qconfig.weight``
      (narrowed as :func:`weight_observer` says);
    * an own-observed op whose only user is a clamp (relu, relu6, hardtanh, clamp with constant bounds) that runs
      quantized is observed after the clamp (:func:`_clamp_after`): its record names that observer, and it writes
      its output straight into the clamped grid;
    * ops that take their inputs in their output grid (``OpEntry.inputs_take_output_grid``: cats) and the
      own-observed ops read only by them (directly or through ops sharing their input's grid, like pooling) form
      grid groups (:func:`grid_groups`, networkx components): one observer for the whole group, called on the
      output of each member that something outside the group reads. Every cat in a group then copies integers
      (torch.cat) instead of requantizing, as in a densenet block, where each layer's output is read by every
      later cat of the block.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import networkx as nx
from torch import fx, nn

from fxquant.backends import ops
from fxquant.backends.config import Observation
from fxquant.errors import ConvertError
from fxquant.fake_quantize import FakeQuantize, SharedFakeQuantize, is_observer
from fxquant.observers import FixedQParamsObserver, NoDataError
from fxquant.passes.base import PassResult, recompile
from fxquant.passes.context import NodeRecord, QuantContext, modules_of, record
from fxquant.qat import QATModule
from fxquant.qparams import QParams

__all__ = ["ObservePass", "GridGroup", "grid_groups", "grid_takers", "reads_only_grid_takers", "observer_qparams",
           "tensor_inputs", "is_observer_node", "weight_observer"]


def is_observer_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` calls an observer module (an observer or a fake quantizer)."""
    return node.op == "call_module" and is_observer(modules.get(str(node.target)))


def weight_observer(rec: NodeRecord, op: nn.Module) -> nn.Module:
    """The weight observer (or fake quantizer) of ``rec``'s qconfig for the weighted module ``op``, narrowed to
    the table's depthwise weight range where one applies (fbgemm's 7-bit depthwise weights)."""
    factory = rec.qconfig.weight
    limit = rec.entry.constraints.depthwise_weight_range
    groups = getattr(op, "groups", 1)
    if limit is not None and groups > 1 and groups == getattr(op, "in_channels", 0):
        obs = factory()
        lo, hi = obs.quant_min, obs.quant_max
        if lo < limit[0] or hi > limit[1]:
            if not hasattr(factory, "with_overrides"):
                raise ConvertError(f"depthwise conv weights need the range {list(limit)} on this backend; give the "
                                   "qconfig a weight factory made with Observer.with_args(...)")
            return factory.with_overrides(quant_min=max(lo, limit[0]), quant_max=min(hi, limit[1]))()
    return factory()


def layer_weight_qparams(rec: NodeRecord, op: nn.Module) -> QParams:
    """The qparams the weight of the weighted module ``op`` is quantized with: the record's pinned ones
    (``NodeRecord.weight_qparams``: a QAT module's trained qparams, or the grid AdaRound chose the rounding on),
    else those of its weight observer on the current weight."""
    if rec.weight_qparams is not None:
        return rec.weight_qparams
    obs = weight_observer(rec, op)
    obs(op.weight.detach())
    return obs.qparams()


def tensor_inputs(node: fx.Node) -> Optional[list[Any]]:
    """The args of ``node`` its table entry marks as quantized (a cat's list is flattened)."""
    entry = record(node).entry
    positions = entry.quantized_args if entry and entry.quantized_args is not None else range(len(node.args))
    out: list[Any] = []
    for i in positions:
        if i >= len(node.args):
            return None
        arg = node.args[i]
        out.extend(arg if isinstance(arg, (list, tuple)) else [arg])
    return out


def _clamp_after(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[fx.Node]:
    """The clamp (relu, relu6, hardtanh, constant clamp) that is the only user of ``node``, if it runs quantized on
    ``node``'s grid: then the clamp's output is what gets observed, and ``node`` writes straight into that grid.

    The clamp's output is all that is ever read of ``node``, so nothing is lost: the grid spends no codes on values
    the clamp removes (a conv -> relu6 in float had half its codes below zero), and where the grid lies inside the
    clamp's bounds lowering drops the clamp (the kernel's saturation does it).
    """
    users = list(node.users)
    if len(users) != 1:
        return None
    clamp = users[0]
    rec = record(clamp)
    if (not rec.quantizable or rec.entry.observation is not Observation.SHARES_INPUT or not clamp.args
            or clamp.args[0] is not node or is_observer_node(clamp, modules)
            or ops.clamp_bounds(clamp, modules) is None or record(node).entry.constraints.input_output_scale_ratio):
        return None  # (a kernel limiting its input/output scale ratio, qnnpack's add, keeps its own grid)
    return clamp


def grid_takers(graph: fx.Graph) -> set[fx.Node]:
    """The quantized ops that take their inputs in their output grid (cats) and are observed."""
    def takes(node: fx.Node) -> bool:
        rec = record(node)
        return (rec.quantizable and rec.entry.observation is Observation.OWN and rec.entry.inputs_take_output_grid
                and _float_tensors(tensor_inputs(node)))

    return {n for n in graph.nodes if takes(n)}


def _shares_grid_of(node: fx.Node, src: fx.Node) -> bool:
    """Whether ``node`` is a quantized op whose output is in the grid of its first quantized input ``src``."""
    rec = record(node)
    if not (rec.quantizable and rec.entry.observation is Observation.SHARES_INPUT):
        return False
    inputs = tensor_inputs(node)
    return bool(inputs) and inputs[0] is src


def reads_only_grid_takers(node: fx.Node, takers: set[fx.Node]) -> bool:
    """Whether everything that reads ``node`` is in ``takers`` (cats), directly or through ops that keep its grid
    (pooling, reshapes): then ``node`` can be written in their grid. A node nothing reads is not."""
    if not node.users:
        return False
    return all(u in takers or (_shares_grid_of(u, node) and reads_only_grid_takers(u, takers)) for u in node.users)


def _grid_source(node: fx.Node) -> Optional[fx.Node]:
    """The own-observed node whose grid ``node``'s output is in: ``node``, or the one behind its chain of ops that
    share their input's grid; ``None`` where the chain ends elsewhere (a fixed-qparams op, a float one)."""
    while True:
        rec = record(node)
        if not rec.quantizable:
            return None
        if rec.entry.observation is Observation.OWN:
            return node
        if rec.entry.observation is not Observation.SHARES_INPUT:
            return None
        inputs = tensor_inputs(node)
        if not inputs or not isinstance(inputs[0], fx.Node):
            return None
        node = inputs[0]


@dataclasses.dataclass
class GridGroup:
    """Cats and the producers written in their grid, sharing one observer.

    Attributes:
        observed: the members that something outside the group reads: each gets a call of the group's observer.
        observer: the observer module's name, once made.
    """

    observed: tuple[fx.Node, ...]
    observer: Optional[str] = None


def grid_groups(graph: fx.Graph) -> dict[fx.Node, GridGroup]:
    """Each member's grid group: the networkx connected components of "producer p is written in cat c's grid".

    p joins c when everything that reads p is a cat (through ops keeping p's grid), p is observed with the same
    activation qconfig as c, and p's kernel does not limit its input/output scale ratio (qnnpack's add: the shared
    grid could fall outside those limits and leave it float). A cat alone is no group.
    """
    takers = grid_takers(graph)
    links = nx.Graph()
    for cat in takers:
        for t in tensor_inputs(cat) or ():
            src = _grid_source(t)
            if src is None or src is cat:
                continue
            own = record(src)
            if (own.qconfig.activation != record(cat).qconfig.activation  # (equal: fxquant.load rebuilds them)
                    or own.entry.constraints.input_output_scale_ratio or not reads_only_grid_takers(src, takers)):
                continue
            links.add_edge(src, cat)
    order = {n: i for i, n in enumerate(graph.nodes)}
    groups: dict[fx.Node, GridGroup] = {}
    for component in nx.connected_components(links):
        cats = takers & component  # a member read by a cat of another group (another qconfig) is observed too
        observed = tuple(sorted((n for n in component if not reads_only_grid_takers(n, cats)), key=order.get))
        group = GridGroup(observed)
        groups.update(dict.fromkeys(component, group))
    return groups


def _float_tensors(inputs: Optional[list[Any]]) -> bool:
    """Whether every quantized operand (:func:`tensor_inputs`) is a node holding a float tensor (so it is observed)."""
    return inputs is not None and all(isinstance(t, fx.Node) and record(t).is_tensor for t in inputs)


@dataclasses.dataclass(frozen=True)
class ObservePass:
    """Insert observers where the table says (see module docstring)."""

    name: str = "observe"
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: QuantContext) -> PassResult:
        modules = modules_of(gm)
        before = len(modules)
        groups = grid_groups(gm.graph)
        for node in list(gm.graph.nodes):
            rec = record(node)
            if not rec.quantizable or is_observer_node(node, modules):
                continue
            entry = rec.entry
            inputs = tensor_inputs(node)
            if entry.observation is Observation.SHARES_INPUT:
                src = inputs[0] if inputs else None
                rec.observer = self._observer_of(src, modules) if isinstance(src, fx.Node) else None
                if rec.observer is None:
                    rec.float_reason = "its input is float, and it takes its qparams from its input"
                elif ctx.is_qat and entry.leaves_grid:
                    self._share_fake_quant(gm, node, rec, modules)
                continue
            if entry.is_dynamic:  # dynamic / weight-only: activations are quantized at run time, or never
                continue
            if entry.observation is Observation.NONE:
                continue
            if not _float_tensors(inputs):
                ctx.keep_float(node, entry.name, "an operand is not a float tensor (scalar or non-tensor operand)")
                continue
            unfit = [(k, what) for k, v, what in entry.fixed_args if node.kwargs.get(k, v) != v]
            if unfit:
                name, what = unfit[0]
                ctx.keep_float(node, entry.name, f"{name}={node.kwargs[name]!r} (the kernel computes {what})")
                continue
            for t in inputs:
                if self._observer_of(t, modules) is None:
                    self._insert(gm, t, rec.qconfig.activation(), modules)
            rec.observer = (self._observer_of(node, modules)
                            or self._observe_output(gm, node, rec, modules, ctx, groups.get(node)))
            self._attach_weight_fake_quant(node, rec, modules)
        recompile(gm)
        return PassResult(gm, len(modules) != before)

    def _observe_output(self, gm: fx.GraphModule, node: fx.Node, rec: NodeRecord, modules: dict[str, nn.Module],
                        ctx: QuantContext, group: Optional[GridGroup] = None) -> str:
        """A new observer for the output of an own-observed or fixed-qparams ``node``: its fixed one; its grid
        group's (:func:`grid_groups`, called on ``node``'s output if something outside the group reads it); else one
        of its qconfig, after its clamp (:func:`_clamp_after`) or after it."""
        if rec.entry.observation is Observation.FIXED:
            scale, zp = rec.entry.constraints.fixed_qparams
            return self._insert(gm, node, FakeQuantize(observer=FixedQParamsObserver, scale=scale, zero_point=zp)
                                if ctx.is_qat else FixedQParamsObserver(scale=scale, zero_point=zp), modules)
        if group is not None:
            if group.observer is None:
                group.observer = self._add(gm, group.observed, rec.qconfig.activation(), modules)
            if node in group.observed:
                self._call(gm, node, group.observer)
            return group.observer
        return self._insert(gm, _clamp_after(node, modules) or node, rec.qconfig.activation(), modules)

    def _share_fake_quant(self, gm: fx.GraphModule, node: fx.Node, rec: NodeRecord,
                          modules: dict[str, nn.Module]) -> None:
        """QAT: round the output of a grid-leaving shares-input op to its input's grid, as its kernel will."""
        source = modules.get(rec.observer or "")
        source = source.source if isinstance(source, SharedFakeQuantize) else source
        if isinstance(source, FakeQuantize) and not any(is_observer_node(u, modules) for u in node.users):
            self._insert(gm, node, SharedFakeQuantize(source), modules)

    @staticmethod
    def _attach_weight_fake_quant(node: fx.Node, rec: NodeRecord, modules: dict[str, nn.Module]) -> None:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, QATModule) and module.weight_fake_quant is None and rec.qconfig.weight is not None:
            module.set_weight_fake_quant(weight_observer(rec, module))
            module.weight_fake_quant.where = f"weight of node '{node.name}' ({type(module).__name__})"

    @staticmethod
    def _observer_of(t: fx.Node, modules: dict[str, nn.Module]) -> Optional[str]:
        if is_observer_node(t, modules):
            return str(t.target)
        rec = record(t)
        if rec.observer is not None:
            return rec.observer
        for user in t.users:
            if is_observer_node(user, modules):
                return str(user.target)
        return None

    @classmethod
    def _insert(cls, gm: fx.GraphModule, t: fx.Node, obs: nn.Module, modules: dict[str, nn.Module]) -> str:
        """Add the observer ``obs`` and call it on ``t``'s output, which all of ``t``'s users then read."""
        return cls._call(gm, t, cls._add(gm, (t,), obs, modules))

    @staticmethod
    def _add(gm: fx.GraphModule, observed: tuple[fx.Node, ...], obs: nn.Module, modules: dict[str, nn.Module]) -> str:
        """Add the observer ``obs`` of the outputs of ``observed`` (named after the first) and return its name."""
        name = f"{observed[0].name}_observer"
        i = 1
        while name in modules:
            name, i = f"{observed[0].name}_observer_{i}", i + 1
        obs.where = (f"output of node '{observed[0].name}'" if len(observed) == 1 else
                     "output of nodes " + ", ".join(f"'{n.name}'" for n in observed))
        gm.add_submodule(name, obs)
        modules[name] = obs
        return name

    @staticmethod
    def _call(gm: fx.GraphModule, t: fx.Node, name: str) -> str:
        """Call the observer ``name`` on ``t``'s output; all of ``t``'s users then read the observer's."""
        with gm.graph.inserting_after(t):
            obs_node = gm.graph.call_module(name, (t,))
        t.replace_all_uses_with(obs_node, delete_user_cb=lambda u: u is not obs_node)
        record(obs_node).is_tensor = True
        record(t).observer = name
        return name


def observer_qparams(gm: fx.GraphModule, modules: dict[str, nn.Module], then: str) -> dict[str, QParams]:
    """Each observer module's qparams, computed once (a grid group's observer is called on several nodes).

    Raises:
        ConvertError: listing every observer that saw no calibration data; ``then`` names the call to make after
            calibrating.
    """
    out: dict[str, QParams] = {}
    missing: list[str] = []
    for name in dict.fromkeys(str(n.target) for n in gm.graph.nodes if is_observer_node(n, modules)):
        try:
            out[name] = modules[name].qparams()
        except NoDataError:
            missing.append(f"'{name}' ({modules[name].where})")
    if missing:
        raise ConvertError(f"{len(missing)} observer(s) saw no calibration data: {', '.join(missing[:10])}"
                           f"{' ...' if len(missing) > 10 else ''}. Run representative inputs through the prepared "
                           f"model first, e.g. fxquant.calibrate(prepared, batches), then call {then}.")
    return out
