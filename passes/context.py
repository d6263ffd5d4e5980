"""State the passes share: one typed record per node, and one context object per pipeline run.

Passes never use loose ``node.meta`` string keys beyond :data:`RECORD_KEY`, which holds a
:class:`NodeRecord`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from torch import fx, nn

from fxquant.backends.config import BackendConfig, OpEntry
from fxquant.qparams import QParams

__all__ = ["RECORD_KEY", "NodeRecord", "QuantContext", "record", "modules_of", "attribute_owner", "FloatReason"]

#: the one node.meta key fxquant uses
RECORD_KEY = "fxquant"


@dataclasses.dataclass
class FloatReason:
    """Why a node stays float (collected for the report)."""

    node: str
    op: str
    reason: str


@dataclasses.dataclass
class NodeRecord:
    """What the passes know about one node.

    Attributes:
        fused_from: the original op types a fused node replaced (fuse pass), for qconfig lookup by type.
        module_name: the module whose qconfig applies (annotate pass).
        entry: the backend table entry that can quantize this node, if any (annotate pass).
        qconfig: the resolved qconfig (``None``: stays float) (annotate pass).
        float_reason: why the node stays float, if it does (annotate / lower passes).
        observer: name of the observer module that observes this node's output (observe pass).
        is_tensor: whether the node's output is a floating-point tensor (annotate pass, from shapes).
        is_tensor_tuple: whether it is a tuple of floating-point tensors (chunk, split) (annotate pass).
        quantized_output: in a converted graph, the node produces a quantized tensor (lower pass).
        quantized_inputs: in a converted graph, the node consumes quantized tensors (lower pass).
        weight_qparams: the weight qparams a QAT module trained with (freeze_qat pass), or the grid AdaRound
            chose the weight's rounding on (:func:`fxquant.passes.adaround.adaround`); lowering quantizes the
            weight with them instead of observing it again.
        computes: in a converted graph, the old node whose value this node's output is, where lowering dropped
            that node as a no-op (a clamp the producer's grid already applies): the float counterpart to compare
            it with.
    """

    fused_from: tuple[Any, ...] = ()
    module_name: str = ""
    entry: Optional[OpEntry] = None
    qconfig: Any = None
    float_reason: Optional[str] = None
    observer: Optional[str] = None
    is_tensor: bool = False
    is_tensor_tuple: bool = False
    quantized_output: bool = False
    quantized_inputs: bool = False
    weight_qparams: Optional[QParams] = None
    computes: Optional[str] = None

    @property
    def quantizable(self) -> bool:
        return self.entry is not None and self.qconfig is not None and self.float_reason is None


def record(node: fx.Node) -> NodeRecord:
    """The node's record, created empty on first use."""
    rec = node.meta.get(RECORD_KEY)
    if rec is None:
        rec = node.meta[RECORD_KEY] = NodeRecord()
    return rec


def modules_of(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """Qualified name -> submodule."""
    return dict(gm.named_modules())


def attribute_owner(node: fx.Node) -> str:
    """The module whose attribute a ``get_attr`` node reads (``"conv"`` for ``self.conv.weight``; ``""``: the root)."""
    return str(node.target).rpartition(".")[0]


@dataclasses.dataclass
class QuantContext:
    """Inputs and results of one pipeline run, shared by its passes.

    Attributes:
        backend: the backend table.
        qconfig_mapping: the user's mapping (``None`` in convert).
        example_inputs: inputs used for shape propagation.
        is_qat: preparing for quantization-aware training.
        float_reasons: why nodes stayed float, for the report.
        warnings: messages for the user (unused qconfig names, ...).
        scope: the user-visible qualified name of the traced module ("" for the whole model); module names
            inside the graph are looked up in the QConfigMapping under it (partial tracing).
    """

    backend: BackendConfig
    qconfig_mapping: Any = None
    example_inputs: tuple[Any, ...] = ()
    is_qat: bool = False
    float_reasons: list[FloatReason] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    scope: Optional[str] = None

    def user_name(self, traced_name: str) -> str:
        """The user's qualified name of a module path of the traced graph."""
        if self.scope is None:
            return traced_name
        inner = traced_name[len("inner."):] if traced_name.startswith("inner.") else (
            "" if traced_name == "inner" else traced_name)
        return ".".join(p for p in (self.scope, inner) if p)

    def keep_float(self, node: fx.Node, op: str, reason: str) -> None:
        """Mark ``node`` float with ``reason`` and remember it for the report."""
        record(node).float_reason = reason
        self.float_reasons.append(FloatReason(node.name, op, reason))
