"""Layer sensitivity and automatic mixed precision: which conv / linear layers to keep in float, and how few.

:func:`sensitivity` quantizes the model once per layer, either with only that layer left in float
(``mode="float_one"``, the default) or with only that layer quantized (``"quantize_one"``), and scores each
variant against the float model with a :class:`Target`. :func:`auto_mixed_precision` then keeps the most
sensitive layers float, the fewest that meet the target (binary search over "the k best layers float", each
candidate prepared, calibrated and converted for real), and returns the :class:`~fxquant.QConfigMapping` it
chose (the user's mapping plus ``set_module_name(layer, None)`` per float layer), the converted model and a
report table with each layer's share of the conv/linear FLOPs.

Targets: :class:`MinSQNR` (dB over the model outputs), :class:`MinCosine` (mean per-sample cosine of the first
output, e.g. sentence embeddings) and :class:`MetricTolerance` (the user's metric function on the quantized
model, within ``tolerance`` of the float model's). Every candidate costs one prepare + calibrate + convert:
use a few small calibration batches (it is a search, not the final calibration).

Example:
    >>> import torch, fxquant
    >>> from fxquant.sensitivity import MinSQNR, auto_mixed_precision
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    >>> data = [torch.randn(2, 3, 12, 12) for _ in range(2)]
    >>> result = auto_mixed_precision(model, fxquant.get_default_qconfig_mapping("fbgemm"), data[0], data,
    ...                               MinSQNR(500.0), backend_config="fbgemm", progress=False)
    >>> result.met, len(result.float_layers)   # 500 dB needs everything float
    (True, 2)
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxquant.calibrate import run_batch
from fxquant.errors import FxQuantError
from fxquant.numeric import cosine
from fxquant.qconfig import QConfigMapping
from fxquant.report import _output_sqnr

__all__ = ["SensitivityError", "Target", "MinSQNR", "MinCosine", "MetricTolerance", "LayerSensitivity", "SensitivityReport",
           "MixedPrecisionResult", "sensitivity", "auto_mixed_precision", "quantizable_layers"]


class SensitivityError(FxQuantError, ValueError):
    """Bad arguments to :func:`sensitivity` / :func:`auto_mixed_precision` (the message says what to pass)."""


class Target:
    """What "accurate enough" means: a score of a quantized model (higher is better) and a threshold."""

    def score(self, quantized: nn.Module, reference: list[Any], outputs: list[Any]) -> float:
        """The score of ``quantized``; ``reference`` / ``outputs``: the float / quantized model's outputs on the
        evaluation batches."""
        raise NotImplementedError

    def met(self, score: float) -> bool:
        raise NotImplementedError

    def baseline(self, float_model: nn.Module, batches: Sequence[Any]) -> None:
        """Called once with the float model before any score (targets relative to the float model)."""


def _outputs(model: nn.Module, batches: Sequence[Any]) -> list[Any]:
    with torch.no_grad():
        return [run_batch(model, b) for b in batches]


@dataclasses.dataclass
class MinSQNR(Target):
    """SQNR (dB) of all outputs over all evaluation batches at least ``db``."""

    db: float

    def score(self, quantized: nn.Module, reference: list[Any], outputs: list[Any]) -> float:
        return _output_sqnr(reference, outputs)

    def met(self, score: float) -> bool:
        return score >= self.db


def _first_tensor(out: Any) -> torch.Tensor:
    from torch.utils._pytree import tree_leaves

    return next(t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point())


@dataclasses.dataclass
class MinCosine(Target):
    """Mean cosine similarity per sample at least ``value``. Samples are the rows of the first float output, or
    of ``embed(model, batch)`` when given (e.g. mean-pooled sentence embeddings from token states)."""

    value: float
    embed: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None
    _batches: Sequence[Any] = dataclasses.field(default=(), init=False, repr=False)
    _reference: list[torch.Tensor] = dataclasses.field(default_factory=list, init=False, repr=False)

    def baseline(self, float_model: nn.Module, batches: Sequence[Any]) -> None:
        self._batches = batches
        if self.embed is not None:
            with torch.no_grad():
                self._reference = [self.embed(float_model, b) for b in batches]

    def _rows(self, quantized: nn.Module, reference: list[Any], outputs: list[Any]) -> list[tuple[Any, Any]]:
        if self.embed is None:
            return [(_first_tensor(r), _first_tensor(o)) for r, o in zip(reference, outputs)]
        with torch.no_grad():
            return [(r, self.embed(quantized, b)) for r, b in zip(self._reference, self._batches)]

    def score(self, quantized: nn.Module, reference: list[Any], outputs: list[Any]) -> float:
        sims = []
        for r, o in self._rows(quantized, reference, outputs):
            sims += [cosine(a, b) for a, b in zip(r.reshape(r.shape[0], -1), o.reshape(o.shape[0], -1))]
        return sum(sims) / len(sims)

    def met(self, score: float) -> bool:
        return score >= self.value


@dataclasses.dataclass
class MetricTolerance(Target):
    """The user's ``metric(model) -> float`` (higher is better, e.g. accuracy on a held-out set) on the
    quantized model is at most ``tolerance`` below its value on the float model."""

    metric: Callable[[nn.Module], float]
    tolerance: float
    float_value: Optional[float] = None

    def baseline(self, float_model: nn.Module, batches: Sequence[Any]) -> None:
        with torch.no_grad():
            self.float_value = float(self.metric(float_model))

    def score(self, quantized: nn.Module, reference: list[Any], outputs: list[Any]) -> float:
        with torch.no_grad():
            return float(self.metric(quantized))

    def met(self, score: float) -> bool:
        assert self.float_value is not None, "baseline() runs first"
        return self.float_value - score <= self.tolerance


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """One layer: its multiply-accumulates per sample and the score (and output SQNR, the tie-breaker) of the
    variant that singles it out."""

    name: str
    op: str
    flops: int
    score: float
    sqnr: float


def _flop_share(layer: LayerSensitivity, total: int) -> str:
    return f"{layer.flops / total:6.1%}" if total else "     -"


@dataclasses.dataclass(frozen=True)
class SensitivityReport:
    """Per-layer scores, most helpful first (``float_one``: keeping it float helps most; ``quantize_one``:
    quantizing it alone hurts most)."""

    mode: str
    all_int8: float
    layers: tuple[LayerSensitivity, ...]

    @property
    def total_flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    def __str__(self) -> str:
        what = "score with only this layer float" if self.mode == "float_one" else "score with only this layer int8"
        lines = [f"all int8: {self.all_int8:.4f}", f"{'layer':<36} {'op':<14} {'FLOPs':>7} {'SQNR dB':>8}  {what}"]
        lines += [f"{r.name[:36]:<36} {r.op[:14]:<14} {_flop_share(r, self.total_flops):>7} {r.sqnr:>8.2f}  "
                  f"{r.score:.4f}" for r in self.layers]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class MixedPrecisionResult:
    """What :func:`auto_mixed_precision` chose."""

    qconfig_mapping: QConfigMapping
    float_layers: tuple[str, ...]
    score: float
    met: bool
    int8_flop_share: float
    model: fx.GraphModule
    sensitivity: Optional[SensitivityReport]
    evaluations: int

    def __str__(self) -> str:
        head = (f"target {'met' if self.met else 'NOT met'}: score {self.score:.4f} with {len(self.float_layers)} "
                f"layer(s) float, {self.int8_flop_share:.1%} of conv/linear FLOPs in int8 "
                f"({self.evaluations} candidates quantized)")
        floats = "".join(f"\n  float: {name}" for name in self.float_layers)
        return head + floats + (f"\n{self.sensitivity}" if self.sensitivity is not None else "")


def _flops(module: nn.Module, out: Any) -> int:
    """Multiply-accumulates per sample of one call of a conv / linear module with output ``out``."""
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        return 0
    per_sample = out.numel() // max(out.shape[0], 1) if out.dim() > 1 else out.numel()
    if isinstance(module, nn.modules.conv._ConvNd):
        k = 1
        for s in module.kernel_size:
            k *= s
        return per_sample * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return per_sample * module.in_features
    return 0


_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def quantizable_layers(model: nn.Module, example: tuple[Any, ...], backend: Any = None) -> dict[str, tuple[str, int]]:
    """The conv / linear modules that run on ``example`` (qualified names) -> (class name, multiply-accumulates
    per sample), in call order. Found with forward hooks, so models torch.fx cannot trace whole work too."""
    found: dict[str, tuple[str, int]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, out: Any) -> None:
            kind, flops = found.get(name, (type(module).__name__, 0))
            found[name] = (kind, flops + _flops(module, out))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if isinstance(m, _LAYER_TYPES)]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in handles:
            h.remove()
    return {name: v for name, v in found.items() if v[1] > 0}


@dataclasses.dataclass
class _Search:
    """One search: the inputs every candidate is quantized and scored with (a context object)."""

    model: nn.Module
    mapping: QConfigMapping
    example: tuple[Any, ...]
    calibration: Sequence[Any]
    evaluation: Sequence[Any]
    target: Target
    backend: Any
    reference: list[Any]
    fallback: Any = None  #: the qconfig sensitive layers get instead of the mapping's (``None``: float)
    evaluations: int = 0
    last_outputs: list[Any] = dataclasses.field(default_factory=list)

    def quantize(self, mapping: QConfigMapping) -> fx.GraphModule:
        import fxquant

        prepared = fxquant.prepare_fx(self.model, mapping, self.example, backend_config=self.backend)
        fxquant.calibrate(prepared, self.calibration, progress=False)
        self.evaluations += 1
        return fxquant.convert_fx(prepared)

    def with_float(self, layers: Sequence[str]) -> QConfigMapping:
        """The user's mapping with ``layers`` given the fallback (float by default)."""
        mapping = copy.deepcopy(self.mapping)
        for name in layers:
            mapping.set_module_name(name, self.fallback)
        return mapping

    def only_int8(self, layer: str) -> QConfigMapping:
        mapping = QConfigMapping().set_global(None)
        return mapping.set_module_name(layer, self.mapping.qconfig_for(layer, type(self.model.get_submodule(layer))))

    def score(self, mapping: QConfigMapping) -> tuple[float, fx.GraphModule]:
        q = self.quantize(mapping)
        self.last_outputs = _outputs(q, self.evaluation)
        return self.target.score(q, self.reference, self.last_outputs), q

    def last_sqnr(self) -> float:
        return _output_sqnr(self.reference, self.last_outputs)


