"""Pass infrastructure: pass objects, their results, and a manager that orders and verifies them.

A pass is a small object with a ``name`` and ``run(gm, ctx) -> PassResult``. Ordering between passes is
declared as constraints ``(before, after)`` and checked with networkx (cycles are reported by name); the
graph is verified between passes unless verification is switched off.

Example:
    >>> from fxquant.passes.base import PassManager
    >>> pm = PassManager([], constraints=[("fuse", "annotate")])
    >>> pm.names
    []
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

import networkx as nx
from torch import fx

__all__ = ["PassResult", "Pass", "PassManager", "PassTiming", "PassOrderError"]


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) GraphModule and whether it changed anything."""

    graph_module: fx.GraphModule
    modified: bool


class Pass(Protocol):
    """The contract of a pass: a ``name`` and one method."""

    name: str

    def run(self, gm: fx.GraphModule, ctx: Any) -> PassResult:
        """Rewrite ``gm`` (in place or into a new GraphModule) using shared state in ``ctx``."""


class PassOrderError(ValueError):
    """The passes of a pipeline violate its ordering constraints."""


@dataclasses.dataclass(frozen=True)
class PassTiming:
    """Wall time of one pass in one run."""

    name: str
    seconds: float
    modified: bool


Verifier = Callable[[fx.GraphModule, Any], None]


class PassManager:
    """Runs passes in order, checks the declared ordering constraints, verifies the graph between passes.

    Args:
        passes: the passes, in run order.
        constraints: ``(a, b)`` pairs meaning "pass ``a`` must run before pass ``b``" (when both present).
        verifiers: checks run on the graph after every pass (default: ``Graph.lint``).
        verify: run the verifiers between passes (on by default; off for speed).
        print_after: names of passes after which to print the graph (``"all"`` for every pass); the
            environment variable ``FXQUANT_PRINT_AFTER`` (comma-separated) adds to it.
    """

    def __init__(self, passes: Sequence[Pass], constraints: Iterable[tuple[str, str]] = (),
                 verifiers: Sequence[Verifier] = (), verify: bool = True,
                 print_after: Iterable[str] = ()) -> None:
        self.passes = list(passes)
        self.constraints = list(constraints)
        self.verifiers = list(verifiers)
        self.verify = verify
        env = os.environ.get("FXQUANT_PRINT_AFTER", "")
        self.print_after = set(print_after) | {s.strip() for s in env.split(",") if s.strip()}
        self.timings: list[PassTiming] = []

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def check_order(self) -> None:
        """Raise :class:`PassOrderError` if the constraints form a cycle or the pass order breaks one."""
        g = nx.DiGraph()
        g.add_edges_from(self.constraints)
        try:
            cycle = nx.find_cycle(g)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            raise PassOrderError("pass ordering constraints form a cycle: "
                                 + " -> ".join(a for a, _ in cycle) + f" -> {cycle[0][0]}")
        position = {name: i for i, name in enumerate(self.names)}
        for a, b in self.constraints:
            if a in position and b in position and position[a] > position[b]:
                raise PassOrderError(f"pass '{a}' must run before pass '{b}', but the pipeline has "
                                     f"{self.names}; insert '{b}' after '{a}'")

    def insert_after(self, name: str, new: Pass) -> None:
        """Insert ``new`` right after the pass called ``name``."""
        self.passes.insert(self._index(name) + 1, new)

    def insert_before(self, name: str, new: Pass) -> None:
        """Insert ``new`` right before the pass called ``name``."""
        self.passes.insert(self._index(name), new)

    def replace(self, name: str, new: Pass) -> None:
        """Replace the pass called ``name`` by ``new``."""
        self.passes[self._index(name)] = new

    def _index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"no pass named {name!r} in this pipeline; passes are {self.names}")
        return self.names.index(name)

    def run(self, gm: fx.GraphModule, ctx: Any) -> fx.GraphModule:
        """Run every pass on ``gm``; returns the final GraphModule."""
        self.check_order()
        self.timings = []
        for p in self.passes:
            start = time.perf_counter()
            result = p.run(gm, ctx)
            gm = result.graph_module
            self.timings.append(PassTiming(p.name, time.perf_counter() - start, result.modified))
            if self.verify:
                self._verify(gm, ctx, p.name)
            if "all" in self.print_after or p.name in self.print_after:
                print(f"# --- graph after pass '{p.name}' ---\n{gm.code}")
        return gm

    def _verify(self, gm: fx.GraphModule, ctx: Any, after: str) -> None:
        try:
            gm.graph.lint()
            for check in self.verifiers:
                check(gm, ctx)
        except Exception as exc:
            raise AssertionError(f"graph verification failed after pass '{after}': {exc}") from exc
