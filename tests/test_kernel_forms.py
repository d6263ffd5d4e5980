"""Where the qtensor kernel layer runs an op in float between its grids instead of torch's int8 kernel: SiLU on
fbgemm (no int8 kernel; the alternative was an int8 sigmoid and mul) and a per-channel broadcast in add / mul
(torch's kernel walks it pixel by pixel). Same integers as the int8 form within one code, never worse numbers."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxquant
from fxquant.backends.kernels.qtensor import QuantizedBinary, broadcast_is_slow, float_binary
from fxquant.backends.kernels.qtensor_ops import QuantizedSiLU
from fxquant.qparams import QParams
from fxquant.report import float_ops

from models import quantize, seeded

warnings.filterwarnings("ignore", category=UserWarning)   # quantized tensors' deprecation warnings


class _SiLUBlock(nn.Module):
    """conv -> BN -> SiLU -> conv, and a squeeze-excite gate over 72 channels (x * sigmoid(fc(pool(x))))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 72, 3, padding=1)
        self.bn = nn.BatchNorm2d(72)
        self.act = nn.SiLU()
        self.fc = nn.Conv2d(72, 72, 1)
        self.out = nn.Conv2d(72, 8, 1)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        gate = torch.sigmoid(self.fc(nn.functional.adaptive_avg_pool2d(y, 1)))
        return self.out(y * gate)


def _calib(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 12, 12, generator=gen) for _ in range(n)]


def _kinds(gm: torch.fx.GraphModule) -> list[str]:
    mods = dict(gm.named_modules())
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append(type(mods[str(n.target)]).__name__)
        elif n.op in ("call_function", "call_method"):
            out.append(getattr(n.target, "__name__", str(n.target)))
    return out


def test_fbgemm_runs_silu_in_float_between_its_grids_and_qnnpack_as_sigmoid_times_x():
    model = seeded(_SiLUBlock())
    calib = _calib()
    _, fb = quantize(model, calib[0], "fbgemm", calib)
    kinds = _kinds(fb)
    assert kinds.count("QuantizedSiLU") == 1 and kinds.count("sigmoid") == 1   # the gate's sigmoid stays int8
    assert not float_ops(fb)
    _, qn = quantize(model, calib[0], "qnnpack", calib)
    assert "QuantizedSiLU" not in _kinds(qn) and _kinds(qn).count("sigmoid") == 2
    with torch.no_grad():
        ref = model(calib[1])
        torch.backends.quantized.engine = "fbgemm"
        fb_sqnr = fxquant.sqnr(ref, fb(calib[1]))
        torch.backends.quantized.engine = "qnnpack"
        qn_sqnr = fxquant.sqnr(ref, qn(calib[1]))
    assert fb_sqnr > 25 and qn_sqnr > 20


def test_silu_module_is_float_silu_rounded_once():
    gen = torch.Generator().manual_seed(0)
    x = torch.quantize_per_tensor(torch.randn(1, 40, 6, 6, generator=gen) * 3, 0.05, 64, torch.quint8)
    out = QParams(torch.tensor(0.03), torch.tensor(10), torch.quint8)
    y = QuantizedSiLU(out)(x)
    expected = torch.quantize_per_tensor(nn.functional.silu(x.dequantize()), 0.03, 10, torch.quint8)
    assert torch.equal(y.int_repr(), expected.int_repr()) and y.q_scale() == pytest.approx(0.03) and y.q_zero_point() == 10