def _batches(data: Any) -> list[Any]:
    return [data] if isinstance(data, torch.Tensor) else list(data)


def _search(model: nn.Module, mapping: Any, example: Any, calibration: Any, target: Target, evaluation: Any,
            backend_config: Any, fallback: Any = None) -> _Search:
    from fxquant.api import _default_backend, _example_inputs, _mapping

    if model.training:  # not model.eval(): the user's model is not ours to change
        raise SensitivityError("sensitivity analysis quantizes for post-training inference and needs the model in "
                               "eval mode: call model.eval() first")
    backend = _default_backend(backend_config)
    evaluation = _batches(evaluation if evaluation is not None else calibration)
    target.baseline(model, evaluation)
    return _Search(model, _mapping(mapping), _example_inputs(example), _batches(calibration), evaluation, target,
                   backend, _outputs(model, evaluation), fallback)


def sensitivity(model: nn.Module, qconfig_mapping: Any, example_inputs: Any, calibration: Any,
                target: Optional[Target] = None, *, evaluation: Any = None, backend_config: Any = None,
                mode: str = "float_one", layers: Optional[Sequence[str]] = None,
                fallback: Any = None, progress: bool = True) -> SensitivityReport:
    """Score one quantized variant per conv / linear layer (see the module docstring).

    Args:
        model: the float model (eval mode; not modified).
        qconfig_mapping: the mapping to start from.
        example_inputs: as for ``prepare_fx``.
        calibration: batches to calibrate every variant with (a few small ones).
        target: how variants are scored (default ``MinSQNR(0)``: output SQNR).
        evaluation: batches the scores are computed on (default: the calibration batches).
        backend_config: as for ``prepare_fx``.
        mode: ``"float_one"`` (each layer alone float) or ``"quantize_one"`` (each layer alone int8).
        layers: the layers to try (default: every conv / linear, :func:`quantizable_layers`).
        fallback: in ``float_one`` mode, the qconfig the singled-out layer gets instead of float (e.g.
            ``fxquant.per_token_dynamic_qconfig``: int8 weights, activations quantized per row at run time).
        progress: show a progress bar.

    Returns:
        A :class:`SensitivityReport`, most helpful layer first.
    """
    if mode not in ("float_one", "quantize_one"):
        raise SensitivityError(f"mode must be 'float_one' or 'quantize_one', got {mode!r}")
    s = _search(model, qconfig_mapping, example_inputs, calibration, target or MinSQNR(0.0), evaluation, backend_config,
                fallback)
    return _sensitivity(s, mode, layers, progress)


