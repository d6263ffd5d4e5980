"""fxquant.numeric: per-layer comparison of a quantized model with its float model (propagated and isolated),
weight comparison, and the metrics themselves."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxquant
from fxquant.errors import FxQuantError
from fxquant.numeric import NumericReport, compare_layers, compare_weights, cosine, relative_l2, sqnr
from fxquant.testing import examples

from models import TWO_BIT, ConvChain, Residual, SmallCNN, seeded, torchvision_model


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's quantized-tensor deprecation warnings
        yield


def _quantize(model, x, mapping=None, backend="fbgemm", batches=None):
    mapping = mapping or fxquant.get_default_qconfig_mapping(backend)
    prepared = fxquant.prepare_fx(model, mapping, (x,), backend_config=backend)
    fxquant.calibrate(prepared, batches or [x], progress=False)
    return fxquant.convert_fx(prepared)


# =============================================================================== metrics

@settings(max_examples=examples(50))
@given(st.integers(0, 2 ** 16), st.floats(1e-4, 2.0), st.integers(1, 200))
def test_metrics_agree_with_each_other(seed, noise, n):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, generator=g)
    approx = ref + noise * torch.randn(n, generator=g)
    s, c, r = sqnr(ref, approx), cosine(ref, approx), relative_l2(ref, approx)
    assert s == pytest.approx(-20 * math.log10(r), rel=1e-6, abs=1e-6)   # SQNR is relative L2 in dB
    assert -1.0 - 1e-12 <= c <= 1.0 + 1e-12 and c == pytest.approx(cosine(approx, ref))
    assert cosine(ref, 3.0 * ref) == pytest.approx(1.0) and relative_l2(ref, ref) == 0.0
    assert sqnr(ref, ref) == math.inf and cosine(torch.zeros(3), torch.zeros(3)) == 1.0


# =============================================================================== layers

#: 2-bit weights: the layer that loses accuracy on purpose
BAD = TWO_BIT


def test_the_layer_that_loses_accuracy_is_found_isolated_and_its_error_propagates():
    model = seeded(ConvChain())
    x = torch.randn(8, 3, 12, 12)
    before = copy.deepcopy(model.state_dict())
    quantized = _quantize(model, x, fxquant.get_default_qconfig_mapping("fbgemm").set_module_name("convs.1", BAD))
    report = compare_layers(model, quantized, (x,))
    assert [r.name for r in report.layers] == ["convs_0", "convs_1", "convs_2", "convs_3"]
    assert [r.op for r in report.layers] == ["conv2d_relu"] * 3 + ["conv2d"]
    assert report.worst(1)[0].name == "convs_1"
    first, bad, after = report.layer("convs_0"), report.layer("convs_1"), report.layer("convs_2")
    assert first.isolated_sqnr == pytest.approx(first.sqnr)      # the first layer's input is the model's input
    assert bad.isolated_sqnr < first.isolated_sqnr - 20
    assert after.isolated_sqnr > after.sqnr + 20                  # convs_2 itself is fine: it inherits the error
    assert min(report.weights, key=lambda w: w.sqnr).name == "convs_1"
    assert all(k in str(report) for k in ("convs_1", "iso SQNR", "weight"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # the model is untouched


@pytest.mark.parametrize("backend", ["fbgemm", "x86", "qnnpack"])
def test_residual_and_shares_input_ops_are_matched(backend):
    """Quantized tensors (fbgemm, qnnpack) or plain uint8 with the grid on the producing module (x86 on oneDNN,
    which also runs conv2 + add + relu as one kernel under the conv's name: compared with the float add_relu)."""
    model = seeded(SmallCNN())
    x = torch.randn(4, 3, 16, 16)
    quantized = _quantize(model, x, backend=backend)
    report = compare_layers(model, quantized, (x,), weights=False)
    ops = [r.op for r in report.layers]
    assert ops[0] == "conv2d_relu" and ops[-2:] == ["linear_relu", "linear"] and "add_relu" in ops
    assert report.weights == ()
    everything = compare_layers(model, quantized, (x,), all_nodes=True, weights=False)
    assert {"max_pool", "flatten"} <= {r.op for r in everything.layers}
    assert {r.name for r in report.layers} <= {r.name for r in everything.layers}
    assert all(r.cosine > 0.99 and r.isolated_cosine > 0.99 for r in everything.layers)
    assert [w.name for w in compare_weights(model, quantized)] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(w.sqnr > 30 for w in compare_weights(model, quantized))


def test_float_layers_are_not_reported_and_functional_inputs_work():
    model = seeded(Residual())
    x = torch.randn(2, 3, 8, 8)
    mapping = fxquant.get_default_qconfig_mapping("fbgemm")
    report = compare_layers(model, _quantize(model, x, mapping), x)       # a tensor for inputs is accepted
    assert report.layers and isinstance(report, NumericReport)
    first = report.layers[0].name
    partial = _quantize(model, x, copy.deepcopy(mapping).set_module_name(first, None))
    assert first not in [r.name for r in compare_layers(model, partial, (x,)).layers]


def test_bad_input_is_named():
    model = seeded(SmallCNN())
    x = torch.randn(2, 3, 16, 16)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,), backend_config="fbgemm")
    with pytest.raises(FxQuantError, match="a prepared model: calibrate and convert it first"):
        compare_layers(model, prepared, (x,))
    with pytest.raises(FxQuantError, match="expected the model returned by fxquant.convert_fx, got SmallCNN"):
        compare_layers(model, model, (x,))
    with pytest.raises(KeyError, match="no layer 'nope'"):
        NumericReport(()).layer("nope")


@pytest.mark.slow
def test_resnet18_every_layer_is_accurate_alone():
    model = torchvision_model("resnet18", image_size=64)
    x = torch.randn(4, 3, 64, 64)
    quantized = _quantize(model, x, batches=[torch.randn(4, 3, 64, 64) for _ in range(4)])
    report = compare_layers(model, quantized, (x,))
    assert len(report.layers) == 29 and len(report.weights) == 21
    assert all(r.isolated_sqnr > 25 for r in report.layers)
    assert report.layers[-2].sqnr < report.layers[0].sqnr    # the error grows along the network
