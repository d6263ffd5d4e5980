"""``quantize_dynamic``: dynamic and weight-only quantization in one call, as PyTorch's recipes teach it.

Weights are quantized once; activations are quantized on the fly from each input (``dtype=torch.qint8``), or
the weights are float16 (``dtype=torch.float16``), or only embedding tables are quantized to 8 or 4 bits per row
(``dtype=torch.quint8`` / ``torch.quint4x2``). No calibration data is needed.

Two routes give the same kernels (the backend table's dynamic entries, built by the kernel layer):

* **FX** (``use_fx=None`` and the model traces, or ``use_fx=True``): the model is traced and run through the
  same passes as ``prepare_fx`` / ``convert_fx``; the result is a ``GraphModule`` that ``fxquant.report``
  understands;
* **module swap** (models that cannot be traced, ``use_fx=False`` or ``inplace=True``): each matching submodule
  is replaced by its dynamic kernel module; the model keeps its class and its other methods (a Hugging Face
  ``BertModel`` stays a ``BertModel``).

Example:
    >>> import torch, fxquant
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    >>> q = fxquant.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    >>> q(torch.randn(2, 16)).shape
    torch.Size([2, 4])
    >>> type(model[0]).__name__          # the user's model is not modified
    'Linear'
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import fx, nn

from fxquant.backends import BackendConfig
from fxquant.backends.kernels import get_kernels
from fxquant.errors import EngineError, FxQuantError, QConfigError, TraceError
from fxquant.observers import MinMaxObserver, PlaceholderObserver
from fxquant.passes.context import FloatReason, QuantContext
from fxquant.passes.dynamic import dynamic_request, dynamic_spec, select_dynamic_entry
from fxquant.qconfig import (QConfig, QConfigMapping, float16_dynamic_qconfig, float_qparams_weight_only_qconfig,
                             float_qparams_weight_only_qconfig_4bit)
from fxquant.tracer import trace

__all__ = ["quantize_dynamic", "dynamic_qconfig", "DEFAULT_DYNAMIC_TYPES"]

_RECURRENT = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)

#: what ``quantize_dynamic(model, dtype=...)`` quantizes when no ``qconfig_spec`` is given (torch.ao's defaults)
DEFAULT_DYNAMIC_TYPES: dict[torch.dtype, tuple[type, ...]] = {
    torch.qint8: (nn.Linear,) + _RECURRENT,
    torch.float16: (nn.Linear,) + _RECURRENT,
    torch.quint8: _EMBEDDINGS,
    torch.quint4x2: _EMBEDDINGS,
}

Spec = Union[None, QConfigMapping, Iterable[Union[type, str]], Mapping[Union[type, str], Any]]


def dynamic_qconfig(dtype: torch.dtype, backend: BackendConfig, module_type: Optional[type] = None) -> QConfig:
    """The qconfig ``quantize_dynamic`` uses for ``dtype`` on ``backend`` (torch.ao's grids, narrowed to what the
    backend's dynamic kernels accept, e.g. qnnpack's weight range and minimum scale).

    Args:
        dtype: ``torch.qint8`` (dynamic int8, per-tensor weights as torch.ao), ``torch.float16``,
            ``torch.quint8`` / ``torch.quint4x2`` (8/4-bit weight-only rows, for embeddings).
        backend: the backend table.
        module_type: the module class; embeddings get 8-bit rows for ``torch.qint8`` (their only int8 kernels).

    Returns:
        The :class:`QConfig`.
    """
    if dtype not in DEFAULT_DYNAMIC_TYPES:
        raise ValueError(f"quantize_dynamic: dtype {dtype} is not supported; use torch.qint8 (dynamic int8), "
                         "torch.float16 (float16 weights), torch.quint8 or torch.quint4x2 (8/4-bit embedding rows)")
    if dtype == torch.quint4x2:
        return float_qparams_weight_only_qconfig_4bit
    if dtype == torch.quint8 or (module_type is not None and issubclass(module_type, _EMBEDDINGS)):
        return float_qparams_weight_only_qconfig
    if dtype == torch.float16:
        return float16_dynamic_qconfig
    limits = backend.entry("linear_dynamic").constraints if any(
        e.name == "linear_dynamic" for e in backend.entries) else None
    weight: dict[str, Any] = dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    if limits is not None and limits.weight_range is not None:
        weight.update(quant_min=limits.weight_range[0], quant_max=limits.weight_range[1])
    if limits is not None and limits.weight_min_scale is not None:
        weight.update(eps=limits.weight_min_scale)
    return QConfig(activation=PlaceholderObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255,
                                                            is_dynamic=True),
                   weight=MinMaxObserver.with_args(**weight))


def _mapping(spec: Spec, dtype: torch.dtype, backend: BackendConfig) -> QConfigMapping:
    """``qconfig_spec`` (types/names, a dict of them to qconfigs or dtypes, or a QConfigMapping) as a mapping."""
    dynamic_qconfig(dtype, backend)  # checks dtype
    if isinstance(spec, QConfigMapping):
        return spec
    if spec is None:
        spec = DEFAULT_DYNAMIC_TYPES[dtype]
    items = list(spec.items()) if isinstance(spec, Mapping) else [(key, None) for key in spec]
    mapping = QConfigMapping()
    for key, qconfig in items:
        if isinstance(key, str):
            setter, module_type = mapping.set_module_name, None
        elif isinstance(key, type) and issubclass(key, nn.Module):
            setter, module_type = mapping.set_object_type, key
        else:
            raise TypeError(f"quantize_dynamic: qconfig_spec keys are module classes (nn.Linear) or qualified "
                            f"module names ('encoder.layer.0'), got {key!r}")
        if qconfig is None:
            qconfig = dynamic_qconfig(dtype, backend, module_type)
        elif isinstance(qconfig, torch.dtype):
            qconfig = dynamic_qconfig(qconfig, backend, module_type)
        if dynamic_request(qconfig) is None:
            raise QConfigError(f"quantize_dynamic: the qconfig for {key!r} is static (its activation observer is not "
                               "dynamic); give a dynamic or weight-only qconfig such as fxquant.default_dynamic_qconfig, "
                               "or quantize statically with prepare_fx / convert_fx")
        setter(key, qconfig)  # type: ignore[operator]
    return mapping


class _Where:
    """Stands in for a graph node in :func:`check_qconfig`'s messages (it only reads ``.name``)."""

    def __init__(self, name: str) -> None:
        self.name = name


