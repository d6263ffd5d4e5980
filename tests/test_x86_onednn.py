"""The x86 table on oneDNN kernels and plain uint8 tensors (backends/kernels/onednn.py), wherever oneDNN's int8
kernels run: the default x86 table on a VNNI CPU, the table ``make_x86_config(assume_onednn=True)`` builds (7-bit
activations) on a CPU without VNNI, where the default x86 table is fbgemm's.

* every static x86 entry on a tiny model: it runs quantized (no float island) and stays within a few output steps of
  the fake-quant simulation (the reference model, ``fxquant.convert_to_reference_fx``), and close to float;
* the kernels against fbgemm on the same integers (within one step);
* kernel fusions: conv + add + relu, conv + hardswish / relu6, linear + gelu run as one oneDNN kernel;
* no quantized tensor and no ``torch.quantize_per_tensor`` while a model lowered for x86 runs;
* without oneDNN int8 (simulated) the x86 table falls back to fbgemm's kernels, with a warning naming why;
* full 8-bit activations by default on a VNNI CPU, 7-bit ones without VNNI (int16 pair sums), 8-bit weights on both;
  on a 7-bit grid the conv / linear outputs are clamped at 127, like the simulation.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Union

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxquant
from fxquant.backends import BackendConfig, cpu, get_backend_config
from fxquant.backends.x86 import make_x86_config
from fxquant.backends.kernels.onednn import OneDNNConv, OneDNNLinear
from fxquant.report import float_ops
from test_coverage import _REMOVED_IN_EVAL, MODELS, _quantized_nodes

# oneDNN's table wherever its kernels run: the default x86 table on a VNNI CPU, and the one make_x86_config builds
# with assume_onednn on a CPU without VNNI (7-bit activations there), so that its kernels are tested there too
X86 = make_x86_config(assume_onednn=True) if cpu.onednn_int8_missing() is None else get_backend_config("x86")
pytestmark = pytest.mark.skipif(X86.kernels != "onednn", reason=f"no oneDNN int8 here: {cpu.onednn_int8_missing()}")


def _static_entries() -> list[str]:
    return [e.name for e in X86.entries if not e.is_dynamic]


#: x86-only entries and their tiny models (the others come from tests/test_coverage.py)
X86_MODELS = {"silu": (nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.SiLU()), (2, 4, 6, 6))}


def _quantize(model: nn.Module, x: torch.Tensor, backend: Union[str, BackendConfig] = "x86", calib: int = 2):
    backend = X86 if backend == "x86" else backend
    gen = torch.Generator().manual_seed(1)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend), (x,), backend_config=backend)
    fxquant.calibrate(prepared, [x] + [torch.randn(*x.shape, generator=gen) for _ in range(calib - 1)],
                      progress=False)
    return prepared, fxquant.convert_fx(prepared)


def _output_step(converted: torch.fx.GraphModule) -> float:
    """The scale of the last dequantize (the output grid)."""
    last = [m for n, m in converted.named_modules() if n.endswith("_dequantize")]
    return float(last[-1].scale) if last else 0.0


def test_every_x86_entry_has_a_model():
    missing = [n for n in _static_entries() if n not in MODELS and n not in X86_MODELS]
    assert not missing, f"x86 entries without a tiny model: {missing}"


@pytest.mark.parametrize("entry", sorted(set(MODELS) | set(X86_MODELS)))
def test_entry_runs_on_uint8_within_steps_of_simulation(entry):
    if entry not in _static_entries():
        pytest.skip(f"x86 has no static entry {entry}")
    torch.manual_seed(0)
    model, shape = (X86_MODELS.get(entry) or MODELS[entry])
    model = copy.deepcopy(model).eval()
    x = torch.randn(*shape)
    prepared, quantized = _quantize(model, x)
    assert float_ops(quantized) == [], f"{entry}: ops left float: {float_ops(quantized)}"
    reference = fxquant.convert_to_reference_fx(prepared)
    with torch.no_grad():
        ref, out, sim = model(x), quantized(x), reference(x)
    step = _output_step(quantized)
    steps = float((out - sim).abs().max()) / step if step else float((out - sim).abs().max())
    assert steps <= 3.0 + 1e-4, f"{entry}: {steps:.2f} output steps from the simulation"
    assert fxquant.sqnr(ref, out) >= 25.0, f"{entry}: {fxquant.sqnr(ref, out):.1f} dB"
    fused = any(f.consumer == entry for f in X86.kernel_fusions)  # conv + hardswish: one kernel, one node
    if entry not in _REMOVED_IN_EVAL:  # the op in front plus the op itself produce uint8 tensors
        assert _quantized_nodes(quantized) >= (1 if isinstance(model, nn.Sequential) or fused else 2)
    assert not any(t.is_quantized for t in quantized.state_dict().values())


# ------------------------------------------------------------------------------------------- kernels vs fbgemm
class _ResidualBlock(nn.Module):
    """A resnet18 basic block with a downsampling shortcut, then a pool and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        self.relu = nn.ReLU(inplace=True)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.down(x)
        out = self.relu(out)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _block() -> nn.Module:
    torch.manual_seed(0)
    model = _ResidualBlock()
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, 16, 16))
    return model.eval()