def _sensitivity(s: _Search, mode: str, layers: Optional[Sequence[str]], progress: bool) -> SensitivityReport:
    found = quantizable_layers(s.model, s.example, s.backend)
    names = list(layers) if layers is not None else list(found)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise SensitivityError(f"not conv / linear layers of the model: {unknown[:5]}; choose from {list(found)[:10]}")
    all_int8, _ = s.score(s.mapping)
    rows = []
    for name in tqdm(names, desc=f"sensitivity ({mode})", disable=not progress):
        score, _ = s.score(s.with_float([name]) if mode == "float_one" else s.only_int8(name))
        rows.append(LayerSensitivity(name, found[name][0], found[name][1], score, s.last_sqnr()))
    # coarse user metrics (accuracy) tie often: the output SQNR breaks ties
    rows.sort(key=lambda r: (r.score, r.sqnr), reverse=(mode == "float_one"))
    return SensitivityReport(mode, all_int8, tuple(rows))


def _int8_share(q: nn.Module, layers: dict[str, tuple[str, int]], example: tuple[Any, ...]) -> float:
    """The share of the layers' multiply-accumulates the converted model runs in int8: what float conv / linear
    modules are left in it (alone, inside fused float modules, inside quantized pieces) compute is float."""
    total = sum(f for _, f in layers.values())
    float_flops = sum(f for _, f in quantizable_layers(q, example).values())
    return max(0.0, 1.0 - float_flops / total) if total else 0.0


