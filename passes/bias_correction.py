"""Empirical bias correction: shift each quantized layer's bias by its mean output error on calibration data.

Quantizing weights (and the activations a layer reads) changes the mean of its output: ``E[W_q x_q] !=
E[W x]``. The next layers see that shift as a systematic error, which a per-channel bias can cancel (Nagel et
al. 2019, section 4.2; AIMET's empirical bias correction). :func:`correct_bias` runs the calibration batches
through two copies of the prepared graph node by node:

* the float path: the prepared model as it computes (observers are identities);
* the quantized path: every observed tensor fake-quantized with its observer's qparams and every quantized
  conv/linear run with its weight fake-quantized as ``convert_fx`` will quantize it (same weight observer);

at each quantized conv/linear (in graph order) the per-channel mean of ``quantized - float`` pre-activation
outputs over all batches is subtracted from the layer's bias, and from the quantized path's output before it
flows on, so later layers are corrected for what earlier corrections left.

Contract of :class:`BiasCorrectionPass` (name ``"bias_correction"``): a calibrated prepared GraphModule in,
the same with biases corrected (a bias is created where a layer had none); insert it into a convert pipeline
before ``"lower"``. Deterministic given the data.

Example:
    >>> import torch, fxquant
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    >>> data = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    >>> p = fxquant.prepare_fx(m, fxquant.get_default_qconfig_mapping("x86"), (data[0],), backend_config="x86")
    >>> fxquant.calibrate(p, data, progress=False)
    >>> rep = correct_bias(p, data, progress=False)
    >>> sorted(rep.shifts)
    ['0', '2']
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from fxquant.errors import CalibrationError
from fxquant.fake_quantize import is_observer
from fxquant.fused import _OpReLU
from fxquant.passes.base import PassResult
from fxquant.passes.context import RECORD_KEY
from fxquant.passes.observe import layer_weight_qparams
from fxquant.qparams import fake_quantize

__all__ = ["BiasCorrectionReport", "BiasCorrectionPass", "correct_bias", "layer_batches", "walk_layers"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclasses.dataclass
class BiasCorrectionReport:
    """What :func:`correct_bias` changed.

    Attributes:
        shifts: per corrected module (qualified name), the largest absolute change of its bias.
        batches: calibration batches used.
    """

    shifts: dict[str, float]
    batches: int


def _weighted_op(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[tuple[nn.Module, bool]]:
    """``(conv or linear module, followed by ReLU)`` for a quantized weighted node, else ``None``."""
    rec = node.meta.get(RECORD_KEY)
    if node.op != "call_module" or rec is None or not rec.quantizable or rec.entry.weight is None:
        return None
    module = modules[str(node.target)]
    op, relu = (module.op, True) if isinstance(module, _OpReLU) else (module, False)
    return (op, relu) if isinstance(op, _CONVS + (nn.Linear,)) else None


def _run_op(op: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The conv / linear ``op`` on ``x`` with the given weight and bias."""
    if isinstance(op, nn.Linear):
        return F.linear(x, weight, bias)
    return op._conv_forward(x, weight, bias)  # type: ignore[union-attr,operator]


