"""fxquant: FX graph-mode int8 quantization for PyTorch."""

from fxquant.api import convert_fx, fuse_fx, prepare_fx
from fxquant.calibrate import calibrate
from fxquant.qconfig import (QConfig, QConfigMapping, get_default_qat_qconfig, get_default_qat_qconfig_mapping,
                             get_default_qconfig, get_default_qconfig_mapping)
from fxquant.qparams import sqnr
from fxquant.tracer import PrepareCustomConfig

__all__ = [
    "prepare_fx", "convert_fx", "fuse_fx", "calibrate", "QConfig", "QConfigMapping", "get_default_qconfig",
    "get_default_qat_qconfig", "get_default_qconfig_mapping", "get_default_qat_qconfig_mapping", "sqnr",
    "PrepareCustomConfig",
]
