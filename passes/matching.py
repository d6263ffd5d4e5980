"""Pattern matching on FX graphs with networkx's VF2 subgraph matcher.

A pattern is a chain of :class:`~fxquant.backends.config.OpKind` in forward order. A match is accepted
only when every inner node feeds the next one as its first argument and has no other user, so that
fusing the chain cannot change what the rest of the graph sees.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import networkx as nx
from networkx.algorithms import isomorphism
from torch import fx, nn

from fxquant.backends.config import OpKind

__all__ = ["to_networkx", "match_chains"]


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The data-flow graph of ``graph`` as a networkx DiGraph (node -> its users)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g


def _chain(pattern: Sequence[OpKind]) -> nx.DiGraph:
    p = nx.DiGraph()
    for i, kind in enumerate(pattern):
        p.add_node(i, kind=kind)
        if i:
            p.add_edge(i - 1, i)
    return p


def _is_private_chain(nodes: list[fx.Node]) -> bool:
    for prev, nxt in zip(nodes, nodes[1:]):
        if len(prev.users) != 1 or not nxt.args or nxt.args[0] is not prev:
            return False
    return True


def match_chains(g: nx.DiGraph, pattern: Sequence[OpKind], modules: dict[str, nn.Module]) -> Iterator[list[fx.Node]]:
    """Every occurrence of the chain ``pattern`` in ``g``, as node lists in forward order."""
    if len(pattern) == 1:
        for node in g.nodes:
            if pattern[0].matches(node, modules):
                yield [node]
        return
    # networkx hands node_match attribute dicts, so carry the fx node in the graph's attributes
    attrs = {n: {"fx": n} for n in g.nodes}
    nx.set_node_attributes(g, attrs)
    matcher = isomorphism.DiGraphMatcher(
        g, _chain(pattern), node_match=lambda a, b: b["kind"].matches(a["fx"], modules))
    for mapping in matcher.subgraph_monomorphisms_iter():
        nodes = [n for n, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        if _is_private_chain(nodes):
            yield nodes
