"""The ``fxquant`` command: quantize a model and print the report, inspect a graph, run the benchmark.

Run ``fxquant --help`` (or ``python -m fxquant --help``); each command has its own ``--help``.

- ``fxquant quantize MODEL``: MODEL is a torchvision name (``resnet18``) or ``path/to/file.py:factory`` (a
  function or class returning an ``nn.Module``). Calibrates on random data, a folder of images or a ``.pt``
  tensor file, converts, prints the report (size, latency fp32 vs int8, SQNR, worst layers, ops left float)
  and optionally saves the quantized model.
- ``fxquant inspect MODEL``: the prepared (or ``--converted``) graph, one line per node with what fxquant
  decided for it (the :class:`~fxquant.passes.context.NodeRecord` at ``node.meta["fxquant"]``).
- ``fxquant bench``: fxquant vs torch.ao vs fp32 on torchvision models (see :mod:`fxquant.bench`).

Errors go to stderr as one line ``fxquant: error (KIND): MESSAGE`` and set the exit status (see
:class:`ExitCode`); ``--debug`` prints the traceback instead.

Example:
    >>> from fxquant.cli import main
    >>> main(["quantize", "resnet18", "--input-size", "32", "--calib-batches", "1"])   # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import importlib.util
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn
from tqdm.auto import tqdm

import fxquant
from fxquant.errors import CalibrationError, ConvertError, EngineError, FxQuantError, QConfigError, TraceError
from fxquant.passes.context import RECORD_KEY, NodeRecord
from fxquant.report import QuantReport, interleaved_latency, state_dict_bytes

__all__ = ["main", "build_parser", "ExitCode", "CliError", "load_model", "load_data", "CalibrationData",
           "LayerError", "worst_layers", "describe_graph"]

BACKENDS = ("fbgemm", "x86", "qnnpack")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ExitCode(enum.IntEnum):
    """Exit status of the ``fxquant`` command (documented in docs/cli.md)."""

    OK = 0
    ERROR = 1      #: any other fxquant error, or an unexpected one
    USAGE = 2      #: bad command line
    MODEL = 3      #: the model cannot be found, imported or built
    TRACE = 4      #: torch.fx cannot trace the model (with --no-partial)
    QCONFIG = 5    #: the qconfig (mapping) is invalid or forbidden by the backend
    DATA = 6       #: calibration / input data missing, unreadable or not accepted by the model
    CONVERT = 7    #: convert failed, or the backend's quantized engine is not available
    OUTPUT = 8     #: the quantized model cannot be saved
    INTERRUPTED = 130


class CliError(Exception):
    """A failure with its exit code; the message is shown as one line on stderr."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------- loading models

