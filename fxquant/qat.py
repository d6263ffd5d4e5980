"""Quantization-aware-training modules: float ops whose weights pass through a fake quantizer.

``prepare_qat_fx`` swaps each conv / linear (alone, or fused with batch norm and ReLU) for one of these;
``convert_fx`` swaps them back with :meth:`QATModule.to_float` and lowers the result like a post-training
model, quantizing the weights with the qparams their ``weight_fake_quant`` learned during training.

Every module here is an ordinary subclass of the torch op it simulates (``Conv2d`` is an ``nn.Conv2d``),
holds a ``weight_fake_quant`` built from ``qconfig.weight()`` (``None`` = float weights) and works on any
device and with any optimizer.

Batch norm folding (``ConvBn*``, ``ConvBnReLU*``, ``LinearBn1d``, ``LinearBnReLU1d``). After conversion
the batch norm is folded into the conv: ``w' = w * s`` with ``s = gamma / sqrt(running_var + eps)``, and it
is ``w'`` that gets quantized. Training simulates exactly that weight ("simulated folding", Jacob et al.
2018, section 3.2; Krishnamoorthi 2018, section 3.2.2)::

    s    = gamma / sqrt(running_var + eps)          # from the running statistics, no gradient into them
    y    = conv(x, weight_fake_quant(w * s)) / s    # the deployed weight, scaled back per channel
    y    = y + bias                                 # the conv's own bias, if any
    out  = bn(y)                                    # batch statistics in training (and they update the
                                                    # running ones), running statistics in eval

In training, ``bn`` normalises with the batch statistics, so the output is the float conv+bn up to the
weight rounding, and the running statistics see the conv output as in the float model. In eval mode (or
after :meth:`freeze_bn_stats`) ``bn`` uses the running statistics and the output is exactly
``conv(x, fq(w')) + (bias - running_mean) * s + beta``: the folded conv that :meth:`to_float` returns and
``convert_fx`` quantizes. A channel with ``gamma == 0`` divides by 1 instead of 0 (its output is ``beta``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> import fxquant
    >>> from fxquant import qat
    >>> qconfig = fxquant.get_default_qat_qconfig("x86")
    >>> m = qat.ConvBnReLU2d.from_float(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), qconfig=qconfig)
    >>> y = m(torch.randn(4, 3, 10, 10))                 # train mode: fake-quantized folded weights
    >>> _ = qat.freeze_bn_stats(m)                        # from now on: running statistics, no updates
    >>> type(m.to_float()).__name__                       # what convert_fx lowers
    'ConvReLU2d'
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fxquant import fused
from fxquant.qparams import QParams

__all__ = [
    "QATModule", "Conv1d", "Conv2d", "Conv3d", "ConvReLU1d", "ConvReLU2d", "ConvReLU3d", "ConvBn1d", "ConvBn2d",
    "ConvBn3d", "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d", "Linear", "LinearReLU", "LinearBn1d",
    "LinearBnReLU1d", "freeze_bn_stats", "update_bn_stats", "fuse_conv_bn_qat", "fuse_conv_bn_relu_qat",
    "fuse_linear_bn_qat", "fuse_linear_relu_qat",
]


def _along(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """``t`` (1-d) reshaped to broadcast along ``axis`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


class QATModule:
    """Mixin of every QAT module: the weight fake quantizer and the way back to float.

    Attributes:
        weight_fake_quant: applied to the weight (the folded weight for ``*Bn*`` modules) in ``forward``;
            ``None`` means float weights.
    """

    weight: nn.Parameter
    weight_fake_quant: Optional[nn.Module]
    #: a ReLU follows the op
    _relu: ClassVar[bool] = False

    def _init_weight_fake_quant(self, qconfig: Any) -> None:
        self.register_module("weight_fake_quant", None)  # type: ignore[attr-defined]
        if qconfig is not None and qconfig.weight is not None:
            self.set_weight_fake_quant(qconfig.weight())

    def set_weight_fake_quant(self, fake_quant: Optional[nn.Module]) -> None:
        """Use ``fake_quant`` for the weight (moved to the weight's device); ``None`` for float weights."""
        if fake_quant is not None:
            fake_quant = fake_quant.to(self.weight.device)
            fake_quant.where = f"weight of {type(self).__name__}"
        self.weight_fake_quant = fake_quant

    def _fake_quant_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.weight_fake_quant is None else self.weight_fake_quant(w)

    def _activation(self, y: torch.Tensor) -> torch.Tensor:
        return torch.relu(y) if self._relu else y

    def weight_qparams(self) -> Optional[QParams]:
        """The qparams the weight fake quantizer applies, or ``None`` (float weights, or it saw no weight yet)."""
        fq = self.weight_fake_quant
        if fq is None or not hasattr(fq, "qparams") or not getattr(fq, "has_data", True):
            return None
        return fq.qparams()

    def to_float(self) -> nn.Module:
        """The equivalent float (fused) module: what ``convert_fx`` lowers in place of this one."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ conv

_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


class _ConvQAT(QATModule):
    """Conv (+ ReLU) with fake-quantized weights; the concrete classes add the torch conv base class."""

    _float_conv: ClassVar[type]
    _float_relu: ClassVar[type]
    _conv_forward: Any

    def __init__(self, *args: Any, qconfig: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_weight_fake_quant(qconfig)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._activation(self._conv_forward(x, self._fake_quant_weight(self.weight), self.bias))

    def _conv_kwargs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _CONV_ARGS}

    def _float_op(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
        conv = self._float_conv(**self._conv_kwargs(), bias=bias is not None, device=weight.device,
                                dtype=weight.dtype)
        conv.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            conv.bias = nn.Parameter(bias.detach().clone())
        conv.train(self.training)  # type: ignore[attr-defined]
        return self._float_relu(conv) if self._relu else conv

    def to_float(self) -> nn.Module:
        """``nn.ConvNd`` (or ``fxquant.fused.ConvReLUNd``) with the same (float) weight and bias."""
        return self._float_op(self.weight, self.bias)  # type: ignore[attr-defined]

    @classmethod
    def from_float(cls, conv: nn.Module, qconfig: Any = None) -> "_ConvQAT":
        """The QAT module sharing ``conv``'s parameters.

        Args:
            conv: an ``nn.ConvNd`` of the matching dimension.
            qconfig: builds ``weight_fake_quant`` (``None``: attach one later with :meth:`set_weight_fake_quant`).
        """
        m = cls(**{k: getattr(conv, k) for k in _CONV_ARGS}, bias=conv.bias is not None, qconfig=qconfig,
                device=conv.weight.device, dtype=conv.weight.dtype)
        m.weight, m.bias = conv.weight, conv.bias
        m.train(conv.training)
        return m


class Conv1d(_ConvQAT, nn.Conv1d):
    """``nn.Conv1d`` with a fake-quantized weight."""

    _float_conv, _float_relu = nn.Conv1d, fused.ConvReLU1d


class Conv2d(_ConvQAT, nn.Conv2d):
    """``nn.Conv2d`` with a fake-quantized weight."""

    _float_conv, _float_relu = nn.Conv2d, fused.ConvReLU2d


class Conv3d(_ConvQAT, nn.Conv3d):
    """``nn.Conv3d`` with a fake-quantized weight."""

    _float_conv, _float_relu = nn.Conv3d, fused.ConvReLU3d


class ConvReLU1d(Conv1d):
    """``relu(conv1d(x))`` with a fake-quantized weight; ``to_float()`` is a ``fused.ConvReLU1d``."""

    _relu = True


class ConvReLU2d(Conv2d):
    """``relu(conv2d(x))`` with a fake-quantized weight; ``to_float()`` is a ``fused.ConvReLU2d``."""

    _relu = True


class ConvReLU3d(Conv3d):
    """``relu(conv3d(x))`` with a fake-quantized weight; ``to_float()`` is a ``fused.ConvReLU3d``."""

    _relu = True


# ----------------------------------------------------------------------------------- batch norm folding

class _BnFold:
    """Simulated batch-norm folding for a weighted op followed by ``self.bn`` (see the module docstring)."""

    bn: nn.modules.batchnorm._BatchNorm
    weight: nn.Parameter
    bias: Optional[nn.Parameter]
    freeze_bn: bool
    training: bool
    #: the channel axis of the op's output (1 for conv, -1 for linear)
    _out_axis: ClassVar[int] = 1

    def _init_bn(self, bn: nn.modules.batchnorm._BatchNorm, freeze_bn: bool) -> None:
        if bn.running_var is None or bn.running_mean is None:
            raise ValueError(f"{type(self).__name__}: cannot fold a batch norm without running statistics "
                             "(track_running_stats=False); leave it unfused")
        self.bn = bn
        self.freeze_bn = False
        if freeze_bn:
            self.freeze_bn_stats()

    def _bn_scale(self) -> torch.Tensor:
        """``gamma / sqrt(running_var + eps)`` per output channel."""
        bn = self.bn
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        return inv_std if bn.weight is None else bn.weight * inv_std

    def _folded_weight(self, scale: torch.Tensor) -> torch.Tensor:
        return self.weight * _along(scale, self.weight.dim(), 0)

    def _folded_bias(self, scale: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        bias = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        return (bias - bn.running_mean) * scale + beta

    def _bn_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._bn_scale()
        y = self._op(x, self._fake_quant_weight(self._folded_weight(scale)))  # type: ignore[attr-defined]
        axis = self._out_axis % y.dim()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        y = y / _along(safe, y.dim(), axis)
        if self.bias is not None:
            y = y + _along(self.bias, y.dim(), axis)
        return self._activation(self.bn(y))  # type: ignore[attr-defined]

    def to_float(self) -> nn.Module:
        """The float op with the batch norm folded in, from the running statistics (plus ReLU if fused)."""
        with torch.no_grad():
            scale = self._bn_scale()
            return self._float_op(self._folded_weight(scale), self._folded_bias(scale))  # type: ignore[attr-defined]

    def freeze_bn_stats(self) -> "_BnFold":
        """Normalise with the running statistics and stop updating them (also after ``model.train()``).

        From then on the training forward computes exactly the folded op that conversion produces. Returns ``self``.
        """
        self.freeze_bn = True
        self.bn.train(False)
        return self

    def update_bn_stats(self) -> "_BnFold":
        """Undo :meth:`freeze_bn_stats`: batch statistics in training, running statistics updated. Returns ``self``."""
        self.freeze_bn = False
        self.bn.train(self.training)
        return self

    def train(self, mode: bool = True) -> "_BnFold":
        """As ``nn.Module.train``, except that a frozen batch norm stays in eval mode."""
        self.training = mode
        for name, child in self.named_children():  # type: ignore[attr-defined]
            child.train(False if (name == "bn" and self.freeze_bn) else mode)
        return self


class _ConvBnQAT(_BnFold, _ConvQAT):
    """Conv + BatchNorm (+ ReLU) with simulated folding."""

    _bn_type: ClassVar[type]

    def __init__(self, *args: Any, eps: float = 1e-5, momentum: Optional[float] = 0.1, freeze_bn: bool = False,
                 qconfig: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("bias", False)
        super().__init__(*args, qconfig=qconfig, **kwargs)
        bn = self._bn_type(self.out_channels, eps=eps, momentum=momentum, device=self.weight.device,
                           dtype=self.weight.dtype)
        self._init_bn(bn, freeze_bn)

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._bn_forward(x)

    @classmethod
    def from_float(cls, conv: nn.Module, bn: Optional[nn.Module] = None, qconfig: Any = None) -> "_ConvBnQAT":
        """The QAT module sharing the parameters and statistics of ``conv`` and ``bn``.

        Args:
            conv: an ``nn.ConvNd``.
            bn: the ``nn.BatchNormNd`` that follows it (its running statistics are required).
            qconfig: builds ``weight_fake_quant`` (``None``: attach one later).
        """
        if bn is None:
            raise TypeError(f"{cls.__name__}.from_float needs the batch norm: from_float(conv, bn)")
        m = super().from_float(conv, qconfig)
        m._init_bn(bn, freeze_bn=False)
        m.train(conv.training)
        return m  # type: ignore[return-value]


class ConvBn1d(_ConvBnQAT, nn.Conv1d):
    """Conv1d + BatchNorm1d with simulated folding; ``to_float()`` is the folded ``nn.Conv1d``."""

    _float_conv, _float_relu, _bn_type = nn.Conv1d, fused.ConvReLU1d, nn.BatchNorm1d


class ConvBn2d(_ConvBnQAT, nn.Conv2d):
    """Conv2d + BatchNorm2d with simulated folding; ``to_float()`` is the folded ``nn.Conv2d``."""

    _float_conv, _float_relu, _bn_type = nn.Conv2d, fused.ConvReLU2d, nn.BatchNorm2d


class ConvBn3d(_ConvBnQAT, nn.Conv3d):
    """Conv3d + BatchNorm3d with simulated folding; ``to_float()`` is the folded ``nn.Conv3d``."""

    _float_conv, _float_relu, _bn_type = nn.Conv3d, fused.ConvReLU3d, nn.BatchNorm3d


class ConvBnReLU1d(ConvBn1d):
    """ConvBn1d + ReLU; ``to_float()`` is a ``fused.ConvReLU1d`` with the folded conv."""

    _relu = True


class ConvBnReLU2d(ConvBn2d):
    """ConvBn2d + ReLU; ``to_float()`` is a ``fused.ConvReLU2d`` with the folded conv."""

    _relu = True


class ConvBnReLU3d(ConvBn3d):
    """ConvBn3d + ReLU; ``to_float()`` is a ``fused.ConvReLU3d`` with the folded conv."""

    _relu = True


# ---------------------------------------------------------------------------------------------- linear

class Linear(QATModule, nn.Linear):
    """``nn.Linear`` with a fake-quantized weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, qconfig: Any = None,
                 device: Any = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_weight_fake_quant(qconfig)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._activation(F.linear(x, self._fake_quant_weight(self.weight), self.bias))

    def _float_op(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device,
                        dtype=weight.dtype)
        lin.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().clone())
        lin.train(self.training)
        return fused.LinearReLU(lin) if self._relu else lin

    def to_float(self) -> nn.Module:
        """``nn.Linear`` (or ``fxquant.fused.LinearReLU``) with the same (float) weight and bias."""
        return self._float_op(self.weight, self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, qconfig: Any = None) -> "Linear":
        """The QAT module sharing ``linear``'s parameters (``qconfig`` builds ``weight_fake_quant``)."""
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, qconfig=qconfig,
                device=linear.weight.device, dtype=linear.weight.dtype)
        m.weight, m.bias = linear.weight, linear.bias
        m.train(linear.training)
        return m


class LinearReLU(Linear):
    """``relu(linear(x))`` with a fake-quantized weight; ``to_float()`` is a ``fused.LinearReLU``."""

    _relu = True


class LinearBn1d(_BnFold, Linear):
    """Linear + BatchNorm1d with simulated folding; ``to_float()`` is the folded ``nn.Linear``."""

    _out_axis = -1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, freeze_bn: bool = False, qconfig: Any = None, device: Any = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(in_features, out_features, bias=bias, qconfig=qconfig, device=device, dtype=dtype)
        self._init_bn(nn.BatchNorm1d(out_features, eps=eps, momentum=momentum, device=self.weight.device,
                                     dtype=self.weight.dtype), freeze_bn)

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._bn_forward(x)

    @classmethod
    def from_float(cls, linear: nn.Linear, bn: Optional[nn.Module] = None,  # type: ignore[override]
                   qconfig: Any = None) -> "LinearBn1d":
        """The QAT module sharing the parameters and statistics of ``linear`` and ``bn`` (a BatchNorm1d)."""
        if bn is None:
            raise TypeError(f"{cls.__name__}.from_float needs the batch norm: from_float(linear, bn)")
        m = super().from_float(linear, qconfig)
        m._init_bn(bn, freeze_bn=False)
        m.train(linear.training)
        return m  # type: ignore[return-value]


class LinearBnReLU1d(LinearBn1d):
    """LinearBn1d + ReLU; ``to_float()`` is a ``fused.LinearReLU`` with the folded linear."""

    _relu = True


# -------------------------------------------------------------------------------------- model helpers

def freeze_bn_stats(model: nn.Module) -> nn.Module:
    """Call :meth:`freeze_bn_stats` on every folded-BN QAT module of ``model`` (``model`` included).

    Usually done for the last part of QAT fine-tuning, so training sees the deployed (folded) op. Works
    directly and as ``model.apply(freeze_bn_stats)``. Returns ``model``.
    """
    for m in model.modules():
        if isinstance(m, _BnFold):
            m.freeze_bn_stats()
    return model


def update_bn_stats(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_bn_stats` on every folded-BN QAT module of ``model``. Returns ``model``."""
    for m in model.modules():
        if isinstance(m, _BnFold):
            m.update_bn_stats()
    return model


# ------------------------------------------------------------------ fusers (named by the backend tables)

_CONV_CLASSES: dict[type, tuple[type, type, type, type]] = {
    nn.Conv1d: (Conv1d, ConvBn1d, ConvReLU1d, ConvBnReLU1d),
    nn.Conv2d: (Conv2d, ConvBn2d, ConvReLU2d, ConvBnReLU2d),
    nn.Conv3d: (Conv3d, ConvBn3d, ConvReLU3d, ConvBnReLU3d),
}


def _conv(mods: list[Optional[nn.Module]], relu: bool) -> nn.Module:
    plain, bn, plain_relu, bn_relu = _CONV_CLASSES[type(mods[0])]
    has_bn = len(mods) > 2 if relu else len(mods) > 1
    if has_bn:
        return (bn_relu if relu else bn).from_float(mods[0], mods[1])
    return (plain_relu if relu else plain).from_float(mods[0])


def fuse_conv_bn_qat(mods: list[Optional[nn.Module]]) -> nn.Module:
    """conv -> ``ConvNd``; conv, bn -> ``ConvBnNd`` (sharing their parameters; weight fake quant attached later)."""
    return _conv(mods, relu=False)


def fuse_conv_bn_relu_qat(mods: list[Optional[nn.Module]]) -> nn.Module:
    """conv, relu -> ``ConvReLUNd``; conv, bn, relu -> ``ConvBnReLUNd``."""
    return _conv(mods, relu=True)


def fuse_linear_bn_qat(mods: list[Optional[nn.Module]]) -> nn.Module:
    """linear -> ``Linear``; linear, bn1d -> ``LinearBn1d``."""
    return LinearBn1d.from_float(mods[0], mods[1]) if len(mods) > 1 else Linear.from_float(mods[0])  # type: ignore[arg-type]


def fuse_linear_relu_qat(mods: list[Optional[nn.Module]]) -> nn.Module:
    """linear, relu -> ``LinearReLU``; linear, bn1d, relu -> ``LinearBnReLU1d``."""
    if len(mods) > 2:
        return LinearBnReLU1d.from_float(mods[0], mods[1])  # type: ignore[arg-type]
    return LinearReLU.from_float(mods[0])  # type: ignore[arg-type]
