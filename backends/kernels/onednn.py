"""The oneDNN kernel layer: x86 int8 on plain ``uint8`` / ``int8`` tensors, no quantized tensor types.

Lowering asks this layer (the same protocol as :class:`~fxquant.backends.kernels.qtensor.QTensorKernels`) for
one module per quantized op. The quantized region of a converted graph carries plain ``uint8`` tensors; their
scale and zero point are constants known at convert time, so each module holds the qparams of its inputs and
its output as attributes and no carrier object is needed at run time (the graph stays an ordinary FX graph of
tensors). How each lowering target runs:

* conv 1d/2d/3d and linear, with their post-ops (relu, hardswish, relu6/hardtanh, silu; gelu for linear) and
  conv + add (+ relu) in one kernel: ``torch.ops.onednn.qconv_pointwise`` / ``qconv2d_pointwise.binary`` /
  ``qlinear_pointwise``, weights prepacked once at convert time (:mod:`fxquant.backends.kernels.onednn`); a 1x1
  conv whose input is 1x1 (squeeze-excite) runs as the linear kernel, which has less fixed cost per call;
* shape ops, max pooling, concatenation with one shared grid, relu/clamp: directly on the integers, exactly
  (:mod:`fxquant.backends.kernels.onednn_ops`);
* averaging ops (avg pool, mean, interpolation): on the integers in float, rounded back to the same grid;
* unary elementwise ops without an int8 kernel (sigmoid, hardsigmoid, tanh, gelu, relu6 / clamp): a 256-entry
  table built from the float op; a squeeze-excite gate multiply (one image): a oneDNN depthwise 1x1 conv;
* everything else (add/mul without a conv in front, norms, softmax, ...): dequantize, the float op,
  quantize, inside one module (the smallest float boundary).

Measured on this machine (1 thread, the same integers): oneDNN conv 3x3 64->64 @56x56 + relu 0.59 ms vs fbgemm
0.82 ms; results equal to the exact integer simulation (tests/test_x86_onednn.py).

Example:
    >>> from fxquant.backends.kernels.onednn import OneDNNKernels
    >>> OneDNNKernels("x86").name
    'onednn'
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from fxquant.backends.cpu import has_vnni, onednn_int8_missing
from fxquant.backends.kernels.qtensor import LoweringSpec
from fxquant.errors import ConvertError, FxQuantError
from fxquant.qparams import QParams, quantize_int

__all__ = ["PostOp", "OneDNNKernels", "QuantizeU8", "DequantizeU8", "OneDNNConv", "OneDNNLinear", "POST_OPS"]


@dataclasses.dataclass(frozen=True)
class PostOp:
    """A oneDNN unary post-op: its name in the kernel's ``attr`` string, its scalars and algorithm."""

    attr: str = "none"
    scalars: tuple[float, ...] = ()
    algorithm: str = ""


#: fused-consumer entry name -> the post-op that computes it inside the conv / linear kernel
POST_OPS: dict[str, PostOp] = {
    "relu": PostOp("relu"),
    "hardswish": PostOp("hardswish"),
    "relu6": PostOp("hardtanh", (0.0, 6.0)),
    "silu": PostOp("swish"),
    "gelu": PostOp("gelu", (), "none"),  # linear only (qconv has no gelu post-op)
}


#: the overloads themselves (calling the packet resolves the overload on every call)
_QCONV = torch.ops.onednn.qconv_pointwise.default if hasattr(torch.ops.onednn, "qconv_pointwise") else None
_QLINEAR = torch.ops.onednn.qlinear_pointwise.default if hasattr(torch.ops.onednn, "qlinear_pointwise") else None
_QCONV_SUM = torch.ops.onednn.qconv2d_pointwise.binary if hasattr(torch.ops.onednn, "qconv2d_pointwise") else None


