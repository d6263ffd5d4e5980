"""Properties of the whole pipeline over random models, mappings, backends and data (``fxquant.testing``).

Each test is a hypothesis test over :func:`fxquant.testing.quant_cases`: chains and DAGs of conv, linear, batch
norm, the ReLU family, add, mul, cat, pooling, reshape / flatten / permute, with branches, merges, nested blocks
and dead branches; QConfigMappings with global / object-type / regex / module-name settings, some ``None``; the
fbgemm, qnnpack and x86 backends; calibration data with outliers.

Example counts: CI runs the derandomized ``fxquant`` profile (tests/conftest.py) with the counts below (the whole
file takes 10-30 s on 2 shared cores); ``FXQUANT_HYPOTHESIS_EXAMPLES=500`` runs 500 examples per test, and
``HYPOTHESIS_PROFILE=fxquant-random`` draws new examples on every run instead of the fixed ones.

QConfigMapping precedence on its own (every pair of settings, torch.ao's choice on a traced model) is tested in
tests/test_qconfig.py; here it is checked on the records of real prepared graphs.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import re
import warnings
from collections import defaultdict
from typing import Any, Optional

import torch
from hypothesis import HealthCheck, assume, given, settings
from torch import fx, nn
from torch.utils._pytree import tree_leaves

import fxquant
from fxquant.api import STATE_KEY, convert_pipeline, prepare_pipeline
from fxquant.backends import Observation, get_backend_config
from fxquant.backends.kernels.qtensor import Quantize
from fxquant.fake_quantize import is_observer
from fxquant.passes.cleanup import CleanupPass
from fxquant.passes.context import RECORD_KEY, QuantContext
from fxquant.passes.observe import weight_observer
from fxquant.passes.verify import no_dead_nodes, quantized_flow
from fxquant.qparams import QParams, fake_quantize
from fxquant.testing import QuantCase, examples, quant_cases
from fxquant.tracer import trace
from models import codes_held, int16_pairs_can_overflow, sums_pairs_in_int16

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _quiet(fn, *args, **kwargs):
    """Run a pipeline step without its warnings (unused mapping names, NaN notes: not what these tests check)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _prepare(case: QuantCase) -> fx.GraphModule:
    return _quiet(fxquant.prepare_fx, case.model, case.mapping, (case.example,), backend_config=case.backend)


def _quantize(case: QuantCase, calibration: Optional[list] = None) -> tuple[fx.GraphModule, fx.GraphModule]:
    prepared = _prepare(case)
    _quiet(fxquant.calibrate, prepared, case.calibration if calibration is None else calibration, progress=False)
    return prepared, _quiet(fxquant.convert_fx, prepared)


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ============================================================================ prepare / fuse keep the float function

@settings(max_examples=examples(50), **SETTINGS)
@given(case=quant_cases())
def test_prepare_leaves_float_outputs_unchanged(case):
    """Observers are identities: the prepared model computes exactly what the fused float model computes, before
    and after calibration (observers updating their statistics change nothing either)."""
    prepared = _prepare(case)
    fused = fxquant.fuse_fx(case.model, backend_config=case.backend)
    assert torch.equal(_run(prepared, case.inputs), _run(fused, case.inputs))
    _quiet(fxquant.calibrate, prepared, case.calibration, progress=False)
    assert torch.equal(_run(prepared, case.inputs), _run(fused, case.inputs))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (elementwise ratios blow up where a ReLU or a product gives ~0)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


@settings(max_examples=examples(50), **SETTINGS)
@given(case=quant_cases(mapping="default"))
def test_fuse_fx_preserves_numerics(case):
    """Batch norm folding and op+ReLU grouping re-associate float arithmetic only: relative error <= 1e-5."""
    fused = fxquant.fuse_fx(case.model, backend_config=case.backend)
    ref = _run(case.model, case.inputs)
    assert _relative_error(_run(fused, case.inputs), ref) <= 1e-5


# =================================================================== convert stays within k steps of fake quant

