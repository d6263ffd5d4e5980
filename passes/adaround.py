"""AdaRound: round each weight up or down so that the layer's *output* error on calibration data is smallest.

Nearest rounding minimises each weight's own error, not what the layer computes from all of them together
(Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"; AIMET's AdaRound).
:func:`adaround` walks the calibrated prepared graph the way bias correction does
(:func:`fxquant.passes.bias_correction.walk_layers`): a float path, and a quantized path where every observed
tensor is fake-quantized with its observer's qparams and every layer already visited computes with the weights it
will have. At each quantized conv / linear, in graph order, one continuous variable ``V`` per weight chooses
between ``floor(w / s)`` and the step above:

    w_soft = s * (clamp(floor(w / s) + h(V) + z, qmin, qmax) - z),   h(V) = clamp(1.2 * sigmoid(V) - 0.1, 0, 1)

with the grid ``(s, z, qmin, qmax)`` of the layer's weight observer (per channel where the qconfig says so, the
table's depthwise range included). Adam minimises, one calibration batch per step,

    mean over positions of sum over output channels (f(x_q; w_soft) - f(x_f; w))^2 + lambda * sum(1 - |2 h(V) - 1|^beta)

where ``x_q`` is the layer's input on the quantized path, ``x_f`` on the float path, and ``f`` includes a fused
ReLU. The regulariser is off for the first ``warmup`` share of the steps, then ``beta`` falls linearly from 20 to 2
and pushes every ``h(V)`` to 0 or 1. ``V`` starts where ``h(V)`` equals the weight's fractional part, so the
starting point is the float weight itself.

The rounding is then ``h(V) >= 0.5``. It is kept only if its output error summed over all batches is below
nearest rounding's (a layer where the optimisation did not help keeps nearest rounding; the report says which).
The layer's weight becomes the chosen grid values (a new tensor: the user's float model is not written) and its
grid is pinned in the node's record (``NodeRecord.weight_qparams``, a new record: a ``copy.deepcopy`` taken before
keeps its own), so ``convert_fx`` and ``convert_to_reference_fx`` quantize the weight exactly as chosen, not on a
grid observed again from the rounded values. ``fxquant.save`` / ``fxquant.load`` and ``torch.save`` keep the pinned
grids; a bare ``state_dict`` does not. A module called at several nodes is rounded once, at the first. From then on
the prepared model computes with the rounded weights (as AIMET's AdaRound leaves its model): a
:func:`fxquant.correct_bias` after it takes them as its float reference. Models from ``prepare_qat_fx`` are
refused: their fake quantizers train the weights and the grid.

Contract of :class:`AdaRoundPass` (name ``"adaround"``): a calibrated prepared GraphModule in, the same with
weights rounded and grids pinned; insert it into a convert pipeline before ``"lower"``. Deterministic given the
data and ``seed``.

Example:
    >>> import torch, fxquant
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    >>> batches = [torch.randn(8, 16) for _ in range(3)]
    >>> prepared = fxquant.prepare_fx(mlp, fxquant.get_default_qconfig_mapping("fbgemm"), (batches[0],))
    >>> fxquant.calibrate(prepared, batches, progress=False)
    >>> rounding = adaround(prepared, batches, iterations=40, progress=False)
    >>> sorted(rounding.layers), rounding.batches
    (['0', '2'], 3)
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, ClassVar, Iterable, Optional

import torch
from torch import fx, nn

from fxquant.errors import CalibrationError
from fxquant.passes.base import PassResult
from fxquant.passes.bias_correction import _CONVS, _run_op, _TwoPaths, layer_batches, walk_layers
from fxquant.passes.context import RECORD_KEY
from fxquant.passes.observe import layer_weight_qparams
from fxquant.qparams import QParams

__all__ = ["AdaRoundConfig", "LayerRounding", "AdaRoundReport", "AdaRoundPass", "adaround"]

#: the stretch of the rectified sigmoid: h(V) reaches exactly 0 and 1 at finite V
_ZETA, _GAMMA = 1.1, -0.1


@dataclasses.dataclass(frozen=True)
class AdaRoundConfig:
    """How each layer's rounding is optimised.

    Attributes:
        iterations: Adam steps per layer (one calibration batch each, in turn).
        lr: Adam's learning rate on ``V``.
        reg_weight: ``lambda``, the weight of the rounding regulariser.
        warmup: share of the steps before the regulariser starts.
        beta: the regulariser's exponent at its start and at the end (annealed linearly between them).
        seed: seeds the order in which batches are visited.
    """

    iterations: int = 500
    lr: float = 1e-2
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"AdaRound needs iterations >= 1, got {self.iterations}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"AdaRound's warmup is a share of the steps in [0, 1), got {self.warmup}")
        if self.lr <= 0 or self.reg_weight < 0:
            raise ValueError(f"AdaRound needs lr > 0 and reg_weight >= 0, got lr={self.lr}, reg_weight={self.reg_weight}")


@dataclasses.dataclass(frozen=True)
class LayerRounding:
    """What AdaRound did to one layer.

    Attributes:
        nearest_error: the layer's output error (mean squared, over all calibration batches) with nearest rounding.
        adaround_error: the same with the rounding AdaRound found.
        flipped: share of the weights rounded the other way than nearest rounding would.
        kept: whether the layer keeps AdaRound's rounding (its error is lower); otherwise nearest rounding.
    """

    nearest_error: float
    adaround_error: float
    flipped: float
    kept: bool


@dataclasses.dataclass
class AdaRoundReport:
    """What :func:`adaround` changed.

    Attributes:
        layers: per quantized conv / linear (qualified module name), its :class:`LayerRounding`.
        batches: calibration batches used.
        seconds: wall time of the whole walk.
    """

    layers: dict[str, LayerRounding]
    batches: int
    seconds: float

    def __str__(self) -> str:
        kept = [n for n, r in self.layers.items() if r.kept]
        lines = [f"AdaRound: {len(kept)} of {len(self.layers)} layers keep their optimised rounding "
                 f"({self.batches} batches, {self.seconds:.1f} s)",
                 f"{'layer':<40} {'nearest MSE':>12} {'AdaRound MSE':>12} {'flipped':>8}  kept"]
        lines += [f"{n:<40} {r.nearest_error:>12.4g} {r.adaround_error:>12.4g} {r.flipped:>8.2%}  {r.kept}"
                  for n, r in self.layers.items()]
        return "\n".join(lines)


def _grid(qp: QParams, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of ``qp`` shaped to broadcast over ``weight``."""
    shape = [1] * weight.dim()
    if qp.is_per_channel:
        shape[qp.axis if qp.axis is not None else 0] = -1
    return (qp.scale.detach().to(torch.float32).reshape(shape),
            qp.zero_point.detach().to(torch.float32).reshape(shape))


