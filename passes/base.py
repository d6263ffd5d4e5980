"""Pass infrastructure: pass objects, their results, and a manager that orders and verifies them.

A pass is a small object with a ``name`` and ``run(gm, ctx) -> PassResult``. Ordering between passes is
declared as constraints ``(before, after)`` and checked with networkx (cycles are reported by name); the
graph is verified between passes unless verification is switched off.

Every run records a :class:`TimingReport` (wall time per pass; ``print(pm.report)`` shows a table), and a last
row named :data:`CODEGEN`: the code generation held back to the end of the run (see below), so that the rows add
up to the run's wall time.

A pass that changes the graph calls :func:`recompile` instead of ``gm.recompile()``: outside a pipeline it
regenerates the code at once; inside :meth:`PassManager.run`, on the module the run works on, it marks the code
stale (so does a pass that returns ``modified=True`` with the module it was given), and the manager regenerates it once, when something needs
it: a pass that runs the module (any pass that does not declare ``runs_module = False``), printing the graph,
the end of the run (or an error), or a pipeline run inside a pass. Generating and compiling the code of a
2,000-node graph takes tens of milliseconds, and a prepare pipeline used to pay it after every pass.

Example:
    >>> from fxquant.passes.base import PassManager
    >>> pm = PassManager([], constraints=[("fuse", "annotate")], name="mine")
    >>> pm.names
    []
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import time
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

import networkx as nx
from torch import fx

from fxquant.errors import FxQuantError

__all__ = ["PassResult", "Pass", "PassManager", "recompile", "PassTiming", "TimingReport", "PassOrderError",
           "PassVerificationError", "PRINT_AFTER_ENV", "CODEGEN"]

#: environment variable naming the passes after which to print the graph (comma-separated, or ``all``)
PRINT_AFTER_ENV = "FXQUANT_PRINT_AFTER"

#: the name of a run's last timing row: the code generation left for the end of the run (``modified``: whether
#: the code was stale and regenerated); not a pass, so no pass may take the name
CODEGEN = "(codegen)"


class _Deferred:
    """The code generation a :meth:`PassManager.run` holds back: the GraphModule its passes work on, and whether
    that module's code is stale."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm, self.stale = gm, False

    def flush(self) -> None:
        if self.stale:
            self.stale = False
            self.gm.recompile()


#: the innermost :meth:`PassManager.run` under way (``None`` outside one)
_DEFERRED: contextvars.ContextVar[Optional[_Deferred]] = contextvars.ContextVar("fxquant_deferred", default=None)


