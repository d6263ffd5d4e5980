"""The public pass-authoring API (fxquant.passes): patterns, the rewrite driver, PassManager options, pipelines
handed to prepare_fx / convert_fx, and a custom backend table end to end."""

from __future__ import annotations

import copy
import dataclasses
import doctest
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import fx, nn

import fxquant
from fxquant.backends import OpKind, cpu, get_backend_config, ops
from fxquant.backends.config import KernelFusion
from fxquant.fused import fold_bn
from fxquant.passes import (CODEGEN, Op, PassManager, PassOrderError, PassResult, PassVerificationError, Pattern, QuantContext,
                            Rewrite, RewritePass, TimingReport, convert_pipeline, find, fuse_pipeline,
                            prepare_pipeline, recompile, record, rewrite, timing_report)
from fxquant.passes.cleanup import CleanupPass
from fxquant.passes.fuse import fusion_rules
from fxquant.passes import lower
from fxquant.passes.lower import kernel_fusion_patterns
from fxquant.passes.matching import Entry
from fxquant.passes.observe import is_observer_node
from fxquant.testing import examples, models
from fxquant.tracer import trace

from models import SmallCNN, seeded

X = torch.randn(2, 3, 16, 16)
FBGEMM = get_backend_config("fbgemm")


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# =============================================================================== patterns

class _Spellings(nn.Module):
    """conv -> relu in three spellings, one add -> relu whose add is shared, a dead-end relu chain."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        a = self.relu(self.c1(x))
        b = F.relu(self.c2(a))
        c = self.c3(b).relu()
        s = a + c
        return torch.relu(s) * s


def test_one_chain_matches_every_spelling_and_only_private_chains():
    gm = fx.symbolic_trace(_Spellings())
    found = [m.names() for m in find(gm, Pattern.chain(ops.CONV2D, ops.RELU))]
    assert found == [["c1", "relu"], ["c2", "relu_1"], ["c3", "relu_2"]]   # the last step may have other users
    assert find(gm, Pattern.chain(ops.ADD, ops.RELU)) == []  # s feeds the relu and the mul: not private
    public = Pattern(Pattern.chain(ops.ADD, ops.RELU).ops, private=False)
    assert [m.names() for m in find(gm, public)] == [["add", "relu_3"]]


def test_traced_pattern_equals_the_data_pattern_and_wiring_is_checked():
    gm = fx.symbolic_trace(_Spellings())
    traced = Pattern.trace(lambda x: torch.relu(x))
    assert [m.names() for m in find(gm, traced)] == [m.names() for m in find(gm, Pattern.chain(ops.RELU))]
    # a * b with b = relu(a): the DAG pattern says which argument each step feeds
    mul_of_relu = Pattern((Op(ops.RELU, "r"), Op(ops.MUL, "m", args=("r", None))), private=False)
    assert [m.names() for m in find(gm, mul_of_relu)] == [["relu_3", "mul"]]
    wrong_side = Pattern((Op(ops.RELU, "r"), Op(ops.MUL, "m", args=(None, "r"))), private=False)
    assert find(gm, wrong_side) == []


def test_checks_filter_matches():
    gm = fx.symbolic_trace(_Spellings())
    only_c3 = Pattern.chain(Op(ops.CONV2D, "conv", check=lambda n, m: n.target == "c3"), ops.RELU)
    assert [m["conv"].name for m in find(gm, only_c3)] == ["c3"]
    none = Pattern.chain(ops.CONV2D, ops.RELU, extra_check=lambda match, modules: False)
    assert find(gm, none) == []


def test_patterns_reject_backward_references_and_duplicate_names():
    with pytest.raises(ValueError, match="reads \\['later'\\].*forward order"):
        Pattern((Op(ops.RELU, "first", args=("later",)), Op(ops.RELU, "later")))
    with pytest.raises(ValueError, match="two pattern steps are named 'x'"):
        Pattern((Op(ops.RELU, "x"), Op(ops.RELU, "x", args=("x",))))
    with pytest.raises(ValueError, match="at least one step"):
        Pattern(())
    with pytest.raises(KeyError, match="no step 'nope'"):
        Pattern.chain(ops.RELU).index("nope")


def _is_identity(node, modules):
    return node.op == "call_module" and isinstance(modules[node.target], nn.Identity)


class _Observed(nn.Module):
    """conv -> identity -> relu twice; the second identity also feeds the output."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.id1, self.id2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.Identity(), nn.Identity()

    def forward(self, x):
        a = torch.relu(self.id1(self.c1(x)))
        b = self.id2(self.c2(a))
        return torch.relu(b), b