def _on_grid(base: torch.Tensor, up: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``scale * (clamp(base + up + zp, qmin, qmax) - zp)``: the weight whose codes are ``base + up`` (``up`` in
    [0, 1], a soft rounding while optimising)."""
    return scale * (torch.clamp(base + up + zp, qp.quant_min, qp.quant_max) - zp)


def _error(op: nn.Module, relu: bool, xs: list[torch.Tensor], targets: list[torch.Tensor], weight: torch.Tensor,
           bias: Optional[torch.Tensor]) -> float:
    """Mean squared output error of ``op`` with ``weight`` over all batches."""
    total, count = 0.0, 0
    for x, y in zip(xs, targets):
        out = _run_op(op, x, weight, bias)
        diff = (torch.relu(out) if relu else out) - y
        total += float((diff * diff).sum())
        count += diff.numel()
    return total / max(count, 1)


def _reuse(paths: _TwoPaths, node: fx.Node, op: nn.Module, relu: bool, qp: QParams) -> None:
    """A module already rounded at an earlier node (called twice: ``fc(relu(fc(x)))``): the same grid pinned
    here too, both paths evaluated with the weights it has (float path: as the prepared model computes)."""
    node.meta[RECORD_KEY] = dataclasses.replace(node.meta[RECORD_KEY], weight_qparams=qp)
    post = torch.relu if relu else (lambda t: t)
    with torch.no_grad():
        for env in (paths.flt, paths.qnt):
            env[node] = [post(_run_op(op, x, op.weight, op.bias)) for x in env[node.args[0]]]  # type: ignore[index]


def _round_layer(paths: _TwoPaths, node: fx.Node, op: nn.Module, relu: bool, cfg: AdaRoundConfig,
                 done: dict[int, tuple[QParams, LayerRounding]]) -> LayerRounding:
    """Optimise one layer's rounding, set its weight and pinned grid, and both paths' outputs."""
    if id(op) in done:
        qp, result = done[id(op)]
        _reuse(paths, node, op, relu, qp)
        return result
    # inference_mode(False) throughout: under a caller's inference mode no tensor could require a gradient, and
    # the clones are normal tensors (a folded conv's weight read under no_grad is an inference tensor)
    with torch.inference_mode(False):
        rec = node.meta[RECORD_KEY]
        qp = layer_weight_qparams(rec, op)
        n = len(paths.batches)
        post = torch.relu if relu else (lambda t: t)
        weight = op.weight.detach().clone().float()
        bias = None if op.bias is None else op.bias.detach().clone()
        xs_q = [paths.qnt[node.args[0]][i].clone() for i in range(n)]  # type: ignore[index]
        targets = [post(_run_op(op, paths.flt[node.args[0]][i].clone(), weight, bias))  # type: ignore[index]
                   for i in range(n)]
        scale, zp = _grid(qp, weight)
        base = torch.floor(weight / scale)
        frac = (weight / scale - base).clamp(0.0, 1.0)
        nearest_up = (frac >= 0.5).float()  # round half up: ties are AdaRound's to break
        # V where h(V) is the fractional part: the optimisation starts at the float weight
        p = ((frac - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
        v = torch.log(p / (1 - p)).requires_grad_(True)
        axis = 1 if isinstance(op, _CONVS) else -1
        order = torch.randperm(n * math.ceil(cfg.iterations / n),
                               generator=torch.Generator().manual_seed(cfg.seed)) % n
        warm = int(cfg.warmup * cfg.iterations)
        with torch.enable_grad():
            opt = torch.optim.Adam([v], lr=cfg.lr)
            for step in range(cfg.iterations):
                h = torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)
                i = int(order[step])
                out = post(_run_op(op, xs_q[i], _on_grid(base, h, scale, zp, qp), bias))
                diff = out - targets[i]
                loss = (diff * diff).mean() * diff.shape[axis]
                if step >= warm and cfg.reg_weight > 0:
                    t = (step - warm) / max(cfg.iterations - warm - 1, 1)
                    beta = cfg.beta[0] + t * (cfg.beta[1] - cfg.beta[0])
                    loss = loss + cfg.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            up = (torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0) >= 0.5).float()
            nearest, rounded = _on_grid(base, nearest_up, scale, zp, qp), _on_grid(base, up, scale, zp, qp)
            err_nearest = _error(op, relu, xs_q, targets, nearest, bias)
            err_ada = _error(op, relu, xs_q, targets, rounded, bias)
            kept = err_ada < err_nearest
            chosen = rounded if kept else nearest
            # codes, not up/down choices: a weight clamped at the range's end is the same code either way
            flipped = float((_on_grid(base, up, 1.0, zp, qp) != _on_grid(base, nearest_up, 1.0, zp, qp)).float().mean())
        raw = op._parameters.get("weight")  # the parameter (a folded conv's .weight is computed when read)
        op.weight = nn.Parameter(chosen.to(raw.dtype if raw is not None else chosen.dtype),
                                 requires_grad=raw is not None and raw.requires_grad)
        # a new record, not a write into the old one: a deepcopy of the prepared model shares the records
        node.meta[RECORD_KEY] = dataclasses.replace(rec, weight_qparams=qp)
        with torch.no_grad():
            paths.flt[node] = targets
            paths.qnt[node] = [post(_run_op(op, x, chosen, bias)) for x in xs_q]
    result = LayerRounding(err_nearest, err_ada, flipped, bool(kept))
    done[id(op)] = (qp, result)
    return result


def adaround(prepared: fx.GraphModule, data: Iterable[Any], iterations: Optional[int] = None, *,
             config: Optional[AdaRoundConfig] = None, progress: bool = True,
             max_batches: Optional[int] = None) -> AdaRoundReport:
    """AdaRound the weights of a calibrated prepared model, in place (see the module docstring).

    ``prepared``, ``data``, ``progress`` and ``max_batches`` are as for :func:`fxquant.correct_bias` (and so
    are its ``CalibrationError``s); ``config`` is an :class:`AdaRoundConfig` (default ``AdaRoundConfig()``: 500
    steps per layer) and ``iterations``, when given, replaces its number of Adam steps per layer. A bad value is a
    ``ValueError``; a model from ``prepare_qat_fx`` is a ``CalibrationError`` (QAT trains the weights' grid
    instead). Returns an :class:`AdaRoundReport`.
    """
    from fxquant.api import STATE_KEY

    cfg = config or AdaRoundConfig()
    if iterations is not None:
        cfg = dataclasses.replace(cfg, iterations=iterations)
    batches = layer_batches(prepared, data, max_batches, "adaround")
    state = prepared.meta.get(STATE_KEY)
    if state is not None and state.is_qat:
        raise CalibrationError("adaround is for post-training quantization: this model comes from prepare_qat_fx, "
                               "whose fake quantizers train the weights and their grid; convert it with convert_fx, "
                               "or prepare the float model with prepare_fx and calibrate it before adaround")
    start = time.perf_counter()
    done: dict[int, tuple[QParams, LayerRounding]] = {}
    layers = walk_layers(prepared, batches,
                         lambda paths, node, op, relu: _round_layer(paths, node, op, relu, cfg, done),
                         "AdaRound", progress)
    return AdaRoundReport(layers, len(batches), time.perf_counter() - start)


@dataclasses.dataclass(frozen=True, eq=False)
class AdaRoundPass:
    """:func:`adaround` as a convert pass: ``pm.insert_before("lower", AdaRoundPass(batches))``."""

    data: tuple[Any, ...]
    config: AdaRoundConfig = AdaRoundConfig()
    progress: bool = False
    name: str = "adaround"
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: Any) -> PassResult:
        report = adaround(gm, self.data, config=self.config, progress=self.progress)
        return PassResult(gm, bool(report.layers))  # weights snapped to the grid and grids pinned, kept or not