def test_the_broadcast_rule_picks_float_where_the_kernel_walks_values_one_at_a_time():
    def q(*shape, channels_last=False):
        t = torch.quantize_per_tensor(torch.rand(*shape), 0.01, 0, torch.quint8)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    gate = q(1, 32, 1, 1).as_strided((1, 32, 1, 1), (32, 1, 32, 32))   # a conv's output: channels_last strides
    x = q(1, 32, 48, 48, channels_last=True)
    assert broadcast_is_slow(gate, x) and broadcast_is_slow(x, gate)       # 2304 runs of 32, one at a time
    assert not broadcast_is_slow(q(1, 128, 48, 48, channels_last=True), q(1, 128, 1, 1))   # runs of 2 x 64
    assert not broadcast_is_slow(q(1, 144, 28, 28, channels_last=True), q(1, 144, 1, 1))   # 16 of 144 left
    assert not broadcast_is_slow(gate, q(1, 32, 11, 11, channels_last=True))  # 3872 values: not worth 8 us
    assert broadcast_is_slow(q(1, 128, 1, 1), q(1, 128, 8, 8, channels_last=True))  # first, NCHW strides
    nhwc = q(1, 14, 14, 384).permute(0, 3, 1, 2)
    assert broadcast_is_slow(q(384, 1, 1), nhwc) and not broadcast_is_slow(nhwc, q(384, 1, 1))   # ConvNeXt's
    assert broadcast_is_slow(q(768, 1, 1), q(1, 768, 7, 7))                # NCHW: runs of 49 pixels
    assert not broadcast_is_slow(q(384, 1, 1), q(1, 384, 14, 14))          # runs of 196 = 3 x 64 + 4
    assert not broadcast_is_slow(q(768), q(1, 197, 768))                   # a ViT bias: runs of 768
    assert not broadcast_is_slow(q(1, 72, 8, 8), q(1, 72, 8, 8))           # no broadcast
    assert not broadcast_is_slow(q(1, 72, 64, 1), q(1, 1, 1, 64))          # both broadcast: the kernel's
    assert not broadcast_is_slow(q(1, 72, 8, 8).permute(0, 2, 1, 3), q(1, 8, 1, 1))   # other layouts


@given(target=st.sampled_from(["add", "add_relu", "mul", "mul_relu"]), channels=st.integers(1, 140),
       side=st.integers(8, 40), gate_first=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_float_broadcast_is_the_kernel_within_one_code(target, channels, side, gate_first, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.quantize_per_tensor(torch.randn(1, channels, side, side, generator=gen) * 2, 0.04, 50, torch.quint8)
    x = x.contiguous(memory_format=torch.channels_last)
    gate = torch.quantize_per_tensor(torch.rand(1, channels, 1, 1, generator=gen), 1 / 256, 0, torch.quint8)
    a, b = (gate, x) if gate_first else (x, gate)
    out = QParams(torch.tensor(0.05), torch.tensor(40), torch.quint8)
    kernel = QuantizedBinary(target, out)(a, b)
    floats = QuantizedBinary(target, out, float_broadcast=True)(a, b)
    n = channels * side * side
    assert broadcast_is_slow(a, b) == (n >= 4096 and (gate_first or side * side * (channels % 64) * 28 > 4 * (80000 + n // 2)))
    assert floats.shape == kernel.shape and floats.dtype == kernel.dtype
    assert (floats.q_scale(), floats.q_zero_point()) == (kernel.q_scale(), kernel.q_zero_point())
    assert int((floats.int_repr().int() - kernel.int_repr().int()).abs().max()) <= 1
    taken = float_binary(target, a, b, 0.05, 40) if broadcast_is_slow(a, b) else kernel
    assert torch.equal(floats.int_repr(), taken.int_repr())


def test_an_se_model_takes_the_float_broadcast_on_fbgemm_only_and_scripts_to_the_same_integers():
    model = seeded(_SiLUBlock())
    calib = _calib()
    _, fb = quantize(model, calib[0], "fbgemm", calib)
    _, qn = quantize(model, calib[0], "qnnpack", calib)
    muls = [m for m in fb.modules() if isinstance(m, QuantizedBinary)]
    assert len(muls) == 1 and muls[0].float_broadcast
    assert not any(m.float_broadcast for m in qn.modules() if isinstance(m, QuantizedBinary))
    scripted = torch.jit.script(fb)
    torch.backends.quantized.engine = "fbgemm"
    with torch.no_grad():
        assert torch.equal(scripted(calib[2]), fb(calib[2]))


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
def test_converted_model_state_dict_round_trip_keeps_the_kernel_forms(backend, tmp_path):
    """fxquant.save / load rebuild the modules from the tables, so the forms come back."""
    model = seeded(_SiLUBlock())
    calib = _calib()
    _, converted = quantize(model, calib[0], backend, calib)
    path = tmp_path / "m.pt"
    fxquant.save(converted, str(path))
    loaded = fxquant.load(str(path), _SiLUBlock())
    assert _kinds(loaded) == _kinds(converted)
    torch.backends.quantized.engine = backend
    with torch.no_grad():
        assert torch.equal(loaded(calib[2]), converted(calib[2]))
