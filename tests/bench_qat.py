"""Quantization-aware training on real data: small CNNs on scikit-learn's digits (8x8 images, 10 classes).

Run ``python tests/bench_qat.py`` (about two minutes on one core). It prints one Markdown table per model:
test accuracy of the fp32 model, of post-training quantization (PTQ) and of QAT fine-tuning, with 8-bit and
with 4-bit weights (range -8..7; activations 8-bit throughout), each int8 figure measured on the model
``convert_fx`` produced. Every figure is the mean over ``--seeds`` fp32 trainings (seeds 0, 1, ...), because
one test image is 0.19 points and single runs move by an image or two.

Recipe (fixed stratified split, one thread; chosen before looking at test accuracy, nothing tuned on it):
* fp32: 40 epochs of Adam (lr 3e-3, cosine to 0), batch 32;
* PTQ: ``prepare_fx`` with the backend's default qconfig (histogram activations, per-channel weights), 16
  calibration batches of training data, ``convert_fx``;
* QAT: ``prepare_qat_fx`` on the trained fp32 model, 3 epochs of the same optimizer at 1% of its peak learning
  rate with a cosine schedule (NVIDIA's QAT guidance), batch norm statistics frozen and observers disabled for
  the last epoch, ``convert_fx``. The "LSQ" rows learn the quantization step sizes
  (``fxquant.LearnableFakeQuantize``) instead of tracking ranges with moving averages.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.fake_quantize import FakeQuantize
from fxquant.observers import MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver
from fxquant.qconfig import QConfig, QConfigMapping

BACKEND = "x86"
SEED = 0


def digits(seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits data set as ``(x_train, y_train, x_test, y_test)``: 70/30 stratified split, pixels in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.3, random_state=seed, stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


class DigitsCNN(nn.Module):
    """conv-bn-relu x2, pool, conv-bn-relu, pool, linear: 8x8 -> 10 classes (``width`` channels, then 2x, 4x)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width)
        self.conv3, self.bn3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False), nn.BatchNorm2d(4 * width)
        self.fc = nn.Linear(4 * width * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        return self.fc(torch.flatten(x, 1))


def batches(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator) -> Iterator[tuple]:
    order = torch.randperm(len(y), generator=generator)
    for i in range(0, len(y), size):
        j = order[i:i + size]
        yield x[j], y[j]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, optimizer: torch.optim.Optimizer,
          peak_lr: float, on_epoch: Callable[[nn.Module, int], None] = lambda m, e: None, batch: int = 32) -> None:
    """Minibatch training with a per-step cosine schedule from ``peak_lr`` to 0."""
    g = torch.Generator().manual_seed(SEED)
    steps = epochs * math.ceil(len(y) / batch)
    step = 0
    for epoch in range(epochs):
        on_epoch(model, epoch)
        model.train()
        for xb, yb in batches(x, y, batch, g):
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * peak_lr * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


def weight_4bit(qat: bool):
    grid = dict(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-8, quant_max=7)
    if qat:
        return FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, **grid)
    return PerChannelMinMaxObserver.with_args(**grid)


def mapping(qat: bool, weight_bits: int, lsq: bool = False) -> QConfigMapping:
    """The backend's default (QAT) qconfig, with 4-bit weights and/or learnable fake quantizers if asked."""
    qconfig = fxquant.get_default_qat_qconfig(BACKEND) if qat else fxquant.get_default_qconfig(BACKEND)
    if weight_bits == 4:
        qconfig = QConfig(activation=qconfig.activation, weight=weight_4bit(qat))
    if lsq:
        act, w = qconfig.activation(), qconfig.weight()
        qconfig = QConfig(
            activation=fxquant.LearnableFakeQuantize.with_args(
                observer=type(act.activation_post_process), dtype=act.dtype, qscheme=act.qscheme,
                quant_min=act.quant_min, quant_max=act.quant_max),
            weight=fxquant.LearnableFakeQuantize.with_args(
                observer=type(w.activation_post_process), dtype=w.dtype, qscheme=w.qscheme,
                quant_min=w.quant_min, quant_max=w.quant_max, ch_axis=0))
    return QConfigMapping().set_global(qconfig)


def ptq(model: nn.Module, x: torch.Tensor, weight_bits: int) -> nn.Module:
    example = (x[:32],)
    prepared = fxquant.prepare_fx(copy.deepcopy(model).eval(), mapping(False, weight_bits), example,
                                  backend_config=BACKEND)
    g = torch.Generator().manual_seed(SEED)
    calib = [xb for i, (xb, _) in zip(range(16), batches(x, torch.zeros(len(x)), 32, g))]
    fxquant.calibrate(prepared, calib, progress=False)
    return fxquant.convert_fx(prepared)


