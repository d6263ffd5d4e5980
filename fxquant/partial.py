"""Quantizing models that torch.fx cannot trace whole: find the largest traceable pieces, quantize those.

When tracing a module fails, the failing submodule (if the failure happened inside one) is made a leaf and
tracing is retried; the leaf is then handled the same way on its own. When a module's own ``forward`` is
untraceable, each child is handled on its own and the module's code stays float. Every piece is traced
for the call the model actually makes (recorded on ``example_inputs``): tensor arguments become graph
inputs, other arguments (``None``, flags) are fixed, and a later call with other fixed arguments is an
error rather than silent garbage.

Example (Hugging Face BertModel, which symbolic_trace rejects):
    >>> prepared = fxquant.prepare_fx(bert.eval(), qmap, (), example_kwargs=dict(enc))   # doctest: +SKIP
    >>> prepared._fxquant_partial.skipped[0]                                          # doctest: +SKIP
    SkippedModule(name='', reason="TypeError: 'Proxy' object does not support item assignment")
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from fxquant.errors import FxQuantError, TraceError
from fxquant.tracer import PrepareCustomConfig, trace

__all__ = ["SkippedModule", "PartialState", "PreparedCall", "prepare_partial", "convert_partial", "PARTIAL_ATTR"]

#: attribute of a partially prepared/converted model holding its :class:`PartialState`
PARTIAL_ATTR = "_fxquant_partial"
_MAX_TENSORS = 8
_MAX_RETRIES = 64


@dataclasses.dataclass(frozen=True)
class SkippedModule:
    """A module whose own code stayed float, and why."""

    name: str
    reason: str


@dataclasses.dataclass
class PartialState:
    """What partial preparation did: the traced pieces and the modules left float."""

    units: list[str]
    skipped: list[SkippedModule]
    converted: bool = False


class _BoundCall(nn.Module):
    """Calls ``inner`` with one recorded call's non-tensor arguments fixed; takes the tensors positionally."""

    _fxquant_traceable = True

    def __init__(self, inner: nn.Module, params: list[inspect.Parameter], tensor_names: list[str],
                 fixed: dict[str, Any]) -> None:
        super().__init__()
        self.inner = inner
        self._params, self._tensor_names, self._fixed = params, tensor_names, fixed

    def forward(self, t0=None, t1=None, t2=None, t3=None, t4=None, t5=None, t6=None, t7=None):  # noqa: ANN001
        values = dict(self._fixed)
        values.update(zip(self._tensor_names, (t0, t1, t2, t3, t4, t5, t6, t7)))
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        positional = True  # pass leading arguments positionally, as the model does (kernels' forwards differ)
        for p in self._params:
            if p.name not in values:
                positional = positional and p.kind is p.VAR_POSITIONAL
                continue
            if p.kind is p.POSITIONAL_ONLY or (positional and p.kind is p.POSITIONAL_OR_KEYWORD):
                args.append(values[p.name])
            elif p.kind is p.VAR_POSITIONAL:
                args.extend(values[p.name])
            elif p.kind is p.VAR_KEYWORD:
                kwargs.update(values[p.name])
            else:
                kwargs[p.name] = values[p.name]
        return self.inner(*args, **kwargs)


class PreparedCall(nn.Module):
    """Stands in for a module in a partially quantized model: binds the original call, checks the fixed
    arguments, runs the traced piece ``gm`` on the tensors."""

    def __init__(self, gm: nn.Module, name: str, signature: inspect.Signature, tensor_names: list[str],
                 fixed: dict[str, Any], output_type: Optional[type] = None) -> None:
        super().__init__()
        self.gm = gm
        self.name, self.signature, self.tensor_names, self.fixed = name, signature, tensor_names, fixed
        # torch.fx turns a returned dict subclass (Hugging Face ModelOutput) into a plain dict: rebuild it
        self.output_type = output_type if output_type is not None and issubclass(output_type, dict) and \
            output_type is not dict else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs).arguments
        for key, expected in self.fixed.items():
            got = bound.get(key, self.signature.parameters[key].default if key in self.signature.parameters else None)
            if got is inspect.Parameter.empty:
                got = None
            if not _same(got, expected):
                raise FxQuantError(f"module '{self.name}' was quantized for calls with {key}={expected!r} (as on "
                                   f"example_inputs) but was called with {key}={got!r}; prepare with example "
                                   "inputs that make the calls you will make")
        out = self.gm(*(bound[n] for n in self.tensor_names))
        if self.output_type is not None and type(out) is dict:
            out = self.output_type(**out)
        return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable ==
        return a is b


