"""Fake quantizers made for training: a fused fast path, and learnable qparams (LSQ).

Both are :class:`fxquant.fake_quantize.FakeQuantize` subclasses: the switches (``enable_observer``, ...),
``qparams()`` (what ``convert_fx`` quantizes with), the state dict names and the pipeline all treat them as
a FakeQuantize.

* :class:`FusedMovingAvgObsFakeQuantize` runs the moving-average min/max update, the qparams and the fake
  quantization in one call of torch's native ``torch.fused_moving_avg_obs_fake_quant`` kernel (CPU and CUDA),
  with no host synchronisation. Its qparams are the kernel's: the same affine formula as
  :func:`fxquant.qparams.qparams_from_range` up to float rounding, and for symmetric schemes the scale
  ``max|x| / ((quant_max - quant_min + 1) / 2)`` (one ``quant_min`` step wider than the observer's). It
  falls back to :class:`FakeQuantize`'s exact path where the kernel cannot honour the grid: a minimum
  scale above float32 epsilon (an observer built with a larger ``eps``), symmetric unsigned grids, non-float
  inputs.
* :class:`LearnableFakeQuantize` learns ``scale`` (and, for affine schemes, ``zero_point``) by gradient
  descent (LSQ, Esser et al. 2020; LSQ+ for the offset), with torch's native
  ``_fake_quantize_learnable_per_tensor_affine`` / ``_per_channel_affine`` kernels and the paper's gradient
  scale ``1 / sqrt(n * quant_max)``. The observer only initialises the qparams, from the first batch it sees.

Example:
    >>> import torch, fxquant
    >>> from fxquant.qat_fake_quantize import LearnableFakeQuantize
    >>> fq = LearnableFakeQuantize(dtype=torch.quint8)
    >>> x = torch.randn(64, requires_grad=True)
    >>> fq(x).sum().backward()                  # the first batch initialises scale / zero_point
    >>> fq.scale.grad is not None
    True
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx
from torch import nn

from fxquant.fake_quantize import FakeQuantize, ObserverSpec
from fxquant.observers import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
from fxquant.qparams import DEFAULT_EPS, SYMMETRIC_SCHEMES, QParams

__all__ = ["FusedMovingAvgObsFakeQuantize", "LearnableFakeQuantize"]

_MOVING_AVERAGE = (MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver)


class FusedMovingAvgObsFakeQuantize(FakeQuantize):
    """Moving-average observer + fake quantization in one native kernel call (see module docstring).

    Args:
        observer: ``MovingAverageMinMaxObserver`` or ``MovingAveragePerChannelMinMaxObserver`` (or
            ``.with_args(...)`` of them): its ``min_val`` / ``max_val`` buffers are the kernel's running range.
        quant_min, quant_max, observer_kwargs: as :class:`FakeQuantize`.

    Example:
        >>> import torch
        >>> fq = FusedMovingAvgObsFakeQuantize(dtype=torch.quint8)
        >>> y = fq(torch.tensor([-1.0, 0.5, 3.0]))
        >>> round(float(fq.scale), 6), int(fq.zero_point)
        (0.015686, 64)
    """

    def __init__(self, observer: ObserverSpec = MovingAverageMinMaxObserver, quant_min: Optional[int] = None,
                 quant_max: Optional[int] = None, **observer_kwargs: Any) -> None:
        super().__init__(observer, quant_min, quant_max, **observer_kwargs)
        obs = self.activation_post_process
        if not isinstance(obs, _MOVING_AVERAGE):
            raise TypeError(f"FusedMovingAvgObsFakeQuantize needs a moving-average min/max observer, got "
                            f"{type(obs).__name__}; use FakeQuantize for other observers")
        self.zero_point = self.zero_point.to(torch.int32)  # the kernel's per-channel path takes int32 only
        self.is_symmetric = obs.qscheme in SYMMETRIC_SCHEMES
        #: the native kernel computes this grid's qparams (else FakeQuantize's exact path runs)
        self.native = obs.eps <= DEFAULT_EPS and not (self.is_symmetric and obs.quant_min >= 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe (if enabled) and fake-quantize (if enabled) ``x`` in one kernel call."""
        if isinstance(x, torch.fx.Proxy) or not self.native or not x.is_floating_point() or x.numel() == 0:
            return super().forward(x)
        obs = self.activation_post_process
        axis = self._axis(x) if self.is_per_channel else 0
        if axis != 0:  # the native kernel's per-channel path only takes axis 0; the exact path takes any
            return super().forward(x)
        if self.is_per_channel and int(obs.input_ndim) == 0:
            obs.input_ndim.fill_(x.dim())
        with torch.no_grad():
            obs.batches.add_(self.observer_enabled[0].to(obs.batches.dtype))
        return torch.fused_moving_avg_obs_fake_quant(
            x, self.observer_enabled, self.fake_quant_enabled, obs.min_val, obs.max_val, self.scale,
            self.zero_point, obs.averaging_constant, self.quant_min, self.quant_max, axis, self.is_per_channel,
            self.is_symmetric)

    def _qparams(self, axis: Optional[int]) -> QParams:
        qp = super()._qparams(axis)
        return QParams(scale=qp.scale, zero_point=qp.zero_point.to(torch.int64), dtype=qp.dtype, qscheme=qp.qscheme,
                       quant_min=qp.quant_min, quant_max=qp.quant_max, axis=qp.axis)


