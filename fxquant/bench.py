"""Benchmark suite: fxquant vs torch.ao vs fp32 (``fxquant bench``, ``python -m fxquant.bench``).

Per model and backend, in one process on the same inputs: prepare+convert seconds of torch.ao and fxquant
(timed on 1 thread, after both pipelines have been warmed on a tiny model; the median of ``--compile-runs``
interleaved rounds, each quantization starting after ``gc.collect()``; their ratio the median of the ratio within a
round), output SQNR of both int8 models vs
fp32 on a batch of 4, state_dict size vs fp32, and the median batch-1 latency of fp32, torch.ao int8 and fxquant
int8 in interleaved rounds, once per ``--threads`` setting (the ratios again the median over rounds of the ratio
within a round: the machine's speed drifts for seconds at a time, and the calls of one round run back to back).
``--onnxruntime`` adds two ONNX Runtime columns on
the fbgemm rows: fxquant's calibrated model exported by ``fxquant.export_onnx``, and ORT's own
``quantize_static`` (QDQ, per-channel, MinMax) on the exported fp32 model with the same calibration batches.
``--minilm`` adds dynamic quantization of the pretrained all-MiniLM-L6-v2 (the variants of
tests/bench_dynamic.py; needs a source checkout). The summary prints the project's targets with verdicts.

Suites: ``lean`` (default; resnet18, mobilenet_v2, shufflenet_v2_x1_0 on fbgemm, 1 thread: a minute or two) and
``zoo`` (every torchvision classification model, on fbgemm and qnnpack, 1 thread and all threads, MiniLM and
ONNX Runtime; hours on 2 cores). Options given explicitly override the suite's. Each model and backend runs in
its own process (``--no-isolate`` to run in this one), so a crash or a torch.ao failure is recorded as a cell
and the run goes on; models ``torch.fx.symbolic_trace`` cannot trace are listed and left out of the targets.
``--out FILE.jsonl`` appends every result as it comes and a rerun skips the cells already measured there (resume;
failed cells are measured again, a model torch.fx cannot trace is not).

Models are random-init torchvision models with batch-norm statistics re-estimated (fxquant.zoo): nothing is
downloaded. torch.ao.quantization is the reference; it is imported by tests/bench_torch_ao.py of a source
checkout, never by the library. Without it (``--no-ao``, an installed package without tests/, or a torch without
torch.ao) the torch.ao columns read "-".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

import fxquant
from fxquant.report import interleaved_rounds, paired_ratio, state_dict_bytes

__all__ = ["MODELS", "SUITES", "Case", "Latency", "Result", "Quantized", "measure", "measure_isolated", "measure_minilm",
           "ort_quantize_static", "quantize_fxquant", "quantize_torch_ao", "summary", "table", "markdown",
           "add_arguments", "run", "main"]

#: the lean suite: a residual net, a depthwise/inverted-residual net, and channel shuffles
MODELS = ("resnet18", "mobilenet_v2", "shufflenet_v2_x1_0")
#: model families whose patch embeddings fix the input at 224x224
FIXED_224 = ("vit", "swin", "maxvit")
#: per suite, the defaults of the options left unset on the command line ("*": every zoo model)
SUITES: dict[str, dict[str, Any]] = {
    "lean": {"models": ",".join(MODELS), "backends": "fbgemm", "threads": "1", "minilm": False,
             "onnxruntime": False, "out": ""},
    "zoo": {"models": "*", "backends": "fbgemm,qnnpack", "threads": "1,all", "minilm": True, "onnxruntime": True,
            "out": "fxquant-bench-zoo.jsonl"},
}
BEGIN, END = "<!-- fxquant bench: begin -->", "<!-- fxquant bench: end -->"


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark cell: a model, a backend and the measurement settings."""

    model: str
    backend: str = "fbgemm"
    image_size: int = 224
    calib_batches: int = 4
    runs: int = 20
    threads: tuple[int, ...] = (1,)
    onnxruntime: bool = False
    with_ao: bool = True
    compile_runs: int = 3

    def key(self) -> str:
        """The identity of the cell in a results file (a rerun with other settings measures again)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass
class Latency:
    """Median batch-1 milliseconds under ``threads`` torch (and ORT intra-op) threads, the ratios taken within
    rounds, and every round's milliseconds (``rounds_ms``: column name -> one time per round)."""

    threads: int
    fp32_ms: float
    fxq_ms: float
    ao_ms: Optional[float] = None
    ort_fxq_ms: Optional[float] = None   #: fxquant.export_onnx run by ONNX Runtime
    ort_qs_ms: Optional[float] = None    #: ONNX Runtime's quantize_static
    rounds_ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def ratio(self, a: str, b: str) -> Optional[float]:
        """Column ``a``'s time over column ``b``'s (``"fxq"``, ``"ao"``, ``"fp32"``, ``"ort_fxq"``, ``"ort_qs"``):
        the median over rounds of the ratio within a round (:func:`fxquant.report.paired_ratio`); the ratio of the
        medians for results files without rounds; ``None`` where either column was not measured."""
        if a in self.rounds_ms and b in self.rounds_ms:
            return paired_ratio(self.rounds_ms[a], self.rounds_ms[b])
        x, y = getattr(self, f"{a}_ms"), getattr(self, f"{b}_ms")
        return x / y if x and y else None

    def vs_ao(self) -> Optional[float]:
        """fxquant's int8 time over torch.ao's."""
        return self.ratio("fxq", "ao")

    def speedup(self) -> float:
        """fp32's time over fxquant's int8."""
        return self.ratio("fp32", "fxq")  # type: ignore[return-value]  # both are always measured


