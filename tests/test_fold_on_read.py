"""Batch norm folded on read (fxquant/fused.py ``FoldedConv2d`` etc.): prepare keeps the float model's own conv
weights and computes the fold when the weight is read; writes, train mode, fuse_fx and convert's float copies turn
it into a plain conv holding the folded weights. Also the histogram observer's lazily allocated bins."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import fx, nn

import fxquant
from models import ConvBN, ConvBNReLU, LinearHead, SmallCNN, seeded
from fxquant import fused
from fxquant.observers import HistogramObserver

X2D = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
X1D = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
X_CNN = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))

FOLDED_TYPES = (fused.FoldedConv1d, fused.FoldedConv2d, fused.FoldedConv3d, fused.FoldedConvTranspose1d,
                fused.FoldedConvTranspose2d, fused.FoldedConvTranspose3d, fused.FoldedLinear)


def prepare(model: nn.Module, x: torch.Tensor, mapping=None) -> fx.GraphModule:
    mapping = fxquant.get_default_qconfig_mapping("fbgemm") if mapping is None else mapping
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.prepare_fx(model, mapping, (x,), backend_config="fbgemm")


def convert(prepared: fx.GraphModule) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.convert_fx(prepared, backend_config="fbgemm")


def calibrate(prepared: fx.GraphModule, x: torch.Tensor) -> None:
    fxquant.calibrate(prepared, [x], progress=False)


def folded_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if fused.is_folded_on_read(m)]


def state_clone(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"user model's {k} changed"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class ConvTBN(nn.Module):
    """conv transpose -> bn."""

    def __init__(self, cin: int = 4, cout: int = 4) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class TwoConvBN(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> bn2: conv2 can be left float while conv1 is quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


# (model factory, example input, path of the folded module in the prepared model, user's op name, user's bn name)
CASES = {
    "conv_bn_relu": (lambda: seeded(ConvBNReLU()), X2D, "conv.op", "conv", "bn", fused.FoldedConv2d),
    "conv_bn": (lambda: seeded(ConvBN()), X2D, "conv", "conv", "bn", fused.FoldedConv2d),
    "linear_bn1d": (lambda: seeded(LinearHead(relu=False)), X1D, "fc", "fc", "bn", fused.FoldedLinear),
}


def prepared_case(case: str):
    make, x, path, op_name, bn_name, folded_type = CASES[case]
    model = make()
    prepared = prepare(model, x)
    return model, x, prepared, prepared.get_submodule(path), model.get_submodule(op_name), \
        model.get_submodule(bn_name), folded_type


# ============================================================================================ 1. sharing + fold

@pytest.mark.parametrize("case", sorted(CASES))
def test_prepared_module_is_folded_shares_user_weight_and_reads_the_fold(case):
    model, x, prepared, mod, user_op, user_bn, folded_type = prepared_case(case)
    assert type(mod) is folded_type
    assert fused.is_folded_on_read(mod)
    assert fused.float_type(mod) is folded_type._float_type
    assert "bn_fold" in mod._buffers and mod._buffers["bn_fold"].shape == (3, user_bn.num_features)
    # the raw parameter is the user's weight memory, not a copy
    assert mod._parameters["weight"].data_ptr() == user_op.weight.data_ptr()
    assert mod._parameters["bias"].data_ptr() == user_op.bias.data_ptr()
    # the prepared model holds no other module named like the bn (it was folded away)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in prepared.modules())
    # a read computes exactly what fold_bn builds eagerly
    expected = fused.fold_bn(user_op, user_bn)
    assert torch.equal(mod.weight, expected.weight)
    assert torch.equal(mod.bias, expected.bias)
    # and not just the raw weight (the bn statistics are non-trivial)
    assert not torch.equal(mod.weight, user_op.weight.detach())
    # before calibration the observers pass values through: prepared == float model
    with torch.no_grad():
        assert rel_err(prepared(x), model(x)) <= 1e-5


def test_conv_without_bias_folds_bias_on_read():
    model = ConvBN()
    model.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    model = seeded(model)
    prepared = prepare(model, X2D)
    mod = prepared.conv
    assert type(mod) is fused.FoldedConv2d  # the folded bias lives in a zero bias of its own, not the user's
    assert torch.equal(mod._parameters["bias"].detach(), torch.zeros(4)) and model.conv.bias is None
    expected = fused.fold_bn(model.conv, model.bn)
    assert torch.equal(mod.weight, expected.weight)
    assert torch.equal(mod.bias, expected.bias)
    with torch.no_grad():
        assert rel_err(prepared(X2D), model(X2D)) <= 1e-5


# ============================================================================================= 2. in-place write

@pytest.mark.parametrize("case", sorted(CASES))
def test_in_place_write_into_a_read_weight_raises_and_user_model_is_unchanged(case):
    model, _, prepared, mod, user_op, _, folded_type = prepared_case(case)
    before = state_clone(model)
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            mod.weight.add_(1.0)
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            mod.bias.mul_(2.0)
    assert type(mod) is folded_type  # a failed write does not materialize
    assert_same_state(model, before)


# ========================================================================================= 3. assigning weights

@pytest.mark.parametrize("case", sorted(CASES))
def test_assigning_weight_materializes_and_leaves_user_model_alone(case):
    model, _, prepared, mod, user_op, user_bn, folded_type = prepared_case(case)
    before = state_clone(model)
    folded = fused.fold_bn(user_op, user_bn)
    new_weight = nn.Parameter(torch.full_like(user_op.weight, 0.25))
    mod.weight = new_weight
    assert type(mod) is folded_type._float_type
    assert not fused.is_folded_on_read(mod)
    assert "bn_fold" not in mod._buffers
    assert not any(k.endswith("bn_fold") for k in prepared.state_dict())
    assert mod.weight is new_weight
    # the bias became the folded bias, as its own parameter (not the user's)
    assert isinstance(mod.bias, nn.Parameter)
    assert torch.equal(mod.bias, folded.bias)
    assert mod.bias.data_ptr() != user_op.bias.data_ptr()
    assert_same_state(model, before)


def test_assigning_bias_materializes_with_the_folded_weight():
    model, _, prepared, mod, user_op, user_bn, _ = prepared_case("conv_bn")
    before = state_clone(model)
    folded = fused.fold_bn(user_op, user_bn)
    new_bias = nn.Parameter(torch.zeros(4))
    mod.bias = new_bias
    assert type(mod) is nn.Conv2d
    assert mod.bias is new_bias
    assert isinstance(mod.weight, nn.Parameter) and torch.equal(mod.weight, folded.weight)
    # a materialized weight is a normal tensor: writing it in place is allowed and does not reach the user model
    with torch.no_grad():
        mod.weight.add_(1.0)
    assert_same_state(model, before)


def test_materialize_folds_keeps_the_prepared_output():
    model = seeded(SmallCNN())
    prepared = prepare(model, X_CNN)
    assert folded_modules(prepared)
    with torch.no_grad():
        before = prepared(X_CNN)
    fused.materialize_folds(prepared)
    assert folded_modules(prepared) == []
    with torch.no_grad():
        assert rel_err(prepared(X_CNN), before) <= 1e-6


# ================================================================================ 4. state_dict round trip

def _calibrated_and_fresh():
    """A ConvBNReLU, its state, a calibrated prepared model of it and a fresh one."""
    model = seeded(ConvBNReLU())
    before = state_clone(model)
    p1 = prepare(model, X2D)
    calibrate(p1, X2D)
    return model, before, p1, prepare(model, X2D)


def test_prepared_state_dict_round_trip_leaves_user_model_alone():
    model, before, p1, p2 = _calibrated_and_fresh()
    sd = {k: v.detach().clone() for k, v in p1.state_dict().items()}
    assert "conv.op.bn_fold" in sd
    # different values than the user's model: must land in p2 only
    sd["conv.op.weight"] = sd["conv.op.weight"] + 1.0
    sd["conv.op.bias"] = sd["conv.op.bias"] - 0.5
    p2.load_state_dict(sd)
    assert_same_state(model, before)
    mod = p2.conv.op
    assert type(mod) is fused.FoldedConv2d
    assert torch.equal(mod._parameters["weight"], sd["conv.op.weight"])
    assert mod._parameters["weight"].data_ptr() != model.conv.weight.data_ptr()
    # the read fold uses the loaded raw weight
    scale = sd["conv.op.bn_fold"][0].reshape(-1, 1, 1, 1)
    assert torch.allclose(mod.weight, sd["conv.op.weight"] * scale)
    # calibrated observer state came along
    assert torch.equal(p2.conv_observer.histogram, p1.conv_observer.histogram)
    assert p2.conv_observer.qparams().scale == p1.conv_observer.qparams().scale


def test_prepared_state_dict_round_trip_same_values_gives_same_converted_model():
    model, before, p1, p2 = _calibrated_and_fresh()
    p2.load_state_dict(p1.state_dict())
    assert_same_state(model, before)
    with torch.no_grad():
        assert torch.equal(convert(p2)(X2D), convert(p1)(X2D))


# ================================================================================================ 5. train mode

def test_train_mode_materializes_and_leaves_user_model_alone():
    model = seeded(SmallCNN())
    before = state_clone(model)
    prepared = prepare(model, X_CNN)
    assert folded_modules(prepared)
    prepared.train()
    out = prepared(X_CNN)
    assert folded_modules(prepared) == []
    # the folded weights are now the prepared model's own parameters, trainable
    params = dict(prepared.named_parameters())
    assert any(p.requires_grad for p in params.values())
    out.sum().backward()
    with torch.no_grad():
        for p in prepared.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    assert_same_state(model, before)
    assert all(p.data_ptr() not in {q.data_ptr() for q in model.parameters()} for p in prepared.parameters())


def test_a_materialized_model_loads_a_state_dict_saved_before_it_materialized():
    """A state dict with the unfolded weights and their bn_fold rows (saved from a prepared model) loads into a
    model whose folds have materialized (trained since): the weights are folded on load, as a read folds them."""
    model = seeded(SmallCNN())
    saved_from = prepare(model, X_CNN)
    calibrate(saved_from, X_CNN)
    saved = {k: v.detach().clone() for k, v in saved_from.state_dict().items()}
    assert any(k.endswith("bn_fold") for k in saved)
    materialized = prepare(model, X_CNN)
    materialized.train()
    materialized(X_CNN)
    assert folded_modules(materialized) == []
    materialized.load_state_dict(saved)   # strict: no unexpected bn_fold keys
    materialized.eval()
    with torch.no_grad():
        assert torch.allclose(materialized(X_CNN), saved_from(X_CNN), rtol=1e-5, atol=1e-6)
    broken = {k: v for k, v in saved.items() if not k.endswith(".bias") or k.replace(".bias", ".bn_fold") not in saved}
    with pytest.raises(RuntimeError, match="bn_fold.*came without.*bias"):
        materialized.load_state_dict(broken)


class ConvThenConvBN(nn.Module):
    """a plain conv (trainable weight, not folded) feeding conv -> bn: the folded conv's input requires grad."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.c0(x)))


