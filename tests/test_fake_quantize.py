"""FakeQuantize: observer + fake quantization, switches, STE gradient, per channel, state dict, torch.ao parity."""

from __future__ import annotations

import io
import pickle
import warnings
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxquant.fake_quantize import (FakeQuantize, disable_fake_quant, disable_observer, enable_fake_quant,
                                   enable_observer)
from fxquant.observers import (MinMaxObserver, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver,
                               NoDataError, ObserverFactory, PerChannelMinMaxObserver)
from fxquant.qparams import fake_quantize

PER_CHANNEL = dict(observer=MovingAveragePerChannelMinMaxObserver, dtype=torch.qint8,
                   qscheme=torch.per_channel_symmetric)


def _ao() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.quantization as ao
    return ao


@pytest.mark.parametrize("kind", ["per_tensor_affine", "per_tensor_symmetric", "per_channel_symmetric"])
def test_matches_torch_ao_fake_quantize_batch_by_batch(kind: str) -> None:
    ao = _ao()
    kwargs: dict[str, Any] = dict(quant_min=0, quant_max=255, dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    ours_obs, ao_obs = MovingAverageMinMaxObserver, ao.MovingAverageMinMaxObserver
    if kind == "per_tensor_symmetric":
        kwargs.update(quant_min=-128, quant_max=127, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    elif kind == "per_channel_symmetric":
        kwargs.update(quant_min=-128, quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                      ch_axis=1)
        ours_obs, ao_obs = MovingAveragePerChannelMinMaxObserver, ao.MovingAveragePerChannelMinMaxObserver
    ours, theirs = FakeQuantize(observer=ours_obs, **kwargs), ao.FakeQuantize(observer=ao_obs, **kwargs)
    gen = torch.Generator().manual_seed(0)
    for i in range(6):
        x = torch.randn(4, 5, 3, generator=gen) * (i + 1) + i
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
        torch.testing.assert_close(ours.scale, theirs.scale, rtol=0, atol=0)
        torch.testing.assert_close(ours.zero_point, theirs.zero_point, rtol=0, atol=0, check_dtype=False)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(-2, 1), st.booleans(), st.integers(0, 2**16))
def test_output_is_fake_quantize_with_the_observers_qparams(rows, cols, ch_axis, per_channel, seed) -> None:
    kwargs = dict(PER_CHANNEL, ch_axis=ch_axis) if per_channel else {}
    fq = FakeQuantize(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x = torch.randn(rows, cols, generator=gen) * 4
        y = fq(x)
        qp = fq.activation_post_process.qparams()
        assert torch.equal(y, fake_quantize(x, qp))
        assert fq.qparams().axis == qp.axis and torch.equal(fq.qparams().scale, qp.scale)
    if per_channel:
        assert fq.scale.shape == (x.shape[ch_axis],) and fq.qparams().axis == ch_axis % 2


def test_per_channel_scales_follow_each_channel() -> None:
    fq = FakeQuantize(**dict(PER_CHANNEL, ch_axis=0))
    x = torch.stack([torch.linspace(-1, 1, 10), torch.linspace(-8, 8, 10), torch.zeros(10)])
    y = fq(x)
    scale = fq.qparams().scale
    torch.testing.assert_close(scale[:2], torch.tensor([1.0, 8.0]) / 127.5)
    assert float(scale[2]) == fq.activation_post_process.eps
    assert torch.equal(y[2], x[2])
    assert fq.is_per_channel and fq.ch_axis == 0 and not FakeQuantize().is_per_channel


def test_switches_on_one_module() -> None:
    fq = FakeQuantize()
    x = torch.linspace(-1, 1, 50)
    fq(x)
    scale, obs_max = fq.scale.clone(), fq.activation_post_process.max_val.clone()
    assert fq.disable_observer() is fq and int(fq.observer_enabled) == 0
    fq(x * 10)  # not observed: qparams frozen
    assert torch.equal(fq.scale, scale) and torch.equal(fq.activation_post_process.max_val, obs_max)
    fq.disable_fake_quant()
    assert int(fq.fake_quant_enabled) == 0
    assert torch.equal(fq(x * 10), x * 10)  # passes through untouched
    fq.enable_observer()
    fq(x * 10)  # observed, still not fake-quantized
    assert float(fq.scale) > float(scale)
    fq.enable_fake_quant(True)
    assert not torch.equal(fq(x * 0.33), x * 0.33)
    fq.enable_observer(False).enable_fake_quant(False)
    assert (int(fq.observer_enabled), int(fq.fake_quant_enabled)) == (0, 0)


def test_model_level_switches_and_apply_style() -> None:
    model = nn.Sequential(FakeQuantize(), nn.Sequential(nn.ReLU(), FakeQuantize(**PER_CHANNEL)), nn.Linear(2, 2))
    fqs = [m for m in model.modules() if isinstance(m, FakeQuantize)]

    def flags() -> list[tuple[int, int]]:
        return [(int(f.fake_quant_enabled), int(f.observer_enabled)) for f in fqs]

    assert disable_observer(model) is model and flags() == [(1, 0), (1, 0)]
    assert disable_fake_quant(model) is model and flags() == [(0, 0), (0, 0)]
    enable_observer(model)
    assert flags() == [(0, 1), (0, 1)]
    enable_fake_quant(model)
    assert flags() == [(1, 1), (1, 1)]
    model.apply(disable_observer)
    model.apply(disable_fake_quant)
    assert flags() == [(0, 0), (0, 0)]
    model.apply(enable_fake_quant)
    assert flags() == [(1, 0), (1, 0)]
    disable_fake_quant(fqs[0])  # a single FakeQuantize is a model too
    assert flags() == [(0, 0), (1, 0)]


def test_straight_through_gradient() -> None:
    fq = FakeQuantize(dtype=torch.quint8)
    fq(torch.tensor([-1.0, 1.0]))  # range [-1, 1]
    fq.disable_observer()
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.26, 0.99, 1.5, 4.0], requires_grad=True)
    y = fq(x)
    (y * torch.arange(1.0, 9.0)).sum().backward()
    inside = torch.tensor([0.0, 1, 1, 1, 1, 1, 0, 0])
    assert torch.equal(x.grad, inside * torch.arange(1.0, 9.0))
    assert torch.equal(y.detach(), fake_quantize(x.detach(), fq.qparams()))


