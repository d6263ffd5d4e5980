"""Declarative patterns over FX graphs, matched with networkx's VF2 subgraph matcher.

A :class:`Pattern` is a small data-flow graph written in forward order: a tuple of :class:`Op` steps, each
naming what node it matches (an :class:`~fxquant.backends.config.OpKind`, so one step matches every
spelling: ``nn.ReLU()``, ``F.relu``, ``x.relu()``), which earlier steps feed which of its arguments, and an
optional per-node check; the whole pattern may carry an ``extra_check`` on the match. Patterns are built
three ways:

* ``Pattern.chain(CONV2D, BN2D, RELU)``: each step takes the previous one as its first argument;
* ``Pattern((Op(ADD, "add"), Op(RELU, "relu", args=("add",))))``: any DAG, steps referring to earlier names;
* ``Pattern.trace(lambda x, y: torch.relu(x + y))``: a small traced function (its placeholders match
  anything; each call becomes a step whose kind is found in fxquant's op vocabulary).

:func:`find` returns every :class:`Match` (steps -> graph nodes), in graph order. By default a match is
*private*: every step but the last is used only inside the match, so rewriting the match cannot change
what the rest of the graph sees. Fusion (``passes/fuse.py``) is written on this API, through the rewrite
driver in :mod:`fxquant.passes.rewrite`.

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> from fxquant.backends import ops
    >>> from fxquant.passes.matching import Pattern, find
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()))
    >>> [m.names() for m in find(gm, Pattern.chain(ops.CONV2D, ops.BN2D, ops.RELU))]
    [['_0', '_1', '_2']]
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import networkx as nx
from networkx.algorithms import isomorphism
from torch import fx, nn

from fxquant.backends.config import OpKind

__all__ = ["Op", "Pattern", "Match", "find", "to_networkx"]

#: a node predicate: ``(node, modules) -> bool`` (``modules`` maps qualified names to submodules)
NodeCheck = Callable[[fx.Node, Mapping[str, nn.Module]], bool]


@dataclasses.dataclass(frozen=True)
class Op:
    """One step of a pattern.

    Attributes:
        kind: what the node is: an :class:`OpKind`, or a predicate ``(node, modules) -> bool``.
        name: the step's name in the :class:`Match` (default: its position, ``"0"``, ``"1"``, ...).
        args: for each argument position, the name of the earlier step that must feed it, or ``None``
            for "anything" (``("conv",)``: the first argument is the node matched by step ``conv``).
        check: an extra predicate ``(node, modules) -> bool`` on this node (``F.hardtanh`` bounds, ...).
    """

    kind: Union[OpKind, NodeCheck]
    name: str = ""
    args: tuple[Optional[str], ...] = ()
    check: Optional[NodeCheck] = None

    def matches(self, node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
        """Whether ``node`` is this step (kind and check; the wiring is the matcher's job)."""
        if node.op in ("placeholder", "output", "get_attr"):
            return False
        hit = self.kind.matches(node, modules) if isinstance(self.kind, OpKind) else self.kind(node, modules)
        return bool(hit) and (self.check is None or bool(self.check(node, modules)))


@dataclasses.dataclass(frozen=True)
class Match:
    """One occurrence of a pattern: its nodes in pattern order, addressable by step name."""

    pattern: "Pattern"
    nodes: tuple[fx.Node, ...]

    def __getitem__(self, name: str) -> fx.Node:
        return self.nodes[self.pattern.index(name)]

    @property
    def output(self) -> fx.Node:
        """The node that produces the match's result (the last step)."""
        return self.nodes[-1]

    def names(self) -> list[str]:
        """The matched nodes' names, in pattern order."""
        return [n.name for n in self.nodes]


#: a whole-match predicate: ``(match, modules) -> bool``
MatchCheck = Callable[[Match, Mapping[str, nn.Module]], bool]


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A forward-order pattern (see the module docstring).

    Attributes:
        ops: the steps, each after the steps that feed it; the last one is the match's output.
        extra_check: a predicate on the whole match, run after the structure matched.
        private: every step but the last must have no user outside the match (on by default).
    """

    ops: tuple[Op, ...]
    extra_check: Optional[MatchCheck] = None
    private: bool = True

    def __post_init__(self) -> None:
        if not self.ops:
            raise ValueError("a pattern needs at least one step")
        named = tuple(dataclasses.replace(op, name=op.name or str(i)) for i, op in enumerate(self.ops))
        object.__setattr__(self, "ops", named)
        seen: set[str] = set()
        for op in named:
            missing = [a for a in op.args if a is not None and a not in seen]
            if missing:
                raise ValueError(f"pattern step '{op.name}' reads {missing}, which no earlier step defines "
                                 "(write the steps in forward order)")
            if op.name in seen:
                raise ValueError(f"two pattern steps are named '{op.name}'")
            seen.add(op.name)

    @classmethod
    def chain(cls, *kinds: Union[OpKind, Op], extra_check: Optional[MatchCheck] = None) -> "Pattern":
        """``kinds[0] -> kinds[1] -> ...``, each step fed by the previous one as its first argument."""
        ops: list[Op] = []
        for i, k in enumerate(kinds):
            op = k if isinstance(k, Op) else Op(k)
            name = op.name or str(i)
            ops.append(dataclasses.replace(op, name=name, args=(ops[-1].name,) if ops else op.args))
        return cls(tuple(ops), extra_check)

    @classmethod
    def trace(cls, fn: Union[Callable[..., Any], nn.Module], extra_check: Optional[MatchCheck] = None,
              vocabulary: Sequence[OpKind] = ()) -> "Pattern":
        """The pattern of a small function or module, traced with torch.fx (see :func:`_from_graph`)."""
        gm = fn if isinstance(fn, fx.GraphModule) else fx.symbolic_trace(fn)
        return cls(_from_graph(gm, tuple(vocabulary) or _vocabulary()), extra_check)

    def index(self, name: str) -> int:
        for i, op in enumerate(self.ops):
            if op.name == name:
                return i
        raise KeyError(f"the pattern has no step '{name}'; steps: {[op.name for op in self.ops]}")

    def to_networkx(self) -> nx.DiGraph:
        """The pattern as a DiGraph (step index -> step index, edge attribute ``arg``: the argument position)."""
        g = nx.DiGraph()
        for i, op in enumerate(self.ops):
            g.add_node(i, op=op)
            for pos, src in enumerate(op.args):
                if src is not None:
                    g.add_edge(self.index(src), i, arg=pos)
        return g


def _vocabulary() -> tuple[OpKind, ...]:
    from fxquant.backends import ops

    return tuple(v for v in vars(ops).values() if isinstance(v, OpKind))


def _kind_of(node: fx.Node, gm: fx.GraphModule, vocabulary: Sequence[OpKind]) -> OpKind:
    """The vocabulary kind of a traced pattern node (all its spellings), or one matching the exact target."""
    modules = dict(gm.named_modules())
    for kind in vocabulary:
        if kind.matches(node, modules):
            return kind
    if node.op == "call_module":
        return OpKind(type(modules[str(node.target)]).__name__, modules=(type(modules[str(node.target)]),))
    if node.op == "call_function":
        return OpKind(getattr(node.target, "__name__", str(node.target)), functions=(node.target,))
    return OpKind(str(node.target), methods=(str(node.target),))


def _from_graph(gm: fx.GraphModule, vocabulary: Sequence[OpKind]) -> tuple[Op, ...]:
    """Steps of a traced pattern: each call node becomes a step (placeholders and constants match anything);
    the step is named after the node. A pattern function must return the value of its last call."""
    calls = [n for n in gm.graph.nodes if n.op.startswith("call")]
    if not calls:
        raise ValueError("a traced pattern needs at least one call (an op, a method or a submodule)")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if out.args[0] is not calls[-1]:
        raise ValueError("a traced pattern must return the result of its last op")
    names = {n: n.name for n in calls}
    return tuple(Op(_kind_of(n, gm, vocabulary), n.name,
                    tuple(names.get(a) if isinstance(a, fx.Node) else None for a in n.args)) for n in calls)


def to_networkx(graph: fx.Graph, keep: Optional[Callable[[fx.Node], bool]] = None) -> nx.DiGraph:
    """The data-flow graph of ``graph`` (node -> its users; edge attribute ``args``: the argument positions
    at which the source feeds the user). ``keep`` restricts it to the nodes it accepts."""
    g = nx.DiGraph()
    for node in graph.nodes:
        if keep is not None and not keep(node):
            continue
        g.add_node(node, fx=node)
        for pos, arg in enumerate(node.args):
            for inp in _nodes_in(arg):
                if keep is None or keep(inp):
                    g.add_edge(inp, node)
                    g.edges[inp, node].setdefault("args", set()).add(pos)
        for arg in node.kwargs.values():
            for inp in _nodes_in(arg):
                if keep is None or keep(inp):
                    g.add_edge(inp, node)
                    g.edges[inp, node].setdefault("args", set())
    return g


def _nodes_in(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, lambda n: found.append(n) or n)
    return found


def _private(nodes: Sequence[fx.Node]) -> bool:
    inside = set(nodes)
    return all(set(n.users) <= inside for n in nodes[:-1])


def _pieces(data: nx.DiGraph, wanted: nx.DiGraph) -> list[nx.DiGraph]:
    """The weakly connected pieces of ``data`` big enough to hold a match of the connected pattern ``wanted``
    (all of ``data`` if the pattern is not connected). VF2 on the whole candidate graph tries every node again at
    each dead end (a candidate whose successor is not a candidate), which is quadratic on deep models."""
    if not nx.is_weakly_connected(wanted):
        return [data]
    return [data.subgraph(c) for c in nx.weakly_connected_components(data) if len(c) >= len(wanted)]


def find(gm: fx.GraphModule, pattern: Pattern, modules: Optional[Mapping[str, nn.Module]] = None) -> list[Match]:
    """Every match of ``pattern`` in ``gm``, ordered by the graph position of its output node.

    Args:
        gm: the graph module to search.
        pattern: the pattern.
        modules: qualified name -> submodule (default: ``dict(gm.named_modules())``).

    Returns:
        The matches; they may overlap (a rewrite driver skips nodes an earlier rewrite consumed).
    """
    modules = dict(gm.named_modules()) if modules is None else modules
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    candidates = {n for n in gm.graph.nodes if any(op.matches(n, modules) for op in pattern.ops)}
    if len(pattern.ops) == 1:
        mappings: Iterator[dict[Any, int]] = ({n: 0} for n in candidates if pattern.ops[0].matches(n, modules))
    else:
        data, wanted = to_networkx(gm.graph, keep=candidates.__contains__), pattern.to_networkx()
        mappings = itertools.chain.from_iterable(
            isomorphism.DiGraphMatcher(part, wanted, node_match=lambda a, b: b["op"].matches(a["fx"], modules),
                                       edge_match=lambda a, b: b["arg"] in a["args"]).subgraph_monomorphisms_iter()
            for part in _pieces(data, wanted))
    matches: dict[tuple[fx.Node, ...], Match] = {}
    for mapping in mappings:
        nodes = tuple(n for n, _ in sorted(mapping.items(), key=operator.itemgetter(1)))
        if nodes in matches or (pattern.private and not _private(nodes)):
            continue
        m = Match(pattern, nodes)
        if pattern.extra_check is None or pattern.extra_check(m, modules):
            matches[nodes] = m
    return sorted(matches.values(), key=lambda m: order[m.output])

