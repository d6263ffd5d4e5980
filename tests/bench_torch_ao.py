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

from fxquant.bench import Quantized


def quantize_torch_ao(model: nn.Module, backend: str, x: torch.Tensor, calib: list[torch.Tensor]) -> Quantized:
    """torch.ao's default FX static PTQ of ``model`` for ``backend``; prepare and convert timed. It gets its own copy
    of the model, made outside the timing: torch.ao's prepare_fx shares the user's modules (without changing them),
    as fxquant's shares the weights, so neither pays for a full copy inside the timed part."""
    torch.backends.quantized.engine = backend
    model = copy.deepcopy(model)  # so nothing torch.ao does can reach the model fxquant and fp32 are timed on
    start = time.perf_counter()
    prepared = prepare_fx(model, get_default_qconfig_mapping(backend), (x,))
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        for batch in calib:
            prepared(batch)
    start = time.perf_counter()
    quantized = convert_fx(prepared)
    return Quantized(quantized, compile_s + time.perf_counter() - start)
