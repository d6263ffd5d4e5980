"""fbgemm: x86 server CPUs, through ``torch.ops.quantized`` kernels on quantized tensors.

Facts encoded here:
* conv and linear take qint8 weights, per-channel (axis 0) or per-tensor, symmetric or affine;
* activations are quint8; 7-bit (``reduce_range``) only on CPUs without VNNI (int16 saturation);
* depthwise 2-d convs whose channel count is not a multiple of 8 leave fbgemm's fast path (58 channels:
  4.2 ms int8 vs 0.15 ms fp32), so they stay float;
* the depthwise kernels (2-d and 3-d) accumulate u8 x s8 pairs in int16 even on VNNI CPUs: with 8-bit
  activations and 8-bit weights they saturate (a 3x3 depthwise conv: 18.6 dB against its own simulation), so depthwise
  weights use 7 bits, [-64, 63] (38.3 dB), which costs less than 7-bit activations everywhere;
* quantized add / mul write in the first operand's layout: a small operand first without channels_last strides
  (ConvNeXt's ``layer_scale * x``) against a channels_last activation walks every value strided, several times
  slower than dequantize, float op, quantize, which ``QuantizedBinary`` runs instead there (its
  ``float_broadcast`` flag, set for the fbgemm and x86 engines in ``backends/kernels/qtensor_ops.py``;
  ``broadcast_is_slow``; ``tests/bench_kernels.py --binary``);
* dynamic: ``linear_dynamic`` (per-tensor activations, computed by the kernel), float16-weight linear and LSTM/GRU
  (``linear_prepack_fp16``, fbgemm only), quantized LSTM/GRU and cells, 8/4-bit row-wise embedding tables; the
  per-token linear runs on oneDNN / ``torch._int_mm`` (see ``backends/kernels/dynamic.py``).
"""

from __future__ import annotations

import torch

from fxquant.backends.common import cnn_entries, dynamic_entries
from fxquant.backends.config import BackendConfig, Constraints, QSpec, WeightRule

__all__ = ["make_fbgemm_config"]


def make_fbgemm_config(name: str = "fbgemm", engine: str = "fbgemm") -> BackendConfig:
    """The fbgemm table (also the base of the x86 table, which runs the same kernels today)."""
    weight = WeightRule(dtype=torch.qint8)
    entries = cnn_entries(weight, Constraints(), conv2d_limits=Constraints(
        depthwise_channel_multiple=8, depthwise_weight_range=(-64, 63)),
        conv3d_limits=Constraints(depthwise_weight_range=(-64, 63)),  # the 3-d depthwise kernel saturates too
        gelu_own_grid=True)
    entries += dynamic_entries(weight, Constraints())
    return BackendConfig(
        name=name, engine=engine, entries=entries,
        activation=QSpec(torch.quint8, torch.per_tensor_affine), reduce_range_without_vnni=True,
        weight=QSpec(torch.qint8, torch.per_channel_symmetric),
        doc="fbgemm kernels (torch.ops.quantized) on quantized tensors; x86 server CPUs.")