def test_eval_forward_with_grad_enabled_through_folded_conv():
    model = seeded(ConvThenConvBN())
    prepared = prepare(model, X2D)
    assert type(prepared.conv) is fused.FoldedConv2d
    out = prepared(X2D)  # e.g. a hand-written calibration loop without torch.no_grad()
    assert rel_err(out.detach(), model(X2D).detach()) <= 1e-5


def test_input_gradient_through_prepared_eval_model():
    model = seeded(SmallCNN())
    prepared = prepare(model, X_CNN)
    x1, x2 = X_CNN.clone().requires_grad_(), X_CNN.clone().requires_grad_()
    prepared(x1).sum().backward()
    model(x2).sum().backward()
    assert rel_err(x1.grad, x2.grad) <= 1e-4


def test_optimizer_built_before_train_forward_updates_folded_convs():
    model = seeded(SmallCNN())
    prepared = prepare(model, X_CNN)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    prepared.train()
    w0 = prepared.conv2.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        prepared(X_CNN).sum().backward()
        opt.step()
    assert type(prepared.conv2) is nn.Conv2d
    assert any(q is prepared.conv2.weight for g in opt.param_groups for q in g["params"])
    assert not torch.equal(prepared.conv2.weight.detach(), w0)


# ======================================================================================== 6. convert float copy

