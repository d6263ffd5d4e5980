"""Quantization-aware training: QAT module numerics and gradients, BN folding, freezing, the trainable fake
quantizers, prepare_qat_fx -> train -> convert_fx agreement, errors, devices, and a short digits run."""

from __future__ import annotations

import copy
import io
import sys
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxquant
from fxquant import fused, qat
from fxquant.errors import FxQuantError
from fxquant.fake_quantize import FakeQuantize, is_observer
from fxquant.observers import (FixedQParamsObserver, MinMaxObserver, MovingAverageMinMaxObserver,
                               MovingAveragePerChannelMinMaxObserver)
from fxquant.qparams import fake_quantize
from fxquant.report import float_ops
from models import restore_engine  # noqa: F401

BACKEND = "x86"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread is faster, and immune to the machine's other load (2 threads on a busy
    2-core machine made a training step ~15x slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def qat_qconfig() -> fxquant.QConfig:
    return fxquant.get_default_qat_qconfig(BACKEND)


def random_bn(bn: nn.modules.batchnorm._BatchNorm, seed: int = 0) -> nn.Module:
    """A batch norm with non-trivial affine parameters and running statistics."""
    g = gen(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return bn


def out_channel_fq(w: torch.Tensor, fq: FakeQuantize) -> torch.Tensor:
    """``w`` fake-quantized with ``fq``'s current qparams (no observation)."""
    return fake_quantize(w, fq.qparams())


class Net(nn.Module):
    """conv-bn-relu, conv-bn + residual add-relu, pool, linear-bn1d-relu, linear: every QAT fusion kind in 2-d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc1, self.bn3 = nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)) + x)
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn3(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


X = torch.randn(16, 3, 8, 8, generator=gen(1))


def prepared_net(mapping=None, seed: int = 0, backend: str = BACKEND) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    model = Net().train()
    return fxquant.prepare_qat_fx(model, mapping or fxquant.get_default_qat_qconfig_mapping(backend), (X,),
                                  backend_config=backend)


def train_steps(model: nn.Module, steps: int = 8, optimizer: type = torch.optim.SGD, **kwargs) -> list[float]:
    kwargs.setdefault("lr", 0.05)
    opt = optimizer(model.parameters(), **kwargs)
    g, losses = gen(2), []
    target = torch.randint(0, 5, (16,), generator=g)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, generator=g)
        loss = F.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ============================================================================== QAT modules: numerics, STE

def test_qat_conv_forward_is_conv_with_fake_quantized_weight():
    conv = nn.Conv2d(3, 6, 3, padding=1)
    m = qat.Conv2d.from_float(conv, qconfig=qat_qconfig())
    x = torch.randn(2, 3, 8, 8, generator=gen())
    y = m(x)  # first call: the weight fake quant observes the weight, then applies its qparams
    expected = F.conv2d(x, out_channel_fq(conv.weight, m.weight_fake_quant), conv.bias, padding=1)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert m.weight is conv.weight  # parameters are shared, not copied
    assert m.weight_fake_quant.is_per_channel and m.weight_fake_quant.scale.shape == (6,)
    q = torch.round(out_channel_fq(conv.weight, m.weight_fake_quant) / m.weight_fake_quant.scale.reshape(-1, 1, 1, 1))
    assert q.min() >= -128 and q.max() <= 127 and len(q.unique()) > 100  # weights really sit on the int8 grid


def test_qat_linear_relu_forward_and_to_float():
    lin = nn.Linear(10, 4)
    m = qat.LinearReLU.from_float(lin, qconfig=qat_qconfig())
    x = torch.randn(5, 10, generator=gen())
    y = m(x)
    torch.testing.assert_close(y, F.relu(F.linear(x, out_channel_fq(lin.weight, m.weight_fake_quant), lin.bias)))
    f = m.to_float()
    assert isinstance(f, fused.LinearReLU) and isinstance(f.op, nn.Linear)
    assert f.op.weight is not lin.weight and torch.equal(f.op.weight, lin.weight)


def in_grid(w: torch.Tensor, fq: FakeQuantize) -> torch.Tensor:
    """1 where ``w`` rounds inside ``fq``'s integer range (the straight-through estimator's mask), else 0."""
    qp = fq.qparams()
    shape = [-1] + [1] * (w.dim() - 1)
    q = torch.round(w / qp.scale.reshape(shape)) + qp.zero_point.reshape(shape)
    return ((q >= qp.quant_min) & (q <= qp.quant_max)).to(w.dtype)


def test_weight_gradient_is_straight_through():
    """d loss / d w equals the float gradient at the fake-quantized weight wherever the weight is on the grid.

    With symmetric qparams ``scale = max|w| / 127.5`` the largest positive weight rounds to 128 and is clamped to
    127: it (alone) gets no gradient, exactly as torch's fake-quant kernels define the estimator.
    """
    torch.manual_seed(0)
    lin = nn.Linear(10, 4)
    m = qat.Linear.from_float(lin, qconfig=qat_qconfig())
    x = torch.randn(5, 10, generator=gen())
    m(x)
    fxquant.disable_observer(m)
    g_out = torch.randn(5, 4, generator=gen(3))
    m(x).backward(g_out)
    mask = in_grid(lin.weight.detach(), m.weight_fake_quant)
    assert int((mask == 0).sum()) <= 4  # at most the positive extreme of each channel
    torch.testing.assert_close(lin.weight.grad, (g_out.t() @ x) * mask)
    wq = out_channel_fq(lin.weight.detach(), m.weight_fake_quant).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    F.linear(xr, wq, lin.bias.detach()).backward(g_out)
    x2 = x.clone().requires_grad_(True)
    m(x2).backward(g_out)
    torch.testing.assert_close(x2.grad, xr.grad)


def test_activation_fake_quant_gradient_is_zero_where_clamped():
    fq = FakeQuantize(observer=MinMaxObserver, dtype=torch.quint8)
    fq(torch.tensor([0.0, 1.0]))  # range [0, 1]
    fq.disable_observer()
    x = torch.tensor([-0.5, 0.2, 0.7, 1.5], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_bn_with_fake_quant_off_trains_exactly_like_float_conv_bn(dims, relu):
    """Simulated folding with fake quant disabled is the float conv + batch norm: outputs, gradients, statistics."""
    conv_t = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn_t = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    torch.manual_seed(0)
    conv, bn = conv_t(3, 4, 3, padding=1), random_bn(bn_t(4))
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    cls = {(1, False): qat.ConvBn1d, (2, False): qat.ConvBn2d, (3, False): qat.ConvBn3d,
           (1, True): qat.ConvBnReLU1d, (2, True): qat.ConvBnReLU2d, (3, True): qat.ConvBnReLU3d}[dims, relu]
    m = cls.from_float(conv, bn, qconfig=qat_qconfig()).train()
    fxquant.disable_fake_quant(m)
    x = torch.randn(*(4, 3) + (6,) * dims, generator=gen())
    y = m(x)
    y_ref = ref_bn(ref_conv(x))
    y_ref = F.relu(y_ref) if relu else y_ref
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for a, b in ((conv.weight, ref_conv.weight), (conv.bias, ref_conv.bias), (bn.weight, ref_bn.weight),
                 (bn.bias, ref_bn.bias)):  # (the conv bias gradient is 0 up to rounding: bn removes the mean)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)


def test_linear_bn_with_fake_quant_off_is_float_linear_bn():
    torch.manual_seed(0)
    lin, bn = nn.Linear(6, 5), random_bn(nn.BatchNorm1d(5))
    ref = nn.Sequential(copy.deepcopy(lin), copy.deepcopy(bn), nn.ReLU()).train()
    m = fxquant.disable_fake_quant(qat.LinearBnReLU1d.from_float(lin, bn, qconfig=qat_qconfig()).train())
    x = torch.randn(8, 6, generator=gen())
    torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)
    m.eval(), ref.eval()
    torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.to_float()(x), ref(x), rtol=1e-4, atol=1e-5)


# ======================================================================================= BN folding, freeze

@pytest.mark.parametrize("cls,dims", [(qat.ConvBn1d, 1), (qat.ConvBn2d, 2), (qat.ConvBnReLU2d, 2), (qat.ConvBn3d, 3)])
def test_conv_bn_in_eval_is_the_folded_conv(cls, dims):
    conv_t = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn_t = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    torch.manual_seed(0)
    conv, bn = conv_t(3, 4, 3, padding=1), random_bn(bn_t(4)).eval()
    folded = fused.fold_bn(conv.eval(), bn)
    m = cls.from_float(copy.deepcopy(conv), copy.deepcopy(bn), qconfig=qat_qconfig()).eval()
    x = torch.randn(*(2, 3) + (5,) * dims, generator=gen())
    relu = F.relu if cls is qat.ConvBnReLU2d else (lambda t: t)
    # fake quant off: exactly the float fold
    fxquant.disable_fake_quant(m)
    torch.testing.assert_close(m(x), relu(folded(x)), rtol=1e-4, atol=1e-5)
    # fake quant on: the folded conv with the fake-quantized folded weight, i.e. what to_float() + the weight
    # qparams give the lowering
    fxquant.enable_fake_quant(m)
    y = m(x)
    f = m.to_float()
    conv_f = f.op if isinstance(f, fused.ConvReLU2d) else f
    torch.testing.assert_close(conv_f.weight, folded.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(conv_f.bias, folded.bias, rtol=1e-6, atol=1e-6)
    wq = fake_quantize(conv_f.weight, m.weight_qparams())
    expected = relu(conv_f._conv_forward(x, wq, conv_f.bias))
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_freeze_bn_stats_uses_and_keeps_the_running_statistics():
    torch.manual_seed(0)
    m = qat.ConvBnReLU2d.from_float(nn.Conv2d(3, 4, 3), random_bn(nn.BatchNorm2d(4)), qconfig=qat_qconfig()).train()
    x = torch.randn(4, 3, 6, 6, generator=gen())
    m(x)
    fxquant.disable_observer(m)
    mean, var = m.bn.running_mean.clone(), m.bn.running_var.clone()
    assert fxquant.freeze_bn_stats(m) is m and m.freeze_bn and not m.bn.training
    m.train()  # model.train() must not unfreeze
    assert m.training and not m.bn.training
    y_train = m(x)
    assert torch.equal(m.bn.running_mean, mean) and torch.equal(m.bn.running_var, var)
    torch.testing.assert_close(y_train, m.eval()(x))  # frozen training forward == deployed forward
    fxquant.update_bn_stats(m.train())
    assert m.bn.training and not m.freeze_bn
    m(x)
    assert not torch.equal(m.bn.running_mean, mean)


def test_freeze_bn_stats_works_through_apply_and_on_prepared_models():
    prepared = prepared_net()
    prepared.apply(fxquant.freeze_bn_stats)
    bns = [m for m in prepared.modules() if isinstance(m, (qat.ConvBn2d, qat.LinearBn1d))]
    assert len(bns) == 3 and all(m.freeze_bn and not m.bn.training for m in bns)
    # the fused batch norms live only inside their QAT modules: model.train() cannot reach them another way
    assert not any(hasattr(prepared, name) for name in ("bn1", "bn2", "bn3"))
    prepared.train()
    assert all(not m.training for m in prepared.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def test_fuse_pass_removes_the_modules_it_consumed():
    from fxquant.backends import get_backend_config
    from fxquant.passes.context import QuantContext
    from fxquant.passes.fuse import FusePass
    from fxquant.tracer import trace
    gm = FusePass().run(trace(Net().train()), QuantContext(backend=get_backend_config(BACKEND), is_qat=True)).graph_module
    assert {name for name, _ in gm.named_children()} == {"conv1", "conv2", "fc1", "fc2"}
    assert isinstance(gm.conv1.bn, nn.BatchNorm2d)


def test_gamma_zero_channel_does_not_produce_nan():
    conv, bn = nn.Conv2d(3, 4, 3), random_bn(nn.BatchNorm2d(4))
    with torch.no_grad():
        bn.weight[1] = 0.0
    m = qat.ConvBn2d.from_float(conv, bn, qconfig=qat_qconfig()).train()
    y = m(torch.randn(4, 3, 6, 6, generator=gen()))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 1].detach(), torch.full_like(y[:, 1], bn.bias[1].item()))


# ============================================================================== prepare_qat_fx, convert_fx

def test_prepare_qat_fx_builds_qat_modules_from_the_table():
    prepared = prepared_net()
    kinds = {name: type(m) for name, m in prepared.named_children()}
    assert kinds["conv1"] is qat.ConvBnReLU2d and kinds["conv2"] is qat.ConvBn2d
    assert kinds["fc1"] is qat.LinearBnReLU1d and kinds["fc2"] is qat.Linear
    assert prepared.training and all(m.training for m in prepared.modules())
    for name in ("conv1", "conv2", "fc1", "fc2"):
        wfq = prepared.get_submodule(name).weight_fake_quant
        assert isinstance(wfq, FakeQuantize) and wfq.dtype == torch.qint8 and f"'{name}'" in wfq.where
    observers = [n for n in prepared.graph.nodes if n.op == "call_module" and is_observer(prepared.get_submodule(n.target))]
    assert observers and all(isinstance(prepared.get_submodule(n.target), FakeQuantize) for n in observers)


def test_prepare_qat_fx_leaves_the_model_and_its_statistics_alone():
    torch.manual_seed(0)
    model = Net().train()
    before = copy.deepcopy(model.state_dict())
    prepared = fxquant.prepare_qat_fx(model, fxquant.get_default_qat_qconfig_mapping(BACKEND), (X,),
                                      backend_config=BACKEND)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # tracing and shape propagation ran in eval mode: no batch of example inputs leaked into the BN statistics
    assert torch.equal(prepared.conv1.bn.running_mean, before["bn1.running_mean"])
    assert int(prepared.conv1.bn.num_batches_tracked) == 0


def test_prepare_qat_fx_keeps_modules_the_user_left_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    model[1].eval()
    prepared = fxquant.prepare_qat_fx(model, fxquant.get_default_qat_qconfig_mapping(BACKEND), (torch.randn(2, 4),),
                                      backend_config=BACKEND)
    assert prepared.training and not prepared.get_submodule("1").training


class Branchy(nn.Module):
    """Training-dependent code: a dropout module and an ``if self.training`` branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.fc1(x)))
        x = F.dropout(x, 0.2, self.training)
        return self.fc2(x) * (2.0 if self.training else 1.0)


