"""AdaRound against nearest rounding: ``python tests/bench_adaround.py`` (a few minutes, 1 thread).

Prints one Markdown table: per model and weight width (8-bit, and 4-bit on the same int8 kernels: codes -8..7,
per channel), the output SQNR (dB vs fp32 on held-out inputs; digits: SQNR / test accuracy) of torch.ao's PTQ
(its default qconfig, the 4-bit weight observer for 4-bit), fxquant's PTQ (nearest rounding), fxquant's PTQ after
``fxquant.adaround`` and after AdaRound then bias correction, with AdaRound's wall time and how many layers kept
its rounding. Same calibration batches and inputs for all.

Models (``bench_calib``'s cases, fbgemm): the digits CNN of ``tests/bench_qat.py`` (trained fp32 on scikit-learn's
digits; calibration on training images, scored on the 540 test images) and torchvision resnet18 / mobilenet_v2
(random init, BN statistics re-estimated; 4 calibration batches of 8 random images, 16 held-out images).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch
from torch import nn

import fxquant
from fxquant.observers import PerChannelMinMaxObserver
from fxquant.qconfig import QConfig, QConfigMapping

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_calib  # noqa: E402  (the cases: models, calibration batches, held-out inputs, scoring)

BACKEND = "fbgemm"
FOUR_BIT = dict(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-8, quant_max=7)


def fx_mapping(bits: int) -> QConfigMapping:
    qconfig = fxquant.get_default_qconfig(BACKEND)
    if bits == 4:
        qconfig = QConfig(activation=qconfig.activation, weight=PerChannelMinMaxObserver.with_args(**FOUR_BIT))
    return QConfigMapping().set_global(qconfig)


def ao_ptq(case: bench_calib.Case, bits: int) -> nn.Module:
    from torch.ao.quantization import QConfig as AoQConfig, QConfigMapping as AoMapping, get_default_qconfig
    from torch.ao.quantization.observer import PerChannelMinMaxObserver as AoPerChannel
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    qconfig = get_default_qconfig(BACKEND)
    if bits == 4:
        qconfig = AoQConfig(activation=qconfig.activation, weight=AoPerChannel.with_args(**FOUR_BIT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(case.model), AoMapping().set_global(qconfig), (case.calib[0],))
        with torch.no_grad():
            for b in case.calib:
                prepared(b)
        return convert_fx(prepared)


def row(case: bench_calib.Case, bits: int, iterations: int) -> list[str]:
    def prepared() -> torch.fx.GraphModule:
        p = fxquant.prepare_fx(case.model, fx_mapping(bits), (case.calib[0],), backend_config=BACKEND)
        fxquant.calibrate(p, case.calib, progress=False)
        return p

    nearest = case.score(fxquant.convert_fx(prepared()))
    rounded = prepared()
    start = time.perf_counter()
    report = fxquant.adaround(rounded, case.calib, iterations, progress=False)
    seconds = time.perf_counter() - start
    with_bc = copy.deepcopy(rounded)
    fxquant.correct_bias(with_bc, case.calib, progress=False)
    kept = sum(r.kept for r in report.layers.values())
    return [case.name, f"{bits}-bit", case.score(ao_ptq(case, bits)), nearest,
            case.score(fxquant.convert_fx(rounded)), case.score(fxquant.convert_fx(with_bc)),
            f"{seconds:.1f}", f"{kept}/{len(report.layers)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["digits", "resnet18", "mobilenet_v2"])
    parser.add_argument("--image-size", type=int, default=64, help="pixels of the torchvision models (default 64)")
    parser.add_argument("--iterations", type=int, default=300, help="AdaRound's steps per layer (default 300)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.backends.quantized.engine = BACKEND
    warnings.filterwarnings("ignore")
    start = time.time()
    rows = []
    for name in args.models:
        case = bench_calib.digits_case() if name == "digits" else bench_calib.zoo_case(name, args.image_size)
        for bits in (8, 4):
            rows.append(row(case, bits, args.iterations))
            print(f"  {name} {bits}-bit: done", file=sys.stderr, flush=True)
    header = ["model", "weights", "torch.ao PTQ", "fxquant PTQ (nearest)", "+ AdaRound", "+ AdaRound + BC",
              "AdaRound s", "layers kept"]
    print(f"## AdaRound ({BACKEND}, per-channel weights, {args.iterations} steps per layer; SQNR dB vs fp32"
          f"{', digits: SQNR / test accuracy' if 'digits' in args.models else ''})\n")
    print(bench_calib._markdown(header, rows))
    print(f"\nimage size {args.image_size}; {time.time() - start:.0f} s on 1 thread (shared machine)")


if __name__ == "__main__":
    main()
