"""The rewrite driver: apply pattern -> replacement rules until none applies.

A :class:`Rewrite` pairs a :class:`~fxquant.passes.matching.Pattern` with a ``replace(gm, match, ctx)``
function that does one local thing: build (or reuse) the node that computes the match's result and return
it, or return ``None`` to decline this match. The driver owns the traversal: it finds the matches, skips
nodes an earlier rewrite of the same round consumed, rewires the users of the match's output to the new
node, erases the matched nodes nothing uses any more (and the submodules only they called), and repeats
rounds until nothing changes (a rewritten node can start a new match: conv -> bn -> bn folds both).
:class:`RewritePass` wraps rules as a pass; the built-in fusion is one (``passes/fuse.py``).

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> from fxquant.backends import ops
    >>> from fxquant.passes.matching import Pattern
    >>> from fxquant.passes.rewrite import Rewrite, RewritePass
    >>> def relu_relu(gm, match, ctx):  # relu(relu(x)) == relu(x): keep the first
    ...     return match["0"]
    >>> rule = Rewrite(Pattern.chain(ops.RELU, ops.RELU), relu_relu)
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.ReLU(), nn.ReLU()))
    >>> RewritePass("relu_relu", (rule,)).run(gm, None).modified, len(gm.graph.nodes)
    (True, 3)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional, Sequence

from torch import fx, nn

from fxquant.passes.base import PassResult, recompile
from fxquant.passes.matching import Match, Pattern, find

__all__ = ["Rewrite", "RewritePass", "rewrite"]

#: ``(gm, match, ctx) -> node computing the match's result`` (``None``: leave this match alone)
Replacement = Callable[[fx.GraphModule, Match, Any], Optional[fx.Node]]


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One rule: where ``pattern`` matches, ``replace`` builds the node that takes the match's place."""

    pattern: Pattern
    replace: Replacement


def _erase_match(gm: fx.GraphModule, match: Match, keep: fx.Node) -> list[str]:
    """Erase the matched nodes nothing uses any more; the targets of the call_module nodes it erased."""
    targets = []
    for node in reversed(match.nodes):
        if node is not keep and not node.users:
            if node.op == "call_module":
                targets.append(str(node.target))
            gm.graph.erase_node(node)
    return targets


def _delete_uncalled(gm: fx.GraphModule, targets: list[str]) -> None:
    """Delete the submodules among ``targets`` that no remaining node calls (once per round: a scan of the
    graph per match would make fusion quadratic in the model's depth).

    ``delete_all_unused_submodules`` cannot be relied on for the modules: a QAT module holds the batch norm
    it fused (the same object), and ``named_modules`` reports a shared module under one name only, so the old
    name would survive (and ``model.train()`` would reach the batch norm through it).
    """
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for target in dict.fromkeys(targets):
        if target not in called:
            gm.delete_submodule(target)


def _round(gm: fx.GraphModule, rules: Sequence[Rewrite], ctx: Any) -> bool:
    """Apply every rule once to every match that is still intact; whether anything changed."""
    consumed: set[fx.Node] = set()
    erased: list[str] = []
    modified = False
    modules: Optional[dict[str, nn.Module]] = None  # rebuilt only after a rule has changed the model
    for rule in rules:
        if modules is None:
            modules = dict(gm.named_modules())
        for match in find(gm, rule.pattern, modules):
            if consumed.intersection(match.nodes):
                continue
            new = rule.replace(gm, match, ctx)
            if new is None:
                continue
            if new is not match.output:
                match.output.replace_all_uses_with(new)
            erased += _erase_match(gm, match, new)
            consumed.update(match.nodes)
            consumed.add(new)
            modified, modules = True, None
    _delete_uncalled(gm, erased)
    return modified


def rewrite(gm: fx.GraphModule, rules: Sequence[Rewrite], ctx: Any = None, max_rounds: int = 100) -> bool:
    """Apply ``rules`` (in order, each round) until a round changes nothing; whether anything changed.

    Dead nodes are dropped between rounds: a chain made non-private only by a dead user is rewritten in the
    same call, and a second call finds nothing.
    """
    modified = False
    for _ in range(max_rounds):
        if not _round(gm, rules, ctx):
            break
        modified = True
        gm.graph.eliminate_dead_code()
    else:
        raise RuntimeError(f"rewrites did not settle in {max_rounds} rounds (a rule re-creates its own pattern?)")
    if modified:
        gm.delete_all_unused_submodules()
        recompile(gm)
    return modified


@dataclasses.dataclass(frozen=True)
class RewritePass:
    """A pass made of rewrite rules (applied until none applies).

    Attributes:
        name: the pass name (for ordering constraints, print-after and timings).
        rules: the rules, in priority order (within a round an earlier rule's match wins).
    """

    name: str
    rules: tuple[Rewrite, ...]
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: Any) -> PassResult:
        return PassResult(gm, rewrite(gm, self.rules, ctx))
