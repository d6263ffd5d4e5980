"""torch.ao's FX static PTQ, the reference the benchmarks compare against.

``fxquant bench`` (fxquant/bench.py) loads this file from the source checkout it runs from, so the library itself
never imports the deprecated ``torch.ao``; ``tests/bench_ptq.py`` imports it directly.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

try:  # torch.ao's prepare_fx memoizes this with functools.cache, keyed by (and keeping alive) every model it prepares
    from torch.ao.quantization.fx.utils import assert_and_get_unique_device as _device_cache
except ImportError:  # a torch whose torch.ao does not have it
    _device_cache = None

from fxquant.bench import Quantized


def quantize_torch_ao(model: nn.Module, backend: str, x: torch.Tensor, calib: list[torch.Tensor]) -> Quantized:
    """torch.ao's default FX static PTQ of ``model`` for ``backend``; prepare and convert timed. It gets its own copy
    of the model, made outside the timing: torch.ao's prepare_fx shares the user's modules (without changing them),
    as fxquant's shares the weights, so neither pays for a full copy inside the timed part."""
    torch.backends.quantized.engine = backend
    model = copy.deepcopy(model)  # so nothing torch.ao does can reach the model fxquant and fp32 are timed on
    try:
        start = time.perf_counter()
        prepared = prepare_fx(model, get_default_qconfig_mapping(backend), (x,))
        compile_s = time.perf_counter() - start
        with torch.no_grad():
            for batch in calib:
                prepared(batch)
        start = time.perf_counter()
        quantized = convert_fx(prepared)
        compile_s += time.perf_counter() - start
    finally:  # a failed prepare, calibration or convert has cached the model too (the bench goes on with fxquant)
        _release_cached_models()
    return Quantized(quantized, compile_s)


def _release_cached_models() -> None:
    """Drop torch.ao's cache of prepared models (outside the timing).

    In torch 2.14, ``torch.ao.quantization.fx.utils.assert_and_get_unique_device`` is a ``functools.cache`` keyed by
    the module, so every model torch.ao prepares (here a full copy, parameters included) stays alive for the rest of
    the process: about the model's size leaks per call. On a 600M-parameter ViT each round then ran at a new memory
    high-water mark, and whichever quantizer ran next paid the first-touch page faults of fresh memory (on a VM,
    slow) inside its timing. A user's single run starts with an empty cache; clearing it between runs keeps every
    round of the benchmark like that.
    """
    cache_clear = getattr(_device_cache, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()