def test_prepare_qat_fx_traces_what_training_runs():
    prepared = fxquant.prepare_qat_fx(Branchy().train(), fxquant.get_default_qat_qconfig_mapping(BACKEND),
                                      (torch.randn(4, 6),), backend_config=BACKEND)
    assert isinstance(prepared.get_submodule("drop"), nn.Dropout)  # kept: it acts while training
    assert any(n.op == "call_function" and 2.0 in n.args for n in prepared.graph.nodes)  # the training branch
    x = torch.randn(8, 6, generator=gen())
    torch.manual_seed(0)
    assert not torch.equal(prepared(x), prepared(x))
    prepared.eval()
    converted = fxquant.convert_fx(prepared)  # inference: functional dropout (traced with training=True) removed
    assert F.dropout not in [n.target for n in converted.graph.nodes]
    with torch.no_grad():
        assert torch.equal(converted(x), converted(x))


def test_eval_model_is_a_clear_error():
    with pytest.raises(FxQuantError, match=r"needs the model in train mode: call model.train\(\).*prepare_fx"):
        fxquant.prepare_qat_fx(Net().eval(), fxquant.get_default_qat_qconfig_mapping(BACKEND), (X,))


def test_observer_qconfig_warns_that_training_simulates_nothing():
    with pytest.warns(UserWarning, match="plain observers, not FakeQuantize"):
        fxquant.prepare_qat_fx(Net().train(), fxquant.get_default_qconfig_mapping(BACKEND), (X,),
                               backend_config=BACKEND)