def test_residual_block_fuses_the_add_and_matches_fbgemm_and_the_simulation():
    model = _block()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    prepared, x86 = _quantize(model, x, "x86", calib=4)
    _, fbgemm = _quantize(model, x, "fbgemm", calib=4)
    binary = [m for m in x86.modules() if isinstance(m, OneDNNConv) and m.binary]
    assert len(binary) == 1 and binary[0].post.attr == "relu"  # conv2 + bn2 + add + relu: one kernel
    assert not any(type(m).__name__ == "FloatKernel" for m in x86.modules())  # the add runs inside the conv
    with torch.no_grad():
        ref, out_fb = model(x), fbgemm(x)
        torch.backends.quantized.engine = "x86"  # each converted model checks the engine it was converted for
        out_x86 = x86(x)
        sim = fxquant.convert_to_reference_fx(prepared)(x)
    # 40 outputs: noisy. Without VNNI fbgemm's quantize keeps codes above the 7-bit top (127) that the histogram
    # observer clipped, where oneDNN's (and the simulation) clamp them: a little more room for fbgemm there
    assert fxquant.sqnr(ref, out_x86) >= fxquant.sqnr(ref, out_fb) - (1.0 if cpu.has_vnni() else 1.5)
    assert float((out_x86 - sim).abs().max()) / _output_step(x86) <= 4.0
    assert fxquant.sqnr(ref, out_x86) > 30


@pytest.mark.parametrize("post", ["none", "relu", "hardswish"])
def test_conv_kernel_equals_fbgemm_on_the_same_integers(post):
    """The oneDNN conv and fbgemm's quantized conv on the same uint8 input, weights and qparams: within one step,
    and within one step of the simulation. Without VNNI (7-bit activations) the inputs differ where the histogram
    observer clipped the range: fbgemm's quantize writes codes above 127, the simulation and oneDNN's quantize
    clamp them to 127, so there only the simulation is compared."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1).eval()
    x = torch.randn(2, 16, 12, 12)
    model = nn.Sequential(conv, {"none": nn.Identity(), "relu": nn.ReLU(), "hardswish": nn.Hardswish()}[post])
    prepared, x86 = _quantize(model.eval(), x)
    _, fb = _quantize(model.eval(), x, "fbgemm")
    with torch.no_grad():
        b = fb(x)
        sim = fxquant.convert_to_reference_fx(prepared)(x)
        torch.backends.quantized.engine = "x86"  # each converted model checks the engine it was converted for
        a = x86(x)
    # with hardswish fused the kernel skips the conv output's grid, where the simulation rounds (one step of that
    # 7-bit grid is about two output steps here)
    steps = 1.0 if post != "hardswish" or cpu.has_vnni() else 3.0
    assert float((a - sim).abs().max()) / _output_step(x86) <= steps + 1e-4
    if post == "hardswish":
        assert fxquant.sqnr(model(x), a) >= fxquant.sqnr(model(x), sim) - 0.5
    if cpu.has_vnni():  # both grids come from the same observers on the same data (8 bits: no clamp at 127)
        assert float((a - b).abs().max()) / _output_step(x86) <= 1.0 + 1e-4


def test_fused_post_ops_run_inside_the_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 1),
                          nn.Hardswish(), nn.Flatten(), nn.Linear(8 * 36, 16), nn.GELU()).eval()
    x = torch.randn(2, 8, 6, 6)
    prepared, q = _quantize(model, x)
    posts = sorted(m.post.attr for m in q.modules() if isinstance(m, (OneDNNConv, OneDNNLinear)))
    assert posts == ["gelu", "hardswish", "hardtanh"]
    with torch.no_grad():
        assert fxquant.sqnr(model(x), q(x)) > 30
        sim = fxquant.convert_to_reference_fx(prepared)(x)
    assert float((q(x) - sim).abs().max()) / _output_step(q) <= 3.0


# ------------------------------------------------------------------------------------------- no quantized tensors
class _NoQuantizedTensors(TorchDispatchMode):
    """Records every op that takes or returns a quantized tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else [out])]
        self.ops.add(str(func))
        if any(isinstance(t, torch.Tensor) and t.is_quantized for t in flat) or "quantize_per" in str(func):
            self.seen.append(str(func))
        return out


