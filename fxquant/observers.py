"""Observers: modules that watch the tensors flowing through them and turn what they saw into qparams.

An observer's ``forward(x)`` records statistics of ``x`` and returns ``x`` itself. Statistics live in registered
buffers, so ``state_dict()`` / ``load_state_dict()`` round-trip exactly, also into a freshly built observer of
the same class and arguments. Observers trace as leaf modules under any ``torch.fx`` tracer (when a tracer
traces into one, it records a ``call_module`` node itself).

The names follow ``torch.ao.quantization.observer`` so code ports by changing the import; the ``(scale,
zero_point)`` of :meth:`ObserverBase.calculate_qparams` are computed with the same formulas (see
:func:`fxquant.qparams.qparams_from_range`). Deliberate differences:

* NaN / Inf values are ignored for the statistics (finite values of the same batch still count) and counted in
  the ``nonfinite_count`` buffer; an observer without finite data raises :class:`NoDataError` instead of
  returning ``scale=1, zero_point=0``;
* for symmetric ``quint8`` with ``reduce_range=True`` the zero point is 64, the middle of ``[0, 127]``
  (``torch.ao`` uses 128, outside that range); with an explicit ``quant_min``/``quant_max`` the midpoint is
  rounded up and ``reduce_range`` does not halve the explicit range;
* :class:`HistogramObserver` uses its own range search and re-binning (see :mod:`fxquant._histogram`).

Example:
    >>> import torch
    >>> from fxquant.observers import MinMaxObserver
    >>> factory = MinMaxObserver.with_args(dtype=torch.quint8)
    >>> obs = factory()
    >>> obs.where = "output of node 'conv1'"
    >>> y = obs(torch.tensor([-1.0, 3.0, float("nan")]))
    >>> scale, zero_point = obs.calculate_qparams()
    >>> float(scale), int(zero_point), int(obs.nonfinite_count)
    (0.01568627543747425, 64, 1)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar, Optional

import torch
import torch.fx
from torch import nn

from fxquant import _histogram
from fxquant.qparams import (DEFAULT_EPS, PER_CHANNEL_SCHEMES, QUANTIZED_DTYPES, SYMMETRIC_SCHEMES, QParams,
                             dtype_range, qparams_from_range)

__all__ = [
    "NoDataError",
    "ObserverFactory",
    "ObserverBase",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PerChannelMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "HistogramObserver",
    "PlaceholderObserver",
    "FixedQParamsObserver",
]

_PER_TENSOR_SCHEMES = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_CALIBRATE_HINT = "run calibration data through the prepared model (fxquant.calibrate) before convert_fx"


class NoDataError(RuntimeError):
    """An observer was asked for qparams before it saw any finite value."""


@dataclasses.dataclass(frozen=True)
class ObserverFactory:
    """A picklable recipe for an observer: ``cls(**kwargs)``, built when called.

    Attributes:
        cls: the observer class.
        kwargs: constructor arguments (checked against ``cls``'s signature when the factory is made).

    Example:
        >>> import torch
        >>> f = MinMaxObserver.with_args(dtype=torch.qint8)
        >>> f
        MinMaxObserver.with_args(dtype=torch.qint8)
        >>> f.with_overrides(reduce_range=True)().reduce_range
        True
    """

    cls: type
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            inspect.signature(self.cls).bind_partial(**self.kwargs)
        except TypeError as err:
            raise TypeError(f"{self.cls.__name__}.with_args({_format_kwargs(self.kwargs)}): {err}") from None
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    def __call__(self, **overrides: Any) -> "ObserverBase":
        """Build the observer, with ``overrides`` replacing stored arguments."""
        return self.cls(**{**self.kwargs, **overrides})

    def with_overrides(self, **kwargs: Any) -> "ObserverFactory":
        """A new factory whose arguments are these with ``kwargs`` replacing or added."""
        return ObserverFactory(self.cls, {**self.kwargs, **kwargs})

    def with_args(self, **kwargs: Any) -> "ObserverFactory":
        """Alias of :meth:`with_overrides` (``torch.ao`` lets partials be chained with ``with_args``)."""
        return self.with_overrides(**kwargs)

    def __repr__(self) -> str:
        return f"{self.cls.__name__}.with_args({_format_kwargs(self.kwargs)})"

    def __hash__(self) -> int:
        return hash((self.cls, tuple(sorted((k, repr(v)) for k, v in self.kwargs.items()))))


def _format_kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


class ObserverBase(nn.Module):
    """Base of all observers: the target integer grid, the factory, merging, errors.

    Args:
        dtype: the quantized dtype the observed tensor will get (``torch.quint8``, ``torch.qint8``, ...).
        qscheme: ``torch.per_tensor_affine``, ``torch.per_tensor_symmetric`` or a per-channel scheme.
        reduce_range: use one bit less (see :func:`fxquant.qparams.dtype_range`).
        quant_min, quant_max: an explicit integer range (both or neither).
        eps: the smallest scale handed out.
        is_dynamic: qparams are computed at run time (dynamic quantization), not from calibration.

    Attributes:
        quant_min, quant_max: the integer range actually used (resolved from the arguments).
        where: a human description of the observed tensor, set by the pipeline (used in error messages).
        nonfinite_count: buffer, number of NaN/Inf elements seen (and ignored).
        batches: buffer, number of batches that contained at least one finite element.
    """

    nonfinite_count: torch.Tensor
    batches: torch.Tensor
    quant_min: Optional[int]
    quant_max: Optional[int]

    #: True: per-channel schemes only; False: per-tensor schemes only; None: any
    _per_channel: ClassVar[Optional[bool]] = False
    #: float dtypes (no quantization, e.g. float16) are accepted
    _float_dtypes_ok: ClassVar[bool] = False
    #: buffers whose shape is set by the first batch (load_state_dict resizes them)
    _resizable_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dtype: torch.dtype = torch.quint8, qscheme: torch.qscheme = torch.per_tensor_affine,
                 reduce_range: bool = False, quant_min: Optional[int] = None, quant_max: Optional[int] = None,
                 eps: float = DEFAULT_EPS, is_dynamic: bool = False) -> None:
        super().__init__()
        self.dtype = dtype
        self.qscheme = qscheme
        self.reduce_range = reduce_range
        self.eps = float(eps)
        self.is_dynamic = is_dynamic
        self.where = ""
        self._check_qscheme()
        self.quant_min, self.quant_max = self._resolve_range(quant_min, quant_max)
        self.register_buffer("nonfinite_count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))

    @classmethod
    def with_args(cls, **kwargs: Any) -> ObserverFactory:
        """A picklable factory that builds ``cls(**kwargs)`` when called.

        Args:
            kwargs: constructor arguments.

        Returns:
            :class:`ObserverFactory`.
        """
        return ObserverFactory(cls, kwargs)

    # ----- configuration ---------------------------------------------------------------------------------
    def _resolve_range(self, quant_min: Optional[int], quant_max: Optional[int]) -> tuple[Optional[int], Optional[int]]:
        if self.dtype in QUANTIZED_DTYPES:
            return dtype_range(self.dtype, self.reduce_range, quant_min, quant_max)
        if self._float_dtypes_ok and self.dtype.is_floating_point:
            return quant_min, quant_max
        raise ValueError(f"{type(self).__name__}: dtype {self.dtype} is not a quantized dtype; use one of "
                         "torch.quint8, torch.qint8, torch.qint32")

    def _check_qscheme(self) -> None:
        name = type(self).__name__
        if self.qscheme not in _PER_TENSOR_SCHEMES + PER_CHANNEL_SCHEMES:
            raise ValueError(f"{name}: qscheme {self.qscheme} is not supported; use torch.per_tensor_affine, "
                             "torch.per_tensor_symmetric, torch.per_channel_affine or torch.per_channel_symmetric")
        if self._per_channel is True and self.qscheme not in PER_CHANNEL_SCHEMES:
            raise ValueError(f"{name} is per-channel but got qscheme {self.qscheme}; use torch.per_channel_affine "
                             "or torch.per_channel_symmetric, or MinMaxObserver for per-tensor qparams")
        if self._per_channel is False and self.qscheme in PER_CHANNEL_SCHEMES:
            raise ValueError(f"{name} is per-tensor but got qscheme {self.qscheme}; use torch.per_tensor_affine "
                             "or torch.per_tensor_symmetric, or PerChannelMinMaxObserver for per-channel qparams")

    def _config(self) -> dict[str, Any]:
        """The arguments that define what this observer computes (compared by :meth:`merge_`, shown in repr)."""
        return {"dtype": self.dtype, "qscheme": self.qscheme, "reduce_range": self.reduce_range,
                "quant_min": self.quant_min, "quant_max": self.quant_max, "eps": self.eps,
                "is_dynamic": self.is_dynamic}

    def _describe(self) -> str:
        return f"{type(self).__name__} ({self.where})" if self.where else type(self).__name__

    def extra_repr(self) -> str:
        where = f", where={self.where!r}" if self.where else ""
        return _format_kwargs(self._config()) + where

    # ----- the observer protocol -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record statistics of ``x`` and return ``x`` unchanged."""
        if isinstance(x, torch.fx.Proxy):
            return _trace_as_leaf(self, x)
        if isinstance(x, torch.Tensor) and x.numel() > 0:
            self._observe(x.detach())
        return x

    def _observe(self, x: torch.Tensor) -> None:
        """Record one non-empty batch (subclasses)."""

    @property
    def has_data(self) -> bool:
        """True when :meth:`calculate_qparams` has the statistics it needs."""
        return True

    def qparams(self) -> QParams:
        """The quantization parameters from the statistics so far.

        Returns:
            :class:`fxquant.qparams.QParams`.

        Raises:
            NoDataError: no finite data has been observed.
        """
        raise NotImplementedError(f"{type(self).__name__} does not compute qparams")

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` as ``torch.ao`` returns them.

        Returns:
            float32 scale and int64 zero point; shape ``[1]`` per tensor (as ``torch.ao``), ``[C]`` per channel.
        """
        qp = self.qparams()
        scale, zero_point = qp.scale.to(torch.float32), qp.zero_point.to(torch.int64)
        if scale.dim() == 0:
            scale, zero_point = scale.reshape(1), zero_point.reshape(1)
        return scale, zero_point

    def merge_(self, other: "ObserverBase") -> "ObserverBase":
        """Merge the statistics of ``other`` (same class and arguments) into this observer, in place.

        Args:
            other: an observer of the same class and configuration; it is not modified.

        Returns:
            ``self``.
        """
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {self._describe()}: classes differ")
        if other._config() != self._config():
            raise ValueError(f"cannot merge into {self._describe()}: configurations differ "
                             f"({_format_kwargs(other._config())} vs {_format_kwargs(self._config())})")
        with torch.no_grad():
            self._merge_stats(other)
            self.nonfinite_count += other.nonfinite_count.to(self.nonfinite_count.device)
            self.batches += other.batches.to(self.batches.device)
        return self

    def _merge_stats(self, other: "ObserverBase") -> None:
        """Merge the class-specific statistics (subclasses); ``self.batches`` is not yet updated."""

    def reset(self) -> None:
        """Forget everything observed."""
        self.nonfinite_count.zero_()
        self.batches.zero_()
        self._reset_stats()

    def _reset_stats(self) -> None:
        """Reset the class-specific statistics (subclasses)."""

    def _no_data(self, detail: str = "") -> NoDataError:
        seen = f" (it saw {int(self.nonfinite_count)} NaN/Inf values, which are ignored)" \
            if int(self.nonfinite_count) else ""
        return NoDataError(f"{self._describe()} has no data{detail}{seen}; {_CALIBRATE_HINT}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in self._resizable_buffers:
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(incoming, torch.Tensor) and incoming.shape != current.shape:
                setattr(self, name, current.new_empty(incoming.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


_PROBES: dict[int, tuple[Any, Any]] = {}


def probe(factory: Any) -> Any:
    """``factory()``, built once per factory object, for reading its settings (``dtype``, ``qscheme``, ``eps``,
    ``is_dynamic``, quant range) without observing anything: the annotate pass asks these of every node's
    qconfig, and building a histogram observer each time cost 40-60 ms of a 100-node model's prepare.
    Never attach or feed the returned object (the observe pass builds a fresh one per tensor)."""
    hit = _PROBES.get(id(factory))
    if hit is not None and hit[0] is factory:
        return hit[1]
    if len(_PROBES) >= 256:
        _PROBES.clear()
    built = factory()
    _PROBES[id(factory)] = (factory, built)  # the factory is kept alive, so its id is not reused meanwhile
    return built


def _trace_as_leaf(module: nn.Module, x: torch.fx.Proxy) -> torch.fx.Proxy:
    """Record ``module(x)`` as one ``call_module`` node when a tracer traces into an observer."""
    tracer = x.tracer
    assert isinstance(tracer, torch.fx.Tracer)
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (x,), {})


#: rows reduced per step by :func:`_row_range`: the second reduction reads the block from cache, not memory
_RANGE_BLOCK_BYTES = 1 << 19


def _row_range(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x.amin(dim), x.amax(dim))``; a large contiguous 2-d CPU tensor reduced over its rows (a weight seen
    by a per-channel observer) is reduced a block of rows at a time, so it is read from memory once, not twice."""
    block = _RANGE_BLOCK_BYTES * torch.get_num_threads()  # each thread's share of a block stays in its cache
    if not (x.dim() == 2 and dim in (1, -1) and x.device.type == "cpu" and x.is_contiguous()
            and x.numel() * x.element_size() > 4 * block):
        return x.amin(dim=dim), x.amax(dim=dim)
    x = x.detach()  # out= takes no autograd (a QAT weight); the range needs none
    step = max(1, block // (x.element_size() * x.shape[1]))
    mn, mx = x.new_empty(x.shape[0]), x.new_empty(x.shape[0])  # on x's device, whatever the default device
    for i in range(0, x.shape[0], step):
        rows = x[i:i + step]
        torch.amin(rows, 1, out=mn[i:i + step])
        torch.amax(rows, 1, out=mx[i:i + step])
    return mn, mx


def _finite_aminmax(x: torch.Tensor, dim: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Min and max of the finite elements of ``x`` (over ``dim`` or all), and how many were not finite.

    Where no finite element exists the min is ``+inf`` and the max ``-inf``.
    """
    # per row, two reductions beat torch.aminmax(dim=...) 4-7x on the CPU (a [512, 4608] weight: 0.9 vs 4.8 ms)
    mn, mx = torch.aminmax(x) if dim is None else _row_range(x, dim)
    if bool(torch.isfinite(mn).all() & torch.isfinite(mx).all()):
        return mn, mx, 0
    finite = torch.isfinite(x)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    dims = () if dim is None else (dim,)
    mn = torch.where(finite, x, inf).amin(dim=dims)
    mx = torch.where(finite, x, -inf).amax(dim=dims)
    return mn, mx, int(x.numel() - int(finite.sum()))


class _RangeObserver(ObserverBase):
    """Observers that keep ``min_val`` / ``max_val`` buffers (per tensor, or per channel in subclasses)."""

    min_val: torch.Tensor
    max_val: torch.Tensor
    quant_min: int
    quant_max: int

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return _finite_aminmax(x.to(torch.float32))

    def _observe(self, x: torch.Tensor) -> None:
        mn, mx, nonfinite = self._batch_range(x)
        mn, mx = mn.to(self.min_val.device), mx.to(self.max_val.device)
        self.nonfinite_count += nonfinite
        self.batches += int(bool(torch.isfinite(mn).any()))
        self._update(mn, mx)

    def _update(self, mn: torch.Tensor, mx: torch.Tensor) -> None:
        """Fold a batch's range (``inf``/``-inf`` where it had no finite values) into the statistics."""
        self.min_val.copy_(torch.minimum(self.min_val, mn))
        self.max_val.copy_(torch.maximum(self.max_val, mx))

    @property
    def has_data(self) -> bool:
        return self.min_val.numel() > 0 and bool((self.min_val <= self.max_val).all())

    def _axis(self) -> Optional[int]:
        return None

    def qparams(self) -> QParams:
        if not self.has_data:
            raise self._no_data()
        return qparams_from_range(self.min_val, self.max_val, dtype=self.dtype, qscheme=self.qscheme,
                                  quant_min=self.quant_min, quant_max=self.quant_max, eps=self.eps,
                                  axis=self._axis())

    def _merge_stats(self, other: ObserverBase) -> None:
        assert isinstance(other, _RangeObserver)
        self._update(other.min_val.to(self.min_val.device), other.max_val.to(self.max_val.device))

    def _reset_stats(self) -> None:
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_val={self.min_val}, max_val={self.max_val}"


class MinMaxObserver(_RangeObserver):
    """Per-tensor qparams from the running minimum and maximum of everything observed.

    Args: see :class:`ObserverBase` (per-tensor schemes only).

    Example:
        >>> obs = MinMaxObserver()
        >>> _ = obs(torch.tensor([0.0, 2.55]))
        >>> obs.qparams().scalar()
        (0.009999999776482582, 0)
    """

    def __init__(self, dtype: torch.dtype = torch.quint8, qscheme: torch.qscheme = torch.per_tensor_affine,
                 reduce_range: bool = False, quant_min: Optional[int] = None, quant_max: Optional[int] = None,
                 eps: float = DEFAULT_EPS, is_dynamic: bool = False) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min,
                         quant_max=quant_max, eps=eps, is_dynamic=is_dynamic)


class _MovingAverageMixin:
    """Exponential moving average of the batch ranges; merged as a batch-weighted mean.

    The first batch sets the range; each later one moves it by ``averaging_constant`` towards its own range.
    :meth:`merge_` sets the range to the mean of the two observers' moving ranges weighted by the number of
    batches each has seen (a moving average has no exact merge; this one is symmetric and equals either side
    when the other saw nothing).
    """

    averaging_constant: float
    min_val: torch.Tensor
    max_val: torch.Tensor
    batches: torch.Tensor

    def _update(self, mn: torch.Tensor, mx: torch.Tensor) -> None:
        c = self.averaging_constant
        fresh = torch.isinf(self.min_val) & torch.isinf(self.max_val)
        seen = torch.isfinite(mn)  # channels that had finite data in this batch
        new_min = torch.where(fresh, mn, self.min_val + c * (mn - self.min_val))
        new_max = torch.where(fresh, mx, self.max_val + c * (mx - self.max_val))
        self.min_val.copy_(torch.where(seen, new_min, self.min_val))
        self.max_val.copy_(torch.where(seen, new_max, self.max_val))

    def _merge_stats(self, other: Any) -> None:
        if not other.has_data:
            return
        if not self.has_data:  # type: ignore[attr-defined]
            self.min_val.copy_(other.min_val)
            self.max_val.copy_(other.max_val)
            return
        mine = self.batches.to(torch.float32)
        theirs = other.batches.to(self.batches.device, torch.float32)
        total = mine + theirs
        other_min, other_max = other.min_val.to(self.min_val.device), other.max_val.to(self.max_val.device)
        self.min_val.copy_((mine * self.min_val + theirs * other_min) / total)
        self.max_val.copy_((mine * self.max_val + theirs * other_max) / total)


class MovingAverageMinMaxObserver(_MovingAverageMixin, MinMaxObserver):
    """Per-tensor qparams from a moving average of the batches' min and max.

    The first batch sets the range; each later one moves it by ``averaging_constant`` towards its own.
    :meth:`merge_` takes the mean of both moving ranges weighted by the number of batches each observer saw.

    Args:
        averaging_constant: weight of each new batch, in ``(0, 1]``.
        others: see :class:`ObserverBase`.
    """

    def __init__(self, averaging_constant: float = 0.01, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, reduce_range: bool = False,
                 quant_min: Optional[int] = None, quant_max: Optional[int] = None, eps: float = DEFAULT_EPS,
                 is_dynamic: bool = False) -> None:
        _check_averaging_constant(averaging_constant)
        super().__init__(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min,
                         quant_max=quant_max, eps=eps, is_dynamic=is_dynamic)
        self.averaging_constant = averaging_constant

    def _config(self) -> dict[str, Any]:
        return {"averaging_constant": self.averaging_constant, **super()._config()}


def _check_averaging_constant(value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"averaging_constant must be in (0, 1], got {value}")


class PerChannelMinMaxObserver(_RangeObserver):
    """Per-channel qparams (for weights) from the running min and max of each slice along ``ch_axis``.

    Args:
        ch_axis: the channel dimension of the observed tensors (negative counts from the end).
        others: see :class:`ObserverBase`; defaults ``dtype=torch.qint8, qscheme=torch.per_channel_symmetric``.

    Attributes:
        input_ndim: buffer, the number of dimensions of the observed tensors (0 before the first batch); it
            turns a negative ``ch_axis`` into the non-negative ``axis`` of the qparams.

    Example:
        >>> obs = PerChannelMinMaxObserver(ch_axis=0)
        >>> _ = obs(torch.tensor([[-1.0, 1.0], [0.0, 2.55]]))
        >>> obs.qparams().scale.tolist()
        [0.007843137718737125, 0.019999999552965164]
    """

    _per_channel = True
    _resizable_buffers = ("min_val", "max_val")
    input_ndim: torch.Tensor

    def __init__(self, ch_axis: int = 0, dtype: torch.dtype = torch.qint8,
                 qscheme: torch.qscheme = torch.per_channel_symmetric, reduce_range: bool = False,
                 quant_min: Optional[int] = None, quant_max: Optional[int] = None, eps: float = DEFAULT_EPS,
                 is_dynamic: bool = False) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min,
                         quant_max=quant_max, eps=eps, is_dynamic=is_dynamic)
        self.ch_axis = ch_axis
        self.min_val = torch.empty(0)
        self.max_val = torch.empty(0)
        self.register_buffer("input_ndim", torch.zeros((), dtype=torch.int64))

    def _config(self) -> dict[str, Any]:
        return {"ch_axis": self.ch_axis, **super()._config()}

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        if not -x.dim() <= self.ch_axis < x.dim():
            raise ValueError(f"{self._describe()}: ch_axis={self.ch_axis} is out of range for an input of shape "
                             f"{tuple(x.shape)}; pass ch_axis for the channel dimension of the observed tensor")
        known = int(self.input_ndim)
        channels = x.shape[self.ch_axis]
        if known and (known != x.dim() or channels != self.min_val.numel()):
            raise ValueError(f"{self._describe()}: got an input of shape {tuple(x.shape)} after inputs with "
                             f"{known} dims and {self.min_val.numel()} channels; one observer watches one tensor")
        if not known:
            self.input_ndim.fill_(x.dim())
            with torch.inference_mode(False):  # a first batch under inference mode: later batches write into them
                self.min_val = torch.full((channels,), float("inf"), device=self.min_val.device)
                self.max_val = torch.full((channels,), float("-inf"), device=self.max_val.device)
        rows = x.to(torch.float32).movedim(self.ch_axis, 0).reshape(channels, -1)
        return _finite_aminmax(rows, dim=1)

    def _axis(self) -> Optional[int]:
        return self.ch_axis % int(self.input_ndim) if self.ch_axis < 0 else self.ch_axis

    def qparams(self) -> QParams:
        if self.min_val.numel() and not self.has_data:
            missing = (~(self.min_val <= self.max_val)).nonzero().flatten().tolist()
            raise self._no_data(f" for channel(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        return super().qparams()

    def _merge_stats(self, other: ObserverBase) -> None:
        assert isinstance(other, PerChannelMinMaxObserver)
        if other.min_val.numel() == 0:
            return
        if self.min_val.numel() == 0:
            self.input_ndim.copy_(other.input_ndim)
            self.min_val = other.min_val.clone().to(self.min_val.device)
            self.max_val = other.max_val.clone().to(self.max_val.device)
            return
        if other.min_val.shape != self.min_val.shape or int(other.input_ndim) != int(self.input_ndim):
            raise ValueError(f"cannot merge into {self._describe()}: it has {self.min_val.numel()} channels "
                             f"and the other observer {other.min_val.numel()}")
        super()._merge_stats(other)

    def _reset_stats(self) -> None:
        self.min_val = torch.empty(0, device=self.min_val.device)
        self.max_val = torch.empty(0, device=self.max_val.device)
        self.input_ndim.zero_()


class MovingAveragePerChannelMinMaxObserver(_MovingAverageMixin, PerChannelMinMaxObserver):
    """Per-channel qparams from a moving average of each channel's min and max.

    Updates and :meth:`merge_` work channel by channel as in :class:`MovingAverageMinMaxObserver`.

    Args:
        ch_axis: the channel dimension (negative counts from the end).
        averaging_constant: weight of each new batch, in ``(0, 1]``.
        others: see :class:`PerChannelMinMaxObserver`.
    """

    def __init__(self, ch_axis: int = 0, averaging_constant: float = 0.01, dtype: torch.dtype = torch.qint8,
                 qscheme: torch.qscheme = torch.per_channel_symmetric, reduce_range: bool = False,
                 quant_min: Optional[int] = None, quant_max: Optional[int] = None, eps: float = DEFAULT_EPS,
                 is_dynamic: bool = False) -> None:
        _check_averaging_constant(averaging_constant)
        super().__init__(ch_axis=ch_axis, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range,
                         quant_min=quant_min, quant_max=quant_max, eps=eps, is_dynamic=is_dynamic)
        self.averaging_constant = averaging_constant

    def _config(self) -> dict[str, Any]:
        return {"averaging_constant": self.averaging_constant, **super()._config()}

    def _merge_stats(self, other: Any) -> None:
        if other.min_val.numel() and self.min_val.numel() and other.min_val.shape != self.min_val.shape:
            raise ValueError(f"cannot merge into {self._describe()}: it has {self.min_val.numel()} channels "
                             f"and the other observer {other.min_val.numel()}")
        if other.has_data and not self.min_val.numel():
            self.input_ndim.copy_(other.input_ndim)
            self.min_val = torch.empty_like(other.min_val, device=self.min_val.device)
            self.max_val = torch.empty_like(other.max_val, device=self.max_val.device)
        _MovingAverageMixin._merge_stats(self, other)


_NO_BINS = torch.zeros(0, dtype=torch.int64)


class HistogramObserver(ObserverBase):
    """Per-tensor qparams from a histogram, clipping the range where that lowers the expected squared error.

    The histogram keeps ``bins`` equal-width bins over ``[min_val, max_val]`` of everything seen. A batch with
    a wider range widens the histogram to the union of both ranges, re-binning the old counts by proportional
    splitting (:func:`fxquant._histogram.rebin`: counts stay integral and their total is exact, so
    ``histogram.sum()`` is always the number of finite elements seen). :meth:`qparams` searches the clipping
    range ``[lo, hi]`` minimising quantization noise inside (``scale**2 / 12`` per element) plus clipping error
    outside (:func:`fxquant._histogram.search_clip_range`).

    Args:
        bins: number of histogram bins.
        others: see :class:`ObserverBase` (per-tensor schemes only).

    Example:
        >>> obs = HistogramObserver(bins=256)
        >>> _ = obs(torch.cat([torch.linspace(-1, 1, 1_000_000), torch.tensor([20.0])]))  # one outlier
        >>> int(obs.histogram.sum()), float(obs.qparams().scale) < 21.0 / 255  # clipped: finer than min/max
        (1000001, True)
    """

    histogram: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor
    quant_min: int
    quant_max: int
    _resizable_buffers = ("histogram",)

    def __init__(self, bins: int = 2048, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, reduce_range: bool = False,
                 quant_min: Optional[int] = None, quant_max: Optional[int] = None, eps: float = DEFAULT_EPS,
                 is_dynamic: bool = False) -> None:
        if int(bins) < 1:
            raise ValueError(f"HistogramObserver needs bins >= 1, got {bins}")
        super().__init__(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min,
                         quant_max=quant_max, eps=eps, is_dynamic=is_dynamic)
        self.bins = int(bins)
        # empty until the first batch: a prepared model's observers cost no histogram memory before calibration
        # (2048 int64 bins are 16 kB per observed tensor, as much as a small model's weights per layer); the
        # empty tensor is one for all observers (nothing writes into it: the first batch assigns a new one)
        self.register_buffer("histogram", _NO_BINS)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def _config(self) -> dict[str, Any]:
        return {"bins": self.bins, **super()._config()}

    @property
    def has_data(self) -> bool:
        return bool(self.min_val <= self.max_val)

    def _observe(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1).to(torch.float32)
        mn, mx, nonfinite = _finite_aminmax(flat)
        self.nonfinite_count += nonfinite
        if nonfinite:
            flat = flat[torch.isfinite(flat)]
            if flat.numel() == 0:
                return
        self._widen(torch.minimum(self.min_val, mn.to(self.min_val.device)),
                    torch.maximum(self.max_val, mx.to(self.max_val.device)))
        counts = _histogram.bin_counts(flat, float(self.min_val), float(self.max_val), self.bins)
        self.histogram += counts.to(self.histogram.device)
        self.batches += 1

    def _widen(self, new_min: torch.Tensor, new_max: torch.Tensor) -> None:
        """Extend the histogram's range to ``[new_min, new_max]`` (which contains the current one)."""
        if not self.has_data:
            if self.histogram.numel() != self.bins:
                with torch.inference_mode(False):  # a first batch under inference mode: later batches write into it
                    self.histogram = torch.zeros(self.bins, dtype=torch.int64, device=self.min_val.device)
            else:
                self.histogram.zero_()
        elif new_min != self.min_val or new_max != self.max_val:
            self.histogram.copy_(_histogram.rebin(self.histogram, float(self.min_val), float(self.max_val),
                                                  float(new_min), float(new_max)))
        self.min_val.copy_(new_min)
        self.max_val.copy_(new_max)

    def qparams(self) -> QParams:
        if not self.has_data:
            raise self._no_data()
        lo, hi = float(self.min_val), float(self.max_val)
        if hi > lo:
            width = (hi - lo) / self.bins
            lo_u, hi_u = _histogram.search_clip_range(self.histogram, -lo / width, self.quant_max - self.quant_min,
                                                      self.qscheme in SYMMETRIC_SCHEMES)
            lo, hi = lo + lo_u * width, lo + hi_u * width
        return qparams_from_range(torch.tensor(lo), torch.tensor(hi), dtype=self.dtype, qscheme=self.qscheme,
                                  quant_min=self.quant_min, quant_max=self.quant_max, eps=self.eps)

    def _merge_stats(self, other: ObserverBase) -> None:
        assert isinstance(other, HistogramObserver)
        if not other.has_data:
            return
        other_min, other_max = other.min_val.to(self.min_val.device), other.max_val.to(self.max_val.device)
        new_min, new_max = torch.minimum(self.min_val, other_min), torch.maximum(self.max_val, other_max)
        counts = _histogram.rebin(other.histogram.to(self.histogram.device), float(other_min), float(other_max),
                                  float(new_min), float(new_max))
        self._widen(new_min, new_max)
        self.histogram += counts

    def _reset_stats(self) -> None:
        self.histogram.zero_()
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_val={self.min_val}, max_val={self.max_val}"


class PlaceholderObserver(ObserverBase):
    """Records nothing; carries the target dtype for float16 or dynamic quantization.

    Args:
        dtype: ``torch.float16`` / ``torch.float32`` (no integer grid) or a quantized dtype with
            ``is_dynamic=True`` (qparams computed from each input at run time).
        others: see :class:`ObserverBase`.

    ``has_data`` is always True (there is nothing to wait for); :meth:`calculate_qparams` raises ValueError.
    """

    _per_channel = None
    _float_dtypes_ok = True

    def __init__(self, dtype: torch.dtype = torch.float32, qscheme: torch.qscheme = torch.per_tensor_affine,
                 reduce_range: bool = False, quant_min: Optional[int] = None, quant_max: Optional[int] = None,
                 eps: float = DEFAULT_EPS, is_dynamic: bool = False) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min,
                         quant_max=quant_max, eps=eps, is_dynamic=is_dynamic)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` (nothing is recorded)."""
        if isinstance(x, torch.fx.Proxy):
            return _trace_as_leaf(self, x)
        return x

    def qparams(self) -> QParams:
        raise ValueError(f"{self._describe()} has no qparams: a placeholder only carries dtype={self.dtype} "
                         f"(is_dynamic={self.is_dynamic}); dynamic quantization computes qparams from each input "
                         "at run time and float dtypes need none")


class FixedQParamsObserver(ObserverBase):
    """Always the given qparams (for ops with a known output range such as sigmoid or tanh).

    Args:
        scale, zero_point: the qparams.
        dtype, qscheme, quant_min, quant_max, is_dynamic: see :class:`ObserverBase` (per-tensor only).

    Example:
        >>> FixedQParamsObserver(scale=1.0 / 256, zero_point=0).qparams().scalar()
        (0.00390625, 0)
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, quant_min: int = 0, quant_max: int = 255,
                 is_dynamic: bool = False) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max,
                         is_dynamic=is_dynamic)
        if not float(scale) > 0.0:
            raise ValueError(f"FixedQParamsObserver needs scale > 0, got {scale}")
        if not self.quant_min <= int(zero_point) <= self.quant_max:
            raise ValueError(f"FixedQParamsObserver: zero_point {zero_point} is outside "
                             f"[{self.quant_min}, {self.quant_max}]")
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(int(zero_point), dtype=torch.int64))

    def _config(self) -> dict[str, Any]:
        return {"scale": float(self.scale), "zero_point": int(self.zero_point), **super()._config()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` (nothing is recorded)."""
        if isinstance(x, torch.fx.Proxy):
            return _trace_as_leaf(self, x)
        return x

    def qparams(self) -> QParams:
        return QParams(scale=self.scale.clone(), zero_point=self.zero_point.clone(), dtype=self.dtype,
                       qscheme=self.qscheme, quant_min=self.quant_min, quant_max=self.quant_max)


#: integer range of the row-wise weight-only dtypes (torch has no quint4x2 entry in fxquant.qparams)
_ROWWISE_RANGES = {torch.quint8: (0, 255), torch.quint4x2: (0, 15)}


class FloatQParamsObserver(ObserverBase):
    """Row-wise min/max of a weight, for weight-only quantization of embedding tables.

    Each row (``ch_axis=0``) gets a float scale ``(max - min) / (quant_max - quant_min)`` and a float offset
    (``torch.per_channel_affine_float_qparams``: the zero point is a float), the grid of fbgemm's
    ``embedding_bag_byte_prepack`` (``torch.quint8``, 8 bits) and ``embedding_bag_4bit_prepack``
    (``torch.quint4x2``, 4 bits). Only the weight is quantized; activations stay float.

    Args:
        dtype: ``torch.quint8`` or ``torch.quint4x2``.
        qscheme: ``torch.per_channel_affine_float_qparams`` (the only one).
        ch_axis: the row axis (0).

    Example:
        >>> obs = FloatQParamsObserver(dtype=torch.quint4x2)
        >>> _ = obs(torch.tensor([[0.0, 1.5], [-1.0, 1.0]]))
        >>> obs.qparams().scale.tolist()
        [0.10000000149011612, 0.13333334028720856]
    """

    _per_channel = None
    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_channel_affine_float_qparams, ch_axis: int = 0,
                 eps: float = DEFAULT_EPS) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, eps=eps)
        self.ch_axis = ch_axis
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    _resizable_buffers = ("min_val", "max_val")

    def _check_qscheme(self) -> None:
        if self.qscheme != torch.per_channel_affine_float_qparams:
            raise ValueError(f"FloatQParamsObserver is row-wise with float offsets; qscheme must be "
                             f"torch.per_channel_affine_float_qparams, got {self.qscheme}")

    def _resolve_range(self, quant_min: Optional[int], quant_max: Optional[int]) -> tuple[Optional[int], Optional[int]]:
        if self.dtype not in _ROWWISE_RANGES:
            raise ValueError(f"FloatQParamsObserver: dtype {self.dtype} is not supported; use torch.quint8 (8-bit "
                             "rows) or torch.quint4x2 (4-bit rows)")
        return _ROWWISE_RANGES[self.dtype]

    def _config(self) -> dict[str, Any]:
        return {"ch_axis": self.ch_axis, **super()._config()}

    def _observe(self, x: torch.Tensor) -> None:
        rows = x.to(torch.float32).movedim(self.ch_axis, 0).reshape(x.shape[self.ch_axis], -1)
        mn, mx, nonfinite = _finite_aminmax(rows, dim=1)
        self.nonfinite_count += nonfinite
        self.batches += 1
        self._update(mn, mx)

    def _update(self, mn: torch.Tensor, mx: torch.Tensor) -> None:
        """Fold per-row ranges (of a batch, or of another observer) into the statistics."""
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = mn.clone(), mx.clone()
        elif self.min_val.numel() != mn.numel():
            raise ValueError(f"{self._describe()}: it has {self.min_val.numel()} rows, now {mn.numel()}; one "
                             "observer watches one tensor")
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, mn), torch.maximum(self.max_val, mx)

    @property
    def has_data(self) -> bool:
        return self.min_val.numel() > 0 and bool((self.min_val <= self.max_val).all())

    def qparams(self) -> QParams:
        """Per-row float scale and float zero point (``x = (q - zero_point) * scale``)."""
        if not self.has_data:
            raise self._no_data()
        scale = torch.clamp((self.max_val - self.min_val) / float(self.quant_max - self.quant_min), min=self.eps)
        return QParams(scale=scale, zero_point=-self.min_val / scale, dtype=self.dtype, qscheme=self.qscheme,
                       quant_min=self.quant_min, quant_max=self.quant_max, axis=self.ch_axis)

    def _merge_stats(self, other: ObserverBase) -> None:
        """Row-wise union of the ranges (what observing both observers' inputs would have given)."""
        assert isinstance(other, FloatQParamsObserver)
        if other.min_val.numel():
            self._update(other.min_val.to(self.min_val.device), other.max_val.to(self.max_val.device))

    def _reset_stats(self) -> None:
        self.min_val, self.max_val = torch.empty(0), torch.empty(0)


__all__ += ["FloatQParamsObserver"]
