"""Calibration methods and accuracy passes compared: ``python tests/bench_calib.py`` (a few minutes, 1 thread).

Prints three Markdown tables (and the targets of issue 9 checked on them):

1. output SQNR (dB, vs fp32 on held-out inputs; digits: test accuracy too) of fxquant PTQ with each activation
   calibrator (per-channel min/max weights), next to torch.ao's default (``get_default_qconfig_mapping("x86")``:
   HistogramObserver, 7-bit activations) and torch.ao's HistogramObserver on the 8-bit grid fxquant uses (with
   per-channel weights: the calibrator alone differs) on the same model, calibration batches and inputs;
2. the accuracy passes: per-tensor / per-channel weights, with and without cross-layer equalization (CLE) and
   empirical bias correction (BC), with one activation calibrator (``--passes-calibrator``);
3. the rescaled models of issue 9: resnet18 and mobilenet_v2 with every legal conv output channel multiplied by
   a factor log-uniform in [1/32, 32] and compensated in the next layer (``fxquant.passes.equalize.
   rescale_channels``; the float function is unchanged), quantized with per-tensor weights with and without
   CLE, against per-channel PTQ of the original model.

Models: torchvision mobilenet_v2, resnet18, efficientnet_b0 (random init, BN statistics re-estimated,
``fxquant.zoo.torchvision_model``; ``--image-size`` pixels, 4 calibration batches of 8 random images, 16 held-out
images) and the digits CNN of ``tests/bench_qat.py`` (trained fp32 as there, 16 calibration batches of 32 training
images, the 540 test images).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from typing import Optional

import torch
from torch import nn

import fxquant
from fxquant.calibrators import Calibrator, get_calibration_qconfig_mapping
from fxquant.passes.bias_correction import correct_bias
from fxquant.passes.equalize import equalize, rescale_channels
from fxquant.zoo import torchvision_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_qat  # noqa: E402  (the digits data, CNN and training recipe)

BACKEND = "x86"
CALIBRATORS = [m.value for m in Calibrator]
ZOO = ["mobilenet_v2", "resnet18", "efficientnet_b0"]


class Case:
    """A float model with its calibration batches and evaluation inputs."""

    def __init__(self, name: str, model: nn.Module, calib: list[torch.Tensor], inputs: torch.Tensor,
                 labels: Optional[torch.Tensor] = None) -> None:
        self.name, self.model, self.calib, self.inputs, self.labels = name, model, calib, inputs, labels
        with torch.no_grad():
            self.reference = model(inputs)

    def score(self, quantized: nn.Module) -> str:
        with torch.no_grad():
            out = quantized(self.inputs)
        text = f"{fxquant.sqnr(self.reference, out):.2f}"
        if self.labels is not None:
            text += f" / {100.0 * float((out.argmax(1) == self.labels).float().mean()):.2f}%"
        return text


def zoo_case(name: str, image_size: int) -> Case:
    model = torchvision_model(name, image_size=image_size)
    gen = torch.Generator().manual_seed(123)
    calib = [torch.randn(8, 3, image_size, image_size, generator=gen) for _ in range(4)]
    return Case(name, model, calib, torch.randn(16, 3, image_size, image_size, generator=gen))


def digits_case() -> Case:
    x_tr, y_tr, x_te, y_te = bench_qat.digits()
    model = bench_qat.fp32_model(x_tr, y_tr, width=16, seed=0).eval()
    g = torch.Generator().manual_seed(bench_qat.SEED)
    calib = [xb for _, (xb, _) in zip(range(16), bench_qat.batches(x_tr, torch.zeros(len(x_tr)), 32, g))]
    return Case("digits CNN", model, calib, x_te, y_te)


def fx_ptq(model: nn.Module, case: Case, activation: str, per_channel: bool, bias_correction: bool = False,
           weight: str = "minmax") -> nn.Module:
    mapping = get_calibration_qconfig_mapping(BACKEND, activation, weight, per_channel)
    prepared = fxquant.prepare_fx(model, mapping, (case.calib[0],), backend_config=BACKEND)
    fxquant.calibrate(prepared, case.calib, progress=False)
    if bias_correction:
        correct_bias(prepared, case.calib, progress=False)
    return fxquant.convert_fx(prepared)


def ao_ptq(case: Case, full_range: bool = False) -> nn.Module:
    """torch.ao's default x86 PTQ; ``full_range``: its HistogramObserver on fxquant's 8-bit activation grid."""
    from torch.ao.quantization import (HistogramObserver, QConfig, QConfigMapping, default_per_channel_weight_observer,
                                       get_default_qconfig_mapping)
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    mapping = get_default_qconfig_mapping("x86")
    if full_range:
        mapping = QConfigMapping().set_global(QConfig(activation=HistogramObserver.with_args(reduce_range=False),
                                                      weight=default_per_channel_weight_observer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(case.model), mapping, (case.calib[0],))
        with torch.no_grad():
            for b in case.calib:
                prepared(b)
        return convert_fx(prepared)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _db(cell: str) -> float:
    return float(cell.split(" ")[0])


def calibrator_table(cases: list[Case]) -> tuple[str, list[str]]:
    rows, verdicts = [], []
    for case in cases:
        cells = [case.score(fx_ptq(case.model, case, c, per_channel=True)) for c in CALIBRATORS]
        ao, ao8 = case.score(ao_ptq(case)), case.score(ao_ptq(case, full_range=True))
        best = max(range(len(cells)), key=lambda i: _db(cells[i]))
        gain, gain8 = _db(cells[best]) - _db(ao), _db(cells[best]) - _db(ao8)
        rows.append([case.name, ao, ao8] + cells + [f"{CALIBRATORS[best]} ({gain:+.2f} / {gain8:+.2f})"])
        verdicts.append(f"{case.name}: best {CALIBRATORS[best]} {gain:+.2f} dB vs torch.ao's default, {gain8:+.2f} dB vs "
                        "torch.ao's HistogramObserver on the same 8-bit grid")
        print(f"  {case.name}: done", file=sys.stderr)
    header = (["model", "torch.ao default", "torch.ao histogram, 8-bit"] + CALIBRATORS
              + ["best (dB vs torch.ao default / 8-bit)"])
    return _markdown(header, rows), verdicts


def passes_table(cases: list[Case], activation: str) -> str:
    rows = []
    for case in cases:
        eq = equalize(case.model)
        for per_channel in (False, True):
            cells = [case.score(fx_ptq(m, case, activation, per_channel, bc))
                     for m in (case.model, eq) for bc in (False, True)]
            rows.append([case.name, "per-channel" if per_channel else "per-tensor"] + cells)
        print(f"  {case.name}: done", file=sys.stderr)
    return _markdown(["model", "weights", "PTQ", "+BC", "+CLE", "+CLE+BC"], rows)


def rescaled_table(cases: list[Case], activation: str) -> tuple[str, list[str]]:
    rows, verdicts = [], []
    for case in cases:
        rescaled = rescale_channels(case.model, seed=0)
        with torch.no_grad():
            exact = fxquant.sqnr(case.reference, rescaled(case.inputs))
        ptq = lambda m, pc, bc=False: case.score(fx_ptq(m, case, activation, pc, bc))  # noqa: E731
        original_pc = ptq(case.model, True)
        row = [case.name, f"{exact:.0f}", original_pc, ptq(case.model, False), ptq(rescaled, False), ptq(rescaled, True)]
        eq = equalize(rescaled)
        row += [ptq(eq, False), ptq(eq, False, True)]
        relu6 = equalize(rescaled, relu6_as_relu=True)
        row += [ptq(relu6, False, True) if any(isinstance(m, nn.ReLU6) for m in case.model.modules()) else "-"]
        rows.append(row)
        best = max(_db(c) for c in row[6:] if c != "-")
        verdicts.append(f"{case.name} rescaled: per-tensor + CLE (+BC) best {best:.2f} dB vs per-channel PTQ of the "
                        f"original {_db(original_pc):.2f} dB ({best - _db(original_pc):+.2f}); without CLE per-tensor "
                        f"PTQ gives {_db(row[4]):.2f} dB ({_db(row[4]) - _db(original_pc):+.2f})")
        print(f"  {case.name} rescaled: done", file=sys.stderr)
    header = ["model", "rescaled float SQNR", "original, per-channel", "original, per-tensor", "rescaled, per-tensor",
              "rescaled, per-channel", "rescaled + CLE, per-tensor", "+ BC", "+ BC, CLE with ReLU6 -> ReLU"]
    return _markdown(header, rows), verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--passes-calibrator", default="mse", choices=CALIBRATORS)
    parser.add_argument("--models", nargs="*", default=ZOO + ["digits"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.backends.quantized.engine = "x86"
    warnings.filterwarnings("ignore")
    start = time.time()
    cases = [digits_case() if n == "digits" else zoo_case(n, args.image_size) for n in args.models]
    print(f"## Calibrators (SQNR dB vs fp32{'; digits: SQNR / test accuracy' if 'digits' in args.models else ''}, "
          f"per-channel weights, x86)\n")
    table, verdicts = calibrator_table(cases)
    print(table)
    print(f"\n## Accuracy passes ({args.passes_calibrator} activations)\n")
    print(passes_table(cases, args.passes_calibrator))
    rescalable = [c for c in cases if c.name in ("resnet18", "mobilenet_v2")]
    if rescalable:
        print(f"\n## Rescaled models ({args.passes_calibrator} activations; factors log-uniform in [1/32, 32])\n")
        table, more = rescaled_table(rescalable, args.passes_calibrator)
        print(table)
        verdicts += more
    print("\n" + "\n".join(f"* {v}" for v in verdicts))
    fp32 = [f"{c.name} {100.0 * float((c.reference.argmax(1) == c.labels).float().mean()):.2f}%"
            for c in cases if c.labels is not None]
    print(f"\nfp32 accuracy: {', '.join(fp32) or '-'}; image size {args.image_size}; {time.time() - start:.0f} s on "
          "1 thread (shared machine)")


if __name__ == "__main__":
    main()