def _observe_q(module: nn.Module, x: Any) -> Any:
    """What the quantized path sees through an observer: ``x`` fake-quantized with its qparams."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return x
    try:
        qp = module.qparams()  # type: ignore[operator]
    except ValueError:  # a placeholder (float16 / dynamic): no integer grid
        return x
    return fake_quantize(x, qp)


class _TwoPaths:
    """The float and quantized values of every live node, one entry per batch."""

    def __init__(self, gm: fx.GraphModule, batches: list[tuple[Any, ...]]) -> None:
        self.gm, self.batches = gm, batches
        self.modules = dict(gm.named_modules())
        self.flt: dict[fx.Node, list[Any]] = {}
        self.qnt: dict[fx.Node, list[Any]] = {}
        self.remaining = {n: len(n.users) for n in gm.graph.nodes}
        self.placeholders = 0

    def args(self, node: fx.Node, env: dict[fx.Node, list[Any]], i: int) -> tuple[Any, Any]:
        args = fx.node.map_arg(node.args, lambda n: env[n][i])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n][i])
        return args, kwargs

    def release(self, node: fx.Node) -> None:
        for n in node.all_input_nodes:
            self.remaining[n] -= 1
            if self.remaining[n] == 0:
                self.flt.pop(n, None)
                self.qnt.pop(n, None)

    def plain(self, node: fx.Node) -> None:
        """Evaluate a node that is neither an observer nor a quantized layer, on both paths."""
        if node.op == "placeholder":
            pos = self.placeholders
            self.placeholders += 1
            values = [b[pos] if pos < len(b) else node.args[0] if node.args else None for b in self.batches]
            self.flt[node] = self.qnt[node] = values
            return
        if node.op == "get_attr":
            value = self.gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            self.flt[node] = self.qnt[node] = [value] * len(self.batches)
            return
        for env in (self.flt, self.qnt):
            env[node] = [self._call(node, *self.args(node, env, i)) for i in range(len(self.batches))]

    def _call(self, node: fx.Node, args: Any, kwargs: Any) -> Any:
        if node.op == "call_module":
            return self.modules[str(node.target)](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        self_obj, *rest = args
        return getattr(self_obj, str(node.target))(*rest, **kwargs)


def _correct_layer(paths: _TwoPaths, node: fx.Node, op: nn.Module, relu: bool) -> float:
    """Correct one layer's bias; set both paths' outputs; return the largest shift."""
    w_q = fake_quantize(op.weight.detach(), layer_weight_qparams(node.meta[RECORD_KEY], op))
    n = len(paths.batches)
    flt = [_run_op(op, paths.flt[node.args[0]][i], op.weight, op.bias) for i in range(n)]  # type: ignore[index]
    qnt = [_run_op(op, paths.qnt[node.args[0]][i], w_q, op.bias) for i in range(n)]  # type: ignore[index]
    axis = 1 if isinstance(op, _CONVS) else -1
    diff = torch.stack([(q - f).movedim(axis, 0).reshape(q.shape[axis], -1).mean(1) for q, f in zip(qnt, flt)])
    weights = torch.tensor([float(f.numel()) for f in flt])
    shift = (diff * (weights / weights.sum()).unsqueeze(1)).sum(0)
    # a new tensor, not an in-place write: the prepared model shares its float weights with the user's model
    old_bias = op.bias.detach() if op.bias is not None else torch.zeros_like(shift)
    raw_bias = op._parameters.get("bias")  # the parameter (a folded conv's .bias is computed when read)
    op.bias = nn.Parameter((old_bias - shift).detach(), requires_grad=raw_bias is not None and raw_bias.requires_grad)
    shape = [1] * flt[0].dim()
    shape[axis] = -1
    post = torch.relu if relu else (lambda t: t)
    paths.flt[node] = [post(f) for f in flt]
    paths.qnt[node] = [post(q - shift.reshape(shape)) for q in qnt]
    return float(shift.abs().max())


def layer_batches(prepared: Any, data: Iterable[Any], max_batches: Optional[int], who: str) -> list[tuple[Any, ...]]:
    """The batches of ``data`` as tuples of positional inputs, after checking that ``prepared`` is a calibrated
    prepared GraphModule (``who``: the function named in errors)."""
    if not isinstance(prepared, fx.GraphModule) or not any(is_observer(m) for m in prepared.modules()):
        raise CalibrationError(f"{who} expects a calibrated model from fxquant.prepare_fx (a GraphModule with "
                               f"observers), got {type(prepared).__name__}; a model prepared in pieces (partial "
                               "tracing) is not supported")
    if isinstance(data, torch.Tensor):
        raise CalibrationError(f"{who}: data is one tensor {tuple(data.shape)}; pass an iterable of batches")
    out = []
    for i, b in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        out.append(tuple(b) if isinstance(b, (tuple, list)) else (b,))
    if not out:
        raise CalibrationError(f"{who}: no calibration batch; pass at least one batch of representative inputs")
    return out


def walk_layers(prepared: fx.GraphModule, batches: list[tuple[Any, ...]],
                on_layer: Callable[[_TwoPaths, fx.Node, nn.Module, bool], Any], desc: str,
                progress: bool) -> dict[str, Any]:
    """Run ``batches`` through the float and quantized paths of ``prepared`` node by node, calling
    ``on_layer(paths, node, op, relu)`` at each quantized conv / linear in graph order instead of evaluating it
    (it must set ``paths.flt[node]`` and ``paths.qnt[node]``); what it returns, per module name."""
    paths = _TwoPaths(prepared, batches)
    out: dict[str, Any] = {}
    with torch.no_grad():
        for node in tqdm(list(prepared.graph.nodes), desc=desc, disable=not progress, leave=False):
            module = paths.modules.get(str(node.target)) if node.op == "call_module" else None
            weighted = _weighted_op(node, paths.modules)
            if node.op == "output":
                break
            if is_observer(module):
                src = node.args[0]
                paths.flt[node] = paths.flt[src]  # type: ignore[index]
                paths.qnt[node] = [_observe_q(module, v) for v in paths.qnt[src]]  # type: ignore[index,arg-type]
            elif weighted is not None:
                out[str(node.target)] = on_layer(paths, node, *weighted)
            else:
                paths.plain(node)
            paths.release(node)
    return out


def correct_bias(prepared: fx.GraphModule, data: Iterable[Any], progress: bool = True,
                 max_batches: Optional[int] = None) -> BiasCorrectionReport:
    """Empirical bias correction of a calibrated prepared model, in place (see the module docstring).

    Args:
        prepared: the result of ``prepare_fx``, calibrated (its observers give qparams).
        data: batches (tensors or tuples of positional inputs), e.g. the calibration batches; all of them are
            held in memory with one layer's activations at a time.
        progress: show a tqdm progress bar over the graph's nodes.
        max_batches: use at most this many batches.

    Returns:
        A :class:`BiasCorrectionReport`.

    Raises:
        CalibrationError: the model is not a prepared GraphModule, is not calibrated, or there is no data.
    """
    batches = layer_batches(prepared, data, max_batches, "correct_bias")
    return BiasCorrectionReport(walk_layers(prepared, batches, _correct_layer, "bias correction", progress),
                                len(batches))


@dataclasses.dataclass(frozen=True, eq=False)
class BiasCorrectionPass:
    """:func:`correct_bias` as a convert pass: ``pm.insert_before("lower", BiasCorrectionPass(batches))``."""

    data: tuple[Any, ...]
    progress: bool = False
    name: str = "bias_correction"
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: Any) -> PassResult:
        report = correct_bias(gm, self.data, progress=self.progress)
        return PassResult(gm, bool(report.shifts))
