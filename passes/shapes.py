"""Shape and dtype propagation for the annotate pass: ``node.meta["tensor_meta"]`` on every node.

The example inputs run through the graph on the ``meta`` device first: every op computes its output's shape,
dtype and strides without touching data, so propagation costs the same on a 224x224 VGG as on a 32x32 one
(running the real model took 0.4 s of vgg16's prepare on one thread, the meta run 0.01 s). Modules run on
shallow copies whose parameters and buffers are meta tensors; the user's modules are never touched.

Where the meta run cannot answer, the graph runs again on the real inputs, which is what the user's own code
would do: an op without a meta kernel, a data-dependent op (``.item()``, ``tolist()``), a tensor created on the
CPU inside ``forward`` and mixed with a meta one, or inputs that do not fit the model. Meta kernels check
shapes but not always dtypes (a meta conv takes ``int64`` input), so a module whose result is not of its own
weights' dtype also goes to the real run. Errors therefore always come from the real
run, in the words the user would see from their model.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple, Optional

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._python_dispatch import TorchDispatchMode

from fxquant.fused import FOLD_BUFFER, float_type

__all__ = ["ShapePropagationError", "propagate_shapes"]


class ShapePropagationError(RuntimeError):
    """The graph failed on the example inputs (real run): ``node`` is where, ``__cause__`` is the model's error."""

    def __init__(self, node: str, cause: BaseException) -> None:
        super().__init__(f"node '{node}': {type(cause).__name__}: {cause}")
        self.node = node
        self.cause = cause


class _NotOnMeta(Exception):
    """The meta run cannot stand in for the real one here."""


def _to_meta(value: Any) -> Any:
    """Tensors (in any nesting) as meta tensors with the same shape, strides, dtype and ``requires_grad``."""
    def one(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        meta = v.to("meta")
        return meta.requires_grad_(v.requires_grad) if v.is_leaf else meta
    return map_aggregate(value, one)


class _Spec(NamedTuple):
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype

    def make(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")


def _key(value: Any) -> Any:
    """A hashable description of an op argument: what a meta kernel's output can depend on."""
    if isinstance(value, torch.Tensor):
        return (value.device.type, value.shape, value.stride(), value.storage_offset(), value.dtype)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *map(_key, value))
    if isinstance(value, dict):
        return tuple((k, _key(v)) for k, v in value.items())
    return (type(value).__name__, value)


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


class _FastMeta(TorchDispatchMode):
    """Makes the meta run cheap: many meta kernels are Python decompositions (``hardswish``, ``layer_norm``, the
    elementwise type-promotion machinery) costing 0.5-1.5 ms per call, more than the real op on one image.

    * an in-place op that keeps its input's metadata (``relu_``, ``hardswish_``) gives its input;
    * an elementwise op whose tensor inputs all have one shape, stride and dtype (activations, same-shape adds)
      gives a tensor like them, of the dtype the op gives on one-element inputs of those dtypes (found once per
      op and dtypes);
    * any other op on meta tensors that returns new meta tensors is answered from a cache keyed by the shapes,
      strides and dtypes of its arguments (the repeated blocks of a network repeat them); ops that read a real
      tensor (made inside ``forward``) always run, as their values may decide the shape.
    Views and other in-place ops run the meta kernel every time (they must alias their input).
    """

    def __init__(self) -> None:
        super().__init__()
        self.results: dict[Any, Any] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        schema = func._schema
        if schema.is_mutable and _writes_first_in_place(func, args, kwargs):
            return args[0]
        if torch.Tag.pointwise in func.tags and len(schema.returns) == 1 and not kwargs and not schema.is_mutable:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            first = tensors[0] if tensors else None
            if (first is not None and first.device.type == "meta" and _dense(first)
                    and all(t.shape == first.shape and t.stride() == first.stride() and t.dtype == first.dtype
                            and t.device == first.device for t in tensors[1:])):
                dtype = _pointwise_dtype(func, args)
                if dtype is not None:
                    return _Spec(first.shape, first.stride(), dtype).make()
        if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
            return func(*args, **kwargs)
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if not tensors or any(t.device.type != "meta" for t in tensors):
            return func(*args, **kwargs)  # a real tensor's values may decide the shape (nonzero): never cached
        try:
            key = (func, _key(args), _key(kwargs))
            cached = self.results.get(key)
        except TypeError:  # an unhashable argument: no caching
            return func(*args, **kwargs)
        if cached is None:
            out = func(*args, **kwargs)
            leaves = out if isinstance(out, (list, tuple)) else (out,)
            if not all(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in leaves):
                return out
            self.results[key] = (type(out), [_Spec(t.shape, t.stride(), t.dtype) for t in leaves])
            return out
        kind, specs = cached
        made = [spec.make() for spec in specs]
        return made[0] if kind not in (list, tuple) else kind(made)


def _writes_first_in_place(func: Any, args: Any, kwargs: Any) -> bool:
    """An in-place op (``relu_``, ``hardswish_``, ``add_``) on a meta tensor that leaves its shape, strides and
    dtype as they were: it returns its first argument, and every other tensor argument has that shape or none
    (so the meta kernel would not have raised a broadcasting error either). Ops that change their input's
    metadata in place (``unsqueeze_``, ``t_``, ``resize_``: tagged ``inplace_view``) are not."""
    schema = func._schema
    if (torch.Tag.inplace_view in func.tags or len(schema.returns) != 1 or schema.returns[0].alias_info is None
            or not args or not isinstance(args[0], torch.Tensor) or args[0].device.type != "meta"):
        return False
    first = schema.arguments[0].alias_info
    if first is None or not first.is_write:
        return False
    others = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.Tensor)]
    return all(t.dim() == 0 or t.shape == args[0].shape for t in others)