def test_no_quantized_tensor_while_an_x86_model_runs(monkeypatch):
    model = _block()
    x = torch.randn(2, 3, 16, 16)
    _, q = _quantize(model, x)

    def refuse(*args, **kwargs):
        raise AssertionError("a QTensor was created while running an x86 model")

    for name in ("quantize_per_tensor", "quantize_per_channel", "_make_per_tensor_quantized_tensor",
                 "_make_per_channel_quantized_tensor"):
        monkeypatch.setattr(torch, name, refuse)
    mode = _NoQuantizedTensors()
    with torch.no_grad(), mode:
        q(x)
    assert mode.seen == [], mode.seen
    assert any("onednn.qconv" in op for op in mode.ops) and any("onednn.qlinear" in op for op in mode.ops)


# -------------------------------------------------------------------------------------------- state and fallback
def test_save_load_and_deepcopy_repack_the_kernels():
    model = _block()
    x = torch.randn(2, 3, 16, 16)
    _, q = _quantize(model, x)
    with torch.no_grad():
        expected = q(x)
        buf = io.BytesIO()
        torch.save(q.state_dict(), buf)
        other = copy.deepcopy(q)
        for m in other.modules():  # scramble, then restore from the state_dict
            if isinstance(m, OneDNNConv):
                m.weight_int.zero_()
                m._repack()
        buf.seek(0)
        other.load_state_dict(torch.load(buf))
        assert torch.equal(other(x), expected)
        assert torch.equal(copy.deepcopy(q)(x), expected)


def test_without_onednn_int8_x86_falls_back_to_fbgemm_kernels(monkeypatch):
    from fxquant.backends.x86 import make_x86_config

    monkeypatch.setattr(cpu, "onednn_int8_missing", lambda: "this torch build has no oneDNN (simulated)")
    with pytest.warns(RuntimeWarning, match="this torch build has no oneDNN \\(simulated\\); using fbgemm's kernels"):
        table = make_x86_config()
    assert table.name == "x86" and table.kernels == "qtensor" and not table.kernel_fusions
    model = _block()
    x = torch.randn(2, 3, 16, 16)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), (x,), backend_config=table)
    fxquant.calibrate(prepared, [x], progress=False)
    q = fxquant.convert_fx(prepared)
    with torch.no_grad():
        assert fxquant.sqnr(model(x), q(x)) > 25


def test_without_vnni_the_default_x86_table_is_fbgemms_and_assume_onednn_gives_7_bits(monkeypatch):
    from fxquant.backends.x86 import make_x86_config

    monkeypatch.setattr(cpu, "has_vnni", lambda: False)
    with pytest.warns(RuntimeWarning, match="the CPU has no VNNI .*; using fbgemm's kernels"):
        assert make_x86_config().kernels == "qtensor"
    table = make_x86_config(assume_onednn=True)
    assert table.kernels == "onednn" and table.default_activation().reduce_range


def test_a_onednn_table_without_onednn_int8_is_a_clear_error(monkeypatch):
    from fxquant.backends.kernels import onednn
    from fxquant.errors import EngineError

    model = _block()
    x = torch.randn(2, 3, 16, 16)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(X86), (x,), backend_config=X86)
    fxquant.calibrate(prepared, [x], progress=False)
    monkeypatch.setattr(onednn, "onednn_int8_missing", lambda: "this torch build has no torch.ops.onednn.qconv_prepack")
    with pytest.raises(EngineError, match="backend 'x86': this torch build has no torch.ops.onednn.qconv_prepack"):
        fxquant.convert_fx(prepared)


