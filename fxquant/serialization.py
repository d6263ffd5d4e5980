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

import dataclasses
from typing import Any, Callable, Optional

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
        return (_rebuild, (fn, args, dict(self.meta), records, hooks, type(self).__name__))


def _rebuild(fn: Callable[..., fx.GraphModule], args: tuple, meta: dict[str, Any], records: dict[str, dict],
             hooks: list[Any], class_name: str) -> "QuantGraphModule":
    gm = fn(*args)
    for h in list(gm._forward_pre_hooks):
        del gm._forward_pre_hooks[h]
    out = as_quant_graph_module(gm, meta, class_name)
    backend = _backend_of(meta)
    for node in out.graph.nodes:
        state = records.get(node.name)
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