def record_calls(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[nn.Module, tuple]:
    """The (args, kwargs) of the first call of every submodule when ``model`` runs on the example."""
    calls: dict[nn.Module, tuple] = {}

    def hook(module: nn.Module, a: tuple, kw: dict) -> None:
        calls.setdefault(module, (a, kw))

    def out_hook(module: nn.Module, a: tuple, out: Any) -> None:
        if module in calls and len(calls[module]) == 2:
            calls[module] = calls[module] + (type(out),)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
    handles += [m.register_forward_hook(out_hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


@dataclasses.dataclass
class _Context:
    calls: dict[nn.Module, tuple]
    prepare: Callable[[fx.GraphModule, tuple, str], nn.Module]
    quantizable: Callable[[nn.Module], bool]
    state: PartialState


def _split_call(module: nn.Module, call: tuple) -> Optional[tuple[inspect.Signature, list[str], dict, list]]:
    sig = inspect.signature(module.forward)
    bound = sig.bind(*call[0], **call[1]).arguments
    tensors = [k for k, v in bound.items() if isinstance(v, torch.Tensor)]
    fixed = {k: v for k, v in bound.items() if not isinstance(v, torch.Tensor)}
    nested = any(isinstance(x, torch.Tensor) for v in fixed.values() if isinstance(v, (list, tuple, dict))
                 for x in (v.values() if isinstance(v, dict) else v))
    if not tensors or len(tensors) > _MAX_TENSORS or nested:
        return None
    return sig, tensors, fixed, [bound[k] for k in tensors]


def _prepare_unit(module: nn.Module, name: str, ctx: _Context) -> Optional[nn.Module]:
    """A PreparedCall replacing ``module``, or ``None`` if its own code cannot be traced (or it is never called)."""
    call = ctx.calls.get(module)
    split = _split_call(module, call[:2]) if call is not None else None
    if split is None:
        return None
    sig, tensors, fixed, example = split
    skip: list[str] = []
    for _ in range(_MAX_RETRIES):
        bound = _BoundCall(module, list(sig.parameters.values()), tensors, fixed)
        config = PrepareCustomConfig(non_traceable_module_names=[f"inner.{s}" for s in skip])
        unused = {f"t{i}": None for i in range(len(tensors), _MAX_TENSORS)}
        try:
            gm = _drop_none_asserts(trace(bound, config, concrete_args=unused))
        except TraceError as exc:
            if exc.module_path.startswith("inner.") and exc.module_path[len("inner."):] not in skip:
                skip.append(exc.module_path[len("inner."):])
                continue
            ctx.state.skipped.append(SkippedModule(name, exc.cause.split(". ")[0]))
            return None
        break
    else:  # pragma: no cover - a model with more than _MAX_RETRIES untraceable submodules
        return None
    prepared = ctx.prepare(gm, tuple(example), name)
    for sub in skip:
        full = f"{name}.{sub}" if name else sub
        _replace_inside(prepared, f"inner.{sub}", _prepare_or_descend(module.get_submodule(sub), full, ctx))
    ctx.state.units.append(name)
    return PreparedCall(prepared, name or type(module).__name__, sig, tensors, fixed,
                        call[2] if len(call) > 2 else None)


def _drop_none_asserts(gm: fx.GraphModule) -> fx.GraphModule:
    """torch.fx asserts that each unused ``t{i}`` is None; PreparedCall passes only the real tensors."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none":
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _replace_inside(root: nn.Module, path: str, new: Optional[nn.Module]) -> None:
    if new is None:
        return
    parent, _, leaf = path.rpartition(".")
    try:
        setattr(root.get_submodule(parent) if parent else root, leaf, new)
    except AttributeError:  # the leaf was not kept in the prepared graph (unused)
        return


def _prepare_or_descend(module: nn.Module, name: str, ctx: _Context) -> Optional[nn.Module]:
    """A replacement for ``module`` if it traces, else ``None`` after handling its children in place."""
    if not ctx.quantizable(module):
        return None
    unit = _prepare_unit(module, name, ctx)
    if unit is not None:
        return unit
    for child_name, child in list(module.named_children()):
        full = f"{name}.{child_name}" if name else child_name
        new = _prepare_or_descend(child, full, ctx)
        if new is not None:
            setattr(module, child_name, new)
    return None


def prepare_partial(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    prepare: Callable[[fx.GraphModule, tuple, str], nn.Module],
                    quantizable: Callable[[nn.Module], bool]) -> nn.Module:
    """Prepare the traceable pieces of ``model`` (a copy the caller owns; modified in place and returned).

    Args:
        model: the model copy.
        args, kwargs: the example call.
        prepare: runs the prepare pipeline on one traced piece with its example tensors and qualified name.
        quantizable: whether a module contains anything worth quantizing (else it is left alone).

    Returns:
        ``model`` with pieces replaced by :class:`PreparedCall` modules and a :class:`PartialState` at
        ``PARTIAL_ATTR``.
    """
    ctx = _Context(record_calls(model, args, kwargs), prepare, quantizable, PartialState([], []))
    ctx.calls.setdefault(model, (args, kwargs))
    result = _prepare_or_descend(model, "", ctx) or model
    setattr(result, PARTIAL_ATTR, ctx.state)
    return result


def convert_partial(model: nn.Module, convert: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Convert every prepared piece of a partially prepared ``model`` (a copy the caller owns)."""
    while True:
        pending = [m for m in model.modules() if isinstance(m, PreparedCall) and not getattr(m, "converted", False)]
        if not pending:
            return model
        pending[0].gm = convert(pending[0].gm)
        pending[0].converted = True