def test_convert_with_conv_left_float_gives_plain_conv():
    model = seeded(ConvBN())
    mapping = fxquant.get_default_qconfig_mapping("fbgemm").set_module_name("conv", None)
    prepared = prepare(model, X2D, mapping)
    assert type(prepared.conv) is fused.FoldedConv2d
    calibrate(prepared, X2D)
    converted = convert(prepared)
    assert type(converted.conv) is nn.Conv2d
    assert "bn_fold" not in converted.conv._buffers
    assert converted.conv.weight.data_ptr() != model.conv.weight.data_ptr()
    assert type(prepared.conv) is fused.FoldedConv2d  # the prepared model is not modified
    with torch.no_grad():
        assert rel_err(converted(X2D), model(X2D)) <= 1e-5


def test_convert_with_second_conv_left_float_among_quantized():
    model = seeded(TwoConvBN())
    mapping = fxquant.get_default_qconfig_mapping("fbgemm").set_module_name("conv2", None)
    prepared = prepare(model, X2D, mapping)
    calibrate(prepared, X2D)
    converted = convert(prepared)
    mods = dict(converted.named_modules())
    assert type(mods["conv2"]) is nn.Conv2d
    assert not folded_modules(converted)
    folded = fused.fold_bn(model.conv2, model.bn2)
    assert torch.equal(mods["conv2"].weight, folded.weight)
    assert torch.equal(mods["conv2"].bias, folded.bias)
    with torch.no_grad():
        # conv1 is quantized: close, not exact
        assert rel_err(converted(X2D), model(X2D)) <= 0.05