_POINTWISE_DTYPES: dict[Any, Optional[torch.dtype]] = {}


def _pointwise_dtype(func: Any, args: Any) -> Optional[torch.dtype]:
    """The dtype ``func`` gives for ``args``' dtypes and scalar kinds (and the default dtype, which decides
    integer-to-float results), probed once on one-element CPU tensors
    (``None``: the probe failed, use the meta kernel)."""
    key = (func, torch.get_default_dtype(), tuple(a.dtype if isinstance(a, torch.Tensor) else type(a) for a in args))
    if key not in _POINTWISE_DTYPES:
        try:
            probe = func(*[torch.zeros(1, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in args])
            _POINTWISE_DTYPES[key] = probe.dtype if isinstance(probe, torch.Tensor) else None
        except Exception:  # noqa: BLE001 - whatever the reason, the meta kernel decides
            _POINTWISE_DTYPES[key] = None
    return _POINTWISE_DTYPES[key]


def _meta_module(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (and its children) whose parameters and buffers are meta tensors. A conv that
    folds a batch norm on read (:class:`fxquant.fused.FoldedConv2d`) runs as its float class: the fold's ops
    would not change a shape, and through the dispatch mode they cost as much as the conv."""
    out = copy.copy(module)
    out.__class__ = float_type(module)
    out._parameters = {k: None if v is None else nn.Parameter(v.to("meta"), v.requires_grad)
                       for k, v in module._parameters.items()}
    out._buffers = {k: None if v is None else v.to("meta") for k, v in module._buffers.items()
                    if out.__class__ is type(module) or k != FOLD_BUFFER}
    out._modules = {k: None if v is None else _meta_module(v) for k, v in module._modules.items()}
    return out


def _check_dtypes(module: nn.Module, result: Any) -> None:
    """Meta kernels may accept what the real ones reject: a floating-point weight applied to integer or
    other-precision inputs (``Input type (long int) and bias type (float) should be the same``). Such a call
    shows in its result, whose dtype is not the weights'; an embedding's integer input does not."""
    weights = {p.dtype for p in module.parameters(recurse=False) if p.dtype.is_floating_point}
    for value in torch.utils._pytree.tree_leaves(result) if weights else ():
        if isinstance(value, torch.Tensor) and value.dtype not in weights:
            raise _NotOnMeta(f"output dtype {value.dtype} vs weights {weights}")


class _Propagate(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, on_meta: bool) -> None:
        super().__init__(gm)
        self.on_meta = on_meta
        self.extra_traceback = False  # errors are reported by node name, not with the graph's code appended

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except (_NotOnMeta, ShapePropagationError):
            raise
        except Exception as exc:  # noqa: BLE001 - the model's own error, reported by node
            if self.on_meta:
                raise _NotOnMeta(str(exc)) from exc
            raise ShapePropagationError(n.name, exc) from exc
        found = False

        def describe(value: Any) -> Any:
            nonlocal found
            if isinstance(value, torch.Tensor):
                found = True
                return _extract_tensor_metadata(value)
            return value

        meta = map_aggregate(result, describe)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return _to_meta(value) if self.on_meta else value

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if not self.on_meta:
            return super().call_module(target, args, kwargs)
        module = self.fetch_attr(target)
        result = _meta_module(module)(*args, **kwargs)
        _check_dtypes(module, result)
        return result


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> None:
    """Record ``tensor_meta`` (shape, dtype, strides) and ``type`` on every node of ``gm`` for ``inputs``.

    Raises:
        ShapePropagationError: the model fails on ``inputs`` (from the real run; names the node).
    """
    with torch.no_grad():
        try:
            with _FastMeta():
                _Propagate(gm, on_meta=True).run(*_to_meta(inputs))
            return
        except Exception:  # noqa: BLE001 - _NotOnMeta, or inputs with no meta form (quantized, sparse tensors)
            pass
        for node in gm.graph.nodes:  # nothing half-recorded from the meta run
            node.meta.pop("tensor_meta", None)
            node.meta.pop("type", None)
        _Propagate(gm, on_meta=False).run(*inputs)
