"""Fusion pass: rewrite each multi-op pattern of the backend table into its fused op.

Contract:
    * input: a traced float GraphModule in eval mode;
    * output: the same function (batch norm folded, op+ReLU grouped), with fewer nodes; every fused node
      records the op types it replaced in ``NodeRecord.fused_from``;
    * patterns come only from the backend table (``OpEntry.patterns`` with more than one op), longest first,
      each a :class:`~fxquant.passes.matching.Pattern` chain applied by the rewrite driver
      (:mod:`fxquant.passes.rewrite`), so the built-in fusion is written on the same API as a user's;
    * quantization-aware training (``ctx.is_qat``, the model may be in train mode): the entry's ``qat_fuser``
      builds the node's module instead of ``fuser`` (no batch norm is folded: QAT modules simulate the fold),
      and after the multi-op patterns the single-module patterns of entries with a ``qat_fuser`` swap each
      remaining conv / linear for its QAT module; entries without a ``qat_fuser`` are left unfused;
    * idempotent: a second run finds nothing to fuse (matches are fused until none is left, so a fused node that
      starts a new match, conv -> bn -> bn, is fused again in the same run).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections import Counter
from typing import Any, ClassVar, Mapping, Optional

from torch import fx, nn

from fxquant.backends.config import OpEntry
from fxquant.fused import materialize_tied_folds
from fxquant.passes.base import PassResult
from fxquant.passes.context import RECORD_KEY, QuantContext, attribute_owner, record
from fxquant.passes.matching import Match, Pattern
from fxquant.passes.rewrite import Rewrite, rewrite

__all__ = ["FusePass", "fusion_rules"]


def _set_module(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


#: graph -> (the ``modules`` mapping of the find() call it was counted for, call sites per module target, the
#: modules whose attributes a ``get_attr`` node reads)
_CALL_SITES: "weakref.WeakKeyDictionary[fx.Graph, tuple[Mapping[str, nn.Module], Counter[str], set[str]]]" = \
    weakref.WeakKeyDictionary()


def _call_sites(graph: fx.Graph, modules: Mapping[str, nn.Module]) -> tuple[Counter[str], set[str]]:
    """How many nodes call each module, and which modules' attributes the forward reads (``self.conv.bias``),
    counted once per ``find`` call (which builds a fresh ``modules`` and does not change the graph), instead of
    scanning the whole graph for every match (quadratic on deep models)."""
    cached = _CALL_SITES.get(graph)
    if cached is None or cached[0] is not modules:
        calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
        read = {attribute_owner(n) for n in graph.nodes if n.op == "get_attr"}
        cached = (modules, calls, read)
        _CALL_SITES[graph] = cached
    return cached[1], cached[2]


def _no_shared_state(match: Match, modules: Mapping[str, nn.Module], reads_count: bool = True) -> bool:
    """A module with parameters or buffers called from several places cannot be fused at one of them, nor (with
    ``reads_count``, post-training fusion) one whose parameters the forward also reads directly
    (``self.conv.weight``): fusion would change what that read sees (a folded weight) or remove it (the fused
    module holds the conv as ``.op``). QAT modules keep the conv's own weight and bias, so a read still means them."""
    for node in match.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        module = modules[target]
        stateful = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
        calls, read = _call_sites(node.graph, modules)
        if stateful and (calls[target] > 1 or (reads_count and target in read)):
            return False
    return True


def _op_type(node: fx.Node, modules: Mapping[str, nn.Module]) -> Any:
    return type(modules[str(node.target)]) if node.op == "call_module" else node.target


@dataclasses.dataclass(frozen=True)
class _FuseInto:
    """The replacement of one table entry: build the entry's fused op from a match (see module docstring)."""

    entry: OpEntry

    def __call__(self, gm: fx.GraphModule, match: Match, ctx: QuantContext) -> Optional[fx.Node]:
        nodes = match.nodes  # look up only the matched modules: dict(gm.named_modules()) per match is quadratic
        modules = {str(n.target): gm.get_submodule(str(n.target)) for n in nodes if n.op == "call_module"}
        first, last = nodes[0], nodes[-1]
        earlier = first.meta[RECORD_KEY].fused_from if RECORD_KEY in first.meta else ()  # fused in an earlier round
        fused_from = (earlier or (_op_type(first, modules),)) + tuple(_op_type(n, modules) for n in nodes[1:])
        if first.op == "call_module":
            fuser = self.entry.qat_fuser if ctx.is_qat else self.entry.fuser
            if fuser is None:
                return None
            mods: list[Optional[nn.Module]] = [modules[str(n.target)] if n.op == "call_module" else None
                                               for n in nodes]
            if not ctx.is_qat and any(m is not None and m.training for m in mods):
                return None
            _set_module(gm, str(first.target), fuser(mods))
            new = first
        else:
            if first.kwargs or len(first.args) != 2 or not self.entry.op.functions:
                return None
            with gm.graph.inserting_after(last):
                new = gm.graph.call_function(self.entry.op.functions[0], first.args)
            new.meta = {k: v for k, v in first.meta.items() if k != RECORD_KEY}
        record(new).fused_from = fused_from
        return new


def fusion_rules(ctx: QuantContext) -> tuple[Rewrite, ...]:
    """The table's fusions as rewrite rules, in matching order: multi-op patterns longest first, then (QAT
    only) the single-module swaps (a lone conv becomes its QAT module)."""
    order = [(p, e) for e in ctx.backend.fusion_entries() for p in sorted(e.patterns, key=len, reverse=True)
             if len(p) > 1]
    if ctx.is_qat:
        order += [(p, e) for e in ctx.backend.entries if e.qat_fuser is not None for p in e.patterns
                  if len(p) == 1 and p[0].modules]
    check = functools.partial(_no_shared_state, reads_count=not ctx.is_qat)
    return tuple(Rewrite(Pattern.chain(*p, extra_check=check), _FuseInto(e)) for p, e in order)


@dataclasses.dataclass(frozen=True)
class FusePass:
    """Fuse conv/linear + bn (+ relu), bn + relu, add/mul + relu, as the backend table says."""

    name: str = "fuse"
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: QuantContext) -> PassResult:
        try:
            modified = rewrite(gm, fusion_rules(ctx), ctx)
        finally:  # the count's ``modules`` holds every module fusion replaced: the prepared model must not keep them
            _CALL_SITES.pop(gm.graph, None)
        materialize_tied_folds(gm)
        return PassResult(gm, modified)
