"""The oneDNN layer's builders: conv / linear (plain and fused) and every other lowering target on uint8.

What runs how (see :data:`HOW`, rendered in docs/backends.md):

* ``oneDNN``: conv and linear targets, their fused post-ops and the conv + add (+ relu) kernel;
* ``on the integers``: shape ops, max pooling, relu, concatenation of tensors that share one grid (exact), and
  averages (avg pool, mean, interpolation: computed on the integers in float and rounded to the same grid);
* ``a 256-entry table``: unary elementwise ops (sigmoid, hardsigmoid, tanh, gelu, relu6 / hardtanh / clamp), the
  float op evaluated once on every input code;
* ``oneDNN`` for a squeeze-excite gate multiply of one image (a depthwise 1x1 conv whose weight scales are the gate);
* ``float inside the module``: ops without a oneDNN int8 kernel (norms, softmax, elementwise add/mul without a
  conv in front, ...): dequantize, the float op, quantize, in one module.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.backends.kernels.onednn import (_QCONV, POST_OPS, OneDNNConv, OneDNNLinear, PostOp, _clamp_codes, _Grid,
                                             _Mirrors, from_u8, to_u8)
from fxquant.backends.config import ACCUMULATING_CONSUMERS
from fxquant.backends.kernels.qtensor import LoweringSpec
from fxquant.qparams import QParams, dequantize, quantize_int

__all__ = ["BUILDERS", "HOW", "OpCall", "OnIntegers", "FloatOp", "FloatKernel", "CatU8", "ReluU8", "MaxPool2dU8",
           "native", "supports", "how"]


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One op of the graph as lowering hands it over: ``op`` is the FX opcode, ``target`` the function, the
    method name, or (``call_module``) the module itself."""

    op: str
    target: Any