def auto_mixed_precision(model: nn.Module, qconfig_mapping: Any, example_inputs: Any, calibration: Any,
                         target: Target, *, evaluation: Any = None, backend_config: Any = None,
                         max_float: Optional[int] = None, fallback: Any = None,
                         progress: bool = True) -> MixedPrecisionResult:
    """Keep the fewest, most sensitive conv / linear layers in float (or at the ``fallback`` qconfig) until
    ``target`` holds.

    Args:
        model, qconfig_mapping, example_inputs, calibration, evaluation, backend_config: as for :func:`sensitivity`.
        target: :class:`MinSQNR`, :class:`MinCosine` or :class:`MetricTolerance`.
        max_float: the most layers to leave float (default: all of them).
        fallback: the qconfig the chosen layers get instead of float (``None``: float), e.g.
            ``fxquant.per_token_dynamic_qconfig`` keeps their multiply-accumulates in int8 with activations
            quantized per token at run time (transformers); ``float_layers`` then names the layers that got it.
        progress: show progress bars.

    Returns:
        A :class:`MixedPrecisionResult`; ``met`` is False when even ``max_float`` float layers miss the target
        (the result is then the best candidate tried).
    """
    s = _search(model, qconfig_mapping, example_inputs, calibration, target, evaluation, backend_config, fallback)
    layers = quantizable_layers(s.model, s.example, s.backend)
    score, q = s.score(s.mapping)
    if target.met(score):
        return MixedPrecisionResult(s.mapping, (), score, True, _int8_share(q, layers, s.example), q, None, s.evaluations)
    report = _sensitivity(s, "float_one", None, progress)
    order = [r.name for r in report.layers]
    lo, hi = 1, min(len(order), max_float if max_float is not None else len(order))
    best: Optional[tuple[int, float, fx.GraphModule]] = None
    tried: dict[int, tuple[float, fx.GraphModule]] = {}
    while lo <= hi:  # the smallest k whose k most helpful layers, kept float, meet the target
        k = (lo + hi) // 2
        tried[k] = s.score(s.with_float(order[:k]))
        if target.met(tried[k][0]):
            best, hi = (k, *tried[k]), k - 1
        else:
            lo = k + 1
    if best is None:
        k = max(tried, key=lambda i: tried[i][0]) if tried else 0
        best = (k, *tried[k]) if tried else (0, score, q)
    k, score, q = best
    return MixedPrecisionResult(s.with_float(order[:k]), tuple(order[:k]), score, target.met(score),
                                _int8_share(q, layers, s.example), q, report, s.evaluations)
