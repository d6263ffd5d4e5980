"""Annotation pass: give every node its table entry and qconfig, or the reason it stays float.

Contract:
    * input: a fused float GraphModule and the context's example inputs and QConfigMapping;
    * output: the graph unchanged; every node's :class:`NodeRecord` has ``module_name``, ``entry``,
      ``qconfig``, ``is_tensor`` and possibly ``float_reason``;
    * a qconfig that the backend table forbids for a node raises :class:`QConfigError` naming the node
      and the rule (never silently ignored);
    * a dynamic or weight-only qconfig gets one of the table's dynamic entries (:mod:`fxquant.passes.dynamic`);
      with ``example_inputs=None`` (dynamic-only quantization) shapes are not propagated;
    * idempotent.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections import Counter
from typing import Any, ClassVar, Optional

import torch
from torch import fx, nn

from fxquant.backends.config import Observation, OpEntry
from fxquant.backends.kernels import get_kernels
from fxquant.errors import FxQuantError, QConfigError
from fxquant.fused import float_type
from fxquant.observers import probe
from fxquant.passes.base import PassResult
from fxquant.passes.context import QuantContext, modules_of, record
from fxquant.passes.dynamic import dynamic_request, select_dynamic_entry
from fxquant.passes.shapes import ShapePropagationError, propagate_shapes
from fxquant.qparams import dtype_range

__all__ = ["AnnotatePass", "check_qconfig"]


def _is_float_tensor(meta: Any) -> bool:
    """Whether the ``tensor_meta`` of :func:`propagate_shapes` describes one floating-point tensor (tuples of tensors: no)."""
    dtype = getattr(meta, "dtype", None)
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _scope(node: fx.Node) -> tuple[str, Optional[type]]:
    if node.op == "call_module":
        return str(node.target), None
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", None
    name, cls = list(stack.values())[-1]
    return name, cls


def _object_type(node: fx.Node, modules: dict[str, nn.Module]) -> Any:
    rec = record(node)
    if rec.fused_from:
        return rec.fused_from[0]
    return type(modules[str(node.target)]) if node.op == "call_module" else node.target


def check_qconfig(node: fx.Node, entry: OpEntry, qconfig: Any, backend_name: str) -> None:
    """Raise :class:`QConfigError` if ``qconfig`` breaks a rule of ``entry`` (dtype, scheme, ranges)."""
    where = f"node '{node.name}' ({entry.name}) on backend '{backend_name}'"
    act = probe(qconfig.activation) if qconfig.activation is not None else None
    limits = entry.constraints
    if act is not None and entry.observation is Observation.OWN and not getattr(act, "is_dynamic", False):
        dtype = getattr(act, "dtype", None)
        allowed = {d.output for d in entry.static_dtypes}
        if dtype not in allowed:
            raise QConfigError(f"{where}: activation dtype {dtype} is not supported; the kernel takes "
                               f"{sorted(map(str, allowed))}. Use an observer with dtype=torch.quint8.")
        if limits.min_scale is not None and getattr(act, "eps", 0.0) < limits.min_scale:
            raise QConfigError(f"{where}: activation scales must be >= {limits.min_scale:g} for this kernel, but the "
                               f"observer's eps is {getattr(act, 'eps', 0.0):g}; build it with "
                               f"eps={limits.min_scale:g} (get_default_qconfig_mapping('{backend_name}') does).")
    if entry.weight is None or qconfig.weight is None:
        return
    w = probe(qconfig.weight)
    if getattr(w, "dtype", None) != entry.weight.dtype:
        raise QConfigError(f"{where}: weight dtype {getattr(w, 'dtype', None)} is not supported; use {entry.weight.dtype}.")
    if getattr(w, "qscheme", None) not in entry.weight.qschemes:
        raise QConfigError(f"{where}: weight qscheme {getattr(w, 'qscheme', None)} is not supported; the kernel "
                           f"accepts {[str(s) for s in entry.weight.qschemes]}.")
    if limits.weight_range is not None:
        lo, hi = dtype_range(w.dtype, getattr(w, "reduce_range", False), getattr(w, "quant_min", None),
                             getattr(w, "quant_max", None))
        if lo < limits.weight_range[0] or hi > limits.weight_range[1]:
            raise QConfigError(f"{where}: weights must stay in {list(limits.weight_range)} but the weight observer "
                               f"allows [{lo}, {hi}]; build it with quant_min={limits.weight_range[0]}, "
                               f"quant_max={limits.weight_range[1]}.")
    if limits.weight_min_scale is not None and getattr(w, "eps", 0.0) < limits.weight_min_scale:
        raise QConfigError(f"{where}: weight scales must be >= {limits.weight_min_scale:g}; build the weight observer "
                           f"with eps={limits.weight_min_scale:g}.")


def _depthwise_reason(entry: OpEntry, module: Optional[nn.Module], backend: str) -> Optional[str]:
    multiple = entry.constraints.depthwise_channel_multiple
    conv = getattr(module, "op", module)
    if multiple is None or not isinstance(conv, nn.Conv2d):
        return None
    if conv.groups > 1 and conv.groups == conv.in_channels and conv.in_channels % multiple:
        return (f"depthwise conv with {conv.in_channels} channels (not a multiple of {multiple}) leaves {backend}'s "
                "fast path and runs slower in int8 than in float")
    return None


@dataclasses.dataclass(frozen=True)
class AnnotatePass:
    """Resolve entry + qconfig per node (see module docstring)."""

    name: str = "annotate"
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: QuantContext) -> PassResult:
        if ctx.example_inputs is not None:  # None: dynamic-only quantization, which needs no shapes
            try:
                propagate_shapes(gm, ctx.example_inputs)
            except ShapePropagationError as exc:
                cause = exc.cause
                raise FxQuantError(f"the model fails on example_inputs at node '{exc.node}' ({type(cause).__name__}: "
                                   f"{cause}); pass inputs of the shape and dtype the model takes, as a tuple of "
                                   "positional arguments") from cause
        modules = modules_of(gm)
        kernels = get_kernels(ctx.backend)
        order: Counter = Counter()
        ctx.float_reasons.clear()
        for node in gm.graph.nodes:
            rec = record(node)
            rec.entry, rec.qconfig, rec.float_reason = None, None, None
            meta = node.meta.get("tensor_meta")
            rec.is_tensor = _is_float_tensor(meta)
            rec.is_tensor_tuple = isinstance(meta, (list, tuple)) and not rec.is_tensor and bool(meta) and all(
                _is_float_tensor(m) for m in meta)
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            module_name, scope_type = _scope(node)
            module_name = ctx.user_name(module_name)
            obj = _object_type(node, modules)
            order_index = None
            if node.op != "call_method":
                parent = module_name.rpartition(".")[0] if node.op == "call_module" else module_name
                order_index = order[(parent, obj)]
                order[(parent, obj)] += 1
            rec.module_name = module_name
            rec.qconfig = ctx.qconfig_mapping.qconfig_for(module_name, obj, order_index, scope_type=scope_type)
            rec.entry = ctx.backend.entry_for(node, modules)
            if not self._check_dynamic(node, rec, modules, kernels, ctx):
                self._check(node, rec, modules, kernels, ctx)
        if ctx.scope is None:  # a piece of a partially traced model sees only its own modules
            self._warn_unused_names(ctx, modules)
        return PassResult(gm, False)

    @staticmethod
    def _check_dynamic(node: fx.Node, rec: Any, modules: dict[str, nn.Module], kernels: Any,
                       ctx: QuantContext) -> bool:
        """The dynamic / weight-only branch (see :mod:`fxquant.passes.dynamic`): a dynamic qconfig on a module
        with dynamic entries gets one of them, checked like a static one; returns whether it took the node."""
        request = dynamic_request(rec.qconfig)
        if request is None or node.op != "call_module":
            return False
        module = modules[str(node.target)]
        entry, reason = select_dynamic_entry(ctx.backend, float_type(module), request)
        if entry is None:  # no dynamic kernel for this op: its static entry, if any, says why it stays float
            return False
        rec.entry = entry
        if reason is None:
            check_qconfig(node, entry, rec.qconfig, ctx.backend.name)
            reason = kernels.supports(entry.lowering, module)
        if reason is not None:
            ctx.keep_float(node, entry.name, reason)
        return True

    @staticmethod
    def _check(node: fx.Node, rec: Any, modules: dict[str, nn.Module], kernels: Any, ctx: QuantContext) -> None:
        entry = rec.entry
        if entry is None or rec.qconfig is None:
            return
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        tuple_ok = rec.is_tensor_tuple and entry.observation is Observation.SHARES_INPUT and all(
            u.op == "call_function" and u.target is operator.getitem for u in node.users)
        if entry.observation is Observation.NONE:
            return
        if not rec.is_tensor and not tuple_ok:
            rec.float_reason = "output is not a floating-point tensor"
            return
        check_qconfig(node, entry, rec.qconfig, ctx.backend.name)
        reason = _depthwise_reason(entry, module, ctx.backend.name)
        if reason is None and entry.lowering is not None:
            reason = kernels.supports(entry.lowering, module)
        if reason is None and entry.observation is Observation.OWN:
            act = probe(rec.qconfig.activation) if rec.qconfig.activation is not None else None
            if act is None or getattr(act, "is_dynamic", False) or getattr(act, "dtype", None) == torch.float16:
                reason = "qconfig asks for dynamic/float16 activations; static kernels need a static quint8 qconfig"
        if reason is not None:
            ctx.keep_float(node, entry.name, reason)

    @staticmethod
    def _warn_unused_names(ctx: QuantContext, modules: dict[str, nn.Module]) -> None:
        names = set(modules)
        for key in sorted(ctx.qconfig_mapping.names()):
            if key in names or any(re.match(key, n) for n in names if _looks_like_regex(key)):
                continue
            ctx.warnings.append(f"QConfigMapping names '{key}', which matches no module of the model "
                                f"(modules include {sorted(n for n in names if n)[:5]}...); check the spelling")


def _looks_like_regex(key: str) -> bool:
    return any(c in key for c in "*+?[]()|^$\\")