def test_patterns_look_through_the_nodes_they_name():
    gm = fx.symbolic_trace(_Observed())
    assert find(gm, Pattern.chain(ops.CONV2D, ops.RELU)) == []     # an identity sits between
    through = Pattern.chain(ops.CONV2D, ops.RELU, through=_is_identity)
    assert [m.names() for m in find(gm, through)] == [["c1", "relu"]]  # c2's value also reaches the output
    shared = Pattern.chain(ops.CONV2D, ops.RELU, through=_is_identity, private=False)
    assert [m.names() for m in find(gm, shared)] == [["c1", "relu"], ["c2", "relu_1"]]
    assert find(gm, Pattern.chain(Op(_is_identity), ops.RELU, through=_is_identity)) == []  # never a step


def test_entry_steps_match_what_annotate_chose():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardswish(), nn.Conv2d(4, 4, 3), nn.Hardswish()).eval()
    mapping = fxquant.get_default_qconfig_mapping("fbgemm").set_module_name("3", None)   # the last one stays float
    prepared = fxquant.prepare_fx(model, mapping, (X,), backend_config="fbgemm")
    conv_hardswish = Pattern.chain(Entry("conv2d"), Entry("hardswish"), through=is_observer_node)
    assert [m.names() for m in find(prepared, conv_hardswish)] == [["_0", "_1"]]
    assert find(prepared, Pattern.chain(Entry("conv2d"), Entry("hardswish"))) == []  # observers in between


def _chains_by_walking(gm: fx.GraphModule, kinds: tuple) -> set[tuple[str, ...]]:
    """Test oracle: private chains found by walking first arguments backwards from every node."""
    modules = dict(gm.named_modules())
    out = set()
    for node in gm.graph.nodes:
        chain = [node]
        while len(chain) < len(kinds) and chain[0].args and isinstance(chain[0].args[0], fx.Node):
            chain.insert(0, chain[0].args[0])
        if len(chain) == len(kinds) and all(k.matches(n, modules) for k, n in zip(kinds, chain)) \
                and all(set(n.users) == {nxt} for n, nxt in zip(chain, chain[1:])):
            out.add(tuple(n.name for n in chain))
    return out


@settings(max_examples=examples(25))
@given(models(max_ops=7, max_depth=1))
def test_find_agrees_with_walking_the_graph_on_random_models(model):
    gm = trace(model)
    for kinds in ((ops.CONV2D, ops.BN2D), (ops.CONV2D, ops.RELU), (ops.ADD, ops.RELU), (ops.CONV2D, ops.BN2D, ops.RELU)):
        found = find(gm, Pattern.chain(*kinds))
        assert {tuple(m.names()) for m in found} == _chains_by_walking(gm, kinds)
        order = [list(gm.graph.nodes).index(m.output) for m in found]
        assert order == sorted(order)


# =============================================================================== rewrite driver

def test_rewrite_runs_to_a_fixed_point_and_deletes_what_it_consumed():
    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()))
    rule = Rewrite(Pattern.chain(ops.RELU, ops.RELU), lambda gm, m, ctx: m["0"])
    assert rewrite(gm, [rule]) is True
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    assert [name for name, _ in gm.named_children()] == ["0"]
    assert rewrite(gm, [rule]) is False   # idempotent


