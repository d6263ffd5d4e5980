"""How the qtensor kernel layer calls torch's kernels where the plain call is slow.

- A quantized add / mul runs in float between its grids instead of torch's int8 kernel for a broadcast whose small
  operand comes first without channels_last strides against a channels_last activation (ConvNeXt's
  ``layer_scale * x``), which torch's kernel walks value by value. Same integers as the kernel within one code;
  everywhere else the kernel, unchanged.
- Convs and linears call their kernels through ``call_packed``, which skips torch's ``__torch_function__`` lookup
  on the packed weight when the input is a plain tensor: the same integers, and overrides still run."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxquant
from fxquant.backends.kernels.qtensor import QuantizedBinary, broadcast_is_slow, call_packed, float_binary
from fxquant.qparams import QParams

from models import quantize, seeded

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")   # quantized tensors' deprecation warnings


class _LayerScaleBlock(nn.Module):
    """A ConvNeXt-style block: depthwise conv, a channels-last MLP, the permute back, ``layer_scale * x`` (the
    scale first), the residual add; and a squeeze-excite gate (``gate * x``, the gate a conv's output)."""

    def __init__(self, c: int = 24) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.se = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(torch.relu(self.fc1(y))).permute(0, 3, 1, 2)
        x = self.layer_scale * y + x
        gate = torch.sigmoid(self.se(nn.functional.adaptive_avg_pool2d(x, 1)))
        return gate * x


def _calib(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(2, 24, 14, 14, generator=gen) for _ in range(n)]


def _q(*shape: int, channels_last: bool = False) -> torch.Tensor:
    t = torch.quantize_per_tensor(torch.rand(*shape), 0.01, 0, torch.quint8)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def test_the_broadcast_rule_takes_only_the_layout_clash():
    nhwc = _q(1, 14, 14, 384).permute(0, 3, 1, 2)   # what ConvNeXt's permute back leaves: channels_last strides
    assert broadcast_is_slow(_q(384, 1, 1), nhwc)                                  # the scale first: the clash
    assert not broadcast_is_slow(nhwc, _q(384, 1, 1))                              # the activation first
    assert broadcast_is_slow(_q(1, 384, 1, 1), nhwc)                               # 4-d, NCHW strides, first
    conv_gate = _q(1, 384, 1, 1).as_strided((1, 384, 1, 1), (384, 1, 384, 384))    # a conv's 1x1 output
    assert not broadcast_is_slow(conv_gate, nhwc)                                  # channels_last strides: fine
    assert not broadcast_is_slow(_q(384, 1, 1), _q(1, 384, 14, 14))                # an NCHW activation: fine
    assert not broadcast_is_slow(_q(8, 1, 1), _q(1, 8, 8, 8, channels_last=True))  # 512 values: not worth it
    assert not broadcast_is_slow(nhwc, nhwc)                                       # no broadcast
    assert not broadcast_is_slow(_q(1, 1, 16, 1), _q(1, 64, 1, 128, channels_last=True))   # both broadcast
    assert broadcast_is_slow(_q(64, 1, 1), _q(1, 64, 8, 8, channels_last=True))    # 4096 values: the least taken
    assert not broadcast_is_slow(_q(1, 1, 64, 1, 1), _q(1, 64, 8, 8, channels_last=True))  # more dims than x
    assert not broadcast_is_slow(_q(64, 1), _q(1, 64, 4096))                       # not a 4-d activation


@settings(max_examples=40)
@given(target=st.sampled_from(["add", "add_relu", "mul", "mul_relu"]), channels=st.integers(1, 140),
       side=st.integers(4, 24), three_d=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_the_float_form_is_the_kernel_within_one_code(target, channels, side, three_d, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.quantize_per_tensor(torch.randn(1, side, side, channels, generator=gen) * 2, 0.04, 50, torch.quint8)
    x = x.permute(0, 3, 1, 2)
    scale = torch.quantize_per_tensor(torch.rand(*((channels, 1, 1) if three_d else (1, channels, 1, 1)),
                                                 generator=gen), 1 / 256, 0, torch.quint8)
    out = QParams(torch.tensor(0.05), torch.tensor(40), torch.quint8)
    kernel = QuantizedBinary(target, out)(scale, x)
    floats = QuantizedBinary(target, out, float_broadcast=True)(scale, x)
    n = channels * side * side
    assert broadcast_is_slow(scale, x) == (n >= 4096 and channels > 1)   # one channel: x is NCHW too
    assert floats.shape == kernel.shape and floats.dtype == kernel.dtype
    assert (floats.q_scale(), floats.q_zero_point()) == (kernel.q_scale(), kernel.q_zero_point())
    assert int((floats.int_repr().int() - kernel.int_repr().int()).abs().max()) <= 1
    taken = float_binary(target, scale, x, 0.05, 40) if broadcast_is_slow(scale, x) else kernel
    assert torch.equal(floats.int_repr(), taken.int_repr())


def test_a_layer_scale_block_takes_the_float_form_on_fbgemm_only_and_scripts_to_the_same_integers(monkeypatch):
    from fxquant.backends.kernels import qtensor

    model = seeded(_LayerScaleBlock())
    calib = _calib()
    _, fb = quantize(model, calib[0], "fbgemm", calib)
    _, qn = quantize(model, calib[0], "qnnpack", calib)
    muls = [m for m in fb.modules() if isinstance(m, QuantizedBinary) and m.target == "mul"]
    assert len(muls) == 2 and all(m.float_broadcast for m in muls)
    assert not any(m.float_broadcast for m in qn.modules() if isinstance(m, QuantizedBinary))
    scripted = torch.jit.script(fb)
    taken = []
    monkeypatch.setattr(qtensor, "float_binary", lambda *args: taken.append(args[1].shape) or float_binary(*args))
    torch.backends.quantized.engine = "fbgemm"
    with torch.no_grad():
        out = fb(calib[2])
        assert taken == [torch.Size([24, 1, 1])]   # the layer scale; the gate (a conv's output) keeps the kernel
        assert torch.equal(scripted(calib[2]), out)
        assert fxquant.sqnr(model(calib[2]), out) > 25


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
def test_save_and_load_rebuild_the_same_forms(backend, tmp_path):
    """fxquant.save / load rebuild the modules from the tables, so the float_broadcast flag comes back."""
    model = seeded(_LayerScaleBlock())
    calib = _calib()
    _, converted = quantize(model, calib[0], backend, calib)
    path = tmp_path / "m.pt"
    fxquant.save(converted, str(path))
    loaded = fxquant.load(str(path), _LayerScaleBlock())
    flags = [m.float_broadcast for m in converted.modules() if isinstance(m, QuantizedBinary)]
    assert len(flags) == 3 and all(flags) == (backend == "fbgemm")
    assert flags == [m.float_broadcast for m in loaded.modules() if isinstance(m, QuantizedBinary)]
    torch.backends.quantized.engine = backend
    with torch.no_grad():
        assert torch.equal(loaded(calib[2]), converted(calib[2]))


def test_the_scripted_twin_takes_the_float_form_too():
    """A one-code difference between the two forms, found on purpose: the scripted module must give the float
    form's integers there, not the kernel's."""
    out = QParams(torch.tensor(0.05), torch.tensor(40), torch.quint8)
    module = QuantizedBinary("mul", out, float_broadcast=True)
    scripted = torch.jit.script(module)
    for seed in range(50):
        gen = torch.Generator().manual_seed(seed)
        x = torch.quantize_per_tensor(torch.randn(1, 16, 16, 24, generator=gen) * 2, 0.04, 50, torch.quint8)
        x = x.permute(0, 3, 1, 2)
        scale = torch.quantize_per_tensor(torch.rand(24, 1, 1, generator=gen), 1 / 256, 0, torch.quint8)
        floats = float_binary("mul", scale, x, 0.05, 40)
        if not torch.equal(floats.int_repr(), QuantizedBinary("mul", out)(scale, x).int_repr()):
            break
    else:
        pytest.fail("no input where the float form and the kernel differ")
    assert torch.equal(scripted(scale, x).int_repr(), floats.int_repr())
    assert torch.equal(module(scale, x).int_repr(), floats.int_repr())


class _Convs(nn.Module):
    """Two convs, a transposed conv and a linear: every module that calls a kernel with a packed weight."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.up(torch.relu(self.c2(torch.relu(self.c1(x))))).permute(0, 2, 3, 1))


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
def test_every_packed_kernel_call_skips_the_lookup_and_gives_the_overloads_integers(backend, monkeypatch):
    """Each conv, transposed conv and linear of a converted model enters the lookup-free call once per forward,
    and the output is the integers the overloads give when called the ordinary way."""
    from fxquant.backends.kernels import qtensor

    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(1, 3, 8, 8, generator=gen) for _ in range(3)]
    model = seeded(_Convs())
    _, converted = quantize(model, calib[0], backend, calib)
    torch.backends.quantized.engine = backend
    with torch.no_grad():
        fast = converted(calib[2])
        entered = []
        real = qtensor._no_subclass_dispatch
        monkeypatch.setattr(qtensor, "_no_subclass_dispatch", lambda: entered.append(1) or real())
        assert torch.equal(converted(calib[2]), fast) and len(entered) == 4
        monkeypatch.setattr(qtensor, "entry", lambda op: op)   # the overloads, called with every check
        monkeypatch.setattr(qtensor, "_no_subclass_dispatch", contextlib.nullcontext)
        assert torch.equal(converted(calib[2]), fast)
    assert fxquant.sqnr(model(calib[2]), fast) > 20


def test_call_packed_keeps_subclass_and_mode_overrides():
    """The lookup is skipped only for a plain tensor input: a tensor subclass still gets its __torch_function__,
    and a torch function mode still sees the op."""
    from torch.overrides import TorchFunctionMode

    torch.backends.quantized.engine = "fbgemm"
    w = torch.quantize_per_tensor(torch.randn(5, 4), 0.05, 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(w, None)
    x = torch.quantize_per_tensor(torch.randn(2, 4), 0.1, 64, torch.quint8)
    op = torch.ops.quantized.linear.default
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(("subclass", func))
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(("mode", func))
            return func(*args, **(kwargs or {}))

    plain = call_packed(op, x, packed, 0.2, 64)
    assert seen == []
    assert torch.equal(call_packed(op, x.as_subclass(Logged), packed, 0.2, 64).int_repr(), plain.int_repr())
    with Mode():
        assert torch.equal(call_packed(op, x, packed, 0.2, 64).int_repr(), plain.int_repr())
    assert [who for who, func in seen if func is op] == ["subclass", "mode"]   # (both also see int_repr)