def test_observer_never_sees_the_graph() -> None:
    fq = FakeQuantize()
    x = torch.randn(10, requires_grad=True)
    fq(x * 2).sum().backward()
    assert not fq.activation_post_process.min_val.requires_grad and not fq.scale.requires_grad


def test_state_dict_round_trip_per_channel() -> None:
    trained = FakeQuantize(**dict(PER_CHANNEL, ch_axis=-1))
    for i in range(3):
        trained(torch.randn(6, 4) * (i + 1))
    trained.disable_observer()
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    fresh = FakeQuantize(**dict(PER_CHANNEL, ch_axis=-1))
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert int(fresh.observer_enabled) == 0 and fresh.scale.shape == (4,)
    for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh.qparams().axis == 1 and torch.equal(fresh.qparams().scale, trained.qparams().scale)
    x = torch.randn(6, 4) * 3
    assert torch.equal(fresh(x), trained(x))


def test_before_any_data() -> None:
    fq = FakeQuantize()
    with pytest.raises(NoDataError, match="calibration"):
        fq.qparams()
    fq.where = "output of node 'conv1'"
    assert fq.activation_post_process.where == "output of node 'conv1'"
    fq.disable_observer()
    x = torch.tensor([0.4, 2.6, -3.0])
    # torch.ao's behaviour: unobserved qparams are scale 1, zero point 0
    assert torch.equal(fq(x), torch.tensor([0.0, 3.0, 0.0]))
    fq.enable_observer()
    fq(torch.full((3,), float("nan")))  # nothing finite: qparams stay as they were
    assert float(fq.scale) == 1.0


def test_with_args_factory() -> None:
    factory = FakeQuantize.with_args(observer=MinMaxObserver, quant_min=0, quant_max=127, dtype=torch.quint8)
    assert isinstance(factory, ObserverFactory) and factory.cls is FakeQuantize
    assert factory.kwargs["observer"] is MinMaxObserver and "FakeQuantize.with_args(" in repr(factory)
    fq = factory()
    assert type(fq.activation_post_process) is MinMaxObserver and (fq.quant_min, fq.quant_max) == (0, 127)
    assert factory.with_overrides(quant_max=63)().quant_max == 63
    assert pickle.loads(pickle.dumps(factory)) == factory
    nested = FakeQuantize.with_args(observer=PerChannelMinMaxObserver.with_args(ch_axis=1))()
    assert nested.ch_axis == 1 and nested.dtype == torch.qint8
    with pytest.raises(TypeError, match="averaging_constnt"):
        FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, averaging_constnt=0.1)
    with pytest.raises(TypeError, match="fxquant observer"):
        FakeQuantize(observer=nn.Identity)
    with pytest.raises(ValueError, match="together"):
        FakeQuantize(quant_min=0)


def test_traces_as_one_leaf_call() -> None:
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU(), FakeQuantize()))
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_buffers_move_with_the_module(device: str) -> None:
    ref = FakeQuantize(**dict(PER_CHANNEL, ch_axis=0))
    moved = FakeQuantize(**dict(PER_CHANNEL, ch_axis=0)).to(device)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(3, 7, generator=gen)
        torch.testing.assert_close(moved(x.to(device)).cpu(), ref(x), rtol=0, atol=1e-6)
    assert {b.device.type for b in moved.buffers()} == {torch.device(device).type}
    assert moved.qparams().scale.device.type == torch.device(device).type
