"""x86: the same ``torch.ops.quantized`` kernels as fbgemm under torch's ``x86`` engine, which picks
fbgemm or oneDNN per op. A later change lowers conv/linear to oneDNN on plain int8 tensors."""

from __future__ import annotations

from fxquant.backends.config import BackendConfig
from fxquant.backends.fbgemm import make_fbgemm_config

__all__ = ["make_x86_config"]


def make_x86_config() -> BackendConfig:
    """The x86 table."""
    return make_fbgemm_config(name="x86", engine="x86").replace(
        doc="torch's x86 engine (fbgemm or oneDNN per op) on quantized tensors; x86 CPUs.")
