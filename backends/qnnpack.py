"""qnnpack: ARM/mobile kernels (they also run on x86, slowly, which makes them a correctness backend here).

Its kernels return wrong numbers, silently, for qparams outside their limits, so the limits are part of
the table and shape the default qconfig:
* weights in [-127, 127] (symmetric, no -128);
* activation and weight scales >= 2**-12;
* add/mul: input scale / output scale in [2**-14, 2**8) (outside, the add kernel asserts).
"""

from __future__ import annotations

import torch

from fxquant.backends.common import cnn_entries, dynamic_entries
from fxquant.backends.config import BackendConfig, Constraints, QSpec, WeightRule

__all__ = ["make_qnnpack_config", "QNNPACK_MIN_SCALE"]

QNNPACK_MIN_SCALE = 2.0 ** -12


def make_qnnpack_config() -> BackendConfig:
    """The qnnpack table."""
    weight = WeightRule(dtype=torch.qint8, qschemes=(torch.per_channel_symmetric, torch.per_tensor_symmetric))
    weighted = Constraints(weight_range=(-127, 127), min_scale=QNNPACK_MIN_SCALE)
    binary = Constraints(min_scale=QNNPACK_MIN_SCALE, input_output_scale_ratio=(2.0 ** -14, 2.0 ** 8))
    entries = cnn_entries(weight, weighted, binary_limits=binary)
    entries += dynamic_entries(weight, weighted, fp16=False)  # qnnpack has no float16-weight linear
    return BackendConfig(
        name="qnnpack", engine="qnnpack", entries=entries,
        activation=QSpec(torch.quint8, torch.per_tensor_affine, reduce_range=False),
        weight=QSpec(torch.qint8, torch.per_channel_symmetric, quant_min=-127, quant_max=127),
        doc="qnnpack kernels on quantized tensors; ARM CPUs (runs on x86 as a correctness backend).")
