"""fxquant's exceptions. Every message names the module or node involved and says what to do."""

from __future__ import annotations

__all__ = ["FxQuantError", "TraceError", "QConfigError", "CalibrationError", "ConvertError", "EngineError"]


class FxQuantError(RuntimeError):
    """Base class of fxquant's errors."""


class TraceError(FxQuantError):
    """The model could not be symbolically traced.

    Attributes:
        module_path: qualified name of the submodule whose code failed ("" for the traced module's own code).
        cause: the original exception's text.
    """

    def __init__(self, message: str, module_path: str = "", cause: str = "") -> None:
        super().__init__(message)
        self.module_path = module_path
        self.cause = cause


class QConfigError(FxQuantError, ValueError):
    """A qconfig asks for something the backend table forbids."""


class CalibrationError(FxQuantError):
    """Calibration data is missing or unusable."""


class ConvertError(FxQuantError):
    """The prepared model cannot be converted as it is."""


class EngineError(FxQuantError):
    """The quantized engine needed by a converted model is missing or not selected."""
