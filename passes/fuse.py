"""Fusion pass: rewrite each multi-op pattern of the backend table into its fused op.

Contract:
    * input: a traced float GraphModule in eval mode;
    * output: the same function (batch norm folded, op+ReLU grouped), with fewer nodes; every fused node
      records the op types it replaced in ``NodeRecord.fused_from``;
    * patterns come only from the backend table (``OpEntry.patterns`` with more than one op), longest first;
    * quantization-aware training (``ctx.is_qat``, the model may be in train mode): the entry's ``qat_fuser``
      builds the node's module instead of ``fuser`` (no batch norm is folded: QAT modules simulate the fold),
      and after the multi-op patterns the single-module patterns of entries with a ``qat_fuser`` swap each
      remaining conv / linear for its QAT module; entries without a ``qat_fuser`` are left unfused;
    * idempotent: a second run finds nothing to fuse (matches are fused until none is left, so a fused node that
      starts a new match, conv -> bn -> bn, is fused again in the same run).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Optional

from torch import fx, nn

from fxquant.backends.config import OpEntry, OpKind
from fxquant.passes.base import PassResult
from fxquant.passes.context import RECORD_KEY, QuantContext, modules_of, record
from fxquant.passes.matching import match_chains, to_networkx

__all__ = ["FusePass"]


def _set_module(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def _shared_stateful(node: fx.Node, modules: dict[str, nn.Module], uses: Counter) -> bool:
    """A module with parameters or buffers called from several places cannot be fused at one of them."""
    if node.op != "call_module" or uses[str(node.target)] < 2:
        return False
    module = modules[str(node.target)]
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _op_type(node: fx.Node, modules: dict[str, nn.Module]) -> Any:
    return type(modules[str(node.target)]) if node.op == "call_module" else node.target


def _delete_consumed(gm: fx.GraphModule, targets: list[str]) -> None:
    """Remove the modules a fusion consumed, unless another node still calls them.

    ``delete_all_unused_submodules`` cannot be relied on for this: a QAT module holds the batch norm it
    fused (the same object), and ``named_modules`` reports a shared module under one name only, so the old
    name would survive, and ``model.train()`` would reach the batch norm through it (unfreezing it).
    """
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for target in targets:
        if target not in called:
            gm.delete_submodule(target)


def _patterns(ctx: QuantContext) -> list[tuple[tuple[OpKind, ...], OpEntry]]:
    """(pattern, entry) in matching order: multi-op patterns longest first, then (QAT only) single-module swaps."""
    order = [(p, e) for e in ctx.backend.fusion_entries() for p in sorted(e.patterns, key=len, reverse=True)
             if len(p) > 1]
    if ctx.is_qat:
        order += [(p, e) for e in ctx.backend.entries if e.qat_fuser is not None for p in e.patterns
                  if len(p) == 1 and p[0].modules]
    return order


@dataclasses.dataclass(frozen=True)
class FusePass:
    """Fuse conv/linear + bn (+ relu), bn + relu, add/mul + relu, as the backend table says."""

    name: str = "fuse"

    def run(self, gm: fx.GraphModule, ctx: QuantContext) -> PassResult:
        modified = False
        while self._fuse_round(gm, ctx):  # a fused node can start a new match: conv -> bn -> bn folds both
            modified = True
            gm.graph.eliminate_dead_code()  # and so can a dead user dropped now (a chain is private only without it)
        if modified:
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(gm, modified)

    def _fuse_round(self, gm: fx.GraphModule, ctx: QuantContext) -> bool:
        """Fuse every match of every pattern once; whether anything was fused."""
        modules = modules_of(gm)
        uses = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
        consumed: set[fx.Node] = set()
        modified = False
        for pattern, entry in _patterns(ctx):
            g = to_networkx(gm.graph)
            for nodes in list(match_chains(g, pattern, modules)):
                if consumed.intersection(nodes) or any(_shared_stateful(n, modules, uses) for n in nodes):
                    continue
                if self._fuse(gm, entry, nodes, modules, ctx.is_qat):
                    consumed.update(nodes)
                    modified = True
        return modified

    @staticmethod
    def _fuse(gm: fx.GraphModule, entry: OpEntry, nodes: list[fx.Node], modules: dict[str, nn.Module],
              is_qat: bool) -> bool:
        first, last = nodes[0], nodes[-1]
        earlier = first.meta[RECORD_KEY].fused_from if RECORD_KEY in first.meta else ()  # fused in an earlier round
        fused_from = (earlier or (_op_type(first, modules),)) + tuple(_op_type(n, modules) for n in nodes[1:])
        if first.op == "call_module":
            fuser = entry.qat_fuser if is_qat else entry.fuser
            if fuser is None:
                return False
            mods: list[Optional[nn.Module]] = [modules[str(n.target)] if n.op == "call_module" else None
                                               for n in nodes]
            if not is_qat and any(m is not None and m.training for m in mods):
                return False
            _set_module(gm, str(first.target), fuser(mods))
            new = first
        else:
            if first.kwargs or len(first.args) != 2 or not entry.op.functions:
                return False
            with gm.graph.inserting_after(last):
                new = gm.graph.call_function(entry.op.functions[0], first.args)
            new.meta = {k: v for k, v in first.meta.items() if k != RECORD_KEY}
        last.replace_all_uses_with(new)
        for n in reversed(nodes):
            if n is not new:
                gm.graph.erase_node(n)
        _delete_consumed(gm, [str(n.target) for n in nodes[1:] if n.op == "call_module"])
        rec = record(new)
        rec.fused_from = fused_from
        return True
