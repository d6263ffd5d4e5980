"""Pickling prepared and converted models with what fxquant knows about them.

``torch.save`` of a plain ``GraphModule`` keeps only its generated code and attributes; on load torch.fx
re-traces the code, so ``gm.meta`` (the :class:`~fxquant.api.QuantState`), the per-node records and forward
hooks (the engine check) are gone: a loaded prepared model could not be converted, and a loaded converted
model would run under any engine. :class:`QuantGraphModule` pickles them beside the code and puts them back.

Example:
    >>> import io, torch                                                     # doctest: +SKIP
    >>> buf = io.BytesIO(); torch.save(quantized, buf); buf.seek(0)           # doctest: +SKIP
    >>> torch.load(buf, weights_only=False).meta["fxquant_state"].stage       # doctest: +SKIP
    'converted'
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import fx

from fxquant.passes.context import RECORD_KEY, NodeRecord

__all__ = ["QuantGraphModule", "as_quant_graph_module"]


def _record_state(rec: NodeRecord) -> dict[str, Any]:
    state = {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)}
    state["entry"] = rec.entry.name if rec.entry is not None else None  # tables hold unpicklable functions
    return state


class QuantGraphModule(fx.GraphModule):
    """A GraphModule whose pickle carries fxquant's state, node records and forward pre-hooks."""

    def __reduce__(self) -> tuple[Any, ...]:
        fn, args = super().__reduce__()[:2]
        records = {n.name: _record_state(n.meta[RECORD_KEY]) for n in self.graph.nodes if RECORD_KEY in n.meta}
        hooks = list(self._forward_pre_hooks.values())
        order = [(n.name, n.op, str(n.target)) for n in self.graph.nodes]
        return (_rebuild, (fn, args, dict(self.meta), records, hooks, type(self).__name__, order))

    def __prepare_scriptable__(self) -> fx.GraphModule:
        """What ``torch.jit.script`` compiles: the same graph and submodules without the Python forward pre-hooks
        (the engine and input checks, which TorchScript cannot compile; a scripted model runs unchecked)."""
        graph = copy.deepcopy(self.graph)
        for node in graph.nodes:  # `from __future__ import annotations` leaves string annotations TorchScript can't read
            if node.op in ("placeholder", "output") and isinstance(node.type, str):
                node.type = torch.Tensor if node.type in ("torch.Tensor", "Tensor") else None
        out = fx.GraphModule(self, graph, class_name=type(self).__name__)
        out.training = self.training
        return out


def _original_names(gm: fx.GraphModule, order: Optional[list[tuple[str, str, str]]]) -> dict[fx.Node, str]:
    """Each re-traced node's name before pickling. Re-tracing renumbers names (a graph whose ``relu`` was
    fused away keeps a ``relu_1``, which comes back as ``relu``), so records are matched by position, where the
    re-traced graph has the same ops in the same order (it always should), else by name."""
    nodes = list(gm.graph.nodes)
    if order is not None and len(order) == len(nodes) and all(
            (n.op, str(n.target)) == (op, target) for n, (_, op, target) in zip(nodes, order)):
        return {n: name for n, (name, _, _) in zip(nodes, order)}
    return {n: n.name for n in nodes}


def _rebuild(fn: Callable[..., fx.GraphModule], args: tuple, meta: dict[str, Any], records: dict[str, dict],
             hooks: list[Any], class_name: str,
             order: Optional[list[tuple[str, str, str]]] = None) -> "QuantGraphModule":
    gm = fn(*args)
    for h in list(gm._forward_pre_hooks):
        del gm._forward_pre_hooks[h]
    out = as_quant_graph_module(gm, meta, class_name)
    backend = _backend_of(meta)
    names = _original_names(out, order)
    for node in out.graph.nodes:
        state = records.get(names[node])
        if state is None:
            continue
        entry_name = state.pop("entry")
        entry = backend.entry(entry_name) if backend is not None and entry_name is not None else None
        node.meta[RECORD_KEY] = NodeRecord(entry=entry, **state)
    for hook in hooks:
        out.register_forward_pre_hook(hook)
    return out


def _backend_of(meta: dict[str, Any]) -> Optional[Any]:
    state = next((v for v in meta.values() if hasattr(v, "backend")), None)
    return getattr(state, "backend", None)


def as_quant_graph_module(gm: fx.GraphModule, meta: Optional[dict[str, Any]] = None,
                          class_name: Optional[str] = None) -> QuantGraphModule:
    """``gm`` as a :class:`QuantGraphModule` (same submodules, graph, meta and hooks)."""
    if isinstance(gm, QuantGraphModule) and meta is None:
        return gm
    modes = {name: module.training for name, module in gm.named_modules()}  # before: submodules are shared
    out = QuantGraphModule(gm, gm.graph, class_name=class_name or type(gm).__name__)
    out.meta.update(gm.meta if meta is None else meta)
    for hook in gm._forward_pre_hooks.values():
        out.register_forward_pre_hook(hook)
    for name, module in out.named_modules():
        module.training = modes.get(name, module.training)  # flag by flag: .train() would recurse
    return out
