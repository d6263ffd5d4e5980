"""fxquant.sensitivity: per-layer sensitivity, automatic mixed precision, targets, FLOP accounting."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.sensitivity import (MetricTolerance, MinCosine, MinSQNR, auto_mixed_precision, quantizable_layers,
                                 sensitivity)

from models import TWO_BIT, ConvChain, seeded, torchvision_model


@pytest.fixture(autouse=True)
def _quiet_one_thread():
    """Every candidate is a small model quantized for real: one thread is faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
    torch.set_num_threads(threads)


#: 2-bit weights for one layer: the layer automatic mixed precision must find
BAD = TWO_BIT
MAPPING = fxquant.get_default_qconfig_mapping("fbgemm").set_module_name("convs.1", BAD)
DATA = [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
EVAL = [torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(9))]


def _amp(target, **kwargs):
    return auto_mixed_precision(seeded(ConvChain()), MAPPING, DATA[0], DATA, target, evaluation=EVAL,
                                backend_config="fbgemm", progress=False, **kwargs)


def test_the_layer_with_bad_weights_is_the_one_kept_float():
    model = seeded(ConvChain())
    before = copy.deepcopy(model.state_dict())
    result = _amp(MinSQNR(30.0))
    assert result.met and result.float_layers == ("convs.1",) and result.score >= 30.0
    assert result.qconfig_mapping.qconfig_for("convs.1", nn.Conv2d) is None
    assert MAPPING.qconfig_for("convs.1", nn.Conv2d) is BAD                  # the user's mapping is not changed
    flops = quantizable_layers(model, (DATA[0],), fxquant.backends.get_backend_config("fbgemm"))
    total = sum(f for _, f in flops.values())
    assert result.int8_flop_share == pytest.approx(1 - flops["convs.1"][1] / total)
    # the returned mapping reproduces the returned model
    prepared = fxquant.prepare_fx(model, result.qconfig_mapping, (DATA[0],), backend_config="fbgemm")
    fxquant.calibrate(prepared, DATA, progress=False)
    again = fxquant.convert_fx(prepared)
    assert torch.equal(again(EVAL[0]), result.model(EVAL[0]))
    assert fxquant.sqnr(model(EVAL[0]), result.model(EVAL[0])) == pytest.approx(result.score)
    assert "convs.1" in str(result) and "target met" in str(result)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_sensitivity_in_both_modes_ranks_the_bad_layer_first():
    kwargs = dict(evaluation=EVAL, backend_config="fbgemm", progress=False)
    floats = sensitivity(seeded(ConvChain()), MAPPING, DATA[0], DATA, MinSQNR(0.0), **kwargs)
    assert floats.layers[0].name == "convs.1" and floats.layers[0].score > floats.all_int8 + 10
    assert [r.score for r in floats.layers] == sorted((r.score for r in floats.layers), reverse=True)
    alone = sensitivity(seeded(ConvChain()), MAPPING, DATA[0], DATA, mode="quantize_one", **kwargs)
    assert alone.layers[0].name == "convs.1" and alone.layers[0].score < alone.layers[1].score - 10
    assert {r.name for r in alone.layers} == {f"convs.{i}" for i in range(4)} and "FLOPs" in str(alone)
    one = sensitivity(seeded(ConvChain()), MAPPING, DATA[0], DATA, layers=["convs.3"], **kwargs)
    assert [r.name for r in one.layers] == ["convs.3"]


def test_targets_already_met_or_out_of_reach():
    result = _amp(MinSQNR(-math.inf))
    assert result.met and result.float_layers == () and result.evaluations == 1 and result.sensitivity is None
    capped = _amp(MinSQNR(1000.0), max_float=1)
    assert not capped.met and len(capped.float_layers) == 1 and "NOT met" in str(capped)


