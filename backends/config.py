"""The schema of a backend table: typed, declarative data that every pass reads.

One :class:`OpEntry` says everything fxquant knows about one quantized operation on one backend:

* ``patterns``: the float spellings it is fused from, in forward order (``(CONV2D, BN2D, RELU)``);
* ``op``: what the node looks like after fusion (the fused module type or function);
* ``fuser`` / ``qat_fuser``: build the fused float module (post-training) or the QAT module (training) from
  the modules a pattern matched; ``qat_op`` is what the node looks like after QAT fusion;
* ``observation``: how its output is observed (own observer, shares its input's, fixed qparams, none);
* ``dtypes``: the dtype combinations the kernel accepts;
* ``weight``: the weight rule (dtype, allowed qschemes, channel axis) for ops with weights;
* ``constraints``: numeric limits of the kernel (qnnpack's weight range, minimum scale, scale ratios);
* ``lowering``: the kernel-layer target that runs it (``None``: the op runs natively on quantized tensors).

Fusion, observer insertion and lowering all read the same entry; there is no second list anywhere.

Example:
    >>> from fxquant.backends import get_backend_config
    >>> cfg = get_backend_config("fbgemm")
    >>> cfg.entry("conv2d_relu").lowering
    'conv2d_relu'
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from fxquant.fused import float_type

__all__ = [
    "Observation",
    "OpKind",
    "DTypeConfig",
    "QSpec",
    "WeightRule",
    "Constraints",
    "OpEntry",
    "KernelFusion",
    "BackendConfig",
]


class Observation(enum.Enum):
    """How the output of a quantized op gets its qparams."""

    OWN = "own observer"  #: its own activation observer (conv, linear, add, ...)
    SHARES_INPUT = "shares input qparams"  #: same qparams as its (first) input (pooling, reshape, relu)
    FIXED = "fixed qparams"  #: a fixed range known in advance (sigmoid [0, 1], tanh [-1, 1])
    NONE = "not observed"  #: output is not a quantized tensor (size, shape)


#: the node kinds an :class:`OpKind` matches, in the order of its ``modules``, ``functions`` and ``methods``
_CALLS = ("call_module", "call_function", "call_method")


@dataclasses.dataclass(frozen=True)
class OpKind:
    """One operation in all the spellings a traced graph can hold.

    Attributes:
        name: short name used in tables, docs and messages.
        modules: ``nn.Module`` classes (matched exactly, not by subclass; a conv with a batch norm folded on
            read, :class:`fxquant.fused.FoldedConv2d`, matches as the class it computes, ``nn.Conv2d``).
        functions: ``call_function`` targets (``F.relu``, ``torch.relu``, ``operator.add``).
        methods: ``call_method`` names (``"relu"``, ``"relu_"``).
    """

    name: str
    modules: tuple[type, ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()
    methods: tuple[str, ...] = ()

    def matches(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        """Whether ``node`` is this op (``modules`` maps qualified names to submodules)."""
        if node.op == "call_module":
            return float_type(modules.get(str(node.target))) in self.modules
        if node.op == "call_function":
            return node.target in self.functions
        if node.op == "call_method":
            return node.target in self.methods
        return False


@dataclasses.dataclass(frozen=True)
class DTypeConfig:
    """One dtype combination a kernel accepts. ``None`` means the operand does not exist."""

    input: torch.dtype = torch.quint8
    output: Optional[torch.dtype] = torch.quint8
    weight: Optional[torch.dtype] = None
    bias: Optional[torch.dtype] = None
    #: activations are not observed ahead of time: quantized at run time from each input (``input`` is a
    #: quantized dtype), cast (``torch.float16``) or left float (``torch.float32``, weight-only quantization)
    dynamic: bool = False
    #: dynamic activations only: ``torch.per_tensor_affine`` (one scale per tensor, computed at run time) or
    #: ``torch.per_channel_affine`` (one scale and offset per row of the last dimension: "per token")
    input_qscheme: Optional[torch.qscheme] = None


@dataclasses.dataclass(frozen=True)
class QSpec:
    """A quantization grid: dtype, scheme, range, as a backend wants it by default."""

    dtype: torch.dtype
    qscheme: torch.qscheme = torch.per_tensor_affine
    reduce_range: bool = False
    quant_min: Optional[int] = None
    quant_max: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """How the weight of a conv/linear must be quantized for the kernel.

    Attributes:
        dtype: the weight dtype the kernel takes.
        qschemes: the qschemes the kernel accepts.
        axis: the output-channel axis for per-channel schemes.
    """

    dtype: torch.dtype = torch.qint8
    qschemes: tuple[torch.qscheme, ...] = (torch.per_channel_symmetric, torch.per_channel_affine,
                                           torch.per_tensor_symmetric, torch.per_tensor_affine)
    axis: int = 0


@dataclasses.dataclass(frozen=True)
class Constraints:
    """Numeric limits of a kernel. ``None`` means no limit.

    Attributes:
        weight_range: inclusive integer range the weights must stay in (qnnpack: ``(-127, 127)``).
        min_scale: smallest activation scale the kernel handles (qnnpack: ``2**-12``).
        weight_min_scale: smallest weight scale the kernel handles.
        input_output_scale_ratio: allowed ``[lo, hi)`` of input scale / output scale (qnnpack add/mul).
        fixed_qparams: ``(scale, zero_point)`` for :attr:`Observation.FIXED` outputs.
        depthwise_channel_multiple: depthwise convs whose channel count is not a multiple of this leave
            the kernel's fast path; such convs stay float (fbgemm: 8).
        depthwise_weight_range: integer range for depthwise conv weights when it is narrower than the
            weight observer's (fbgemm's depthwise kernel sums u8 x s8 pairs in int16: 7-bit weights keep
            255 * 64 * 2 below 2**15 with full 8-bit activations).
    """

    weight_range: Optional[tuple[int, int]] = None
    min_scale: Optional[float] = None
    weight_min_scale: Optional[float] = None
    input_output_scale_ratio: Optional[tuple[float, float]] = None
    fixed_qparams: Optional[tuple[float, int]] = None
    depthwise_channel_multiple: Optional[int] = None
    depthwise_weight_range: Optional[tuple[int, int]] = None


#: builds the fused float module from the matched modules (``None`` where the matched node was a function)
ModuleFuser = Callable[[list[Optional[nn.Module]]], nn.Module]


@dataclasses.dataclass(frozen=True)
class OpEntry:
    """Everything about one quantized operation on one backend (see module docstring)."""

    name: str
    op: OpKind
    observation: Observation
    dtypes: tuple[DTypeConfig, ...] = (DTypeConfig(),)
    patterns: tuple[tuple[OpKind, ...], ...] = ()
    fuser: Optional[ModuleFuser] = None
    #: builds the QAT module (``fxquant.qat``) from the same matches when preparing for training; QAT also
    #: applies it to single-module patterns (a lone conv becomes ``qat.Conv2d``)
    qat_fuser: Optional[ModuleFuser] = None
    #: the node after QAT fusion (``qat.ConvBnReLU2d``, ...); ``convert_fx`` turns it back into ``op``
    qat_op: Optional[OpKind] = None
    weight: Optional[WeightRule] = None
    constraints: Constraints = Constraints()
    lowering: Optional[str] = None
    #: positions of the args that carry quantized tensors (default: every tensor arg)
    quantized_args: Optional[tuple[int, ...]] = None
    #: op arguments the kernel needs: (name, position in the functional call, default); read from the
    #: module attribute of that name for module forms (``("dim", 1, 0)`` for cat, softmax, stack)
    op_args: tuple[tuple[str, int, Any], ...] = ()
    #: keyword arguments the kernel computes only at one value, ``(name, value, what the kernel computes)``: a
    #: call giving another value stays float (add: ``("alpha", 1, "a + b")``, not ``a + alpha * b``)
    fixed_args: tuple[tuple[str, Any, str], ...] = ()
    #: shares-input ops whose float result can fall between the input's grid points (averages, interpolation,
    #: clamps at off-grid bounds, gelu): the quantized op rounds its result to that grid, so quantization-aware
    #: training fake-quantizes the output too (with the input's fake quantizer, see ``SharedFakeQuantize``)
    leaves_grid: bool = False
    #: an input whose only reader is this op is written straight in this op's output grid (observe gives the
    #: producer this op's observer): a concatenation then copies integers instead of requantizing each input,
    #: and the producer's output is rounded once, to the grid it ends up in, instead of twice
    inputs_take_output_grid: bool = False
    doc: str = ""

    @property
    def static_dtypes(self) -> tuple[DTypeConfig, ...]:
        return tuple(d for d in self.dtypes if not d.dynamic)

    @property
    def is_dynamic(self) -> bool:
        """Weights quantized ahead of time, activations at run time or not at all: no activation observers,
        float output. Such entries are chosen only for dynamic / weight-only qconfigs."""
        return bool(self.dtypes) and all(d.dynamic for d in self.dtypes)


#: consumer entries of a kernel fusion that add the producer's output to another tensor (the kernel's accumulator)
ACCUMULATING_CONSUMERS = frozenset({"add", "add_relu"})


@dataclasses.dataclass(frozen=True)
class KernelFusion:
    """A producer op whose only user is a consumer op, run by one kernel at lowering (a oneDNN post-op).

    Unlike ``OpEntry.patterns`` (fused into one float module before observers are placed), both ops keep their
    entries, observers and fake-quant simulation; lowering builds one kernel for the pair, whose output has the
    consumer's qparams, and the producer's output is never quantized (it stays inside the kernel). Lowering finds
    the pairs with a pattern per fusion (two for an add: the producer on either side), listed by
    ``fxquant.passes.lower.kernel_fusion_patterns(table)``.

    Attributes:
        producer: the producer's entry name (``"conv2d"``).
        consumer: the consumer's entry name (``"add_relu"``, ``"hardswish"``).
        target: the kernel layer's lowering target for the pair (``"conv2d+add_relu"``).
    """

    producer: str
    consumer: str
    target: str

    @property
    def accumulates(self) -> bool:
        """The consumer adds another tensor of the producer's shape, which the kernel takes as its accumulator (a
        residual add, oneDNN's ``sum`` post-op); the producer may then be either operand."""
        return self.consumer in ACCUMULATING_CONSUMERS


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """A backend: its table, its engine and its kernel layer.

    Attributes:
        name: ``"fbgemm"``, ``"x86"``, ``"qnnpack"`` or a user's own name.
        engine: the value for ``torch.backends.quantized.engine`` its kernels need.
        entries: the table.
        activation: the default activation grid for this backend.
        weight: the default weight grid for this backend.
        kernels: the name of the kernel layer (see :mod:`fxquant.backends.kernels`).
        reduce_range_without_vnni: activations drop to 7 bits on CPUs without VNNI (fbgemm's and oneDNN's u8 x s8
            kernels accumulate pairs in int16 there and can saturate); with VNNI the full 8 bits are used.
        kernel_fusions: producer / consumer pairs the kernel layer runs as one kernel (see :class:`KernelFusion`).
    """

    name: str
    engine: str
    entries: tuple[OpEntry, ...]
    activation: QSpec
    weight: QSpec
    kernels: str = "qtensor"
    doc: str = ""
    reduce_range_without_vnni: bool = False
    kernel_fusions: tuple[KernelFusion, ...] = ()

    def __post_init__(self) -> None:
        names = [e.name for e in self.entries]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"backend {self.name!r}: duplicate entry names {sorted(dup)}")
        unknown = {n for f in self.kernel_fusions for n in (f.producer, f.consumer) if n not in names}
        if unknown:
            raise ValueError(f"backend {self.name!r}: kernel_fusions name entries it lacks: {sorted(unknown)}")

    def default_activation(self) -> QSpec:
        """The default activation grid on this machine (``reduce_range`` resolved against the CPU)."""
        from fxquant.backends.cpu import has_vnni

        if self.reduce_range_without_vnni and not has_vnni():
            return dataclasses.replace(self.activation, reduce_range=True)
        return self.activation

    def entry(self, name: str) -> OpEntry:
        """The entry called ``name``; ``KeyError`` naming the backend otherwise."""
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(f"backend {self.name!r} has no entry {name!r}")

    def entry_for(self, node: fx.Node, modules: dict[str, nn.Module]) -> Optional[OpEntry]:
        """The static entry whose (post-fusion) op is ``node``, or ``None`` if the backend cannot quantize it
        statically (dynamic entries: :meth:`dynamic_entries_for`)."""
        index = self._static_index
        if index is not None and node.op in _CALLS:
            key = float_type(modules.get(str(node.target))) if node.op == "call_module" else node.target
            return index.get((node.op, key))  # torch.fx keys its nodes by target: a target is hashable
        for e in self.entries:
            if e.is_dynamic:
                continue
            if e.op.matches(node, modules) or (e.qat_op is not None and e.qat_op.matches(node, modules)):
                return e
        return None

    @functools.cached_property
    def _static_index(self) -> Optional[dict[tuple[str, Any], OpEntry]]:
        """``(node.op, module class / function / method name) ->`` the first static entry whose op or QAT op it
        is: what :meth:`entry_for`'s scan of the table finds, in one lookup (it ran for every node, against every
        entry). ``None`` when an entry's op matches by a rule of its own (an ``OpKind`` subclass) or names an
        unhashable function: then the scan."""
        index: dict[tuple[str, Any], OpEntry] = {}
        for e in self.entries:
            if e.is_dynamic:
                continue
            for kind in (e.op, e.qat_op):
                if kind is None:
                    continue
                if type(kind).matches is not OpKind.matches:
                    return None
                for op, keys in zip(_CALLS, (kind.modules, kind.functions, kind.methods)):
                    for key in keys:
                        try:
                            index.setdefault((op, key), e)
                        except TypeError:  # an unhashable callable among the functions: the scan compares by ==
                            return None
        return index

    def dynamic_entries_for(self, module_type: type) -> list[OpEntry]:
        """The dynamic / weight-only entries for a module class, in table order."""
        return [e for e in self.entries if e.is_dynamic and module_type in e.op.modules]

    def kernel_fusion(self, producer: str, consumer: str) -> Optional[KernelFusion]:
        """The kernel fusion of entry ``producer`` into entry ``consumer``, if the table has one."""
        for f in self.kernel_fusions:
            if f.producer == producer and f.consumer == consumer:
                return f
        return None

    def fusion_entries(self) -> list[OpEntry]:
        """Entries with multi-op patterns, longest pattern first (so conv-bn-relu wins over conv-bn)."""
        fusing = [e for e in self.entries if any(len(p) > 1 for p in e.patterns)]
        return sorted(fusing, key=lambda e: -max(len(p) for p in e.patterns))

    def replace(self, **changes: Any) -> "BackendConfig":
        """A copy with some fields changed (e.g. ``entries=...`` for a custom backend)."""
        return dataclasses.replace(self, **changes)