def _load_factory(spec: str) -> nn.Module:
    path_s, _, attr = spec.rpartition(":")
    path = Path(path_s)
    if not path.is_file():
        raise CliError(ExitCode.MODEL, f"model file '{path}' not found (MODEL is a torchvision name or path/to/file.py:factory)")
    mod_spec = importlib.util.spec_from_file_location(f"fxquant_user_{path.stem}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise CliError(ExitCode.MODEL, f"cannot import '{path}' as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's code
        raise CliError(ExitCode.MODEL, f"importing '{path}' failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = [n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise CliError(ExitCode.MODEL, f"'{path}' has no callable '{attr}'; callables there: {', '.join(names) or 'none'}")
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001 - the user's code
        raise CliError(ExitCode.MODEL, f"{spec}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise CliError(ExitCode.MODEL, f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_torchvision(name: str, image_size: int) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise CliError(ExitCode.MODEL, "torchvision is not installed; give MODEL as path/to/file.py:factory") from exc
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
        raise CliError(ExitCode.MODEL, f"'{name}' is not a torchvision classification model nor a file.py:factory; {hint}")
    return fxquant.zoo.torchvision_model(name, image_size=image_size)


def load_model(spec: str, image_size: int = 224) -> nn.Module:
    """The float model named by ``spec`` (a torchvision name or ``path/to/file.py:factory``), in eval mode.

    Raises:
        CliError: (``ExitCode.MODEL``) the name, file or factory cannot be found or fails.
    """
    import fxquant.zoo  # noqa: F401 - torchvision models

    model = _load_factory(spec) if ":" in spec or spec.endswith(".py") else _load_torchvision(spec, image_size)
    return model.eval()


# ------------------------------------------------------------------------------------------ calibration data

@dataclasses.dataclass
class CalibrationData:
    """Batches to calibrate with and the batch-1 input the report measures on.

    Attributes:
        batches: calibration batches (tensors with a batch dimension).
        example: one input of batch size 1 (example_inputs for prepare, latency and SQNR).
        source: where the data came from, for the report.
    """

    batches: list[torch.Tensor]
    example: torch.Tensor
    source: str


def _read_image(path: Path, size: int) -> torch.Tensor:
    """One image as a normalized float (3, size, size) tensor: shorter side resized to ``size``, center crop."""
    try:
        from torchvision.io import ImageReadMode, decode_image
        img = decode_image(str(path), mode=ImageReadMode.RGB)
    except Exception as first:  # noqa: BLE001 - try PIL, then report the file
        try:
            import numpy as np
            from PIL import Image
            with Image.open(path) as im:
                img = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        except Exception:  # noqa: BLE001
            raise CliError(ExitCode.DATA, f"cannot read image '{path}': {first}") from first
    img = img.float().unsqueeze(0) / 255.0
    h, w = img.shape[-2:]
    scale = size / min(h, w)
    img = torch.nn.functional.interpolate(img, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                                          mode="bilinear", antialias=True, align_corners=False)
    top, left = (img.shape[-2] - size) // 2, (img.shape[-1] - size) // 2
    img = img[0, :, top:top + size, left:left + size]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img - mean) / std


def _image_folder(folder: Path, size: int, batches: int, batch_size: int) -> list[torch.Tensor]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:batches * batch_size]
    if not files:
        raise CliError(ExitCode.DATA, f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder '{folder}'")
    images = [_read_image(p, size) for p in files]
    return [torch.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def _tensor_file(path: Path, batches: int, batch_size: int) -> list[torch.Tensor]:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise CliError(ExitCode.DATA, f"cannot load '{path}' with torch.load(weights_only=True): {exc}") from exc
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0 or obj.shape[0] == 0:
            raise CliError(ExitCode.DATA, f"'{path}' holds a tensor of shape {tuple(obj.shape)}; expected "
                                          "(N, ...) with N >= 1 samples")
        return list(obj[:batches * batch_size].split(batch_size))
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in obj):
        return list(obj[:batches])
    raise CliError(ExitCode.DATA, f"'{path}' holds {type(obj).__name__}; expected a tensor (N, ...) of samples or a "
                                  "list of batch tensors")


def load_data(source: str, shape: Sequence[int], batches: int, batch_size: int, seed: int = 0) -> CalibrationData:
    """Calibration batches from ``source``: ``"random"``, a folder of images, or a ``.pt`` tensor file.

    Args:
        source: ``"random"`` (normal samples of ``shape``), a directory (images resized and center-cropped to
            ``shape[-1]``, ImageNet-normalized), or a file saved with ``torch.save`` (a tensor of samples,
            split into batches, or a list of batch tensors).
        shape: one sample's shape, without the batch dimension (random data and image size).
        batches: at most this many batches.
        batch_size: samples per batch (random data, images, and a tensor of samples).
        seed: seeds random data.

    Raises:
        CliError: (``ExitCode.DATA``) missing, empty or unreadable data.
    """
    if batches < 1 or batch_size < 1:
        raise CliError(ExitCode.USAGE, "--calib-batches and --batch-size must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    if source == "random":
        data = [torch.randn(batch_size, *shape, generator=gen) for _ in range(batches)]
        return CalibrationData(data, torch.randn(1, *shape, generator=gen), f"{batches} random batches of {batch_size}")
    path = Path(source)
    if path.is_dir():
        data = _image_folder(path, int(shape[-1]), batches, batch_size)
    elif path.is_file():
        data = _tensor_file(path, batches, batch_size)
    else:
        raise CliError(ExitCode.DATA, f"calibration data '{source}' not found (use 'random', a folder of images or a .pt file)")
    return CalibrationData(data, data[0][:1], f"{len(data)} batches from {source}")


# ----------------------------------------------------------------------------------------------- worst layers

@dataclasses.dataclass
class LayerError:
    """SQNR of one quantized node's output against the same node of the float (prepared) graph."""

    node: str
    op: str
    sqnr_db: float


def capture(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> dict[str, torch.Tensor]:
    """Every tensor a node of ``gm`` produces on ``inputs``, by node name (an fx.Interpreter run)."""
    outputs: dict[str, torch.Tensor] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                outputs[n.name] = out.detach()
            return out

    with torch.no_grad():
        _Recorder(gm).run(*inputs)
    return outputs


def worst_layers(reference: dict[str, torch.Tensor], quantized: fx.GraphModule, inputs: tuple[Any, ...],
                 k: int = 5) -> list[LayerError]:
    """The ``k`` quantized nodes whose outputs are furthest from the float graph's (lowest SQNR first).

    Args:
        reference: :func:`capture` of the calibrated prepared model (observers pass tensors through).
        quantized: the converted model; its nodes keep the prepared graph's names.
        inputs: the inputs ``reference`` was captured on.
        k: how many to return.

    Returns:
        Quantized-kernel nodes sorted by SQNR (dB), error propagated from the model input.
    """
    got = capture(quantized, inputs)
    rows = []
    for node in quantized.graph.nodes:
        rec: Optional[NodeRecord] = node.meta.get(RECORD_KEY)
        if rec is None or not rec.quantizable or node.name not in got or node.name not in reference:
            continue
        out, ref = got[node.name], reference[node.name]
        out = out.dequantize() if out.is_quantized else out
        if out.shape != ref.shape or not ref.is_floating_point():
            continue
        rows.append(LayerError(rec.module_name or node.name, rec.entry.name, float(fxquant.sqnr(ref, out.float()))))
    return sorted(rows, key=lambda r: r.sqnr_db)[:k]


# ---------------------------------------------------------------------------------------------- progress, run

class Stages:
    """A progress bar over the named stages of a command (stderr; off when not wanted)."""

    def __init__(self, names: list[str], enabled: bool) -> None:
        self.bar = tqdm(total=len(names), desc=names[0], file=sys.stderr, disable=not enabled, leave=False,
                        bar_format="{desc:<22} {bar:20} {n_fmt}/{total_fmt} [{elapsed}]")

    def step(self, name: str) -> None:
        """The previous stage is done; ``name`` starts."""
        self.bar.update(1)
        self.bar.set_description_str(name)

    def close(self) -> None:
        self.bar.close()


def _sample_shape(args: argparse.Namespace) -> tuple[int, ...]:
    if args.input_shape:
        try:
            shape = tuple(int(s) for s in args.input_shape.replace("x", ",").split(",") if s.strip())
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise CliError(ExitCode.USAGE, f"--input-shape '{args.input_shape}': expected positive integers like 3,32,32")
        return shape
    return (3, args.input_size, args.input_size)


def _check_runs(model: nn.Module, example: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported as a data problem
        raise CliError(ExitCode.DATA, f"the float model fails on an input of shape {tuple(example.shape)} "
                                      f"({type(exc).__name__}: {exc}); give --input-shape / --input-size or data "
                                      "the model accepts") from exc


def _mapping(args: argparse.Namespace) -> fxquant.QConfigMapping:
    if args.qconfig:
        obj = _load_factory_obj(args.qconfig)
        mapping = obj if isinstance(obj, fxquant.QConfigMapping) else None
        if mapping is None:
            raise CliError(ExitCode.QCONFIG, f"{args.qconfig}() returned {type(obj).__name__}, not a fxquant.QConfigMapping")
    else:
        mapping = fxquant.get_default_qconfig_mapping(args.backend)
    for name in args.skip:
        mapping.set_module_name(name, None)
    return mapping


def _load_factory_obj(spec: str) -> Any:
    """Call ``path/to/file.py:factory`` and return what it returns (for --qconfig)."""
    path_s, _, attr = spec.rpartition(":")
    if not path_s or not Path(path_s).is_file():
        raise CliError(ExitCode.QCONFIG, f"--qconfig '{spec}': expected path/to/file.py:factory of an existing file")
    mod_spec = importlib.util.spec_from_file_location(f"fxquant_qconfig_{Path(path_s).stem}", path_s)
    module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
    try:
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        return getattr(module, attr)()
    except Exception as exc:  # noqa: BLE001 - the user's code
        raise CliError(ExitCode.QCONFIG, f"--qconfig {spec}: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------- quantize

@dataclasses.dataclass
class QuantizeResult:
    """What ``fxquant quantize`` measured (printed as text, or as JSON with --json)."""

    model: str
    backend: str
    mode: str
    data: str
    prepare_s: float
    convert_s: float
    report: QuantReport
    worst: list[LayerError]
    output: str = ""

    def as_dict(self) -> dict[str, Any]:
        rep = self.report
        return {"model": self.model, "backend": self.backend, "mode": self.mode, "data": self.data,
                "prepare_s": self.prepare_s, "convert_s": self.convert_s, "size_fp32_bytes": rep.size_fp32,
                "size_int8_bytes": rep.size_int8, "latency_fp32_ms": rep.latency_fp32 * 1e3,
                "latency_int8_ms": rep.latency_int8 * 1e3, "threads": rep.threads, "sqnr_db": rep.sqnr_db,
                "worst_layers": [dataclasses.asdict(w) for w in self.worst],
                "float_ops": [dataclasses.asdict(f) for f in rep.float_ops], "output": self.output}

    def __str__(self) -> str:
        lines = [f"fxquant {self.model} ({self.mode}, {self.backend}): prepare {self.prepare_s:.2f} s, "
                 f"convert {self.convert_s:.2f} s, calibration: {self.data}", "", str(self.report)]
        if self.worst:
            lines.append("worst layers (output SQNR vs float in dB, error propagated from the input):")
            lines += [f"  {w.node} ({w.op}): {w.sqnr_db:.2f}" for w in self.worst]
        if self.output:
            lines.append(f"saved to {self.output}")
        return "\n".join(lines)


def _measure(model: nn.Module, quantized: nn.Module, x: torch.Tensor, runs: int, threads: int) -> QuantReport:
    """fxquant.report for GraphModules; the same figures (without float ops) for module-swapped models."""
    if isinstance(quantized, fx.GraphModule):
        return fxquant.report(model, quantized, (x,), runs=runs, threads=threads, verbose=False)
    with torch.no_grad():
        ref, out = model(x), quantized(x)
    if not (isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor)):
        raise CliError(ExitCode.ERROR, "the report needs a model whose output is one tensor when it is not traced")
    fp32, int8 = interleaved_latency([lambda: model(x), lambda: quantized(x)], runs, threads=threads)
    return QuantReport(state_dict_bytes(model), state_dict_bytes(quantized), fp32, int8,
                       float(fxquant.sqnr(ref, out)), [], threads)


def _quantize_static(model: nn.Module, data: CalibrationData, args: argparse.Namespace,
                     stages: Stages) -> tuple[nn.Module, float, float, list[LayerError]]:
    stages.step("prepare")
    start = time.perf_counter()
    prepared = fxquant.prepare_fx(model, _mapping(args), (data.example,), backend_config=args.backend,
                                  partial=not args.no_partial)
    prepare_s = time.perf_counter() - start
    if args.adaround and not isinstance(prepared, fx.GraphModule):
        raise CliError(ExitCode.USAGE, "--adaround needs a model torch.fx traces whole; this one was quantized in "
                                       "pieces (see the warning above): drop --adaround, or make the model traceable")
    stages.step("calibrate")
    fxquant.calibrate(prepared, data.batches, progress=stages.bar.disable is False)
    reference = capture(prepared, (data.example,)) if isinstance(prepared, fx.GraphModule) else None
    if args.adaround:  # after the float reference is captured: AdaRound writes rounded weights into `prepared`
        stages.step("adaround")
        fxquant.adaround(prepared, data.batches, args.adaround, progress=stages.bar.disable is False)
    stages.step("convert")
    start = time.perf_counter()
    quantized = fxquant.convert_fx(prepared)
    convert_s = time.perf_counter() - start
    stages.step("measure")
    worst = worst_layers(reference, quantized, (data.example,), args.worst) if reference is not None else []
    return quantized, prepare_s, convert_s, worst


def _quantize_dynamic(model: nn.Module, args: argparse.Namespace, stages: Stages) -> tuple[nn.Module, float]:
    stages.step("quantize (dynamic)")
    start = time.perf_counter()
    quantized = fxquant.quantize_dynamic(model, dtype=torch.qint8, backend_config=args.backend,
                                         use_fx=True if args.no_partial else None)
    return quantized, time.perf_counter() - start


def _save(quantized: nn.Module, path: str, fmt: str = "module") -> None:
    """``module``: torch.save of the module (load with ``torch.load(path, weights_only=False)``); ``data``:
    :func:`fxquant.save` (load with ``fxquant.load(path, float_model)``, ``weights_only``-safe: docs/export.md)."""
    try:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "data":
            from fxquant.save import save
            save(quantized, target)
        else:
            torch.save(quantized, target)
    except CliError:
        raise
    except Exception as exc:  # noqa: BLE001 - disk full, permissions, unpicklable modules
        raise CliError(ExitCode.OUTPUT, f"cannot save the quantized model to '{path}': {type(exc).__name__}: {exc}") from exc


def cmd_quantize(args: argparse.Namespace) -> int:
    """``fxquant quantize``: load, calibrate, convert, measure, print (and save)."""
    torch.manual_seed(args.seed)
    if args.adaround < 0 or (args.adaround and args.mode != "static"):
        raise CliError(ExitCode.USAGE, "--adaround STEPS needs STEPS >= 1 (0, the default, is off) and --mode static "
                                       "(it rounds the weights of a calibrated model)")
    steps = (["prepare", "calibrate", *(["adaround"] if args.adaround else []), "convert"] if args.mode == "static"
             else ["quantize (dynamic)"])
    stages = Stages(["load model", "calibration data", *steps, "measure"] + (["save"] if args.output else []),
                    _progress(args))
    try:
        model = load_model(args.model, args.input_size)
        stages.step("calibration data")
        data = load_data(args.data, _sample_shape(args), 1 if args.mode == "dynamic" else args.calib_batches,
                         args.batch_size, args.seed)
        _check_runs(model, data.example)
        if args.mode == "static":
            quantized, prepare_s, convert_s, worst = _quantize_static(model, data, args, stages)
        else:
            (quantized, prepare_s), convert_s, worst = _quantize_dynamic(model, args, stages), 0.0, []
            stages.step("measure")
        rep = _measure(model, quantized, data.example, args.runs, args.threads)
        if args.output:
            stages.step("save")
            _save(quantized, args.output, args.save_format)
    finally:
        stages.close()
    result = QuantizeResult(args.model, args.backend, args.mode, "none (dynamic)" if args.mode == "dynamic" else data.source,
                            prepare_s, convert_s, rep, worst, args.output or "")
    print(json.dumps(result.as_dict(), indent=2) if args.json else result)
    return ExitCode.OK


# ----------------------------------------------------------------------------------------------------- inspect

QSCHEMES = {"per_tensor_affine": "affine", "per_tensor_symmetric": "sym", "per_channel_affine": "ch-affine",
            "per_channel_symmetric": "ch-sym", "per_channel_affine_float_qparams": "ch-float-qparams"}


def _factory_text(f: Any) -> str:
    """``HistogramObserver.with_args(dtype=torch.quint8, qscheme=...)`` -> ``Histogram quint8 affine``."""
    if f is None:
        return "-"
    cls = getattr(f, "cls", f)
    kwargs = getattr(f, "kwargs", {})
    name = getattr(cls, "__name__", type(cls).__name__).replace("Observer", "") or "Observer"
    dtype = str(kwargs.get("dtype", "")).replace("torch.", "")
    qscheme = str(kwargs.get("qscheme", "")).replace("torch.", "")
    return " ".join(x for x in (name, dtype, QSCHEMES.get(qscheme, qscheme)) if x)


def _node_row(node: fx.Node, modules: dict[str, nn.Module], converted: bool) -> tuple[str, ...]:
    rec: Optional[NodeRecord] = node.meta.get(RECORD_KEY)
    if node.op == "call_module":
        target = f"{node.target}: {type(modules[str(node.target)]).__name__}"
    elif node.op in ("call_function", "call_method"):
        target = getattr(node.target, "__name__", str(node.target))
    else:
        target = str(node.target)
    if rec is None:
        return (node.name, node.op, target, "", "", "", "")
    if node.op == "call_module" and isinstance(modules[str(node.target)], fxquant.ObserverBase):
        state = "observer"
    elif rec.quantized_inputs or rec.quantized_output:
        state = "int8 " + ("in" if rec.quantized_inputs else "") + ("/" if rec.quantized_inputs and rec.quantized_output else "") + ("out" if rec.quantized_output else "")
    elif rec.quantizable:
        state = "dynamic" if rec.entry.is_dynamic else "quantize"
    else:
        state = "float" if rec.is_tensor and node.op.startswith("call") else ""
    qc = rec.qconfig
    qtext = ""
    if qc is not None and rec.entry is not None:
        qtext = _factory_text(qc.activation) + (f" / {_factory_text(qc.weight)}" if rec.entry.weight else "")
    fused = "+".join(getattr(t, "__name__", str(t)) for t in rec.fused_from)
    note = "; ".join(x for x in (f"fused {fused}" if fused else "", f"observed by {rec.observer}" if rec.observer and not converted else "",
                                 f"float: {rec.float_reason}" if rec.float_reason else "") if x)
    return (node.name, node.op, target, state, rec.entry.name if rec.entry else "", qtext, note)


def describe_graph(gm: fx.GraphModule) -> str:
    """One line per node: name, op, target, int8/float state, backend entry, qconfig and notes."""
    modules = dict(gm.named_modules())
    converted = any(isinstance(n.meta.get(RECORD_KEY), NodeRecord) and n.meta[RECORD_KEY].quantized_output
                    for n in gm.graph.nodes)
    rows = [("node", "op", "target", "state", "entry", "qconfig (activation / weight)", "notes")]
    rows += [_node_row(n, modules, converted) for n in gm.graph.nodes]
    widths = [min(max(len(r[i]) for r in rows), 48) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def cmd_inspect(args: argparse.Namespace) -> int:
    """``fxquant inspect``: print the prepared (or converted) graph with fxquant's per-node decisions."""
    model = load_model(args.model, args.input_size)
    data = load_data(args.data, _sample_shape(args), args.calib_batches, args.batch_size, args.seed)
    _check_runs(model, data.example)
    gm = fxquant.prepare_fx(model, _mapping(args), (data.example,), backend_config=args.backend,
                            partial=not args.no_partial)
    if not isinstance(gm, fx.GraphModule):
        raise CliError(ExitCode.TRACE, f"{args.model} is only partly traceable: fxquant prepared its traceable pieces "
                                       "separately; run 'fxquant quantize' for the report, or inspect a traceable submodule")
    if args.converted:
        fxquant.calibrate(gm, data.batches, progress=_progress(args))
        gm = fxquant.convert_fx(gm)
    stage = "converted" if args.converted else "prepared"
    print(f"# {args.model}, {stage} for {args.backend}: {len(gm.graph.nodes)} nodes")
    print(describe_graph(gm))
    if args.code:
        print("\n# generated code\n" + gm.code.strip())
    return ExitCode.OK


# ------------------------------------------------------------------------------------------------ parser, main

class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors raised as one-line :class:`CliError` (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(ExitCode.USAGE, f"{message} (see '{self.prog} --help')")


EPILOG = ("exit status: 0 ok, 1 other error, 2 usage, 3 model not found/importable, 4 trace, 5 qconfig, "
          "6 calibration/input data, 7 convert/engine, 8 cannot save, 130 interrupted. "
          "Errors: one line on stderr, 'fxquant: error (KIND): MESSAGE'; --debug shows the traceback.")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a torchvision model name (resnet18) or path/to/file.py:factory")
    p.add_argument("--backend", default="fbgemm", choices=BACKENDS, help="backend table and engine (default fbgemm)")
    p.add_argument("--data", "--calib-data", dest="data", default="random", metavar="SOURCE",
                   help="calibration data: 'random' (default), a folder of images, or a .pt file (tensor of samples "
                        "or list of batches)")
    p.add_argument("--calib-batches", type=int, default=8, metavar="N", help="calibration batches (default 8)")
    p.add_argument("--batch-size", type=int, default=4, metavar="B", help="samples per calibration batch (default 4)")
    p.add_argument("--input-size", type=int, default=224, metavar="S",
                   help="image side: inputs are (3, S, S), images are resized to S (default 224)")
    p.add_argument("--input-shape", default="", metavar="DIMS",
                   help="one sample's shape without the batch dimension, e.g. 3,32,32 or 64 (overrides --input-size)")
    p.add_argument("--qconfig", default="", metavar="FILE.py:FACTORY",
                   help="a function returning the fxquant.QConfigMapping to use (default: the backend's default)")
    p.add_argument("--skip", action="append", default=[], metavar="MODULE",
                   help="keep this module (qualified name) float; repeatable")
    p.add_argument("--no-partial", action="store_true",
                   help="fail (exit 4) when torch.fx cannot trace the whole model, instead of quantizing its "
                        "traceable pieces")
    p.add_argument("--seed", type=int, default=0, help="seeds random data and torchvision weights (default 0)")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The ``fxquant`` argument parser with its ``quantize``, ``inspect`` and ``bench`` commands."""
    from fxquant import bench

    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    ap = _Parser(prog="fxquant", description="FX graph-mode int8 quantization for PyTorch.", epilog=EPILOG)
    ap.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    ap.add_argument("--version", action="version", version=f"fxquant {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    q = sub.add_parser("quantize", parents=[common], epilog=EPILOG, help="quantize a model and print the report",
                       description="Quantize MODEL to int8, print size, latency fp32 vs int8, SQNR, the worst "
                                   "layers and the ops left float; optionally save the result.")
    _model_options(q)
    q.add_argument("--mode", choices=("static", "dynamic"), default="static",
                   help="static: int8 activations, calibrated (default); dynamic: int8 weights, activations "
                        "quantized at run time (Linear/LSTM/GRU), no calibration")
    q.add_argument("--adaround", type=int, default=0, metavar="STEPS",
                   help="after calibration, choose each weight's rounding with AdaRound, STEPS Adam steps per layer "
                        "on the calibration batches (static mode; docs/calibration.md); default: nearest rounding")
    q.add_argument("--output", "-o", default="", metavar="PATH", help="save the quantized model here")
    q.add_argument("--save-format", choices=("module", "data"), default="module",
                   help="module: torch.save of the GraphModule (default); data: fxquant.save, loaded with "
                        "fxquant.load(PATH, float_model) and safe with weights_only=True")
    q.add_argument("--runs", type=int, default=20, help="timed rounds for the latency medians (default 20)")
    q.add_argument("--threads", type=int, default=1, help="torch threads while timing (default 1)")
    q.add_argument("--worst", type=int, default=5, metavar="K", help="how many worst layers to list (default 5)")
    q.add_argument("--json", action="store_true", help="print the results as one JSON object instead of the table")
    q.set_defaults(func=cmd_quantize)
    i = sub.add_parser("inspect", parents=[common], epilog=EPILOG, help="print the graph with quantization annotations",
                       description="Print MODEL's prepared graph, one line per node: op, target, whether it will run "
                                   "in int8 or float and why, its backend-table entry, qconfig and observer.")
    _model_options(i)
    i.add_argument("--converted", action="store_true", help="calibrate and convert first, show the int8 graph")
    i.add_argument("--code", action="store_true", help="also print the GraphModule's generated Python code")
    i.set_defaults(func=cmd_inspect)
    b = sub.add_parser("bench", parents=[common], epilog=EPILOG, help="benchmark fxquant vs torch.ao vs fp32",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(b)
    b.set_defaults(func=bench.run)
    return ap


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("fxquant")
    except Exception:  # noqa: BLE001 - not installed
        return "unknown"


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else bool(args.progress)


def _fail(code: ExitCode, message: str) -> int:
    line = " ".join(str(message).split())
    print(f"fxquant: error ({code.name.lower()}): {line}", file=sys.stderr)
    return int(code)


ERROR_CODES: list[tuple[type, ExitCode]] = [
    (TraceError, ExitCode.TRACE), (QConfigError, ExitCode.QCONFIG), (CalibrationError, ExitCode.DATA),
    (ConvertError, ExitCode.CONVERT), (EngineError, ExitCode.CONVERT), (FxQuantError, ExitCode.ERROR),
]


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"fxquant: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``fxquant`` command; returns the exit status (see :class:`ExitCode`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return int(ExitCode.USAGE)
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    except CliError as exc:
        return _fail(exc.code, str(exc))
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        try:
            return int(args.func(args))
        except KeyboardInterrupt:
            return _fail(ExitCode.INTERRUPTED, "interrupted")
        except BrokenPipeError:  # stdout closed early (fxquant inspect ... | head): not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return int(ExitCode.OK)
        except Exception as exc:  # noqa: BLE001 - every error becomes one line and an exit status
            if debug:
                traceback.print_exc()
            if isinstance(exc, CliError):
                return _fail(exc.code, str(exc)) if not debug else int(exc.code)
            code = next((c for t, c in ERROR_CODES if isinstance(exc, t)), None)
            if code is None:
                return _fail(ExitCode.ERROR, f"{type(exc).__name__}: {exc}" + ("" if debug else " (rerun with --debug for "
                                                                                              "the traceback)"))
            return _fail(code, str(exc)) if not debug else int(code)


if __name__ == "__main__":
    sys.exit(main())