def recompile(gm: fx.GraphModule) -> None:
    """Regenerate ``gm``'s code after its graph changed: at once, unless ``gm`` is the module a
    :meth:`PassManager.run` is working on, whose code is regenerated once, before the next thing that needs it
    (see the module docstring). Any other module (one a pass builds or edits on the side) is regenerated at once."""
    deferred = _DEFERRED.get()
    if deferred is not None and deferred.gm is gm:
        deferred.stale = True
    else:
        gm.recompile()


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) GraphModule and whether it changed anything."""

    graph_module: fx.GraphModule
    modified: bool


class Pass(Protocol):
    """The contract of a pass: a ``name`` and one method.

    A pass that never calls the GraphModule (it reads and edits only the graph and the submodules, or runs
    nodes through a ``torch.fx.Interpreter``) may set ``runs_module = False``: the manager then does not
    regenerate stale code before it. A pass without the attribute gets the current code.
    """

    name: str

    def run(self, gm: fx.GraphModule, ctx: Any) -> PassResult:
        """Rewrite ``gm`` (in place or into a new GraphModule) using shared state in ``ctx``."""


class PassOrderError(FxQuantError, ValueError):
    """The passes of a pipeline violate its ordering constraints (or two passes share a name)."""


class PassVerificationError(FxQuantError, AssertionError):
    """The graph broke an invariant after a pass (the message names the pass and the invariant)."""


@dataclasses.dataclass(frozen=True)
class PassTiming:
    """Wall time of one pass in one run."""

    name: str
    seconds: float
    modified: bool


@dataclasses.dataclass(frozen=True)
class TimingReport:
    """Per-pass wall times of one or more pipeline runs (``str()`` is a table)."""

    timings: tuple[PassTiming, ...]

    @property
    def total(self) -> float:
        return sum(t.seconds for t in self.timings)

    def seconds(self, name: str) -> float:
        """Total seconds spent in the passes called ``name``."""
        return sum(t.seconds for t in self.timings if t.name == name)

    def __str__(self) -> str:
        total = self.total or 1.0
        lines = [f"{'pass':<20} {'ms':>9} {'share':>6}  modified"]
        lines += [f"{t.name:<20} {t.seconds * 1e3:>9.2f} {t.seconds / total:>6.1%}  {t.modified}" for t in self.timings]
        lines.append(f"{'total':<20} {self.total * 1e3:>9.2f}")
        return "\n".join(lines)


Verifier = Callable[[fx.GraphModule, Any], None]


class PassManager:
    """Runs passes in order, checks the declared ordering constraints, verifies the graph between passes.

    Args:
        passes: the passes, in run order.
        constraints: ``(a, b)`` pairs meaning "pass ``a`` must run before pass ``b``" (when both present).
        verifiers: checks run on the graph after every pass (default: ``Graph.lint``).
        verify: run the verifiers between passes (on by default; off for speed).
        print_after: names of passes after which to print the graph (``"all"`` for every pass); the
            environment variable ``FXQUANT_PRINT_AFTER`` (comma-separated), read at each run, adds to it.
        name: the pipeline's name (``"prepare"``, ``"convert"``), used in messages.

    A PassManager is an ordinary object: copy one (:meth:`copy`), edit it (:meth:`insert_after`,
    :meth:`insert_before`, :meth:`replace`, :meth:`remove`, :meth:`add_constraint`) and hand it to
    ``prepare_fx(..., pipeline=pm)`` / ``convert_fx(..., pipeline=pm)``; nothing global changes.
    """

    def __init__(self, passes: Sequence[Pass], constraints: Iterable[tuple[str, str]] = (),
                 verifiers: Sequence[Verifier] = (), verify: bool = True,
                 print_after: Iterable[str] = (), name: str = "") -> None:
        self.passes = list(passes)
        self.constraints = list(constraints)
        self.verifiers = list(verifiers)
        self.verify = verify
        self.print_after = set(print_after)
        self.name = name
        self.timings: list[PassTiming] = []

    def __repr__(self) -> str:
        return f"PassManager({self.name or 'unnamed'}: {' -> '.join(self.names)}, verify={self.verify})"

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    @property
    def report(self) -> TimingReport:
        """Per-pass wall times of the last :meth:`run`."""
        return TimingReport(tuple(self.timings))

    def copy(self, **changes: Any) -> "PassManager":
        """A copy (its own pass list, constraints and verifiers) with some options changed, e.g.
        ``pm.copy(verify=False)`` or ``pm.copy(print_after={"fuse"})``."""
        new = PassManager(self.passes, self.constraints, self.verifiers, self.verify, self.print_after, self.name)
        for key, value in changes.items():
            if key not in ("verify", "print_after", "name", "verifiers", "constraints"):
                raise TypeError(f"PassManager.copy() got an unknown option {key!r}")
            setattr(new, key, set(value) if key == "print_after" else (list(value) if key in
                    ("verifiers", "constraints") else value))
        return new

    def add_constraint(self, before: str, after: str) -> None:
        """Declare that pass ``before`` must run before pass ``after`` (checked at every run)."""
        self.constraints.append((before, after))

    def remove(self, name: str) -> Pass:
        """Remove the pass called ``name`` and return it (constraints naming it are kept and ignored)."""
        return self.passes.pop(self._index(name))

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
        dup = sorted({n for n in self.names if self.names.count(n) > 1})
        if dup:
            raise PassOrderError(f"several passes are named {dup}; give each pass its own name")
        if CODEGEN in self.names:
            raise PassOrderError(f"a pass is named {CODEGEN!r}, the name of a run's code generation row in its "
                                 "timings; give the pass another name")
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
        env = os.environ.get(PRINT_AFTER_ENV, "")
        print_after = self.print_after | {s.strip() for s in env.split(",") if s.strip()}
        outer = _DEFERRED.get()
        if outer is not None:  # a pipeline run inside a pass: the module it gets has current code
            outer.flush()
        deferred = _Deferred(gm)
        token = _DEFERRED.set(deferred)
        try:
            for p in self.passes:
                start = time.perf_counter()
                if getattr(p, "runs_module", True):
                    deferred.flush()
                result = p.run(deferred.gm, ctx)
                if result.graph_module is not deferred.gm:  # a new module (built with its code): the old one ends
                    deferred.flush()                        # current too, for whoever still holds it
                    deferred.gm = result.graph_module
                elif result.modified:  # changed in place, by a pass that may not have called recompile()
                    deferred.stale = True
                self.timings.append(PassTiming(p.name, time.perf_counter() - start, result.modified))
                if self.verify:  # after every pass: one that says it changed nothing may still have
                    self._verify(deferred.gm, ctx, p.name)
                if "all" in print_after or p.name in print_after:
                    deferred.flush()
                    print(f"# --- graph after pass '{p.name}' ---\n{deferred.gm.code}")
        except BaseException:
            with contextlib.suppress(Exception):  # the module keeps code that matches its graph; the pass's error
                deferred.flush()                  # is the one to report
            raise
        finally:
            _DEFERRED.reset(token)
        start, stale = time.perf_counter(), deferred.stale
        deferred.flush()
        self.timings.append(PassTiming(CODEGEN, time.perf_counter() - start, stale))
        return deferred.gm

    def _verify(self, gm: fx.GraphModule, ctx: Any, after: str) -> None:
        try:
            gm.graph.lint()
            for check in self.verifiers:
                check(gm, ctx)
        except Exception as exc:
            raise PassVerificationError(f"graph verification failed after pass '{after}': {exc} (run with "
                                        f"{PRINT_AFTER_ENV}={after} to see the graph)") from exc
