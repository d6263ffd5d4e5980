"""More ``torch.ops.quantized`` kernels for the qtensor layer: transposed convs, norms, activations with their
own output qparams, softmax, matmul, stack.

Each class takes the float module (or op arguments) and the output qparams; see ``QTensorKernels.build``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.backends.kernels.qtensor import (_BN_TARGETS, _CONV_TARGETS, LoweringSpec, QuantizedBatchNorm,
                                              QuantizedBinary, QuantizedCat, QuantizedConv, QuantizedHardswish,
                                              QuantizedLinear, _OutputQParams, _Packed, call_packed, engine)
from fxquant.qparams import QParams, quantize

__all__ = ["BUILDERS", "QuantizedConvTranspose", "QuantizedNorm", "QuantizedELU", "QuantizedLeakyReLU",
           "QuantizedSoftmax", "QuantizedGELU", "QuantizedMatmul", "QuantizedStack"]

_TRANSPOSE_OPS = {
    1: (torch.ops.quantized.conv_transpose1d_prepack, torch.ops.quantized.conv_transpose1d.default),
    2: (torch.ops.quantized.conv_transpose2d_prepack, torch.ops.quantized.conv_transpose2d.default),
    3: (torch.ops.quantized.conv_transpose3d_prepack, torch.ops.quantized.conv_transpose3d.default),
}


class QuantizedConvTranspose(_Packed):
    """ConvTranspose1d/2d/3d on quantized tensors (per-tensor weights: the kernels reject per-channel)."""

    def __init__(self, conv: nn.Module, weight: QParams, output: QParams, engine_name: str) -> None:
        super().__init__(output)
        float_weight = conv.weight.detach()  # read once: a conv with a batch norm folded on read computes it
        self.dims = float_weight.dim() - 2
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.output_padding, self.dilation = list(conv.output_padding), list(conv.dilation)
        self.groups = conv.groups
        bias = conv.bias  # read once (a fold on read computes it)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._engine = engine_name
        self._repack(quantize(float_weight.float(), weight))

    def _pack(self, weight: torch.Tensor) -> Any:
        return _TRANSPOSE_OPS[self.dims][0](weight, self.bias, self.stride, self.padding, self.output_padding,
                                            self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return call_packed(_TRANSPOSE_OPS[self.dims][1], x, self._packed, self._scale, self._zp)


class QuantizedNorm(_OutputQParams):
    """LayerNorm, GroupNorm, InstanceNorm1d/2d/3d with float affine parameters."""

    def __init__(self, kind: str, norm: nn.Module, output: QParams) -> None:
        super().__init__(output)
        self.kind = kind
        self.eps = float(norm.eps)
        weight = getattr(norm, "weight", None)
        bias = getattr(norm, "bias", None)
        self.register_buffer("weight", None if weight is None else weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.normalized_shape = list(getattr(norm, "normalized_shape", ()))
        self.num_groups = getattr(norm, "num_groups", 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer_norm":
            return torch.ops.quantized.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                                                  self._scale, self._zp)
        if self.kind == "group_norm":
            return torch.ops.quantized.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                                  self._scale, self._zp)
        return torch.ops.quantized.instance_norm(x, self.weight, self.bias, self.eps, self._scale, self._zp)

    def extra_repr(self) -> str:
        return f"{self.kind}, {super().extra_repr()}"


class QuantizedELU(_OutputQParams):
    """ELU with its own output qparams."""

    def __init__(self, alpha: float, output: QParams) -> None:
        super().__init__(output)
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.elu(x, self._scale, self._zp, self.alpha)


class QuantizedLeakyReLU(_OutputQParams):
    """LeakyReLU with its own output qparams."""

    def __init__(self, negative_slope: float, output: QParams) -> None:
        super().__init__(output)
        self.negative_slope = float(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.leaky_relu(x, self.negative_slope, False, self._scale, self._zp)


class QuantizedGELU(_OutputQParams):
    """GELU with its own output qparams: no quantized-tensor kernel writes GELU into another grid than its input's
    (``torch.nn.functional.gelu`` on a quantized tensor keeps the input's qparams, where the negative half of the
    codes goes unused), so the float GELU runs between a dequantize and a quantize, in one module."""

    def __init__(self, approximate: str, output: QParams) -> None:
        super().__init__(output)
        self.approximate = str(approximate)
        self.dtype = output.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.quantize_per_tensor(F.gelu(x.dequantize(), approximate=self.approximate), self._scale,
                                         self._zp, self.dtype)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, {super().extra_repr()}"


class QuantizedSoftmax(_OutputQParams):
    """Softmax along ``dim`` (the output range is [0, 1]: fixed qparams)."""

    def __init__(self, dim: int, output: QParams) -> None:
        super().__init__(output)
        self.dim = int(dim)

    def forward(self, x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
        # qnnpack's softmax indexes the shape with dim unchecked: hand it a non-negative dim
        return torch.ops.quantized.softmax(x, self.dim % x.dim(), self._scale, self._zp)


class QuantizedMatmul(_OutputQParams):
    """matmul / bmm of two quantized tensors."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.matmul(a, b, self._scale, self._zp)


