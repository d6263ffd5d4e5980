"""ONNX export (fxquant.export_onnx) checked in ONNX Runtime against fxquant's int8 model.

"Steps" are units of the model output's quantization scale, counted as integers (``bench_onnx.steps``). Lean: the
digits CNN (scikit-learn digits, the model of tests/bench_qat.py) and small models; slow: resnet18 and mobilenet_v2
(small and full image size). ``python tests/bench_onnx.py --layers resnet18 --size 64`` prints the per-layer figures
behind the resnet18 tests.
"""

from __future__ import annotations

import collections
import warnings
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

import fxquant
from fxquant.errors import FxQuantError
from fxquant.passes.reference import IntegerPoolingPass

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from bench_onnx import _round_bias_like_ort, steps  # noqa: E402  (tests/ is on the path, as for bench_qat)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _quantize(model: nn.Module, backend: str, example: torch.Tensor, calibration: list[torch.Tensor], mapping=None):
    mapping = mapping or fxquant.get_default_qconfig_mapping(backend)
    prepared = _quiet(fxquant.prepare_fx, model.eval(), mapping, (example,), backend_config=backend)
    _quiet(fxquant.calibrate, prepared, calibration, progress=False)
    return prepared, _quiet(fxquant.convert_fx, prepared)


def _session(path, optimized: str | None = None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _output_scale(prepared) -> float:
    out = fxquant.convert_to_reference_fx(prepared).graph.output_node().args[0]
    while out.target is not torch.ops.fxquant.dequantize_per_tensor.default:  # through flatten and the like
        out = out.args[0]
    return float(out.args[1])


def _on_the_grid(quantized: nn.Module, backend: str) -> nn.Module:
    """fxquant's int8 model with every module's quantized output clamped to the backend's activation grid (a copy),
    what the reference form and so the exported file compute.

    Only differs on a CPU without VNNI, where fbgemm's grid is 7-bit (``reduce_range``: codes 0..127): its kernels
    write codes up to 255 on that grid where an input lies beyond the calibrated range (measured on the digits CNN:
    codes up to 155 on 0.01-0.04% of each layer's outputs), while the reference form, and the export's ``Clip``
    after ``QuantizeLinear`` (``test_narrow_activation_ranges_get_a_clip``), stop at 127. Measured on the digits
    CNN / the inception block there: ORT vs fxquant int8 up to 3 / 5 steps, vs this clamped model 1 / 1 (0 / 0
    given ORT's int32 bias). Not ORT saturating: ``session.x64quantprecision`` changes nothing there (7-bit codes
    cannot saturate its int16 pair sums). With VNNI the grid spans uint8 and this is the model itself."""
    import copy

    from models import activation_range

    lo, hi = activation_range(backend)
    if (lo, hi) == (0, 255):
        return quantized

    def clamp(module, inputs, out):
        if isinstance(out, torch.Tensor) and out.is_quantized and out.qscheme() == torch.per_tensor_affine:
            return torch._make_per_tensor_quantized_tensor(out.int_repr().clamp(lo, hi), out.q_scale(),
                                                           out.q_zero_point())
        return None

    clamped = copy.deepcopy(quantized)
    for name, module in clamped.named_modules():
        if name:
            module.register_forward_hook(clamp)
    return clamped


def _steps_to_int8(prepared, quantized, path, x: torch.Tensor, optimized: str | None = None,
                   backend: str = "fbgemm") -> torch.Tensor:
    """|ORT - fxquant int8| in output quantization steps, element by element (fxquant's codes on the activation
    grid: :func:`_on_the_grid`)."""
    fxquant.export_onnx(prepared, (x[:4],), path, dynamic_batch=True)
    with torch.no_grad():
        expected = _on_the_grid(quantized, backend)(x)
    return steps(_run(_session(path, optimized), x), expected, _output_scale(prepared))


def _steps_to_int8_with_ort_bias(prepared, quantized, path, x: torch.Tensor,
                                 backend: str = "fbgemm") -> torch.Tensor:
    """|ORT - fxquant int8| where fxquant's convs / linears get the int32 bias ORT computes (``round(bias /
    (x_scale * w_scale))``, fbgemm adds the float bias): what is left of the difference once that is taken out."""
    import copy

    rounded = copy.deepcopy(quantized)
    _round_bias_like_ort(rounded, prepared)
    with torch.no_grad():
        expected = _on_the_grid(rounded, backend)(x)
    return steps(_run(_session(path), x), expected, _output_scale(prepared))


def _digits():
    from bench_qat import DigitsCNN, digits

    from fxquant.zoo import reestimate_bn

    x_train, _, x_test, _ = digits()
    torch.manual_seed(0)
    model = reestimate_bn(DigitsCNN(), [x_train[i:i + 64] for i in range(0, 512, 64)])
    return model, x_train, x_test


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
def test_digits_cnn_in_onnx_runtime_matches_fxquant_int8(backend, tmp_path):
    model, x_train, x_test = _digits()
    prepared, quantized = _quantize(model, backend, x_test[:4], [x_train[i:i + 64] for i in range(0, 512, 64)])
    optimized = str(tmp_path / "opt.onnx")
    diff = _steps_to_int8(prepared, quantized, tmp_path / "digits.onnx", x_test, optimized, backend)
    assert float((diff <= 2).float().mean()) >= 0.999, diff.max()
    ops = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    assert ops["QLinearConv"] == 3 and "Conv" not in ops, ops  # ORT ran every conv in int8
    if backend == "fbgemm":  # the only arithmetic difference left is the bias: ORT's QLinearConv / QGemm add it as
        # int32, fbgemm in float (qnnpack's kernels round it too, but requantize differently from ORT)
        diff = _steps_to_int8_with_ort_bias(prepared, quantized, tmp_path / "digits.onnx", x_test, backend)
        assert int(diff.max()) == 0


def test_weights_reading_8_bit_activations_are_uint8_where_orts_int8_kernels_saturate(tmp_path):
    """On x86-64 without VNNI ORT's uint8 x int8 kernels sum pairs of products in int16 (VPMADDUBSW; ORT's docs:
    use reduce_range or U8U8 there): measured on this CPU kind (AMD EPYC, AVX2) with qnnpack's full 8-bit
    activations, the int8-weight file is up to 35 steps from fxquant int8 (29% within 2 steps), as with int8 weights
    and ``session.x64quantprecision=1`` it is 0. ``unsigned_weights`` writes those weights as uint8 ``q + 128``
    with zero point 128: the same float weights, run by ORT's exact uint8 x uint8 kernels (0 steps there)."""
    from fxquant.backends.cpu import onnx_runtime_u8s8_saturates

    model, x_train, x_test = _digits()
    prepared, quantized = _quantize(model, "qnnpack", x_test[:4], [x_train[i:i + 64] for i in range(0, 512, 64)])
    files = {}
    for unsigned in (True, False, None):
        files[unsigned] = str(tmp_path / f"{unsigned}.onnx")
        fxquant.export_onnx(prepared, (x_test[:4],), files[unsigned], dynamic_batch=True, unsigned_weights=unsigned)

    def weights(path):
        graph = onnx.load(path).graph
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        return [(inits[n.input[0]].dtype.name, set(inits[n.input[2]].flatten().tolist())) for n in graph.node
                if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim > 1]

    assert weights(files[True]) == [("uint8", {128})] * 4 and weights(files[False]) == [("int8", {0})] * 4
    assert weights(files[None]) == weights(files[onnx_runtime_u8s8_saturates()])
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the file's float reading
    readings = [_run(ort.InferenceSession(files[u], plain, providers=["CPUExecutionProvider"]), x_test)
                for u in (True, False)]
    assert torch.equal(readings[0], readings[1])
    optimized = str(tmp_path / "opt.onnx")
    with torch.no_grad():
        expected = quantized(x_test)
    diff = steps(_run(_session(files[True], optimized), x_test), expected, _output_scale(prepared))
    assert float((diff <= 2).float().mean()) >= 0.999, diff.max()
    ops = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 1 and "Conv" not in ops, ops  # still int8 in ORT


def test_the_onnx_file_holds_int8_weights_and_per_axis_qdq(tmp_path):
    model, x_train, x_test = _digits()
    prepared, _ = _quantize(model, "fbgemm", x_test[:4], [x_train[:64]])
    fxquant.export_onnx(prepared, (x_test[:4],), tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    inits = {i.name: i for i in graph.initializer}
    weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert len(weights) == 4  # 3 convs + the linear, stored as int8 initializers
    assert all(a.name == "axis" and a.i == 0 for n in weights for a in n.attribute)
    assert {n.op_type for n in graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"}


def test_narrow_activation_ranges_get_a_clip(tmp_path):
    """ONNX's QuantizeLinear saturates to the dtype's range; 7-bit activations (reduce_range) are clipped to
    0..127 after it, so ORT's result equals the reference model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    qconfig = fxquant.QConfig(fxquant.MinMaxObserver.with_args(reduce_range=True),
                              weight=fxquant.default_per_channel_qconfig.weight)
    x = torch.randn(8, 3, 12, 12)
    prepared, _ = _quantize(model, "fbgemm", x, [x], fxquant.QConfigMapping().set_global(qconfig))
    fxquant.export_onnx(prepared, (x,), tmp_path / "m.onnx")
    assert "Clip" in {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    with torch.no_grad():
        ref = fxquant.convert_to_reference_fx(prepared)(10 * x)  # far outside the calibrated range: clamps bite
    assert float(steps(_run(_session(tmp_path / "m.onnx"), 10 * x), ref, _output_scale(prepared)).max()) <= 1


def test_average_pooling_is_exported_on_the_integer_grid(tmp_path):
    """A 2x2 average of integers is an exact half in a quarter of the cases; fbgemm rounds it to even, the float
    reading of dequantize -> avg_pool -> quantize lands a rounding error either side. export_onnx writes pooling
    spans as dequantize(q, 1, zp) -> ... -> quantize(1, zp), so ORT returns fxquant's int8 integers exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.AvgPool2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten())
    x = torch.randn(64, 8, 8, 8)
    prepared, quantized = _quantize(model, "fbgemm", x, [x])
    ref = fxquant.convert_to_reference_fx(prepared)
    assert IntegerPoolingPass().run(ref).modified
    dq = torch.ops.fxquant.dequantize_per_tensor.default
    assert sum(n.target is dq and n.args[1] == 1.0 for n in ref.graph.nodes) == 2  # avg_pool; relu -> adaptive
    assert not IntegerPoolingPass().run(ref).modified  # idempotent
    fxquant.export_onnx(prepared, (x,), tmp_path / "m.onnx")
    with torch.no_grad():
        expected = quantized(x)
    assert int(steps(_run(_session(tmp_path / "m.onnx"), x), expected, _output_scale(prepared)).max()) == 0


def test_export_onnx_refuses_converted_models_and_old_opsets(tmp_path):
    model, x_train, x_test = _digits()
    prepared, quantized = _quantize(model, "fbgemm", x_test[:4], [x_train[:64]])
    with pytest.raises(FxQuantError, match="export the calibrated prepared model"):
        fxquant.export_onnx(quantized, (x_test[:4],), tmp_path / "m.onnx")
    with pytest.raises(FxQuantError, match="opset >= 13"):
        fxquant.export_onnx(prepared, (x_test[:4],), tmp_path / "m.onnx", opset_version=12)
    with pytest.raises(FxQuantError, match="prepare_fx"):
        fxquant.export_onnx(model, (x_test[:4],), tmp_path / "m.onnx")


class _Case(NamedTuple):
    diff: torch.Tensor  # steps between ORT and fxquant int8
    sqnr_int8: float  # dB against fp32
    sqnr_ort: float
    prepared: nn.Module
    quantized: nn.Module
    x: torch.Tensor
    path: Any


def _zoo_case(name: str, size: int, tmp_path) -> _Case:
    """Steps between ORT and fxquant int8 on 16 images, and the SQNR (dB) of each against fp32."""
    from fxquant.zoo import torchvision_model

    model = torchvision_model(name, image_size=size, bn_batches=2, batch_size=4)
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randn(4, 3, size, size, generator=gen) for _ in range(4)]
    prepared, quantized = _quantize(model, "fbgemm", calibration[0], calibration)
    x = torch.randn(16, 3, size, size, generator=gen)
    path = tmp_path / f"{name}.onnx"
    diff = _steps_to_int8(prepared, quantized, path, x)
    with torch.no_grad():
        fp32, int8 = model(x), quantized(x)
    ort_out = _run(_session(path), x)
    return _Case(diff, fxquant.sqnr(fp32, int8), fxquant.sqnr(fp32, ort_out), prepared, quantized, x, path)


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 224])
def test_mobilenet_v2_in_onnx_runtime_matches_fxquant_int8(size, tmp_path):
    diff = _zoo_case("mobilenet_v2", size, tmp_path).diff
    assert float((diff <= 2).float().mean()) >= 0.999, diff.max()


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 224])
def test_resnet18_in_onnx_runtime_differs_from_fxquant_int8_by_orts_bias_rounding(size, tmp_path):
    """Misses the 99.9%-within-2-steps target at 64 px (docs/export.md: 97.8% on this model, max 5 steps; 100% at
    224 px on this model, 99.5% on bench_onnx's). The cause is one rounding: ORT's QLinearConv / QGemm take the bias
    as int32 in units of x_scale * w_scale (the ONNX definition), fbgemm adds the float bias. That moves 0.01-0.05%
    of each conv's outputs by one step; resnet18 (random weights) spreads those through its receptive fields to half
    the elements of layer4 and, at 64 px after a 2x2 average pool, to 2% of the logits by 3-5 steps. Given ORT's
    int32 bias, fxquant's int8 model meets the target against ORT (at 64 px bit for bit)."""
    case = _zoo_case("resnet18", size, tmp_path)
    assert float((case.diff <= 2).float().mean()) >= 0.95 and float(case.diff.max()) <= 6, case.diff.max()
    # on a 7-bit grid (fbgemm without VNNI) the file clips every activation at code 127 where the int8 kernels
    # write up to 255, which costs ORT a little more (0.56 dB at 64 px on one such CPU)
    from models import activation_range
    margin = 1.0 if activation_range("fbgemm") != (0, 255) else 0.5
    assert case.sqnr_ort >= case.sqnr_int8 - margin, (case.sqnr_ort, case.sqnr_int8)
    same_bias = _steps_to_int8_with_ort_bias(case.prepared, case.quantized, case.path, case.x)
    assert float((same_bias <= 2).float().mean()) >= 0.999, same_bias.max()


