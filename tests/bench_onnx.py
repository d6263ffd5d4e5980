"""ONNX Runtime int8 (fxquant.export_onnx) vs fxquant int8 vs fp32: latency, SQNR, and what ORT fused.

Run ``python tests/bench_onnx.py`` (a few minutes; ``--models digits`` for a quick one). For each model: the
fp32 PyTorch model, the same float model exported to ONNX and run by ORT, fxquant's int8 model (``convert_fx``,
fbgemm) and ``fxquant.export_onnx`` of the same calibrated model run by ORT (graph optimizations on: ORT fuses
the Q/DQ pairs into integer ops). One thread everywhere, the same inputs, timings interleaved
(``fxquant.report.interleaved_latency``: median of ``--runs`` rounds). SQNR is against the fp32 PyTorch output.
The second table counts the ops of ORT's optimized int8 graph (``SessionOptions.optimized_model_filepath``).

Models: resnet18 and mobilenet_v2 from ``fxquant.zoo.torchvision_model`` (random weights, BN statistics
re-estimated), 4 calibration batches of 4 random images; the digits CNN of tests/bench_qat.py trained 3 epochs on
scikit-learn's digits, calibrated on 512 training images, measured on 64 test images. PyTorch flushes denormals
to zero (the trained digits weights hold some, which slow its fp32 convs about 2x).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import warnings

import torch

import fxquant
from fxquant.report import interleaved_latency

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _session(path: str, optimized: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _digits_model() -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    from bench_qat import DigitsCNN, digits

    x_train, y_train, x_test, _ = digits()
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(3):
        for i in range(0, len(x_train), 32):
            loss = torch.nn.functional.cross_entropy(model(x_train[i:i + 32]), y_train[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), [x_train[i:i + 64] for i in range(0, 512, 64)], x_test[:64]


def _zoo_model(name: str, size: int) -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    from fxquant.zoo import torchvision_model

    gen = torch.Generator().manual_seed(1)
    model = torchvision_model(name, image_size=size, bn_batches=4, batch_size=4)
    return model, [torch.randn(4, 3, size, size, generator=gen) for _ in range(4)], torch.randn(1, 3, size, size,
                                                                                                 generator=gen)


def measure(name: str, size: int, runs: int, workdir: str) -> tuple[list[str], collections.Counter]:
    """One table row and the op counts of ORT's optimized int8 graph."""
    model, calibration, x = _digits_model() if name == "digits" else _zoo_model(name, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,),
                                      backend_config="fbgemm")
        fxquant.calibrate(prepared, calibration, progress=False)
        quantized = fxquant.convert_fx(prepared)
        q_path, f_path, opt_path = (os.path.join(workdir, f"{name}{s}.onnx") for s in ("_int8", "_fp32", "_opt"))
        fxquant.export_onnx(prepared, (x,), q_path)
        torch.onnx.export(model, (x,), dynamo=True, verbose=False).save(f_path)
    ort_q, ort_f = _session(q_path, opt_path), _session(f_path)
    feed = {ort_q.get_inputs()[0].name: x.numpy()}
    feed_f = {ort_f.get_inputs()[0].name: x.numpy()}
    with torch.no_grad():
        ref = model(x)
        outs = [ref, torch.from_numpy(ort_f.run(None, feed_f)[0]), quantized(x),
                torch.from_numpy(ort_q.run(None, feed)[0])]
    fns = [lambda: model(x), lambda: ort_f.run(None, feed_f), lambda: quantized(x), lambda: ort_q.run(None, feed)]
    times = interleaved_latency(fns, runs=runs, threads=1)
    steps = (outs[3] - outs[2]).abs() / _out_scale(prepared)
    row = [name, f"{tuple(x.shape)}"] + [f"{t * 1e3:.2f}" for t in times] + [
        f"{times[0] / times[2]:.2f}x", f"{times[0] / times[3]:.2f}x", f"{times[2] / times[3]:.2f}x",
        f"{fxquant.sqnr(ref, outs[2]):.1f}", f"{fxquant.sqnr(ref, outs[3]):.1f}",
        f"{float((steps <= 2).float().mean()) * 100:.2f}%", f"{float(steps.max()):.0f}"]
    import onnx

    return row, collections.Counter(n.op_type for n in onnx.load(opt_path).graph.node)


def _out_scale(prepared: torch.nn.Module) -> float:
    ref = fxquant.convert_to_reference_fx(prepared)
    return float([n for n in ref.graph.nodes if n.op == "output"][0].args[0].args[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "digits"])
    parser.add_argument("--size", type=int, default=224, help="image size of the torchvision models")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the trained digits weights hold denormals, which would slow fp32 PyTorch 2x
    header = ["model", "input", "fp32 ms", "ORT fp32 ms", "fxquant int8 ms", "ORT int8 ms", "fxquant vs fp32",
              "ORT int8 vs fp32", "ORT int8 vs fxquant", "SQNR fxquant dB", "SQNR ORT int8 dB",
              "ORT within 2 steps of fxquant", "max steps"]
    rows, fused = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            row, ops = measure(name, args.size, args.runs, workdir)
            rows.append(row)
            fused[name] = ops
            print(f"done: {name}", file=sys.stderr)
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\nOps in ORT's optimized int8 graph:\n\n| model | ops |\n|---|---|")
    for name, ops in fused.items():
        print(f"| {name} | " + ", ".join(f"{k} {v}" for k, v in ops.most_common()) + " |")


if __name__ == "__main__":
    main()
