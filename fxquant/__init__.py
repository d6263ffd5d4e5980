"""fxquant: FX graph-mode int8 quantization for PyTorch."""

from fxquant.api import convert_fx, convert_to_reference_fx, fuse_fx, prepare_fx, prepare_qat_fx
from fxquant.calibrate import calibrate
from fxquant.qconfig import (QConfig, QConfigMapping, get_default_qat_qconfig, get_default_qat_qconfig_mapping,
                             get_default_qconfig, get_default_qconfig_mapping)
from fxquant.qparams import sqnr
from fxquant.tracer import PrepareCustomConfig

__all__ = [
    "prepare_fx", "prepare_qat_fx", "convert_fx", "convert_to_reference_fx", "fuse_fx", "calibrate", "QConfig", "QConfigMapping", "get_default_qconfig",
    "get_default_qat_qconfig", "get_default_qconfig_mapping", "get_default_qat_qconfig_mapping", "sqnr",
    "PrepareCustomConfig",
]

# observers, fake quantization and torch.ao's convenience qconfigs (same names as torch.ao.quantization)
from fxquant.fake_quantize import (FakeQuantize, disable_fake_quant, disable_observer, enable_fake_quant,
                                   enable_observer)
from fxquant.observers import (FixedQParamsObserver, HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver,
                               MovingAveragePerChannelMinMaxObserver, NoDataError, ObserverBase, ObserverFactory,
                               PerChannelMinMaxObserver, PlaceholderObserver)
from fxquant.qconfig import (default_dynamic_qconfig, default_per_channel_qconfig, default_qconfig,
                             float16_dynamic_qconfig, per_channel_dynamic_qconfig)

__all__ += [
    "FakeQuantize", "enable_fake_quant", "disable_fake_quant", "enable_observer", "disable_observer",
    "ObserverBase", "ObserverFactory", "NoDataError", "MinMaxObserver", "MovingAverageMinMaxObserver",
    "PerChannelMinMaxObserver", "MovingAveragePerChannelMinMaxObserver", "HistogramObserver", "PlaceholderObserver",
    "FixedQParamsObserver", "default_qconfig", "default_per_channel_qconfig", "default_dynamic_qconfig",
    "float16_dynamic_qconfig", "per_channel_dynamic_qconfig",
]

# the report and the error types
from fxquant.errors import (CalibrationError, ConvertError, EngineError, FxQuantError, QConfigError,
                            TraceError)
from fxquant.report import QuantReport, report

__all__ += ["report", "QuantReport", "FxQuantError", "TraceError", "QConfigError", "CalibrationError",
            "ConvertError", "EngineError"]

# quantization-aware training: QAT modules live in fxquant.qat; the trainable fake quantizers and BN helpers
from fxquant.qat import freeze_bn_stats, update_bn_stats
from fxquant.qat_fake_quantize import FusedMovingAvgObsFakeQuantize, LearnableFakeQuantize

__all__ += ["freeze_bn_stats", "update_bn_stats", "FusedMovingAvgObsFakeQuantize", "LearnableFakeQuantize"]

# dynamic and weight-only quantization (Linear, LSTM/GRU and cells, 8/4-bit embeddings)
from fxquant.dynamic import quantize_dynamic
from fxquant.observers import FloatQParamsObserver
from fxquant.qconfig import (float_qparams_weight_only_qconfig, float_qparams_weight_only_qconfig_4bit,
                             per_token_dynamic_qconfig)

__all__ += ["quantize_dynamic", "FloatQParamsObserver", "per_token_dynamic_qconfig",
            "float_qparams_weight_only_qconfig", "float_qparams_weight_only_qconfig_4bit"]

# calibration and QAT across processes (torch.distributed): fxquant.calibrate(..., distributed=True) and
from fxquant.distributed import sync_observers

__all__ += ["sync_observers"]

# export and deployment: the reference form, ONNX (QuantizeLinear / DequantizeLinear), saving as data
from fxquant.export import export_onnx
from fxquant.save import load, save

__all__ += ["export_onnx", "save", "load"]

# calibration methods (entropy, percentile, MSE) and the accuracy passes (cross-layer equalization, bias correction,
# AdaRound)
from fxquant.calibrators import (Calibrator, EntropyObserver, MSEObserver, PerChannelMSEObserver,
                                 PerChannelPercentileObserver, PercentileObserver, get_calibration_qconfig,
                                 get_calibration_qconfig_mapping)
from fxquant.passes.adaround import adaround
from fxquant.passes.bias_correction import correct_bias
from fxquant.passes.equalize import equalize

__all__ += ["Calibrator", "EntropyObserver", "PercentileObserver", "MSEObserver", "PerChannelPercentileObserver",
            "PerChannelMSEObserver", "get_calibration_qconfig", "get_calibration_qconfig_mapping", "equalize",
            "correct_bias", "adaround"]

# finding where accuracy is lost: layer-by-layer comparison, sensitivity / mixed precision, graph pictures
from fxquant import graphviz, numeric, sensitivity
from fxquant.numeric import compare_layers, compare_weights
from fxquant.sensitivity import auto_mixed_precision

__all__ += ["numeric", "sensitivity", "graphviz", "compare_layers", "compare_weights", "auto_mixed_precision"]
