"""Shape propagation (fxquant.passes.shapes): the meta run records what the real run would, falls back to the real
run where it cannot answer, and never touches the user's modules."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from models import Residual, SmallCNN, seeded, torchvision_model
from fxquant.passes import shapes
from fxquant.passes.shapes import ShapePropagationError, propagate_shapes


def _real(gm: fx.GraphModule, inputs: tuple) -> dict[str, object]:
    with torch.no_grad():
        shapes._Propagate(gm, on_meta=False).run(*inputs)
    return _recorded(gm)


def _recorded(gm: fx.GraphModule) -> dict[str, object]:
    """Shape and dtype per node (strides may differ: CPU kernels pick channels-last outputs for some convs)."""
    def sd(m: object) -> object:
        if hasattr(m, "shape"):
            return (tuple(m.shape), m.dtype)
        return [sd(x) for x in m] if isinstance(m, (list, tuple)) else m
    return {n.name: sd(n.meta.get("tensor_meta")) for n in gm.graph.nodes}


def _meta_ran(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Which runs happened: True for the meta run, False for the real one."""
    runs: list[bool] = []
    init = shapes._Propagate.__init__

    def spy(self, gm, on_meta):  # type: ignore[no-untyped-def]
        runs.append(on_meta)
        init(self, gm, on_meta)
    monkeypatch.setattr(shapes._Propagate, "__init__", spy)
    return runs


class InPlaceAndPointwise(nn.Module):
    """In-place activations, same-shape and broadcasting elementwise ops, a comparison (bool), an integer op."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.Hardswish(inplace=True)
        self.scale = nn.Parameter(torch.ones(8, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.act(self.conv(x))
        y = F.relu6(y, inplace=True) * self.scale + y
        y = y.unsqueeze(0).squeeze(0)
        mask = y > 0.5
        count = mask.sum(dim=(2, 3))
        return y.flatten(1), mask, count, y.mean(dim=(2, 3), keepdim=True).expand_as(y) - y


@pytest.mark.parametrize("make, shape", [(lambda: seeded(SmallCNN()), (2, 3, 16, 16)),
                                         (lambda: seeded(Residual()), (1, 3, 16, 16)),
                                         (lambda: seeded(InPlaceAndPointwise()), (2, 3, 10, 12)),
                                         (lambda: torchvision_model("mobilenet_v3_small", bn_batches=1), (1, 3, 64, 64)),
                                         (lambda: torchvision_model("shufflenet_v2_x0_5", bn_batches=1),
                                          (1, 3, 64, 64))])
def test_the_meta_run_records_what_the_real_run_does(make, shape, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make().eval()
    gm = fx.symbolic_trace(model)
    x = (torch.randn(shape),)
    runs = _meta_ran(monkeypatch)
    propagate_shapes(gm, x)
    assert runs == [True]   # answered on the meta device
    meta = _recorded(gm)
    assert meta == _real(gm, x)
    assert all(p.device.type == "cpu" for p in model.parameters())


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), h=st.integers(4, 20), w=st.integers(4, 20), channels_last=st.booleans())
def test_meta_shapes_match_the_real_ones_for_any_input_size(batch: int, h: int, w: int, channels_last: bool) -> None:
    gm = fx.symbolic_trace(seeded(InPlaceAndPointwise()).eval())
    x = torch.randn(batch, 3, h, w)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    propagate_shapes(gm, (x,))
    assert _recorded(gm) == _real(gm, (x,))


class ReadsAValue(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.abs().max().item()  # a meta tensor has no value


class MakesACpuTensor(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[-1], dtype=x.dtype).repeat(x.shape[0], 1)


@pytest.mark.parametrize("model", [ReadsAValue(), MakesACpuTensor()])
def test_what_the_meta_run_cannot_answer_runs_for_real(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    gm = fx.symbolic_trace(model)
    runs = _meta_ran(monkeypatch)
    x = (torch.randn(3, 5),)
    propagate_shapes(gm, x)
    assert runs == [True, False]
    assert _recorded(gm)["output"] == ((3, 5), torch.float32)


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(10, 4), nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(ids))


def test_an_embedding_s_integer_input_stays_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    gm = fx.symbolic_trace(Embed())
    runs = _meta_ran(monkeypatch)
    ids = (torch.tensor([[1, 2, 3]]),)
    propagate_shapes(gm, ids)
    assert runs == [True] and _recorded(gm) == _real(gm, ids)


def test_integer_inputs_to_a_float_module_fail_as_in_the_real_run(monkeypatch: pytest.MonkeyPatch) -> None:
    gm = fx.symbolic_trace(seeded(SmallCNN()).eval())
    runs = _meta_ran(monkeypatch)
    with pytest.raises(ShapePropagationError, match=r"node 'conv.*Input type \(long int\)") as info:
        propagate_shapes(gm, (torch.zeros(2, 3, 16, 16, dtype=torch.long),))
    assert runs == [True, False] and info.value.node.startswith("conv")


def test_a_shape_error_names_the_node_in_the_real_run_s_words() -> None:
    gm = fx.symbolic_trace(seeded(SmallCNN()).eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ShapePropagationError, match=r"node 'fc1': RuntimeError: mat1 and mat2"):
            propagate_shapes(gm, (torch.randn(2, 3, 9, 9),))


def test_inputs_without_a_meta_form_run_for_real(monkeypatch: pytest.MonkeyPatch) -> None:
    class Dequant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.dequantize() * 2

    gm = fx.symbolic_trace(Dequant())
    runs = _meta_ran(monkeypatch)
    q = torch.quantize_per_tensor(torch.randn(2, 3), 0.1, 0, torch.quint8)
    propagate_shapes(gm, (q,))
    assert runs[-1] is False and _recorded(gm)["output"] == ((2, 3), torch.float32)


class NonzeroOfACpuTensor(nn.Module):
    """A shape decided by the values of tensors made inside forward (two alike): the recorded shape must be right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.arange(6).remainder(2).nonzero()
        b = torch.arange(6).remainder(3).nonzero()
        return x[:, : a.shape[0] + b.shape[0]]


def test_shapes_decided_by_values_of_tensors_made_in_forward_are_right() -> None:
    gm = fx.symbolic_trace(NonzeroOfACpuTensor())
    propagate_shapes(gm, (torch.randn(2, 10),))
    assert _recorded(gm)["output"] == ((2, 7), torch.float32)


def test_integer_to_float_ops_follow_the_default_dtype() -> None:
    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / 255

    gm = fx.symbolic_trace(Scale())
    x = torch.zeros(2, 3, dtype=torch.uint8)
    propagate_shapes(gm, (x,))
    assert _recorded(gm)["output"] == ((2, 3), torch.float32)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        propagate_shapes(gm, (x,))
        assert _recorded(gm)["output"] == ((2, 3), torch.float64) == _real(gm, (x,))["output"]
    finally:
        torch.set_default_dtype(old)