def test_fixed_qparams_ops_get_a_fake_quantizer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid()).train()
    prepared = fxquant.prepare_qat_fx(model, fxquant.get_default_qat_qconfig_mapping(BACKEND), (X,),
                                      backend_config=BACKEND)
    fqs = [m for m in prepared.children() if isinstance(m, FakeQuantize)]
    fixed = [m for m in fqs if isinstance(m.activation_post_process, FixedQParamsObserver)]
    assert len(fixed) == 1
    y = prepared(X)
    assert torch.equal(y, torch.round(y * 256) / 256)  # sigmoid output sits on the fixed 1/256 grid


def test_module_with_qconfig_none_trains_and_stays_float():
    mapping = fxquant.get_default_qat_qconfig_mapping(BACKEND).set_module_name("fc2", None)
    prepared = prepared_net(mapping)
    assert prepared.fc2.weight_fake_quant is None
    train_steps(prepared, 2)
    prepared.eval()
    converted = fxquant.convert_fx(prepared)
    assert type(converted.get_submodule("fc2")) is nn.Linear


@pytest.mark.parametrize("optimizer,kwargs", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
                                              (torch.optim.Adam, dict(lr=1e-3)),
                                              (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01))])
def test_any_optimizer_trains_and_train_eval_switching_works(optimizer, kwargs):
    prepared = prepared_net()
    losses = train_steps(prepared, 10, optimizer, **kwargs)
    assert all(torch.isfinite(torch.tensor(losses)))
    prepared.eval()
    with torch.no_grad():
        y1 = prepared(X)
    assert not any(m.training for m in prepared.modules())
    train_steps(prepared, 2, optimizer, **kwargs)
    assert prepared.training
    prepared.eval()
    fxquant.disable_observer(prepared)
    with torch.no_grad():
        assert torch.equal(prepared(X), prepared(X))
        assert not torch.equal(prepared(X), y1)


