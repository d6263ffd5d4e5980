"""The quantized-tensor kernel layer: ``torch.ops.quantized`` (fbgemm, x86, qnnpack) on torch QTensors.

Lowering asks this layer for one module per quantized op (:meth:`QTensorKernels.build`); nothing else in
fxquant calls ``torch.ops.quantized`` directly, so another kernel provider (oneDNN on plain int8 tensors,
say) can replace this file. Weights are quantized and prepacked once, when the module is built, and kept only
in the packed form (``weight`` unpacks it); modules keep their output qparams and float bias as buffers.
``state_dict`` saves the unpacked weight compactly and loading repacks it; a pickled module repacks itself.

Example:
    >>> import torch
    >>> from fxquant.backends.kernels.qtensor import QTensorKernels
    >>> k = QTensorKernels("fbgemm")
    >>> k.supports("conv2d", torch.nn.Conv2d(3, 4, 3, padding_mode="reflect"))
    "padding_mode='reflect' (the quantized conv kernels pad with zeros only)"
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional

import torch
from torch import nn

from fxquant.errors import FxQuantError
from fxquant.qparams import QParams, quantize

__all__ = ["LoweringSpec", "entry", "QTensorKernels", "Quantize", "QuantizedConv", "QuantizedLinear",
           "QuantizedBatchNorm", "QuantizedBinary", "QuantizedCat", "QuantizedHardswish", "engine",
           "broadcast_is_slow", "float_binary", "call_packed"]


@contextlib.contextmanager
def engine(name: str) -> Iterator[None]:
    """Temporarily select the quantized engine ``name`` (kernels prepack for the current engine)."""
    old = torch.backends.quantized.engine
    if old != name:
        torch.backends.quantized.engine = name
    try:
        yield
    finally:
        if old != name:
            torch.backends.quantized.engine = old


@dataclasses.dataclass(frozen=True)
class LoweringSpec:
    """What lowering hands the kernel layer for one op.

    Attributes:
        target: the table entry's ``lowering`` name (``"conv2d_relu"``).
        module: the fused float module for module ops (conv, linear, bn), else ``None``.
        weight: the weight qparams for ops with weights.
        output: the output qparams (``None`` for dynamic kernels, whose output is float).
        kwargs: op arguments the kernel needs (``dim`` for cat).
        inputs: the qparams of the quantized inputs, in order (kernel layers on plain integer tensors need them;
            quantized tensors carry their own).
    """

    target: str
    module: Optional[nn.Module]
    weight: Optional[QParams]
    output: Optional[QParams]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    inputs: tuple[Optional[QParams], ...] = ()


class _OutputQParams(nn.Module):
    """Holds the output scale / zero point as buffers, mirrored as Python numbers for the hot path.

    Attributes:
        where: the graph node the module computes (set by lowering; named in error messages).
    """

    where = ""  # no class annotation: torch.jit.script cannot resolve the string annotations of this file

    def _describe(self) -> str:
        return f"{type(self).__name__} at {self.where}" if self.where else type(self).__name__

    def __init__(self, output: QParams) -> None:
        super().__init__()
        scale, zp = output.scalar()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float64))
        self.register_buffer("zero_point", torch.tensor(zp, dtype=torch.int64))
        self._scale, self._zp = scale, zp

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._scale, self._zp = float(self.scale), int(self.zero_point)

    def extra_repr(self) -> str:
        return f"scale={self._scale:.6g}, zero_point={self._zp}"

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles in this module's place (see ``scripting.py``)."""
        from fxquant.backends.kernels.scripting import scriptable

        return scriptable(self)


class Quantize(_OutputQParams):
    """float -> quantized tensor with fixed qparams (where a quantized region starts)."""

    def __init__(self, output: QParams) -> None:
        super().__init__(output)
        self.dtype = output.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.quantize_per_tensor(x, self._scale, self._zp, self.dtype)


