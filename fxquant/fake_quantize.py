"""Fake quantization for quantization-aware training: an observer plus quantize-dequantize in float.

:class:`FakeQuantize` watches its input with an observer (as in post-training calibration), keeps the
resulting ``scale`` / ``zero_point`` in buffers and returns ``fake_quantize(x)``: the input rounded to the
integer grid and mapped back to float, with the straight-through gradient (1 inside the grid's range, 0
where the value was clamped). Observation and fake quantization can be switched on and off separately,
per module or for a whole model (:func:`disable_observer` to freeze the qparams late in training).

The names and buffers follow ``torch.ao.quantization.FakeQuantize`` (``activation_post_process``,
``scale``, ``zero_point``, ``fake_quant_enabled``, ``observer_enabled``), so code and state dicts port.

Example:
    >>> import torch
    >>> from fxquant.fake_quantize import FakeQuantize, disable_observer
    >>> from fxquant.observers import MovingAverageMinMaxObserver
    >>> fq = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, dtype=torch.quint8)()
    >>> y = fq(torch.tensor([-1.0, 0.5, 3.0]))
    >>> fq.qparams().scalar()
    (0.01568627543747425, 64)
    >>> _ = disable_observer(fq)   # freeze: later batches no longer move the qparams
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.fx
from torch import nn

from fxquant.observers import MovingAverageMinMaxObserver, ObserverBase, ObserverFactory
from fxquant.qparams import PER_CHANNEL_SCHEMES, QParams, fake_quantize

__all__ = [
    "FakeQuantize",
    "enable_fake_quant",
    "disable_fake_quant",
    "enable_observer",
    "disable_observer",
    "SharedFakeQuantize",
    "OBSERVER_TYPES",
    "is_observer",
]

ObserverSpec = Union[type, ObserverFactory, Callable[..., ObserverBase]]


class FakeQuantize(nn.Module):
    """An observer followed by quantize-dequantize with a straight-through gradient.

    Args:
        observer: the observer class (or ``SomeObserver.with_args(...)``) that sets the qparams.
        quant_min, quant_max: an explicit integer range, passed to the observer (both or neither).
        is_dynamic: passed to the observer.
        observer_kwargs: the observer's other arguments (``dtype``, ``qscheme``, ``ch_axis``, ``eps``, ...).

    Attributes:
        activation_post_process: the observer.
        scale, zero_point: buffers, the qparams fake quantization applies (shape ``[1]`` per tensor as in
            torch.ao, ``[C]`` per channel); ``1.0`` / ``0`` until the observer first sees data.
        fake_quant_enabled, observer_enabled: ``uint8`` buffers of shape ``[1]``; 1 means on.

    Example:
        >>> import torch
        >>> from fxquant.observers import MovingAveragePerChannelMinMaxObserver
        >>> fq = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=0)
        >>> _ = fq(torch.randn(8, 3))
        >>> tuple(fq.scale.shape), fq.is_per_channel
        ((8,), True)
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    fake_quant_enabled: torch.Tensor
    observer_enabled: torch.Tensor

    def __init__(self, observer: ObserverSpec = MovingAverageMinMaxObserver, quant_min: Optional[int] = None,
                 quant_max: Optional[int] = None, is_dynamic: bool = False, **observer_kwargs: Any) -> None:
        super().__init__()
        if (quant_min is None) != (quant_max is None):
            raise ValueError("FakeQuantize: give quant_min and quant_max together (or neither)")
        if quant_min is not None:
            observer_kwargs.update(quant_min=quant_min, quant_max=quant_max)
        if is_dynamic:
            observer_kwargs["is_dynamic"] = True
        obs = observer(**observer_kwargs)
        if not isinstance(obs, ObserverBase):
            raise TypeError(f"FakeQuantize(observer=...) must build an fxquant observer, got "
                            f"{type(obs).__name__}; use e.g. observer=fxquant.observers.MovingAverageMinMaxObserver")
        self.activation_post_process = obs
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("scale", torch.tensor([1.0], dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int64))

    @classmethod
    def with_args(cls, **kwargs: Any) -> ObserverFactory:
        """A picklable factory building ``FakeQuantize(**kwargs)``, as torch.ao's ``with_args``.

        The observer's arguments are checked now, so a typo fails where the QConfig is written.

        Args:
            kwargs: ``observer=...`` and the observer's arguments.

        Returns:
            An :class:`fxquant.observers.ObserverFactory` (``.cls``, ``.kwargs``, ``with_overrides``).

        Example:
            >>> import torch
            >>> FakeQuantize.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)().dtype
            torch.qint8
        """
        observer_kwargs = {k: v for k, v in kwargs.items() if k not in ("observer", "is_dynamic")}
        observer = kwargs.get("observer", MovingAverageMinMaxObserver)
        if isinstance(observer, ObserverFactory):
            observer.with_overrides(**observer_kwargs)
        elif isinstance(observer, type):
            ObserverFactory(observer, observer_kwargs)
        return ObserverFactory(cls, kwargs)

    # ----------------------------------------------------------------------------------- the grid
    @property
    def dtype(self) -> torch.dtype:
        return self.activation_post_process.dtype

    @property
    def qscheme(self) -> torch.qscheme:
        return self.activation_post_process.qscheme

    @property
    def quant_min(self) -> int:
        return self.activation_post_process.quant_min

    @property
    def quant_max(self) -> int:
        return self.activation_post_process.quant_max

    @property
    def eps(self) -> float:
        """The observer's smallest scale (the backend tables' minimum-scale checks read it)."""
        return float(getattr(self.activation_post_process, "eps", 0.0))

    @property
    def reduce_range(self) -> bool:
        return bool(getattr(self.activation_post_process, "reduce_range", False))

    @property
    def is_per_channel(self) -> bool:
        return self.qscheme in PER_CHANNEL_SCHEMES

    @property
    def ch_axis(self) -> int:
        """The observer's channel axis (``-1`` for per-tensor observers, as in torch.ao)."""
        return getattr(self.activation_post_process, "ch_axis", -1)

    @property
    def is_dynamic(self) -> bool:
        return self.activation_post_process.is_dynamic

    @property
    def has_data(self) -> bool:
        """Whether the observer has seen data (before that, :meth:`qparams` raises)."""
        return self.activation_post_process.has_data

    @property
    def where(self) -> str:
        """Description of the observed tensor for error messages (shared with the observer)."""
        return self.activation_post_process.where

    @where.setter
    def where(self, value: str) -> None:
        self.activation_post_process.where = value

    # ----------------------------------------------------------------------------------- switches
    def enable_fake_quant(self, enabled: bool = True) -> "FakeQuantize":
        """Turn fake quantization on (or off with ``enabled=False``). Returns ``self``."""
        self.fake_quant_enabled.fill_(1 if enabled else 0)
        return self

    def disable_fake_quant(self) -> "FakeQuantize":
        """Pass inputs through unchanged (the observer may still run). Returns ``self``."""
        return self.enable_fake_quant(False)

    def enable_observer(self, enabled: bool = True) -> "FakeQuantize":
        """Turn observation on (or off with ``enabled=False``). Returns ``self``."""
        self.observer_enabled.fill_(1 if enabled else 0)
        return self

    def disable_observer(self) -> "FakeQuantize":
        """Freeze the qparams: later inputs are not observed. Returns ``self``."""
        return self.enable_observer(False)

    # ----------------------------------------------------------------------------------- qparams
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The observer's ``(scale, zero_point)``, as torch.ao's ``FakeQuantize.calculate_qparams``."""
        return self.activation_post_process.calculate_qparams()

    def qparams(self) -> QParams:
        """The qparams fake quantization applies (the ``scale`` / ``zero_point`` buffers).

        Returns:
            :class:`fxquant.qparams.QParams` on the grid of the observer.

        Raises:
            fxquant.observers.NoDataError: the observer never saw data, so the buffers hold no qparams.
        """
        if not self.activation_post_process.has_data:
            self.activation_post_process.qparams()  # raises NoDataError naming the observer
        return self._qparams(self._axis(None))

    def _axis(self, x: Optional[torch.Tensor]) -> Optional[int]:
        if not self.is_per_channel:
            return None
        axis = self.ch_axis
        if axis >= 0:
            return axis
        ndim = x.dim() if x is not None else int(getattr(self.activation_post_process, "input_ndim", 0))
        if not ndim:
            raise ValueError(f"FakeQuantize ({self.where or 'unnamed'}): ch_axis={axis} needs an input to "
                             "resolve; run data through it first or use a non-negative ch_axis")
        return axis % ndim

    def _qparams(self, axis: Optional[int]) -> QParams:
        scale, zero_point = self.scale, self.zero_point
        if axis is None:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return QParams(scale=scale, zero_point=zero_point, dtype=self.dtype, qscheme=self.qscheme,
                       quant_min=self.quant_min, quant_max=self.quant_max, axis=axis)

    def _update_qparams(self) -> None:
        qp = self.activation_post_process.qparams()
        scale = qp.scale.reshape(-1).to(self.scale.device, torch.float32)
        zero_point = qp.zero_point.reshape(-1).to(self.zero_point.device, torch.int64)
        if self.scale.shape != scale.shape:
            self.scale.resize_(scale.shape)
            self.zero_point.resize_(zero_point.shape)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    # ----------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe ``x`` (if enabled) and return its fake-quantized value (if enabled) or ``x``."""
        if isinstance(x, torch.fx.Proxy):  # trace as one leaf call, never into the observer
            return x.tracer.create_proxy("call_module", x.tracer.path_of_module(self), (x,), {})
        if bool(self.observer_enabled[0] == 1):
            with torch.no_grad():
                self.activation_post_process(x.detach())
                if self.activation_post_process.has_data:
                    self._update_qparams()
        return self.apply_fake_quant(x)

    def apply_fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized with the current qparams (if fake quantization is on), without observing it."""
        if bool(self.fake_quant_enabled[0] == 1):
            x = fake_quantize(x, self._qparams(self._axis(x)))
        return x

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # per-channel scale / zero_point take their shape from the data: adopt the incoming shape
        for name in ("scale", "zero_point"):
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(incoming, torch.Tensor) and incoming.shape != current.shape:
                current.resize_(incoming.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"fake_quant_enabled={int(self.fake_quant_enabled[0])}, "
                f"observer_enabled={int(self.observer_enabled[0])}, quant_min={self.quant_min}, "
                f"quant_max={self.quant_max}, dtype={self.dtype}, qscheme={self.qscheme}, ch_axis={self.ch_axis}, "
                f"scale={self.scale}, zero_point={self.zero_point}")


def _fake_quants(model: nn.Module) -> list[FakeQuantize]:
    return [m for m in model.modules() if isinstance(m, FakeQuantize)]


def enable_fake_quant(model: nn.Module) -> nn.Module:
    """Turn fake quantization on in every :class:`FakeQuantize` of ``model`` (``model`` itself included).

    Works directly (``enable_fake_quant(model)``) and as ``model.apply(enable_fake_quant)``.

    Args:
        model: any module.

    Returns:
        ``model``.

    Example:
        >>> m = torch.nn.Sequential(FakeQuantize(), torch.nn.ReLU())
        >>> int(disable_fake_quant(m)[0].fake_quant_enabled)
        0
    """
    for fq in _fake_quants(model):
        fq.enable_fake_quant()
    return model


def disable_fake_quant(model: nn.Module) -> nn.Module:
    """Turn fake quantization off in every :class:`FakeQuantize` of ``model``. Returns ``model``."""
    for fq in _fake_quants(model):
        fq.disable_fake_quant()
    return model


def enable_observer(model: nn.Module) -> nn.Module:
    """Turn observation on in every :class:`FakeQuantize` of ``model``. Returns ``model``."""
    for fq in _fake_quants(model):
        fq.enable_observer()
    return model


def disable_observer(model: nn.Module) -> nn.Module:
    """Freeze the qparams of every :class:`FakeQuantize` of ``model``. Returns ``model``."""
    for fq in _fake_quants(model):
        fq.disable_observer()
    return model


class SharedFakeQuantize(nn.Module):
    """Fake quantization with another fake quantizer's qparams, which it does not update.

    Quantization-aware training puts one after a shares-input op whose result can leave its input's grid
    (average pooling, mean, interpolation, ...): the quantized op rounds that result to the input's grid, so
    the training graph must too; observing the output as well would pull the input's range towards it.

    Rounding: the quantized kernels average in integers and round exact halves to even, while the float op here
    computes the average of grid values with float noise around such halves. The value, in integer units
    (zero point included, as the kernels round it), is snapped to ``1/1024`` of a step before rounding half to
    even, so exact ties break as the kernels break them (exactly so for averages of up to 512 values); the
    gradient is straight-through inside the grid's range.
    The source's qparams get no gradient from this use (a learnable source learns from its own call).

    Args:
        source: the input's fake quantizer (a shared submodule: its state stays under its own name too).

    Example:
        >>> fq = FakeQuantize()
        >>> _ = fq(torch.tensor([0.0, 1.0]))
        >>> shared = SharedFakeQuantize(fq)
        >>> shared(torch.tensor([0.5011])).item() == fq.apply_fake_quant(torch.tensor([0.5011])).item()
        True
    """

    def __init__(self, source: FakeQuantize) -> None:
        super().__init__()
        self.source = source

    #: sub-step resolution that removes float noise before rounding (see the class docstring)
    SNAP = 1024.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return x.tracer.create_proxy("call_module", x.tracer.path_of_module(self), (x,), {})
        src = self.source
        if not bool(src.fake_quant_enabled[0] == 1):
            return x
        qp = src._qparams(src._axis(x))
        shape = [1] * x.dim()
        if qp.axis is not None:
            shape[qp.axis] = -1
        scale = qp.scale.to(x.dtype).reshape(shape if qp.axis is not None else ())
        zero_point = qp.zero_point.to(x.dtype).reshape(shape if qp.axis is not None else ())
        steps = torch.round(torch.round((x.detach() / scale + zero_point) * self.SNAP) / self.SNAP)
        inside = ((steps >= qp.quant_min) & (steps <= qp.quant_max)).to(x.dtype)
        out = (torch.clamp(steps, qp.quant_min, qp.quant_max) - zero_point) * scale
        return x * inside + (out - x * inside).detach()

    def qparams(self) -> QParams:
        """The source's qparams."""
        return self.source.qparams()

    @property
    def has_data(self) -> bool:
        return self.source.has_data

    @property
    def where(self) -> str:
        return self.source.where

    @where.setter
    def where(self, value: str) -> None:
        pass  # the source describes the tensor whose grid is shared


#: the module types the pipeline treats as observers: inserted by the observe pass, skipped over and read
#: through ``qparams()`` by lowering, counted by the verifiers (FakeQuantize subclasses included)
OBSERVER_TYPES: tuple[type, ...] = (ObserverBase, FakeQuantize, SharedFakeQuantize)


def is_observer(module: object) -> bool:
    """Whether ``module`` is an observer or a fake quantizer (see :data:`OBSERVER_TYPES`)."""
    return isinstance(module, OBSERVER_TYPES)