def agreement(prepared: torch.fx.GraphModule, x: torch.Tensor) -> float:
    """Fraction of output elements where convert_fx's model is within one output quantization step of the QAT model."""
    prepared.eval()
    fxquant.disable_observer(prepared)
    converted = fxquant.convert_fx(prepared)
    out_fq = [m for m in prepared.modules() if isinstance(m, FakeQuantize)][-1]  # the output's fake quantizer
    step = float(out_fq.qparams().scale)
    with torch.no_grad():
        diff = (prepared(x) - converted(x)).abs()
    return float((diff <= step * 1.0001).float().mean())


def _int8_with_fused_relu(module: nn.Module) -> bool:
    """Whether ``module`` is one int8 kernel with its ReLU fused (QTensor kernels, or oneDNN's for x86)."""
    from fxquant.backends.kernels.onednn import OneDNNConv, OneDNNLinear
    from fxquant.backends.kernels.qtensor import QuantizedConv, QuantizedLinear
    if isinstance(module, (QuantizedConv, QuantizedLinear)):
        return bool(module.relu)
    return isinstance(module, (OneDNNConv, OneDNNLinear)) and module.post.attr == "relu"


@pytest.mark.parametrize("backend", ["x86", "fbgemm", "qnnpack"])
def test_converted_model_agrees_with_the_qat_model(backend, restore_engine):
    prepared = prepared_net(backend=backend)
    train_steps(prepared, 10)
    fxquant.freeze_bn_stats(prepared)
    train_steps(prepared, 3)
    x = torch.randn(64, 3, 8, 8, generator=gen(5))
    assert agreement(prepared, x) >= 0.99
    converted = fxquant.convert_fx(prepared)
    assert _int8_with_fused_relu(converted.conv1) and _int8_with_fused_relu(converted.fc1)
    assert not any(isinstance(m, (qat.QATModule, FakeQuantize)) for m in converted.modules())


