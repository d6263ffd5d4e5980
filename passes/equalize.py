"""Cross-layer equalization (Nagel et al., "Data-Free Quantization", ICCV 2019) and its adversary.

A *chain* is a conv/linear layer ``A`` whose output reaches exactly one conv/linear layer ``B`` through at most
one positively homogeneous activation (ReLU, or none: identity, eval-mode dropout), each tensor in between read
by nothing else. For positive per-channel factors ``s``, ``relu(x / s) * s == relu(x)``, so dividing ``A``'s
output channel ``i`` (weights and bias) by ``s[i]`` and multiplying ``B``'s input channel ``i`` by ``s[i]``
leaves the function unchanged. Equalization picks ``s[i] = sqrt(r_A[i] / r_B[i])`` (``r``: the channel's
largest absolute weight), which gives both layers the same per-channel ranges, and repeats over all chains until
the factors settle (a depthwise conv between two chains is the second layer of one and the first of the next).
Per-tensor weight quantization then loses far less on layers whose channel ranges differed by orders of
magnitude (trained depthwise convs).

High-bias absorption (optional, after equalization, ReLU chains whose ``A`` had a batch norm): channel ``i`` of
``A``'s pre-activation is about ``N(beta, gamma**2)``; ``c = max(0, beta - 3 * |gamma|)`` is moved out of ``A``'s
bias into ``B``'s (``b_B += W_B @ c``). Exact where the pre-activation stays above ``c`` and ``B`` pads nothing;
otherwise a small change (the paper's approximation).

ReLU6 is not positively homogeneous (``relu6(x / s) * s`` clips at ``6 * s``): chains through it are skipped
unless ``relu6_as_relu=True``, which also replaces those ReLU6 by ReLU (AIMET's choice; it changes the
function wherever the activation exceeds 6). Grouped convs other than depthwise are skipped.

Contract of :class:`EqualizePass` (name ``"equalize"``):
    * input: a traced eval-mode float GraphModule (insert it after ``"normalize"``, before ``"fuse"``);
    * output: batch norms that follow a conv/linear folded into it, chains equalized (and biases absorbed):
      the same function up to float rounding (and the approximations above, when enabled); idempotent up to
      rounding; QAT graphs are left alone (their batch norms train).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    >>> eq = equalize(model, high_bias_absorption=False)
    >>> x = torch.randn(2, 3, 10, 10)
    >>> torch.allclose(eq(x), model(x), atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, ClassVar, Optional

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.fused import fold_bn
from fxquant.passes.base import PassResult, recompile
from fxquant.passes.context import attribute_owner
from fxquant.tracer import PrepareCustomConfig, trace

__all__ = ["Chain", "EqualizePass", "equalize", "find_chains", "fold_batch_norms", "rescale_channels"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
#: the largest change of log(scale) at which the iteration stops
_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class Chain:
    """Two layers with one activation between them.

    Attributes:
        first, second: qualified module names of ``A`` and ``B``.
        activation: ``"relu"``, ``"relu6"`` or ``"identity"``.
        activation_node: the fx node name of the activation (``None`` for identity).
    """

    first: str
    second: str
    activation: str
    activation_node: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class _BNStats:
    """Per-channel mean and standard deviation of a layer's pre-activation, from its folded batch norm."""

    shift: torch.Tensor
    scale: torch.Tensor