# ===================================================================================================== 7. fuse_fx

@pytest.mark.parametrize("make, x", [
    (lambda: seeded(SmallCNN()), X_CNN),
    (lambda: seeded(ConvBNReLU()), X2D),
    (lambda: seeded(ConvBN()), X2D),
    (lambda: seeded(LinearHead(relu=False)), X1D),
])
def test_fuse_fx_returns_plain_modules(make, x):
    model = make()
    before = state_clone(model)
    fused_model = fxquant.fuse_fx(model)
    assert folded_modules(fused_model) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused_model.modules())
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in fused_model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert all(isinstance(m._parameters.get("weight"), nn.Parameter) for m in fused_model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))
    with torch.no_grad():
        assert rel_err(fused_model(x), model(x)) <= 1e-5
    assert_same_state(model, before)


# ============================================================================================= 8. save / load

def test_torch_save_load_of_calibrated_prepared_model_converts_the_same():
    model = seeded(SmallCNN())
    prepared = prepare(model, X_CNN)
    calibrate(prepared, X_CNN)
    names = folded_modules(prepared)
    assert names
    buf = io.BytesIO()
    torch.save(prepared, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert folded_modules(loaded) == names
    for name in names:
        a, b = prepared.get_submodule(name), loaded.get_submodule(name)
        assert type(a) is type(b)
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    with torch.no_grad():
        expected = convert(prepared)(X_CNN)
        got = convert(loaded)(X_CNN)
    assert torch.equal(got, expected)


# ========================================================================================= 9. histogram observer

def test_histogram_observer_allocates_bins_on_first_batch():
    obs = HistogramObserver(bins=128)
    assert obs.histogram.numel() == 0
    obs(torch.randn(100, generator=torch.Generator().manual_seed(3)))
    assert obs.histogram.numel() == 128
    assert int(obs.histogram.sum()) == 100


def test_histogram_observer_state_dict_into_fresh_observer():
    calibrated = HistogramObserver(bins=256)
    calibrated(torch.randn(1000, generator=torch.Generator().manual_seed(4)))
    calibrated(torch.randn(1000, generator=torch.Generator().manual_seed(5)) * 2)
    fresh = HistogramObserver(bins=256)
    fresh.load_state_dict(calibrated.state_dict())
    assert torch.equal(fresh.histogram, calibrated.histogram)
    a, b = fresh.qparams(), calibrated.qparams()
    assert torch.equal(torch.as_tensor(a.scale), torch.as_tensor(b.scale))
    assert torch.equal(torch.as_tensor(a.zero_point), torch.as_tensor(b.zero_point))
    # the loaded histogram is the fresh observer's own (not aliased to the source)
    fresh(torch.randn(10))
    assert int(calibrated.histogram.sum()) == 2000


def test_fresh_histogram_observers_do_not_share_written_bins():
    a, b = HistogramObserver(bins=64), HistogramObserver(bins=64)
    a(torch.randn(50, generator=torch.Generator().manual_seed(6)))
    assert a.histogram.numel() == 64 and int(a.histogram.sum()) == 50
    assert b.histogram.numel() == 0
    assert not b.has_data
    c = HistogramObserver(bins=64)
    assert c.histogram.numel() == 0
    b(torch.randn(20, generator=torch.Generator().manual_seed(7)))
    assert int(a.histogram.sum()) == 50 and int(b.histogram.sum()) == 20
    assert a.histogram.data_ptr() != b.histogram.data_ptr()


def test_histogram_observer_reset_then_observe_again():
    obs = HistogramObserver(bins=32)
    obs.reset()  # on the empty histogram
    assert obs.histogram.numel() == 0
    obs(torch.randn(40))
    obs.reset()
    assert not obs.has_data
    obs(torch.randn(30))
    assert obs.histogram.numel() == 32 and int(obs.histogram.sum()) == 30
    other = HistogramObserver(bins=32)
    assert other.histogram.numel() == 0


def test_prepared_model_observers_start_empty_and_fill_on_calibration():
    model = seeded(SmallCNN())
    prepared = prepare(model, X_CNN)
    hist = [m for m in prepared.modules() if isinstance(m, HistogramObserver)]
    assert hist and all(m.histogram.numel() == 0 for m in hist)
    calibrate(prepared, X_CNN)
    assert all(m.histogram.numel() == m.bins for m in hist)
    assert len({m.histogram.data_ptr() for m in hist}) == len(hist)


# ========================================================================================= 10. conv transpose

@pytest.mark.parametrize("cin, cout", [(4, 4), (3, 5)])
def test_conv_transpose_bn_folds_on_the_output_channel_axis(cin, cout):
    model = seeded(ConvTBN(cin, cout))
    x = torch.randn(2, cin, 6, 6, generator=torch.Generator().manual_seed(8))
    prepared = prepare(model, x)
    mod = prepared.get_submodule("conv")
    if not fused.is_folded_on_read(mod):
        pytest.skip(f"fbgemm does not fuse ConvTranspose2d + BatchNorm2d (got {type(mod).__name__})")
    assert type(mod) is fused.FoldedConvTranspose2d
    assert mod._parameters["weight"].data_ptr() == model.conv.weight.data_ptr()
    expected = fused.fold_bn(model.conv, model.bn)
    assert torch.equal(mod.weight, expected.weight)
    assert torch.equal(mod.bias, expected.bias)
    # the fold scales dim 1 (out channels) of a transposed conv's weight
    scale = (model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)).detach()
    assert torch.allclose(mod.weight, model.conv.weight.detach() * scale.reshape(1, -1, 1, 1))
    with torch.no_grad():
        assert rel_err(prepared(x), model(x)) <= 1e-5
    calibrate(prepared, x)
    converted = convert(prepared)
    with torch.no_grad():
        assert rel_err(converted(x), model(x)) <= 0.05
    # convert's float copy, fuse_fx and materialize agree with the float model too
    fused_model = fxquant.fuse_fx(model)
    assert type(fused_model.conv) is nn.ConvTranspose2d
    with torch.no_grad():
        assert rel_err(fused_model(x), model(x)) <= 1e-5