class Stack(nn.Module):
    """A random stack of conv (+bn) (+relu) blocks in 1-d or 2-d, then a linear head."""

    def __init__(self, dims: int, blocks: list[tuple[int, bool, bool, bool]], pool: bool = False) -> None:
        super().__init__()
        conv_t, bn_t = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        layers, cin = [], 3
        for cout, bn, relu, bias in blocks:
            layers.append(conv_t(cin, cout, 3, padding=1, bias=bias))
            layers += [bn_t(cout)] if bn else []
            layers += [nn.ReLU()] if relu else []
            cin = cout
        self.body = nn.Sequential(*layers)
        self.pool = tuple(range(2, 2 + dims)) if pool else None
        self.head = nn.Linear(cin if pool else cin * 6 ** dims, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.head(y.mean(dim=self.pool) if self.pool else torch.flatten(y, 1))


def full_8_bit_qat_mapping(backend: str) -> fxquant.QConfigMapping:
    """The backend's default QAT qconfig on full 8-bit activation grids, whatever the CPU (the default drops to 7 bits
    for fbgemm's kernels without VNNI). The QAT model's fake quantizers clamp at the grid's end, the kernels at the
    dtype's (0..255): the same codes only on a grid spanning the dtype (on a 7-bit grid, values beyond the trained
    range took codes up to 138 in the converted model, 127 in the QAT one: 96% agreement). Weights that no pair of
    8-bit codes can take beyond int16 in fbgemm's kernels (``models.int16_safe_weight``)."""
    from models import int16_safe_weight

    default = fxquant.get_default_qat_qconfig(backend)
    qconfig = fxquant.QConfig(activation=default.activation.with_overrides(reduce_range=False),
                              weight=int16_safe_weight(default.weight, backend))
    return fxquant.QConfigMapping().set_global(qconfig)


@settings(max_examples=8)
@given(dims=st.sampled_from([1, 2]),
       blocks=st.lists(st.tuples(st.integers(2, 6), st.booleans(), st.booleans(), st.booleans()), min_size=1, max_size=3),
       backend=st.sampled_from(["x86", "qnnpack"]), pool=st.booleans())
def test_property_convert_stays_within_one_step_of_the_qat_model(dims, blocks, backend, pool):
    torch.manual_seed(0)
    x = torch.randn(*(8, 3) + (6,) * dims, generator=gen())
    prepared = fxquant.prepare_qat_fx(Stack(dims, blocks, pool).train(), full_8_bit_qat_mapping(backend), (x,),
                                      backend_config=backend)
    assert not any(type(m) in (nn.Conv1d, nn.Conv2d, nn.Linear) for m in prepared.modules())  # all swapped
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    for _ in range(3):
        loss = prepared(torch.randn_like(x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    old = torch.backends.quantized.engine
    try:
        assert agreement(prepared, torch.randn(*(32, 3) + (6,) * dims, generator=gen(4))) >= 0.99
    finally:
        torch.backends.quantized.engine = old


def test_fusion_for_qat_is_idempotent_and_uses_the_table():
    from fxquant.backends import get_backend_config
    from fxquant.passes.context import QuantContext
    from fxquant.passes.fuse import FusePass
    from fxquant.tracer import trace
    gm = trace(Net().train())
    ctx = QuantContext(backend=get_backend_config(BACKEND), is_qat=True)
    assert FusePass().run(gm, ctx).modified and not FusePass().run(gm, ctx).modified
    # a table whose conv entries have no qat_fuser leaves conv (+ bn) float
    cfg = get_backend_config(BACKEND)
    import dataclasses
    entries = tuple(dataclasses.replace(e, qat_fuser=None) if e.name.startswith("conv2d") else e for e in cfg.entries)
    gm2 = FusePass().run(trace(Net().train()), QuantContext(backend=cfg.replace(entries=entries), is_qat=True))
    kinds = {type(m) for m in gm2.graph_module.modules()}
    assert nn.Conv2d in kinds and nn.BatchNorm2d in kinds and qat.LinearBnReLU1d in kinds


def test_grid_leaving_shares_input_ops_round_to_their_inputs_grid(restore_engine):
    """avg pooling / mean in QAT round their result to the input's grid, as the quantized ops do (without
    observing the output: the input's range is not pulled in)."""
    from fxquant.fake_quantize import SharedFakeQuantize

    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.avg_pool2d(F.relu(self.conv(x)), 2)
            return self.fc(x.mean(dim=(2, 3)))

    prepared = fxquant.prepare_qat_fx(Pool().train(), fxquant.get_default_qat_qconfig_mapping(BACKEND), (X,),
                                      backend_config=BACKEND)
    shared = [m for m in prepared.modules() if isinstance(m, SharedFakeQuantize)]
    assert len(shared) == 2 and all(m.source is prepared.conv_observer for m in shared)
    prepared(X)
    batches = int(prepared.conv_observer.activation_post_process.batches)
    assert batches == 1  # observed once per forward, by its own call only
    prepared.eval()
    fxquant.disable_observer(prepared)
    qp = prepared.conv_observer.qparams()
    with torch.no_grad():
        pooled = prepared.avg_pool2d_observer(F.avg_pool2d(prepared.conv_observer(prepared.conv(
            prepared.x_observer(X))), 2))
    torch.testing.assert_close(pooled, fake_quantize(pooled, qp), rtol=0, atol=0)  # on the grid
    assert agreement(prepared, torch.randn(64, 3, 8, 8, generator=gen(5))) >= 0.99


def test_depthwise_weight_fake_quant_gets_the_tables_narrow_range():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8), nn.ReLU()).train()
    prepared = fxquant.prepare_qat_fx(model, fxquant.get_default_qat_qconfig_mapping("fbgemm"),
                                      (torch.randn(2, 8, 6, 6),), backend_config="fbgemm")
    wfq = prepared.get_submodule("0").weight_fake_quant
    assert (wfq.quant_min, wfq.quant_max) == (-64, 63)  # fbgemm's 7-bit depthwise weights, as lowering uses


def test_convert_quantizes_weights_with_the_trained_fake_quant_qparams(restore_engine):
    prepared = prepared_net()
    train_steps(prepared, 4)
    prepared.eval()
    fxquant.disable_observer(prepared)
    converted = fxquant.convert_fx(prepared)
    conv = converted.conv1
    if conv.weight.is_quantized:  # fbgemm/qnnpack: a per-channel QTensor
        scales, weight = conv.weight.q_per_channel_scales().float(), conv.weight.dequantize()
    else:  # x86/oneDNN: plain int8 values and their float scales
        scales, weight = conv.weight_scale, conv.weight
    trained = prepared.conv1.weight_fake_quant
    torch.testing.assert_close(scales, trained.scale)
    folded = prepared.conv1.to_float().op.weight
    torch.testing.assert_close(weight, fake_quantize(folded, trained.qparams()))


def test_lsq_model_converts_with_its_learned_qparams(restore_engine):
    act = fxquant.LearnableFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, dtype=torch.quint8)
    weight = fxquant.LearnableFakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, dtype=torch.qint8,
                                                     qscheme=torch.per_channel_symmetric, ch_axis=0)
    mapping = fxquant.QConfigMapping().set_global(fxquant.QConfig(activation=act, weight=weight))
    prepared = prepared_net(mapping)
    train_steps(prepared, 6)  # SGD, as LSQ trains its step sizes (Adam's normalised steps overshoot tiny scales)
    scales = [m.scale for m in prepared.modules() if isinstance(m, fxquant.LearnableFakeQuantize)]
    assert all(s.grad is not None for s in scales)
    assert agreement(prepared, torch.randn(64, 3, 8, 8, generator=gen(5))) >= 0.99