def _pack_weight(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A quantized weight as its integers, float32 scale(s), and, only where they are not 0 / not axis 0,
    int32 zero points and the channel axis (every state_dict entry costs bytes in the saved file too)."""
    per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
    if per_channel:
        scale, zp, axis = w.q_per_channel_scales(), w.q_per_channel_zero_points(), w.q_per_channel_axis()
    else:
        scale, zp, axis = torch.tensor(w.q_scale()), torch.tensor(w.q_zero_point()), 0
    out = {"weight_int": w.int_repr(), "weight_scale": scale.to(torch.float32)}
    if bool((zp != 0).any()):
        out["weight_zero_point"] = zp.to(torch.int32)
    if axis != 0:
        out["weight_axis"] = torch.tensor(axis, dtype=torch.int8)
    return out


def _unpack_weight(d: dict[str, torch.Tensor]) -> torch.Tensor:
    ints, scale = d["weight_int"], d["weight_scale"]
    zp = d.get("weight_zero_point", torch.zeros_like(scale, dtype=torch.int32))
    if scale.dim() == 1:
        axis = int(d.get("weight_axis", torch.tensor(0)))
        return torch._make_per_channel_quantized_tensor(ints, scale.to(torch.float64), zp.to(torch.int64), axis)
    return torch._make_per_tensor_quantized_tensor(ints, float(scale), int(zp))


class _Packed(_OutputQParams):
    """A kernel with a prepacked weight; the float bias stays a buffer.

    The quantized weight lives only in its packed form (as torch.ao's modules keep it): ``weight`` unpacks it
    when read (``state_dict``, pickling, the debugging tools), so a converted model holds one byte per weight, not
    two, and convert writes half the memory for its weights.
    """

    _engine = ""
    weight_shape: tuple[int, ...] = ()

    def _pack(self, weight: torch.Tensor) -> Any:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The quantized weight, unpacked from the kernel's prepacked form. Read it, don't write into it: some
        engines (qnnpack) return the tensor the packed form keeps, and a write would not reach the kernel.
        (Unpacking is a method of the packed object and needs no engine switch, which would be process-wide.)"""
        kept = self.__dict__.get("_kept_weight")
        if kept is not None:
            return kept
        return self._unpack()

    def _unpacks(self) -> bool:
        """Whether the engine can unpack this kernel's weight: qnnpack's 3-d convs cannot (their weight is then
        kept beside the packed one)."""
        return self._engine != "qnnpack" or getattr(self, "dims", 2) != 3

    def _unpack(self) -> torch.Tensor:
        weight = self._packed.unpack()[0]
        # a 1-d conv is packed as a 2-d one: [out, in, 1, k] back to [out, in, k]
        return weight if tuple(weight.shape) == self.weight_shape else weight.reshape(self.weight_shape)

    def _repack(self, weight: torch.Tensor) -> None:
        with engine(self._engine):
            self._packed = self._pack(weight)
        self.weight_shape = tuple(weight.shape)
        self.__dict__["_kept_weight"] = None if self._unpacks() else weight

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        # the quantized weight is saved compactly as its integers plus float32 scales and int32 zero points
        # (a quantized tensor would store float64 scales and int64 zero points: 16 bytes per channel)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update({prefix + k: v for k, v in _pack_weight(self.weight).items()})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):  # type: ignore[override]
        mine = {k[len(prefix):]: v for k, v in state_dict.items()
                if k.startswith(prefix + "weight_") and "." not in k[len(prefix):]}
        weight = _unpack_weight(mine) if "weight_int" in mine else state_dict.get(prefix + "weight")
        new_weight = None
        if isinstance(weight, torch.Tensor):  # checked as load_state_dict checks parameters: no silent reshaping
            if not weight.is_quantized:
                errors.append(f"{prefix}weight is a float weight but this module is a quantized {type(self).__name__}: "
                              "load float weights into the float model, then prepare, calibrate and convert it again")
            elif tuple(weight.shape) != self.weight_shape:
                errors.append(f"size mismatch for {prefix}weight: copying a quantized weight of shape "
                              f"{tuple(weight.shape)} from the checkpoint, the shape in this model is "
                              f"{self.weight_shape} (a state_dict of another model?)")
            else:
                new_weight = weight
        bias = state_dict.get(prefix + "bias")
        if isinstance(bias, torch.Tensor):
            if self.bias is None or bias.shape != self.bias.shape:
                errors.append(f"size mismatch for {prefix}bias: copying a bias of shape {tuple(bias.shape)} from the "
                              f"checkpoint, this model has {None if self.bias is None else tuple(self.bias.shape)}")
            else:
                self._buffers["bias"] = bias.detach().clone()
        taken = {prefix + k for k in mine} | {prefix + "weight", prefix + "bias"}
        rest = {k: v for k, v in state_dict.items() if k not in taken}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing, unexpected, errors)
        if prefix + "bias" in missing and bias is not None:
            missing.remove(prefix + "bias")
        if weight is None:  # it is saved as weight_int (+ scales): name what the checkpoint lacks
            missing.append(prefix + "weight_int")
        self._repack(self.weight if new_weight is None else new_weight)  # the bias is packed with it

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_packed", None)
        state.pop("_kept_weight", None)
        state["_fxquant_weight"] = self.weight  # what the copy or the unpickled module packs again
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        weight = state.pop("_fxquant_weight", None)
        if weight is None:  # pickled before the weight lived only in its packed form: it was a buffer
            weight = state["_buffers"].pop("weight")
        self.__dict__.update(state)
        self._repack(weight)


def entry(op: Any) -> Any:
    """The C++ function behind a ``torch.ops`` overload that takes a packed weight.

    Calling the overload runs its Python ``__call__`` first, which scans every argument for a FakeScriptObject
    (what ``torch.export`` traces with): microseconds a call, a large share of a small conv at batch 1, paid by every
    conv and linear of a model. The kernels call the entry when their packed weight is a real
    ``torch.ScriptObject`` (always, outside tracing) and the overload otherwise (:func:`call_packed`).
    """
    return getattr(op, "_op", op)


#: inside it, torch's op binding skips the ``__torch_function__`` lookup on arguments that are not plain tensors
#: (torch's own ``Tensor.__torch_function__`` runs ops inside it); torch function modes still run
_no_subclass_dispatch = torch._C.DisableTorchFunctionSubclass


def call_packed(op: Any, x: torch.Tensor, packed: Any, *args: Any) -> Any:
    """``op(x, packed, *args)`` for an overload ``op`` that takes a packed weight, by the cheapest call that means
    the same.

    Torch's op binding asks every argument that is not a plain tensor for ``__torch_function__``. A packed weight is
    a ``torch.ScriptObject``, whose attribute lookup answers by throwing and catching a C++ exception and building a
    Python ``AttributeError``: about 30 µs a call on this project's machines, more than a small conv's arithmetic,
    paid by every conv and linear (torch.ao's modules pay it too; ``python tests/bench_kernels.py --dispatch`` prints
    both calls). When ``x`` is a plain tensor nothing can override the op (the remaining arguments are the packed
    weight and numbers), so the call runs with that lookup off. A tensor subclass input, or a FakeScriptObject
    under ``torch.export``, takes the ordinary route.

    Example:
        >>> w = torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 0, torch.qint8)
        >>> packed = torch.ops.quantized.linear_prepack(w, None)
        >>> x = torch.quantize_per_tensor(torch.randn(2, 4), 0.1, 64, torch.quint8)
        >>> call_packed(torch.ops.quantized.linear.default, x, packed, 0.2, 64).shape
        torch.Size([2, 4])
    """
    if type(packed) is not torch.ScriptObject:
        return op(x, packed, *args)
    if type(x) is not torch.Tensor:
        return entry(op)(x, packed, *args)
    with _no_subclass_dispatch():
        return entry(op)(x, packed, *args)


_CONV_OPS = {
    1: (torch.ops.quantized.conv1d_prepack, torch.ops.quantized.conv1d.default,
        torch.ops.quantized.conv1d_relu.default),
    2: (torch.ops.quantized.conv2d_prepack, torch.ops.quantized.conv2d.new, torch.ops.quantized.conv2d_relu.new),
    3: (torch.ops.quantized.conv3d_prepack, torch.ops.quantized.conv3d.new, torch.ops.quantized.conv3d_relu.new),
}
_LINEAR_OPS = (torch.ops.quantized.linear.default, torch.ops.quantized.linear_relu.default)


class QuantizedConv(_Packed):
    """Conv1d/2d/3d (optionally + ReLU) on quantized tensors."""

    def __init__(self, conv: nn.Module, weight: QParams, output: QParams, relu: bool, engine_name: str) -> None:
        super().__init__(output)
        float_weight = conv.weight.detach()  # read once: a conv with a batch norm folded on read computes it
        self.dims = float_weight.dim() - 2
        self.relu = bool(relu)  # indexes the (op, op + relu) tables
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        bias = conv.bias  # read once (a fold on read computes it)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._engine = engine_name
        self._repack(quantize(float_weight.float(), weight))

    def _pack(self, weight: torch.Tensor) -> Any:
        return _CONV_OPS[self.dims][0](weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:  # qnnpack would read the wrong channels
            raise FxQuantError(f"{self._describe()}: expects a batched input with {self.in_channels} channels and "
                               f"{self.dims} spatial dims (N, C, ...), got shape {tuple(x.shape)}; pass inputs shaped "
                               "like the example the model was prepared with (the quantized kernels take no unbatched "
                               "input: x.unsqueeze(0))")
        return call_packed(_CONV_OPS[self.dims][2 if self.relu else 1], x, self._packed, self._scale, self._zp)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, relu={self.relu}, {super().extra_repr()}")


class QuantizedLinear(_Packed):
    """Linear (optionally + ReLU) on quantized tensors."""

    def __init__(self, linear: nn.Linear, weight: QParams, output: QParams, relu: bool, engine_name: str) -> None:
        super().__init__(output)
        self.relu = bool(relu)  # indexes the (op, op + relu) tables
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = linear.bias  # read once (a fold on read computes it)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._engine = engine_name
        self._repack(quantize(linear.weight.detach().float(), weight))

    def _pack(self, weight: torch.Tensor) -> Any:
        return torch.ops.quantized.linear_prepack(weight, self.bias)

    def _unpack(self) -> torch.Tensor:
        return torch.ops.quantized.linear_unpack(self._packed)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:  # qnnpack would read it anyway, fbgemm asserts on its packed matrix
            raise FxQuantError(f"{self._describe()}: expects inputs with {self.in_features} features in the last "
                               f"dimension, like the float Linear, got shape {tuple(x.shape)}; pass inputs shaped like "
                               "the example the model was prepared with")
        return call_packed(_LINEAR_OPS[self.relu], x, self._packed, self._scale, self._zp)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, relu={self.relu}, {super().extra_repr()}"


class QuantizedBatchNorm(_OutputQParams):
    """BatchNorm2d/3d (optionally + ReLU) on quantized tensors."""

    def __init__(self, bn: nn.Module, output: QParams, relu: bool, dims: int) -> None:
        super().__init__(output)
        c = bn.num_features
        self.register_buffer("weight", bn.weight.detach().clone() if bn.weight is not None else torch.ones(c))
        self.register_buffer("bias", bn.bias.detach().clone() if bn.bias is not None else torch.zeros(c))
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.eps = bn.eps
        self.relu, self.dims = relu, dims
        name = f"batch_norm{dims}d" + ("_relu" if relu else "")
        self._op = getattr(torch.ops.quantized, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                        self._scale, self._zp)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_op", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._op = getattr(torch.ops.quantized, f"batch_norm{self.dims}d" + ("_relu" if self.relu else ""))


#: add / mul (+ relu): the C++ entries of the op packets (they take no packed weight: nothing to check)
_BINARY_ENTRIES = {t: entry(getattr(torch.ops.quantized, t)) for t in ("add", "add_relu", "mul", "mul_relu")}


def broadcast_is_slow(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch's quantized add / mul would walk this broadcast value by value: the smaller operand comes
    first, broadcast against the larger one's shape, without channels_last strides, while the larger is a
    channels_last activation of 4096 values or more. The kernel then writes its output in the first operand's
    (NCHW) layout and reads the activation strided: ConvNeXt's ``layer_scale * x`` (a ``[C, 1, 1]`` scale times
    the block's output, which its permute leaves with channels_last strides) is several times slower than
    dequantize, float mul, quantize (``tests/bench_kernels.py --binary`` prints both forms).

    Other slow broadcasts exist (the kernel vectorizes only runs where both operands are contiguous, in blocks of
    64, so a squeeze-excite gate over few channels and many pixels runs partly one value at a time, several times
    slower alone), but there the float form, which writes four bytes a value, lost inside the models as the zoo
    benchmark times them (after the fp32 model has evicted the caches), so they keep the kernel."""
    if a.shape == b.shape or a.numel() >= b.numel() or b.numel() < 4096 or a.dim() > b.dim():
        return False
    if b.dim() != 4 or b.is_contiguous() or not b.is_contiguous(memory_format=torch.channels_last):
        return False
    pad = b.dim() - a.dim()
    for d in range(a.dim()):
        if a.size(d) != 1 and a.size(d) != b.size(d + pad):
            return False
    return not (a.dim() == 4 and a.stride(1) < a.stride(2) and a.stride(1) < a.stride(3))


def float_binary(target: str, a: torch.Tensor, b: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``target`` (add, add_relu, mul, mul_relu) computed in float on the dequantized operands and quantized once
    to the output grid: the exact result rounded, which the kernel's integer arithmetic matches within a code.
    The op runs in place on the operand with more values, so that operand must have the broadcast shape (as
    :func:`broadcast_is_slow` requires); the output has that operand's layout and the first operand's dtype."""
    x, y = a.dequantize(), b.dequantize()
    if x.numel() < y.numel():
        x, y = y, x
    out = x.add_(y) if target.startswith("add") else x.mul_(y)
    if target.endswith("_relu"):
        out = out.relu_()
    return torch.quantize_per_tensor(out, scale, zero_point, a.dtype)


class QuantizedBinary(_OutputQParams):
    """add / mul (optionally + ReLU) of two quantized tensors. With ``float_broadcast`` (fbgemm and x86, which run
    the same ATen kernel; measured on fbgemm), a broadcast the kernel walks value by value runs in float instead
    (:func:`broadcast_is_slow`)."""

    float_broadcast = False  # the class default covers modules pickled before the flag existed

    def __init__(self, target: str, output: QParams, float_broadcast: bool = False) -> None:
        super().__init__(output)
        self.target = target
        self.float_broadcast = float_broadcast

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # same-shape adds (residuals) skip the rule's call; both operands are tensors here (observe keeps an op
        # with a scalar operand float)
        if self.float_broadcast and a.shape != b.shape and broadcast_is_slow(a, b):
            return float_binary(self.target, a, b, self._scale, self._zp)
        return _BINARY_ENTRIES[self.target](a, b, self._scale, self._zp)

    def extra_repr(self) -> str:
        return f"{self.target}, {super().extra_repr()}"


class QuantizedCat(_OutputQParams):
    """Concatenation of quantized tensors, requantized to one output scale."""

    def __init__(self, dim: int, output: QParams) -> None:
        super().__init__(output)
        self.dim = dim

    def forward(self, xs: list[torch.Tensor], dim: Optional[int] = None) -> torch.Tensor:
        return torch.ops.quantized.cat(list(xs), self.dim if dim is None else dim, self._scale, self._zp)


class QuantizedHardswish(_OutputQParams):
    """hardswish with its own output qparams."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.hardswish(x, self._scale, self._zp)


#: native quantized ops that torch's qnnpack kernels get wrong on a channels_last input (hardtanh/clamp write
#: the result in the wrong memory order; qnnpack convs return channels_last): they get a contiguous input
_QNNPACK_CONTIGUOUS_INPUT = frozenset({"relu6", "hardtanh", "clamp"})
#: on every engine: torch's quantized mean on a channels_last input (what the convs return) misrounds exact
#: halves in ~1% of outputs; on a contiguous input it is the integer mean rounded half to even, like the
#: pooling kernels on either layout, and what quantization-aware training simulates
_CONTIGUOUS_INPUT = frozenset({"mean"})

_CONV_TARGETS = {f"conv{n}d{r}": (n, bool(r)) for n in (1, 2, 3) for r in ("", "_relu")}
_BN_TARGETS = {f"batch_norm{n}d{r}": (n, bool(r)) for n in (2, 3) for r in ("", "_relu")}


class QTensorKernels:
    """Builds quantized modules for lowering targets with ``torch.ops.quantized`` kernels.

    Args:
        engine_name: the quantized engine the kernels run under (``"fbgemm"``, ``"x86"``, ``"qnnpack"``).
    """

    name = "qtensor"

    def __init__(self, engine_name: str) -> None:
        self.engine = engine_name

    def available(self) -> Optional[str]:
        """``None`` if the engine exists in this torch build, else why not."""
        if self.engine not in torch.backends.quantized.supported_engines:
            return (f"this torch build has no '{self.engine}' quantized engine (it has "
                    f"{torch.backends.quantized.supported_engines})")
        return None

    def supports(self, target: str, module: Optional[nn.Module]) -> Optional[str]:
        """``None`` if ``target`` can run ``module``; else the reason it stays float."""
        if target in _CONV_TARGETS:
            conv = module.op if hasattr(module, "op") else module
            if getattr(conv, "padding_mode", "zeros") != "zeros":
                return f"padding_mode='{conv.padding_mode}' (the quantized conv kernels pad with zeros only)"
            if isinstance(conv.padding, str):
                return f"padding='{conv.padding}' (give explicit integer padding)"
        if target == "conv_transpose3d" and self.engine == "qnnpack":
            return "qnnpack's conv_transpose3d returns wrong values (-12.5 dB against float on a test model)"
        if target == "prelu" and module is not None and module.weight.numel() != 1:
            return ("PReLU with one slope per channel: torch's quantized prelu kernel returns wrong values "
                    "(6 dB against float on a test tensor); single-slope PReLU runs as leaky_relu")
        from fxquant.backends.kernels import dynamic

        if target in dynamic.BUILDERS:
            return dynamic.supports(target, module)
        return None

    def native_method(self, method: str) -> str:
        """The method to call on a quantized tensor for ``method``: quantized convs return channels-last
        tensors, on which ``view`` fails where the float model's contiguous tensor allowed it."""
        return "reshape" if method == "view" else method

    def needs_contiguous_input(self, op_name: str) -> bool:
        """Whether the op ``op_name`` (a table entry name), run natively on quantized tensors, must be given a
        contiguous input on this engine (see ``_QNNPACK_CONTIGUOUS_INPUT`` and ``_CONTIGUOUS_INPUT``)."""
        return op_name in _CONTIGUOUS_INPUT or (self.engine == "qnnpack" and op_name in _QNNPACK_CONTIGUOUS_INPUT)

    def quantize(self, qp: QParams) -> nn.Module:
        """The module that quantizes a float tensor at the start of a quantized region."""
        return Quantize(qp)

    def dequantize(self, qp: QParams) -> Optional[nn.Module]:
        """``None``: a quantized tensor dequantizes itself (``.dequantize()``)."""
        return None

    def native(self, entry_name: str, call: Any, x: QParams, out: QParams) -> Optional[nn.Module]:
        """``None``: shares-input and fixed-qparams ops run as they are on quantized tensors."""
        return None

    def targets(self) -> frozenset[str]:
        """Every lowering target this layer builds (a table naming another one is a mistake)."""
        from fxquant.backends.kernels.dynamic import BUILDERS as DYNAMIC
        from fxquant.backends.kernels.qtensor_ops import BUILDERS

        return frozenset(BUILDERS) | frozenset(DYNAMIC)

    def build(self, spec: LoweringSpec) -> nn.Module:
        """The quantized module that computes ``spec.target``."""
        from fxquant.backends.kernels.dynamic import BUILDERS as DYNAMIC
        from fxquant.backends.kernels.qtensor_ops import BUILDERS

        if spec.target in DYNAMIC:  # dynamic and weight-only kernels (float in, float out)
            return DYNAMIC[spec.target](spec, self.engine)
        if spec.target not in BUILDERS:
            raise KeyError(f"kernel layer '{self.name}' has no lowering for target '{spec.target}'")
        return BUILDERS[spec.target](spec, self.engine)
