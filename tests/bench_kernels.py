"""fbgemm's and oneDNN's int8 convolutions on the same integers: which kernel is faster on this CPU, per shape.

Run: ``python tests/bench_kernels.py`` (``--help`` for the rest).

The ``x86`` backend runs oneDNN (``torch.ops.onednn.qconv_pointwise``) only on CPUs with VNNI, where its
activations are full 8-bit; without VNNI both libraries sum u8 x s8 pairs in int16, so activations must stay
within 7 bits, as fbgemm's do (``reduce_range``). This asks whether oneDNN would still be the faster kernel there:
per conv shape (those of the zoo's ResNets, MobileNets and VGGs at a 96x96 input), both kernels get the same 7-bit
activations, int8 per-channel weights and bias, batch 1, one thread, in interleaved rounds
(``fxquant.report.interleaved_rounds``); the ratio is the median over rounds of oneDNN's time over fbgemm's
within a round, and the last column the largest difference of their output integers. Timings come from a shared
machine: read the ratios, not the absolute times across runs.

``--binary`` prints instead torch's quantized mul on broadcasts against the float form (dequantize, float mul,
quantize: ``float_binary``, which ``QuantizedBinary`` runs where ``broadcast_is_slow`` says so), in the layouts a
converted model calls them with: a squeeze-excite gate ``[1, C, 1, 1]`` (a conv's output, so channels_last strides)
times an activation, over a grid of channels x pixels; ConvNeXt's layer scale ``[C, 1, 1]`` times an activation with
channels_last strides, the scale first, as ConvNeXt's block computes it; a per-feature ``[768]`` over ViT tokens. A
star marks where ``broadcast_is_slow`` picks the float form: the layer scale only. Alone, the float form beats the
kernel in many grid cells (the kernel runs each pixel's leftover channels one value at a time), yet inside models
timed as ``fxquant bench`` times them it did not pay there (see ``broadcast_is_slow``).

``--dispatch`` prints instead what one conv or linear call costs from Python, the kernel's work included: called
as torch.ao's modules call it (``torch.ops.quantized.conv2d(x, packed, scale, zero_point)``) and as fxquant's do
(``fxquant.backends.kernels.qtensor.call_packed``, which skips the ``__torch_function__`` lookup on the packed
weight: see its docstring). The difference is the same on every shape, so it is most of a small layer's time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import warnings
from typing import Callable, Optional

import torch

#: (in channels, out channels, kernel, stride, groups, input height = width)
SHAPES = [
    (3, 64, 7, 2, 1, 96),      # ResNet stem
    (64, 64, 3, 1, 1, 24),     # ResNet basic block
    (256, 64, 1, 1, 1, 24),    # bottleneck reduce
    (64, 256, 1, 1, 1, 24),    # bottleneck expand
    (128, 128, 3, 1, 1, 12),
    (512, 512, 3, 1, 1, 3),    # last stage
    (32, 32, 3, 1, 32, 48),    # depthwise (MobileNetV2)
    (96, 96, 3, 1, 96, 24),
    (144, 24, 1, 1, 1, 24),    # inverted-residual projection
    (256, 256, 3, 1, 1, 24),   # VGG
]


def _conv_pair(cin: int, cout: int, k: int, stride: int, groups: int, hw: int, gen: torch.Generator):
    """Both kernels' calls on the same 7-bit activations and int8 per-channel weights."""
    x_scale, x_zp, y_scale, y_zp = 2.0 / 127, 0, 0.05, 64
    x = torch.rand(1, cin, hw, hw, generator=gen) * 2
    w = torch.randn(cout, cin // groups, k, k, generator=gen) * 0.1
    bias = torch.randn(cout, generator=gen) * 0.1
    qx = torch.quantize_per_tensor(x, x_scale, x_zp, torch.quint8).contiguous(memory_format=torch.channels_last)
    w_scale = (w.abs().amax(dim=(1, 2, 3)) / 127).double()
    qw = torch.quantize_per_channel(w, w_scale, torch.zeros(cout, dtype=torch.long), 0, torch.qint8)
    pad, one = [k // 2, k // 2], [1, 1]
    packed = torch.ops.quantized.conv2d_prepack(qw, bias, [stride, stride], pad, one, groups)
    xu = qx.int_repr().contiguous(memory_format=torch.channels_last)
    scales = w_scale.float()
    o_packed = torch.ops.onednn.qconv_prepack(qw.int_repr(), scales, x_scale, x_zp, [stride, stride], pad, one,
                                              groups, None)
    w_zp = torch.zeros(cout, dtype=torch.int64)

    def fbgemm() -> torch.Tensor:
        return torch.ops.quantized.conv2d(qx, packed, y_scale, y_zp)

    def onednn() -> torch.Tensor:
        return torch.ops.onednn.qconv_pointwise.default(xu, x_scale, x_zp, o_packed, scales, w_zp, bias,
                                                        [stride, stride], pad, one, groups, y_scale, y_zp, None,
                                                        "none", [], "")
    return fbgemm, onednn


#: channels and sides (pixels = side x side) of the --binary grid
GATE_CHANNELS = (24, 32, 40, 64, 72, 96, 120, 144, 192, 240, 256, 384, 480, 512, 672, 960, 1152)
GATE_SIDES = (3, 7, 14, 28, 56)


def _q(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.quantize_per_tensor(x.contiguous(memory_format=torch.channels_last), scale, zero_point,
                                     torch.quint8)


def _binary_table(runs: int) -> None:
    """The --binary tables: torch's quantized mul vs the float form."""
    from fxquant.backends.kernels.qtensor import QuantizedBinary, broadcast_is_slow, float_binary
    from fxquant.qparams import QParams
    from fxquant.report import interleaved_rounds, paired_ratio

    kernel = QuantizedBinary("mul", QParams(torch.tensor(0.03), torch.tensor(60), torch.quint8))

    def floats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return float_binary("mul", a, b, 0.03, 60)

    gen = torch.Generator().manual_seed(0)

    def cell(a: torch.Tensor, b: torch.Tensor) -> str:
        t_k, t_f = interleaved_rounds([lambda: kernel(a, b), lambda: floats(a, b)], runs=runs, threads=1)
        chosen = broadcast_is_slow(a, b)
        return (f"{statistics.median(t_k) * 1e6:.0f} / {statistics.median(t_f) * 1e6:.0f} "
                f"({paired_ratio(t_f, t_k):.2f}x){' *' if chosen else ''}")

    print("quantized mul us / float form us (float / kernel, the median ratio within a round; * = "
          "broadcast_is_slow picks the float form)\n")
    print("gate * x, gate 1xCx1x1 (a sigmoid's output), x 1xCxSxS channels_last (squeeze-excite):\n")
    print("| C \\ side | " + " | ".join(str(s) for s in GATE_SIDES) + " |")
    print("|---" * (len(GATE_SIDES) + 1) + "|")
    for c in GATE_CHANNELS:
        gate = _q(torch.rand(1, c, 1, 1, generator=gen), 1 / 256, 0)
        gate = gate.as_strided(gate.shape, (c, 1, c, c))  # a conv's [1, C, 1, 1] output: channels_last strides
        cells = [cell(gate, _q(torch.randn(1, c, side, side, generator=gen) * 3, 0.05, 60)) for side in GATE_SIDES]
        print(f"| {c} | " + " | ".join(cells) + " |", flush=True)
    print("\nother broadcasts:\n\n| operands | quantized mul us / float form us |\n|---|---|")
    for c, side in ((96, 56), (192, 28), (384, 14), (768, 7)):
        scale = torch.quantize_per_tensor(torch.rand(c, 1, 1, generator=gen), 0.01, 0, torch.quint8)
        nhwc = torch.quantize_per_tensor(torch.randn(1, side, side, c, generator=gen), 0.05, 60, torch.quint8)
        x = nhwc.permute(0, 3, 1, 2)   # ConvNeXt's block permutes its NHWC MLP output back
        print(f"| layer scale {c}x1x1 * x 1x{c}x{side}x{side} (ConvNeXt's permuted NHWC) | {cell(scale, x)} |",
              flush=True)
    bias = torch.quantize_per_tensor(torch.rand(768, generator=gen), 0.01, 0, torch.quint8)
    tokens = torch.quantize_per_tensor(torch.randn(1, 197, 768, generator=gen), 0.05, 60, torch.quint8)
    print(f"| x 1x197x768 * 768 (per-feature, ViT) | {cell(tokens, bias)} |")


#: (label, in features, out features, rows) for the --dispatch table's linears
DISPATCH_LINEARS = [("linear 16->16, 1 row", 16, 16, 1), ("linear 768->3072, 50 rows (ViT-B/32 MLP)", 768, 3072, 50)]
#: the --dispatch table's convs: rows of SHAPES, the smallest first
DISPATCH_CONVS = [(16, 16, 1, 1, 1, 8), (96, 24, 1, 1, 1, 3), (96, 96, 3, 1, 96, 24), (64, 64, 3, 1, 1, 24),
                  (256, 256, 3, 1, 1, 24)]


def dispatch_pairs(gen: torch.Generator) -> list[tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor]]]:
    """(label, torch.ao's call, fxquant's call) on the same quantized input and packed weight, per --dispatch row."""
    from fxquant.backends.kernels.qtensor import call_packed

    pairs = []
    for cin, cout, k, stride, groups, hw in DISPATCH_CONVS:
        w = torch.quantize_per_channel(torch.randn(cout, cin // groups, k, k, generator=gen) * 0.1,
                                       torch.full((cout,), 0.002), torch.zeros(cout, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.conv2d_prepack(w, torch.zeros(cout), [stride] * 2, [k // 2] * 2, [1, 1], groups)
        x = _q(torch.randn(1, cin, hw, hw, generator=gen), 0.05, 60)
        pairs.append((f"conv {cin}->{cout}, {k}x{k}, s{stride}, g{groups} @ {hw}",
                      lambda x=x, p=packed: torch.ops.quantized.conv2d(x, p, 0.2, 64),
                      lambda x=x, p=packed: call_packed(torch.ops.quantized.conv2d.new, x, p, 0.2, 64)))
    for label, fin, fout, rows in DISPATCH_LINEARS:
        w = torch.quantize_per_tensor(torch.randn(fout, fin, generator=gen) * 0.1, 0.002, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(w, torch.zeros(fout))
        x = torch.quantize_per_tensor(torch.randn(1, rows, fin, generator=gen), 0.05, 60, torch.quint8)
        pairs.append((label, lambda x=x, p=packed: torch.ops.quantized.linear(x, p, 0.2, 64),
                      lambda x=x, p=packed: call_packed(torch.ops.quantized.linear.default, x, p, 0.2, 64)))
    return pairs


def _dispatch_table(runs: int) -> None:
    """The --dispatch table: one call as torch.ao makes it vs as fxquant makes it."""
    from fxquant.report import interleaved_rounds, paired_ratio

    gen = torch.Generator().manual_seed(0)
    print("| op | torch.ao's call us | fxquant's call us | fxquant/torch.ao |\n|---|---|---|---|")
    for label, ao_call, fxq_call in dispatch_pairs(gen):
        t_ao, t_fxq = interleaved_rounds([ao_call, fxq_call], runs=runs, warmup=3, threads=1)
        print(f"| {label} | {statistics.median(t_ao) * 1e6:.1f} | {statistics.median(t_fxq) * 1e6:.1f} | "
              f"{paired_ratio(t_fxq, t_ao):.2f}x |", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=31, help="interleaved rounds per shape (default 31)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--binary", action="store_true", help="broadcasting muls instead of the convs")
    which.add_argument("--dispatch", action="store_true",
                       help="one conv / linear call as torch.ao makes it vs as fxquant makes it")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.binary or args.dispatch:
        warnings.filterwarnings("ignore", category=UserWarning)
        torch.backends.quantized.engine = "fbgemm"
        print(f"fbgemm engine, batch 1, 1 thread, median of {args.runs} interleaved rounds; "
              f"torch {torch.__version__}\n")
        (_binary_table if args.binary else _dispatch_table)(args.runs)
        return 0
    if not hasattr(torch.ops.onednn, "qconv_pointwise"):
        print("this torch build has no torch.ops.onednn.qconv_pointwise: nothing to compare", file=sys.stderr)
        return 1
    warnings.filterwarnings("ignore", category=UserWarning)   # quantized tensors' deprecation warnings
    from fxquant.backends.cpu import has_vnni
    from fxquant.report import interleaved_rounds, paired_ratio

    torch.backends.quantized.engine = "fbgemm"
    gen = torch.Generator().manual_seed(0)
    print(f"int8 conv, batch 1, 1 thread, 7-bit activations, median of {args.runs} interleaved rounds; "
          f"CPU with VNNI: {'yes' if has_vnni() else 'no'}; torch {torch.__version__}\n")
    print("| conv (in->out, kernel, stride, groups @ size) | fbgemm us | oneDNN us | oneDNN/fbgemm | max int diff |")
    print("|---|---|---|---|---|")
    ratios = []
    for cin, cout, k, stride, groups, hw in SHAPES:
        fbgemm, onednn = _conv_pair(cin, cout, k, stride, groups, hw, gen)
        diff = int((fbgemm().int_repr().int() - onednn().int()).abs().max())
        fb_s, on_s = interleaved_rounds([fbgemm, onednn], runs=args.runs, warmup=3, threads=1)
        ratio = paired_ratio(on_s, fb_s)
        ratios.append(ratio)
        print(f"| {cin}->{cout}, {k}x{k}, s{stride}, g{groups} @ {hw} | {statistics.median(fb_s) * 1e6:.1f} | "
              f"{statistics.median(on_s) * 1e6:.1f} | {ratio:.2f}x | {diff} |", flush=True)
    geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"\ngeomean oneDNN/fbgemm over {len(ratios)} shapes: {geomean:.2f}x "
          f"(faster on {sum(r < 1 for r in ratios)} of {len(ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