# ================================================================================== review fixes (helper-22)

class _TwoConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.b, self.bn_b = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_b(self.b(torch.relu(self.bn_a(self.a(x)))))


def test_save_and_load_of_a_prepared_model_after_bias_correction(tmp_path):
    model = seeded(_TwoConvBN())
    x = torch.randn(2, 3, 8, 8)
    prepared = prepare(model, x)
    fxquant.calibrate(prepared, [x], progress=False)
    fxquant.correct_bias(prepared, [x])  # assigns biases: the folded convs become plain convs
    assert not any(fused.is_folded_on_read(m) for m in prepared.modules())
    path = tmp_path / "prepared.pt"
    fxquant.save(prepared, path)
    loaded = fxquant.load(path, lambda: seeded(_TwoConvBN()))  # prepares afresh (folded), then loads plain weights
    with torch.no_grad():
        assert torch.equal(fxquant.convert_fx(loaded)(x), fxquant.convert_fx(prepared)(x))


def test_load_state_dict_with_assign_keeps_the_batch_norm():
    model = seeded(ConvBN())
    prepared, other = prepare(model, X2D), prepare(model, X2D)
    prepared.load_state_dict(other.state_dict(), assign=True)
    assert type(prepared.conv) is fused.FoldedConv2d and "bn_fold" in prepared.conv._buffers
    with torch.no_grad():
        assert rel_err(prepared(X2D), model(X2D)) <= 1e-5


class _TiedConvBN(_TwoConvBN):
    def __init__(self) -> None:
        super().__init__()
        self.b.weight = self.a.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x))


def test_tied_weights_are_folded_into_parameters_of_their_own():
    model = seeded(_TiedConvBN())
    for bn in (model.bn_a, model.bn_b):
        bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        for gm in (fxquant.fuse_fx(model), prepare(model, X2D)):
            assert rel_err(gm(X2D), model(X2D)) <= 1e-5
            assert gm.a.weight is not gm.b.weight
    prepared = prepare(model, X2D)
    prepared.train()
    with torch.no_grad():
        prepared(X2D)  # train mode materializes every fold
        prepared.eval()
        assert rel_err(prepared(X2D), model(X2D)) <= 1e-5


