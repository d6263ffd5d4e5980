"""Normalization pass: put a traced eval-mode graph into the forms the backend tables are written for.

Contract:
    * input: a traced float GraphModule in eval mode;
    * output: the same function, with identity ops removed (``nn.Dropout*``, ``nn.Identity``,
      ``F.dropout(..., training=False)``) and functional ``F.linear`` / ``F.conv1d/2d/3d`` calls whose weight
      and bias are module attributes turned into ``nn.Linear`` / ``nn.ConvNd`` modules sharing those
      parameters (so fusion, observers and lowering treat them like module calls);
    * ``torch.einsum`` of two operands that is a (batched) matrix product becomes ``torch.matmul`` (with a
      ``transpose`` of the second operand where the equation contracts its last axis), and
      ``swapaxes``/``swapdims`` become ``transpose``, so attention written with them (maxvit) quantizes;
    * quantization-aware training (``ctx.is_qat``): dropout modules are kept (they act while training; the
      graph is prepared with its modules in eval mode, see ``prepare_qat_fx``);
    * idempotent.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.passes.base import PassResult, recompile
from fxquant.passes.context import modules_of

__all__ = ["NormalizePass"]

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_CONV_FUNCTIONS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
#: functions that are the identity when their ``training`` argument (at this position) is False
_TRAINING_IDENTITIES = {"dropout": 2, "stochastic_depth": 3}


def _is_identity(node: fx.Node, modules: dict[str, nn.Module], keep_dropout: bool) -> bool:
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return isinstance(module, nn.Identity) or (not keep_dropout and isinstance(module, _DROPOUT_MODULES))
    name = getattr(node.target, "__name__", "")
    if node.op == "call_function" and name in _TRAINING_IDENTITIES and (
            node.target is F.dropout or str(getattr(node.target, "__module__", "")).startswith("torchvision")):
        pos = _TRAINING_IDENTITIES[name]
        training = node.kwargs.get("training", node.args[pos] if len(node.args) > pos else True)
        return training is False
    return False


def _layer_norm_module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    """An nn.LayerNorm for ``F.layer_norm(x, shape, weight, bias, eps)`` with attribute weight and bias."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    weight, bias = _attr(gm, args.get("weight")), _attr(gm, args.get("bias"))
    shape = args.get("normalized_shape")
    if weight is None or bias is None or not isinstance(shape, (list, tuple)) or any(
            isinstance(v, fx.Node) for v in shape):
        return None
    mod = nn.LayerNorm(tuple(shape), eps=float(args.get("eps", 1e-5)), device="meta")
    mod.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    mod.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return mod


def _is_silu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(str(node.target))) is nn.SiLU
    return (node.op == "call_function" and node.target is F.silu) or (node.op == "call_method" and
                                                                         node.target in ("silu", "silu_"))


def _expand_silu(gm: fx.GraphModule, node: fx.Node) -> None:
    """``silu(x)`` as ``x * sigmoid(x)``: no quantized SiLU kernel exists, but sigmoid (fixed output range)
    and mul do, so the op runs int8 instead of between a dequantize and a quantize."""
    x = node.args[0] if node.args else node.kwargs["input"]
    with gm.graph.inserting_before(node):
        sig = gm.graph.call_function(torch.sigmoid, (x,))
        mul = gm.graph.call_function(torch.mul, (x, sig))
    node.replace_all_uses_with(mul)
    gm.graph.erase_node(node)


def _matmul_form(equation: str) -> Optional[bool]:
    """For a two-operand einsum equation, whether it is ``matmul(a, b)`` (False), ``matmul(a, b^T)`` (True)
    over identical leading batch axes, or neither (None). ``"bgid,bgjd->bgij"`` -> True."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq or eq.count(",") != 1:
        return None
    lhs, out = eq.split("->")
    a, b = lhs.split(",")
    if len(a) < 2 or len(a) != len(b) or len(out) != len(a) or len(set(a + b)) != len(a) + 1:
        return None
    batch, (i, k) = a[:-2], a[-2:]
    if b[:-2] != batch or out[:-2] != batch or out[-2] != i or i == k:
        return None
    if b[-2:] == k + out[-1] and out[-1] not in (i, k):
        return False
    if b[-2:] == out[-1] + k and out[-1] not in (i, k):
        return True
    return None


def _rewrite_einsum(gm: fx.GraphModule, node: fx.Node) -> bool:
    if not (node.op == "call_function" and node.target is torch.einsum and len(node.args) == 3
            and isinstance(node.args[0], str) and not node.kwargs):
        return False
    transposed = _matmul_form(node.args[0])
    if transposed is None:
        return False
    a, b = node.args[1], node.args[2]
    with gm.graph.inserting_before(node):
        if transposed:
            b = gm.graph.call_function(torch.transpose, (b, -2, -1))
        new = gm.graph.call_function(torch.matmul, (a, b))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return True


def _rewrite_swapaxes(node: fx.Node) -> bool:
    """``x.swapaxes(a, b)`` / ``torch.swapdims(x, a, b)`` are ``transpose``: one name for the table."""
    if node.op == "call_method" and node.target in ("swapaxes", "swapdims"):
        node.target = "transpose"
        return True
    if node.op == "call_function" and node.target in (torch.swapaxes, torch.swapdims):
        node.target = torch.transpose
        return True
    return False


def _attr(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def _module_for(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    """An nn.Linear / nn.ConvNd equivalent to a functional call with attribute weights, if it is one."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    weight, bias = _attr(gm, args.get("weight")), _attr(gm, args.get("bias"))
    if weight is None or (args.get("bias") is not None and bias is None):
        return None
    if node.target is F.linear:
        mod: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        extra = {k: args[k] for k in ("stride", "padding", "dilation", "groups") if k in args}
        if any(isinstance(v, fx.Node) for v in extra.values()):
            return None
        groups = int(extra.get("groups", 1))
        cls = _CONV_FUNCTIONS[node.target]
        mod = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), bias=bias is not None,
                  device="meta", **extra)
    mod.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        mod.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return mod


@dataclasses.dataclass(frozen=True)
class NormalizePass:
    """Remove identities, turn functional conv/linear with attribute weights into modules."""

    name: str = "normalize"
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: object) -> PassResult:
        modules = modules_of(gm)
        keep_dropout = bool(getattr(ctx, "is_qat", False))
        modified = False
        for node in list(gm.graph.nodes):
            if _is_identity(node, modules, keep_dropout) and node.args and isinstance(node.args[0], fx.Node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                modified = True
            elif _is_silu(node, modules) and not getattr(ctx, "is_qat", False) and not any(
                    e.name == "silu" for e in getattr(getattr(ctx, "backend", None), "entries", ())):  # x86 fuses silu
                _expand_silu(gm, node)
                modified = True
            elif _rewrite_einsum(gm, node) or _rewrite_swapaxes(node):
                modified = True
            elif node.op == "call_function" and (node.target in (F.linear, F.layer_norm) or
                                                 node.target in _CONV_FUNCTIONS):
                mod = _layer_norm_module(gm, node) if node.target is F.layer_norm else _module_for(gm, node)
                if mod is None:
                    continue
                name = f"{node.name}_module"
                gm.add_submodule(name, mod)
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_module(name, (node.args[0],))
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                modified = True
        if modified:
            gm.graph.eliminate_dead_code()
            gm.delete_all_unused_submodules()
            recompile(gm)
        return PassResult(gm, modified)