def test_the_example_on_docs_export_md_runs():
    import os
    import re

    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "export.md")) as f:
        code = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(code) == 1
    _quiet(exec, compile(code[0], "docs/export.md", "exec"), {})  # its asserts are the checks


class _Inception(nn.Module):
    """Three conv + ReLU branches concatenated: each branch only feeds the cat, so fxquant's convs write straight
    into the cat's grid (passes/observe.py, _grid_taking_reader) and the int8 cat copies."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU())
        self.b5 = nn.Sequential(nn.Conv2d(8, 2, 5, padding=2), nn.ReLU())

    def forward(self, x):
        y = self.stem(x)
        return torch.cat([self.b1(y), self.b3(y), self.b5(y)], 1)


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
def test_convs_written_in_a_cats_grid_still_run_as_int8_convs_in_onnx_runtime(backend, tmp_path):
    """The reference form puts the cat's quantize/dequantize right after each such conv (what the int8 conv
    writes), so ONNX Runtime still fuses every conv into QLinearConv, and the concatenation into QLinearConcat."""
    torch.manual_seed(0)
    model = _Inception().eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 12, 12, generator=gen) for _ in range(3)]
    x = torch.randn(8, 3, 12, 12, generator=gen)
    prepared, quantized = _quantize(model, backend, x[:4], calib)
    assert [n.target for n in quantized.graph.nodes if n.name == "cat"] == [torch.cat]  # the int8 cat copies
    optimized = str(tmp_path / "opt.onnx")
    diff = _steps_to_int8(prepared, quantized, tmp_path / "inception.onnx", x, optimized, backend)
    ops = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    assert ops["QLinearConv"] == 4 and "Conv" not in ops and "FusedConv" not in ops, ops
    assert ops["QLinearConcat"] == 1, ops
    assert float((diff <= 2).float().mean()) >= 0.999, diff.max()