def _swap(model: nn.Module, mapping: QConfigMapping, backend: BackendConfig) -> list[FloatReason]:
    """Replace, in place, every submodule whose qconfig is dynamic by its dynamic kernel module."""
    from fxquant.passes.annotate import check_qconfig

    kernels = get_kernels(backend)
    reasons: list[FloatReason] = []
    built: dict[int, nn.Module] = {}

    def convert(module: nn.Module, name: str) -> Optional[nn.Module]:
        if id(module) in built:
            return built[id(module)]
        qconfig = mapping.qconfig_for(name, type(module))
        request = dynamic_request(qconfig)
        if request is None:
            return None
        entry, reason = select_dynamic_entry(backend, type(module), request)
        if entry is None:
            leaf = not any(True for _ in module.children())
            if type(module) in mapping.object_type_qconfigs or (leaf and name in mapping.module_name_qconfigs):
                reasons.append(FloatReason(name, type(module).__name__, f"backend '{backend.name}' has no dynamic "
                                           f"kernel for {type(module).__name__}"))
            return None
        if reason is None:
            check_qconfig(_Where(name), entry, qconfig, backend.name)  # type: ignore[arg-type]
            reason = kernels.supports(entry.lowering, module)
        if reason is not None:
            reasons.append(FloatReason(name, entry.name, reason))
            return None
        built[id(module)] = kernels.build(dynamic_spec(entry, qconfig, module, backend))
        return built[id(module)]

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            new = convert(child, name)
            if new is not None:
                setattr(parent, child_name, new)
            else:
                visit(child, name)

    root = convert(model, "")
    if root is not None:
        raise FxQuantError(f"quantize_dynamic: the model itself is a {type(model).__name__}; wrap it in a module "
                           "(e.g. nn.Sequential(model)) or call the kernel layer directly")
    visit(model, "")
    return reasons