# k, in steps of the op's OUTPUT scale, by op family (the table entry that produced the tensor). Every op is checked
# on exactly the quantized inputs the converted model gave it (see _Simulation), so errors do not compound.
#  * 0 -- ops that only move, select or clamp-at-zero integers (relu, max pool, flatten/reshape/permute) and the
#    quantization of a float input (torch.quantize_per_tensor and fake_quantize both multiply by the float32
#    reciprocal of the scale and round half to even: bit for bit the same).
#  * 1 -- ops that compute new values and requantize them. conv/linear accumulate u8 x s8 products in int32 exactly,
#    as the float simulation does on the same grid (sums of < 2**24 / 255 products are exact in float32 too);
#    they differ in the bias (rounded to int32 at scale in_scale * w_scale) and in requantization (a float32 or
#    fixed-point multiplier and the kernel's own rounding), which moves a value lying within a hair of a rounding
#    boundary to the neighbouring integer. add/mul/cat/batch norm rescale their inputs with such multipliers;
#    hardswish/sigmoid/tanh/leaky_relu evaluate the function in float or through a lookup table and round once;
#    avg pools divide an integer sum and round; relu6/hardtanh clamp to the grid points nearest their bounds.
#  * qnnpack conv/linear with a bias: + r/2, r = in_scale * max(w_scale) / out_scale. qnnpack adds the bias as an int32
#    at scale in_scale * w_scale (fbgemm adds it in float), an error of up to half that scale, r/2 output steps. r is
#    far below 1 in practice; a calibration outlier the op never reads (a stride-2 conv skipping it) makes the input
#    scale large and r large: 3 steps at r = 23 was found (the output of such a conv is mostly its bias).
# A 7-bit grid (fbgemm / x86 without VNNI) is simulated over the codes its kernels hold (0..255, ``codes_held``); there,
# a conv/linear whose input uses the codes above 127 can saturate fbgemm's int16 pairs, and is not held to k
# (``_Simulation._int16_pairs_can_overflow``).
K_EXACT = {"relu", "max_pool", "flatten", "reshape", "permute", "dropout", "identity", "quantize"}
K_STEPS = 1


def _k(family: str) -> int:
    return 0 if family in K_EXACT else K_STEPS


def _qparams_of(module: nn.Module) -> QParams:
    return module.qparams()


