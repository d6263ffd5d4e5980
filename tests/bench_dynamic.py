"""Dynamic quantization of the pretrained all-MiniLM-L6-v2 sentence encoder: fxquant vs torch.ao vs fp32.

    python tests/bench_dynamic.py [--runs 15] [--batch 80] [--threads 1]

Same process, same inputs, interleaved runs (every model once per round), median over rounds, 1 thread by
default. Embeddings are the mean-pooled last hidden states of the sentences in tests/minilm_data.py (80 varied
sentences, padded to the longest); cosine is per sentence against fp32. "encoder MB" is the saved state_dict of
``model.encoder`` (the 6 transformer layers, where the Linear weights are); "model MB" the whole model's.
torch.ao is the reference (``torch.ao.quantization.quantize_dynamic``); fxquant never imports it.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxquant  # noqa: E402
from minilm_data import SENTENCES, embed, load_minilm  # noqa: E402


def state_dict_mb(module: nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getbuffer().nbytes / 1e6


def variants(model: nn.Module) -> dict[str, nn.Module]:
    """The models compared, by row name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig as ao_per_channel
        from torch.ao.quantization import quantize_dynamic as ao_quantize_dynamic

        torch.backends.quantized.engine = "x86"
        out = {"fp32": model,
               "torch.ao quantize_dynamic, per-tensor": ao_quantize_dynamic(copy.deepcopy(model), {nn.Linear},
                                                                             dtype=torch.qint8),
               "torch.ao quantize_dynamic, per-channel": ao_quantize_dynamic(copy.deepcopy(model),
                                                                              {nn.Linear: ao_per_channel})}
        out["fxquant quantize_dynamic, per-tensor (torch.ao's recipe)"] = fxquant.quantize_dynamic(
            model, {nn.Linear}, dtype=torch.qint8, backend_config="x86")
        out["fxquant quantize_dynamic, per-token"] = fxquant.quantize_dynamic(
            model, {nn.Linear: fxquant.per_token_dynamic_qconfig}, backend_config="x86")
        out["fxquant per-token + 8-bit word embeddings"] = fxquant.quantize_dynamic(
            model, {nn.Linear: fxquant.per_token_dynamic_qconfig, nn.Embedding: torch.quint8}, backend_config="x86")
    return out


def interleaved(fns: list[Callable[[], Any]], runs: int, threads: int) -> list[tuple[float, float]]:
    """Median (wall ms, CPU ms) per call of each function, timed in interleaved rounds under ``threads``."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    try:
        with torch.no_grad():
            for f in fns:
                f()
            for _ in range(runs):
                for i, f in enumerate(fns):
                    w, c = time.perf_counter(), time.process_time()
                    f()
                    cpu[i].append(time.process_time() - c)
                    wall[i].append(time.perf_counter() - w)
    finally:
        torch.set_num_threads(old)
    return [(statistics.median(w) * 1e3, statistics.median(c) * 1e3) for w, c in zip(wall, cpu)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=len(SENTENCES), help="sentences per forward (<= 80)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    model, tokenizer = load_minilm()
    batch = tokenizer(SENTENCES[:args.batch], padding=True, truncation=True, return_tensors="pt")
    full = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    models = variants(model)
    ref = embed(model, full)
    times = interleaved([lambda m=m: m(**batch) for m in models.values()], args.runs, args.threads)
    base_wall, base_cpu = times[0]
    print(f"all-MiniLM-L6-v2, {len(SENTENCES)} sentences (cosine), latency of a batch of {args.batch} padded to "
          f"{batch['input_ids'].shape[1]} tokens, {args.threads} thread(s), median of {args.runs} interleaved runs; "
          f"torch {torch.__version__}\n")
    print("| model | latency ms | speedup | CPU ms | speedup (CPU) | encoder MB | vs fp32 | model MB | mean cos | min cos |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    enc0 = state_dict_mb(model.encoder)
    for (name, m), (wall, cpu) in zip(models.items(), times):
        cos = F.cosine_similarity(ref, embed(m, full), dim=1)
        enc = state_dict_mb(m.encoder)
        print(f"| {name} | {wall:.1f} | {base_wall / wall:.2f}x | {cpu:.1f} | {base_cpu / cpu:.2f}x | {enc:.1f} | "
              f"{enc / enc0:.3f} | {state_dict_mb(m):.1f} | {cos.mean():.4f} | {cos.min():.4f} |")


if __name__ == "__main__":
    main()