def _via_fx(model: nn.Module, mapping: QConfigMapping, backend: BackendConfig) -> fx.GraphModule:
    """Trace and run the prepare / convert pipelines without example inputs (dynamic-only: no shapes needed)."""
    from fxquant.api import _prepare, convert_fx

    gm = trace(model)
    prepared = _prepare(gm, QuantContext(backend=backend, qconfig_mapping=mapping, example_inputs=None), True)
    return convert_fx(prepared)


def quantize_dynamic(model: nn.Module, qconfig_spec: Spec = None, dtype: torch.dtype = torch.qint8,
                     mapping: Optional[dict] = None, inplace: bool = False, *,
                     backend_config: Union[str, BackendConfig, None] = None,
                     use_fx: Optional[bool] = None) -> nn.Module:
    """Dynamic (weights int8 ahead of time, activations at run time) or weight-only quantization.

    Args:
        model: the float model (not modified unless ``inplace=True``); put in eval mode.
        qconfig_spec: what to quantize: a set of module classes and/or qualified module names (they get the
            qconfig of ``dtype``), a dict from those to a :class:`QConfig` or a dtype (e.g.
            ``{nn.Linear: fxquant.per_token_dynamic_qconfig, nn.Embedding: torch.quint4x2}``), or a
            :class:`QConfigMapping`. Default: torch.ao's set for ``dtype`` (:data:`DEFAULT_DYNAMIC_TYPES`).
        dtype: ``torch.qint8``, ``torch.float16``, ``torch.quint8`` or ``torch.quint4x2`` (see
            :func:`dynamic_qconfig`).
        mapping: torch.ao's float-to-quantized class mapping; not used (the backend table decides), must be None.
        inplace: swap the modules of ``model`` itself (module swap, never FX).
        backend_config: ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` or a BackendConfig (default: the current
            ``torch.backends.quantized.engine``); the call selects its engine, as ``convert_fx`` does.
        use_fx: ``None``: FX when the model traces, else module swap; ``True``: FX (a ``TraceError`` if it does
            not trace); ``False``: module swap (keeps the model's class and methods).

    Returns:
        The quantized model: a ``GraphModule`` (FX) or the model's own class (module swap).

    Example:
        >>> import torch, fxquant
        >>> lm = torch.nn.LSTM(8, 16).eval()
        >>> q = fxquant.quantize_dynamic(torch.nn.Sequential(lm), {torch.nn.LSTM})
        >>> q(torch.randn(5, 2, 8))[0].shape
        torch.Size([5, 2, 16])
    """
    from fxquant.api import _check_model, _default_backend

    _check_model(model, "quantize_dynamic")
    if mapping is not None:
        raise TypeError("quantize_dynamic: mapping= (torch.ao's float-to-quantized class mapping) is not used: the "
                        "backend table decides which kernel runs each module; pass mapping=None")
    if inplace and use_fx:
        raise ValueError("quantize_dynamic: inplace=True swaps modules in the model itself and cannot use FX")
    backend = _default_backend(backend_config)
    missing = get_kernels(backend).available()
    if missing:
        raise EngineError(f"backend '{backend.name}': {missing}; choose one of the available engines")
    qmap = _mapping(qconfig_spec, dtype, backend)
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    result: Optional[nn.Module] = None
    if not inplace and use_fx is not False:
        try:
            result = _via_fx(target, qmap, backend)
        except TraceError:
            if use_fx:
                raise
    if result is None:
        reasons = _swap(target, qmap, backend)
        if reasons:
            warnings.warn("quantize_dynamic left these modules float: " + "; ".join(
                f"{r.node} ({r.op}): {r.reason}" for r in reasons), stacklevel=2)
        result = target
    torch.backends.quantized.engine = backend.engine
    return result
