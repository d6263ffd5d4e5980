"""Float attention between int8 projections vs quantized matmuls and softmax: the two forms of the attention
of one int8 ViT or MaxViT, side by side.

Run: ``python tests/bench_attention.py --models vit_b_32,vit_b_16,maxvit_t`` (``--help`` for the rest).

fxquant decomposes ``nn.MultiheadAttention`` (ViT) and torchvision's MaxViT attention into their ``nn.Linear``
projections (quantized) and, between them, one float ``scaled_dot_product_attention`` leaf
(``fxquant.decomposed.ScaledDotProductAttention``, ``RelativePositionAttention``). The other form, which fxquant
used before (and still uses for ``nn.MultiheadAttention`` where the caller asks for the attention weights), has
the middle as ``matmul``, ``softmax``, ``matmul`` (MaxViT: torchvision's einsums, which fxquant's normalize pass
turns into matmuls), which the backend tables quantize: each kernel dequantizes its inputs and quantizes its
output, so the ``tokens x tokens`` scores and probabilities are rounded and pass through memory several times.
Per model, in one process on ``fxquant bench``'s inputs and quantizers: SQNR of both int8 models and of torch.ao's
against fp32, and batch-1 latency of the three in ``--runs`` interleaved rounds (medians, and the
median of the ratio within a round). Timings come from a shared machine: read them within one run.
"""

from __future__ import annotations

import os
import statistics
import sys
import warnings
from typing import Optional

import torch

from fxquant.decomposed import DecomposedMultiheadAttention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_compile import zoo_parser  # noqa: E402  (the options the zoo-model scripts share)

#: the library's forward, which compare() swaps for the form below while it quantizes the other form
_LIBRARY_FORWARD = DecomposedMultiheadAttention.forward


def _matmul_softmax_forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                            average_attn_weights=True, is_causal=False):
    """The quantized-matmul form of ``DecomposedMultiheadAttention.forward``: the library's own weights path (the
    head-averaged weights it also returns are dead code in the traced graph, so they cost nothing)."""
    out, _ = _LIBRARY_FORWARD(self, query, key, value, key_padding_mask, True, attn_mask, average_attn_weights,
                              is_causal)
    return out, None


def compare(name: str, backend: str, runs: int) -> str:
    """The table row of one model."""
    import fxquant
    from fxquant import bench, decomposed
    from fxquant.report import float_ops, interleaved_rounds, paired_ratio
    from fxquant.zoo import torchvision_model

    case = bench._sized(bench.Case(model=name, backend=backend, calib_batches=4))
    model = torchvision_model(name, image_size=case.image_size)
    calib, x = bench._inputs(case)
    leaf = bench.quantize_fxquant(model, backend, x, calib).module
    maxvit = decomposed._MAXVIT_ATTENTION
    DecomposedMultiheadAttention.forward = _matmul_softmax_forward
    decomposed._MAXVIT_ATTENTION = ("", "")  # MaxViT's attention as torchvision writes it
    try:
        matmuls = bench.quantize_fxquant(model, backend, x, calib).module
    finally:
        DecomposedMultiheadAttention.forward, decomposed._MAXVIT_ATTENTION = _LIBRARY_FORWARD, maxvit
    if any(f.op in ("matmul", "softmax") for f in float_ops(matmuls)):
        raise SystemExit(f"{name}: the matmul/softmax form did not quantize its matmuls and softmax on {backend}")
    ao = bench.quantize_torch_ao(model, backend, x, calib).module if bench._ao_available() else None
    torch.backends.quantized.engine = backend
    with torch.no_grad():
        ref = model(calib[0])
        sqnr = [float(fxquant.sqnr(ref, m(calib[0]))) if m is not None else float("nan") for m in (leaf, matmuls, ao)]
    fns = [lambda: leaf(x), lambda: matmuls(x)] + ([lambda: ao(x)] if ao is not None else [])
    times = interleaved_rounds(fns, runs=runs, threads=1)
    ms = [statistics.median(t) * 1e3 for t in times] + ([] if ao is not None else [float("nan")])
    vs_ao = [f"{paired_ratio(times[i], times[2]):.3f}x" if ao is not None else "-" for i in (0, 1)]
    return (f"| {name} | {ms[0]:.1f} | {ms[1]:.1f} | {ms[2]:.1f} | {paired_ratio(times[0], times[1]):.3f}x | "
            f"{vs_ao[0]} | {vs_ao[1]} | {sqnr[0]:.2f} | {sqnr[1]:.2f} | {sqnr[2]:.2f} |")


def main(argv: Optional[list[str]] = None) -> int:
    ap = zoo_parser(__doc__)
    ap.add_argument("--runs", type=int, default=9, help="interleaved latency rounds (default 9)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    warnings.filterwarnings("ignore", category=UserWarning)   # torch.ao's deprecation warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    print(f"{args.backend}, batch 1, input 224, 1 thread, {args.runs} interleaved rounds; leaf = float "
          "scaled_dot_product_attention between int8 projections (fxquant), matmuls = quantized matmul/softmax/matmul\n")
    print("| model | leaf ms | matmuls ms | torch.ao ms | leaf/matmuls | leaf/ao | matmuls/ao | SQNR leaf dB | "
          "SQNR matmuls dB | SQNR ao dB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        print(compare(name, args.backend, args.runs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
