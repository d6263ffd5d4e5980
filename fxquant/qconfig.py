"""QConfig (how to observe one op) and QConfigMapping (which QConfig each op of a model gets).

The API follows ``torch.ao.quantization`` so that user code keeps working with only its imports
changed: ``QConfig(activation, weight)``, ``QConfigMapping().set_global(...).set_object_type(...)``,
``get_default_qconfig_mapping("x86")`` and the ``to_dict()`` / ``from_dict()`` dictionary format.

Precedence, lowest to highest (exactly torch.ao's, see :meth:`QConfigMapping.qconfig_for`)::

    global < object type < module name regex < module name < module name + object type + order

Example:
    >>> import torch
    >>> from fxquant.qconfig import QConfigMapping, get_default_qconfig, default_dynamic_qconfig
    >>> mapping = (QConfigMapping()
    ...            .set_global(get_default_qconfig("x86"))
    ...            .set_object_type(torch.nn.LSTM, default_dynamic_qconfig)
    ...            .set_module_name("head", None))          # leave the head in float
    >>> mapping.qconfig_for("head.fc", torch.nn.Linear) is None
    True
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from fxquant.backends import BackendConfig, QSpec, get_backend_config
from fxquant.fake_quantize import FakeQuantize
from fxquant.observers import (HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver,
                               MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver,
                               PlaceholderObserver)
from fxquant.observers import FloatQParamsObserver
from fxquant.qparams import DEFAULT_EPS, PER_CHANNEL_SCHEMES

__all__ = [
    "QConfig",
    "QConfigMapping",
    "ObjectType",
    "get_default_qconfig",
    "get_default_qat_qconfig",
    "get_default_qconfig_mapping",
    "get_default_qat_qconfig_mapping",
    "default_qconfig",
    "default_per_channel_qconfig",
    "default_dynamic_qconfig",
    "float16_dynamic_qconfig",
    "per_channel_dynamic_qconfig",
    "per_token_dynamic_qconfig",
    "float_qparams_weight_only_qconfig",
    "float_qparams_weight_only_qconfig_4bit",
]

#: what ``set_object_type`` keys on: a module class (call_module), a function (call_function) or a
#: method name (call_method)
ObjectType = Union[type, Callable[..., Any], str]


# ----------------------------------------------------------------------------------------------- QConfig

def _check_factory(role: str, factory: Any) -> None:
    if isinstance(factory, nn.Module):
        name = type(factory).__name__
        raise TypeError(
            f"QConfig.{role} got an observer instance ({name}); a QConfig holds factories, one new "
            f"observer per tensor. Pass the class or {name}.with_args(...) instead, e.g. "
            f"QConfig({role}={name}.with_args(dtype=torch.quint8), ...)")
    if not callable(factory):
        raise TypeError(f"QConfig.{role} must be an observer class or SomeObserver.with_args(...), "
                        f"got {type(factory).__name__}: {factory!r}")


@dataclasses.dataclass(frozen=True)
class QConfig:
    """How to observe one op: a factory for its output observer and one for its weight observer.

    Each field is a zero-argument callable returning a fresh observer (or fake-quant) module: an
    observer class, or ``SomeObserver.with_args(...)``. Construct positionally or by keyword, as in
    torch.ao. Unpacking (``act, w = qconfig``) works too, as it did on torch.ao's namedtuple.

    Attributes:
        activation: factory of the observer of the op's output.
        weight: factory of the weight observer, or ``None`` for ops without weights / dynamic fp16.

    Raises:
        TypeError: an observer *instance* (or anything not callable) was given.

    Example:
        >>> import torch
        >>> from fxquant.observers import MinMaxObserver
        >>> qc = QConfig(MinMaxObserver.with_args(dtype=torch.quint8),
        ...              weight=MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric))
        >>> type(qc.activation()).__name__
        'MinMaxObserver'
    """

    activation: Callable[[], nn.Module]
    weight: Optional[Callable[[], nn.Module]] = None

    def __post_init__(self) -> None:
        _check_factory("activation", self.activation)
        if self.weight is not None:
            _check_factory("weight", self.weight)

    def __iter__(self) -> Iterator[Optional[Callable[[], nn.Module]]]:
        return iter((self.activation, self.weight))

    def replace(self, **changes: Any) -> "QConfig":
        """A copy with some fields changed, e.g. ``qconfig.replace(weight=None)``."""
        return dataclasses.replace(self, **changes)


# -------------------------------------------------------------------------------------- QConfigMapping

_GLOBAL_KEY = ""
_OBJECT_TYPE_KEY = "object_type"
_REGEX_KEY = "module_name_regex"
_NAME_KEY = "module_name"
_ORDER_KEY = "module_name_object_type_order"
_DICT_KEYS = (_GLOBAL_KEY, _OBJECT_TYPE_KEY, _REGEX_KEY, _NAME_KEY, _ORDER_KEY)

_MISSING: Any = object()


def _check_qconfig(qconfig: Any, where: str) -> None:
    if qconfig is not None and not isinstance(qconfig, QConfig):
        raise TypeError(f"{where}: expected an fxquant.QConfig or None (None leaves the op in float), got "
                        f"{type(qconfig).__module__}.{type(qconfig).__name__}; build it with "
                        "fxquant.QConfig(activation=..., weight=...)")


def _parent_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _is_module_class(object_type: ObjectType) -> bool:
    return isinstance(object_type, type) and issubclass(object_type, nn.Module)


class QConfigMapping:
    """Which QConfig each op of a model gets; ``None`` as a QConfig means "leave it in float".

    Settings, lowest to highest priority (the highest one that applies wins):

    1. ``set_global(qc)``: everything.
    2. ``set_object_type(t, qc)``: a module class (exact type, not subclasses), a function such as
       ``torch.nn.functional.linear`` or ``operator.add``, or a method name such as ``"reshape"``.
    3. ``set_module_name_regex(r, qc)``: modules whose qualified name ``re.match``-es ``r`` (anchored at
       the start only); the first regex registered that matches wins.
    4. ``set_module_name(name, qc)``: the module ``name`` and everything inside it; the nearest named
       ancestor wins (``"a.b"`` beats ``"a"`` for ``"a.b.c"``). The empty name never applies: use
       ``set_global`` for the root.
    5. ``set_module_name_object_type_order(name, t, i, qc)``: the ``i``-th call (from 0) of ``t``
       directly inside module ``name``.

    Every setter returns ``self`` so calls chain; setting a key again replaces its QConfig (a regex
    keeps its original position).

    Example:
        >>> import operator, torch
        >>> from fxquant.qconfig import default_qconfig, default_per_channel_qconfig
        >>> m = (QConfigMapping().set_global(default_qconfig)
        ...      .set_object_type(operator.add, None)
        ...      .set_module_name("encoder", default_per_channel_qconfig))
        >>> m.qconfig_for("encoder.layer0", operator.add) is default_per_channel_qconfig
        True
        >>> m.qconfig_for("", operator.add) is None
        True
    """

    def __init__(self) -> None:
        self.global_qconfig: Optional[QConfig] = None
        self.object_type_qconfigs: dict[ObjectType, Optional[QConfig]] = {}
        self.module_name_regex_qconfigs: dict[str, Optional[QConfig]] = {}
        self.module_name_qconfigs: dict[str, Optional[QConfig]] = {}
        self.module_name_object_type_order_qconfigs: dict[tuple[str, ObjectType, int], Optional[QConfig]] = {}

    # ---------------------------------------------------------------------------------------- setters

    def set_global(self, global_qconfig: Optional[QConfig]) -> "QConfigMapping":
        """Set the QConfig of every op no other setting covers. Returns ``self``."""
        _check_qconfig(global_qconfig, "set_global")
        self.global_qconfig = global_qconfig
        return self

    def set_object_type(self, object_type: ObjectType, qconfig: Optional[QConfig]) -> "QConfigMapping":
        """Set the QConfig of a module class, a function or a method name (a ``str``). Returns ``self``."""
        _check_qconfig(qconfig, f"set_object_type({object_type!r})")
        if not (isinstance(object_type, str) or callable(object_type)):
            raise TypeError(f"set_object_type: expected a module class, a function or a method name, "
                            f"got {object_type!r}")
        self.object_type_qconfigs[object_type] = qconfig
        return self

    def set_module_name_regex(self, module_name_regex: str, qconfig: Optional[QConfig]) -> "QConfigMapping":
        """Set the QConfig of modules whose name matches a regex; register specific ones first. Returns ``self``."""
        _check_qconfig(qconfig, f"set_module_name_regex({module_name_regex!r})")
        try:
            re.compile(module_name_regex)
        except (re.error, TypeError) as e:
            raise ValueError(f"set_module_name_regex: {module_name_regex!r} is not a valid regular expression "
                             f"({e}); escape literal dots and brackets, e.g. re.escape('layer1.0')") from e
        self.module_name_regex_qconfigs[module_name_regex] = qconfig
        return self

    def set_module_name(self, module_name: str, qconfig: Optional[QConfig]) -> "QConfigMapping":
        """Set the QConfig of a module and its submodules, by qualified name. Returns ``self``."""
        _check_qconfig(qconfig, f"set_module_name({module_name!r})")
        if not isinstance(module_name, str):
            raise TypeError(f"set_module_name: expected a qualified module name such as 'layer1.0', "
                            f"got {module_name!r}")
        self.module_name_qconfigs[module_name] = qconfig
        return self

    def set_module_name_object_type_order(self, module_name: str, object_type: ObjectType, index: int,
                                          qconfig: Optional[QConfig]) -> "QConfigMapping":
        """Set the QConfig of the ``index``-th call of ``object_type`` inside module ``module_name``.

        Returns ``self``.
        """
        _check_qconfig(qconfig, f"set_module_name_object_type_order({module_name!r}, {object_type!r}, {index!r})")
        if not isinstance(module_name, str):
            raise TypeError(f"set_module_name_object_type_order: module_name must be a str, got {module_name!r}")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"set_module_name_object_type_order: index must be an int >= 0 (0 = first call), "
                             f"got {index!r}")
        self.module_name_object_type_order_qconfigs[(module_name, object_type, index)] = qconfig
        return self

    # --------------------------------------------------------------------------------------- resolver

    def qconfig_for(self, module_name: str, object_type: ObjectType, order_index: Optional[int] = None, *,
                    scope_type: Optional[type] = None) -> Optional[QConfig]:
        """The QConfig an op gets; ``None`` means it stays in float.

        Args:
            module_name: for a ``call_module`` node, the module's qualified name; for a
                ``call_function`` / ``call_method`` node, the qualified name of the module whose
                ``forward`` makes the call (``""`` for the root).
            object_type: the module class (``call_module``), the function (``call_function``) or the
                method name (``call_method``).
            order_index: how many calls of ``object_type`` came before this one directly inside the
                enclosing module (for a ``call_module`` node, inside the parent of ``module_name``),
                counting from 0; ``None`` skips the order level. torch.ao passes ``None`` for
                ``call_method`` nodes.
            scope_type: for ``call_function`` / ``call_method`` nodes, the class of the module named
                ``module_name`` (torch.ao lets its object-type setting override the function's own).

        Returns:
            The first that applies of: the order setting for ``(scope, object_type, order_index)``; the
            module-name setting of ``module_name`` or its nearest named ancestor; the first matching
            regex; the object-type setting of ``scope_type``, then of ``object_type``; the global one.
            A setting whose QConfig is ``None`` applies like any other (it means "float").

        Example:
            >>> import torch
            >>> from fxquant.qconfig import default_qconfig
            >>> m = QConfigMapping().set_module_name_object_type_order("", torch.nn.Linear, 1, default_qconfig)
            >>> m.qconfig_for("fc2", torch.nn.Linear, 1) is default_qconfig   # second Linear called by root
            True
        """
        qconfig = self.object_type_qconfigs.get(object_type, self.global_qconfig)
        if scope_type is not None:
            qconfig = self.object_type_qconfigs.get(scope_type, qconfig)
        qconfig = self._regex_qconfig(module_name, qconfig)
        qconfig = self._module_name_qconfig(module_name, qconfig)
        if order_index is not None:
            scope = _parent_name(module_name) if _is_module_class(object_type) else module_name
            qconfig = self.module_name_object_type_order_qconfigs.get((scope, object_type, order_index), qconfig)
        return qconfig

    def _regex_qconfig(self, module_name: str, fallback: Optional[QConfig]) -> Optional[QConfig]:
        for pattern, qconfig in self.module_name_regex_qconfigs.items():
            if re.match(pattern, module_name):
                return qconfig
        return fallback

    def _module_name_qconfig(self, module_name: str, fallback: Optional[QConfig]) -> Optional[QConfig]:
        name = module_name
        while name:
            found = self.module_name_qconfigs.get(name, _MISSING)
            if found is not _MISSING:
                return found
            name = _parent_name(name)
        return fallback

    # ------------------------------------------------------------------------------------ inspection

    def names(self) -> set[str]:
        """Every module name and regex the mapping mentions (to warn about those matching no module).

        Example:
            >>> sorted(QConfigMapping().set_module_name("a.b", None).set_module_name_regex("c.*", None).names())
            ['a.b', 'c.*']
        """
        names = set(self.module_name_qconfigs) | set(self.module_name_regex_qconfigs)
        names |= {module_name for module_name, _, _ in self.module_name_object_type_order_qconfigs}
        return names

    def to_dict(self) -> dict[str, Any]:
        """The mapping as torch.ao's dictionary: key ``""`` (global) and lists of tuples.

        Returns:
            ``{"": global, "object_type": [(t, qc)], "module_name_regex": [(r, qc)],
            "module_name": [(name, qc)], "module_name_object_type_order": [(name, t, i, qc)]}``.
        """
        return {
            _GLOBAL_KEY: self.global_qconfig,
            _OBJECT_TYPE_KEY: list(self.object_type_qconfigs.items()),
            _REGEX_KEY: list(self.module_name_regex_qconfigs.items()),
            _NAME_KEY: list(self.module_name_qconfigs.items()),
            _ORDER_KEY: [(*key, qc) for key, qc in self.module_name_object_type_order_qconfigs.items()],
        }

    @classmethod
    def from_dict(cls, qconfig_dict: dict[str, Any]) -> "QConfigMapping":
        """Build a mapping from :meth:`to_dict`'s format (every key optional).

        Raises:
            ValueError: for a key that is not one of torch.ao's five.

        Example:
            >>> QConfigMapping.from_dict({"module_name": [("fc", None)]}).module_name_qconfigs
            {'fc': None}
        """
        unknown = set(qconfig_dict) - set(_DICT_KEYS)
        if unknown:
            raise ValueError(f"QConfigMapping.from_dict: unknown keys {sorted(unknown)}; "
                             f"the keys are {list(_DICT_KEYS)} ('' is the global qconfig)")
        mapping = cls()
        if _GLOBAL_KEY in qconfig_dict:
            mapping.set_global(qconfig_dict[_GLOBAL_KEY])
        for object_type, qconfig in qconfig_dict.get(_OBJECT_TYPE_KEY, []):
            mapping.set_object_type(object_type, qconfig)
        for regex, qconfig in qconfig_dict.get(_REGEX_KEY, []):
            mapping.set_module_name_regex(regex, qconfig)
        for module_name, qconfig in qconfig_dict.get(_NAME_KEY, []):
            mapping.set_module_name(module_name, qconfig)
        for module_name, object_type, index, qconfig in qconfig_dict.get(_ORDER_KEY, []):
            mapping.set_module_name_object_type_order(module_name, object_type, index, qconfig)
        return mapping

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QConfigMapping):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}(", f"  global: {self.global_qconfig}"]
        for title, entries in (("object_type", self.object_type_qconfigs),
                               ("module_name_regex", self.module_name_regex_qconfigs),
                               ("module_name", self.module_name_qconfigs),
                               ("module_name_object_type_order", self.module_name_object_type_order_qconfigs)):
            lines.append(f"  {title}:" + ("" if entries else " {}"))
            lines += [f"    {_key_repr(key)}: {qc}" for key, qc in entries.items()]
        return "\n".join(lines + [")"])


def _key_repr(key: Any) -> str:
    if isinstance(key, tuple):
        return "(" + ", ".join(_key_repr(k) for k in key) + ")"
    if isinstance(key, type):
        return f"{key.__module__}.{key.__qualname__}"
    if callable(key) and hasattr(key, "__name__"):
        return f"{getattr(key, '__module__', None) or ''}.{key.__name__}".lstrip(".")
    return repr(key)


# -------------------------------------------------------------------------------------------- defaults

def _min_scale(cfg: BackendConfig, field: str = "min_scale") -> float:
    """The largest ``min_scale`` (or ``weight_min_scale``) any entry of the table demands (float32 eps when
    none does)."""
    scales = [getattr(e.constraints, field) for e in cfg.entries if getattr(e.constraints, field) is not None]
    return max(scales) if scales else DEFAULT_EPS


def _grid(spec: QSpec, eps: float) -> dict[str, Any]:
    """Observer keyword arguments for a backend grid (``quant_min``/``quant_max`` only when the table sets them)."""
    kwargs: dict[str, Any] = dict(dtype=spec.dtype, qscheme=spec.qscheme, reduce_range=spec.reduce_range, eps=eps)
    if spec.quant_min is not None:
        kwargs.update(quant_min=spec.quant_min, quant_max=spec.quant_max)
    return kwargs


def get_default_qconfig(backend: Union[str, BackendConfig] = "x86") -> QConfig:
    """The post-training QConfig of a backend, built from its table's default grids.

    Activations get a :class:`HistogramObserver`; weights a :class:`PerChannelMinMaxObserver` (a
    :class:`MinMaxObserver` where the backend's weight grid is per tensor). Their ``eps`` is the largest
    minimum activation / weight scale the table's kernels demand (qnnpack activations: ``2**-12``), so
    tiny-range data never yields a scale the kernels mishandle.

    Args:
        backend: ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` or a :class:`fxquant.backends.BackendConfig`.

    Returns:
        The :class:`QConfig`.

    Raises:
        ValueError: for an unknown backend name.

    Example:
        >>> obs = get_default_qconfig("qnnpack").weight()
        >>> (obs.quant_min, obs.quant_max)
        (-127, 127)
    """
    cfg = _backend(backend)
    eps = _min_scale(cfg)
    weight_cls = PerChannelMinMaxObserver if cfg.weight.qscheme in PER_CHANNEL_SCHEMES else MinMaxObserver
    return QConfig(activation=HistogramObserver.with_args(**_grid(cfg.default_activation(), eps)),
                   weight=weight_cls.with_args(**_grid(cfg.weight, _min_scale(cfg, "weight_min_scale"))))


def get_default_qat_qconfig(backend: Union[str, BackendConfig] = "x86") -> QConfig:
    """The quantization-aware-training QConfig of a backend: :class:`FakeQuantize` on the same grids.

    Activations: ``FakeQuantize(observer=MovingAverageMinMaxObserver)``; weights:
    ``FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver)`` (per-tensor moving average where
    the backend's weight grid is per tensor); ``eps`` as in :func:`get_default_qconfig`.

    Args:
        backend: a backend name or :class:`fxquant.backends.BackendConfig`.

    Returns:
        The :class:`QConfig`.

    Example:
        >>> type(get_default_qat_qconfig("x86").activation()).__name__
        'FakeQuantize'
    """
    cfg = _backend(backend)
    eps = _min_scale(cfg)
    weight_obs = (MovingAveragePerChannelMinMaxObserver if cfg.weight.qscheme in PER_CHANNEL_SCHEMES
                  else MovingAverageMinMaxObserver)
    return QConfig(
        activation=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, **_grid(cfg.default_activation(), eps)),
        weight=FakeQuantize.with_args(observer=weight_obs, **_grid(cfg.weight, _min_scale(cfg, "weight_min_scale"))))


def get_default_qconfig_mapping(backend: Union[str, BackendConfig] = "x86") -> QConfigMapping:
    """``QConfigMapping().set_global(get_default_qconfig(backend))``.

    Ops with fixed qparams (sigmoid, tanh, ...) need no setting here: the backend table gives them.

    Example:
        >>> get_default_qconfig_mapping("fbgemm").global_qconfig == get_default_qconfig("fbgemm")
        True
    """
    return _with_table_weight_rules(QConfigMapping().set_global(get_default_qconfig(backend)), _backend(backend), False)


def _with_table_weight_rules(mapping: QConfigMapping, cfg: BackendConfig, qat: bool) -> QConfigMapping:
    """Give ops whose kernels reject the backend's default weight scheme (ConvTranspose: per tensor only) an
    object-type qconfig with the first scheme their table entry accepts, as the table says."""
    weight_eps = _min_scale(cfg, "weight_min_scale")
    base = mapping.global_qconfig
    for entry in cfg.entries:
        if entry.is_dynamic or entry.weight is None or cfg.weight.qscheme in entry.weight.qschemes or \
                not entry.weight.qschemes:  # static qconfigs follow the static entries only
            continue
        grid = _grid(dataclasses.replace(cfg.weight, qscheme=entry.weight.qschemes[0]), weight_eps)
        per_channel = entry.weight.qschemes[0] in PER_CHANNEL_SCHEMES
        if qat:
            obs = MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver
            weight = FakeQuantize.with_args(observer=obs, **grid)
        else:
            weight = (PerChannelMinMaxObserver if per_channel else MinMaxObserver).with_args(**grid)
        for pattern in entry.patterns:
            for module_type in pattern[0].modules:
                mapping.set_object_type(module_type, QConfig(activation=base.activation, weight=weight))
    return mapping


def get_default_qat_qconfig_mapping(backend: Union[str, BackendConfig] = "x86") -> QConfigMapping:
    """``QConfigMapping().set_global(get_default_qat_qconfig(backend))``.

    Example:
        >>> get_default_qat_qconfig_mapping("qnnpack").global_qconfig is not None
        True
    """
    return _with_table_weight_rules(QConfigMapping().set_global(get_default_qat_qconfig(backend)), _backend(backend),
                                    True)


def _backend(backend: Union[str, BackendConfig]) -> BackendConfig:
    if isinstance(backend, BackendConfig):
        return backend
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a name such as 'x86' or a BackendConfig, got {backend!r}")
    return get_backend_config(backend)


# Convenience qconfigs with torch.ao's names and grids. default_qconfig's activations use 7 bits
# (quant_max=127), as torch.ao's do: safe on every backend, including fbgemm on CPUs without VNNI.
_act_minmax = MinMaxObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=127)
_weight_minmax = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
_weight_per_channel = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
_act_dynamic = PlaceholderObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True)

#: MinMax quint8 activations (7-bit range) + per-tensor symmetric qint8 MinMax weights
default_qconfig = QConfig(activation=_act_minmax, weight=_weight_minmax)
#: as :data:`default_qconfig` with per-channel symmetric qint8 weights
default_per_channel_qconfig = QConfig(activation=_act_minmax, weight=_weight_per_channel)
#: dynamic quantization: quint8 activations quantized at run time + per-tensor qint8 weights
default_dynamic_qconfig = QConfig(activation=_act_dynamic, weight=_weight_minmax)
#: dynamic float16: activations and weights cast to float16
float16_dynamic_qconfig = QConfig(activation=PlaceholderObserver.with_args(dtype=torch.float16, is_dynamic=True),
                                  weight=PlaceholderObserver.with_args(dtype=torch.float16))
#: dynamic quantization with per-channel qint8 weights
per_channel_dynamic_qconfig = QConfig(activation=_act_dynamic, weight=_weight_per_channel)
#: dynamic quantization with one uint8 grid (scale and offset) per row ("token") of each activation, computed at
#: run time, and per-channel symmetric int8 weights: fxquant's most accurate and fastest dynamic int8 linear
#: (oneDNN / ``torch._int_mm``); transformer activations have outlier tokens that one per-tensor scale cannot cover
per_token_dynamic_qconfig = QConfig(
    activation=PlaceholderObserver.with_args(dtype=torch.quint8, qscheme=torch.per_channel_affine, is_dynamic=True),
    weight=_weight_per_channel)
#: weight-only quantization of embedding tables: 8-bit rows with a float scale and offset each
float_qparams_weight_only_qconfig = QConfig(activation=PlaceholderObserver.with_args(dtype=torch.float32),
                                            weight=FloatQParamsObserver.with_args(dtype=torch.quint8))
#: as :data:`float_qparams_weight_only_qconfig` with 4-bit rows
float_qparams_weight_only_qconfig_4bit = QConfig(activation=PlaceholderObserver.with_args(dtype=torch.float32),
                                                 weight=FloatQParamsObserver.with_args(dtype=torch.quint4x2))
