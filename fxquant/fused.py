"""Fused float modules and functions: what fusion produces and lowering consumes.

Fusion folds batch norm into the preceding conv/linear (eval mode) and groups an op with the ReLU that
follows it, so one graph node is one quantized kernel. These are ordinary float modules: a fused model
computes the same function as the original (up to float rounding of the BN fold).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from fxquant.fused import fold_bn
    >>> conv, bn = nn.Conv2d(3, 4, 3).eval(), nn.BatchNorm2d(4).eval()
    >>> x = torch.randn(1, 3, 8, 8)
    >>> torch.allclose(fold_bn(conv, bn)(x), bn(conv(x)), atol=1e-5)
    True
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

__all__ = [
    "ConvReLU1d",
    "ConvReLU2d",
    "ConvReLU3d",
    "LinearReLU",
    "BNReLU2d",
    "BNReLU3d",
    "add_relu",
    "mul_relu",
    "fold_bn",
    "fuse_conv_bn",
    "fuse_conv_bn_relu",
    "fuse_linear_bn",
    "fuse_linear_relu",
    "fuse_bn_relu",
]


class _OpReLU(nn.Module):
    """An op followed by ReLU, as one module (``self.op`` then ``relu``)."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.op(x))


class ConvReLU1d(_OpReLU):
    """``relu(conv1d(x))``."""


class ConvReLU2d(_OpReLU):
    """``relu(conv2d(x))``."""


class ConvReLU3d(_OpReLU):
    """``relu(conv3d(x))``."""


class LinearReLU(_OpReLU):
    """``relu(linear(x))``."""


class BNReLU2d(_OpReLU):
    """``relu(batch_norm2d(x))``."""


class BNReLU3d(_OpReLU):
    """``relu(batch_norm3d(x))``."""


def _traced_as_one_call(fn: Any, a: Any, b: Any) -> Optional[torch.fx.Proxy]:
    """Under any torch.fx tracer (torch.load re-traces a saved GraphModule's code), record ``fn(a, b)`` as one
    call_function node instead of tracing into it: the fused op must stay one node for its record to apply."""
    proxy = a if isinstance(a, torch.fx.Proxy) else b if isinstance(b, torch.fx.Proxy) else None
    return None if proxy is None else proxy.tracer.create_proxy("call_function", fn, (a, b), {})


def add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``relu(a + b)``: the fused form of an add followed by a ReLU."""
    traced = _traced_as_one_call(add_relu, a, b)
    return torch.relu(a + b) if traced is None else traced


def mul_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``relu(a * b)``: the fused form of a mul followed by a ReLU."""
    traced = _traced_as_one_call(mul_relu, a, b)
    return torch.relu(a * b) if traced is None else traced


def _copy(module: nn.Module) -> nn.Module:
    """A copy of a leaf module that shares its tensors (fusion replaces the ones it changes): cheaper than a
    deepcopy of every weight, which fusion of a whole model would otherwise pay."""
    out = copy.copy(module)
    out._parameters = dict(module._parameters)
    out._buffers = dict(module._buffers)
    out._modules = dict(module._modules)
    return out


def fold_bn(op: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``op`` (conv or linear) with the eval-mode batch norm ``bn`` folded into it.

    ``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold {type(bn).__name__} without running statistics "
                         "(track_running_stats=False); leave it unfused")
    fused = _copy(op)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    factor = (gamma * inv_std).detach()
    transposed = isinstance(op, nn.modules.conv._ConvTransposeNd)
    shape = [1] * op.weight.dim()
    shape[1 if transposed else 0] = -1
    bias = op.bias if op.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        fused.weight = nn.Parameter(op.weight.detach() * factor.reshape(shape))
        fused.bias = nn.Parameter((bias.detach() - bn.running_mean) * factor + beta.detach())
    return fused


_CONV_RELU = {nn.Conv1d: ConvReLU1d, nn.Conv2d: ConvReLU2d, nn.Conv3d: ConvReLU3d}
_BN_RELU = {nn.BatchNorm2d: BNReLU2d, nn.BatchNorm3d: BNReLU3d}


def fuse_conv_bn(mods: list[Optional[nn.Module]]) -> nn.Module:
    """conv, bn -> conv with bn folded."""
    return fold_bn(mods[0], mods[1])


def fuse_conv_bn_relu(mods: list[Optional[nn.Module]]) -> nn.Module:
    """conv, bn, relu -> ConvReLUNd with bn folded (also accepts conv, relu)."""
    conv = fold_bn(mods[0], mods[1]) if len(mods) == 3 else _copy(mods[0])
    return _CONV_RELU[type(mods[0])](conv)


def fuse_linear_bn(mods: list[Optional[nn.Module]]) -> nn.Module:
    """linear, bn1d -> linear with bn folded."""
    return fold_bn(mods[0], mods[1])


def fuse_linear_relu(mods: list[Optional[nn.Module]]) -> nn.Module:
    """linear, relu (or linear, bn1d, relu) -> LinearReLU."""
    lin = fold_bn(mods[0], mods[1]) if len(mods) == 3 else _copy(mods[0])
    return LinearReLU(lin)


def fuse_bn_relu(mods: list[Optional[nn.Module]]) -> nn.Module:
    """bn, relu -> BNReLUNd."""
    return _BN_RELU[type(mods[0])](_copy(mods[0]))
