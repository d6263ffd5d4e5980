"""The public entry points: ``prepare_fx``, ``prepare_qat_fx``, ``convert_fx``, ``fuse_fx`` (call-compatible
with torch.ao's).

Example:
    >>> import torch, fxquant
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    >>> x = torch.randn(2, 3, 16, 16)
    >>> prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,),
    ...                               backend_config="fbgemm")
    >>> fxquant.calibrate(prepared, [x], progress=False)
    >>> quantized = fxquant.convert_fx(prepared)
    >>> quantized(x).shape
    torch.Size([2, 8, 14, 14])
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import warnings
from typing import Any, Callable, Optional, Union

import torch
from torch import fx, nn

from fxquant.backends import BACKENDS, BackendConfig, get_backend_config, resolve_backend
from fxquant.backends.kernels import get_kernels
from fxquant.decomposed import decompose_attention
from fxquant.partial import PARTIAL_ATTR, convert_partial, prepare_partial
from fxquant.serialization import QuantGraphModule, as_quant_graph_module
from fxquant.errors import ConvertError, EngineError, FxQuantError, TraceError
from fxquant.fused import materialize_folds
from fxquant.observers import ObserverBase
from fxquant.passes.base import PassManager, PassTiming
from fxquant.passes.context import RECORD_KEY, FloatReason, QuantContext
from fxquant.passes.pipelines import convert_pipeline, freeze_qat_pipeline, fuse_pipeline, prepare_pipeline
from fxquant.qconfig import QConfigMapping
from fxquant.tracer import PrepareCustomConfig, trace

__all__ = ["prepare_fx", "prepare_qat_fx", "convert_fx", "fuse_fx", "QuantState", "prepare_pipeline", "convert_pipeline",
           "freeze_qat_pipeline", "EngineCheck", "InputCheck",
           "STATE_KEY"]

#: the GraphModule.meta key holding the :class:`QuantState` of a prepared or converted model
STATE_KEY = "fxquant_state"


@dataclasses.dataclass
class QuantState:
    """What a prepared/converted model remembers about how it was made."""

    backend: BackendConfig
    qconfig_mapping: Any
    stage: str  # "prepared" or "converted"
    float_reasons: list[FloatReason]
    timings: list[PassTiming]
    is_qat: bool = False  # prepared by prepare_qat_fx: convert_fx first freezes the QAT modules

    def __getstate__(self) -> dict[str, Any]:
        # a table holds functions that cannot be pickled (F.max_pool2d is a local closure of torch's
        # boolean_dispatch), so torch.save(model) saves a built-in backend by name and rebuilds it on load
        state = dict(self.__dict__)
        name = self.backend.name
        if name in BACKENDS and get_backend_config(name) == self.backend:
            state["backend"] = name
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["backend"], str):
            state["backend"] = get_backend_config(state["backend"])
        self.__dict__.update(state)


def _pipeline(pipeline: Optional[PassManager], default: PassManager, verify: bool) -> PassManager:
    """The user's pipeline (a copy: their object is not touched) or the default; ``verify=False`` wins."""
    return default if pipeline is None else pipeline.copy(verify=pipeline.verify and verify)


def _check_model(model: Any, fn: str, any_device: bool = False) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn} expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"{fn} needs the Python nn.Module: torch.fx cannot trace a TorchScript module "
                        f"({type(model).__name__}); pass the model as it was before torch.jit.script / torch.jit.trace")
    stage = _stage_of(model)
    if stage is not None:
        stage = "converted to its reference form" if stage == "reference" else stage
        raise FxQuantError(f"{fn}: this model was already {stage} by fxquant; pass the original float model (to "
                           "quantize it again with other settings, start from the float model)")
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if any(d.type == "meta" for d in devices):
        raise FxQuantError(f"{fn}: the model has parameters on the meta device, which hold no values; materialize "
                           "it first (e.g. model.to_empty(device='cpu'), then load its weights)")
    if any_device and len(devices) > 1:
        raise FxQuantError(f"{fn}: the model's parameters and buffers are on several devices "
                           f"({sorted(map(str, devices))}); move it to one device first, e.g. model.to('cuda')")
    off_cpu = {d.type for d in devices} - {"cpu"}
    if off_cpu and not any_device:
        raise FxQuantError(f"{fn}: the model has parameters on {sorted(off_cpu)}; int8 kernels run on the "
                           "CPU: call model.cpu() first (prepare_qat_fx trains on any device)")