class _Mirrors(nn.Module):
    """Keeps qparams as float64 buffers (rows of scale, zero point, quant_min, quant_max), so ``state_dict``
    carries them, and mirrors them as Python numbers for the hot path (refreshed on load)."""

    def _keep(self, name: str, grids: list[QParams]) -> None:
        rows = [[float(qp.scale), float(qp.zero_point), float(qp.quant_min), float(qp.quant_max)] for qp in grids]
        self.register_buffer(name, torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 4))

    def _rows(self, name: str) -> list[tuple[float, int, int, int]]:
        return [(float(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in getattr(self, name).tolist()]

    #: run-time caches built from the buffers (packed weights, lookup tables): not pickled, rebuilt by _refresh
    _CACHES: tuple[str, ...] = ()

    def _refresh(self) -> None:
        """Set the Python mirrors (and reset the caches) from the buffers."""

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._CACHES}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._refresh()


class _Grid(_Mirrors):
    """Holds the output scale / zero point (buffers, mirrored as Python numbers for the hot path).

    Attributes:
        where: the graph node the module computes (set by lowering; named in error messages).
    """

    where: str = ""

    def __init__(self, output: QParams) -> None:
        super().__init__()
        scale, zp = output.scalar()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float64))
        self.register_buffer("zero_point", torch.tensor(zp, dtype=torch.int64))
        self._scale, self._zp = scale, zp
        self._lo, self._hi = int(output.quant_min), int(output.quant_max)

    def _describe(self) -> str:
        return f"{type(self).__name__} at {self.where}" if self.where else type(self).__name__

    def _refresh(self) -> None:
        self._scale, self._zp = float(self.scale), int(self.zero_point)

    def extra_repr(self) -> str:
        return f"scale={self._scale:.6g}, zero_point={self._zp}"


def to_u8(x: torch.Tensor, scale: float, zp: int, lo: int = 0, hi: int = 255) -> torch.Tensor:
    """float -> uint8 on the grid (scale, zp), clamped to [lo, hi]: ``round(x * (1 / scale)) + zp``, rounding
    half to even and multiplying by the float32 reciprocal as torch's quantize and fake-quantize do."""
    return x.mul(1.0 / scale).round_().add_(zp).clamp_(lo, hi).to(torch.uint8)