def test_linear_bn1d_with_a_dynamic_qconfig_gets_the_dynamic_kernel():
    model = seeded(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)))
    x = torch.randn(4, 8)
    mapping = fxquant.QConfigMapping().set_global(fxquant.default_dynamic_qconfig)
    prepared = fxquant.prepare_fx(model, mapping, (x,), backend_config="fbgemm")
    converted = fxquant.convert_fx(prepared)
    from fxquant.report import float_ops

    assert not float_ops(converted), float_ops(converted)


def test_histogram_first_batch_under_inference_mode_allows_later_batches():
    from fxquant.observers import HistogramObserver

    obs = HistogramObserver(bins=64)
    with torch.inference_mode():
        obs(torch.randn(100))
    obs(torch.randn(100))
    obs.reset()
    obs(torch.randn(50))
    assert int(obs.histogram.sum()) == 50


def test_reference_model_keeps_float_convs_as_plain_convs():
    model = seeded(ConvBN())
    mapping = fxquant.get_default_qconfig_mapping("fbgemm").set_module_name("conv", None)
    prepared = prepare(model, X2D, mapping)
    fxquant.calibrate(prepared, [X2D], progress=False)
    ref = fxquant.convert_to_reference_fx(prepared)
    assert not any(fused.is_folded_on_read(m) for m in ref.modules())
    assert type(prepared.conv) is fused.FoldedConv2d  # the prepared model is not changed


def test_per_channel_observer_first_batch_under_inference_mode_allows_later_batches():
    from fxquant.observers import PerChannelMinMaxObserver

    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    with torch.inference_mode():
        obs(torch.randn(4, 10))
    obs(torch.full((4, 10), 100.0))
    assert torch.equal(obs.max_val, torch.full((4,), 100.0))


class _ReadsItsWeights(nn.Module):
    def __init__(self, relu: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x))) + self.conv.bias.sum() + self.conv.weight.mean()


@pytest.mark.parametrize("relu", [nn.ReLU(), nn.Identity()], ids=["relu", "none"])
def test_a_conv_whose_weights_the_forward_reads_is_not_fused(relu):
    """Fusion would change what ``self.conv.weight`` reads (the folded weight) or remove it (ConvReLU2d.op)."""
    model = seeded(_ReadsItsWeights(relu))
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    prepared = prepare(model, x)
    assert type(prepared.conv) is nn.Conv2d  # not folded: its weights stay what the forward reads
    with torch.no_grad():
        assert rel_err(prepared(x), model(x)) <= 1e-6
        assert rel_err(fxquant.fuse_fx(model)(x), model(x)) <= 1e-6
        assert rel_err(fxquant.equalize(model)(x), model(x)) <= 1e-5
    fxquant.calibrate(prepared, [x], progress=False)
    with torch.no_grad():
        assert fxquant.sqnr(model(x), fxquant.convert_fx(prepared)(x)) > 20


def test_an_optimizer_step_in_eval_mode_leaves_the_users_model_alone():
    """Fine-tuning with frozen batch norms runs in eval mode: gradients alone make the prepared model copy the
    float weights it reads, before an optimizer can write into them."""
    model = seeded(SmallCNN())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare(model, X_CNN)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    prepared(X_CNN).sum().backward()  # eval mode, gradients enabled
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not torch.equal(prepared.fc2.weight.detach(), model.fc2.weight)  # the step changed the prepared copy


def test_qat_still_swaps_a_conv_whose_weights_the_forward_reads():
    """QAT modules keep the conv's own weight, so the read means the same; the conv must get its weight fake
    quantizer (a plain conv would train without it and still be converted to int8)."""
    model = seeded(_ReadsItsWeights(nn.Identity())).train()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare_qat_fx(model, fxquant.get_default_qat_qconfig_mapping("fbgemm"), (x,),
                                          backend_config="fbgemm")
    assert type(prepared.conv) is not nn.Conv2d and getattr(prepared.conv, "weight_fake_quant", None) is not None


def test_per_channel_calibrators_first_batch_under_inference_mode_allow_later_batches():
    from fxquant.calibrators import PerChannelMSEObserver

    obs = PerChannelMSEObserver()
    with torch.inference_mode():
        obs(torch.randn(4, 100))
    obs(torch.randn(4, 100))
    assert obs.qparams().scale.numel() == 4