FP32_LR = 3e-3
QAT_LR = FP32_LR / 100


def fp32_model(x: torch.Tensor, y: torch.Tensor, width: int, seed: int, epochs: int = 40) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitsCNN(width)
    train(model, x, y, epochs, torch.optim.Adam(model.parameters(), lr=FP32_LR), FP32_LR)
    return model


def qat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_bits: int, lsq: bool = False,
        epochs: int = 3, lr: float = QAT_LR) -> tuple[nn.Module, nn.Module]:
    """QAT fine-tuning of a trained fp32 model; returns ``(qat_model, converted_model)``."""
    torch.manual_seed(SEED)
    prepared = fxquant.prepare_qat_fx(copy.deepcopy(model).train(), mapping(True, weight_bits, lsq), (x[:32],),
                                      backend_config=BACKEND)
    optimizer = torch.optim.Adam(prepared.parameters(), lr=lr)

    def schedule(m: nn.Module, epoch: int) -> None:
        if epochs > 1 and epoch == epochs - 1:  # last epoch: deployed batch norm and frozen ranges
            fxquant.freeze_bn_stats(m)
            fxquant.disable_observer(m)

    train(prepared, x, y, epochs, optimizer, lr, on_epoch=schedule)
    prepared.eval()
    fxquant.disable_observer(prepared)
    return prepared, fxquant.convert_fx(prepared)


ROWS = ("fp32", "PTQ, 8-bit weights", "QAT, 8-bit weights", "QAT (LSQ), 8-bit weights", "PTQ, 4-bit weights",
        "QAT, 4-bit weights", "QAT (LSQ), 4-bit weights")


def run_seed(width: int, seed: int, data: tuple, qat_epochs: int) -> dict[str, tuple[float, float]]:
    """Row name -> (accuracy of the model that runs: fp32 or converted int8, accuracy of the QAT model)."""
    x_tr, y_tr, x_te, y_te = data
    model = fp32_model(x_tr, y_tr, width, seed)
    out = {"fp32": (accuracy(model, x_te, y_te), float("nan"))}
    for bits in (8, 4):
        out[f"PTQ, {bits}-bit weights"] = (accuracy(ptq(model, x_tr, bits), x_te, y_te), float("nan"))
        for lsq in (False, True):
            qat_model, converted = qat(model, x_tr, y_tr, bits, lsq=lsq, epochs=qat_epochs)
            out[f"QAT{' (LSQ)' if lsq else ''}, {bits}-bit weights"] = (accuracy(converted, x_te, y_te),
                                                                         accuracy(qat_model, x_te, y_te))
    return out


def table(width: int, runs: list[dict[str, tuple[float, float]]]) -> str:
    params = sum(p.numel() for p in DigitsCNN(width).parameters())
    lines = [f"DigitsCNN(width={width}): {width}/{2 * width}/{4 * width} channels, {params} parameters; "
             f"mean over {len(runs)} seeds (min..max of the per-seed difference to fp32)", "",
             "| model | test accuracy % | vs fp32 (points) | per-seed range | QAT model, fake quant % |",
             "|---|---|---|---|---|"]
    fp32 = [r["fp32"][0] for r in runs]
    for row in ROWS:
        acc = [r[row][0] for r in runs]
        fake = [r[row][1] for r in runs]
        deltas = [a - f for a, f in zip(acc, fp32)]
        cells = [f"{statistics.mean(acc):.2f}"]
        if row == "fp32":
            cells += ["", "", ""]
        else:
            cells += [f"{statistics.mean(deltas):+.2f}", f"{min(deltas):+.2f}..{max(deltas):+.2f}",
                      "" if fake[0] != fake[0] else f"{statistics.mean(fake):.2f}"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 2])
    parser.add_argument("--qat-epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = digits()
    print(f"digits: {len(data[1])} train / {len(data[3])} test images (one test image = {100 / len(data[3]):.2f} "
          f"points); backend {BACKEND}; QAT: {args.qat_epochs} epochs of Adam at lr {QAT_LR:g} (fp32: {FP32_LR:g})\n")
    for width in args.widths:
        runs = [run_seed(width, seed, data, args.qat_epochs) for seed in range(args.seeds)]
        print(table(width, runs) + "\n")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
