"""The dynamic / weight-only branch of annotate and lower (not a pass of its own).

A qconfig is *dynamic* when its activation observer says ``is_dynamic=True`` (activations quantized at run
time, per tensor or per token) or asks for float16, and *weight-only* when its activation stays float32 while
its weight observer quantizes (8/4-bit embedding rows). Such a qconfig is matched against the table's dynamic
entries (``OpEntry.is_dynamic``: every ``DTypeConfig`` has ``dynamic=True``) by the dtypes it asks for:

* annotate: :func:`select_dynamic_entry` picks the entry, :func:`check_dynamic` checks the qconfig against it;
  no activation observers are ever inserted for it (its entries are ``Observation.NONE``);
* lower: :func:`dynamic_spec` hands the kernel layer the float module and the qconfig's weight observer; the
  module it builds takes and returns float tensors, so no quantize / dequantize surrounds it and convert needs
  no calibration data for it.

Example:
    >>> import torch
    >>> from fxquant.qconfig import per_token_dynamic_qconfig
    >>> from fxquant.backends import get_backend_config
    >>> req = dynamic_request(per_token_dynamic_qconfig)
    >>> entry, reason = select_dynamic_entry(get_backend_config("x86"), torch.nn.Linear, req)
    >>> entry.name, reason
    ('linear_per_token', None)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from fxquant.backends.config import BackendConfig, DTypeConfig, OpEntry
from fxquant.backends.kernels import LoweringSpec
from fxquant.observers import probe
from fxquant.qparams import PER_CHANNEL_SCHEMES

__all__ = ["DynamicRequest", "dynamic_request", "select_dynamic_entry", "dynamic_spec", "describe"]


@dataclasses.dataclass(frozen=True)
class DynamicRequest:
    """What a dynamic or weight-only qconfig asks for, in the terms of :class:`DTypeConfig`.

    Attributes:
        activation: ``torch.quint8`` / ``torch.qint8`` (quantized at run time), ``torch.float16`` (cast) or
            ``torch.float32`` (weight-only: activations stay float).
        per_token: one activation scale per row of the last dimension instead of one per tensor.
        weight: the weight dtype (``torch.qint8``, ``torch.float16``, ``torch.quint8``, ``torch.quint4x2``).
    """

    activation: torch.dtype
    per_token: bool
    weight: Optional[torch.dtype]

    def accepted_by(self, d: DTypeConfig) -> bool:
        """Whether the dtype combination ``d`` of a table entry is what this request asks for."""
        per_token = d.input_qscheme in PER_CHANNEL_SCHEMES
        return d.dynamic and d.input == self.activation and per_token == self.per_token and d.weight == self.weight


def dynamic_request(qconfig: Any) -> Optional[DynamicRequest]:
    """The request of a dynamic or weight-only qconfig; ``None`` for static qconfigs and ``None``."""
    if qconfig is None or qconfig.activation is None:
        return None
    act = probe(qconfig.activation)
    dtype = getattr(act, "dtype", None)
    weight = getattr(probe(qconfig.weight), "dtype", None) if qconfig.weight is not None else None
    weight_only = dtype == torch.float32 and weight is not None and weight != torch.float32
    if not (getattr(act, "is_dynamic", False) or dtype == torch.float16 or weight_only):
        return None
    return DynamicRequest(activation=dtype, per_token=getattr(act, "qscheme", None) in PER_CHANNEL_SCHEMES,
                          weight=weight)


def describe(d: Any) -> str:
    """``"dynamic quint8 (per tensor) activations, qint8 weights"`` for a request or a dtype config."""
    name = {torch.quint8: "quint8", torch.qint8: "qint8", torch.float16: "float16", torch.float32: "float32",
            torch.quint4x2: "quint4x2"}
    if isinstance(d, DynamicRequest):
        act, per_token, weight = d.activation, d.per_token, d.weight
    else:
        act, per_token, weight = d.input, d.input_qscheme in PER_CHANNEL_SCHEMES, d.weight
    if act == torch.float32:
        acts = "float activations (weight-only)"
    elif act == torch.float16:
        acts = "float16 activations"
    else:
        acts = f"dynamic {name.get(act, act)} ({'per token' if per_token else 'per tensor'}) activations"
    return f"{acts}, {name.get(weight, weight)} weights"


def select_dynamic_entry(backend: BackendConfig, module_type: type,
                         request: DynamicRequest) -> tuple[Optional[OpEntry], Optional[str]]:
    """The dynamic entry of ``backend`` for ``module_type`` that accepts ``request``.

    Returns:
        ``(entry, None)`` when one accepts it; ``(first dynamic entry of the op, reason)`` when the op has dynamic
        entries but none takes this request (the node stays float with the reason); ``(None, None)`` when the op
        has no dynamic entry at all (the static entry, if any, decides).
    """
    candidates = backend.dynamic_entries_for(module_type)
    for e in candidates:
        if any(request.accepted_by(d) for d in e.dtypes):
            return e, None
    if not candidates:
        return None, None
    offered = "; ".join(sorted({describe(d) for e in candidates for d in e.dtypes}))
    return candidates[0], (f"backend '{backend.name}' has no {module_type.__name__} kernel for {describe(request)}; "
                           f"it has: {offered}")


def dynamic_spec(entry: OpEntry, qconfig: Any, module: nn.Module, backend: BackendConfig,
                 kernel: Optional[str] = None) -> LoweringSpec:
    """What the kernel layer needs to build the dynamic module of ``module``: the qconfig's weight observer
    factory (one fresh observer per weight matrix) and whether activations use 7 bits on this machine."""
    kwargs: dict[str, Any] = {"weight_observer": qconfig.weight,
                              "reduce_range": backend.default_activation().reduce_range}
    if kernel is not None:
        kwargs["kernel"] = kernel
    return LoweringSpec(entry.lowering, module, None, None, kwargs)  # type: ignore[arg-type]