@dataclasses.dataclass
class Result:
    """Measurements of one cell. ``error`` set: the cell failed as a whole (crash, fxquant error, or not
    traceable when ``traceable`` is False); ``ao_error``/``ort_error``: only those columns failed."""

    case: Case
    error: str = ""
    traceable: bool = True
    fxq_compile_s: float = math.nan
    fxq_sqnr: float = math.nan
    fxq_size: float = math.nan
    ao_compile_s: Optional[float] = None
    fxq_compile_rounds: list[float] = dataclasses.field(default_factory=list)   #: seconds, one per round
    ao_compile_rounds: list[float] = dataclasses.field(default_factory=list)
    ao_sqnr: Optional[float] = None
    ao_size: Optional[float] = None
    ao_error: str = ""
    ort_fxq_sqnr: Optional[float] = None
    ort_qs_sqnr: Optional[float] = None
    ort_error: str = ""
    latency: list[Latency] = dataclasses.field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "Result":
        d = json.loads(text)
        d["case"] = Case(**{**d["case"], "threads": tuple(d["case"]["threads"])})
        d["latency"] = [Latency(**lat) for lat in d["latency"]]
        return Result(**d)

    def at(self, threads: int) -> Optional[Latency]:
        return next((lat for lat in self.latency if lat.threads == threads), None)

    def compile_vs_ao(self) -> Optional[float]:
        """fxquant's prepare+convert time over torch.ao's: the median over rounds of the ratio within a round (the
        ratio of the medians for results files without rounds)."""
        if self.ao_compile_rounds and len(self.ao_compile_rounds) == len(self.fxq_compile_rounds):
            return paired_ratio(self.fxq_compile_rounds, self.ao_compile_rounds)
        return self.fxq_compile_s / self.ao_compile_s if self.ao_compile_s else None


@dataclasses.dataclass
class Quantized:
    """One int8 model and what producing it cost (prepare + convert seconds, calibration excluded)."""

    module: nn.Module
    compile_s: float
    prepared: Optional[nn.Module] = None
    rounds_s: list[float] = dataclasses.field(default_factory=list)   #: every round's seconds (``compile_s``: median)


# ------------------------------------------------------------------------------------------ quantizers
def quantize_fxquant(model: nn.Module, backend: str, x: torch.Tensor, calib: list[torch.Tensor]) -> Quantized:
    """fxquant's default static PTQ of ``model`` for ``backend``; prepare and convert timed."""
    start = time.perf_counter()
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend), (x,), backend_config=backend)
    compile_s = time.perf_counter() - start
    fxquant.calibrate(prepared, calib, progress=False)
    start = time.perf_counter()
    quantized = fxquant.convert_fx(prepared)
    return Quantized(quantized, compile_s + time.perf_counter() - start, prepared)


def quantize_torch_ao(model: nn.Module, backend: str, x: torch.Tensor, calib: list[torch.Tensor]) -> Quantized:
    """torch.ao's default FX static PTQ, the reference: ``quantize_torch_ao`` of tests/bench_torch_ao.py in a source
    checkout (the library itself never imports the deprecated torch.ao)."""
    quantize = _torch_ao_quantizer()
    if quantize is None:
        raise RuntimeError("the torch.ao reference needs tests/bench_torch_ao.py of a source checkout and a torch "
                           "that still ships torch.ao.quantization")
    return quantize(model, backend, x, calib)


