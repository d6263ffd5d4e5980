"""TorchScript twins of the qtensor kernel modules (what ``torch.jit.script`` compiles in their place).

The kernel modules pick their ``torch.ops.quantized`` op at run time (from a table, by ``getattr``) and raise
fxquant's own errors with formatted messages; TorchScript compiles neither. ``torch.jit.script`` calls each
module's ``__prepare_scriptable__`` first, which hands it the twin built here: the same prepacked weights and
output qparams, one fixed op per class, and no input checks (a scripted model is unchecked, as ``torch.jit.trace``
output is). Modules without a twin are compiled as they are.

Example:
    >>> import torch, fxquant                                              # doctest: +SKIP
    >>> scripted = torch.jit.script(fxquant.convert_fx(prepared))           # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable, List

import torch
from torch import nn

from fxquant.backends.kernels.qtensor import broadcast_is_slow, float_binary

__all__ = ["scriptable"]


class _Kernel(nn.Module):
    """Output scale / zero point as plain attributes (``_scale``, ``_zp``), plus the source's buffers."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self._scale = float(source._scale)
        self._zp = int(source._zp)
        for name, buf in source.named_buffers(recurse=False):
            self.register_buffer(name, buf)


class _Conv1d(_Kernel):
    def __init__(self, source: nn.Module) -> None:
        super().__init__(source)
        self._packed = source._packed
        self.relu = bool(source.relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu:
            return torch.ops.quantized.conv1d_relu(x, self._packed, self._scale, self._zp)
        return torch.ops.quantized.conv1d(x, self._packed, self._scale, self._zp)


class _Conv2d(_Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu:
            return torch.ops.quantized.conv2d_relu(x, self._packed, self._scale, self._zp)
        return torch.ops.quantized.conv2d(x, self._packed, self._scale, self._zp)


class _Conv3d(_Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu:
            return torch.ops.quantized.conv3d_relu(x, self._packed, self._scale, self._zp)
        return torch.ops.quantized.conv3d(x, self._packed, self._scale, self._zp)


class _ConvTranspose1d(_Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.conv_transpose1d(x, self._packed, self._scale, self._zp)


class _ConvTranspose2d(_Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.conv_transpose2d(x, self._packed, self._scale, self._zp)


class _ConvTranspose3d(_Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.conv_transpose3d(x, self._packed, self._scale, self._zp)


class _Linear(_Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu:
            return torch.ops.quantized.linear_relu(x, self._packed, self._scale, self._zp)
        return torch.ops.quantized.linear(x, self._packed, self._scale, self._zp)


class _BatchNorm(_Kernel):
    def __init__(self, source: nn.Module) -> None:
        super().__init__(source)
        self.eps = float(source.eps)
        self.relu = bool(source.relu)
        self.dims = int(source.dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (self.weight, self.bias, self.running_mean, self.running_var)
        if self.dims == 2:
            if self.relu:
                return torch.ops.quantized.batch_norm2d_relu(x, *args, self.eps, self._scale, self._zp)
            return torch.ops.quantized.batch_norm2d(x, *args, self.eps, self._scale, self._zp)
        if self.relu:
            return torch.ops.quantized.batch_norm3d_relu(x, *args, self.eps, self._scale, self._zp)
        return torch.ops.quantized.batch_norm3d(x, *args, self.eps, self._scale, self._zp)


class _Binary(_Kernel):
    def __init__(self, source: nn.Module) -> None:
        super().__init__(source)
        self.target = str(source.target)
        self.float_broadcast = bool(getattr(source, "float_broadcast", False))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.float_broadcast and broadcast_is_slow(a, b):
            return float_binary(self.target, a, b, self._scale, self._zp)
        if self.target == "add":
            return torch.ops.quantized.add(a, b, self._scale, self._zp)
        if self.target == "add_relu":
            return torch.ops.quantized.add_relu(a, b, self._scale, self._zp)
        if self.target == "mul":
            return torch.ops.quantized.mul(a, b, self._scale, self._zp)
        return torch.ops.quantized.mul_relu(a, b, self._scale, self._zp)


class _Cat(_Kernel):
    def __init__(self, source: nn.Module) -> None:
        super().__init__(source)
        self.dim = int(source.dim)

    def forward(self, xs: List[torch.Tensor], dim: int = 0) -> torch.Tensor:
        return torch.ops.quantized.cat(xs, self.dim, self._scale, self._zp)


class _Stack(_Cat):
    def forward(self, xs: List[torch.Tensor], dim: int = 0) -> torch.Tensor:
        return torch.ops.quantized.cat([x.unsqueeze(self.dim) for x in xs], self.dim, self._scale, self._zp)


def _twins() -> dict[str, Callable[[nn.Module], nn.Module]]:
    def conv(source: nn.Module) -> nn.Module:
        return (_Conv1d, _Conv2d, _Conv3d)[source.dims - 1](source)

    def transposed(source: nn.Module) -> nn.Module:
        return (_ConvTranspose1d, _ConvTranspose2d, _ConvTranspose3d)[source.dims - 1](source)

    return {"QuantizedConv": conv, "QuantizedConvTranspose": transposed, "QuantizedLinear": _Linear,
            "QuantizedBatchNorm": _BatchNorm, "QuantizedBinary": _Binary, "QuantizedCat": _Cat,
            "QuantizedStack": _Stack}


def scriptable(module: nn.Module) -> Any:
    """The module ``torch.jit.script`` should compile for the kernel module ``module`` (itself if it compiles)."""
    make = _twins().get(type(module).__name__)
    if make is None:
        return module
    twin = make(module)
    twin.training = module.training
    return twin