class _KernelValues(fx.Interpreter):
    """Runs the converted graph and keeps every node's value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


class _Simulation(fx.Interpreter):
    """Runs the prepared graph as a fake-quant simulation of the converted one.

    Each observer becomes fake quantization at its qparams, read by the ops that run quantized in the converted
    model (ops kept float read what the converted model gives them: the float value, or the dequantized kernel
    output); each shares-input op that runs quantized rounds its result to its input's grid. Wherever the
    converted model holds the same tensor quantized, the difference is recorded (in steps of that tensor's
    scale, by op family) and the simulation continues from the converted model's value, so that every op is
    compared on identical inputs.
    """

    def __init__(self, gm: fx.GraphModule, converted: fx.GraphModule, kernel: dict[str, Any]) -> None:
        super().__init__(gm)
        self.modules = dict(gm.named_modules())
        self.converted_nodes = {n.name: n for n in converted.graph.nodes}
        self.converted_modules = dict(converted.named_modules())
        self.kernel = kernel
        self.quantized_view: dict[fx.Node, torch.Tensor] = {}
        self.steps: dict[str, float] = defaultdict(float)
        self.over: list[tuple[str, str, float, float]] = []  # (node, family, steps, k) beyond k
        self.saturable: list[tuple[str, str, float]] = []  # beyond k where the kernel's int16 pairs can saturate
        self.engine = converted.meta[STATE_KEY].backend.engine
        self.pairs_in_int16 = sums_pairs_in_int16(converted.meta[STATE_KEY].backend)

    def _kernel_view(self, name: str) -> tuple[Optional[torch.Tensor], str]:
        """The converted model's quantized value of the prepared node ``name``, and its family."""
        node = self.converted_nodes.get(name)
        if node is None:
            return None, ""
        value = self.kernel.get(name)
        if isinstance(value, torch.Tensor) and value.is_quantized:
            rec = node.meta.get(RECORD_KEY)
            return value, rec.entry.name if rec is not None and rec.entry is not None else "quantize"
        for user in node.users:
            if user.op == "call_module" and isinstance(self.converted_modules[str(user.target)], Quantize):
                return self.kernel[user.name], "quantize"
        return None, ""

    def _compare(self, name: str, value: torch.Tensor, qp: QParams) -> Optional[torch.Tensor]:
        """Record how far the fake-quantized ``value`` is from the converted model's; returns the latter
        (dequantized), or ``None`` where that model keeps the tensor float."""
        kernel, family = self._kernel_view(name)
        if kernel is None:
            return None
        steps = float(((fake_quantize(value, codes_held(qp)) - kernel.dequantize()).abs() / float(qp.scale)).max())
        self.steps[family] = max(self.steps[family], steps)
        k = _k(family) + self._int32_bias_steps(name)
        if steps > k + 1e-3:
            if self._int16_pairs_can_overflow(name):
                self.saturable.append((name, family, steps))
            else:
                self.over.append((name, family, steps, k))
        return kernel.dequantize()

    def _int16_pairs_can_overflow(self, name: str) -> bool:
        """Whether the conv/linear ``name`` runs a kernel that sums u8 x s8 pairs in int16 here (fbgemm's, on a CPU
        without VNNI) on input codes that can take a pair beyond int16. Its table's 7-bit grid keeps every pair
        inside int16 for codes up to 127; the test inputs are not the calibration data, and values beyond the
        calibrated range take the codes above the grid's end (up to 255: ``codes_held``), where the kernel's
        pair saturates (checked by emulating fbgemm's int16 pairs: a 3x3 conv 10 steps off the exact integer
        sum, 0 off the saturating one). The simulation goes on from the kernel's value, as everywhere."""
        node = self.converted_nodes.get(name)
        if not self.pairs_in_int16 or node is None or node.op != "call_module" or not node.args:
            return False
        weight = getattr(self.converted_modules[str(node.target)], "weight", None)
        x = self.kernel.get(getattr(node.args[0], "name", None))
        if not (isinstance(weight, torch.Tensor) and weight.is_quantized and isinstance(x, torch.Tensor)
                and x.is_quantized and x.dtype == torch.quint8):
            return False
        return int16_pairs_can_overflow(x.int_repr(), weight.int_repr())

    def _int32_bias_steps(self, name: str) -> float:
        """r/2 for a qnnpack conv/linear with a bias (see K_EXACT's comment), else 0."""
        node = self.converted_nodes.get(name)
        module = self.converted_modules.get(str(node.target)) if node is not None and node.op == "call_module" else None
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if self.engine != "qnnpack" or bias is None or not isinstance(weight, torch.Tensor) or not weight.is_quantized:
            return 0.0
        w_scale = float(weight.q_per_channel_scales().max()) if weight.qscheme() in (
            torch.per_channel_affine, torch.per_channel_symmetric) else weight.q_scale()
        return 0.5 * self.kernel[node.args[0].name].q_scale() * w_scale / module._scale

    def _runs_quantized(self, n: fx.Node) -> bool:
        node = self.converted_nodes.get(n.name)
        rec = node.meta.get(RECORD_KEY) if node is not None else None
        return rec is not None and rec.quantized_inputs

    def run_node(self, n: fx.Node) -> Any:
        module = self.modules.get(str(n.target)) if n.op == "call_module" else None
        if is_observer(module):
            src = n.args[0]
            quantized = self._compare(src.name, self.env[src], _qparams_of(module))
            if quantized is not None:
                self.quantized_view[n] = quantized
            ran_as_kernel = isinstance(self.kernel.get(src.name), torch.Tensor) and self.kernel[src.name].is_quantized
            return quantized if ran_as_kernel else self.env[src]
        swapped = {a: self.env[a] for a in n.all_input_nodes if a in self.quantized_view} \
            if self._runs_quantized(n) else {}
        self.env.update({a: self.quantized_view[a] for a in swapped})
        out = super().run_node(n)
        self.env.update(swapped)
        rec = n.meta.get(RECORD_KEY)
        if rec is not None and rec.quantizable and rec.entry.observation is Observation.SHARES_INPUT and \
                rec.observer is not None and isinstance(out, torch.Tensor):
            quantized = self._compare(n.name, out, _qparams_of(self.modules[rec.observer]))
            return out if quantized is None else quantized
        return out


def _fake_quantize_weights(sim: fx.GraphModule, converted: fx.GraphModule) -> None:
    """Quantize each lowered conv/linear weight as lowering does (the qconfig's weight observer, narrowed where the
    table says), and check that the kernel holds exactly those weights."""
    modules = dict(sim.named_modules())
    lowered = {n.name: n for n in converted.graph.nodes}
    for node in sim.graph.nodes:
        rec = node.meta.get(RECORD_KEY)
        if node.op != "call_module" or rec is None or not rec.quantizable or rec.entry.weight is None:
            continue
        kernel_node = lowered.get(node.name)
        if kernel_node is None or not kernel_node.meta[RECORD_KEY].quantized_output:
            continue  # kept float at convert (e.g. a scale ratio the kernel rejects)
        op = getattr(modules[str(node.target)], "op", modules[str(node.target)])
        w_obs = weight_observer(rec, op)
        w_obs(op.weight.detach())
        with torch.no_grad():
            op.weight = nn.Parameter(fake_quantize(op.weight.detach(), w_obs.qparams()), requires_grad=False)
        kernel_weight = converted.get_submodule(str(kernel_node.target)).weight.dequantize()
        assert torch.equal(kernel_weight, op.weight.detach()), node.name