@functools.lru_cache(maxsize=None)
def _torch_ao_quantizer() -> Optional[Callable[..., Quantized]]:
    """tests/bench_torch_ao.py's quantizer, or ``None`` without a source checkout or without torch.ao."""
    try:
        path = _tests_dir("bench_torch_ao.py", "the torch.ao columns") / "bench_torch_ao.py"
    except FileNotFoundError:
        return None
    spec = importlib.util.spec_from_file_location("fxquant_bench_torch_ao", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except ImportError:  # a torch without torch.ao
        return None
    return module.quantize_torch_ao


def _ort_session(path: str, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda t: torch.from_numpy(session.run(None, {name: np.ascontiguousarray(t.numpy())})[0])


def ort_quantize_static(model: nn.Module, x: torch.Tensor, calib: list[torch.Tensor], workdir: str,
                        threads: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax) of the fp32
    model exported by ``torch.onnx.export``, calibrated on ``calib``; a callable on torch tensors."""
    import logging

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": b.numpy()} for b in calib])

        def get_next(self) -> Any:
            return next(self.batches, None)

    ort.set_default_logger_severity(3)  # no per-initializer warnings
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" notice
    fp32, int8 = os.path.join(workdir, "fp32.onnx"), os.path.join(workdir, "int8_qs.onnx")
    torch.onnx.export(model, (x,), fp32, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}},
                      dynamo=False, opset_version=17)
    quantize_static(fp32, int8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return _ort_session(int8, threads)


def _warm_up(backend: str, with_ao: bool) -> None:
    """Run both pipelines once on a tiny model, so that one-time costs (lazy imports, first kernel calls) are
    not charged to whichever quantizer is timed first."""
    tiny = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 16, 16)
    quantize_fxquant(tiny, backend, x, [x]).module(x)
    if with_ao:
        try:
            quantize_torch_ao(tiny, backend, x, [x]).module(x)
        except Exception:  # noqa: BLE001 - a torch.ao failure shows on the model itself, as a cell
            pass


# ------------------------------------------------------------------------------------------ measuring
def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _traceable(model: nn.Module) -> str:
    try:
        torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - recorded as a cell
        return _one_line(exc)
    return ""


def _add_ort(result: Result, model: nn.Module, fxq: Quantized, x: torch.Tensor, calib: list[torch.Tensor],
             workdir: str) -> dict[int, tuple[Callable, Callable]]:
    """ORT sessions per thread count for the fxquant export and for ORT's quantize_static; SQNRs filled in."""
    sessions: dict[int, tuple[Callable, Callable]] = {}
    try:
        path = os.path.join(workdir, "fxquant_int8.onnx")
        fxquant.export_onnx(fxq.prepared, (x,), path, dynamic_batch=True)
        ort_quantize_static(model, x, calib, workdir)
        for t in result.case.threads:
            sessions[t] = (_ort_session(path, t), _ort_session(os.path.join(workdir, "int8_qs.onnx"), t))
        with torch.no_grad():
            ref = model(calib[0])
        result.ort_fxq_sqnr = float(fxquant.sqnr(ref, sessions[result.case.threads[0]][0](calib[0])))
        result.ort_qs_sqnr = float(fxquant.sqnr(ref, sessions[result.case.threads[0]][1](calib[0])))
    except Exception as exc:  # noqa: BLE001 - only the ORT columns fail
        result.ort_error, sessions = _one_line(exc), {}
    return sessions


def _time_all(result: Result, fns: dict[str, Callable[[], Any]], ort: dict[int, tuple[Callable, Callable]],
              x: torch.Tensor) -> None:
    for t in result.case.threads:
        calls = dict(fns)
        if t in ort:
            calls["ort_fxq"], calls["ort_qs"] = (lambda f=ort[t][0]: f(x)), (lambda f=ort[t][1]: f(x))
        rounds = dict(zip(calls, ([s * 1e3 for s in times] for times in
                                  interleaved_rounds(list(calls.values()), runs=result.case.runs, threads=t))))
        ms = {k: statistics.median(v) for k, v in rounds.items()}
        result.latency.append(Latency(t, ms["fp32"], ms["fxq"], ms.get("ao"), ms.get("ort_fxq"), ms.get("ort_qs"),
                                      rounds_ms=rounds))


def _inputs(case: Case) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A cell's calibration batches (of 4) and its batch-1 input, seeded: the same for every library measured."""
    size = case.image_size
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, size, size, generator=gen) for _ in range(case.calib_batches)]
    return calib, torch.randn(1, 3, size, size, generator=gen)


def measure(case: Case) -> Result:
    """Build the model, quantize it with fxquant and torch.ao (and ONNX Runtime), and measure them side by side.
    A torch.ao or ORT failure fills ``ao_error``/``ort_error``; an fxquant failure raises."""
    from fxquant.zoo import torchvision_model

    case = _sized(case)
    size = case.image_size
    model = torchvision_model(case.model, image_size=size)
    result = Result(case)
    untraceable = _traceable(model)
    if untraceable:
        return Result(case, error=f"not traceable by torch.fx: {untraceable}", traceable=False)
    calib, x = _inputs(case)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # prepare+convert is timed on 1 thread, as the targets are stated
    try:
        _warm_up(case.backend, case.with_ao)
        ao, fxq, result.ao_error = _compile_rounds(model, case, x, calib)
    finally:
        torch.set_num_threads(old_threads)
    torch.backends.quantized.engine = case.backend
    fp32_size = state_dict_bytes(model)
    with torch.no_grad():
        ref = model(calib[0])
        result.fxq_sqnr = float(fxquant.sqnr(ref, fxq.module(calib[0])))
        if ao is not None:
            result.ao_sqnr = float(fxquant.sqnr(ref, ao.module(calib[0])))
    result.fxq_compile_s, result.fxq_size = fxq.compile_s, state_dict_bytes(fxq.module) / fp32_size
    result.fxq_compile_rounds = fxq.rounds_s
    if ao is not None:
        result.ao_compile_s, result.ao_size = ao.compile_s, state_dict_bytes(ao.module) / fp32_size
        result.ao_compile_rounds = ao.rounds_s
    fns: dict[str, Callable[[], Any]] = {"fp32": lambda: model(x), "fxq": lambda: fxq.module(x)}
    if ao is not None:
        fns["ao"] = lambda: ao.module(x)
    with tempfile.TemporaryDirectory() as workdir:
        ort = _add_ort(result, model, fxq, x, calib, workdir) if case.onnxruntime else {}
        _time_all(result, fns, ort, x)
    return result


