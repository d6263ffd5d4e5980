"""AdaRound (``fxquant.adaround``): each weight rounded up or down to minimise its layer's output error.

The model is an MLP trained on scikit-learn's digits (real data: the calibration batches are training images, the
score is on the held-out test images); 4-bit weights (``bench_qat.weight_4bit``, per channel) make the rounding
matter, as in the AdaRound paper.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bench_qat
import fxquant
from fxquant.errors import CalibrationError
from fxquant.passes import convert_pipeline
from fxquant.passes.adaround import AdaRoundConfig, AdaRoundPass, adaround
from fxquant.passes.context import RECORD_KEY
from fxquant.qconfig import QConfig, QConfigMapping

BACKEND = "fbgemm"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Training and AdaRound's steps give other floats with another thread count (reduction order): the figures
    asserted below are for one thread, as the benchmark measures them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_mlp(one_thread):
    """``(trained MLP, calibration batches, held-out inputs)``."""
    x, y, x_test, _ = bench_qat.digits()
    x, x_test = x.flatten(1), x_test.flatten(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), list(x[:256].split(64)), x_test


def _prepared(model: nn.Module, calib: list[torch.Tensor], bits: int = 4) -> torch.fx.GraphModule:
    qconfig = fxquant.get_default_qconfig(BACKEND)
    if bits == 4:
        qconfig = QConfig(activation=qconfig.activation, weight=bench_qat.weight_4bit(False))
    prepared = fxquant.prepare_fx(model, QConfigMapping().set_global(qconfig), (calib[0],), backend_config=BACKEND)
    fxquant.calibrate(prepared, calib, progress=False)
    return prepared


def _sqnr(model: nn.Module, quantized: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return fxquant.sqnr(model(x), quantized(x))


def test_adaround_beats_nearest_rounding_on_held_out_digits(digits_mlp, restore_engine):
    model, calib, x_test = digits_mlp
    torch.backends.quantized.engine = BACKEND
    nearest = fxquant.convert_fx(_prepared(model, calib))
    prepared = _prepared(model, calib)
    report = adaround(prepared, calib, 300, progress=False)
    assert set(report.layers) == {"0", "2", "4"} and report.batches == 4
    for r in report.layers.values():
        assert r.kept and r.adaround_error < r.nearest_error and 0.0 < r.flipped < 0.5
    rounded = fxquant.convert_fx(prepared)
    assert _sqnr(model, rounded, x_test) > _sqnr(model, nearest, x_test) + 1.5


def test_every_code_is_the_floor_or_the_ceiling_of_the_float_weight(digits_mlp, restore_engine):
    """The int8 model holds exactly the rounding AdaRound chose, on the grid it chose it on (pinned): each code is
    one of the two grid points around the float weight, and some are not the nearest one."""
    model, calib, _ = digits_mlp
    torch.backends.quantized.engine = BACKEND
    prepared = _prepared(model, calib)
    adaround(prepared, calib, 100, progress=False)
    pinned = {str(n.target): n.meta[RECORD_KEY].weight_qparams for n in prepared.graph.nodes if n.op == "call_module"
              and n.meta.get(RECORD_KEY) is not None and n.meta[RECORD_KEY].weight_qparams is not None}
    assert set(pinned) == {"0", "2", "4"}
    quantized = fxquant.convert_fx(prepared)
    flipped = 0
    for name, qp in pinned.items():
        w_q = quantized.get_submodule(name).weight
        assert torch.equal(w_q.q_per_channel_scales().float(), qp.scale.float())
        scaled = model.get_submodule(name).weight.detach() / qp.scale.reshape(-1, 1)
        codes = w_q.int_repr().float()
        lo, hi = scaled.floor().clamp(qp.quant_min, qp.quant_max), scaled.ceil().clamp(qp.quant_min, qp.quant_max)
        assert bool(((codes == lo) | (codes == hi)).all())
        flipped += int((codes != scaled.round().clamp(qp.quant_min, qp.quant_max)).sum())
    assert flipped > 0


def test_the_user_model_is_left_alone_and_bias_correction_keeps_the_grid(digits_mlp, restore_engine):
    model, calib, x_test = digits_mlp
    torch.backends.quantized.engine = BACKEND
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = _prepared(model, calib)
    adaround(prepared, calib, 50, progress=False)
    after_ada = copy.deepcopy(prepared)
    fxquant.correct_bias(prepared, calib, progress=False)
    untouched = _prepared(model, calib)
    backup = copy.deepcopy(untouched)
    adaround(untouched, calib, 5, progress=False)  # a deepcopy taken before keeps its own records: nothing pinned
    assert not any(n.meta[RECORD_KEY].weight_qparams for n in backup.graph.nodes if RECORD_KEY in n.meta)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    q_ada, q_both = fxquant.convert_fx(after_ada), fxquant.convert_fx(prepared)
    for name in ("0", "2", "4"):  # bias correction changes biases only: the rounded weights stay as chosen
        assert torch.equal(q_ada.get_submodule(name).weight.int_repr(), q_both.get_submodule(name).weight.int_repr())
        assert torch.equal(q_both.get_submodule(name).weight.q_per_channel_scales().float(),
                           next(n.meta[RECORD_KEY].weight_qparams.scale.float() for n in prepared.graph.nodes
                                if str(n.target) == name))
    assert _sqnr(model, q_both, x_test) > 15


def test_adaround_is_deterministic_and_a_convert_pass(digits_mlp, restore_engine):
    model, calib, x_test = digits_mlp
    torch.backends.quantized.engine = BACKEND
    cfg = AdaRoundConfig(iterations=60, seed=3)
    a, b = _prepared(model, calib), _prepared(model, calib)
    adaround(a, calib, config=cfg, progress=False)
    pm = convert_pipeline(verify=False)  # the verifiers expect a lowered graph after every pass
    pm.insert_before("lower", AdaRoundPass(tuple(calib), cfg))
    qa, qb = fxquant.convert_fx(a), fxquant.convert_fx(b, pipeline=pm)
    with torch.no_grad():
        assert torch.equal(qa(x_test), qb(x_test))


def test_adaround_on_a_conv_net_with_folded_batch_norms(restore_engine):
    """Convs that fold their batch norm on read, a fused ReLU, a depthwise conv (fbgemm's 7-bit weight range)."""
    torch.backends.quantized.engine = BACKEND
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1)).eval()
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    prepared = _prepared(model, calib, bits=8)
    report = adaround(prepared, calib, 60, progress=False)
    assert len(report.layers) == 3 and any(r.kept for r in report.layers.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    depthwise = next(n.meta[RECORD_KEY].weight_qparams for n in prepared.graph.nodes
                     if n.op == "call_module" and getattr(getattr(prepared.get_submodule(str(n.target)), "op", None), "groups", 1) == 16)
    assert (depthwise.quant_min, depthwise.quant_max) == (-64, 63)
    quantized = fxquant.convert_fx(copy.deepcopy(prepared))
    reference = fxquant.convert_to_reference_fx(prepared)
    assert _sqnr(model, quantized, calib[0]) > 20
    # each conv's codes: the floor or ceiling of the batch-norm-folded float weight on the pinned grid, the same
    # in the int8 model and in the reference model (which stores them as integers)
    for (conv, bn), name in (((model[0], model[1]), "0"), ((model[3], model[4]), "3"), ((model[6], None), "6")):
        w = conv.weight.detach()
        if bn is not None:
            w = w * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().reshape(-1, 1, 1, 1)
        qp = next(n.meta[RECORD_KEY].weight_qparams for n in prepared.graph.nodes if str(n.target) == name)
        scaled = w / qp.scale.reshape(-1, 1, 1, 1)
        codes = quantized.get_submodule(name).weight.int_repr().float()
        assert bool(((codes == scaled.floor().clamp(qp.quant_min, qp.quant_max))
                     | (codes == scaled.ceil().clamp(qp.quant_min, qp.quant_max))).all()), name
        assert torch.equal(codes, getattr(reference, f"{name}_weight_int").float()), name


def test_adaround_errors(digits_mlp):
    model, calib, _ = digits_mlp
    with pytest.raises(CalibrationError, match="adaround expects a calibrated model from fxquant.prepare_fx"):
        adaround(model, calib)
    prepared = _prepared(model, calib)
    with pytest.raises(CalibrationError, match="adaround: data is one tensor"):
        adaround(prepared, calib[0])
    with pytest.raises(CalibrationError, match="no calibration batch"):
        adaround(prepared, [])
    with pytest.raises(ValueError, match="iterations >= 1"):
        adaround(prepared, calib, 0)
    with pytest.raises(ValueError, match="warmup"):
        AdaRoundConfig(warmup=1.0)
    assert adaround(prepared, calib, 3, config=AdaRoundConfig(iterations=1000), progress=False).layers  # 3 wins


def test_saved_and_loaded_the_rounding_survives(digits_mlp, restore_engine, tmp_path):
    """fxquant.save / load and torch.save keep the pinned grids: converting the loaded model gives the same codes
    (a grid observed again from the rounded weights would round them a second time)."""
    model, calib, x_test = digits_mlp
    torch.backends.quantized.engine = BACKEND
    prepared = _prepared(model, calib)
    adaround(prepared, calib, 60, progress=False)
    fxquant.save(prepared, tmp_path / "p.fxq")
    torch.save(prepared, tmp_path / "p.pt")
    expected = fxquant.convert_fx(copy.deepcopy(prepared))
    for loaded in (fxquant.load(tmp_path / "p.fxq", model), torch.load(tmp_path / "p.pt", weights_only=False)):
        again = fxquant.convert_fx(loaded)
        for name in ("0", "2", "4"):
            assert torch.equal(again.get_submodule(name).weight.int_repr(), expected.get_submodule(name).weight.int_repr())
        with torch.no_grad():
            assert torch.equal(again(x_test), expected(x_test))


def test_a_module_called_twice_is_rounded_once(restore_engine):
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    torch.backends.quantized.engine = BACKEND
    torch.manual_seed(0)
    model = Twice().eval()
    calib = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    prepared = _prepared(model, calib)
    report = adaround(prepared, calib, 40, progress=False)
    grids = [n.meta[RECORD_KEY].weight_qparams for n in prepared.graph.nodes if n.op == "call_module"
             and n.meta.get(RECORD_KEY) is not None and n.meta[RECORD_KEY].weight_qparams is not None]
    assert len(grids) == 2 and grids[0] is grids[1] and list(report.layers) == ["fc"]
    weight = prepared.get_submodule("fc").weight.detach() / grids[0].scale.reshape(-1, 1)
    assert torch.allclose(weight, weight.round(), atol=1e-4)  # on the first visit's grid, not rounded on another


def test_adaround_runs_under_inference_mode_and_refuses_qat(digits_mlp, restore_engine):
    model, calib, _ = digits_mlp
    torch.backends.quantized.engine = BACKEND
    prepared = _prepared(model, calib)
    with torch.inference_mode():
        report = adaround(prepared, calib, 20, progress=False)
    assert set(report.layers) == {"0", "2", "4"}
    qat = fxquant.prepare_qat_fx(copy.deepcopy(model).train(), fxquant.get_default_qat_qconfig_mapping(BACKEND),
                                 (calib[0],), backend_config=BACKEND)
    with pytest.raises(CalibrationError, match="adaround is for post-training quantization"):
        adaround(qat, calib, 5)