def test_a_rule_that_declines_changes_nothing_and_a_runaway_rule_is_reported():
    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.ReLU()))
    before = gm.code
    assert RewritePass("no", (Rewrite(Pattern.chain(ops.RELU, ops.RELU), lambda gm, m, ctx: None),)).run(gm, None) \
        == PassResult(gm, False)
    assert gm.code == before

    def grow(gm, match, ctx):  # relu(relu(x)) -> a fresh relu(relu(x)): re-creates its own pattern forever
        with gm.graph.inserting_before(match.output):
            first = gm.graph.call_function(torch.relu, (match["0"].args[0],))
            return gm.graph.call_function(torch.relu, (first,))

    with pytest.raises(RuntimeError, match="did not settle in 3 rounds"):
        rewrite(gm, [Rewrite(Pattern.chain(ops.RELU, ops.RELU), grow)], max_rounds=3)


def test_builtin_fusion_is_written_on_the_public_pattern_api():
    rules = fusion_rules(QuantContext(FBGEMM))
    assert rules and all(isinstance(r, Rewrite) and isinstance(r.pattern, Pattern) for r in rules)
    kinds = [tuple(op.kind for op in r.pattern.ops) for r in rules]
    # longest first where they compete: conv-bn-relu before conv-bn and conv-relu
    assert kinds.index((ops.CONV2D, ops.BN2D, ops.RELU)) < kinds.index((ops.CONV2D, ops.BN2D))
    assert kinds.index((ops.CONV2D, ops.BN2D, ops.RELU)) < kinds.index((ops.CONV2D, ops.RELU))
    qat = fusion_rules(QuantContext(FBGEMM, is_qat=True))
    assert len(qat) > len(rules)                      # plus the single-module QAT swaps


def test_lowering_kernel_fusions_are_patterns_one_per_table_pair():
    table = FBGEMM.replace(kernel_fusions=(KernelFusion("conv2d", "hardswish", "conv2d+hardswish"),
                                           KernelFusion("linear", "add_relu", "linear+add_relu")))
    found = [(p.fusion.target, p.position, [op.kind for op in p.pattern.ops]) for p in kernel_fusion_patterns(table)]
    assert found == [("conv2d+hardswish", 0, [Entry("conv2d"), Entry("hardswish")]),     # a post-op
                     ("linear+add_relu", 0, [Entry("linear"), Entry("add_relu")]),       # an add: the linear on
                     ("linear+add_relu", 1, [Entry("linear"), Entry("add_relu")])]       # either side
    assert all(p.pattern.through is is_observer_node and p.pattern.private for p in kernel_fusion_patterns(table))
    assert kernel_fusion_patterns(FBGEMM) == ()
    doc = doctest.testmod(lower, optionflags=doctest.ELLIPSIS)   # the module's example of this listing
    assert doc.attempted > 0 and doc.failed == 0