def _compile_rounds(model: nn.Module, case: Case, x: torch.Tensor, calib: list[torch.Tensor],
                    on_round: Optional[Callable[[Optional[float], float], None]] = None,
                    ) -> tuple[Optional[Quantized], Quantized, str]:
    """torch.ao's and fxquant's quantization of ``model``, ``case.compile_runs`` times each, interleaved; each
    result's ``compile_s`` is the median over the rounds, its ``rounds_s`` every round's (the last round's models
    are returned). ``on_round``
    gets each round's seconds (torch.ao's, ``None`` when it did not run, and fxquant's).

    Every timed quantization starts after ``gc.collect()``: a full collection of the process's heap (hundreds
    of thousands of objects once torch and torchvision are imported) costs 0.1-0.3 s, and without it whichever
    quantizer happens to cross Python's allocation threshold pays for the garbage of everything run before it.
    """
    ao: Optional[Quantized] = None
    ao_error, ao_times, fxq_times = "", [], []
    fxq: Optional[Quantized] = None
    for _ in range(max(1, case.compile_runs)):
        ao = fxq = None  # the last round's models go first: two of a 600M-parameter model do not fit in 24 GiB
        if case.with_ao and not ao_error:
            gc.collect()
            try:
                ao = quantize_torch_ao(model, case.backend, x, calib)
                with torch.no_grad():
                    ao.module(calib[0])
                ao_times.append(ao.compile_s)
            except Exception as exc:  # noqa: BLE001 - torch.ao fails on some models: recorded, fxquant still runs
                ao, ao_error = None, _one_line(exc)
        gc.collect()
        fxq = quantize_fxquant(model, case.backend, x, calib)
        fxq_times.append(fxq.compile_s)
        if on_round is not None:
            on_round(ao.compile_s if ao is not None else None, fxq.compile_s)
    assert fxq is not None
    fxq.compile_s, fxq.rounds_s = statistics.median(fxq_times), fxq_times
    if ao is not None:
        ao.compile_s, ao.rounds_s = statistics.median(ao_times), ao_times
    return ao, fxq, ao_error


def _sized(case: Case) -> Case:
    return dataclasses.replace(case, image_size=224) if case.model.startswith(FIXED_224) else case


def measure_isolated(case: Case, timeout_s: float) -> Result:
    """:func:`measure` in a child process: a crash, a hang past ``timeout_s`` or an error becomes the cell."""
    cmd = [sys.executable, "-m", "fxquant.bench", "--one", case.key()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Result(case, error=f"timed out after {timeout_s:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return Result.from_json(lines[-1])
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return Result(case, error=" ".join(f"crashed ({how}): {tail}".split())[:300])


def _measure_here(case: Case) -> Result:
    try:
        return measure(case)
    except Exception as exc:  # noqa: BLE001 - the cell records the failure
        return Result(case, error=f"fxquant failed: {_one_line(exc)}")


# ------------------------------------------------------------------------------------------ MiniLM (dynamic)
def _tests_dir(needed: str = "bench_dynamic.py", what: str = "--minilm") -> Path:
    """The tests/ folder of the source checkout fxquant runs from, holding ``needed``."""
    tests = Path(fxquant.__file__).resolve().parent.parent / "tests"
    if not (tests / needed).exists():
        raise FileNotFoundError(f"{what} reuses tests/{needed} of a source checkout; {tests} has none (run from a "
                                "clone with pip install -e .)")
    return tests


def measure_minilm(threads: Sequence[int], runs: int, batch: int) -> list[dict[str, Any]]:
    """The variants of tests/bench_dynamic.py on all-MiniLM-L6-v2: latency of a batch of ``batch`` sentences per
    thread count (median wall ms of interleaved rounds), embedding cosine vs fp32 on all 80 sentences, and the
    encoder's state_dict size vs fp32."""
    import torch.nn.functional as F

    sys.path.insert(0, str(_tests_dir()))
    from bench_dynamic import interleaved, state_dict_mb, variants
    from minilm_data import SENTENCES, embed, load_minilm

    model, tokenizer = load_minilm()
    small = tokenizer(SENTENCES[:batch], padding=True, truncation=True, return_tensors="pt")
    full = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    models = variants(model)
    ref, enc0 = embed(model, full), state_dict_mb(model.encoder)
    rows = [{"variant": name, "ms": {}, "tokens": int(small["input_ids"].shape[1]), "batch": batch} for name in models]
    for t in threads:
        for row, (wall, _) in zip(rows, interleaved([lambda m=m: m(**small) for m in models.values()], runs, t)):
            row["ms"][str(t)] = wall
    for row, m in zip(rows, models.values()):
        cos = F.cosine_similarity(ref, embed(m, full), dim=1)
        row.update(cos_mean=float(cos.mean()), cos_min=float(cos.min()), encoder=state_dict_mb(m.encoder) / enc0)
    return rows


def _minilm_isolated(threads: Sequence[int], runs: int, batch: int, timeout_s: float) -> Any:
    cmd = [sys.executable, "-m", "fxquant.bench", "--one-minilm", json.dumps([list(threads), runs, batch])]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:.0f} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return " ".join((proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1].split())[:300]


# ------------------------------------------------------------------------------------------ tables
def _f(value: Optional[float], fmt: str, suffix: str = "") -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt) + suffix


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


