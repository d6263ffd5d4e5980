"""Numeric comparison of a float model and its quantized model, layer by layer (what torch.ao's Numeric Suite does).

Both models run on the same inputs. Every value of the converted graph is matched to the float value it
stands for by node name: the float side is the user's model traced and fused exactly as ``prepare_fx`` did
(same tracer, same ``normalize`` and ``fuse`` passes, so ``conv1`` is the fused conv + bn + relu in both), and
``lower`` keeps the name of every node it rewrites. Values lowering inserted (quantize, dequantize) stand for
their input. Each layer gets two comparisons:

* **propagated**: the quantized model's own activation (errors of every layer before it included);
* **isolated**: the layer's kernel run on the *float* model's inputs to that layer (quantized with the same
  qparams), so the figure is the error this layer adds by itself.

Metrics are SQNR (dB), cosine similarity and relative L2 error. :func:`compare_weights` compares each
quantized weight with the fused float weight (batch norm folded in).

Example:
    >>> import torch, fxquant
    >>> from fxquant.numeric import compare_layers
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    >>> x = torch.randn(4, 3, 16, 16)
    >>> prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,), backend_config="fbgemm")
    >>> fxquant.calibrate(prepared, [x], progress=False)
    >>> rep = compare_layers(model, fxquant.convert_fx(prepared), (x,))
    >>> [r.name for r in rep.layers]
    ['_0', '_2']
    >>> all(r.isolated_sqnr > 20 for r in rep.layers)
    True
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Optional, Union

import torch
from torch import fx, nn

from fxquant.backends.config import Observation
from fxquant.errors import FxQuantError
from fxquant.passes.context import RECORD_KEY, QuantContext
from fxquant.qparams import sqnr

__all__ = ["LayerComparison", "WeightComparison", "NumericReport", "compare_layers", "compare_weights",
           "float_reference", "cosine", "relative_l2", "sqnr"]


def cosine(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Cosine similarity of the two tensors, flattened (1.0 for two zero tensors)."""
    a, b = reference.detach().double().flatten(), approx.detach().double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b) / (na * nb)


def relative_l2(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``|ref - approx| / |ref|`` (0.0 when both are zero, ``inf`` when only the reference is)."""
    a, b = reference.detach().double(), approx.detach().double()
    err, norm = float((a - b).norm()), float(a.norm())
    if norm == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / norm


@dataclasses.dataclass(frozen=True)
class LayerComparison:
    """One layer's output, quantized vs float: propagated (the quantized model as it runs) and isolated."""

    name: str
    op: str
    sqnr: float
    cosine: float
    rel_l2: float
    isolated_sqnr: Optional[float] = None
    isolated_cosine: Optional[float] = None
    isolated_rel_l2: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class WeightComparison:
    """One quantized weight vs the fused float weight."""

    name: str
    sqnr: float
    cosine: float
    rel_l2: float


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


@dataclasses.dataclass(frozen=True)
class NumericReport:
    """Per-layer (and per-weight) comparison; ``str()`` is a table in graph order."""

    layers: tuple[LayerComparison, ...]
    weights: tuple[WeightComparison, ...] = ()

    def layer(self, name: str) -> LayerComparison:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"no layer {name!r} in the report; layers: {[r.name for r in self.layers]}")

    def worst(self, n: int = 5, isolated: bool = True) -> list[LayerComparison]:
        """The ``n`` layers with the lowest (isolated, else propagated) SQNR."""
        def key(r: LayerComparison) -> float:
            return r.isolated_sqnr if isolated and r.isolated_sqnr is not None else r.sqnr
        return sorted(self.layers, key=key)[:n]

    def __str__(self) -> str:
        head = f"{'layer':<28} {'op':<16} {'SQNR dB':>8} {'cosine':>8} {'rel L2':>8} {'iso SQNR':>9} {'iso cos':>8}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            lines.append(f"{r.name[:28]:<28} {r.op[:16]:<16} {r.sqnr:>8.2f} {r.cosine:>8.5f} {r.rel_l2:>8.4f} "
                         f"{_fmt(r.isolated_sqnr, '9.2f'):>9} {_fmt(r.isolated_cosine, '8.5f'):>8}")
        if self.weights:
            lines += ["", f"{'weight':<28} {'SQNR dB':>8} {'cosine':>8} {'rel L2':>8}"]
            lines += [f"{w.name[:28]:<28} {w.sqnr:>8.2f} {w.cosine:>8.5f} {w.rel_l2:>8.4f}" for w in self.weights]
        return "\n".join(lines)