class _PostOps(nn.Module):
    """conv + hardswish, conv + add + relu (the accumulator on the left), and a conv whose output also reaches
    a mean, so its hardswish cannot run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))

    def forward(self, x):
        a = F.hardswish(self.c1(x))
        b = torch.relu(a + self.c2(a))
        c = self.c3(b)
        return F.hardswish(c) + c.mean()


@pytest.mark.skipif(cpu.onednn_int8_missing() is not None, reason=f"no oneDNN int8 here: {cpu.onednn_int8_missing()}")
def test_lowering_fuses_exactly_the_matches_of_the_tables_kernel_fusion_patterns():
    from fxquant.backends.x86 import make_x86_config

    x86 = make_x86_config(assume_onednn=True)  # oneDNN's table, also on a CPU without VNNI (7-bit activations)
    model, x = seeded(_PostOps()), torch.randn(2, 4, 8, 8)
    without_hardswish = x86.replace(kernel_fusions=tuple(f for f in x86.kernel_fusions if f.consumer != "hardswish"))
    for table in (x86, without_hardswish):
        prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(table), (x,), backend_config=table)
        fxquant.calibrate(prepared, [x], progress=False)
        matched = [(m["producer"].name, m["consumer"].name, p.position) for p in kernel_fusion_patterns(table)
                   for m in find(prepared, p.pattern)]
        consumers = {n.name: record(n).entry.name for n in prepared.graph.nodes if n.name in {c for _, c, _ in matched}}
        quantized = fxquant.convert_fx(prepared)
        left = {n.name for n in quantized.graph.nodes}
        assert all(c not in left and p in left for p, c, _ in matched)    # each consumer runs inside its producer
        assert {"hardswish_1"} <= left                                    # c3 also feeds the mean: no match
        if table is x86:
            assert [(p, consumers[c], pos) for p, c, pos in matched] == [
                ("c1", "hardswish", 0), ("c2", "add_relu", 1)]
        else:   # the pair the table dropped has no pattern, and its consumer is lowered on its own
            assert [(p, consumers[c], pos) for p, c, pos in matched] == [("c2", "add_relu", 1)]
            assert "hardswish" in left
        assert fxquant.sqnr(model(x), quantized(x)) > 25


# =============================================================================== pass manager

@dataclasses.dataclass(frozen=True)
class _Noop:
    name: str = "noop"

    def run(self, gm, ctx):
        return PassResult(gm, False)


@dataclasses.dataclass(frozen=True)
class _AddDeadNode:
    """A broken convert pass: leaves an unused node (the no_dead_nodes invariant)."""

    name: str = "break"

    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(torch.relu, (next(iter(gm.graph.nodes)),))
        return PassResult(gm, True)


def _calibrated(model=None, backend="fbgemm"):
    model = model or seeded(SmallCNN())
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend), (X,), backend_config=backend)
    fxquant.calibrate(prepared, [X], progress=False)
    return model, prepared


def test_pipelines_are_fresh_objects_with_stable_names():
    a, b = prepare_pipeline(), prepare_pipeline()
    a.insert_after("fuse", _Noop())
    assert b.names == ["normalize", "fuse", "annotate", "residual_stream", "observe"]
    assert convert_pipeline().names == ["lower", "cleanup"] and fuse_pipeline().names == ["normalize", "fuse"]
    assert "prepare" in repr(b) and "verify=True" in repr(b)


def test_edit_operations_and_their_errors():
    pm = prepare_pipeline()
    pm.insert_before("fuse", _Noop("before_fuse"))
    pm.insert_after("observe", _Noop("last"))
    pm.replace("residual_stream", _Noop("residual_stream"))
    assert pm.names == ["normalize", "before_fuse", "fuse", "annotate", "residual_stream", "observe", "last"]
    assert pm.remove("last").name == "last"
    with pytest.raises(KeyError, match="no pass named 'missing'.*passes are"):
        pm.insert_after("missing", _Noop())
    pm.insert_after("fuse", _Noop("fuse"))
    with pytest.raises(PassOrderError, match="several passes are named \\['fuse'\\]"):
        pm.check_order()
    pm = prepare_pipeline()
    pm.add_constraint("observe", "normalize")
    with pytest.raises(PassOrderError, match="cycle"):
        pm.check_order()
    with pytest.raises(PassOrderError, match="the name of a run's code generation row"):
        PassManager([_Noop(CODEGEN)]).check_order()
    with pytest.raises(TypeError, match="unknown option 'verbose'"):
        pm.copy(verbose=True)


def test_prepare_fx_runs_the_given_pipeline_without_changing_it():
    model = seeded(SmallCNN())
    pm = prepare_pipeline()
    pm.insert_after("annotate", _Noop())
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (X,), backend_config="fbgemm",
                                  pipeline=pm)
    timings = prepared.meta["fxquant_state"].timings
    assert [t.name for t in timings] == pm.names + [CODEGEN]   # the code generation held back to the end
    assert timings[-1].modified                                 # a prepare changes the graph: it was stale
    assert pm.timings == []                            # the user's object was copied, not run
    report = timing_report(prepared)
    assert report == TimingReport(tuple(timings))
    with pytest.raises(TypeError, match="expects a model returned by fxquant.prepare_fx"):
        timing_report(model)
    assert report.total == pytest.approx(sum(t.seconds for t in timings))
    assert report.seconds("noop") >= 0.0 and "noop" in str(report) and "total" in str(report)


def test_verification_is_on_by_default_and_can_be_switched_off():
    model, prepared = _calibrated()
    pm = convert_pipeline()
    pm.insert_after("cleanup", _AddDeadNode())
    with pytest.raises(PassVerificationError, match="after pass 'break'.*dead nodes.*FXQUANT_PRINT_AFTER=break"):
        fxquant.convert_fx(prepared, pipeline=pm)
    assert isinstance(PassVerificationError("x"), AssertionError)
    quantized = fxquant.convert_fx(prepared, pipeline=pm, verify=False)   # off: the broken pass goes through
    assert any(n.op == "call_function" and not n.users for n in quantized.graph.nodes)
    fxquant.convert_fx(prepared, pipeline=pm.copy(verify=False))          # or off on the pipeline itself


def test_print_after_by_option_and_environment(monkeypatch, capsys):
    model = seeded(SmallCNN())
    mapping = fxquant.get_default_qconfig_mapping("fbgemm")
    fxquant.prepare_fx(model, mapping, (X,), backend_config="fbgemm", pipeline=prepare_pipeline().copy(print_after={"fuse"}))
    out = capsys.readouterr().out
    assert out.count("# --- graph after pass") == 1 and "after pass 'fuse'" in out and "def forward" in out
    monkeypatch.setenv("FXQUANT_PRINT_AFTER", "all")
    _, prepared = _calibrated()
    fxquant.convert_fx(prepared)
    out = capsys.readouterr().out
    assert "after pass 'normalize'" in out and "after pass 'lower'" in out and "after pass 'cleanup'" in out


def _count_recompiles(monkeypatch):
    calls = []
    real = fx.GraphModule.recompile

    def counted(self):
        calls.append(self)
        return real(self)

    monkeypatch.setattr(fx.GraphModule, "recompile", counted)
    return calls


def _code_is_current(gm):
    return gm.code == gm.graph.python_code("self").src


def test_a_pipeline_generates_the_code_once_and_a_pass_that_runs_the_module_gets_it_current(monkeypatch):
    """Inside a PassManager run the house passes only mark the code stale: a prepare regenerates it once after
    the trace, a convert not at all after building its GraphModule; a pass without ``runs_module = False`` and
    the returned modules see code that matches the graph."""
    model = seeded(SmallCNN())
    mapping = fxquant.get_default_qconfig_mapping("fbgemm")
    calls = _count_recompiles(monkeypatch)
    prepared = fxquant.prepare_fx(model, mapping, (X,), backend_config="fbgemm")
    assert len(calls) == 2 and _code_is_current(prepared)  # the trace's GraphModule, then the end of the run
    fxquant.calibrate(prepared, [X], progress=False)
    calls.clear()
    converted = fxquant.convert_fx(prepared)
    assert len(calls) == 1 and _code_is_current(converted)  # the GraphModule lower builds
    assert torch.equal(converted(X), converted(X))

    seen = []

    @dataclasses.dataclass(frozen=True)
    class RunsIt:                      # a user pass: no runs_module attribute, so it may call the module
        name: str = "runs_it"

        def run(self, gm, ctx):
            seen.append((_code_is_current(gm), sum(is_observer_node(n, dict(gm.named_modules()))
                                                   for n in gm.graph.nodes)))
            with torch.no_grad():
                gm(X)
            return PassResult(gm, False)

    pm = prepare_pipeline()
    pm.insert_after("observe", RunsIt())
    fxquant.prepare_fx(model, mapping, (X,), backend_config="fbgemm", pipeline=pm)
    assert seen[0][0] and seen[0][1] > 0  # observe's edits are in the code it runs


class _DropLastRelu:
    """Edits the graph in place: the last relu is bypassed and erased."""

    name = "drop_relu"

    def __init__(self, calls_recompile: bool) -> None:
        self.calls_recompile = calls_recompile

    def run(self, gm, ctx):
        relu = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)
                or n.target in (torch.relu, F.relu)][-1]
        relu.replace_all_uses_with(relu.args[0])
        gm.graph.erase_node(relu)
        if self.calls_recompile:
            recompile(gm)
        return PassResult(gm, True)


def _traced_small_cnn():
    return trace(seeded(SmallCNN()).eval()), QuantContext(backend=FBGEMM)


@pytest.mark.parametrize("calls_recompile", [True, False])
def test_the_code_is_current_after_a_run_and_after_a_pass_fails(calls_recompile):
    """A pass that edits in place and says so (or calls recompile) leaves the code stale only inside the run; the
    run regenerates it at its end, and also when a later pass raises."""
    gm, ctx = _traced_small_cnn()
    out = PassManager([_DropLastRelu(calls_recompile)], verify=False).run(gm, ctx)
    assert _code_is_current(out)

    @dataclasses.dataclass(frozen=True)
    class Fails:
        name: str = "fails"
        runs_module = False

        def run(self, gm, ctx):
            raise RuntimeError("boom")

    gm, ctx = _traced_small_cnn()
    with pytest.raises(RuntimeError, match="boom"):
        PassManager([_DropLastRelu(calls_recompile), Fails()], verify=False).run(gm, ctx)
    assert _code_is_current(gm)


def test_only_the_run_s_own_module_waits_and_a_nested_run_gets_current_code():
    seen = {}

    @dataclasses.dataclass(frozen=True)
    class SideAndNested:
        name: str = "side_and_nested"
        runs_module = False

        def run(self, gm, ctx):
            side, _ = _traced_small_cnn()
            _DropLastRelu(True).run(side, ctx)
            seen["side"] = _code_is_current(side)          # a module built on the side: regenerated at once

            class Look:
                name = "look"                               # no runs_module: it may call the module

                def run(self, inner, ctx):
                    seen["nested"] = _code_is_current(inner)
                    return PassResult(inner, False)

            PassManager([Look()], verify=False).run(gm, ctx)
            return PassResult(gm, False)

    gm, ctx = _traced_small_cnn()
    PassManager([_DropLastRelu(True), SideAndNested()], verify=False).run(gm, ctx)
    assert seen == {"side": True, "nested": True}


def test_cleanup_drops_a_submodule_no_node_calls_any_more():
    """A pass that retargets a call leaves the old submodule behind; cleanup deletes it (and its state_dict keys)
    even when no node is dead."""
    class Retarget:
        name = "retarget"
        runs_module = False

        def run(self, gm, ctx):
            node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "relu1")
            gm.add_submodule("relu_new", nn.ReLU())
            node.target = "relu_new"
            return PassResult(gm, True)

    gm, ctx = _traced_small_cnn()
    out = PassManager([Retarget(), CleanupPass()], verify=False).run(gm, ctx)
    names = dict(out.named_modules())
    assert "relu_new" in names and "relu1" not in names and _code_is_current(out)


def test_a_pass_run_on_its_own_regenerates_the_code_at_once():
    gm = trace(seeded(SmallCNN()).eval())
    ctx = QuantContext(backend=FBGEMM)
    result = RewritePass("fuse", fusion_rules(ctx)).run(gm, ctx)
    assert result.modified and _code_is_current(result.graph_module)


def test_a_user_convert_pass_that_breaks_the_quantized_flow_is_named():
    """A convert pass that feeds a quantized tensor to a node without a NodeRecord breaks an invariant."""
    def unrecorded(gm, match, ctx):    # x.dequantize() -> x.contiguous().dequantize(), the new node unrecorded
        with gm.graph.inserting_before(match.output):
            node = gm.graph.call_method("contiguous", (match.output.args[0],))
        match.output.replace_input_with(match.output.args[0], node)
        return None                    # declines the rewrite itself: only the side effect stays

    _, prepared = _calibrated()
    pm = convert_pipeline()
    pm.insert_after("lower", RewritePass("unrecorded", (Rewrite(Pattern.chain(Op(
        lambda n, m: n.op == "call_method" and n.target == "dequantize")), unrecorded),)))
    with pytest.raises(PassVerificationError, match="after pass 'unrecorded'.*flows into 'contiguous"):
        fxquant.convert_fx(prepared, pipeline=pm)


# =============================================================================== a custom backend in one table

class _ConvReLU6(nn.Module):
    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.op = op

    def forward(self, x):
        return F.relu6(self.op(x))


def _fuse_relu6(mods):
    return _ConvReLU6(fold_bn(mods[0], mods[1]) if len(mods) == 3 else copy.deepcopy(mods[0]))


def _my_backend():
    fbgemm = get_backend_config("fbgemm")
    relu6 = dataclasses.replace(fbgemm.entry("conv2d_relu"), name="conv2d_relu6",
                                op=OpKind("conv_relu6_2d", modules=(_ConvReLU6,)),
                                patterns=((ops.CONV2D, ops.BN2D, ops.RELU6), (ops.CONV2D, ops.RELU6)),
                                fuser=_fuse_relu6, qat_fuser=None, qat_op=None)
    return fbgemm.replace(name="mine", entries=tuple(e for e in fbgemm.entries if e.name != "matmul") + (relu6,))


class _InvertedResidual(nn.Module):
    """mobilenet_v2's block: 1x1 expand + bn + relu6, 3x3 depthwise + bn + relu6, 1x1 project + bn, residual;
    then a matmul head (the op the custom table drops)."""

    def __init__(self, c: int = 8, e: int = 32) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = x + self.project(self.dw(self.expand(x)))
        return torch.matmul(y, y.transpose(-1, -2))


def test_a_custom_backend_table_works_end_to_end_without_library_changes():
    model = seeded(_InvertedResidual())
    with torch.no_grad():   # realistic batch-norm statistics
        for bn in (model.expand[1], model.dw[1], model.project[1]):
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 8, 12, 12)
    results = {}
    for backend in ("fbgemm", _my_backend()):
        prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend), (x,), backend_config=backend)
        fxquant.calibrate(prepared, [x, torch.randn(4, 8, 12, 12)], progress=False)
        quantized = fxquant.convert_fx(prepared)
        kernels = [type(quantized.get_submodule(n.target)).__name__ for n in quantized.graph.nodes
                   if n.op == "call_module"]
        results[getattr(backend, "name", backend)] = (quantized, kernels)
        assert fxquant.sqnr(model(x), quantized(x)) > 25
    _, fb = results["fbgemm"]
    mine_q, mine = results["mine"]
    # fbgemm: relu6 observed after it, the conv writes into [0, 6] and the clamp goes (on a full 8-bit grid; with
    # 7-bit activations, CPUs without VNNI, it stays); mine: conv + relu6 in one kernel (its own fused entry)
    seven_bit = fxquant.get_default_qconfig("fbgemm").activation().quant_max < 255
    assert fb.count("ReLU6") == (2 if seven_bit else 0) and "ReLU6" not in mine
    assert [results["fbgemm"][0].get_submodule(n).relu for n in ("expand.0", "dw.0")] == [False, False]
    assert [mine_q.get_submodule(n).relu for n in ("expand.0", "dw.0")] == [True, True]
    # mine has no matmul entry: it stays float, with the reason the report gives
    reasons = {(r.op, r.reason) for r in fxquant.report(model, mine_q, (x,), runs=1, verbose=False).float_ops}
    assert ("matmul", "the backend table has no quantized kernel for it") in reasons
    assert not any(r.op == "matmul" for r in fxquant.report(model, results["fbgemm"][0], (x,), runs=1,
                                                            verbose=False).float_ops)