class QuantizedStack(_OutputQParams):
    """stack of quantized tensors: concatenation of the inputs unsqueezed at ``dim``."""

    def __init__(self, dim: int, output: QParams) -> None:
        super().__init__(output)
        self.dim = int(dim)

    def forward(self, xs: list[torch.Tensor], dim: Optional[int] = None) -> torch.Tensor:
        return torch.ops.quantized.cat([x.unsqueeze(self.dim) for x in xs], self.dim, self._scale, self._zp)


def _conv(spec: LoweringSpec, eng: str) -> nn.Module:
    relu = _CONV_TARGETS[spec.target][1]
    with engine(eng):
        return QuantizedConv(spec.module.op if relu else spec.module, spec.weight, spec.output, relu, eng)


def _linear(spec: LoweringSpec, eng: str) -> nn.Module:
    relu = spec.target == "linear_relu"
    with engine(eng):
        return QuantizedLinear(spec.module.op if relu else spec.module, spec.weight, spec.output, relu, eng)


def _bn(spec: LoweringSpec, eng: str) -> nn.Module:
    dims, relu = _BN_TARGETS[spec.target]
    return QuantizedBatchNorm(spec.module.op if relu else spec.module, spec.output, relu, dims)


def _transposed(spec: LoweringSpec, eng: str) -> nn.Module:
    with engine(eng):
        return QuantizedConvTranspose(spec.module, spec.weight, spec.output, eng)


#: lowering target -> builder(spec, engine name); the single list of what this kernel layer can run
BUILDERS: dict[str, Callable[[LoweringSpec, str], nn.Module]] = {
    **{t: _conv for t in _CONV_TARGETS},
    **{t: _bn for t in _BN_TARGETS},
    **{f"conv_transpose{n}d": _transposed for n in (1, 2, 3)},
    "linear": _linear,
    "linear_relu": _linear,
    **{t: (lambda spec, eng: QuantizedBinary(spec.target, spec.output, float_broadcast=eng in ("fbgemm", "x86")))
       for t in ("add", "add_relu", "mul", "mul_relu")},
    "cat": lambda spec, eng: QuantizedCat(int(spec.kwargs.get("dim", 0)), spec.output),
    "stack": lambda spec, eng: QuantizedStack(int(spec.kwargs.get("dim", 0)), spec.output),
    "hardswish": lambda spec, eng: QuantizedHardswish(spec.output),
    **{t: (lambda spec, eng: QuantizedNorm(spec.target, spec.module, spec.output))
       for t in ("layer_norm", "group_norm", "instance_norm")},
    "elu": lambda spec, eng: QuantizedELU(spec.kwargs.get("alpha", 1.0), spec.output),
    "leaky_relu": lambda spec, eng: QuantizedLeakyReLU(spec.kwargs.get("negative_slope", 0.01), spec.output),
    # a single-slope PReLU is a leaky ReLU (per-channel PReLU stays float: see QTensorKernels.supports)
    "prelu": lambda spec, eng: QuantizedLeakyReLU(float(spec.module.weight.detach()), spec.output),
    "softmax": lambda spec, eng: QuantizedSoftmax(spec.kwargs["dim"], spec.output),
    "gelu": lambda spec, eng: QuantizedGELU(spec.kwargs.get("approximate", "none"), spec.output),
    "matmul": lambda spec, eng: QuantizedMatmul(spec.output),
}