class _Invoke(_Mirrors):
    """Calls the original op (function, method name or module) on a float tensor and the node's other args."""

    def __init__(self, call: OpCall) -> None:
        super().__init__()
        self.kind = call.op
        if call.op == "call_module":
            self.fn = copy.deepcopy(call.target)
        else:
            self._target = call.target

    def invoke(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        if self.kind == "call_module":
            return self.fn(x, *args, **kwargs)
        if self.kind == "call_method":
            return getattr(x, self._target)(*args, **kwargs)
        return self._target(x, *args, **kwargs)

    def _name(self) -> str:
        return type(self.fn).__name__ if self.kind == "call_module" else getattr(self._target, "__name__",
                                                                                 str(self._target))


class OnIntegers(_Invoke):
    """An op that commutes with the affine map of its (shared) grid, computed on the integers in float:
    ``round(op(q - zp) + zp)``. Exact for max-like ops, rounding once for averages (avg pool, mean, bilinear
    interpolation), as the quantized kernels do."""

    def __init__(self, call: OpCall, grid: QParams) -> None:
        super().__init__(call)
        self._keep("grid", [grid])
        self._refresh()

    def _refresh(self) -> None:
        _, self._zp, self._lo, self._hi = self._rows("grid")[0]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.invoke(x.to(torch.float32).sub_(self._zp), args, kwargs)
        return y.round_().add_(self._zp).clamp_(self._lo, self._hi).to(torch.uint8)  # half to even, as fake quant

    def extra_repr(self) -> str:
        return f"{self._name()} on the integers"


class GlobalMeanU8(_Mirrors):
    """Global average pooling on uint8: ``nn.AdaptiveAvgPool2d(1)`` / ``nn.AdaptiveAvgPool3d(1)`` modules (the
    functional and ``mean`` spellings take the generic averaging path).

    2-d: oneDNN's depthwise int8 conv with an all-ones H x W kernel and weight scale ``1 / (H * W)``, from and to the
    input's grid (packed once per input shape): it reads the uint8 tensor once, where ``torch.sum`` first copies it
    to float. Inside mobilenet_v3_large (1 thread, 9 pools, in the running network) 0.81 vs 1.25 ms. oneDNN scales in
    float32, so a mean that lies exactly half-way between two steps may round to either (within one step of exact).
    Otherwise: the integer sum in float32, divided and rounded half to even to the same grid (exact)."""

    _CACHES = ("_packs",)

    def __init__(self, dims: tuple[int, ...], keepdim: bool, grid: QParams) -> None:
        super().__init__()
        self.dims, self.keepdim = dims, keepdim
        self._keep("grid", [grid])
        self._refresh()

    def _refresh(self) -> None:
        self._scale, self._zp, self._lo, self._hi = self._rows("grid")[0]
        self._packs: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (_QCONV is not None and self.dims == (2, 3) and x.dim() == 4 and x.dtype == torch.uint8
                and _kernel_clamps(self._lo, self._hi)):
            return _clamp_codes(self._onednn(x), self._hi)
        n = 1
        for d in self.dims:
            n *= x.shape[d]
        total = torch.sum(x, self.dims, keepdim=self.keepdim, dtype=torch.float32)
        # round(mean(q - zp)) + zp, half to even (as fake quant rounds the float mean); division keeps exact halves
        mean = total.sub_(n * self._zp).div_(n)
        return mean.round_().add_(self._zp).clamp_(self._lo, self._hi).to(torch.uint8)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        channels, height, width = x.shape[1:]
        pack = self._packs.get((channels, height, width))
        if pack is None:
            scales = torch.full((channels,), 1.0 / (height * width))
            ones = torch.ones(channels, 1, height, width, dtype=torch.int8)
            pack = (torch.ops.onednn.qconv_prepack(ones, scales, self._scale, self._zp, [1, 1], [0, 0], [1, 1],
                                                   channels, None), scales, torch.zeros(channels, dtype=torch.int32))
            if len(self._packs) >= 8:  # inputs of ever-changing sizes must not grow the cache without bound
                self._packs.clear()
            self._packs[(channels, height, width)] = pack
        y = _QCONV(x, self._scale, self._zp, pack[0], pack[1], pack[2], None, [1, 1], [0, 0], [1, 1], channels,
                   self._scale, self._zp, None, "none", [], "")
        return y if self.keepdim else y.reshape(x.shape[0], channels)


def _kernel_clamps(lo: int, hi: int) -> bool:
    """Whether a oneDNN int8 kernel's output (clamped to [0, 255]) can be brought to the grid's [lo, hi]: the full
    8 bits, or the 7 bits of CPUs without VNNI (:func:`~fxquant.backends.kernels.onednn._clamp_codes`)."""
    return lo == 0 and hi in (127, 255)


def _global_mean(call: OpCall, grid: QParams) -> Optional[nn.Module]:
    """A global-average-pool module where ``call`` is one (adaptive pool to 1, 2-d or 3-d), else ``None``."""
    pools = {nn.AdaptiveAvgPool2d: (2, 3), nn.AdaptiveAvgPool3d: (2, 3, 4)}
    if call.op == "call_module" and type(call.target) in pools:
        size = call.target.output_size
        if size == 1 or (isinstance(size, tuple) and all(v == 1 for v in size)):
            return GlobalMeanU8(pools[type(call.target)], True, grid)
    return None


class FloatOp(_Invoke):
    """An op without an integer kernel: dequantize, the float op, quantize to the output grid (one module: the
    smallest float boundary).

    Elementwise ops (``elementwise=True``: sigmoid, hardsigmoid, tanh, gelu, relu6 / hardtanh / clamp) map each of
    the 256 input codes to one output code, so they run as a 256-entry table built by that same float computation
    on the first call (per distinct set of scalar arguments): one gather instead of ~10 tensor ops, the same
    integers (a squeeze-excite gate on 1x960x1x1: 3 vs 18 us)."""

    _CACHES = ("_tables",)
    elementwise: bool = False  # the class default covers modules pickled before the tables existed

    def __init__(self, call: OpCall, x: QParams, out: QParams, elementwise: bool = False) -> None:
        super().__init__(call)
        self.elementwise = elementwise
        self._keep("input_qparams", [x])
        self._keep("output_qparams", [out])
        self._refresh()

    def _refresh(self) -> None:
        self._x = self._rows("input_qparams")[0][:2]
        out = self._rows("output_qparams")[0]
        self._out, self._lo, self._hi = out[:2], out[2], out[3]
        self._tables: dict[Any, torch.Tensor] = {}

    def _table(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """The uint8 -> uint8 table of the op with these scalar arguments (``None`` if an argument is a tensor)."""
        key = (args, tuple(sorted(kwargs.items())))
        try:
            table = self._tables.get(key)
        except TypeError:  # an unhashable argument (a list): the float path
            return None
        if table is None:
            if not all(isinstance(v, (int, float, bool, str, type(None))) for v in (*args, *kwargs.values())):
                return None
            codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
            table = self._tables[key] = self._float(codes, args, kwargs)
        return table

    def _float(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        y = self.invoke(from_u8(x, *self._x), args, kwargs)
        return to_u8(y, self._out[0], self._out[1], self._lo, self._hi)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.elementwise and x.dtype == torch.uint8:
            table = self._table(args, kwargs)
            if table is not None:
                return _lookup(table, x)
        return self._float(x, args, kwargs)

    def extra_repr(self) -> str:
        how = "a 256-entry table of the float op" if self.elementwise else "in float (dequantize, op, quantize)"
        return f"{self._name()} {how}"


def _lookup(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``table[x]`` for a uint8 tensor ``x``, keeping a channels-last layout (the convs around it use it)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return table.take(x.permute(0, 2, 3, 1).long()).permute(0, 3, 1, 2)
    return table.take(x.long())


class ReluU8(_Mirrors):
    """relu on uint8: ``max(q, zero_point)``, exact."""

    def __init__(self, grid: QParams) -> None:
        super().__init__()
        self._keep("grid", [grid])
        self._refresh()

    def _refresh(self) -> None:
        self._zp = self._rows("grid")[0][1]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x.clamp_min(self._zp)

    def extra_repr(self) -> str:
        return f"zero_point={self._zp}"


class MaxPool2dU8(nn.Module):
    """nn.MaxPool2d on uint8 (torch's uint8 max-pool kernel, no quantized tensor type), exact."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        two = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
        self.kernel_size, self.padding, self.dilation = two(pool.kernel_size), two(pool.padding), two(pool.dilation)
        self.stride = two(pool.stride if pool.stride is not None else pool.kernel_size)
        self.ceil_mode = bool(pool.ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return F.max_pool2d(x.float(), self.kernel_size, self.stride, self.padding, self.dilation,
                                self.ceil_mode).to(torch.uint8)
        return torch.ops.quantized.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                              self.ceil_mode)


#: shares-input ops run as they are on the integers (shape ops; the result is a selection of the input)
_AS_IS = frozenset({"flatten", "reshape", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "chunk",
                    "getitem", "dropout", "identity", "channel_shuffle", "split", "pixel_shuffle",
                    "pixel_unshuffle", "expand", "repeat"})
#: unary elementwise ops without an integer kernel: each input code gives one output code (a 256-entry table)
_ELEMENTWISE = frozenset({"sigmoid", "hardsigmoid", "tanh", "gelu", "relu6", "hardtanh", "clamp"})
#: ops computed on the integers in float and rounded back to the same grid
_ON_INTEGERS = frozenset({"max_pool", "avg_pool", "adaptive_avg_pool", "mean", "interpolate"})


def native(entry_name: str, call: OpCall, x: QParams, out: QParams) -> Optional[nn.Module]:
    """How a shares-input / fixed-qparams op runs on uint8: ``None`` (run the op itself on the integers: shape
    ops), or the module to call with the node's arguments."""
    if entry_name in _AS_IS:
        return None
    if entry_name == "relu":
        return ReluU8(x)
    if entry_name == "max_pool" and call.op == "call_module" and type(call.target) is nn.MaxPool2d \
            and not call.target.return_indices:
        return MaxPool2dU8(call.target)
    if entry_name == "adaptive_avg_pool" and _global_mean(call, x) is not None:
        return _global_mean(call, x)
    if entry_name in _ON_INTEGERS:
        return OnIntegers(call, x)
    # pad in float; gelu, relu6 / hardtanh / clamp, sigmoid, hardsigmoid, tanh as tables
    return FloatOp(call, x, out, elementwise=entry_name in _ELEMENTWISE)


# ------------------------------------------------------------------------------------------ lowering targets
#: float functions of the targets without a oneDNN int8 kernel: (inputs as float, module or None, kwargs)
_FLOAT_FNS: dict[str, Callable[[list[torch.Tensor], Optional[nn.Module], dict[str, Any]], torch.Tensor]] = {
    "add": lambda xs, m, kw: xs[0] + xs[1],
    "add_relu": lambda xs, m, kw: torch.relu(xs[0] + xs[1]),
    "mul": lambda xs, m, kw: xs[0] * xs[1],
    "mul_relu": lambda xs, m, kw: torch.relu(xs[0] * xs[1]),
    "matmul": lambda xs, m, kw: torch.matmul(xs[0], xs[1]),
    "stack": lambda xs, m, kw: torch.stack(xs, kw["dim"]),
    "hardswish": lambda xs, m, kw: F.hardswish(xs[0]),
    "silu": lambda xs, m, kw: F.silu(xs[0]),
    "elu": lambda xs, m, kw: F.elu(xs[0], kw["alpha"]),
    "leaky_relu": lambda xs, m, kw: F.leaky_relu(xs[0], kw["negative_slope"]),
    "softmax": lambda xs, m, kw: torch.softmax(xs[0], kw["dim"]),
    **{t: (lambda xs, m, kw: m(xs[0])) for t in (
        "layer_norm", "group_norm", "instance_norm", "prelu", "batch_norm2d", "batch_norm2d_relu", "batch_norm3d",
        "batch_norm3d_relu", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")},
}


class FloatKernel(_Grid):
    """A lowering target without a oneDNN int8 kernel: its inputs dequantized, the float op, the result
    quantized, in one module. Modules with weights (transposed convs) use their quantized-dequantized weight,
    so the result is what the int8 simulation computes."""

    _CACHES = ("_gates", "_gate_zp")

    def __init__(self, target: str, inputs: tuple[QParams, ...], output: QParams,
                 module: Optional[nn.Module] = None, kwargs: Optional[dict[str, Any]] = None) -> None:
        super().__init__(output)
        self.target = target
        self.fn = module
        self._keep("input_qparams", list(inputs))
        self._kwargs = dict(kwargs or {})
        self._refresh()

    def _refresh(self) -> None:
        super()._refresh()
        self._inputs = [r[:2] for r in self._rows("input_qparams")]
        self._gates: dict[tuple[int, float, int], torch.Tensor] = {}  # packed depthwise ones per (C, grid of a)
        self._gate_zp: dict[int, torch.Tensor] = {}

    def forward(self, *xs: Any) -> torch.Tensor:
        if self.target == "mul" and len(xs) == 2 and xs[0].dim() == xs[1].dim():
            return self._mul(xs[0], xs[1])
        flat = list(xs[0]) if isinstance(xs[0], (list, tuple)) else list(xs)
        floats = [from_u8(x, *self._inputs[min(i, len(self._inputs) - 1)]) for i, x in enumerate(flat)]
        y = _FLOAT_FNS[self.target](floats, self.fn, self._kwargs)
        return to_u8(y, self._scale, self._zp, self._lo, self._hi)

    def _mul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a * b`` with the smaller operand (a squeeze-excite gate) folded into one multiplier:
        ``q = (a - za) * ((b - zb) * sa * sb / so) + zo``, one float pass over the larger operand; a per-channel
        gate of one image runs on oneDNN instead (:meth:`_gate`)."""
        (sa, za), (sb, zb) = self._inputs[0], self._inputs[-1]
        if a.numel() < b.numel():
            (a, sa, za), (b, sb, zb) = (b, sb, zb), (a, sa, za)
        if (_QCONV is not None and a.dim() == 4 and a.shape[0] == 1 and b.shape == (1, a.shape[1], 1, 1)
                and a.dtype == b.dtype == torch.uint8 and _kernel_clamps(self._lo, self._hi)):
            return _clamp_codes(self._gate(a, sa, za, b, sb, zb), self._hi)
        return self._float_mul(a, sa, za, b, sb, zb)

    def _float_mul(self, a: torch.Tensor, sa: float, za: int, b: torch.Tensor, sb: float, zb: int) -> torch.Tensor:
        factor = from_u8(b, sb, zb).mul_(sa / self._scale)
        y = a.to(torch.float32).sub_(za).mul_(factor)
        return y.round_().add_(self._zp).clamp_(self._lo, self._hi).to(torch.uint8)

    def _gate(self, a: torch.Tensor, sa: float, za: int, b: torch.Tensor, sb: float, zb: int) -> torch.Tensor:
        """``a * b`` for ``a`` (1, C, H, W) and a per-channel gate ``b`` (1, C, 1, 1): oneDNN's depthwise 1x1 int8
        conv with weights 1 and the gate's float values as its per-channel weight scales (oneDNN takes those at
        run time, so one packing per channel count serves every call): ``round((a - za) * sa * gate / so) + zo``,
        one int8 pass (1x96x56x56: 100 vs 320 us; float32 rounding order: within one step of :meth:`_float_mul`)."""
        channels = a.shape[1]
        packed = self._gates.get((channels, sa, za))
        if packed is None:
            ones = torch.ones(channels, 1, 1, 1, dtype=torch.int8)
            packed = torch.ops.onednn.qconv_prepack(ones, torch.ones(channels), sa, za, [1, 1], [0, 0], [1, 1],
                                                    channels, None)
            self._gates[(channels, sa, za)] = packed
            self._gate_zp[channels] = torch.zeros(channels, dtype=torch.int32)
        gate = b.reshape(channels).to(torch.float32).sub_(zb).mul_(sb)
        return _QCONV(a, sa, za, packed, gate, self._gate_zp[channels], None, [1, 1], [0, 0], [1, 1], channels,
                      self._scale, self._zp, None, "none", [], "")

    def extra_repr(self) -> str:
        how = ("on oneDNN where one operand is a per-channel gate (squeeze-excite), else in float"
               if self.target == "mul" else "in float (dequantize, op, quantize)")
        return f"{self.target} {how}, {super().extra_repr()}"


class CatU8(_Grid):
    """torch.cat of uint8 tensors: the integers as they are where an input already has the output's grid,
    requantized (in float) where it has not."""

    def __init__(self, dim: int, inputs: tuple[QParams, ...], output: QParams) -> None:
        super().__init__(output)
        self.dim = int(dim)
        self._keep("input_qparams", list(inputs))
        self._refresh()

    def _refresh(self) -> None:
        super()._refresh()
        self._inputs = [r[:2] for r in self._rows("input_qparams")]

    def forward(self, xs: list[torch.Tensor], dim: Optional[int] = None) -> torch.Tensor:
        parts = [x if self._inputs[i] == (self._scale, self._zp) else self._requantize(x, *self._inputs[i])
                 for i, x in enumerate(xs)]
        return torch.cat(parts, self.dim)

    def _requantize(self, x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
        """uint8 on (scale, zp) -> uint8 on the output grid: ``round((q - zp) * scale / out_scale) + out_zp``."""
        y = x.to(torch.float32).sub_(zp).mul_(scale / self._scale)
        return y.round_().add_(self._zp).clamp_(self._lo, self._hi).to(torch.uint8)

    def extra_repr(self) -> str:
        shared = sum(qp == (self._scale, self._zp) for qp in self._inputs)
        return f"dim={self.dim}, {shared}/{len(self._inputs)} inputs on the output grid, {super().extra_repr()}"


def _fake_quantized_weight(module: nn.Module, weight: QParams) -> nn.Module:
    out = copy.deepcopy(module)
    with torch.no_grad():  # assigned, not written in place: a conv with a batch norm folded on read makes it its own
        float_weight = module.weight.detach()  # read once (a fold on read computes it)
        fq = dequantize(quantize_int(float_weight.float(), weight), weight)
        out.weight = nn.Parameter(fq.to(float_weight.dtype), requires_grad=False)
    return out


def _float_kernel(spec: LoweringSpec) -> nn.Module:
    module = spec.module
    if spec.target.startswith("conv_transpose"):
        module = _fake_quantized_weight(module, spec.weight)
    elif module is not None:
        module = copy.deepcopy(module)
    return FloatKernel(spec.target, tuple(spec.inputs), spec.output, module, spec.kwargs)


_CONV = {f"conv{n}d{r}" for n in (1, 2, 3) for r in ("", "_relu")}


def _producer(target: str) -> tuple[str, str]:
    """``"conv2d+add_relu"`` -> (``"conv2d"``, ``"add_relu"``); a plain target -> (target, "")."""
    base, _, consumer = target.partition("+")
    return base, consumer


def _weighted(spec: LoweringSpec) -> nn.Module:
    base, consumer = _producer(spec.target)
    relu = base.endswith("_relu")
    module = spec.module.op if relu else spec.module
    post = POST_OPS["relu"] if relu else POST_OPS.get(consumer.replace("add_relu", "relu"), PostOp())
    accum = spec.inputs[1] if consumer in ACCUMULATING_CONSUMERS else None
    clone = bool(spec.kwargs.get("clone_accum", True))
    if base.startswith("linear"):
        return OneDNNLinear(module, spec.weight, spec.inputs[0], spec.output, post, accum, clone)
    return OneDNNConv(module, spec.weight, spec.inputs[0], spec.output, post, accum, clone)


#: producer target -> consumer entries oneDNN fuses into it (unary post-ops; ``add``/``add_relu``: the ``sum``
#: post-op). conv1d takes no post-op but relu, conv3d none at all (torch 2.14: "Unsupported post op")
FUSIBLE: dict[str, tuple[str, ...]] = {
    "conv2d": ("hardswish", "relu6", "silu", "add", "add_relu"),
    "linear": ("hardswish", "relu6", "silu", "gelu", "add", "add_relu"),
}

#: lowering target -> builder(spec); the single list of what this kernel layer can run
BUILDERS: dict[str, Callable[[LoweringSpec], nn.Module]] = {
    **{t: _weighted for t in _CONV},
    "linear": _weighted,
    "linear_relu": _weighted,
    **{f"{p}+{c}": _weighted for p, cs in FUSIBLE.items() for c in cs},
    **{t: _float_kernel for t in _FLOAT_FNS},
    "cat": lambda spec: CatU8(int(spec.kwargs.get("dim", 0)), tuple(spec.inputs), spec.output),
}

#: how each target runs, for the docs
HOW: dict[str, str] = {
    **{t: "oneDNN" for t in BUILDERS if t.split("+")[0] in _CONV or t.startswith("linear")},
    **{t: "float inside the module" for t in _FLOAT_FNS},
    "mul": "oneDNN where one operand is a per-channel gate of one image (squeeze-excite), else float inside the "
           "module",
    "cat": "on the integers where the inputs share the output grid, else requantized",
}


def how(entry_name: str, lowering: Optional[str]) -> str:
    """How an entry runs on this layer, in words (docs/backends.md)."""
    if lowering is not None:
        return HOW.get(lowering, "dynamic kernel (float in, float out)")
    if entry_name in _AS_IS or entry_name in ("relu", "max_pool"):
        return "on the integers, exact"
    if entry_name in _ON_INTEGERS:
        return "on the integers in float, rounded to the same grid"
    if entry_name == "size":
        return "shape query"
    if entry_name in _ELEMENTWISE:
        return "a 256-entry table of the float op (on the integers)"
    return "float inside the module"


def supports(target: str, module: Optional[nn.Module], engine_name: str) -> Optional[str]:
    """``None`` if ``target`` can run ``module``; else the reason it stays float."""
    base = target.split("+")[0]
    if base in _CONV:
        conv = module.op if hasattr(module, "op") else module
        if getattr(conv, "padding_mode", "zeros") != "zeros":
            return f"padding_mode='{conv.padding_mode}' (the oneDNN int8 conv pads with zeros only)"
        if isinstance(conv.padding, str):
            return f"padding='{conv.padding}' (give explicit integer padding)"
    from fxquant.backends.kernels import dynamic

    if target in dynamic.BUILDERS:
        return dynamic.supports(target, module)
    return None
