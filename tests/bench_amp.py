"""Automatic mixed precision on the issue's targets: prints one row per case.

    python tests/bench_amp.py                 # all cases
    python tests/bench_amp.py efficientnet_b0 # one case

Cases: all-MiniLM-L6-v2 static int8 (x86 table) to mean sentence-embedding cosine >= 0.99, the sensitive linears
moved to per-token dynamic int8 (``fallback=``), not float; efficientnet_b0 and mobilenet_v2 (fbgemm, random init
with re-estimated BN statistics, 224 px, or BENCH_AMP_SIZE) to output SQNR >= 35 dB, sensitive layers float. Every
candidate is prepared, calibrated and converted for real on one thread; timings are from a shared 2-core machine.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))

import fxquant  # noqa: E402
from fxquant.sensitivity import MinCosine, MinSQNR, auto_mixed_precision  # noqa: E402


def minilm() -> tuple:
    from minilm_data import SENTENCES, embed, load_minilm

    model, tok = load_minilm()

    def batch(s):
        return dict(tok(s, padding=True, truncation=True, return_tensors="pt"))

    calibration = [batch(SENTENCES[i:i + 16]) for i in range(0, 48, 16)]
    evaluation = [batch(SENTENCES[48:])]
    example = (calibration[0]["input_ids"], calibration[0]["attention_mask"])
    return model, "x86", example, calibration, evaluation, MinCosine(0.99, embed=embed), fxquant.per_token_dynamic_qconfig


def vision(name: str, size: int = int(os.environ.get("BENCH_AMP_SIZE", "224"))) -> tuple:
    from fxquant.zoo import torchvision_model

    model = torchvision_model(name, image_size=size)
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randn(4, 3, size, size, generator=gen) for _ in range(2)]
    evaluation = [torch.randn(8, 3, size, size, generator=gen)]
    return model, "fbgemm", calibration[0], calibration, evaluation, MinSQNR(35.0), None


CASES = {"minilm": minilm, "efficientnet_b0": lambda: vision("efficientnet_b0"),
         "mobilenet_v2": lambda: vision("mobilenet_v2")}


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(f"{'case':<16} {'target':<22} {'all int8':>9} {'chosen':>8} {'met':>4} {'float layers':>12} "
          f"{'int8 FLOPs':>10} {'candidates':>10} {'s':>6}")
    for name in names:
        model, backend, example, calibration, evaluation, target, fallback = CASES[name]()
        start = time.perf_counter()
        r = auto_mixed_precision(model, fxquant.get_default_qconfig_mapping(backend), example, calibration, target,
                                 evaluation=evaluation, backend_config=backend, fallback=fallback, progress=False)
        seconds = time.perf_counter() - start
        all_int8 = r.sensitivity.all_int8 if r.sensitivity is not None else r.score
        what = f"{type(target).__name__}({getattr(target, 'db', getattr(target, 'value', ''))})"
        print(f"{name:<16} {what:<22} {all_int8:>9.4f} {r.score:>8.4f} {str(r.met):>4} {len(r.float_layers):>12} "
              f"{r.int8_flop_share:>10.1%} {r.evaluations:>10} {seconds:>6.0f}", flush=True)
        print(f"   {'per-token dynamic' if fallback is not None else 'float'}:", ", ".join(r.float_layers) or "-",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
