"""qnnpack: ARM/mobile kernels (they also run on x86, slowly, which makes them a correctness backend here).

Its limits are part of the table and shape the default qconfig:
* weights in [-127, 127] (symmetric, no -128);
* no minimum scale. torch.ao's qnnpack config floors activation and weight scales at 2**-12; measured on this
  machine, the kernels are right far below that (conv 40.5-41.8 dB, add 35.5-36.5 dB, hardswish 32.5-34.8 dB
  against their own simulation at input scales 1e-2 .. 1e-7), while the floor crushes small activations
  (random-init mobilenet_v3_large: -0.5 dB with it, 33.8 dB without). The mechanism stays in the schema
  (``Constraints.min_scale`` / ``weight_min_scale``) for a kernel provider that needs it;
* add/mul: input scale / output scale in [2**-14, 2**8) (outside, the add kernel asserts);
* dynamic: int8 linear, LSTM/GRU and cells under the same weight limits, 8/4-bit embeddings; no float16-weight
  kernels (``linear_prepack_fp16`` is fbgemm's).
"""

from __future__ import annotations

import torch

from fxquant.backends.common import cnn_entries, dynamic_entries
from fxquant.backends.config import BackendConfig, Constraints, QSpec, WeightRule

__all__ = ["make_qnnpack_config"]


def make_qnnpack_config() -> BackendConfig:
    """The qnnpack table."""
    weight = WeightRule(dtype=torch.qint8, qschemes=(torch.per_channel_symmetric, torch.per_tensor_symmetric))
    weighted = Constraints(weight_range=(-127, 127))
    binary = Constraints(input_output_scale_ratio=(2.0 ** -14, 2.0 ** 8))
    entries = cnn_entries(weight, weighted, binary_limits=binary, gelu_own_grid=True)
    entries += dynamic_entries(weight, weighted, fp16=False)  # qnnpack has no float16-weight linear
    return BackendConfig(
        name="qnnpack", engine="qnnpack", entries=entries,
        activation=QSpec(torch.quint8, torch.per_tensor_affine, reduce_range=False),
        weight=QSpec(torch.qint8, torch.per_channel_symmetric, quant_min=-127, quant_max=127),
        doc="qnnpack kernels on quantized tensors; ARM CPUs (runs on x86 as a correctness backend).")
