"""ONNX Runtime int8 (fxquant.export_onnx) vs fxquant int8 vs fp32: latency, SQNR, and what ORT fused.

Run ``python tests/bench_onnx.py`` (a few minutes; ``--models digits`` for a quick one). For each model: the
fp32 PyTorch model, the same float model exported to ONNX and run by ORT, fxquant's int8 model (``convert_fx``,
fbgemm) and ``fxquant.export_onnx`` of the same calibrated model run by ORT (graph optimizations on: ORT fuses
the Q/DQ pairs into integer ops). One thread everywhere, the same inputs, timings interleaved
(``fxquant.report.interleaved_latency``: median of ``--runs`` rounds). SQNR is against the fp32 PyTorch output.
The second table counts the ops of ORT's optimized int8 graph (``SessionOptions.optimized_model_filepath``).
"Steps" are units of the output's quantization scale, counted as integers (both outputs lie on that grid).

``python tests/bench_onnx.py --layers resnet18 --size 64`` instead prints where ORT's int8 output departs from
fxquant's, layer by layer (:func:`layers`), and the output agreement with fxquant's int8 model given ORT's bias
rounding (:func:`bias_counterfactual`).

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


def _session(path: str, optimized: str | None = None, level=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if optimized:
        options.optimized_model_filepath = optimized
    if level is not None:
        options.graph_optimization_level = level
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


def _zoo_model(name: str, size: int, batch: int = 1) -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    from fxquant.zoo import torchvision_model

    gen = torch.Generator().manual_seed(1)
    model = torchvision_model(name, image_size=size, bn_batches=4, batch_size=4)
    return model, [torch.randn(4, 3, size, size, generator=gen) for _ in range(4)], torch.randn(batch, 3, size, size,
                                                                                                 generator=gen)


def steps(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """|a - b| in whole quantization steps of ``scale`` (both on that grid; rounding drops the float noise of
    the subtraction, which would put an exact 2 steps at 2.000002)."""
    return ((a - b).abs() / scale).round()


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
    diff = steps(outs[3], outs[2], _out_scale(prepared))
    row = [name, f"{tuple(x.shape)}"] + [f"{t * 1e3:.2f}" for t in times] + [
        f"{times[0] / times[2]:.2f}x", f"{times[0] / times[3]:.2f}x", f"{times[2] / times[3]:.2f}x",
        f"{fxquant.sqnr(ref, outs[2]):.1f}", f"{fxquant.sqnr(ref, outs[3]):.1f}",
        f"{float((diff <= 2).float().mean()) * 100:.2f}%", f"{float(diff.max()):.0f}"]
    import onnx

    return row, collections.Counter(n.op_type for n in onnx.load(opt_path).graph.node)


def _out_scale(prepared: torch.nn.Module) -> float:
    ref = fxquant.convert_to_reference_fx(prepared)
    return float([n for n in ref.graph.nodes if n.op == "output"][0].args[0].args[1])


def _quantize(model: torch.nn.Module, calibration: list[torch.Tensor], x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,),
                                      backend_config="fbgemm")
        fxquant.calibrate(prepared, calibration, progress=False)
        return prepared, fxquant.convert_fx(prepared)


def _tapped(path: str, workdir: str) -> tuple[str, str, list[str], list[str], list[str]]:
    """Two copies of an exported model: every QuantizeLinear output made a graph output ("taps"), and the same with
    every activation DequantizeLinear reading a graph input ``in_<tap>`` instead (each layer isolated)."""
    import onnx

    model = onnx.load(path)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    taps = [n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"]
    kinds = [producer[n.input[0]].op_type if n.input[0] in producer else "input"
             for n in graph.node if n.op_type == "QuantizeLinear"]
    elem = {n.output[0]: onnx.TensorProto.INT8 if "int8" in n.name else None for n in graph.node}
    del graph.output[:]
    for t in taps:
        graph.output.append(onnx.helper.make_tensor_value_info(t, elem.get(t) or onnx.TensorProto.UINT8, None))
    chained = os.path.join(workdir, "taps.onnx")
    onnx.save(model, chained)
    fed = []
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in taps:
            fed.append(n.input[0]) if n.input[0] not in fed else None
            n.input[0] = "in_" + n.input[0]
    for t in fed:
        graph.input.append(onnx.helper.make_tensor_value_info("in_" + t, onnx.TensorProto.UINT8, None))
    isolated = os.path.join(workdir, "isolated.onnx")
    onnx.save(model, isolated)
    return chained, isolated, taps, kinds, fed


class _Tap(torch.fx.Interpreter):
    """Runs fxquant's int8 GraphModule, recording the integers of every tensor that ONNX holds as a
    QuantizeLinear output (not the outputs of shares-input ops that keep their input's grid: max pool, flatten);
    with ``feed``, each of those outputs is replaced by the given integers before the next layer reads it."""

    def __init__(self, gm: torch.fx.GraphModule, feed: list | None = None) -> None:
        super().__init__(gm)
        self.feed, self.outs = feed, []

    def run_node(self, n: torch.fx.Node):
        from fxquant.backends.config import Observation
        from fxquant.passes.context import record

        out = super().run_node(n)
        entry = record(n).entry
        if not (isinstance(out, torch.Tensor) and out.is_quantized) or (
                entry is not None and entry.observation is Observation.SHARES_INPUT and not entry.leaves_grid):
            return out
        if len(self.outs) >= (len(self.feed) if self.feed is not None else 10**9):
            raise RuntimeError(f"--layers: more quantized tensors in fxquant's model than QuantizeLinear in the "
                               f"ONNX file (at '{n.name}'); the per-layer mapping does not hold for this model")
        self.outs.append((n.name, out.int_repr()))
        if self.feed is not None:
            given = torch.from_numpy(self.feed[len(self.outs) - 1])
            if given.shape != out.shape:
                raise RuntimeError(f"--layers: '{n.name}' has shape {tuple(out.shape)}, the matching ONNX tensor "
                                   f"{tuple(given.shape)}; the per-layer mapping does not hold for this model")
            out = torch._make_per_tensor_quantized_tensor(given, out.q_scale(), out.q_zero_point())
        return out


def layers(name: str, size: int, batch: int, workdir: str) -> None:
    """Per-layer agreement of ORT's int8 graph, fxquant's int8 model and the file's float reading (ORT with graph
    optimizations off: the Q/DQ reference arithmetic), in % of elements that differ by at least one step.

    "isolated": every layer reads the float reading's integers as input, so only its own rounding differs;
    "chained": the models run end to end, each on its own previous results.
    """
    import onnxruntime as ort

    model, calibration, x = _digits_model() if name == "digits" else _zoo_model(name, size, batch)
    prepared, quantized = _quantize(model, calibration, x)
    path = os.path.join(workdir, "model.onnx")
    fxquant.export_onnx(prepared, (x,), path)
    chained, isolated, taps, kinds, fed = _tapped(path, workdir)
    feed = {_session(path).get_inputs()[0].name: x.numpy()}
    off = _session(chained, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    reference = dict(zip(taps, off.run(None, feed)))
    ort_chained = dict(zip(taps, _session(chained).run(None, feed)))
    ort_isolated = dict(zip(taps, _session(isolated).run(None, {**feed, **{"in_" + t: reference[t] for t in fed}})))
    with torch.no_grad():
        fx_isolated = _Tap(quantized, [reference[t] for t in taps])
        fx_isolated.run(x)
        fx_chained = _Tap(quantized)
        fx_chained.run(x)
    if len(fx_chained.outs) != len(taps):
        raise RuntimeError(f"--layers: {len(fx_chained.outs)} quantized tensors in fxquant's model, {len(taps)} "
                           "QuantizeLinear in the ONNX file; the per-layer mapping does not hold for this model")

    def pct(a, b, at_least=1) -> str:
        d = (torch.as_tensor(a).to(torch.int32) - torch.as_tensor(b).to(torch.int32)).abs()
        return f"{float((d >= at_least).float().mean()) * 100:.3f}"

    print(f"Per-layer agreement, {name} at {tuple(x.shape)}: % of elements one step or more apart (chained: and "
          "two or more)\n")
    print("| # | ONNX op before the QuantizeLinear | fxquant node | elements | isolated: ORT int8 vs float reading | "
          "isolated: fxquant int8 vs float reading | isolated: ORT vs fxquant | chained: ORT vs fxquant | "
          "chained: ORT vs fxquant, >= 2 steps |\n|" + "---|" * 9)
    for i, t in enumerate(taps):
        node, fx_iso = fx_isolated.outs[i]
        fx_ch = fx_chained.outs[i][1]
        print(f"| {i} | {kinds[i]} | {node} | {reference[t].size} | {pct(ort_isolated[t], reference[t])} | "
              f"{pct(fx_iso, reference[t])} | {pct(ort_isolated[t], fx_iso)} | {pct(ort_chained[t], fx_ch)} | "
              f"{pct(ort_chained[t], fx_ch, 2)} |")
    bias_counterfactual(prepared, quantized, path, x)


def _round_bias_like_ort(quantized: torch.fx.GraphModule, prepared: torch.fx.GraphModule) -> None:
    """Give every conv / linear of fxquant's int8 model the bias ONNX Runtime's QLinearConv / QGemm use:
    ``round(bias / (x_scale * w_scale))`` as int32, times ``x_scale * w_scale`` (fbgemm adds the float bias)."""
    from fxquant.passes.reference import quantized_weight_calls

    ref = fxquant.convert_to_reference_fx(prepared)
    dq = torch.ops.fxquant.dequantize_per_tensor.default
    calls = quantized_weight_calls(ref)
    kernels = [quantized.get_submodule(str(n.target)) for n in quantized.graph.nodes
               if n.op == "call_module" and hasattr(quantized.get_submodule(str(n.target)), "_repack")
               and getattr(quantized.get_submodule(str(n.target)), "weight", None) is not None]
    assert len(kernels) == len(calls), (len(kernels), len(calls))
    for kernel, call in zip(kernels, calls):
        if call.args[2] is None:
            continue
        x = call.args[0]
        while x.target is not dq:  # through max pooling and the like to the input's dequantize
            x = x.args[0]
        w = call.args[1]
        per_channel = isinstance(w.args[1], torch.fx.Node)
        w_scale = getattr(ref, str(w.args[1].target)) if per_channel else torch.tensor(w.args[1])
        unit = torch.tensor(float(x.args[1]), dtype=torch.float32) * w_scale.to(torch.float32)
        bias = getattr(ref, str(call.args[2].target))
        assert bias.shape == kernel.bias.shape
        kernel._buffers["bias"] = torch.round(bias / unit) * unit
        kernel._repack(kernel.weight)


def bias_counterfactual(prepared, quantized, path: str, x: torch.Tensor) -> None:
    """Output agreement: ORT int8 and the file's float reading vs fxquant int8, and vs fxquant int8 with ORT's
    int32 bias rounding (what is left once the one known difference is taken out)."""
    import copy

    import onnxruntime as ort

    scale = _out_scale(prepared)
    with torch.no_grad():
        ours = quantized(x)
        rounded = copy.deepcopy(quantized)
        _round_bias_like_ort(rounded, prepared)
        ours_rounded = rounded(x)
    session = _session(path)
    feed = {session.get_inputs()[0].name: x.numpy()}
    ort_int8 = torch.from_numpy(session.run(None, feed)[0])
    ort_float = torch.from_numpy(_session(path, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, feed)[0])

    def row(label, a, b) -> str:
        d = steps(a, b, scale)
        equal, near = float((d == 0).float().mean()) * 100, float((d <= 2).float().mean()) * 100
        return f"| {label} | {equal:.2f}% | {near:.2f}% | {int(d.max())} |"

    print(f"\nOutput agreement ({ours.numel()} elements), in output steps\n\n| compared | equal | within 2 steps | "
          "max steps |\n|---|---|---|---|")
    print(row("ORT int8 vs fxquant int8", ort_int8, ours))
    print(row("ORT float reading of the file vs fxquant int8", ort_float, ours))
    print(row("fxquant int8 with ORT's int32 bias vs fxquant int8", ours_rounded, ours))
    print(row("ORT int8 vs fxquant int8 with ORT's int32 bias", ort_int8, ours_rounded))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "digits"])
    parser.add_argument("--size", type=int, default=224, help="image size of the torchvision models")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--layers", metavar="MODEL", help="print the per-layer agreement of MODEL instead (no timing)")
    parser.add_argument("--batch", type=int, default=16, help="images for --layers (torchvision models)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the trained digits weights hold denormals, which would slow fp32 PyTorch 2x
    if args.layers:
        with tempfile.TemporaryDirectory() as workdir, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layers(args.layers, args.size, args.batch, workdir)
        return
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