def test_fused_fake_quant_model_converts_and_agrees(restore_engine):
    from fxquant.backends import get_backend_config

    # activations as wide as the table makes them on this CPU: 8-bit activations saturate fbgemm's int16 pairs
    # without VNNI (the x86 table runs fbgemm's kernels there; 61% agreement, conv1 44 steps off its exact sum)
    reduce_range = get_backend_config(BACKEND).default_activation().reduce_range
    act = fxquant.FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, dtype=torch.quint8,
                                                          reduce_range=reduce_range)
    weight = fxquant.FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    mapping = fxquant.QConfigMapping().set_global(fxquant.QConfig(activation=act, weight=weight))
    prepared = prepared_net(mapping)
    train_steps(prepared, 6)
    assert agreement(prepared, torch.randn(64, 3, 8, 8, generator=gen(5))) >= 0.99


def test_qat_state_dict_round_trips_into_a_fresh_prepared_model():
    prepared = prepared_net()
    train_steps(prepared, 3)
    fresh = prepared_net(seed=1)
    fresh.load_state_dict(prepared.state_dict())
    prepared.eval(), fresh.eval()
    fxquant.disable_observer(prepared), fxquant.disable_observer(fresh)
    with torch.no_grad():
        assert torch.equal(prepared(X), fresh(X))


