"""The built-in pipelines, as PassManagers a user can copy, extend and hand back to ``prepare_fx`` /
``convert_fx`` (``pipeline=``): each call builds a fresh one, so editing it changes nothing global.

Example:
    >>> from fxquant.passes import prepare_pipeline
    >>> pm = prepare_pipeline()
    >>> pm.names
    ['normalize', 'fuse', 'annotate', 'residual_stream', 'observe']
"""

from __future__ import annotations

from fxquant.passes.annotate import AnnotatePass
from torch import nn

from fxquant.passes.base import PassManager, TimingReport
from fxquant.passes.cleanup import CleanupPass
from fxquant.passes.fuse import FusePass
from fxquant.passes.lower import LowerPass
from fxquant.passes.normalize import NormalizePass
from fxquant.passes.observe import ObservePass
from fxquant.passes.qat import FreezeQATPass
from fxquant.passes.residual import FloatResidualStreamPass
from fxquant.passes.verify import CONVERT_VERIFIERS, PREPARE_VERIFIERS

__all__ = ["PREPARE_ORDER", "CONVERT_ORDER", "prepare_pipeline", "convert_pipeline", "freeze_qat_pipeline",
           "fuse_pipeline", "timing_report"]

#: ``(a, b)``: pass ``a`` runs before pass ``b``
PREPARE_ORDER = [("normalize", "fuse"), ("fuse", "annotate"), ("annotate", "observe"), ("annotate", "residual_stream"),
                 ("residual_stream", "observe")]
CONVERT_ORDER = [("lower", "cleanup")]


def prepare_pipeline(verify: bool = True) -> PassManager:
    """The passes of ``prepare_fx``: normalize -> fuse -> annotate -> residual_stream -> observe."""
    return PassManager([NormalizePass(), FusePass(), AnnotatePass(), FloatResidualStreamPass(), ObservePass()],
                       PREPARE_ORDER, PREPARE_VERIFIERS, verify, name="prepare")


def convert_pipeline(verify: bool = True) -> PassManager:
    """The passes of ``convert_fx``: lower -> cleanup."""
    return PassManager([LowerPass(), CleanupPass()], CONVERT_ORDER, CONVERT_VERIFIERS, verify, name="convert")


def freeze_qat_pipeline(verify: bool = True) -> PassManager:
    """What ``convert_fx`` runs first on a model from ``prepare_qat_fx``: QAT modules back to fused float ones.

    Its result is still an observed graph (fake quantizers in place), so it is checked with the prepare
    invariants; the convert pipeline then lowers it like a calibrated ``prepare_fx`` model.
    """
    return PassManager([FreezeQATPass()], (), PREPARE_VERIFIERS, verify, name="freeze_qat")


def fuse_pipeline(verify: bool = True) -> PassManager:
    """The passes of ``fuse_fx``: normalize -> fuse."""
    return PassManager([NormalizePass(), FusePass()], PREPARE_ORDER, verify=verify, name="fuse")


def timing_report(model: nn.Module) -> TimingReport:
    """Every pass's wall time for a prepared or converted model (prepare's passes, then convert's).

    Raises:
        TypeError: ``model`` was not made by ``prepare_fx`` / ``convert_fx``.
    """
    from fxquant.api import STATE_KEY

    state = getattr(model, "meta", {}).get(STATE_KEY)
    if state is None:
        raise TypeError(f"timing_report expects a model returned by fxquant.prepare_fx or convert_fx, got "
                        f"{type(model).__name__}")
    return TimingReport(tuple(state.timings))