LATENCY_HEADER = ("model", "backend", "threads", "fp32 ms", "ao int8 ms", "fxq int8 ms", "fxq/ao", "fxq vs fp32",
                  "ORT fxq-export ms", "ORT quantize_static ms")
COMPILE_HEADER = ("model", "backend", "input", "prep+conv s ao", "prep+conv s fxq", "fxq/ao compile", "SQNR ao dB",
                  "SQNR fxq dB", "SQNR ORT fxq-export dB", "SQNR ORT quantize_static dB", "size ao", "size fxq", "notes")


def _latency_rows(results: Sequence[Result]) -> list[tuple[str, ...]]:
    rows = []
    for r in results:
        for lat in r.latency:
            rows.append((r.case.model, r.case.backend, str(lat.threads), f"{lat.fp32_ms:.2f}", _f(lat.ao_ms, ".2f"),
                         f"{lat.fxq_ms:.2f}", _f(lat.vs_ao(), ".2f", "x"), f"{lat.speedup():.2f}x",
                         _f(lat.ort_fxq_ms, ".2f"), _f(lat.ort_qs_ms, ".2f")))
    return rows


def _compile_rows(results: Sequence[Result]) -> list[tuple[str, ...]]:
    rows = []
    for r in results:
        notes = "; ".join(s for s in (r.error, r.ao_error and f"torch.ao failed: {r.ao_error}",
                                      r.ort_error and f"ONNX Runtime failed: {r.ort_error}") if s)
        rows.append((r.case.model, r.case.backend, str(r.case.image_size), _f(r.ao_compile_s, ".2f"),
                     _f(r.fxq_compile_s, ".2f"), _f(r.compile_vs_ao(), ".2f", "x"),
                     _f(r.ao_sqnr, ".1f"), _f(r.fxq_sqnr, ".1f"), _f(r.ort_fxq_sqnr, ".1f"), _f(r.ort_qs_sqnr, ".1f"),
                     _f(r.ao_size, ".3f"), _f(r.fxq_size, ".3f"), notes.replace("|", "/")))
    return rows


def _render(header: Sequence[str], rows: list[tuple[str, ...]], md: bool) -> str:
    if md:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [tuple(header)] + rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 or i == len(header) - 1 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in [tuple(header)] + rows)


def table(results: Sequence[Result], markdown: bool = False) -> str:
    """Two tables: latency per model, backend and thread count; compile time, SQNR, size and failures."""
    return (_render(LATENCY_HEADER, _latency_rows(results), markdown) + "\n\n"
            + _render(COMPILE_HEADER, _compile_rows(results), markdown))


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _targets(results: Sequence[Result], zoo_note: str) -> list[str]:
    ok = [r for r in results if not r.error]
    ones = [(r, r.at(1)) for r in ok if r.case.backend == "fbgemm" and r.at(1) is not None]
    failed = [r.case.model for r in results if r.case.backend == "fbgemm" and r.error and r.traceable]
    with_ao = [(r, lat) for r, lat in ones if lat.ao_ms and r.ao_compile_s]
    if not ones:
        return ["targets: no fbgemm 1-thread results in this run"]
    lines = [f"targets (fbgemm, 1 thread; {zoo_note}):"]
    if with_ao:
        lat = _geomean([lat.vs_ao() for _, lat in with_ao])  # type: ignore[misc]
        # three places: a geomean of 0.904 is not met, and "0.90x" would not say why
        lines.append(f"  int8 latency fxquant/torch.ao geomean {lat:.3f}x over {len(with_ao)} models "
                     f"(target <= 0.9x): {_verdict(lat <= 0.9)}")
    slower = [r.case.model for r, lat in ones if lat.speedup() <= 1.0] + [f"{m} (failed)" for m in failed]
    lines.append(f"  int8 faster than fp32 on {len(ones) + len(failed) - len(slower)} of {len(ones) + len(failed)} models (target: every one): "
                 f"{_verdict(not slower)}" + (f"; slower or failed: {', '.join(slower)}" if slower else ""))
    if with_ao:
        comp = {r.case.model: r.compile_vs_ao() for r, _ in with_ao}
        over = [f"{m} {v:.3f}x" for m, v in comp.items() if v > 0.5] + [f"{m} (failed)" for m in failed]
        lines.append(f"  prepare+convert <= 0.5x torch.ao's on {len(comp) + len(failed) - len(over)} of "
                     f"{len(comp) + len(failed)} models (geomean "
                     f"{_geomean(list(comp.values())):.2f}x, worst {max(comp.values()):.2f}x): {_verdict(not over)}"
                     + (f"; over: {', '.join(over)}" if over else ""))
    missing_ao = [r.case.model for r, lat in ones if not lat.ao_ms]
    if missing_ao:
        lines.append(f"  without a torch.ao result (left out of the ratios): {', '.join(missing_ao)}")
    return lines