def _state(quantized: nn.Module) -> Any:
    from fxquant.api import STATE_KEY

    state = quantized.meta.get(STATE_KEY) if isinstance(quantized, fx.GraphModule) else None
    if state is None or state.stage != "converted":
        raise FxQuantError(f"expected the model returned by fxquant.convert_fx, got {type(quantized).__name__}"
                           f"{'' if state is None else ' (a prepared model: calibrate and convert it first)'}; models "
                           "quantized in pieces (fxquant.partial) are compared piece by piece")
    return state


def float_reference(float_model: nn.Module, backend: Any, prepare_custom_config: Any = None) -> fx.GraphModule:
    """The float model traced and fused as ``prepare_fx`` does it (node names match the prepared and converted
    graphs); the model itself is not touched."""
    from fxquant.decomposed import decompose_attention
    from fxquant.passes.pipelines import fuse_pipeline
    from fxquant.tracer import PrepareCustomConfig, trace

    model = copy.deepcopy(float_model).eval()
    decompose_attention(model)
    gm = trace(model, PrepareCustomConfig.from_dict(prepare_custom_config))  # type: ignore[arg-type]
    return fuse_pipeline(verify=False).run(gm, QuantContext(backend=backend))


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps a copy of every node's tensor value by name (a copy: a kernel may later write
    into a tensor in place, as oneDNN's conv + add does into its residual input)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out.clone() if isinstance(out, torch.Tensor) else out
        return out


def _as_float(v: Any) -> Optional[torch.Tensor]:
    if not isinstance(v, torch.Tensor):
        return None
    if v.is_quantized:
        return v.dequantize()
    return v if v.is_floating_point() else None