def from_u8(q: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """uint8 -> float32 on the grid (scale, zp)."""
    return q.to(torch.float32).sub_(zp).mul_(scale)


class QuantizeU8(_Grid):
    """float -> plain uint8 with fixed qparams (where a quantized region starts)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_u8(x, self._scale, self._zp, self._lo, self._hi)


class DequantizeU8(_Grid):
    """plain uint8 -> float (where a quantized region ends)."""

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return from_u8(q, self._scale, self._zp)


def _clamp_codes(y: torch.Tensor, top: int) -> torch.Tensor:
    """uint8 codes above ``top`` clamped to it, as fake quant clamps a 7-bit grid (nothing to do for ``top`` 255,
    where the kernels saturate anyway)."""
    return y.clamp_max_(top) if top < 255 else y


def _seven_bit_post(post: PostOp, scale: float, zp: int, lo: int, hi: int, hardtanh: bool) -> tuple[PostOp, int]:
    """The post-op a kernel runs, and the top code its uint8 result is clamped to afterwards (:func:`_clamp_codes`;
    255: no clamp).

    oneDNN clamps its output codes to [0, 255]; an output grid of 7 bits (CPUs without VNNI) ends at 127, as the
    simulation does, and codes above it would let the next conv's int16 pair sums saturate. Where the post-op is
    none, relu or hardtanh, a hardtanh whose bounds are the grid's float ends clamps inside the kernel (free);
    other post-ops, kernels that take no hardtanh (``hardtanh=False``: conv1d / conv3d, and the ``sum`` of a fused
    add) keep theirs and the result is clamped afterwards."""
    if hi >= 255:
        return post, 255
    if not hardtanh:
        return post, hi
    top = (hi - zp) * scale
    if post.attr == "none":
        return PostOp("hardtanh", ((lo - zp) * scale, top)), 255
    if post.attr == "relu":
        return PostOp("hardtanh", (0.0, top)), 255
    if post.attr == "hardtanh":
        return PostOp("hardtanh", (post.scalars[0], min(post.scalars[1], top))), 255
    return post, hi


def _check_int16_pairs(kind: str, top_code: int, top_weight: int) -> None:
    """Without VNNI oneDNN's int8 kernels sum pairs of u8 x s8 products in int16: refuse a grid on which a pair can
    leave int16 (8-bit activations with weights beyond [-64, 64]) instead of computing saturated garbage."""
    if 2 * top_code * top_weight > 32767 and not has_vnni():
        raise ConvertError(
            f"{kind}: activation codes up to {top_code} times weight codes up to {top_weight} can overflow the int16 "
            "pair sums of oneDNN's int8 kernels on this CPU (no VNNI); use 7-bit activations (reduce_range=True, "
            "the default qconfig of this table here) or the 'fbgemm' backend")


class _Prepacked(_Grid):
    """A oneDNN kernel with a weight prepacked once; int8 weight, float32 scales and float bias stay as buffers
    (``state_dict`` round-trips, a pickled or deep-copied module repacks itself)."""

    _CACHES = ("_packed", "_packed_linear")

    def __init__(self, module: nn.Module, weight: QParams, x: QParams, output: QParams) -> None:
        super().__init__(output)
        if weight.zero_point.ne(0).any():
            raise FxQuantError(f"{type(self).__name__}: oneDNN takes symmetric weights only (zero point 0); use a "
                               "per_channel_symmetric or per_tensor_symmetric weight observer")
        float_weight = module.weight.detach()  # read once: a conv with a batch norm folded on read computes it
        self.register_buffer("weight_int", quantize_int(float_weight.float(), weight))
        _check_int16_pairs(type(self).__name__, int(x.quant_max), int(self.weight_int.abs().max()))
        scale = weight.scale.to(torch.float32).reshape(-1)
        out_channels = float_weight.shape[0]
        self.register_buffer("weight_scale", scale.expand(out_channels).clone())
        bias = module.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("input_scale", torch.tensor(x.scalar()[0], dtype=torch.float64))
        self.register_buffer("input_zero_point", torch.tensor(x.scalar()[1], dtype=torch.int64))
        self._x_scale, self._x_zp = x.scalar()
        self._w_zp = torch.zeros(out_channels, dtype=torch.int32)

    @property
    def weight(self) -> torch.Tensor:
        """The weight the kernel computes with, as float (its int8 values times their scales)."""
        shape = (-1,) + (1,) * (self.weight_int.dim() - 1)
        return self.weight_int.to(torch.float32) * self.weight_scale.reshape(shape)

    def _pack(self) -> torch.Tensor:
        raise NotImplementedError

    def _takes_hardtanh(self) -> bool:
        """Whether the kernel takes a hardtanh post-op (measured: 2-d conv and linear, without a fused add)."""
        return not self.binary and getattr(self, "dims", 2) == 2

    def _repack(self) -> None:
        self._kernel_post, self._top = _seven_bit_post(self.post, self._scale, self._zp, self._lo, self._hi,
                                                             self._takes_hardtanh())
        self._scalars = list(self._kernel_post.scalars)  # built once, not per call
        self._x_scale, self._x_zp = float(self.input_scale), int(self.input_zero_point)
        self._w_zp = torch.zeros(self.weight_int.shape[0], dtype=torch.int32)
        self._packed = self._pack()
        self._packed_linear: Optional[torch.Tensor] = None  # a 1x1 conv's weight packed for qlinear, on first use

    def _refresh(self) -> None:
        super()._refresh()
        if "accum_qparams" in self._buffers:
            self._accum = self._rows("accum_qparams")[0][:2]
        self._repack()


class OneDNNConv(_Prepacked):
    """Conv1d/2d/3d on uint8 with a fused unary post-op, and optionally a fused residual add (``binary=True``:
    ``forward(x, accum)`` computes ``post(conv(x) + accum)``; 2-d only, oneDNN's ``sum`` post-op).

    Args:
        conv: the float conv (batch norm already folded).
        weight, x, output: qparams of the weight, the input and the output.
        post: the unary post-op.
        accum: qparams of the added tensor for ``binary`` convs.
        clone_accum: copy the added tensor first (oneDNN writes the result into it; lowering sets this where
            another op reads that tensor later, or it may be a view of one).
    """

    pointwise: bool = False  # set in __init__; the class default covers modules pickled before it existed

    def __init__(self, conv: nn.Module, weight: QParams, x: QParams, output: QParams, post: PostOp = PostOp(),
                 accum: Optional[QParams] = None, clone_accum: bool = True) -> None:
        super().__init__(conv, weight, x, output)
        self.dims = self.weight_int.dim() - 2
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), int(conv.groups)
        self.in_channels, self.out_channels = int(conv.in_channels), int(conv.out_channels)
        self.kernel_size = tuple(conv.kernel_size)
        # oneDNN's conv3d takes no post-op: its relu runs on the uint8 result (max with the zero point, exact)
        self.relu_after = self.dims == 3 and post.attr == "relu"
        self.post = PostOp() if self.relu_after else post
        self.binary = accum is not None
        self.clone_accum = clone_accum
        self._accum = accum.scalar() if accum is not None else (1.0, 0)
        if accum is not None:
            self._keep("accum_qparams", [accum])
        # a 1x1 conv on a 1x1 input (squeeze-excite's fc convs after the global pool) is a matrix-vector product:
        # oneDNN's int8 linear runs it with less fixed cost than its conv, on the same integers (1 thread:
        # 20->480 36 vs 86 us, 28->672 34 vs 93, 480->20 28 vs 46, 1152->48 28 vs 36; 8->32 equal)
        self.pointwise = (self.dims == 2 and self.groups == 1 and self.kernel_size == (1, 1)
                          and self.padding == [0, 0] and not self.binary)
        self._repack()

    def _pack(self) -> torch.Tensor:
        return torch.ops.onednn.qconv_prepack(self.weight_int, self.weight_scale, self._x_scale, self._x_zp,
                                              self.stride, self.padding, self.dilation, self.groups, None)

    def _check(self, x: torch.Tensor) -> None:
        if x.dtype != torch.uint8:
            raise FxQuantError(f"{self._describe()}: expects the uint8 tensor of a quantized region, got {x.dtype}; "
                               "call the converted model, not its kernels, with float inputs")
        raise FxQuantError(f"{self._describe()}: expects a batched input with {self.in_channels} channels and "
                           f"{self.dims} spatial dims (N, C, ...), got shape {tuple(x.shape)}; pass inputs shaped "
                           "like the example the model was prepared with (the quantized kernels take no unbatched "
                           "input: x.unsqueeze(0))")

    def forward(self, x: torch.Tensor, accum: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels or x.dtype != torch.uint8:
            self._check(x)
        if self.pointwise and x.shape[2] == 1 and x.shape[3] == 1:
            return self._as_linear(x)
        post = self._kernel_post
        if accum is None:
            y = _QCONV(x, self._x_scale, self._x_zp, self._packed, self.weight_scale, self._w_zp, self.bias,
                       self.stride, self.padding, self.dilation, self.groups, self._scale, self._zp, None,
                       post.attr, self._scalars, post.algorithm)
            if self.relu_after:
                y = y.clamp_min_(self._zp)
            return _clamp_codes(y, self._top)
        if self.clone_accum:
            accum = accum.clone(memory_format=torch.channels_last)
        y = _QCONV_SUM(
            x, self._x_scale, self._x_zp, self._packed, self.weight_scale, self._w_zp, accum, self.bias,
            self.stride, self.padding, self.dilation, self.groups, self._scale, self._zp, None, self._accum[0],
            self._accum[1], "sum", 1.0, post.attr, self._scalars, post.algorithm or None)
        return _clamp_codes(y, self._top)

    def _as_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The conv on an (N, C, 1, 1) input as oneDNN's int8 linear on (N, C): the same weights, scales, bias and
        post-op; the weight is packed for the linear on the first such call."""
        if self._packed_linear is None:
            self._packed_linear = torch.ops.onednn.qlinear_prepack(
                self.weight_int.reshape(self.out_channels, self.in_channels), None)
        post = self._kernel_post
        y = _QLINEAR(x.reshape(x.shape[0], self.in_channels), self._x_scale, self._x_zp, self._packed_linear,
                     self.weight_scale, self._w_zp, self.bias, self._scale, self._zp, None, post.attr,
                     self._scalars, post.algorithm)
        return _clamp_codes(y, self._top).reshape(x.shape[0], self.out_channels, 1, 1)

    def extra_repr(self) -> str:
        post = "" if self.post.attr == "none" else f", post={self.post.attr}"
        post += ", relu on uint8" if self.relu_after else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}{post}{', + accum' if self.binary else ''}, {super().extra_repr()}")


class OneDNNLinear(_Prepacked):
    """Linear on uint8 with a fused unary post-op, optionally + a residual (``forward(x, accum)``)."""

    def __init__(self, linear: nn.Linear, weight: QParams, x: QParams, output: QParams, post: PostOp = PostOp(),
                 accum: Optional[QParams] = None, clone_accum: bool = True) -> None:
        super().__init__(linear, weight, x, output)
        self.in_features, self.out_features = int(linear.in_features), int(linear.out_features)
        self.post = post
        self.binary = accum is not None
        self.clone_accum = clone_accum
        self._accum = accum.scalar() if accum is not None else (1.0, 0)
        if accum is not None:
            self._keep("accum_qparams", [accum])
        self._repack()

    def _pack(self) -> torch.Tensor:
        return torch.ops.onednn.qlinear_prepack(self.weight_int, None)

    def forward(self, x: torch.Tensor, accum: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise FxQuantError(f"{self._describe()}: expects the uint8 tensor of a quantized region, got {x.dtype}; "
                               "call the converted model, not its kernels, with float inputs")
        if x.shape[-1] != self.in_features:
            raise FxQuantError(f"{self._describe()}: expects inputs with {self.in_features} features in the last "
                               f"dimension, like the float Linear, got shape {tuple(x.shape)}; pass inputs shaped like "
                               "the example the model was prepared with")
        post = self._kernel_post
        if accum is None:
            y = _QLINEAR(x, self._x_scale, self._x_zp, self._packed, self.weight_scale, self._w_zp, self.bias,
                         self._scale, self._zp, None, post.attr, self._scalars, post.algorithm)
        else:
            accum = accum.clone() if self.clone_accum else accum
            y = torch.ops.onednn.qlinear_pointwise.binary(
                x, self._x_scale, self._x_zp, self._packed, self.weight_scale, self._w_zp, accum, self.bias,
                self._scale, self._zp, None, self._accum[0], self._accum[1], "sum", 1.0, post.attr,
                self._scalars, post.algorithm)
        return _clamp_codes(y, self._top)

    def extra_repr(self) -> str:
        post = "" if self.post.attr == "none" else f", post={self.post.attr}"
        return (f"{self.in_features}, {self.out_features}{post}{', + accum' if self.binary else ''}, "
                f"{super().extra_repr()}")


class OneDNNKernels:
    """Builds modules for lowering targets on oneDNN kernels and plain uint8 tensors (see module docstring).

    Args:
        engine_name: the quantized engine of the table (used only by the dynamic entries, which keep
            their own kernels: :mod:`fxquant.backends.kernels.dynamic`).
    """

    name = "onednn"

    def __init__(self, engine_name: str) -> None:
        self.engine = engine_name

    def available(self) -> Optional[str]:
        """``None`` if oneDNN's int8 kernels run here, else why not."""
        return onednn_int8_missing()

    def supports(self, target: str, module: Optional[nn.Module]) -> Optional[str]:
        """``None`` if ``target`` can run ``module``; else the reason it stays float."""
        from fxquant.backends.kernels import onednn_ops

        return onednn_ops.supports(target, module, self.engine)

    def native_method(self, method: str) -> str:
        """convs return channels-last tensors, on which ``view`` fails where the float model's allowed it."""
        return "reshape" if method == "view" else method

    def needs_contiguous_input(self, op_name: str) -> bool:
        return False

    def quantize(self, qp: QParams) -> nn.Module:
        """The module that quantizes a float tensor at the start of a quantized region."""
        return QuantizeU8(qp)

    def dequantize(self, qp: QParams) -> Optional[nn.Module]:
        """The module that turns a uint8 tensor with qparams ``qp`` back into float."""
        return DequantizeU8(qp)

    def native(self, entry_name: str, call: Any, x: QParams, out: QParams) -> Any:
        """How a shares-input or fixed-qparams op runs on the uint8 tensor (see
        :func:`fxquant.backends.kernels.onednn_ops.native`)."""
        from fxquant.backends.kernels import onednn_ops

        return onednn_ops.native(entry_name, call, x, out)

    def targets(self) -> frozenset[str]:
        """Every lowering target this layer builds."""
        from fxquant.backends.kernels.dynamic import BUILDERS as DYNAMIC
        from fxquant.backends.kernels.onednn_ops import BUILDERS

        return frozenset(BUILDERS) | frozenset(DYNAMIC)

    def build(self, spec: LoweringSpec) -> nn.Module:
        """The module that computes ``spec.target``."""
        from fxquant.backends.kernels.dynamic import BUILDERS as DYNAMIC
        from fxquant.backends.kernels.onednn_ops import BUILDERS

        if spec.target in DYNAMIC:  # dynamic and weight-only kernels (float in, float out)
            return DYNAMIC[spec.target](spec, self.engine)
        if spec.target not in BUILDERS:
            raise KeyError(f"kernel layer '{self.name}' has no lowering for target '{spec.target}'")
        return BUILDERS[spec.target](spec)
