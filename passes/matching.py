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

A step's kind may also be any predicate ``(node, modules) -> bool``; :class:`Entry` is the one for graphs after
the ``annotate`` pass: it matches the nodes annotated with a given table entry, whatever their spelling. A pattern
on an observed graph names the identity nodes it looks through (``through=``, e.g. observers): ``conv -> observer
-> add`` then matches ``conv -> add``.

:func:`find` returns every :class:`Match` (steps -> graph nodes), in graph order. By default a match is
*private*: every step but the last is used only inside the match, so rewriting the match cannot change
what the rest of the graph sees. Fusion (``passes/fuse.py``) is written on this API, through the rewrite
driver in :mod:`fxquant.passes.rewrite`; so is lowering's choice of kernel fusions (``passes/lower.py``:
:func:`~fxquant.passes.lower.kernel_fusion_patterns`, one pattern per table ``KernelFusion``, looking through
observers).

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> from fxquant.backends import ops
    >>> from fxquant.passes.matching import Pattern, find
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()))
    >>> [m.names() for m in find(gm, Pattern.chain(ops.CONV2D, ops.BN2D, ops.RELU))]
    [['_0', '_1', '_2']]
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Identity(), nn.ReLU()))
    >>> is_identity = lambda node, modules: isinstance(modules.get(node.target), nn.Identity)
    >>> find(gm, Pattern.chain(ops.CONV2D, ops.RELU)), [m.names() for m in find(
    ...     gm, Pattern.chain(ops.CONV2D, ops.RELU, through=is_identity))]
    ([], [['_0', '_2']])
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
from fxquant.passes.context import RECORD_KEY

__all__ = ["Op", "Entry", "Pattern", "Match", "find", "to_networkx"]

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
class Entry:
    """A step kind for graphs after the ``annotate`` pass: the nodes annotated with the table entry ``name`` that
    will be quantized (``record(node).quantizable``: an entry, a qconfig, no reason to stay float), in any spelling.

    Example: ``Op(Entry("conv2d"), "conv")`` matches the convs annotate gave the ``conv2d`` entry; a conv whose
    qconfig is ``None`` is no match. Reading the record creates none (nodes without one do not match).
    """

    name: str

    def __call__(self, node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
        rec = node.meta.get(RECORD_KEY)
        return rec is not None and rec.quantizable and rec.entry.name == self.name


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
        through: identity nodes the pattern looks through, ``(node, modules) -> bool`` (observers, fake
            quantizers: nodes that pass their first argument on unchanged). ``x -> obs -> y`` is then the edge
            ``x -> y``; such nodes never match a step, and ``private`` counts the users behind them (``x`` whose
            observer feeds ``y`` and the output is not private). The rewrite driver leaves them to dead-code
            elimination.
    """

    ops: tuple[Op, ...]
    extra_check: Optional[MatchCheck] = None
    private: bool = True
    through: Optional[NodeCheck] = None

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
    def chain(cls, *kinds: Union[OpKind, Op, NodeCheck], extra_check: Optional[MatchCheck] = None,
              private: bool = True, through: Optional[NodeCheck] = None) -> "Pattern":
        """``kinds[0] -> kinds[1] -> ...``, each step fed by the previous one as its first argument."""
        ops: list[Op] = []
        for i, k in enumerate(kinds):
            op = k if isinstance(k, Op) else Op(k)
            name = op.name or str(i)
            ops.append(dataclasses.replace(op, name=name, args=(ops[-1].name,) if ops else op.args))
        return cls(tuple(ops), extra_check, private, through)

    @classmethod
    def trace(cls, fn: Union[Callable[..., Any], nn.Module], extra_check: Optional[MatchCheck] = None,
              vocabulary: Sequence[OpKind] = (), private: bool = True,
              through: Optional[NodeCheck] = None) -> "Pattern":
        """The pattern of a small function or module, traced with torch.fx (see :func:`_from_graph`)."""
        gm = fn if isinstance(fn, fx.GraphModule) else fx.symbolic_trace(fn)
        return cls(_from_graph(gm, tuple(vocabulary) or _vocabulary()), extra_check, private, through)

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


def to_networkx(graph: fx.Graph, keep: Optional[Callable[[fx.Node], bool]] = None,
                through: Optional[Callable[[fx.Node], bool]] = None) -> nx.DiGraph:
    """The data-flow graph of ``graph`` (node -> its users; edge attribute ``args``: the argument positions
    at which the source feeds the user). ``keep`` restricts it to the nodes it accepts; nodes ``through``
    accepts are left out, their users fed by what they read (see ``Pattern.through``)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        if (keep is not None and not keep(node)) or (through is not None and through(node)):
            continue
        g.add_node(node, fx=node)
        inputs = [(pos, inp) for pos, arg in enumerate(node.args) for inp in _nodes_in(arg)]
        inputs += [(None, inp) for arg in node.kwargs.values() for inp in _nodes_in(arg)]
        for pos, inp in inputs:
            inp = _behind(inp, through)
            if (keep is None or keep(inp)) and (through is None or not through(inp)):
                g.add_edge(inp, node)
                positions = g.edges[inp, node].setdefault("args", set())
                if pos is not None:
                    positions.add(pos)
    return g


def _behind(node: fx.Node, through: Optional[Callable[[fx.Node], bool]]) -> fx.Node:
    """The node ``node`` stands for: itself, or what a chain of ``through`` nodes reads."""
    while through is not None and through(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _users(node: fx.Node, through: Optional[Callable[[fx.Node], bool]]) -> Iterator[fx.Node]:
    """The users of ``node``, those behind ``through`` nodes instead of the ``through`` nodes."""
    for user in node.users:
        if through is not None and through(user):
            yield from _users(user, through)
        else:
            yield user


def _nodes_in(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, lambda n: found.append(n) or n)
    return found


def _private(nodes: Sequence[fx.Node], through: Optional[Callable[[fx.Node], bool]] = None) -> bool:
    inside = set(nodes)
    return all(set(_users(n, through)) <= inside for n in nodes[:-1])


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
    skipped = set() if pattern.through is None else {n for n in gm.graph.nodes if pattern.through(n, modules)}
    through = skipped.__contains__ if skipped else None
    candidates = {n for n in gm.graph.nodes if n not in skipped and any(op.matches(n, modules) for op in pattern.ops)}
    data = None
    if len(pattern.ops) == 1:
        mappings: Iterator[dict[Any, int]] = ({n: 0} for n in candidates if pattern.ops[0].matches(n, modules))
    else:
        data, wanted = to_networkx(gm.graph, candidates.__contains__, through), pattern.to_networkx()
        mappings = itertools.chain.from_iterable(
            isomorphism.DiGraphMatcher(part, wanted, node_match=lambda a, b: b["op"].matches(a["fx"], modules),
                                       edge_match=lambda a, b: b["arg"] in a["args"]).subgraph_monomorphisms_iter()
            for part in _pieces(data, wanted))
    matches: dict[tuple[fx.Node, ...], Match] = {}
    for mapping in mappings:
        nodes = tuple(n for n, _ in sorted(mapping.items(), key=operator.itemgetter(1)))
        if nodes in matches or (pattern.private and not _private(nodes, through)):
            continue
        m = Match(pattern, nodes)
        if pattern.extra_check is None or pattern.extra_check(m, modules):
            matches[nodes] = m
    if data is not None:
        # networkx's VF2 matcher and its state refer to each other, so the matcher and the graph views it holds
        # wait for Python's cycle collector: emptied now, the candidate graph (a dict per node and edge) goes at once
        data.clear()
    return sorted(matches.values(), key=lambda m: order[m.output])