def _stage_of(model: nn.Module) -> Optional[str]:
    """``"prepared"`` / ``"converted"`` for a model made by fxquant, else ``None``."""
    partial = getattr(model, PARTIAL_ATTR, None)
    if partial is not None:
        return "converted" if partial.converted else "prepared"
    state = model.meta.get(STATE_KEY) if isinstance(model, fx.GraphModule) else None
    return None if state is None else state.stage


def _example_inputs(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of the model's positional inputs, got "
                        f"{type(example_inputs).__name__}")
    return example_inputs


def _mapping(qconfig_mapping: Any) -> QConfigMapping:
    if isinstance(qconfig_mapping, QConfigMapping):
        return qconfig_mapping
    if isinstance(qconfig_mapping, dict):
        return QConfigMapping.from_dict(qconfig_mapping)
    kind = type(qconfig_mapping)
    hint = ("; torch.ao.quantization's mappings are not accepted: make the same calls on fxquant.QConfigMapping "
            "(same setters, fxquant.QConfig qconfigs)" if kind.__module__.startswith("torch.ao") else "")
    raise TypeError(f"qconfig_mapping must be a fxquant.QConfigMapping (or its dict form), got "
                    f"{kind.__module__}.{kind.__qualname__}{hint}; fxquant.get_default_qconfig_mapping('x86') is a "
                    "good start")


def _default_backend(backend_config: Union[str, BackendConfig, None]) -> BackendConfig:
    if backend_config is None:
        engine = torch.backends.quantized.engine
        return resolve_backend(engine if engine in ("fbgemm", "x86", "qnnpack") else "x86")
    return resolve_backend(backend_config)


def _trace_with_shapes(model: nn.Module, inputs: tuple[Any, ...], config: PrepareCustomConfig,
                       run_in_eval: bool = False) -> fx.GraphModule:
    gm = trace(model, config, graph_module_class=QuantGraphModule)
    if run_in_eval:  # traced as it trains; run (in the annotate pass) without touching BN statistics
        gm.eval()
    return gm  # the annotate pass runs the example once (shapes) and reports inputs the model rejects


def prepare_fx(model: nn.Module, qconfig_mapping: Any, example_inputs: Any,
               prepare_custom_config: Union[PrepareCustomConfig, dict, None] = None,
               backend_config: Union[str, BackendConfig, None] = None, *, verify: bool = True,
               partial: bool = True, pipeline: Optional[PassManager] = None) -> fx.GraphModule:
    """Trace, fuse, annotate and insert observers: the model to calibrate.

    Args:
        model: a float model in eval mode (not modified).
        qconfig_mapping: which qconfig each op gets (``None`` = stay float).
        example_inputs: a tuple of positional inputs (shape/dtype propagation).
        prepare_custom_config: non-traceable module names/classes.
        backend_config: ``"fbgemm"``, ``"x86"``, ``"qnnpack"`` or a BackendConfig (default: the current
            ``torch.backends.quantized.engine``).
        verify: lint and check invariants between passes.
        partial: when torch.fx cannot trace the model whole, quantize its largest traceable pieces and keep
            the rest float (with a warning naming them) instead of raising :class:`TraceError`.
        pipeline: the passes to run instead of :func:`fxquant.passes.prepare_pipeline` (an edited copy of it,
            see ``docs/pass-authoring.md``); it is copied, not changed.

    Returns:
        The observed GraphModule (an ``nn.Module`` holding prepared pieces when the model was not traceable
        whole; see :mod:`fxquant.partial`).
    """
    _check_model(model, "prepare_fx")
    if model.training:
        raise FxQuantError("prepare_fx is for post-training quantization and needs the model in eval mode: call "
                           "model.eval() first (for quantization-aware training use prepare_qat_fx)")
    inputs = _example_inputs(example_inputs)
    mapping = _mapping(qconfig_mapping)
    backend = _default_backend(backend_config)
    config = PrepareCustomConfig.from_dict(prepare_custom_config)  # type: ignore[arg-type]
    user, model = model, _copy_sharing_weights(model)
    versions = [(name, p, p._version) for name, p in user.named_parameters()]
    decompose_attention(model)
    try:
        gm = _trace_with_shapes(model, inputs, config)
    except TraceError as exc:
        if not partial:
            raise
        prepared = _prepare_partially(model, inputs, mapping, backend, verify, exc, pipeline)
    else:
        prepared = _prepare(gm, QuantContext(backend=backend, qconfig_mapping=mapping, example_inputs=inputs),
                            verify, pipeline)
    written = [name for name, p, v in versions if p._version != v]
    if written:
        raise FxQuantError(f"prepare_fx wrote into the model's own weights ({', '.join(written[:5])}): a pass of the "
                           "pipeline, or the model's forward on the example inputs, changed them in place (in your float model too). A pass "
                           "must assign new tensors (the prepared model reads the float weights where they are); "
                           "a forward that writes its parameters cannot be prepared")
    return _guard_shared_weights(prepared, user)


