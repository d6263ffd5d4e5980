"""Graph invariants checked between passes (on by default; tests always run with them).

* ``one_observer_per_tensor``: no tensor has two observers, and no observer observes an observer;
* ``quantized_flow``: in a converted graph, a quantized tensor feeds only ops that take quantized inputs
  (kernels, native quantized ops, ``dequantize``), and no observer is left;
* ``no_dead_nodes``: every call node has a user.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from fxquant.fake_quantize import is_observer
from fxquant.passes.context import RECORD_KEY, modules_of

__all__ = ["one_observer_per_tensor", "quantized_flow", "no_dead_nodes", "PREPARE_VERIFIERS", "CONVERT_VERIFIERS"]


def _observer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    modules = modules_of(gm)
    return [n for n in gm.graph.nodes if n.op == "call_module" and is_observer(modules.get(str(n.target)))]


def one_observer_per_tensor(gm: fx.GraphModule, ctx: Any = None) -> None:
    """Raise ``AssertionError`` if a tensor is observed twice or an observer observes an observer."""
    observers = set(_observer_nodes(gm))
    seen: set[fx.Node] = set()
    for obs in observers:
        src = obs.args[0]
        if src in observers:
            raise AssertionError(f"observer '{obs.target}' observes another observer '{src.target}'")
        if src in seen:
            raise AssertionError(f"tensor '{src.name}' has more than one observer")
        seen.add(src)


def quantized_flow(gm: fx.GraphModule, ctx: Any = None) -> None:
    """Raise ``AssertionError`` if a quantized tensor reaches a float op, or an observer is left."""
    left = _observer_nodes(gm)
    if left:
        raise AssertionError(f"observers left after convert: {[str(n.target) for n in left]}")
    for node in gm.graph.nodes:
        rec = node.meta.get(RECORD_KEY)
        if rec is None or not rec.quantized_output:
            continue
        for user in node.users:
            urec = user.meta.get(RECORD_KEY)
            if urec is None or not urec.quantized_inputs:
                raise AssertionError(f"quantized tensor '{node.name}' flows into '{user.name}', which takes float")


def _impure(node: fx.Node) -> bool:
    """torch.fx's purity check (asserts, in-place ops); module calls count as pure."""
    return node.op != "call_module" and node.is_impure()


def no_dead_nodes(gm: fx.GraphModule, ctx: Any = None) -> None:
    """Raise ``AssertionError`` if a call node's result is unused (impure calls such as asserts excepted)."""
    dead = [n.name for n in gm.graph.nodes if n.op.startswith("call") and not n.users and not _impure(n)]
    if dead:
        raise AssertionError(f"dead nodes: {dead[:10]}")


PREPARE_VERIFIERS = (one_observer_per_tensor,)
CONVERT_VERIFIERS = (quantized_flow, no_dead_nodes)