def test_user_metric_and_cosine_targets():
    model = seeded(ConvChain())
    reference = model(EVAL[0]).detach()

    def neg_mse(m):
        return -float(((m(EVAL[0]) - reference) ** 2).mean())

    assert neg_mse(_amp(MinSQNR(-math.inf)).model) < -1e-5        # all int8 misses the tolerance
    result = _amp(MetricTolerance(neg_mse, tolerance=1e-5))
    assert result.met and neg_mse(result.model) >= -1e-5 and "convs.1" in result.float_layers
    cos = _amp(MinCosine(0.999))
    assert cos.met and cos.score >= 0.999 and cos.float_layers[0] == "convs.1"


def test_flops_are_multiply_accumulates_per_sample():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(),
                          nn.Linear(8 * 10 * 10, 5)).eval()
    layers = quantizable_layers(model, (torch.randn(2, 3, 12, 12),), fxquant.backends.get_backend_config("fbgemm"))
    assert layers == {"0": ("Conv2d", 8 * 12 * 12 * 3 * 9), "1": ("Conv2d", 8 * 10 * 10 * 1 * 9),
                      "3": ("Linear", 5 * 800)}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode must be 'float_one' or 'quantize_one'"):
        sensitivity(seeded(ConvChain()), MAPPING, DATA[0], DATA, mode="both", progress=False)
    with pytest.raises(ValueError, match="not conv / linear layers of the model: \\['convs.9'\\]"):
        sensitivity(seeded(ConvChain()), MAPPING, DATA[0], DATA, layers=["convs.9"], backend_config="fbgemm",
                    progress=False)
    training = seeded(ConvChain()).train()
    with pytest.raises(ValueError, match="needs the model in eval mode: call model.eval"):
        auto_mixed_precision(training, MAPPING, DATA[0], DATA, MinSQNR(30.0), progress=False)
    assert training.training  # the user's flag is left as it was


@pytest.mark.slow
def test_resnet18_mixed_precision_reaches_its_target_with_most_flops_in_int8():
    model = torchvision_model("resnet18", image_size=32)
    data = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    evaluation = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))]
    mapping = fxquant.get_default_qconfig_mapping("fbgemm")
    base = sensitivity(model, mapping, data[0], data, evaluation=evaluation, backend_config="fbgemm", progress=False,
                       layers=["conv1", "fc"])
    goal = base.all_int8 + 1.0
    result = auto_mixed_precision(model, mapping, data[0], data, MinSQNR(goal), evaluation=evaluation,
                                  backend_config="fbgemm", progress=False)
    assert result.met and result.score >= goal and result.int8_flop_share >= 0.5
    assert len(result.float_layers) < len(quantizable_layers(model, (data[0],), result.model.meta["fxquant_state"].backend))


class _Untraceable(nn.Module):
    """Control flow on a tensor value: prepare_fx quantizes the traceable pieces (fxquant.partial)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        y = self.fc2(torch.relu(self.fc1(x)))
        if y.sum() > 0:
            y = -y
        return self.head(y)


def test_models_torch_fx_cannot_trace_whole_and_embedding_targets():
    model = seeded(_Untraceable())
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    layers = quantizable_layers(model, (data[0],))
    assert layers == {"fc1": ("Linear", 32 * 16), "fc2": ("Linear", 16 * 32), "head": ("Linear", 4 * 16)}
    mapping = fxquant.get_default_qconfig_mapping("fbgemm").set_module_name("fc2", BAD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = auto_mixed_precision(model, mapping, data[0], data, MinCosine(0.9999, embed=lambda m, b: m(b)[:, :2]),
                                      backend_config="fbgemm", progress=False)
    assert result.met and result.float_layers[0] == "fc2"
    assert result.int8_flop_share <= 1 - 512 / (512 + 512 + 64) + 1e-9


def test_a_fallback_qconfig_instead_of_float_keeps_every_flop_in_int8():
    good = fxquant.get_default_qconfig("fbgemm")
    result = _amp(MinSQNR(30.0), fallback=good)
    assert result.met and result.float_layers == ("convs.1",) and result.int8_flop_share == 1.0
    assert result.qconfig_mapping.qconfig_for("convs.1", nn.Conv2d) is good