def _geomean_lines(ok: list[Result]) -> list[str]:
    lines = []
    keys = sorted({(r.case.backend, lat.threads) for r in ok for lat in r.latency})
    for backend, t in keys:
        lats = [lat for r in ok if r.case.backend == backend for lat in r.latency if lat.threads == t]
        parts = [f"fxq vs fp32 {_geomean([x.speedup() for x in lats]):.2f}x "
                 f"(slower than fp32 on {sum(x.speedup() <= 1.0 for x in lats)} of {len(lats)})"]
        for label, other in (("fxq/ao", "ao"), ("fxq/ORT fxq-export", "ort_fxq"), ("fxq/ORT quantize_static", "ort_qs")):
            ratios = [r for r in (x.ratio("fxq", other) for x in lats) if r]
            if ratios:
                parts.append(f"{label} {_geomean(ratios):.2f}x")
        lines.append(f"  {backend}, {t} thread(s), {len(lats)} models: " + ", ".join(parts))
    return lines


def summary(results: Sequence[Result], zoo_note: str = "the models of this run") -> str:
    """The targets with verdicts, geomeans per backend and thread count, and the failed cells."""
    ok = [r for r in results if not r.error]
    lines = _targets(results, zoo_note) + ["geomeans:"] + _geomean_lines(ok)
    untraceable = sorted({r.case.model for r in results if not r.traceable})
    failed = [f"{r.case.model}/{r.case.backend}" for r in results if r.error and r.traceable]
    ao_failed = [f"{r.case.model}/{r.case.backend}" for r in results if r.ao_error]
    lines.append(f"cells: {len(ok)} measured, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else "")
                 + f", torch.ao failed on {len(ao_failed)}" + (f" ({', '.join(ao_failed)})" if ao_failed else "")
                 + f", {len(untraceable)} models not traceable by torch.fx"
                 + (f" ({', '.join(untraceable)})" if untraceable else ""))
    return "\n".join(lines)


def _minilm_table(rows: Any, md: bool) -> str:
    if isinstance(rows, str):
        return f"MiniLM: failed: {rows}"
    threads = list(rows[0]["ms"])
    header = ("all-MiniLM-L6-v2 variant",) + tuple(f"{t} thr ms" for t in threads) + tuple(
        f"{t} thr vs fp32" for t in threads) + ("mean cos", "min cos", "encoder size")
    base = rows[0]["ms"]
    body = [(r["variant"],) + tuple(f"{r['ms'][t]:.1f}" for t in threads)
            + tuple(f"{base[t] / r['ms'][t]:.2f}x" for t in threads)
            + (f"{r['cos_mean']:.4f}", f"{r['cos_min']:.4f}", f"{r['encoder']:.3f}") for r in rows]
    note = (f"all-MiniLM-L6-v2, dynamic quantization: latency of a batch of {rows[0]['batch']} sentences padded to "
            f"{rows[0]['tokens']} tokens; cosine vs fp32 on all 80 sentences (tests/bench_dynamic.py's variants)")
    return note + "\n\n" + _render(header, body, md)