#: set on a prepared model while its parameters still share memory with the user's float model
SHARED_WEIGHTS_ATTR = "_fxquant_shares_weights"
#: set on a prepared model once train mode has turned its folded-on-read convs into plain ones
_FOLDS_MATERIALIZED_ATTR = "_fxquant_folds_materialized"


def _copy_sharing_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters are new ``Parameter`` objects on the *same* memory.

    Post-training prepare reads the float weights and never writes them (fusion builds new folded tensors; the
    passes that change weights, equalization and bias correction, assign new tensors instead of writing in
    place), so copying them would only double the model's memory and prepare's time. The user's modules are
    never shared: attaching observers, swapping modules or assigning a new tensor leaves the user's model as it
    was. prepare_qat_fx, whose training writes the weights, copies them.

    Each module is copied structurally (:func:`_copy_module`) rather than by ``copy.deepcopy``, whose per-object
    bookkeeping over every attribute was a tenth of a small model's prepare time.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        if type(p) is nn.Parameter:
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    return _copy_module(model, memo)


#: instance attributes of a module that are copied one level deep (the rest of ``__dict__`` is shared with the
#: user's module: settings such as ``stride`` or ``inplace`` that prepare reads but never changes in place)
_CONTAINERS = (dict, collections.OrderedDict, list, set)