@settings(max_examples=examples(80), **SETTINGS)
@given(case=quant_cases())
def test_convert_stays_within_k_steps_of_fake_quant_simulation(case):
    prepared, converted = _quantize(case)
    kernel = _KernelValues(converted)
    with torch.no_grad():
        out = kernel.run(case.inputs)
        sim_gm = copy.deepcopy(prepared)
        _fake_quantize_weights(sim_gm, converted)
        sim = _Simulation(sim_gm, converted, kernel.values)
        sim.run(case.inputs)
    assert torch.equal(out, _run(converted, case.inputs))
    assert not sim.over, (sim.over, dict(sim.steps))


# ============================================================================ verification, idempotence, flow

def _records(gm: fx.GraphModule) -> list:
    return [(n.name, dataclasses.replace(n.meta[RECORD_KEY]) if RECORD_KEY in n.meta else None)
            for n in gm.graph.nodes]


@settings(max_examples=examples(50), **SETTINGS)
@given(case=quant_cases())
def test_graph_lints_after_every_pass_and_every_pass_is_idempotent(case):
    """Each prepare pass, run a second time on its own output, reports ``modified=False`` and changes neither
    the code nor any node's record. Convert: ``lower`` consumes the observers it reads (a second run has nothing
    to lower and is not meaningful), ``cleanup`` is idempotent; both are verified by the convert PassManager."""
    ctx = QuantContext(backend=get_backend_config(case.backend), qconfig_mapping=case.mapping,
                       example_inputs=(case.example,))
    gm = trace(copy.deepcopy(case.model))
    pipeline = prepare_pipeline()
    pipeline.check_order()
    for p in pipeline.passes:
        gm = p.run(gm, ctx).graph_module
        gm.graph.lint()
        for check in pipeline.verifiers:
            check(gm, ctx)
        code, records = gm.code, _records(gm)
        again = p.run(gm, ctx)
        assert again.modified is False, p.name
        assert again.graph_module.code == code and _records(again.graph_module) == records, p.name
        gm = again.graph_module
    with torch.no_grad():  # calibrate by hand: fxquant.calibrate wants prepare_fx's result, this is the bare pipeline's
        for batch in case.calibration:
            gm(batch)
    converted = convert_pipeline(verify=True).run(copy.deepcopy(gm), QuantContext(backend=ctx.backend))
    code = converted.code
    again = CleanupPass().run(converted, ctx)
    assert again.modified is False and again.graph_module.code == code


class _FlowCheck(fx.Interpreter):
    """At run time, a quantized tensor reaches only nodes recorded as taking quantized inputs, and every node
    recorded as producing a quantized tensor produces one."""

    @staticmethod
    def _quantized(t: torch.Tensor) -> bool:
        # a QTensor (fbgemm, qnnpack) or x86/oneDNN's plain uint8/int8 activations (models take no int8 inputs here)
        return t.is_quantized or t.dtype in (torch.uint8, torch.int8)

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        flat = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        rec = n.meta.get(RECORD_KEY)
        if any(self._quantized(t) for t in flat):
            assert n.op != "output", "the converted model returns a quantized tensor"
            assert rec is not None and rec.quantized_inputs, f"quantized tensor reaches float node '{n.name}'"
        out = super().run_node(n)
        if rec is not None and rec.quantized_output and isinstance(out, torch.Tensor):
            assert self._quantized(out), f"'{n.name}' is recorded quantized but returns {out.dtype}"
        return out


@settings(max_examples=examples(50), **SETTINGS)
@given(case=quant_cases())
def test_quantized_tensors_flow_only_into_quantized_ops_and_nothing_is_left_over(case):
    _, converted = _quantize(case)
    quantized_flow(converted)  # statically: records, and no observer left
    no_dead_nodes(converted)
    assert not any(is_observer(m) for m in converted.modules())
    assert {name for name, _ in converted.named_children()} == {
        str(n.target).split(".")[0] for n in converted.graph.nodes if n.op in ("call_module", "get_attr")}
    with torch.no_grad():
        _FlowCheck(converted).run(case.inputs)  # and at run time, on real tensors