# ------------------------------------------------------------------------------------------ the command
def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``python -m fxquant.bench`` and ``fxquant bench``)."""
    ap.add_argument("--suite", choices=tuple(SUITES), default="lean",
                    help="lean: 3 models, fbgemm, 1 thread (default); zoo: every torchvision classification model "
                         "x fbgemm,qnnpack x 1,all threads + MiniLM + ONNX Runtime, results in "
                         "fxquant-bench-zoo.jsonl (hours)")
    ap.add_argument("--models", default=None, help="comma-separated torchvision names (default: the suite's)")
    ap.add_argument("--backends", default=None, help="comma-separated: fbgemm, x86, qnnpack (default: the suite's)")
    ap.add_argument("--threads", default=None, metavar="LIST",
                    help="comma-separated thread counts for the latencies, 'all' = torch's default "
                         f"({torch.get_num_threads()} here); default: the suite's")
    ap.add_argument("--runs", type=int, default=20, help="timed interleaved rounds per latency (default 20)")
    ap.add_argument("--compile-runs", type=int, default=3,
                    help="interleaved prepare+convert rounds per quantizer; the median is shown (default 3)")
    ap.add_argument("--calib-batches", type=int, default=4, help="calibration batches of 4 (default 4)")
    ap.add_argument("--input-size", type=int, default=224,
                    help="input height and width (default 224; vit/swin/maxvit always 224)")
    ap.add_argument("--minilm", action=argparse.BooleanOptionalAction, default=None,
                    help="add the MiniLM dynamic-quantization table (default: on in the zoo suite)")
    ap.add_argument("--minilm-batch", type=int, default=80, metavar="N", help="sentences per MiniLM batch (<= 80)")
    ap.add_argument("--onnxruntime", action=argparse.BooleanOptionalAction, default=None,
                    help="add the ONNX Runtime columns on the fbgemm rows (default: on in the zoo suite)")
    ap.add_argument("--no-ao", action="store_true", help="skip torch.ao (fxquant vs fp32 only)")
    ap.add_argument("--out", default=None, metavar="FILE.jsonl",
                    help="append results here and skip the cells already measured in it (resume; failed cells "
                         "are measured again); default: the suite's")
    ap.add_argument("--markdown", default="", metavar="PATH",
                    help=f"write the tables and verdicts to PATH (between {BEGIN} and {END} if PATH has them)")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                    help="each model and backend in its own process, so a crash is one cell (default: on)")
    ap.add_argument("--timeout", type=float, default=3600, metavar="S", help="seconds per cell (default 3600)")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--one-minilm", default="", help=argparse.SUPPRESS)


def _zoo_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _settings(args: argparse.Namespace) -> argparse.Namespace:
    """The options with the suite's defaults filled in and checked (bad ones: ``CliError``, exit 2 or 3)."""
    from fxquant.cli import CliError, ExitCode

    for name, value in SUITES[args.suite].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    zoo = _zoo_names()
    args.model_list = zoo if args.models == "*" else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.model_list if m not in zoo]
    if unknown:
        raise CliError(ExitCode.MODEL, f"not torchvision classification models: {', '.join(unknown)} (see "
                         "torchvision.models.list_models(module=torchvision.models))")
    args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in args.backend_list if b not in ("fbgemm", "x86", "qnnpack")]
    if bad or not args.backend_list:
        raise CliError(ExitCode.USAGE, f"--backends takes fbgemm, x86, qnnpack; got {args.backends!r}")
    try:
        counts = [torch.get_num_threads() if t.strip() == "all" else int(t) for t in args.threads.split(",")]
    except ValueError:
        raise CliError(ExitCode.USAGE, f"--threads takes a comma-separated list of counts or 'all'; got {args.threads!r}") from None
    if not counts or min(counts) < 1 or min(args.runs, args.calib_batches, args.compile_runs) < 1:
        raise CliError(ExitCode.USAGE, "--threads, --runs, --compile-runs and --calib-batches must be at least 1")
    if not 1 <= args.minilm_batch <= 80:
        raise CliError(ExitCode.USAGE, f"--minilm-batch takes 1 to 80 sentences; got {args.minilm_batch}")
    args.thread_list = tuple(dict.fromkeys(counts))
    args.with_ao = not args.no_ao and _ao_available()
    return args


def _ao_available() -> bool:
    return _torch_ao_quantizer() is not None


def _load(path: str) -> dict[str, Result]:
    done: dict[str, Result] = {}
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith('{"case"'):
                    r = Result.from_json(line)
                    done[r.case.key()] = r
    return done


def _cases(args: argparse.Namespace, model: str) -> list[Case]:
    ort_backend = "fbgemm" if "fbgemm" in args.backend_list else args.backend_list[0]
    return [Case(model, b, args.input_size, args.calib_batches, args.runs, args.thread_list,
                 bool(args.onnxruntime) and b == ort_backend, args.with_ao, args.compile_runs) for b in args.backend_list]


def _sweep(args: argparse.Namespace) -> list[Result]:
    done, results = _load(args.out), []
    for model in args.model_list:
        for case in _cases(args, model):
            case = _sized(case)
            r = done.get(case.key())
            if r is None or (r.error and r.traceable):  # a crash or timeout may not recur: measured again
                r = measure_isolated(case, args.timeout) if args.isolate else _measure_here(case)
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as f:
                        f.write(r.to_json() + "\n")
            results.append(r)
            print(" | ".join(_compile_rows([r])[0]) + "".join(f"\n    {' | '.join(row[2:])}"
                                                             for row in _latency_rows([r])), flush=True)
            if not r.traceable:
                break  # untraceable on one backend is untraceable on all
    return results


