"""oneDNN's kernels on a 7-bit activation grid (the oneDNN x86 table on a CPU without VNNI, built with
``make_x86_config(assume_onednn=True)``, or a ``reduce_range`` qconfig): outputs clamped at the grid's top code.

Separate from tests/test_x86_onednn.py, which runs only where the default x86 table is oneDNN's (a VNNI CPU): this
one runs wherever torch has oneDNN's int8 kernels.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.backends import cpu
from fxquant.backends.kernels.onednn import OneDNNConv, OneDNNLinear


def _output_step(converted: torch.fx.GraphModule) -> float:
    """The scale of the last dequantize (the output grid)."""
    return float([m for n, m in converted.named_modules() if n.endswith("_dequantize")][-1].scale)


class _SevenBit(nn.Module):
    """A conv + relu (hardtanh inside the kernel), a conv + hardswish (clamped after), a fused add, a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = torch.relu(self.a(x))
        b = F.hardswish(self.b(a))
        c = torch.relu(self.c(b) + b)
        return self.fc(c.mean((2, 3)))


@pytest.mark.skipif(cpu.onednn_int8_missing() is not None, reason=f"no oneDNN int8: {cpu.onednn_int8_missing()}")
def test_onednn_kernels_clamp_a_7_bit_grid_at_127_like_the_simulation():
    """On a 7-bit grid (the oneDNN table on a CPU without VNNI, or a reduce_range qconfig) oneDNN's kernels would
    write codes up to 255 for values beyond the calibrated range, which the simulation clamps at 127 and which the
    next conv's int16 pair sums (without VNNI) may not hold: every conv / linear output stays at or below 127."""
    from fxquant.backends.x86 import make_x86_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = make_x86_config(assume_onednn=True)
    qconfig = fxquant.get_default_qconfig(table)
    seven = fxquant.QConfig(activation=qconfig.activation.with_overrides(reduce_range=True), weight=qconfig.weight)
    mapping = fxquant.get_default_qconfig_mapping(table).set_global(seven)
    torch.manual_seed(0)
    model = _SevenBit().eval()
    x = torch.randn(2, 4, 8, 8)
    prepared = fxquant.prepare_fx(model, mapping, (x,), backend_config=table)
    fxquant.calibrate(prepared, [x], progress=False)
    q = fxquant.convert_fx(prepared)
    kernels = [m for m in q.modules() if isinstance(m, (OneDNNConv, OneDNNLinear))]
    assert {m.post.attr for m in kernels} >= {"relu", "hardswish"} and any(m.binary for m in kernels)
    codes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, y: codes.append(int(y.max()))) for m in kernels]
    wide = 3 * x  # far beyond the calibrated range
    with torch.no_grad():
        torch.backends.quantized.engine = "x86"
        out, sim = q(wide), fxquant.convert_to_reference_fx(prepared)(wide)
    for h in hooks:
        h.remove()
    assert len(codes) == len(kernels) and max(codes) == 127  # the top is reached, and never passed
    assert float((out - sim).abs().max()) / _output_step(q) <= 3.0 + 1e-4