def test_x86_default_activations_are_8_bit_with_vnni_and_7_bit_without():
    qconfig = fxquant.get_default_qconfig(X86)
    obs = qconfig.activation()
    if cpu.has_vnni():
        assert (obs.quant_min, obs.quant_max) == (0, 255) and not obs.reduce_range
    else:  # oneDNN sums u8 x s8 pairs in int16 here: 2 x 127 x 128 < 2**15
        assert (obs.quant_min, obs.quant_max) == (0, 127) and obs.reduce_range
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert X86.entry("conv2d").constraints.depthwise_weight_range is None  # 8-bit depthwise weights too


class _Reused(nn.Module):
    """The added tensor is read again after the add, directly and through a view (oneDNN writes the sum into it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.a(x)
        view = x.flatten(1)
        out = self.b(x) + x
        return self.c(out), view, x


class _AddsItsInput(nn.Module):
    """``relu(conv(a) + a)``: the added tensor is the conv's own input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a = self.a(x)
        return (torch.relu(self.b(a) + a),)


class _AddsItsInputsView(nn.Module):
    """``relu(conv(a.reshape(...)) + a)``: the conv reads a view of the added tensor; lowering copies it (the
    reshape is another reader of the added tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a = self.a(x)
        return (torch.relu(self.b(a.reshape(a.shape)) + a),)


def test_a_fused_add_copies_the_added_tensor_when_the_conv_reads_a_view_of_it():
    torch.manual_seed(0)
    model = _AddsItsInputsView().eval()
    x = torch.randn(2, 4, 8, 8)
    prepared, q = _quantize(model, x)
    fused = [m for m in q.modules() if isinstance(m, OneDNNConv) and m.binary]
    assert len(fused) == 1 and fused[0].clone_accum
    with torch.no_grad():
        out, sim = q(x)[0], fxquant.convert_to_reference_fx(prepared)(x)[0]
    assert float((out - sim).abs().max()) / _output_step(q) <= 2.0 + 1e-4


def test_without_vnni_a_onednn_kernel_refuses_grids_whose_int16_pairs_can_overflow(monkeypatch):
    """8-bit activations times 8-bit weights can leave int16 in oneDNN's pair sums without VNNI: convert says so and
    names the node instead of lowering to kernels that would saturate."""
    from fxquant.backends.kernels import onednn
    from fxquant.errors import ConvertError

    model = nn.Sequential(nn.Conv2d(4, 8, 3)).eval()
    x = torch.randn(2, 4, 8, 8)
    qconfig = fxquant.get_default_qconfig(X86)
    full = fxquant.QConfig(activation=qconfig.activation.with_overrides(reduce_range=False), weight=qconfig.weight)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(X86).set_global(full), (x,),
                                  backend_config=X86)
    fxquant.calibrate(prepared, [x], progress=False)
    monkeypatch.setattr(onednn, "has_vnni", lambda: False)
    with pytest.raises(ConvertError, match="node '_0'.*overflow the int16 pair sums.*reduce_range=True"):
        fxquant.convert_fx(prepared)


@pytest.mark.parametrize("model, shape", [(_Reused, (2, 4, 5, 5)), (_AddsItsInput, (2, 4, 8, 8))])
def test_a_fused_add_copies_a_tensor_read_later_or_read_by_the_conv_itself(model, shape):
    """oneDNN writes the sum into the added tensor: where another op reads it later, or the conv itself reads it
    (``conv(a) + a``: without the copy oneDNN's AVX2 conv came out far off), lowering copies it first."""
    torch.manual_seed(0)
    model = model().eval()
    x = torch.randn(*shape)
    prepared, q = _quantize(model, x)
    fused = [m for m in q.modules() if isinstance(m, OneDNNConv) and m.binary]
    assert len(fused) == 1 and fused[0].clone_accum
    with torch.no_grad():
        for ref, out in zip(model(x), q(x)):
            assert fxquant.sqnr(ref, out) > (35 if cpu.has_vnni() else 30)  # 7-bit activations without VNNI


# ------------------------------------------------------------------------------ squeeze-excite fast paths (batch 1)
class _SqueezeExcite(nn.Module):
    """A mobilenet_v3 / efficientnet block: expand, depthwise, squeeze-excite (pool, fc convs, gate, mul), project."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.SiLU())
        self.pool, self.gate = nn.AdaptiveAvgPool2d(1), gate
        self.fc1, self.fc2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.project = nn.Conv2d(32, 16, 1)

    def forward(self, x):
        x = self.dw(self.expand(x))
        s = self.gate(self.fc2(torch.relu(self.fc1(self.pool(x)))))
        return self.project(x * s)


def _se_model(gate: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = _SqueezeExcite(gate).train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(4, 8, 12, 12))
    return model.eval()


@pytest.mark.parametrize("gate", [nn.Hardsigmoid(), nn.Sigmoid()], ids=["hardsigmoid", "sigmoid"])
def test_squeeze_excite_fast_paths_match_the_float_paths(gate):
    """Batch 1: the fc convs on the pooled 1x1 input run as oneDNN's linear (same integers), the gate as a 256-entry
    table (same integers), the gate multiply as oneDNN's depthwise conv (within one step of the float multiply);
    the block stays within a few steps of the simulation and creates no quantized tensor."""
    from fxquant.backends.kernels import onednn_ops

    model = _se_model(gate)
    x = torch.randn(1, 8, 12, 12, generator=torch.Generator().manual_seed(3))
    prepared, q = _quantize(model, x, calib=4)
    kinds = [type(m).__name__ for m in q.modules()]
    assert kinds.count("OneDNNConv") == 5 and "GlobalMeanU8" in kinds
    tables = [m for m in q.modules() if isinstance(m, onednn_ops.FloatOp)]
    assert len(tables) == 1 and tables[0].elementwise

    seen: dict[str, torch.Tensor] = {}
    for name, m in q.named_modules():
        if isinstance(m, (OneDNNConv, onednn_ops.FloatOp, onednn_ops.FloatKernel)):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args))
    mode = _NoQuantizedTensors()
    with torch.no_grad(), mode:
        out = q(x)
    assert mode.seen == [] and any("onednn.qlinear" in op for op in mode.ops)
    as_linear = 0
    with torch.no_grad():
        for name, args in seen.items():
            m = q.get_submodule(name)
            if isinstance(m, OneDNNConv) and m.pointwise and args[0].shape[2:] == (1, 1):  # fc1 and fc2
                as_linear += 1
                m.pointwise = False
                assert torch.equal(m(*args), m._as_linear(args[0])), name
                m.pointwise = True
            elif isinstance(m, onednn_ops.FloatOp):
                assert torch.equal(m(*args), m._float(args[0], (), {}))
            elif isinstance(m, onednn_ops.FloatKernel):
                (a, qa), (b, qb) = sorted(zip(args, m._inputs), key=lambda t: -t[0].numel())
                fast, slow = m(*args), m._float_mul(a, *qa, b, *qb)
                assert int((fast.int() - slow.int()).abs().max()) <= 1
                assert float((fast != slow).float().mean()) < 0.02
        sim = fxquant.convert_to_reference_fx(prepared)(x)
        assert torch.equal(copy.deepcopy(q)(x), out)  # the cached tables and packings are rebuilt, not copied
    assert as_linear == 2
    assert float((out - sim).abs().max()) / _output_step(q) <= 3.0
    assert fxquant.sqnr(model(x), out) > 25


def test_elementwise_tables_equal_the_float_op_and_keep_channels_last():
    """sigmoid, hardsigmoid, clamp, gelu on uint8 run as a 256-entry table: the same integers as the float path, on
    contiguous, channels-last and strided inputs; a tensor argument takes the float path."""
    from fxquant.backends.kernels import onednn_ops
    from fxquant.backends.kernels.onednn_ops import OpCall
    from fxquant.qparams import QParams

    grid = QParams(torch.tensor([0.05]), torch.tensor([100]), 0, 255)
    fixed = QParams(torch.tensor([1 / 256]), torch.tensor([0]), 0, 255)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(1, 4, 8, 8)
    cl = codes.contiguous(memory_format=torch.channels_last)
    cases = (("hardsigmoid", OpCall("call_module", nn.Hardsigmoid()), fixed, ()),
             ("sigmoid", OpCall("call_function", torch.sigmoid), fixed, ()),
             ("clamp", OpCall("call_method", "clamp"), grid, (0.0, 2.0)),
             ("gelu", OpCall("call_module", nn.GELU()), grid, ()))
    for entry, call, out, args in cases:
        op = onednn_ops.native(entry, call, grid, out)
        assert op.elementwise
        for x in (codes, cl, codes[:, :, ::2]):
            y = op(x, *args)
            assert torch.equal(y, op._float(x, args, {})), entry
        assert op(cl, *args).is_contiguous(memory_format=torch.channels_last)
    clamp = onednn_ops.native("clamp", OpCall("call_method", "clamp"), grid, grid)
    bound = torch.tensor(1.0)
    assert torch.equal(clamp(codes, bound), clamp._float(codes, (bound,), {}))  # tensor argument: the float path
    assert torch.equal(copy.deepcopy(clamp)(codes, 0.0, 2.0), clamp(codes, 0.0, 2.0))


def test_global_mean_on_onednn_is_within_one_step_of_the_exact_mean():
    """2-d global average pooling runs as oneDNN's depthwise conv with a ones kernel (float32 scaling): within one
    step of the exact rounded mean, and equal to it but for means half-way between two steps."""
    from fxquant.backends.kernels import onednn_ops
    from fxquant.qparams import QParams

    grid = QParams(torch.tensor([0.1]), torch.tensor([37]), 0, 255)
    pool = onednn_ops.GlobalMeanU8((2, 3), True, grid)
    flat = onednn_ops.GlobalMeanU8((2, 3), False, grid)
    gen = torch.Generator().manual_seed(0)
    for shape in ((1, 40, 14, 14), (3, 7, 9, 11), (1, 24, 56, 56)):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        n = x.shape[2] * x.shape[3]
        total = x.to(torch.float64).sum((2, 3), keepdim=True) - n * 37
        exact = ((total / n).round() + 37).clamp(0, 255).to(torch.uint8)
        halfway = (total.remainder(n) * 2 == n)
        for layout in (x, x.contiguous(memory_format=torch.channels_last)):
            y = pool(layout)
            assert y.shape == exact.shape and int((y.int() - exact.int()).abs().max()) <= 1
            assert torch.equal(y[~halfway], exact[~halfway])
            assert torch.equal(flat(layout), y.reshape(shape[:2]))
    assert torch.equal(copy.deepcopy(pool)(x), pool(x))


# ---------------------------------------------------------------------------------- 7-bit grids on oneDNN's kernels
class _SevenBit(nn.Module):
    """A conv + relu (hardtanh inside the kernel), a conv + hardswish (clamped after), a fused add, a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = torch.relu(self.a(x))
        b = F.hardswish(self.b(a))
        c = torch.relu(self.c(b) + b)
        return self.fc(c.mean((2, 3)))


def test_onednn_kernels_clamp_a_7_bit_grid_at_127_like_the_simulation():
    """On a 7-bit grid (the oneDNN table on a CPU without VNNI, or a reduce_range qconfig) oneDNN's kernels would
    write codes up to 255 for values beyond the calibrated range, which the simulation clamps at 127 and which the
    next conv's int16 pair sums (without VNNI) may not hold: every conv / linear output stays at or below 127."""
    table = make_x86_config(assume_onednn=True)
    qconfig = fxquant.get_default_qconfig(table)
    seven = fxquant.QConfig(activation=qconfig.activation.with_overrides(reduce_range=True), weight=qconfig.weight)
    mapping = fxquant.get_default_qconfig_mapping(table).set_global(seven)
    torch.manual_seed(0)
    model = _SevenBit().eval()
    x = torch.randn(2, 4, 8, 8)
    prepared = fxquant.prepare_fx(model, mapping, (x,), backend_config=table)
    fxquant.calibrate(prepared, [x], progress=False)
    q = fxquant.convert_fx(prepared)
    kernels = [m for m in q.modules() if isinstance(m, (OneDNNConv, OneDNNLinear))]
    assert {m.post.attr for m in kernels} >= {"relu", "hardswish"} and any(m.binary for m in kernels)
    codes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, y: codes.append(int(y.max()))) for m in kernels]
    wide = 3 * x  # far beyond the calibrated range
    with torch.no_grad():
        torch.backends.quantized.engine = "x86"
        out, sim = q(wide), fxquant.convert_to_reference_fx(prepared)(wide)
    for h in hooks:
        h.remove()
    assert len(codes) == len(kernels) and max(codes) == 127  # the top is reached, and never passed
    assert float((out - sim).abs().max()) / _output_step(q) <= 3.0 + 1e-4