def _command(args: argparse.Namespace) -> str:
    """The command that reproduces this run, every setting spelled out."""
    parts = ["fxquant", "bench", "--suite", args.suite]
    if args.models != "*":
        parts += ["--models", ",".join(args.model_list)]
    parts += ["--backends", ",".join(args.backend_list), "--threads", args.threads, "--runs", str(args.runs),
              "--compile-runs", str(args.compile_runs),
              "--calib-batches", str(args.calib_batches), "--input-size", str(args.input_size),
              "--onnxruntime" if args.onnxruntime else "--no-onnxruntime"]
    parts += ["--minilm", "--minilm-batch", str(args.minilm_batch)] if args.minilm else ["--no-minilm"]
    parts += ["--no-ao"] if args.no_ao else []
    return shlex.join(parts)


def markdown(results: Sequence[Result], args: argparse.Namespace, minilm: Any = None) -> str:
    """The generated block of docs/benchmarks.md: command, settings, verdicts, tables."""
    zoo = len(args.model_list) == len(_zoo_names())
    note = "every zoo model" if zoo else f"{len(args.model_list)} of the {len(_zoo_names())} zoo models"
    parts = [BEGIN, "", f"Command: `{_command(args)}` (results kept in, and a rerun resumed from, `--out FILE.jsonl`)", "",
             f"Settings: batch-1 latency, median of {args.runs} interleaved rounds per thread count "
             f"({', '.join(map(str, args.thread_list))}), the fxq/ao and fxq vs fp32 ratios the median over rounds "
             "of the ratio within a round; prepare+convert timed on 1 thread, median of "
             f"{args.compile_runs} interleaved rounds each starting after gc.collect(), the fxq/ao compile ratio "
             "again the median of the ratio within a round; SQNR on a batch of 4; "
             f"{args.calib_batches} calibration batches of 4; input {args.input_size}x{args.input_size} "
             f"(vit/swin/maxvit 224); torch {torch.__version__}, {os.cpu_count()} CPUs; measured "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}.", "",
             "### Targets and geomeans", "", "```text", summary(results, note), "```", "",
             "### Latency", "", _render(LATENCY_HEADER, _latency_rows(results), md=True), "",
             "### Prepare+convert time, SQNR, size", "", _render(COMPILE_HEADER, _compile_rows(results), md=True)]
    if minilm is not None:
        parts += ["", "### MiniLM", "", _minilm_table(minilm, md=True)]
    return "\n".join(parts + ["", END])


def _write_markdown(path: str, block: str) -> None:
    old = Path(path).read_text(encoding="utf-8") if os.path.exists(path) else ""
    if BEGIN in old and END in old:
        text = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        text = "# Benchmarks\n\n" + block + "\n"
    Path(path).write_text(text, encoding="utf-8")


def _minilm(args: argparse.Namespace) -> Any:
    """The MiniLM rows: from ``--out`` when a run with the same settings stored them, else measured (and stored)."""
    key = [list(args.thread_list), args.runs, args.minilm_batch]
    if args.out and os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            stored = [json.loads(line)["minilm"] for line in f if line.startswith('{"minilm"')]
        rows = next((m["rows"] for m in stored if m["key"] == key), None)
        if rows is not None:
            return rows
    rows = (_minilm_isolated(args.thread_list, args.runs, args.minilm_batch, args.timeout) if args.isolate
            else measure_minilm(*key))
    if args.out and not isinstance(rows, str):
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"minilm": {"key": key, "rows": rows}}) + "\n")
    return rows


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed ``args``: one line per cell as it goes, then the tables and the verdicts."""
    warnings.simplefilter("ignore")
    if args.one:
        fields = json.loads(args.one)
        print(_measure_here(Case(**{**fields, "threads": tuple(fields["threads"])})).to_json())
        return 0
    if args.one_minilm:
        print(json.dumps(measure_minilm(*json.loads(args.one_minilm))))
        return 0
    args = _settings(args)
    results = _sweep(args)
    minilm = _minilm(args) if args.minilm else None
    note = "every zoo model" if len(args.model_list) == len(_zoo_names()) else "the models of this run"
    print(f"\n{table(results)}\n\n{summary(results, note)}")
    if minilm is not None:
        print("\n" + _minilm_table(minilm, md=False))
    print(f"(batch 1, median of {args.runs} interleaved rounds, input {args.input_size}; a shared machine: compare "
          "ratios within one run, not absolute times across runs)")
    if args.markdown:
        _write_markdown(args.markdown, markdown(results, args, minilm))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fxquant.bench [options]``."""
    ap = argparse.ArgumentParser(prog="python -m fxquant.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    from fxquant.cli import CliError

    try:
        return run(ap.parse_args(argv))
    except CliError as exc:
        print(f"python -m fxquant.bench: error: {exc}", file=sys.stderr)
        return int(exc.code)


if __name__ == "__main__":
    raise SystemExit(main())