class LearnableFakeQuantize(FakeQuantize):
    """Fake quantization with learned ``scale`` and ``zero_point`` parameters (LSQ / LSQ+).

    Args:
        observer, quant_min, quant_max, observer_kwargs: as :class:`FakeQuantize`; the observer initialises
            the qparams from the first batch it sees while observation is enabled.
        use_grad_scaling: scale the qparam gradients by ``1 / sqrt(n * quant_max)`` (``n``: elements per
            scale), as LSQ recommends so that the step size learns at the rate of the weights.

    Attributes:
        scale, zero_point: ``nn.Parameter`` (float; the zero point is rounded and clamped to the grid when
            used). For symmetric schemes the zero point is fixed (``requires_grad=False``).
        initialized: ``uint8`` buffer, 1 once the observer has set the qparams; :meth:`reset_qparams` clears it.

    Add the module's parameters to the optimizer like any other (they are part of ``model.parameters()``);
    per-channel qparams get their shape from the first batch, so build the optimizer before training starts
    but let the first forward run before the first ``optimizer.step()`` (the usual order).
    """

    scale: nn.Parameter  # type: ignore[assignment]
    zero_point: nn.Parameter  # type: ignore[assignment]
    initialized: torch.Tensor

    def __init__(self, observer: ObserverSpec = MovingAverageMinMaxObserver, quant_min: Optional[int] = None,
                 quant_max: Optional[int] = None, use_grad_scaling: bool = True, **observer_kwargs: Any) -> None:
        super().__init__(observer, quant_min, quant_max, **observer_kwargs)
        del self.scale, self.zero_point  # buffers of FakeQuantize; parameters here
        self.scale = nn.Parameter(torch.tensor([1.0]))
        self.zero_point = nn.Parameter(torch.tensor([0.0]), requires_grad=self.qscheme not in SYMMETRIC_SCHEMES)
        self.register_buffer("initialized", torch.tensor([0], dtype=torch.uint8))
        self.use_grad_scaling = use_grad_scaling

    @property
    def has_data(self) -> bool:
        return bool(self.initialized[0] == 1)

    def reset_qparams(self) -> "LearnableFakeQuantize":
        """Let the observer set the qparams again from the next batch it sees. Returns ``self``."""
        self.initialized.zero_()
        self.activation_post_process.reset()
        return self

    def _init_from_observer(self, x: torch.Tensor) -> None:
        obs = self.activation_post_process
        obs(x.detach())
        if not obs.has_data:
            return
        qp = obs.qparams()
        with torch.no_grad():
            for param, value in ((self.scale, qp.scale), (self.zero_point, qp.zero_point)):
                value = value.reshape(-1).to(param.device, param.dtype)
                if param.shape != value.shape:
                    param.data = torch.empty_like(value)
                param.copy_(value)
            self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Initialise the qparams from the first observed batch, then fake-quantize with the learned ones."""
        if isinstance(x, torch.fx.Proxy):
            return super().forward(x)
        if bool(self.observer_enabled[0] == 1) and not self.has_data:
            self._init_from_observer(x)
        return self.apply_fake_quant(x)

    def apply_fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized with the learned qparams (gradients reach them), without observing it."""
        if not bool(self.fake_quant_enabled[0] == 1):
            return x
        with torch.no_grad():
            self.scale.clamp_(min=self.eps)
        axis = self._axis(x)
        n = x.numel() // (x.shape[axis] if axis is not None else 1)
        grad_factor = 1.0 / (max(n, 1) * self.quant_max) ** 0.5 if self.use_grad_scaling else 1.0
        if axis is not None:
            return torch._fake_quantize_learnable_per_channel_affine(
                x, self.scale, self.zero_point, axis, self.quant_min, self.quant_max, grad_factor)
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max, grad_factor)

    def _qparams(self, axis: Optional[int]) -> QParams:
        scale = self.scale.detach().clamp(min=self.eps).to(torch.float32)
        zero_point = self.zero_point.detach().round().clamp(self.quant_min, self.quant_max).to(torch.int64)
        if axis is None:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return QParams(scale=scale, zero_point=zero_point, dtype=self.dtype, qscheme=self.qscheme,
                       quant_min=self.quant_min, quant_max=self.quant_max, axis=axis)

    def qparams(self) -> QParams:
        """The learned qparams (zero point rounded and clamped), as fake quantization applies them."""
        if not self.has_data:
            self.activation_post_process.qparams()  # raises NoDataError naming the observer
        return self._qparams(self._axis(None))

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned ``(scale, zero_point)`` (not the observer's)."""
        qp = self.qparams()
        return qp.scale.reshape(-1), qp.zero_point.reshape(-1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("scale", "zero_point"):
            incoming = state_dict.get(prefix + name)
            param = getattr(self, name)
            if isinstance(incoming, torch.Tensor) and incoming.shape != param.shape:
                param.data = torch.empty_like(incoming, device=param.device, dtype=param.dtype)
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"learnable, use_grad_scaling={self.use_grad_scaling}, {super().extra_repr()}"
