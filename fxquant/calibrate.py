"""Calibration: run data through a prepared model so its observers see real activations.

Example:
    >>> import torch, fxquant
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    >>> p = fxquant.prepare_fx(m, fxquant.get_default_qconfig_mapping("fbgemm"), (torch.randn(1, 4),), backend_config="fbgemm")
    >>> fxquant.calibrate(p, [torch.randn(8, 4) for _ in range(3)], progress=False)
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from fxquant.api import _stage_of
from fxquant.errors import CalibrationError
from fxquant.observers import ObserverBase

__all__ = ["calibrate", "run_batch"]


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one batch: a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _check_prepared(model: Any, observers: list[ObserverBase]) -> None:
    """Calibrating a float or a converted model would run it and change nothing: say so instead."""
    stage = _stage_of(model) if isinstance(model, nn.Module) else None
    if stage == "converted":
        raise CalibrationError("calibrate: this model is already converted (its observers are gone); calibrate the "
                               "prepared model, then call convert_fx on it again")
    if stage is None and not observers:
        raise CalibrationError(f"calibrate expects the model returned by fxquant.prepare_fx (got {type(model).__name__}, "
                               "which has no observers): prepare it first, then calibrate the result")


def calibrate(model: nn.Module, data: Iterable[Any], progress: bool = True, max_batches: Optional[int] = None,
              distributed: bool = False, group: Any = None) -> None:
    """Run ``data`` through ``model`` (a prepared model) under ``torch.no_grad()``.

    Args:
        model: the result of ``prepare_fx``.
        data: an iterable of batches (tensors, tuples of tensors, or dicts), e.g. a DataLoader.
        progress: show a tqdm progress bar.
        max_batches: stop after this many batches.
        distributed: ``data`` is this rank's shard; merge the observer statistics of all ranks of the
            ``torch.distributed`` process group ``group`` (see :func:`fxquant.distributed.calibrate_distributed`).
        group: the process group for ``distributed=True`` (default: the world).

    Raises:
        CalibrationError: a model that is not prepared (or already converted), one tensor instead of an
            iterable of batches, no batch at all, a batch the model cannot run (naming its index), or data that
            gave observers nothing but NaN/Inf.
    """
    if distributed:
        from fxquant.distributed import calibrate_distributed

        calibrate_distributed(model, data, progress=progress, max_batches=max_batches, group=group)
        return
    if isinstance(data, torch.Tensor):
        raise CalibrationError(f"calibrate: data is one tensor {tuple(data.shape)}; pass an iterable of batches, e.g. "
                               "[x] or a DataLoader (iterating a tensor would feed its rows one at a time)")
    observers = [m for m in model.modules() if isinstance(m, ObserverBase)]
    _check_prepared(model, observers)
    total = max_batches if max_batches is not None else (len(data) if hasattr(data, "__len__") else None)  # type: ignore[arg-type]
    count = 0
    with torch.no_grad():
        for i, batch in enumerate(tqdm(data, total=total, desc="calibrating", disable=not progress, leave=False)):
            if max_batches is not None and i >= max_batches:
                break
            try:
                run_batch(model, batch)
            except Exception as exc:  # noqa: BLE001 - reported with the batch index
                shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
                raise CalibrationError(f"calibration batch {i} ({shape}) failed in the model: {type(exc).__name__}: "
                                       f"{exc}. Batches must have the structure and shapes of example_inputs.") from exc
            count += 1
    if count == 0:
        raise CalibrationError("calibration data was empty: pass at least one batch of representative inputs")
    empty = [o.where or type(o).__name__ for o in observers if not o.has_data]
    if empty and all(not o.has_data for o in observers):
        raise CalibrationError(f"after {count} batch(es) no observer saw a finite value (NaN/Inf-only data or empty "
                               f"batches?): {empty[:5]}; check the calibration data")
    nonfinite = [o.where for o in observers if int(getattr(o, "nonfinite_count", 0)) > 0]
    if nonfinite:
        warnings.warn(f"calibration data produced NaN/Inf at {len(nonfinite)} observer(s), e.g. {nonfinite[:3]}; "
                      "they were ignored for the ranges", stacklevel=2)