# ===================================================================================== the user's model untouched

def _snapshot(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(name, type(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
             for name, m in model.named_modules()],
            [(name, p.requires_grad) for name, p in model.named_parameters()])


def _pointers(model: nn.Module) -> set[int]:
    return {t.data_ptr() for t in model.state_dict().values() if t.numel()}


@settings(max_examples=examples(30), **SETTINGS)
@given(case=quant_cases())
def test_prepare_and_convert_leave_the_users_model_untouched(case):
    before_out = _run(case.model, case.inputs)
    state, modules, grads = _snapshot(case.model)
    prepared, converted = _quantize(case)
    after_state, after_modules, after_grads = _snapshot(case.model)
    assert after_modules == modules and after_grads == grads
    assert state.keys() == after_state.keys() and all(torch.equal(state[k], after_state[k]) for k in state)
    assert torch.equal(_run(case.model, case.inputs), before_out)
    # no module is shared with the prepared or converted model; the prepared model reads the float weights'
    # memory without copying it (checked unchanged above), the converted model shares no tensor memory
    assert not {id(m) for m in case.model.modules()} & {id(m) for m in (*prepared.modules(), *converted.modules())}
    assert not _pointers(case.model) & _pointers(converted)


# ====================================================================================================== save / load

def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _structure(gm: fx.GraphModule) -> list:
    """The ops in order, with their records (re-tracing on load may renumber node names: relu_1 -> relu)."""
    return [(n.op, str(n.target), n.meta.get(RECORD_KEY)) for n in gm.graph.nodes]


@settings(max_examples=examples(40), **SETTINGS)
@given(case=quant_cases())
def test_save_load_round_trips_exactly(case):
    prepared, converted = _quantize(case)
    expected = _run(converted, case.inputs)
    # torch.save of the whole model: same ops, records and state; a loaded prepared model converts to the same model
    loaded = _roundtrip(converted)
    assert _structure(loaded) == _structure(converted)
    assert loaded.meta[STATE_KEY].stage == "converted"
    assert torch.equal(_run(loaded, case.inputs), expected)
    loaded_prepared = _roundtrip(prepared)
    assert _structure(loaded_prepared) == _structure(prepared)
    assert torch.equal(_run(_quiet(fxquant.convert_fx, loaded_prepared), case.inputs), expected)
    # state_dict into a twin converted from other calibration data (other qparams everywhere), through bytes
    twin = _quantize(case, [2.0 * b + 0.5 for b in case.calibration] + [case.inputs])[1]
    assume(twin.code == converted.code)  # a kernel's scale-ratio limit may keep another op float in the twin
    result = twin.load_state_dict(_roundtrip(converted.state_dict()))
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(_run(twin, case.inputs), expected)


# ========================================================================= QConfigMapping precedence on real graphs

def _most_specific(mapping: fxquant.QConfigMapping, name: str, object_type: Any, scope_type: Optional[type]) -> Any:
    """The documented precedence, written out independently of QConfigMapping.qconfig_for: module name (nearest
    named ancestor) > first matching regex > object type of the enclosing module > object type > global."""
    path = name
    while path:
        if path in mapping.module_name_qconfigs:
            return mapping.module_name_qconfigs[path]
        path = path.rpartition(".")[0]
    for regex, qconfig in mapping.module_name_regex_qconfigs.items():
        if re.match(regex, name):
            return qconfig
    for t in (scope_type, object_type):
        if t is not None and t in mapping.object_type_qconfigs:
            return mapping.object_type_qconfigs[t]
    return mapping.global_qconfig


@settings(max_examples=examples(60), **SETTINGS)
@given(case=quant_cases())
def test_every_node_gets_the_most_specific_qconfig(case):
    prepared = _prepare(case)
    modules = dict(prepared.named_modules())
    for node in prepared.graph.nodes:
        rec = node.meta.get(RECORD_KEY)
        if node.op not in ("call_module", "call_function", "call_method") or rec is None:
            continue
        if node.op == "call_module":
            if is_observer(modules[str(node.target)]):
                continue
            name, scope_type = str(node.target), None
            object_type = rec.fused_from[0] if rec.fused_from else type(modules[name])
        else:
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            name, scope_type = stack[-1] if stack else ("", None)
            object_type = rec.fused_from[0] if rec.fused_from else node.target
        assert rec.qconfig is _most_specific(case.mapping, name, object_type, scope_type), node.name
    assert prepared.meta[STATE_KEY].qconfig_mapping is case.mapping
