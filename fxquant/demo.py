"""The main job: quantize a real torchvision model to int8 and print the report.

Run: ``python -m fxquant.demo [--model resnet18] [--backend x86] [--calib-batches 8] [--size 224]``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import fxquant
from fxquant.report import report
from fxquant.zoo import torchvision_model

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Quantize a torchvision model with fxquant and print a report.")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--backend", default="fbgemm", choices=["fbgemm", "x86", "qnnpack"])
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*deprecated.*")

    print(f"building {args.model} (random init, BN statistics re-estimated on random batches)...")
    model = torchvision_model(args.model, image_size=args.size)
    gen = torch.Generator().manual_seed(123)
    calib = [torch.randn(4, 3, args.size, args.size, generator=gen) for _ in range(args.calib_batches)]
    x = torch.randn(1, 3, args.size, args.size, generator=gen)

    start = time.perf_counter()
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(args.backend), (x,),
                                  backend_config=args.backend)
    prepare_s = time.perf_counter() - start
    fxquant.calibrate(prepared, calib, progress=True)
    start = time.perf_counter()
    quantized = fxquant.convert_fx(prepared)
    convert_s = time.perf_counter() - start
    print(f"\nfxquant {args.model} on {args.backend}: prepare {prepare_s:.2f} s, convert {convert_s:.2f} s, "
          f"{args.calib_batches} calibration batches\n")
    report(model, quantized, (x,))


if __name__ == "__main__":
    main()
