"""The fuse pass: which patterns become which fused op (read off the graph), and that the numbers don't move.

Graphs are checked by property (the list of op kinds in the graph, what ``gm.code`` calls), not by
comparing whole node lists.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from models import ConvBN, ConvBNReLU, Residual, SmallCNN, node_kinds, seeded
from fxquant import fused
from fxquant.api import fuse_fx
from fxquant.backends import BACKENDS, get_backend_config
from fxquant.passes.context import RECORD_KEY, QuantContext
from fxquant.passes.fuse import FusePass
from fxquant.tracer import trace

INPUTS = {1: (2, 3, 12), 2: (2, 3, 10, 10), 3: (1, 3, 6, 6, 6)}


def run_fuse(model: nn.Module, backend: str = "fbgemm"):
    gm = trace(copy.deepcopy(model))
    return FusePass().run(gm, QuantContext(backend=get_backend_config(backend)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("form", ConvBNReLU.FORMS)
def test_conv_bn_relu_every_relu_spelling_becomes_one_ConvReLU2d(form):
    model = seeded(ConvBNReLU(form))
    before = node_kinds(trace(model))
    assert before[:2] == ["Conv2d", "BatchNorm2d"] and len(before) == 3, before
    result = run_fuse(model)
    assert result.modified
    assert node_kinds(result.graph_module) == ["ConvReLU2d"]
    fused_conv = result.graph_module.conv
    assert isinstance(fused_conv, fused.ConvReLU2d) and isinstance(fused_conv.op, nn.Conv2d)
    node = next(n for n in result.graph_module.graph.nodes if n.op == "call_module")
    assert node.meta[RECORD_KEY].fused_from[:2] == (nn.Conv2d, nn.BatchNorm2d)
    x = torch.randn(*INPUTS[2])
    with torch.no_grad():
        assert rel_err(result.graph_module(x), model(x.clone())) <= 1e-5


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_bn_is_folded_for_1d_2d_3d(dims):
    model = seeded(ConvBN(dims))
    result = run_fuse(model)
    conv_type = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    assert node_kinds(result.graph_module) == [f"Folded{conv_type.__name__}"]
    assert fused.float_type(result.graph_module.conv) is conv_type
    assert "bn" not in dict(result.graph_module.named_modules())
    x = torch.randn(*INPUTS[dims])
    with torch.no_grad():
        assert rel_err(result.graph_module(x), model(x)) <= 1e-5


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bn", [True, False])
def test_conv_relu_becomes_ConvReLUNd(dims, bn):
    model = seeded(ConvBNReLU("module", dims=dims, bn=bn))
    result = run_fuse(model)
    # without bn the model holds an nn.Identity between conv and relu, which is not part of any pattern
    expected = [f"ConvReLU{dims}d"] if bn else [f"Conv{dims}d", "Identity", "ReLU"]
    assert node_kinds(result.graph_module) == expected
    x = torch.randn(*INPUTS[dims])
    with torch.no_grad():
        assert rel_err(result.graph_module(x), model(x)) <= 1e-5


def test_conv_relu_without_anything_between_fuses():
    model = seeded(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    result = run_fuse(model)
    assert node_kinds(result.graph_module) == ["ConvReLU2d"]
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(result.graph_module(x), model(x))  # no bn: the same float ops in the same order


@pytest.mark.parametrize("layers, expected", [
    (("relu",), ["LinearReLU"]),
    (("bn",), ["FoldedLinear"]),
    (("bn", "relu"), ["LinearReLU"]),
])
def test_linear_relu_and_linear_bn1d(layers, expected):
    extra = {"bn": lambda: nn.BatchNorm1d(5), "relu": nn.ReLU}
    model = seeded(nn.Sequential(nn.Linear(6, 5), *(extra[name]() for name in layers)))
    result = run_fuse(model)
    assert node_kinds(result.graph_module) == expected
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert rel_err(result.graph_module(x), model(x)) <= 1e-5


@pytest.mark.parametrize("dims", [2, 3])
def test_bn_relu_without_conv_becomes_BNReLU(dims):
    bn = nn.BatchNorm2d(3) if dims == 2 else nn.BatchNorm3d(3)
    model = seeded(nn.Sequential(bn, nn.ReLU()))
    result = run_fuse(model)
    assert node_kinds(result.graph_module) == [f"BNReLU{dims}d"]
    x = torch.randn(*INPUTS[dims])
    with torch.no_grad():
        assert torch.equal(result.graph_module(x), model(x))


@pytest.mark.parametrize("form", ["module", "F.relu", "method_", "torch.relu"])
def test_add_relu_becomes_fused_add_relu(form):
    model = seeded(Residual(form))
    result = run_fuse(model)
    gm = result.graph_module
    kinds = node_kinds(gm)
    assert kinds.count("add_relu") == 1 and "add" not in kinds, kinds
    assert kinds.count("relu") == 1  # the inner torch.relu(a) has no add before it: left alone
    assert "fxquant_fused_add_relu(" in gm.code
    add_relu = next(n for n in gm.graph.nodes if n.target is fused.add_relu)
    assert len(add_relu.args) == 2 and all(isinstance(a, torch.fx.Node) for a in add_relu.args)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_conv_with_two_users_is_not_fused_with_bn():
    class TwoUsers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # folding bn into conv would change what the add's second operand sees

    model = seeded(TwoUsers())
    result = run_fuse(model)
    assert not result.modified
    assert node_kinds(result.graph_module) == ["Conv2d", "BatchNorm2d", "add"]
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(result.graph_module(x), model(x))


def test_module_called_twice_is_not_folded():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(self.conv(x)))  # one conv module, two call sites

    model = seeded(Shared())
    result = run_fuse(model)
    assert node_kinds(result.graph_module) == ["Conv2d", "Conv2d", "BatchNorm2d"]
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(result.graph_module(x), model(x))


@pytest.mark.parametrize("model_fn", [SmallCNN, lambda: Residual("method_"), lambda: ConvBNReLU("torch.relu_")])
def test_fusion_is_idempotent(model_fn):
    model = seeded(model_fn())
    first = run_fuse(model)
    code, kinds = first.graph_module.code, node_kinds(first.graph_module)
    second = FusePass().run(first.graph_module, QuantContext(backend=get_backend_config("fbgemm")))
    assert first.modified and not second.modified
    assert second.graph_module.code == code and node_kinds(second.graph_module) == kinds


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_small_cnn_fuses_the_same_on_every_backend(backend):
    model = seeded(SmallCNN())
    gm = run_fuse(model, backend).graph_module
    assert node_kinds(gm) == ["ConvReLU2d", "MaxPool2d", "FoldedConv2d", "add_relu", "flatten", "LinearReLU", "Linear"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


def test_fuse_fx_leaves_the_users_model_alone():
    model = seeded(SmallCNN())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    gm = fuse_fx(model, backend_config="fbgemm")
    assert "ConvReLU2d" in node_kinds(gm)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not model.training


def test_fuse_fx_refuses_a_training_model():
    with pytest.raises(RuntimeError, match="eval mode"):
        fuse_fx(SmallCNN().train(), backend_config="fbgemm")


# ------------------------------------------------------------------------------------ property: numerics

_LAYER = st.sampled_from(["conv_bn_relu", "conv_bn", "conv_relu", "bn_relu", "residual_relu", "conv"])


class _Chain(nn.Module):
    """A random chain of 8-channel blocks (each one a fusion pattern, or not)."""

    def __init__(self, layers: list[str], relu_form: str) -> None:
        super().__init__()
        self.layers, self.relu_form = layers, relu_form
        self.stem = nn.Conv2d(3, 8, 1)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in layers)
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in layers)

    def relu(self, x):
        return {"F": torch.nn.functional.relu, "torch": torch.relu, "method": lambda t: t.relu()}[self.relu_form](x)

    def forward(self, x):
        x = self.stem(x)
        for kind, conv, bn in zip(self.layers, self.convs, self.bns):
            if kind == "conv_bn_relu":
                x = self.relu(bn(conv(x)))
            elif kind == "conv_bn":
                x = bn(conv(x))
            elif kind == "conv_relu":
                x = self.relu(conv(x))
            elif kind == "bn_relu":
                x = self.relu(bn(x))
            elif kind == "residual_relu":
                x = self.relu(x + conv(x))
            else:
                x = conv(x)
        return x


@settings(max_examples=25)
@given(layers=st.lists(_LAYER, min_size=1, max_size=4), relu_form=st.sampled_from(["F", "torch", "method"]),
       seed=st.integers(0, 2 ** 16))
def test_property_fusion_preserves_numerics_and_is_idempotent(layers, relu_form, seed):
    model = seeded(_Chain(layers, relu_form), seed)
    result = run_fuse(model)
    gm = result.graph_module
    gm.graph.lint()
    kinds = node_kinds(gm)
    assert "BatchNorm2d" not in kinds  # every bn follows a conv or precedes a relu: all fused away
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5
    again = FusePass().run(gm, QuantContext(backend=get_backend_config("fbgemm")))
    assert not again.modified and node_kinds(again.graph_module) == kinds