def test_torch_save_of_a_qat_model():
    prepared = prepared_net()
    train_steps(prepared, 2)
    buf = io.BytesIO()
    torch.save(prepared, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    prepared.eval(), loaded.eval()
    fxquant.disable_observer(prepared), fxquant.disable_observer(loaded)
    with torch.no_grad():
        assert torch.equal(prepared(X), loaded(X))


# ==================================================================================== trainable fake quantizers

def test_fused_fake_quant_matches_fake_quantize_on_affine_activations():
    ref = FakeQuantize(observer=MovingAverageMinMaxObserver, dtype=torch.quint8)
    fast = fxquant.FusedMovingAvgObsFakeQuantize(observer=MovingAverageMinMaxObserver, dtype=torch.quint8)
    g = gen()
    for _ in range(5):
        x = torch.randn(256, generator=g) * 3 + 1
        y_ref, y_fast = ref(x), fast(x)
        torch.testing.assert_close(fast.activation_post_process.min_val, ref.activation_post_process.min_val)
        torch.testing.assert_close(fast.scale, ref.scale, rtol=1e-6, atol=0)
        assert (fast.zero_point - ref.zero_point).abs().max() <= 1
        assert float((y_fast - y_ref).abs().max()) <= float(ref.scale) * 1.001
    assert int(fast.activation_post_process.batches) == 5
    assert fast.qparams().scalar() == (float(fast.scale), int(fast.zero_point))


def test_fused_fake_quant_per_channel_gradient_and_switches():
    fast = fxquant.FusedMovingAvgObsFakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, dtype=torch.qint8,
                                                 qscheme=torch.per_channel_symmetric, ch_axis=0)
    w = torch.randn(6, 3, 3, 3, generator=gen(), requires_grad=True)
    y = fast(w)
    assert fast.scale.shape == (6,) and fast.qparams().axis == 0
    y.sum().backward()
    assert torch.equal(w.grad, in_grid(w.detach(), fast))  # 1 on the grid (all but channel maxima), else 0
    fast.disable_fake_quant()
    assert torch.equal(fast(w), w)
    fast.disable_observer()
    before = fast.activation_post_process.min_val.clone()
    fast(w * 3)
    assert torch.equal(fast.activation_post_process.min_val, before)


def test_fused_fake_quant_takes_the_exact_path_where_the_kernel_cannot():
    eps = 2.0 ** -12  # qnnpack's minimum scale
    fast = fxquant.FusedMovingAvgObsFakeQuantize(observer=MovingAverageMinMaxObserver, dtype=torch.quint8, eps=eps)
    ref = FakeQuantize(observer=MovingAverageMinMaxObserver, dtype=torch.quint8, eps=eps)
    assert not fast.native
    x = torch.randn(100, generator=gen()) * 1e-3  # a range that needs the scale floor
    assert torch.equal(fast(x), ref(x)) and float(fast.scale) == eps
    with pytest.raises(TypeError, match="moving-average"):
        fxquant.FusedMovingAvgObsFakeQuantize(observer=MinMaxObserver)
    # per-channel on an axis other than 0 (the native kernel takes axis 0 only): the exact path, same values
    spec = dict(observer=MovingAveragePerChannelMinMaxObserver, dtype=torch.qint8,
                qscheme=torch.per_channel_symmetric, ch_axis=1)
    fast, ref = fxquant.FusedMovingAvgObsFakeQuantize(**spec), FakeQuantize(**spec)
    for _ in range(3):
        x = torch.randn(4, 3, 5, generator=gen())
        assert torch.equal(fast(x), ref(x))
    assert fast.qparams().axis == 1 and torch.equal(fast.qparams().scale, ref.qparams().scale)


def test_learnable_fake_quant_initialises_from_the_observer_then_learns():
    fq = fxquant.LearnableFakeQuantize(observer=MovingAverageMinMaxObserver, dtype=torch.quint8)
    assert not fq.has_data
    x = torch.randn(512, generator=gen()) * 2
    y = fq(x)
    obs_qp = fq.activation_post_process.qparams()
    assert fq.has_data and fq.scale.item() == pytest.approx(float(obs_qp.scale))
    torch.testing.assert_close(y, fake_quantize(x, fq.qparams()))
    opt = torch.optim.SGD(fq.parameters(), lr=0.1)
    scale0 = fq.scale.item()
    for _ in range(20):  # minimise the quantization error: the step size moves
        loss = (fq(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fq.scale.grad is not None and fq.zero_point.grad is not None
    assert fq.scale.item() != scale0
    assert fq.scale.item() == pytest.approx(float(fq.activation_post_process.qparams().scale), rel=0.5)
    qp = fq.qparams()
    assert qp.zero_point.dtype == torch.int64 and 0 <= int(qp.zero_point) <= 255


def test_learnable_fake_quant_symmetric_zero_point_is_fixed_and_per_channel_shapes_load():
    fq = fxquant.LearnableFakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, dtype=torch.qint8,
                                       qscheme=torch.per_channel_symmetric, ch_axis=0)
    w = torch.randn(5, 4, generator=gen(), requires_grad=True)
    fq(w).sum().backward()
    assert fq.scale.shape == (5,) and fq.scale.grad is not None and not fq.zero_point.requires_grad
    assert torch.equal(fq.qparams().zero_point, torch.zeros(5, dtype=torch.int64))
    fresh = fxquant.LearnableFakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, dtype=torch.qint8,
                                          qscheme=torch.per_channel_symmetric, ch_axis=0)
    fresh.load_state_dict(fq.state_dict())
    assert fresh.has_data and torch.equal(fresh(w), fq(w))


