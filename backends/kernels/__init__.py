"""Kernel layers: the only code that calls quantized kernels. A backend table names its layer."""

from __future__ import annotations

from typing import Any, Callable

from fxquant.backends.config import BackendConfig
from fxquant.backends.kernels.onednn import OneDNNKernels
from fxquant.backends.kernels.qtensor import LoweringSpec, QTensorKernels

__all__ = ["KERNEL_LAYERS", "get_kernels", "LoweringSpec"]

#: kernel layer name -> factory taking the engine name
KERNEL_LAYERS: dict[str, Callable[[str], Any]] = {"qtensor": QTensorKernels, "onednn": OneDNNKernels}


def get_kernels(backend: BackendConfig) -> Any:
    """The kernel layer that runs ``backend``'s table."""
    if backend.kernels not in KERNEL_LAYERS:
        raise ValueError(f"backend {backend.name!r} names kernel layer {backend.kernels!r}; known layers: "
                         f"{sorted(KERNEL_LAYERS)}")
    return KERNEL_LAYERS[backend.kernels](backend.engine)