class _Converted:
    """The converted graph's view of values: float counterparts by node, and the grid of integer carriers.

    Quantized values are quantized tensors (the qtensor kernel layer) or plain ``uint8`` / ``int8`` tensors
    whose grid is held by the module that produced them (the oneDNN layer: ``scale`` / ``zero_point``
    buffers); ops on the integers that keep the grid (pooling, reshapes) inherit their input's.
    """

    def __init__(self, gm: fx.GraphModule, reference: fx.GraphModule, backend: Any) -> None:
        self.gm, self.modules = gm, dict(gm.named_modules())
        self.counterpart = _counterparts(gm, reference, backend)

    def grid(self, n: fx.Node) -> Optional[tuple[float, int]]:
        while True:
            if n.op == "call_module":
                m = self.modules[str(n.target)]
                scale, zp = getattr(m, "scale", None), getattr(m, "zero_point", None)
                if isinstance(scale, torch.Tensor) and isinstance(zp, torch.Tensor) and scale.numel() == 1:
                    return float(scale), int(zp)
            if not n.all_input_nodes:
                return None
            n = n.all_input_nodes[0]

    def to_float(self, n: fx.Node, v: Any) -> Optional[torch.Tensor]:
        if isinstance(v, torch.Tensor) and not v.is_quantized and v.dtype in (torch.uint8, torch.int8):
            grid = self.grid(n)
            return None if grid is None else (v.float() - grid[1]) * grid[0]
        return _as_float(v)

    def requantize(self, n: fx.Node, value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """``ref`` (float) on the grid and in the carrier of ``value``, the converted value of node ``n``."""
        if value.is_quantized:
            return torch.quantize_per_tensor(ref.float(), value.q_scale(), value.q_zero_point(), value.dtype)
        scale, zp = self.grid(n)  # type: ignore[misc]
        info = torch.iinfo(value.dtype)
        return _layout_like(torch.floor(ref.float() / scale + zp + 0.5).clamp(info.min, info.max).to(value.dtype),
                            value)


def _layout_like(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``t`` in ``value``'s memory format (kernels may want channels-last inputs, as the ones they produce)."""
    for dims, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if value.dim() == dims and not value.is_contiguous() and value.is_contiguous(memory_format=fmt):
            return t.contiguous(memory_format=fmt)
    return t


def _counterparts(gm: fx.GraphModule, reference: fx.GraphModule, backend: Any) -> dict[str, str]:
    """Converted node name -> the float reference node it computes. Usually the same name; where lowering merged
    a consumer into its producer (oneDNN's conv + add under the conv's name, the record of the add), the
    producer's nearest user that is the recorded op; where it dropped a clamp the producer's grid applies, the
    clamp (``NodeRecord.computes``)."""
    ref_nodes = {n.name: n for n in reference.graph.nodes}
    ref_modules = dict(reference.named_modules())
    out: dict[str, str] = {}
    for n in gm.graph.nodes:
        rec = n.meta.get(RECORD_KEY)
        r = ref_nodes.get(n.name)
        if rec is not None and rec.computes in ref_nodes:  # its output is a dropped clamp's (conv -> relu6)
            out[n.name] = rec.computes
            continue
        if r is None or rec is None or rec.entry is None:
            if r is not None:
                out[n.name] = r.name
            continue
        frontier, seen = [r], set()
        for _ in range(4):  # the producer, then its users, their users, ...
            hit = next((c for c in frontier if rec.entry.op.matches(c, ref_modules) or (
                backend.entry_for(c, ref_modules) or rec.entry).name == rec.entry.name), None)
            if hit is not None:
                out[n.name] = hit.name
                break
            seen.update(frontier)
            frontier = [u for c in frontier for u in c.users if u not in seen]
    return out


class _IsolatedRecorder(_Recorder):
    """Runs the converted graph; at each layer also runs the layer on the float model's inputs."""

    def __init__(self, view: _Converted, reference: dict[str, Any], layers: set[str]) -> None:
        super().__init__(view.gm)
        self.view = view
        self.reference = reference
        self.layers = layers
        self.isolated: dict[str, Any] = {}

    def float_value(self, n: fx.Node) -> Any:
        """The float model's value for converted node ``n`` (inserted quantize/dequantize: their input's)."""
        while n.name not in self.view.counterpart:
            inputs = n.all_input_nodes
            if n.op not in ("call_module", "call_method") or len(inputs) != 1:
                return None
            n = inputs[0]
        return self.reference.get(self.view.counterpart[n.name])

    def _isolated_arg(self, a: fx.Node) -> Any:
        value, ref = self.env[a], self.float_value(a)
        if not isinstance(value, torch.Tensor) or not isinstance(ref, torch.Tensor) or ref.shape != value.shape:
            return value
        if value.is_quantized and value.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            return value
        if value.is_quantized or (value.dtype in (torch.uint8, torch.int8) and self.view.grid(a) is not None):
            return self.view.requantize(a, value, ref)
        return ref if value.is_floating_point() and ref.is_floating_point() else value

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.layers:
            args = fx.node.map_arg(n.args, self._isolated_arg)
            kwargs = fx.node.map_arg(n.kwargs, self._isolated_arg)
            self.isolated[n.name] = getattr(self, n.op)(n.target, args, kwargs)
        return out


def _layer_nodes(gm: fx.GraphModule, names: dict[str, str], all_nodes: bool) -> list[fx.Node]:
    """Converted nodes to report: quantized ops with their own output grid (conv, linear, add, ...), and producers
    that compute a consumer (a kernel fusion into a shares-input op, a dropped clamp)."""
    out = []
    for n in gm.graph.nodes:
        rec = n.meta.get(RECORD_KEY)
        if n.name not in names or rec is None or rec.entry is None:
            continue
        own_grid = rec.entry.observation in (Observation.OWN, Observation.FIXED)
        merged = names[n.name] != n.name  # a producer computing its consumer (oneDNN conv + relu6, a dropped clamp)
        if all_nodes or (rec.quantized_output and (own_grid or merged)):
            out.append(n)
    return out


def _metrics(ref: torch.Tensor, approx: torch.Tensor) -> tuple[float, float, float]:
    ref, approx = ref.detach().float(), approx.detach().float()
    return sqnr(ref, approx), cosine(ref, approx), relative_l2(ref, approx)


def compare_layers(float_model: nn.Module, quantized: fx.GraphModule, inputs: Union[tuple[Any, ...], torch.Tensor],
                   *, isolated: bool = True, weights: bool = True, all_nodes: bool = False,
                   prepare_custom_config: Any = None) -> NumericReport:
    """Compare every quantized layer of ``quantized`` with ``float_model`` on ``inputs``.

    Args:
        float_model: the float model that was prepared (not modified).
        quantized: its ``convert_fx`` result.
        inputs: a tuple of positional inputs (one batch).
        isolated: also run each layer on the float model's inputs to it (the error it adds alone).
        weights: also compare the weights (:func:`compare_weights`).
        all_nodes: report every matched node with a table entry, not just layers with their own output grid.
        prepare_custom_config: the one given to ``prepare_fx`` (non-traceable modules), if any.

    Returns:
        A :class:`NumericReport`; ``print(report)`` shows the table.
    """
    state = _state(quantized)
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    ref_gm = float_reference(float_model, state.backend, prepare_custom_config)
    view = _Converted(quantized, ref_gm, state.backend)
    with torch.no_grad():
        ref = _Recorder(ref_gm)
        ref.run(*inputs)
        nodes = _layer_nodes(quantized, view.counterpart, all_nodes)
        q = _IsolatedRecorder(view, ref.values, {n.name for n in nodes} if isolated else set())
        q.run(*inputs)
    rows = []
    for n in nodes:
        f = _as_float(ref.values[view.counterpart[n.name]])
        v = view.to_float(n, q.values.get(n.name))
        if f is None or v is None or f.shape != v.shape:
            continue
        iso = view.to_float(n, q.isolated.get(n.name))
        iso_m = _metrics(f, iso) if iso is not None and iso.shape == f.shape else (None, None, None)
        rows.append(LayerComparison(n.name, n.meta[RECORD_KEY].entry.name, *_metrics(f, v), *iso_m))
    return NumericReport(tuple(rows), tuple(compare_weights(float_model, quantized, ref_gm)) if weights else ())


def _quantized_weight(module: nn.Module) -> Optional[torch.Tensor]:
    w_int, w_scale = getattr(module, "weight_int", None), getattr(module, "weight_scale", None)
    if isinstance(w_int, torch.Tensor) and isinstance(w_scale, torch.Tensor):  # integers + per-channel scales
        shape = (-1,) + (1,) * (w_int.dim() - 1)
        return w_int.float() * w_scale.float().reshape(shape)
    w = getattr(module, "weight", None)
    if callable(w) and not isinstance(w, torch.Tensor):
        w = w()
    return _as_float(w) if isinstance(w, torch.Tensor) else None


def compare_weights(float_model: nn.Module, quantized: fx.GraphModule,
                    reference: Optional[fx.GraphModule] = None) -> list[WeightComparison]:
    """Each quantized layer's weight (dequantized) against the fused float weight (batch norm folded in).

    Args:
        float_model: the float model that was prepared (not modified).
        quantized: its ``convert_fx`` result.
        reference: the fused float graph, if already built (:func:`float_reference`).

    Returns:
        One :class:`WeightComparison` per quantized module with a weight, in graph order.
    """
    state = _state(quantized)
    ref_gm = reference if reference is not None else float_reference(float_model, state.backend)
    float_nodes = {n.name: n for n in ref_gm.graph.nodes if n.op == "call_module"}
    rows = []
    for n in quantized.graph.nodes:
        if n.op != "call_module" or n.name not in float_nodes or not getattr(n.meta.get(RECORD_KEY), "entry", None):
            continue
        qw = _quantized_weight(quantized.get_submodule(str(n.target)))
        fm = ref_gm.get_submodule(str(float_nodes[n.name].target))
        fw = getattr(getattr(fm, "op", fm), "weight", None)
        if qw is None or not isinstance(fw, torch.Tensor) or fw.shape != qw.shape or fw is qw:
            continue
        rows.append(WeightComparison(n.name, *_metrics(fw, qw)))
    return rows