# ========================================================================================== devices

def test_qat_modules_keep_dtype_and_device_of_the_float_module():
    conv = nn.Conv2d(3, 4, 3).double()
    m = qat.ConvBn2d.from_float(conv, nn.BatchNorm2d(4).double(), qconfig=qat_qconfig())
    assert m.weight.dtype == torch.float64 and m.bn.weight.dtype == torch.float64
    assert all(b.device == conv.weight.device for b in m.weight_fake_quant.buffers())
    assert m.to_float().weight.dtype == torch.float64


@CUDA
def test_prepare_qat_fx_trains_on_cuda_and_converts_on_the_cpu(restore_engine):
    torch.manual_seed(0)
    model = Net().cuda().train()
    x = X.cuda()
    prepared = fxquant.prepare_qat_fx(model, fxquant.get_default_qat_qconfig_mapping(BACKEND), (x,),
                                      backend_config=BACKEND)
    assert {t.device.type for t in list(prepared.parameters()) + list(prepared.buffers())} == {"cuda"}
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    for _ in range(3):
        loss = prepared(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    prepared.eval()
    fxquant.disable_observer(prepared)
    converted = fxquant.convert_fx(prepared)
    with torch.no_grad():
        diff = (prepared(x).cpu() - converted(X)).abs()
    assert float(diff.max()) < 0.1


@CUDA
def test_trainable_fake_quantizers_run_on_cuda():
    x = torch.randn(64, device="cuda", requires_grad=True)
    for fq in (fxquant.FusedMovingAvgObsFakeQuantize(dtype=torch.quint8), fxquant.LearnableFakeQuantize(dtype=torch.quint8)):
        fq = fq.cuda()
        fq(x).sum().backward()
        assert fq.scale.device.type == "cuda"


# ====================================================================================== short digits run

def test_short_digits_qat_run(restore_engine):
    pytest.importorskip("sklearn")
    sys.path.insert(0, os.path.dirname(__file__))
    import bench_qat

    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = bench_qat.digits()
    model = bench_qat.DigitsCNN()
    bench_qat.train(model, x_tr, y_tr, 6, torch.optim.Adam(model.parameters(), lr=3e-3), 3e-3)
    fp32 = bench_qat.accuracy(model, x_te, y_te)
    prepared, converted = bench_qat.qat(model, x_tr, y_tr, weight_bits=8, epochs=1)
    acc_qat, acc_int8 = bench_qat.accuracy(prepared, x_te, y_te), bench_qat.accuracy(converted, x_te, y_te)
    assert fp32 > 90.0
    assert acc_int8 >= fp32 - 2.0
    assert abs(acc_int8 - acc_qat) <= 0.5  # one test image is 0.19 points


class _TinyAttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(a).mean(dim=1)


def test_qat_decomposes_attention_trains_and_converts_its_projections():
    """The four projections train with fake quantization and convert to int8 linears; between them the attention
    is one float leaf whose dropout acts in train mode only."""
    torch.manual_seed(0)
    model = _TinyAttentionNet().train()
    x = torch.randn(16, 5, 8)
    target = torch.randint(0, 4, (16,))
    qat_model = fxquant.prepare_qat_fx(model, fxquant.get_default_qat_qconfig_mapping("fbgemm"), (x,),
                                       backend_config="fbgemm")
    assert isinstance(model.attn, nn.MultiheadAttention)  # the user's model is not touched
    names = {str(n.target) for n in qat_model.graph.nodes if n.op == "call_module"}
    assert {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "attn.attend"} <= names, names
    with torch.no_grad():
        assert not torch.equal(qat_model(x), qat_model(x))  # the attention dropout (p=0.1) draws in train mode
    opt = torch.optim.SGD(qat_model.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(qat_model(x), target).backward()
        opt.step()
    qat_model.eval()
    with torch.no_grad():
        simulated = qat_model(x)
    quantized = fxquant.convert_fx(qat_model)
    left = {f.op for f in float_ops(quantized)}
    assert "Linear" not in left and "ScaledDotProductAttention" in left, left
    with torch.no_grad():
        assert fxquant.sqnr(simulated, quantized(x)) > 25
