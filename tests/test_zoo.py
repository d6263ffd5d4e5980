"""Real models against fp32 and against the reference (torch.ao.quantization), on small random inputs.

Models are torchvision architectures with random weights (seeded) whose batch-norm statistics are
re-estimated on random batches (tests/models.py:torchvision_model); inputs are 2x3x64x64, calibration is 3
batches. SQNR is the model output's signal-to-quantization-noise ratio against the fp32 model, in dB.

Floors were set from measurements (torch 2.14.1, an AVX512-VNNI CPU, where fbgemm uses full 8-bit activations;
see MEASURED): about 3 dB below the measured value, and for fbgemm below what the same model gives with 7-bit
activations (``reduce_range``, what fbgemm's table picks on CPUs without VNNI), so they hold on either kind of CPU.

The lean test (resnet18, mobilenet_v2) runs by default; the rest is ``@pytest.mark.slow`` (--runslow or
FXQUANT_SLOW=1).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import fxquant
from models import ao_quantize, quantize, restore_engine, torchvision_model  # noqa: F401 (autouse fixture)
from fxquant.report import float_ops

#: measured SQNR (dB) on this machine: (fxquant fbgemm, fxquant fbgemm with 7-bit activations, fxquant qnnpack,
#: torch.ao fbgemm). The 7-bit column is what fbgemm's table picks on CPUs without VNNI; it stays within 0.2 dB of
#: torch.ao (which always uses 7 bits on fbgemm), inside AO_MARGIN_DB.
MEASURED = {
    "resnet18": (24.26, 22.02, 24.17, 21.22),
    "mobilenet_v2": (34.65, 31.19, 35.64, 31.09),
    "mobilenet_v3_large": (32.77, 29.43, 2.87, 29.41),
    "googlenet": (37.71, 33.78, 38.72, 33.96),
    "regnet_x_400mf": (36.66, 33.83, 38.10, 33.38),
    "efficientnet_b0": (37.19, 32.55, 37.33, 31.60),
    "shufflenet_v2_x1_0": (40.34, 34.91, 40.49, 34.67),
    "resnet50": (24.42, 22.12, 25.06, 21.82),
}

#: the floors the tests assert: about 3 dB below the 7-bit figure for fbgemm, below the measured one for qnnpack
FLOORS = {
    "resnet18": {"fbgemm": 19.0, "qnnpack": 21.0},
    "mobilenet_v2": {"fbgemm": 28.0, "qnnpack": 32.0},
    "mobilenet_v3_large": {"fbgemm": 26.0, "qnnpack": 25.0},
    "googlenet": {"fbgemm": 30.0, "qnnpack": 35.0},
    "regnet_x_400mf": {"fbgemm": 30.0, "qnnpack": 35.0},
    "efficientnet_b0": {"fbgemm": 29.0, "qnnpack": 34.0},
    "shufflenet_v2_x1_0": {"fbgemm": 31.0, "qnnpack": 37.0},
    "resnet50": {"fbgemm": 19.0, "qnnpack": 22.0},
}

LEAN = ["resnet18", "mobilenet_v2"]
SLOW = ["mobilenet_v3_large", "googlenet", "regnet_x_400mf", "efficientnet_b0", "shufflenet_v2_x1_0", "resnet50"]

#: fxquant must not be worse than torch.ao by more than this on fbgemm (same model, inputs and calibration)
AO_MARGIN_DB = 0.5


@functools.lru_cache(maxsize=2)
def _model(name: str) -> nn.Module:
    return torchvision_model(name, image_size=64)


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(123)
    calib = [torch.randn(2, 3, 64, 64, generator=gen) for _ in range(3)]
    x = torch.randn(2, 3, 64, 64, generator=gen)
    return calib, x


def _check(name: str, backend: str, data, expect_all_quantized: bool) -> None:
    calib, x = data
    model = _model(name)
    with torch.no_grad():
        reference = model(x)
    _, converted = quantize(model, calib[0], backend, calib)
    assert torch.backends.quantized.engine == converted.meta["fxquant_state"].backend.engine
    with torch.no_grad():
        ours = fxquant.sqnr(reference, converted(x))
    assert ours >= FLOORS[name][backend], f"{name} on {backend}: SQNR {ours:.2f} dB < floor {FLOORS[name][backend]}"
    if expect_all_quantized:
        assert float_ops(converted) == []
    if backend == "fbgemm":
        with torch.no_grad():
            theirs = fxquant.sqnr(reference, ao_quantize(model, calib[0], calib, "fbgemm")(x))
        assert ours >= theirs - AO_MARGIN_DB, f"{name}: fxquant {ours:.2f} dB vs torch.ao {theirs:.2f} dB"


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
@pytest.mark.parametrize("name", LEAN)
def test_lean_zoo_sqnr_floor_and_reference(name, backend, data):
    # every op of these two models has a kernel on both backends: nothing may stay float
    _check(name, backend, data, expect_all_quantized=True)


def _slow_params():
    for name in SLOW:
        for backend in ("fbgemm", "qnnpack"):
            marks = [pytest.mark.slow]
            yield pytest.param(name, backend, marks=marks, id=f"{name}-{backend}")


@pytest.mark.parametrize("name, backend", list(_slow_params()))
def test_zoo_sqnr_floor(name, backend, data):
    _check(name, backend, data, expect_all_quantized=False)


def test_reestimate_bn_runs_only_models_that_track_running_statistics():
    """fxquant.zoo.reestimate_bn updates batch-norm statistics by train-mode forwards, and does not run a model
    without them (a ViT's forwards at 224 pixels would change nothing)."""
    from fxquant.zoo import reestimate_bn

    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    calls: list[bool] = []

    def count(module: nn.Module, args: tuple) -> None:
        calls.append(module.training)

    norm_free = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU())
    norm_free.register_forward_pre_hook(count)
    assert reestimate_bn(norm_free, batches) is norm_free
    assert calls == [] and not norm_free.training

    with_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with_bn.register_forward_pre_hook(count)
    reestimate_bn(with_bn, batches)
    assert calls == [True, True, True] and not with_bn.training
    assert not torch.equal(with_bn[1].running_mean, torch.zeros(4))
