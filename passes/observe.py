"""Observer insertion pass: one observer per tensor that a quantized op reads or writes.

Contract:
    * input: an annotated GraphModule;
    * output: observers (identity modules) inserted after every tensor that enters or leaves a quantized
      op; all users of an observed tensor read it through its observer; ops that share their input's
      qparams get none of their own; fixed-qparams ops get a fixed observer; the float function is unchanged;
    * each node's record names the observer of its output (``NodeRecord.observer``);
    * never two observers on one tensor; idempotent (observed tensors are not observed again).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from torch import fx, nn

from fxquant.backends.config import Observation
from fxquant.observers import FixedQParamsObserver, ObserverBase
from fxquant.passes.base import PassResult
from fxquant.passes.context import QuantContext, modules_of, record

__all__ = ["ObservePass", "tensor_inputs", "is_observer_node"]


def is_observer_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` calls an observer module."""
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), ObserverBase)


def tensor_inputs(node: fx.Node) -> Optional[list[Any]]:
    """The args of ``node`` its table entry marks as quantized (a cat's list is flattened)."""
    entry = record(node).entry
    positions = entry.quantized_args if entry and entry.quantized_args is not None else range(len(node.args))
    out: list[Any] = []
    for i in positions:
        if i >= len(node.args):
            return None
        arg = node.args[i]
        out.extend(arg if isinstance(arg, (list, tuple)) else [arg])
    return out


@dataclasses.dataclass(frozen=True)
class ObservePass:
    """Insert observers where the table says (see module docstring)."""

    name: str = "observe"

    def run(self, gm: fx.GraphModule, ctx: QuantContext) -> PassResult:
        modules = modules_of(gm)
        before = len(modules)
        for node in list(gm.graph.nodes):
            rec = record(node)
            if not rec.quantizable or is_observer_node(node, modules):
                continue
            entry = rec.entry
            inputs = tensor_inputs(node)
            if entry.observation is Observation.SHARES_INPUT:
                src = inputs[0] if inputs else None
                rec.observer = self._observer_of(src, modules) if isinstance(src, fx.Node) else None
                if rec.observer is None:
                    rec.float_reason = "its input is float, and it takes its qparams from its input"
                continue
            if entry.observation is Observation.NONE:
                continue
            if inputs is None or not all(isinstance(t, fx.Node) and record(t).is_tensor for t in inputs):
                ctx.keep_float(node, entry.name, "an operand is not a float tensor (scalar or non-tensor operand)")
                continue
            for t in inputs:
                if self._observer_of(t, modules) is None:
                    self._insert(gm, t, rec.qconfig.activation(), modules)
            if entry.observation is Observation.FIXED:
                scale, zp = entry.constraints.fixed_qparams
                obs: nn.Module = FixedQParamsObserver(scale=scale, zero_point=zp)
            else:
                obs = rec.qconfig.activation()
            rec.observer = self._observer_of(node, modules) or self._insert(gm, node, obs, modules)
        gm.recompile()
        return PassResult(gm, len(modules) != before)

    @staticmethod
    def _observer_of(t: fx.Node, modules: dict[str, nn.Module]) -> Optional[str]:
        if is_observer_node(t, modules):
            return str(t.target)
        rec = record(t)
        if rec.observer is not None:
            return rec.observer
        for user in t.users:
            if is_observer_node(user, modules):
                return str(user.target)
        return None

    @staticmethod
    def _insert(gm: fx.GraphModule, t: fx.Node, obs: nn.Module, modules: dict[str, nn.Module]) -> str:
        name = f"{t.name}_observer"
        i = 1
        while name in modules:
            name, i = f"{t.name}_observer_{i}", i + 1
        obs.where = f"output of node '{t.name}'"
        gm.add_submodule(name, obs)
        modules[name] = obs
        with gm.graph.inserting_after(t):
            obs_node = gm.graph.call_module(name, (t,))
        t.replace_all_uses_with(obs_node, delete_user_cb=lambda u: u is not obs_node)
        record(obs_node).is_tensor = True
        record(t).observer = name
        return name