def _copy_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``module`` copied for prepare: a new object with its own ``__dict__``, its own containers (the hook
    registries, ``_parameters``, ``_buffers``, ``_modules``, lists and dicts of settings), children copied the
    same way (a child shared by two parents stays shared), parameters from ``memo`` (``copy.deepcopy`` answers
    from it) and buffers copied (a forward may write them: batch-norm statistics in train mode, counters, caches).
    A plain attribute that holds modules (``self.blocks = (self.a, self.b)``) is deep-copied after the children,
    so it holds their copies. A module that defines its own ``__deepcopy__`` (a GraphModule: its code is bound to
    its graph), or tensors kept as plain attributes, is deep-copied as before."""
    if id(module) in memo:
        return memo[id(module)]
    if hasattr(type(module), "__deepcopy__") or any(isinstance(v, torch.Tensor) for v in vars(module).values()):
        return copy.deepcopy(module, memo)
    out = copy.copy(module)
    memo[id(module)] = out
    out._parameters = {k: None if p is None else copy.deepcopy(p, memo) for k, p in module._parameters.items()}
    out._buffers = {k: None if b is None else copy.deepcopy(b, memo) for k, b in module._buffers.items()}
    out._modules = {k: None if c is None else _copy_module(c, memo) for k, c in module._modules.items()}
    state = out.__dict__
    for key, value in state.items():
        if key in ("_parameters", "_buffers", "_modules"):
            continue
        if isinstance(value, (list, tuple, dict, set)) and _holds_modules(value):
            state[key] = copy.deepcopy(value, memo)  # the children in it are in memo: it gets their copies
        elif type(value) in _CONTAINERS:
            state[key] = value.copy()  # the containers' own copy: copy.copy goes through __reduce_ex__, 10x slower
    return out


def _holds_modules(value: Any) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return any(isinstance(v, nn.Module) or (isinstance(v, (list, tuple, dict, set)) and _holds_modules(v))
               for v in items)


def _unshare_weights(model: nn.Module) -> None:
    """Give the parameters of ``model`` and of its submodules their own memory, once per module (see
    :func:`_guard_shared_weights`): each module that still shares its parameters with the user's float model is
    flagged, and the flag is cleared when its parameters are copied."""
    if not model.__dict__.get(SHARED_WEIGHTS_ATTR):
        return
    with torch.no_grad():
        for module in model.modules():
            if module.__dict__.get(SHARED_WEIGHTS_ATTR):
                for p in module.parameters(recurse=False):
                    p.data = p.data.clone()
                module.__dict__[SHARED_WEIGHTS_ATTR] = False


def _unshare_before_load(module: nn.Module, *args: Any) -> None:
    _unshare_weights(module)


def _unshare_before_training(module: nn.Module, args: Any) -> None:
    if module.training or torch.is_grad_enabled():  # gradients: an optimizer step may follow, in eval mode too
        _unshare_weights(module)
    if module.training and not module.__dict__.get(_FOLDS_MATERIALIZED_ATTR):
        materialize_folds(module)  # an optimizer needs the folded weights as parameters
        module.__dict__[_FOLDS_MATERIALIZED_ATTR] = True


def _guard_shared_weights(prepared: nn.Module, user: nn.Module) -> nn.Module:
    """A prepared model reads the user's float weights without copying them; the ways a prepared model's
    weights get written, ``load_state_dict`` and running it in train mode or with gradients enabled (an optimizer
    step may follow), first give it copies of its own, so the user's model never changes. Calibration runs
    under ``torch.no_grad`` and copies nothing. ``load_state_dict`` on a submodule (``prepared.fc.load_state_dict``)
    copies that submodule's parameters first: each module with parameters has the hook too. A gradient reaching
    a parameter by any other way (a submodule's forward, then backward) copies that parameter when it is
    accumulated, before an optimizer can step (:func:`_unshare_on_grad`)."""
    for module in prepared.modules():
        if module is prepared or module._parameters:
            module.__dict__[SHARED_WEIGHTS_ATTR] = True
            module.register_load_state_dict_pre_hook(_unshare_before_load)
    prepared.register_forward_pre_hook(_unshare_before_training)
    users = {p.untyped_storage().data_ptr() for p in user.parameters()}  # storages: a view (an attention's k
    for p in prepared.parameters():                                       # projection) starts inside one
        if p.requires_grad and p.untyped_storage().data_ptr() in users:
            p.register_post_accumulate_grad_hook(_unshare_on_grad(p.data_ptr()))
    return prepared


def _unshare_on_grad(shared: int) -> Callable[[torch.Tensor], None]:
    """A hook for a parameter of a prepared model that still reads the user's memory at address ``shared``:
    once a gradient has been accumulated into it (an optimizer step may follow), it gets memory of its own. This
    covers what the top-level forward hook cannot see: a submodule called on its own with gradients
    (``prepared.fc(x).sum().backward()``). A forward hook on every module would cost every calibration batch a
    Python call per module; this costs nothing until a backward pass."""

    def unshare(param: torch.Tensor) -> None:
        if param.data_ptr() == shared:
            with torch.no_grad():
                param.data = param.data.clone()

    return unshare


def _prepare_partially(model: nn.Module, inputs: tuple[Any, ...], mapping: QConfigMapping, backend: BackendConfig,
                       verify: bool, exc: TraceError, pipeline: Optional[PassManager] = None) -> nn.Module:
    """Quantize the traceable pieces of a model torch.fx cannot trace whole (see fxquant.partial)."""
    entries_modules = {t for e in backend.entries for p in e.patterns for k in p for t in k.modules}

    def quantizable(module: nn.Module) -> bool:
        return any(type(m) in entries_modules for m in module.modules())

    def prepare_piece(gm: fx.GraphModule, example: tuple[Any, ...], name: str) -> fx.GraphModule:
        ctx = QuantContext(backend=backend, qconfig_mapping=mapping, example_inputs=example, scope=name)
        return _prepare(gm, ctx, verify, pipeline)

    result = prepare_partial(model, inputs, {}, prepare_piece, quantizable)
    state = getattr(result, PARTIAL_ATTR)
    shown = "; ".join(f"'{s.name or type(model).__name__}': {s.reason}" for s in state.skipped[:5])
    warnings.warn(f"torch.fx cannot trace {type(model).__name__} whole ({exc.cause}); quantized {len(state.units)} "
                  f"traceable piece(s) and kept the code of {len(state.skipped)} module(s) float: {shown}"
                  f"{' ...' if len(state.skipped) > 5 else ''}. Pass partial=False to get the error instead.",
                  stacklevel=3)
    return result


def _prepare(gm: fx.GraphModule, ctx: QuantContext, verify: bool,
             pipeline: Optional[PassManager] = None) -> fx.GraphModule:
    """Run the prepare pipeline on a traced copy, report its warnings, attach the QuantState."""
    pm = _pipeline(pipeline, prepare_pipeline(verify), verify)
    gm = as_quant_graph_module(pm.run(gm, ctx))
    for msg in ctx.warnings:
        warnings.warn(msg, stacklevel=3)
    gm.meta[STATE_KEY] = QuantState(ctx.backend, ctx.qconfig_mapping, "prepared", list(ctx.float_reasons),
                                    pm.timings, is_qat=ctx.is_qat)
    return gm


def prepare_qat_fx(model: nn.Module, qconfig_mapping: Any, example_inputs: Any,
                   prepare_custom_config: Union[PrepareCustomConfig, dict, None] = None,
                   backend_config: Union[str, BackendConfig, None] = None, *, verify: bool = True,
                   pipeline: Optional[PassManager] = None) -> fx.GraphModule:
    """Trace, fuse into QAT modules, annotate and insert fake quantizers: the model to train.

    As :func:`prepare_fx`, except that conv / linear (+ batch norm) (+ ReLU) become :mod:`fxquant.qat` modules
    (fake-quantized weights, batch norm folding simulated, see :mod:`fxquant.qat`) and activations get the
    qconfig's FakeQuantize modules. Train the result like the float model (any optimizer, ``train()`` /
    ``eval()`` as usual, on the model's device), optionally :func:`fxquant.qat.freeze_bn_stats` and
    :func:`fxquant.disable_observer` for the last steps, then ``convert_fx`` it (on the CPU).

    Args:
        model: a float model in train mode, on any one device (not modified).
        qconfig_mapping: e.g. ``fxquant.get_default_qat_qconfig_mapping("x86")`` (``None`` = stay float).
        example_inputs: a tuple of positional inputs on the model's device. The model is traced in train mode
            (``self.training`` branches as in training) and the example runs with its modules in eval mode,
            so batch norm statistics are not touched.
        prepare_custom_config: non-traceable module names/classes.
        backend_config: as for :func:`prepare_fx`.
        verify: lint and check invariants between passes.
        pipeline: as for :func:`prepare_fx`.

    Returns:
        The GraphModule to train, in train mode (modules the user had in eval mode stay so), on the model's device.

    Example:
        >>> import torch, fxquant
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        >>> x = torch.randn(8, 1, 8, 8)
        >>> qat_model = fxquant.prepare_qat_fx(model.train(), fxquant.get_default_qat_qconfig_mapping("x86"), (x,),
        ...                                    backend_config="x86")
        >>> type(qat_model.get_submodule("0")).__name__
        'ConvBnReLU2d'
    """
    _check_model(model, "prepare_qat_fx", any_device=True)
    if not model.training:
        raise FxQuantError("prepare_qat_fx is for quantization-aware training and needs the model in train mode: "
                           "call model.train() first (to quantize an eval-mode model without training, use "
                           "prepare_fx)")
    inputs = _example_inputs(example_inputs)
    mapping = _mapping(qconfig_mapping)
    backend = _default_backend(backend_config)
    config = PrepareCustomConfig.from_dict(prepare_custom_config)  # type: ignore[arg-type]
    model = copy.deepcopy(model)
    decompose_attention(model)
    modes = {name: m.training for name, m in model.named_modules()}
    gm = _trace_with_shapes(model, inputs, config, run_in_eval=True)
    ctx = QuantContext(backend=backend, qconfig_mapping=mapping, example_inputs=inputs, is_qat=True)
    gm = _prepare(gm, ctx, verify, pipeline)
    gm.train()
    for name, module in gm.named_modules():
        if modes.get(name) is False:
            module.eval()
    device = next(iter({p.device for p in model.parameters()} | {b.device for b in model.buffers()}), None)
    if device is not None:
        gm.to(device)
    _warn_without_fake_quant(gm)
    return gm


def _warn_without_fake_quant(gm: fx.GraphModule) -> None:
    plain = [str(n.target) for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), ObserverBase)]
    if plain:
        warnings.warn(f"prepare_qat_fx: {len(plain)} activation(s) get plain observers, not FakeQuantize (e.g. "
                      f"'{plain[0]}'), so training does not simulate their quantization; use a QAT qconfig such as "
                      "fxquant.get_default_qat_qconfig_mapping(backend)", stacklevel=3)


def _state(model: Any, fn: str) -> QuantState:
    state = model.meta.get(STATE_KEY) if isinstance(model, fx.GraphModule) else None
    if state is None:
        raise ConvertError(f"{fn} expects the model returned by fxquant.prepare_fx (got {type(model).__name__}); "
                           "prepare it first (or, to train it, with fxquant.prepare_qat_fx)")
    if state.stage in ("converted", "reference"):  # "reference": made by convert_to_reference_fx
        what = "converted" if state.stage == "converted" else "a reference model"
        raise ConvertError(f"{fn}: this model is already {what}; convert the prepared model, not its result")
    return state


def convert_fx(graph_module: fx.GraphModule, convert_custom_config: Optional[dict] = None,
               backend_config: Union[str, BackendConfig, None] = None, *, verify: bool = True,
               pipeline: Optional[PassManager] = None) -> fx.GraphModule:
    """Lower a calibrated prepared model to quantized kernels.

    Args:
        graph_module: the result of :func:`prepare_fx` after calibration, or of :func:`prepare_qat_fx` after
            training (on any device; not modified).
        convert_custom_config: accepted for torch.ao compatibility; no options are used yet.
        backend_config: must match the one used to prepare, if given.
        verify: lint and check invariants between passes.
        pipeline: the passes to run instead of :func:`fxquant.passes.convert_pipeline` (copied, not changed).

    Returns:
        The quantized GraphModule; it runs under the backend's quantized engine, which this call selects.
    """
    partial_state = getattr(graph_module, PARTIAL_ATTR, None)
    if partial_state is not None:
        if partial_state.converted:
            raise ConvertError("convert_fx: this model is already converted; convert the prepared model, not its result")
        out = convert_partial(copy.deepcopy(graph_module),
                              lambda gm: convert_fx(gm, convert_custom_config, backend_config, verify=verify,
                                                         pipeline=pipeline))
        getattr(out, PARTIAL_ATTR).converted = True
        return out
    state = _state(graph_module, "convert_fx")
    backend = state.backend if backend_config is None else resolve_backend(backend_config)
    if backend.name != state.backend.name:
        raise ConvertError(f"convert_fx: the model was prepared for backend '{state.backend.name}' but "
                           f"backend_config='{backend.name}'; prepare again for '{backend.name}'")
    if backend != state.backend:
        raise ConvertError(f"convert_fx: backend_config is another table than the one named '{backend.name}' that "
                           "prepared this model (lowering must follow the entries annotate chose); leave "
                           "backend_config out, or prepare again with this table")
    if any(t.is_meta for t in (*graph_module.parameters(), *graph_module.buffers())):
        raise ConvertError("convert_fx: the model has tensors on the meta device, which hold no values; convert "
                           "the calibrated (or trained) model on a real device")
    missing = get_kernels(backend).available()
    if missing:
        raise EngineError(f"backend '{backend.name}': {missing}; choose one of the available engines")
    ctx = QuantContext(backend=backend, qconfig_mapping=state.qconfig_mapping,
                       float_reasons=list(state.float_reasons))
    # lowering builds a new graph and copies what it keeps, so only QAT (whose freeze pass rewrites modules in
    # place, and which may have trained on another device) needs a copy of the whole prepared model first
    gm = copy.deepcopy(graph_module).cpu() if state.is_qat else graph_module
    timings = list(state.timings)
    if state.is_qat:
        freeze = freeze_qat_pipeline(verify)
        gm = freeze.run(gm, ctx)
        timings += freeze.timings
    pm = _pipeline(pipeline, convert_pipeline(verify), verify)
    gm = as_quant_graph_module(pm.run(gm, ctx))
    torch.backends.quantized.engine = backend.engine
    gm.register_forward_pre_hook(EngineCheck(backend.engine))
    gm.register_forward_pre_hook(InputCheck.of(gm))
    gm.meta[STATE_KEY] = QuantState(backend, state.qconfig_mapping, "converted", ctx.float_reasons,
                                    timings + pm.timings, is_qat=state.is_qat)
    return gm


class EngineCheck:
    """Forward pre-hook of converted models: the kernels were packed for one quantized engine."""

    def __init__(self, engine: str) -> None:
        self.engine = engine

    def __call__(self, module: nn.Module, args: Any) -> None:
        if torch.backends.quantized.engine != self.engine:
            raise EngineError(f"this model was converted for the '{self.engine}' quantized engine but the current "
                              f"engine is '{torch.backends.quantized.engine}'; set "
                              f"torch.backends.quantized.engine = '{self.engine}' before running it")


class InputCheck:
    """Forward pre-hook of converted models: no quantized tensor as input, and inputs that the model quantizes
    straight away have the dtype of the example input. Otherwise the quantize step raises raw kernel errors ("Could
    not run 'aten::quantize_per_tensor' with arguments from the 'QuantizedCPU' backend", "Quantize only works on
    Float Tensor, got Long"). Inputs that float code reads first are left to that code (it may cast them).

    Attributes:
        inputs: ``(name, dtype)`` of the positional inputs; ``dtype`` is ``None`` where it is not checked.
    """

    def __init__(self, inputs: list[tuple[str, Optional[torch.dtype]]]) -> None:
        self.inputs = inputs

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "InputCheck":
        """The check for ``gm``'s placeholders (their dtypes as shape propagation recorded them)."""
        def quantized_at_once(node: fx.Node) -> bool:  # a quantize step: quantized output from float input
            return any(getattr(u.meta.get(RECORD_KEY), "quantized_output", False) and
                       not getattr(u.meta.get(RECORD_KEY), "quantized_inputs", True) for u in node.users)

        return cls([(str(n.target), getattr(n.meta.get("tensor_meta"), "dtype", None) if quantized_at_once(n) else None)
                    for n in gm.graph.nodes if n.op == "placeholder"])

    def __call__(self, module: nn.Module, args: Any) -> None:
        for (name, dtype), arg in zip(self.inputs, args):
            if not isinstance(arg, torch.Tensor):
                continue
            if arg.is_quantized:
                raise FxQuantError(f"input '{name}' is a quantized tensor ({arg.dtype}); the converted model takes "
                                   f"{dtype or 'float'} inputs and quantizes them itself: pass the float tensor "
                                   "(x.dequantize() if you only have the quantized one)")
            if dtype is not None and arg.dtype != dtype:
                raise FxQuantError(f"input '{name}' has dtype {arg.dtype}, but the model was prepared with a {dtype} "
                                   f"example input and quantizes it with kernels that take {dtype}; pass x.to({dtype})")


def fuse_fx(model: nn.Module, fuse_custom_config: Union[PrepareCustomConfig, dict, None] = None,
            backend_config: Union[str, BackendConfig, None] = None) -> fx.GraphModule:
    """Trace and fuse (conv+bn folded, op+relu grouped) without quantizing; the model is not modified.

    Args:
        model: a float model in eval mode.
        fuse_custom_config: non-traceable module names/classes.
        backend_config: the table whose fusion patterns apply.

    Returns:
        The fused float GraphModule.
    """
    _check_model(model, "fuse_fx")
    if model.training:
        raise FxQuantError("fuse_fx folds batch norm and needs the model in eval mode: call model.eval() first")
    gm = trace(copy.deepcopy(model), PrepareCustomConfig.from_dict(fuse_custom_config))  # type: ignore[arg-type]
    ctx = QuantContext(backend=_default_backend(backend_config))
    fused = fuse_pipeline().run(gm, ctx)
    materialize_folds(fused)  # plain convs holding the folded weights (prepare keeps them folded on read)
    return fused


# the reference representation: fxquant/reference.py builds on the functions above, so it is imported last
from fxquant.reference import convert_to_reference_fx  # noqa: E402

__all__ += ["convert_to_reference_fx"]
