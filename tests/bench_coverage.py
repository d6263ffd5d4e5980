"""The coverage issue's model targets, fxquant vs torch.ao vs fp32 in one process (fbgemm, 1 thread, batch 1).

Run: ``python tests/bench_coverage.py`` (a few minutes on 2 cores); ``--runs`` for more latency rounds.

Rows:
- convnext_tiny as torchvision initialises it (layer_scale 1e-6: every block is nearly the identity, so the error
  is the requantized residual stream) and with each block's layer_scale drawn from U(0.2, 1) (nearer a trained
  model, whose blocks contribute);
- vit_b_16 (torch.ao cannot quantize nn.MultiheadAttention's projections and its output is not finite).

Columns: output SQNR of fxquant and of torch.ao vs fp32, whether each output is finite, the fp32 / int8 latency
ratio of each (interleaved medians), prepare+convert seconds. Inputs 224x224, BN statistics re-estimated on 2
random batches, 2 calibration batches of 2 images; the same batches for both tools.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

import fxquant
from fxquant.report import interleaved_latency
from fxquant.zoo import torchvision_model


def _layer_scales_uniform(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(torch.empty(p.shape).uniform_(0.2, 1.0, generator=gen))
    return model


def _torch_ao(model, calib, x):
    """torch.ao's FX flow with its default fbgemm qconfig; a crash is reported, not raised."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "fbgemm"
    start = time.perf_counter()
    try:
        prepared = prepare_fx(model, get_default_qconfig_mapping("fbgemm"), (x,))
        with torch.no_grad():
            for b in calib:
                prepared(b)
        return convert_fx(prepared), time.perf_counter() - start, None
    except Exception as exc:  # noqa: BLE001 - the table reports it
        return None, float("nan"), f"{type(exc).__name__}: {str(exc)[:80]}"


def _fxquant(model, calib, x):
    start = time.perf_counter()
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,), backend_config="fbgemm")
    fxquant.calibrate(prepared, calib, progress=False)
    return fxquant.convert_fx(prepared), time.perf_counter() - start


def measure(label: str, model: torch.nn.Module, runs: int) -> dict:
    gen = torch.Generator().manual_seed(7)
    calib = [torch.randn(2, 3, 224, 224, generator=gen) for _ in range(2)]
    x, evalb = calib[0][:1], torch.randn(4, 3, 224, 224, generator=gen)
    fxq, fxq_s = _fxquant(model, calib, x)
    ao, ao_s, ao_err = _torch_ao(model, calib, x)
    with torch.no_grad():
        ref = model(evalb)
        out_f = fxq(evalb)
        out_a = ao(evalb) if ao is not None else None
    fns = [lambda: model(x), lambda: fxq(x)] + ([lambda: ao(x)] if ao is not None else [])
    lat = interleaved_latency(fns, runs=runs, warmup=1)
    row = {"model": label, "fxq_sqnr": fxquant.sqnr(ref, out_f), "fxq_finite": bool(torch.isfinite(out_f).all()),
           "fxq_speedup": lat[0] / lat[1], "fxq_s": fxq_s, "ao_s": ao_s, "ao_error": ao_err}
    if out_a is not None:
        finite = bool(torch.isfinite(out_a).all())
        row.update(ao_sqnr=fxquant.sqnr(ref, out_a) if finite else float("nan"), ao_finite=finite,
                   ao_speedup=lat[0] / lat[2])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    cases = [("convnext_tiny (layer_scale 1e-6)", lambda: torchvision_model("convnext_tiny", bn_batches=2,
                                                                            batch_size=2)),
             ("convnext_tiny (layer_scale U(0.2,1))", lambda: _layer_scales_uniform(
                 torchvision_model("convnext_tiny", bn_batches=2, batch_size=2))),
             ("vit_b_16", lambda: torchvision_model("vit_b_16", bn_batches=1, batch_size=2))]
    print("| model | SQNR fxquant dB | SQNR torch.ao dB | fxquant - torch.ao dB | output finite fxq / ao | "
          "int8 speed-up vs fp32 fxq / ao | prepare+convert s fxq / ao |")
    print("|---|---|---|---|---|---|---|")
    for label, build in cases:
        r = measure(label, build(), args.runs)
        ao_sqnr = r.get("ao_sqnr", float("nan"))
        gap = r["fxq_sqnr"] - ao_sqnr if math.isfinite(ao_sqnr) else float("nan")
        ao_fin = r.get("ao_finite", r["ao_error"] or "-")
        ao_sp = f"{r['ao_speedup']:.2f}x" if "ao_speedup" in r else "-"
        print(f"| {label} | {r['fxq_sqnr']:.1f} | {ao_sqnr:.1f} | {gap:+.1f} | {r['fxq_finite']} / {ao_fin} | "
              f"{r['fxq_speedup']:.2f}x / {ao_sp} | {r['fxq_s']:.1f} / {r['ao_s']:.1f} |", flush=True)
    print("\nTargets: convnext_tiny SQNR >= torch.ao's + 3 dB; vit_b_16 finite with SQNR >= 20 dB and int8 faster "
          "than fp32.")


if __name__ == "__main__":
    main()