def _activation_kind(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[str]:
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        if isinstance(mod, nn.ReLU):
            return "relu"
        if isinstance(mod, nn.ReLU6) or (isinstance(mod, nn.Hardtanh) and (mod.min_val, mod.max_val) == (0.0, 6.0)):
            return "relu6"
        return "identity" if isinstance(mod, _IDENTITIES) else None
    if node.op == "call_function" and node.target in (F.relu, torch.relu):
        return "relu"
    if node.op == "call_method" and node.target == "relu":
        return "relu"
    if node.op == "call_function" and node.target is F.relu6:
        return "relu6"
    return None


def _layer(node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> Optional[nn.Module]:
    """The conv/linear module ``node`` calls, if it is called once and is plain or depthwise."""
    if node.op != "call_module" or calls.get(str(node.target), 0) != 1:
        return None
    mod = modules.get(str(node.target))
    if type(mod) not in _LAYERS:
        return None
    groups = getattr(mod, "groups", 1)
    return mod if groups == 1 or groups == mod.in_channels == mod.out_channels else None


def _is_depthwise(mod: nn.Module) -> bool:
    return getattr(mod, "groups", 1) > 1


def _compatible(a: nn.Module, b: nn.Module) -> bool:
    if type(a) is not type(b):  # conv2d -> conv2d, linear -> linear: the channel axis is the same
        return False
    out_a = a.weight.shape[0]
    return b.weight.shape[0] == out_a if _is_depthwise(b) else b.weight.shape[1] == out_a


def _call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """Uses of each module: its calls, plus one for each read of its attributes (``self.conv.weight`` in the
    forward), so a layer whose weights the forward also reads counts as shared: folding or scaling it would
    change what that read sees."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            owner = str(node.target) if node.op == "call_module" else attribute_owner(node)
            counts[owner] = counts.get(owner, 0) + 1
    return counts


def find_chains(gm: fx.GraphModule, activations: tuple[str, ...] = ("relu", "identity")) -> list[Chain]:
    """Every layer -> activation -> layer chain of ``gm`` (see the module docstring), in graph order.

    Args:
        gm: a traced float GraphModule (batch norms folded, else a conv -> bn link is not a chain).
        activations: the activation kinds allowed between the layers.

    Returns:
        The chains.
    """
    modules, calls = dict(gm.named_modules()), _call_counts(gm)
    chains = []
    for node in gm.graph.nodes:
        a = _layer(node, modules, calls)
        if a is None or len(node.users) != 1:
            continue
        nxt, kind, act_node = next(iter(node.users)), "identity", None
        seen_kind = _activation_kind(nxt, modules)
        while seen_kind is not None and len(nxt.users) == 1:  # identities and at most one real activation
            if seen_kind != "identity":
                if kind != "identity":
                    break
                kind, act_node = seen_kind, nxt.name
            nxt = next(iter(nxt.users))
            seen_kind = _activation_kind(nxt, modules)
        b = _layer(nxt, modules, calls)
        if b is not None and kind in activations and _compatible(a, b):
            chains.append(Chain(str(node.target), str(nxt.target), kind, act_node))
    return chains


def fold_batch_norms(gm: fx.GraphModule) -> dict[str, _BNStats]:
    """Fold every eval-mode batch norm that is the only reader of a conv/linear output into it, in place.

    Returns:
        For each folded layer, the per-channel mean and deviation of its new output (the batch norm's
        ``beta`` and ``|gamma|``), used by high-bias absorption.
    """
    modules, calls = dict(gm.named_modules()), _call_counts(gm)
    stats: dict[str, _BNStats] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.users) != 1 or calls.get(str(node.target), 0) != 1:
            continue
        layer, user = modules.get(str(node.target)), next(iter(node.users))
        bn = modules.get(str(user.target)) if user.op == "call_module" else None
        if type(layer) not in _LAYERS or not isinstance(bn, _BATCH_NORMS) or bn.training or \
                bn.running_mean is None or calls.get(str(user.target), 0) != 1:
            continue
        fused = fold_bn(layer, bn)
        _set_module(gm, str(node.target), fused)
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
        beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_mean)
        stats[str(node.target)] = _BNStats(beta.clone(), gamma.abs().clone())
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    recompile(gm)
    return stats


def _set_module(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def _out_ranges(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(1)


def _in_ranges(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach()
    if _is_depthwise(mod):
        return _out_ranges(mod)
    return w.abs().transpose(0, 1).reshape(w.shape[1], -1).amax(1)


def _scale_out(mod: nn.Module, factor: torch.Tensor) -> None:
    """Multiply output channel ``i`` of ``mod`` (weights and bias) by ``factor[i]``."""
    shape = [-1] + [1] * (mod.weight.dim() - 1)
    _assign(mod, "weight", mod.weight.detach() * factor.reshape(shape))
    if mod.bias is not None:
        _assign(mod, "bias", mod.bias.detach() * factor)


def _scale_in(mod: nn.Module, factor: torch.Tensor) -> None:
    """Multiply input channel ``i`` of ``mod`` by ``factor[i]`` (a depthwise conv: its channel ``i``)."""
    if _is_depthwise(mod):
        _assign(mod, "weight", mod.weight.detach() * factor.reshape([-1] + [1] * (mod.weight.dim() - 1)))
        return
    shape = [1, -1] + [1] * (mod.weight.dim() - 2)
    _assign(mod, "weight", mod.weight.detach() * factor.reshape(shape))


def _assign(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    """Give ``mod`` a new tensor instead of writing into the old one: a prepared model shares its float weights'
    memory with the user's model (see fxquant.api), which must not change."""
    old = getattr(mod, name)
    setattr(mod, name, nn.Parameter(value, requires_grad=old.requires_grad))


def _chain_order(chains: list[Chain]) -> list[list[Chain]]:
    """Chains grouped into the sequences that share layers (networkx components), each in data-flow order."""
    g = nx.DiGraph()
    for c in chains:
        g.add_edge(c.first, c.second, chain=c)
    groups = []
    for component in sorted(nx.weakly_connected_components(g), key=lambda comp: min(comp)):
        sub = g.subgraph(component)
        order = {name: i for i, name in enumerate(nx.topological_sort(sub))}
        groups.append(sorted((d["chain"] for _, _, d in sub.edges(data=True)), key=lambda c: order[c.first]))
    return groups


def _equalize_chains(modules: dict[str, nn.Module], chains: list[Chain], max_rounds: int = 100
                     ) -> dict[str, torch.Tensor]:
    """Equalize ``chains`` in place; returns each first layer's cumulative output factor."""
    factors: dict[str, torch.Tensor] = {}
    for group in _chain_order(chains):
        for _ in range(max_rounds):
            worst = 0.0
            for c in group:
                a, b = modules[c.first], modules[c.second]
                r_a, r_b = _out_ranges(a), _in_ranges(b)
                s = torch.where((r_a > 0) & (r_b > 0), torch.sqrt(r_a / r_b.clamp(min=1e-30)), torch.ones_like(r_a))
                _scale_out(a, 1.0 / s)
                _scale_in(b, s)
                factors[c.first] = factors.get(c.first, torch.ones_like(s)) / s
                worst = max(worst, float(s.log().abs().max()))
            if worst < _TOLERANCE or len(group) == 1:
                break
    return factors


def _absorb_high_bias(modules: dict[str, nn.Module], chains: list[Chain], stats: dict[str, _BNStats],
                      factors: dict[str, torch.Tensor]) -> int:
    """Move ``max(0, beta - 3 |gamma|)`` of ReLU chains from the first layer's bias into the second's."""
    moved = 0
    for c in chains:
        a, b = modules[c.first], modules[c.second]
        if c.activation != "relu" or c.first not in stats or a.bias is None:
            continue
        factor = factors.get(c.first, torch.ones_like(a.bias))
        absorbed = (factor * (stats[c.first].shift - 3 * stats[c.first].scale)).clamp(min=0).detach()
        if not bool((absorbed > 0).any()):
            continue
        w = b.weight.detach()
        shift = w.reshape(w.shape[0], -1).sum(1) * absorbed if _is_depthwise(b) else \
            w.reshape(w.shape[0], w.shape[1], -1).sum(2) @ absorbed
        _assign(a, "bias", a.bias.detach() - absorbed)
        if b.bias is None:
            b.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        _assign(b, "bias", b.bias.detach() + shift)
        moved += 1
    return moved


def _replace_relu6(gm: fx.GraphModule, chains: list[Chain]) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for c in chains:
        if c.activation == "relu6" and c.activation_node is not None:
            node = nodes[c.activation_node]
            with gm.graph.inserting_after(node):
                relu = gm.graph.call_function(torch.relu, (node.args[0],))
            node.replace_all_uses_with(relu)
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    recompile(gm)


def _equalize_graph(gm: fx.GraphModule, high_bias_absorption: bool, relu6_as_relu: bool) -> list[Chain]:
    """Fold batch norms, equalize and absorb, in place; returns the chains equalized."""
    stats = fold_batch_norms(gm)
    chains = find_chains(gm, ("relu", "identity", "relu6") if relu6_as_relu else ("relu", "identity"))
    modules = dict(gm.named_modules())
    factors = _equalize_chains(modules, chains)
    if high_bias_absorption:
        _absorb_high_bias(modules, chains, stats, factors)
    if relu6_as_relu:
        _replace_relu6(gm, chains)
    return chains


def equalize(model: nn.Module, *, high_bias_absorption: bool = True, relu6_as_relu: bool = False,
             prepare_custom_config: Optional[PrepareCustomConfig] = None) -> fx.GraphModule:
    """Cross-layer equalization of a float model (a copy; ``model`` is not modified).

    Batch norms that follow a conv/linear are folded into it, every chain is equalized (see the module
    docstring) and, optionally, high biases are absorbed. Quantize the result as any float model::

        eq = fxquant.equalize(model)
        prepared = fxquant.prepare_fx(eq, qconfig_mapping, example_inputs)

    Args:
        model: a float model in eval mode.
        high_bias_absorption: absorb ``max(0, beta - 3|gamma|)`` of ReLU chains into the next layer (a small
            approximation, see the module docstring); ``False`` keeps the function exact up to rounding.
        relu6_as_relu: also equalize chains through ReLU6, replacing those ReLU6 by ReLU (changes the function
            where activations exceed 6); by default they are left alone.
        prepare_custom_config: modules to leave untraced, as for ``prepare_fx``.

    Returns:
        The equalized float ``GraphModule``.

    Raises:
        FxQuantError: the model is in training mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"equalize expects a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise FxQuantError("equalize folds batch norms with their running statistics and needs the model in eval "
                           "mode: call model.eval() first")
    gm = trace(copy.deepcopy(model), PrepareCustomConfig.from_dict(prepare_custom_config))  # type: ignore[arg-type]
    _equalize_graph(gm, high_bias_absorption, relu6_as_relu)
    return gm


@dataclasses.dataclass(frozen=True)
class EqualizePass:
    """Cross-layer equalization as a prepare pass (see the module docstring): ``pm.insert_after("normalize",
    EqualizePass())``."""

    high_bias_absorption: bool = True
    relu6_as_relu: bool = False
    name: str = "equalize"
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: Any) -> PassResult:
        if getattr(ctx, "is_qat", False):
            ctx.warnings.append("equalize: skipped for quantization-aware training (its batch norms train); "
                                "equalize the float model before prepare_qat_fx instead")
            return PassResult(gm, False)
        chains = _equalize_graph(gm, self.high_bias_absorption, self.relu6_as_relu)
        return PassResult(gm, bool(chains))


def rescale_channels(model: nn.Module, low: float = 1.0 / 32, high: float = 32.0, seed: int = 0) -> fx.GraphModule:
    """The adversary of equalization: a copy whose channel ranges differ by orders of magnitude, same function.

    Batch norms are folded; then for every ReLU/identity chain whose second layer is not depthwise, output
    channel ``i`` of the first layer is multiplied by ``s[i]`` (log-uniform in ``[low, high]``) and input
    channel ``i`` of the second divided by it, exact because ReLU is positively homogeneous. Chains through
    ReLU6, into a residual add or into a depthwise conv (which would scale its output too) are left alone.

    Args:
        model: a float model in eval mode (not modified).
        low, high: the range of the factors.
        seed: seeds the factors.

    Returns:
        The rescaled float ``GraphModule``.
    """
    if model.training:
        raise FxQuantError("rescale_channels needs the model in eval mode: call model.eval() first")
    gm = trace(copy.deepcopy(model))
    fold_batch_norms(gm)
    modules = dict(gm.named_modules())
    gen = torch.Generator().manual_seed(seed)
    for c in find_chains(gm, ("relu", "identity")):
        a, b = modules[c.first], modules[c.second]
        if _is_depthwise(b):
            continue
        u = torch.rand(a.weight.shape[0], generator=gen, dtype=torch.float64)
        s = torch.exp(math.log(low) + u * (math.log(high) - math.log(low))).to(a.weight.dtype)
        _scale_out(a, s)
        _scale_in(b, 1.0 / s)
    return gm
