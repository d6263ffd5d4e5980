"""The ``fxquant`` command: every subcommand in-process through ``fxquant.cli.main``, the documented exit codes
and one-line error messages, the data sources, and a real subprocess call of the installed console script.

Models are tiny (a file factory in a temp dir; resnet18 at 32x32) so the module runs in a few seconds.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import fxquant
from fxquant.cli import ExitCode, main

MODELS_PY = textwrap.dedent('''
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = self.relu(self.bn(self.conv(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else self.fc(-x)

    def cnn():
        torch.manual_seed(0)
        return SmallCNN()

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def wide_mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))

    def branchy():
        return Branchy()

    def broken():
        raise RuntimeError("cannot build")

    def not_a_module():
        return 3
''')

QCONFIG_PY = textwrap.dedent('''
    import torch, fxquant
    from fxquant.observers import MinMaxObserver

    def full_weight_range():
        qc = fxquant.QConfig(MinMaxObserver.with_args(dtype=torch.quint8),
                             weight=MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric))
        return fxquant.QConfigMapping().set_global(qc)
''')


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "models.py").write_text(MODELS_PY)
    (root / "qconfigs.py").write_text(QCONFIG_PY)
    (root / "empty").mkdir()
    torch.save(torch.randn(10, 16), root / "samples.pt")
    torch.save({"not": "a tensor"}, root / "bad.pt")
    images = root / "images"
    images.mkdir()
    from torchvision.io import write_png
    gen = torch.Generator().manual_seed(0)
    for i in range(6):
        write_png(torch.randint(0, 256, (3, 20 + i, 24), dtype=torch.uint8, generator=gen), str(images / f"{i}.png"))
    return root


def run_json(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    assert main(argv + ["--json", "--runs", "2", "--no-progress"]) == ExitCode.OK
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"], ["inspect", "--help"], ["bench", "--help"]])
def test_help_everywhere(capsys: pytest.CaptureFixture, argv: list[str]) -> None:
    assert main(argv) == ExitCode.OK
    out = capsys.readouterr().out
    assert out.startswith("usage: fxquant") and "--help" in out
    if argv[0] != "bench":
        assert "exit status: 0 ok" in out


def test_quantize_torchvision_prints_the_report(capsys: pytest.CaptureFixture) -> None:
    argv = ["quantize", "resnet18", "--input-size", "32", "--calib-batches", "2", "--runs", "2", "--no-progress"]
    assert main(argv) == ExitCode.OK
    out = capsys.readouterr().out
    for part in ("state_dict size (MB)", "latency (1 thread, ms)", "output SQNR vs fp32 (dB)", "ops left in float: 0",
                 "worst layers", "prepare"):
        assert part in out, part


def test_quantize_json_figures_are_consistent(capsys: pytest.CaptureFixture, files: Path) -> None:
    res = run_json(capsys, ["quantize", f"{files}/models.py:mlp", "--input-shape", "16", "--worst", "10"])
    assert res["mode"] == "static" and res["data"] == "8 random batches of 4"
    assert res["sqnr_db"] > 25 and res["latency_int8_ms"] > 0 and res["float_ops"] == []
    worst = res["worst_layers"]
    assert [w["op"] for w in sorted(worst, key=lambda w: w["node"])] == ["linear_relu", "linear"]
    assert [w["sqnr_db"] for w in worst] == sorted(w["sqnr_db"] for w in worst)
    # the last layer's output is the model's output: its per-layer SQNR is the report's
    assert next(w for w in worst if w["node"] == "2")["sqnr_db"] == pytest.approx(res["sqnr_db"], abs=1e-3)


def test_quantize_with_adaround(capsys: pytest.CaptureFixture, files: Path, tmp_path: Path) -> None:
    """--adaround rounds some weights the other way (by one step at most) after calibration; the report still
    compares with the float model."""
    saved = {}
    for name, extra in (("plain", []), ("adaround", ["--adaround", "40"])):
        saved[name] = tmp_path / f"{name}.pt"
        res = run_json(capsys, ["quantize", f"{files}/models.py:mlp", "--input-shape", "16", "-o", str(saved[name])]
                       + extra)
        assert res["sqnr_db"] > 25 and res["float_ops"] == [] and len(res["worst_layers"]) == 2
    plain, rounded = (torch.load(saved[n], weights_only=False).get_submodule("0").weight.int_repr().int()
                      for n in ("plain", "adaround"))
    assert 0 < int((plain != rounded).sum()) and int((plain - rounded).abs().max()) == 1


def test_adaround_on_a_model_quantized_in_pieces_is_a_usage_error(capsys: pytest.CaptureFixture, files: Path) -> None:
    """After the partial-tracing warning, one error line that says what to do."""
    code, err = _error(capsys, ["quantize", f"{files}/models.py:branchy", "--input-shape", "16", "--adaround", "5"])
    assert code == ExitCode.USAGE and err.splitlines()[-1].startswith("fxquant: error (usage): --adaround needs")
    assert "drop --adaround" in err.splitlines()[-1]


def test_skip_keeps_a_module_float(capsys: pytest.CaptureFixture, files: Path) -> None:
    res = run_json(capsys, ["quantize", f"{files}/models.py:mlp", "--input-shape", "16", "--skip", "2"])
    assert [f["node"] for f in res["float_ops"]] == ["_2"]
    assert "qconfig is None" in res["float_ops"][0]["reason"]


def test_data_from_tensor_file_and_image_folder(capsys: pytest.CaptureFixture, files: Path) -> None:
    res = run_json(capsys, ["quantize", f"{files}/models.py:mlp", "--data", str(files / "samples.pt"),
                            "--batch-size", "4", "--input-shape", "99"])   # the data's shape wins
    assert res["data"] == f"3 batches from {files / 'samples.pt'}"
    res = run_json(capsys, ["quantize", f"{files}/models.py:cnn", "--data", str(files / "images"), "--input-size", "16",
                            "--batch-size", "4", "--calib-batches", "8"])
    assert res["data"] == f"2 batches from {files / 'images'}" and res["sqnr_db"] > 20


def test_dynamic_mode_shrinks_linears(capsys: pytest.CaptureFixture, files: Path) -> None:
    res = run_json(capsys, ["quantize", f"{files}/models.py:wide_mlp", "--input-shape", "256", "--mode", "dynamic"])
    assert res["mode"] == "dynamic" and res["data"] == "none (dynamic)"
    assert res["size_int8_bytes"] < 0.35 * res["size_fp32_bytes"] and res["sqnr_db"] > 30


def test_output_is_loadable_and_matches(capsys: pytest.CaptureFixture, files: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "q.pt"
    res = run_json(capsys, ["quantize", f"{files}/models.py:cnn", "--input-size", "12", "--output", str(out)])
    assert res["output"] == str(out)
    loaded = torch.load(out, weights_only=False)
    model = fxquant.cli.load_model(f"{files}/models.py:cnn")
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        assert fxquant.sqnr(model(x), loaded(x)) > 20


def test_output_as_data_loads_with_fxquant_load(capsys: pytest.CaptureFixture, files: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.fxq"
    spec = f"{files}/models.py:cnn"
    run_json(capsys, ["quantize", spec, "--input-size", "12", "--output", str(out), "--save-format", "data"])
    from fxquant.save import load
    model = fxquant.cli.load_model(spec)
    loaded = load(out, model)
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        assert fxquant.sqnr(model(x), loaded(x)) > 20


def test_inspect_annotates_every_node(capsys: pytest.CaptureFixture, files: Path) -> None:
    spec = f"{files}/models.py:cnn"
    assert main(["inspect", spec, "--input-size", "12", "--skip", "fc"]) == ExitCode.OK
    out = capsys.readouterr().out
    mapping = fxquant.get_default_qconfig_mapping("fbgemm").set_module_name("fc", None)
    prepared = fxquant.prepare_fx(fxquant.cli.load_model(spec), mapping, (torch.randn(1, 3, 12, 12),),
                                  backend_config="fbgemm")
    lines = {line.split()[0]: re.split(r"\s{2,}", line) for line in out.splitlines()[2:]}
    assert set(lines) == {n.name for n in prepared.graph.nodes}
    assert lines["conv"][2:6] == ["conv: ConvReLU2d", "quantize", "conv2d_relu",
                                  "Histogram quint8 affine / PerChannelMinMax qint8 ch-sym"]
    assert lines["conv"][6] == "fused Conv2d+BatchNorm2d+ReLU; observed by conv_observer"
    assert lines["conv_observer"][3] == "observer" and lines["fc"][3] == "float"
    assert main(["inspect", spec, "--input-size", "12", "--converted", "--code", "--no-progress"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "int8 in/out" in out and "def forward" in out and "_observer" not in out


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv, code, words", [
    (["quantize"], ExitCode.USAGE, "the following arguments are required: MODEL"),
    (["quantize", "resnet18", "--backend", "tpu"], ExitCode.USAGE, "invalid choice: 'tpu'"),
    (["quantize", "{m}:mlp", "--calib-batches", "0"], ExitCode.USAGE, "must be >= 1"),
    (["quantize", "{m}:mlp", "--mode", "dynamic", "--adaround", "5"], ExitCode.USAGE, "--adaround STEPS needs"),
    (["quantize", "{m}:mlp", "--input-shape", "a,b"], ExitCode.USAGE, "--input-shape 'a,b'"),
    (["quantize", "resnet1"], ExitCode.MODEL, "did you mean resnet18"),
    (["quantize", "{m}:nope"], ExitCode.MODEL, "has no callable 'nope'"),
    (["quantize", "{d}/missing.py:f"], ExitCode.MODEL, "not found"),
    (["quantize", "{m}:broken"], ExitCode.MODEL, "RuntimeError: cannot build"),
    (["inspect", "{m}:not_a_module"], ExitCode.MODEL, "returned int, not a torch.nn.Module"),
    (["quantize", "{m}:branchy", "--input-shape", "16", "--no-partial"], ExitCode.TRACE, "could not trace"),
    (["quantize", "{m}:mlp", "--input-shape", "16", "--backend", "qnnpack", "--qconfig", "{d}/qconfigs.py:full_weight_range"],
     ExitCode.QCONFIG, "weights must stay in [-127, 127]"),
    (["quantize", "{m}:mlp"], ExitCode.DATA, "the float model fails on an input of shape (1, 3, 224, 224)"),
    (["quantize", "{m}:mlp", "--data", "{d}/nothing"], ExitCode.DATA, "not found"),
    (["quantize", "{m}:cnn", "--data", "{d}/empty"], ExitCode.DATA, "no images"),
    (["quantize", "{m}:mlp", "--data", "{d}/bad.pt"], ExitCode.DATA, "holds dict"),
    (["quantize", "{m}:mlp", "--input-shape", "16", "--output", "{d}"], ExitCode.OUTPUT, "cannot save"),
])
def test_errors_are_one_line_with_their_exit_code(capsys: pytest.CaptureFixture, files: Path, argv: list[str],
                                                  code: ExitCode, words: str) -> None:
    argv = [a.format(m=files / "models.py", d=files) for a in argv] + ["--runs", "1"] * (argv[0] == "quantize" and len(argv) > 2)
    got, err = _error(capsys, argv)
    assert got == code, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"fxquant: error ({code.name.lower()}): ") and words in err


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture, files: Path) -> None:
    assert main(["quantize", f"{files}/models.py:broken", "--debug"]) == ExitCode.MODEL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "cannot build" in err


BENCH = ["bench", "--models", "resnet18", "--input-size", "32", "--runs", "2", "--calib-batches", "1",
         "--compile-runs", "2"]


def test_bench_prints_the_tables_and_verdicts_writes_the_page_and_resumes(capsys: pytest.CaptureFixture,
                                                                         tmp_path: Path) -> None:
    page, out = tmp_path / "bench.md", tmp_path / "results.jsonl"
    page.write_text("# Page\n\nbefore\n<!-- fxquant bench: begin -->\nold\n<!-- fxquant bench: end -->\nafter\n")
    argv = BENCH + ["--threads", "1,2", "--out", str(out), "--markdown", str(page), "--no-isolate"]
    assert main(argv) == ExitCode.OK
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.startswith("resnet18  fbgemm")]
    assert [r[2] for r in rows[:2]] == ["1", "2"] and all("-" not in r[3:8] for r in rows[:2])   # fp32, ao, fxq
    assert "-" not in rows[2][3:8]   # compile times, ratio, SQNRs of the compile/SQNR/size table
    for line in ("int8 latency fxquant/torch.ao geomean", "int8 faster than fp32 on", "prepare+convert <= 0.5x",
                 "fbgemm, 2 thread(s), 1 models", "cells: 1 measured, 0 failed"):
        assert line in text
    md = page.read_text()
    assert md.startswith("# Page\n\nbefore\n") and md.endswith("after\n") and "old" not in md
    assert "Command: `fxquant bench --suite lean --models resnet18" in md and "| resnet18 | fbgemm | 2 |" in md
    assert "--compile-runs 2" in md and "median of 2 interleaved rounds each starting after gc.collect()" in md
    assert len(out.read_text().splitlines()) == 1
    assert main(argv) == ExitCode.OK   # resumed from the results file: nothing measured again
    assert len(out.read_text().splitlines()) == 1 and "| resnet18 | fbgemm | 1 |" in page.read_text()


def test_bench_ratios_are_taken_within_rounds_and_the_rounds_are_kept(capsys: pytest.CaptureFixture,
                                                                        tmp_path: Path) -> None:
    from fxquant import bench
    from fxquant.report import paired_ratio

    out = tmp_path / "results.jsonl"
    assert main(BENCH + ["--no-isolate", "--out", str(out)]) == ExitCode.OK
    result = bench.Result.from_json(out.read_text())
    lat = result.latency[0]
    assert {k: len(v) for k, v in lat.rounds_ms.items()} == {"fp32": 2, "fxq": 2, "ao": 2}
    assert len(result.fxq_compile_rounds) == len(result.ao_compile_rounds) == 2
    assert result.compile_vs_ao() == paired_ratio(result.fxq_compile_rounds, result.ao_compile_rounds)
    assert lat.vs_ao() == paired_ratio(lat.rounds_ms["fxq"], lat.rounds_ms["ao"])
    assert lat.speedup() == paired_ratio(lat.rounds_ms["fp32"], lat.rounds_ms["fxq"])
    row = next(r for r in map(str.split, capsys.readouterr().out.splitlines()) if r[:3] == ["resnet18", "fbgemm", "1"])
    assert row[6] == f"{lat.vs_ao():.2f}x" and row[7] == f"{lat.speedup():.2f}x"


def test_paired_ratio_follows_a_machine_that_slows_down_for_a_while() -> None:
    from fxquant import bench
    from fxquant.report import paired_ratio

    # fxquant takes 0.8x torch.ao's time; the machine runs 3x slower from the middle of round 3 on, after
    # fxquant's call of that round: the medians' ratio (8 / 30) says 0.27x, the rounds say 0.8x
    fxq, ao = [8.0, 8.0, 8.0, 24.0, 24.0], [10.0, 10.0, 30.0, 30.0, 30.0]
    assert paired_ratio(fxq, ao) == pytest.approx(0.8)
    lat = bench.Latency(1, 40.0, 8.0, 30.0, rounds_ms={"fxq": fxq, "ao": ao})
    assert lat.vs_ao() == pytest.approx(0.8) and lat.speedup() == 5.0   # no fp32 rounds: the medians' ratio
    assert bench.Latency(1, 20.0, 8.0, 10.0).vs_ao() == 0.8   # a results file from before the paired ratios
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio([1.0], [1.0, 2.0])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_interleaved_rounds_vary_who_runs_first_and_after_whom(n: int) -> None:
    import collections

    from fxquant.report import interleaved_rounds, round_order

    calls: list[int] = []
    fns = [lambda i=i: calls.append(i) for i in range(n)]
    times = interleaved_rounds(fns, runs=2 * n, warmup=0)
    assert [len(t) for t in times] == [2 * n] * n
    orders = [calls[r * n:(r + 1) * n] for r in range(2 * n)]
    assert orders == [round_order(n, r) for r in range(2 * n)]   # the calls follow round_order
    assert all(sorted(o) == list(range(n)) for o in orders)       # each round calls each function once
    positions = collections.Counter((i, pos) for o in orders for pos, i in enumerate(o))
    assert set(positions.values()) == {2} and len(positions) == n * n   # every function in every place, twice
    after = collections.Counter(pair for o in orders for pair in zip(o, o[1:]))
    if n <= 3:   # no function always runs right after the same one (the fp32 model, in fxquant bench)
        assert len(after) == n * (n - 1) and len(set(after.values())) <= 1
    else:
        assert all(len({a for (a, b) in after if b == i}) >= 2 for i in range(n))


def test_bench_records_a_torch_ao_failure_as_a_cell(capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from fxquant import bench

    def broken(*args: object) -> None:
        raise RuntimeError("torch.ao cannot")

    monkeypatch.setattr(bench, "quantize_torch_ao", broken)
    assert main(BENCH + ["--no-isolate"]) == ExitCode.OK
    text = capsys.readouterr().out
    assert "torch.ao failed: RuntimeError: torch.ao cannot" in text and "torch.ao failed on 1 (resnet18/fbgemm)" in text
    row = next(r for r in map(str.split, text.splitlines()) if r[:3] == ["resnet18", "fbgemm", "1"])
    assert row[4] == "-" and float(row[5]) > 0   # no torch.ao latency, fxquant's measured


def test_bench_records_a_failed_child_as_a_cell_and_goes_on(capsys: pytest.CaptureFixture) -> None:
    assert main(BENCH + ["--backends", "fbgemm,qnnpack", "--timeout", "0.5"]) == ExitCode.OK
    text = capsys.readouterr().out
    assert text.count("timed out after 0 s") >= 2 and "2 failed (resnet18/fbgemm, resnet18/qnnpack)" in text


def test_bench_resume_measures_failed_cells_again(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    assert main(BENCH + ["--timeout", "0.5", "--out", str(out)]) == ExitCode.OK   # the child times out: a failed cell
    assert "timed out" in capsys.readouterr().out
    assert main(BENCH + ["--no-isolate", "--out", str(out)]) == ExitCode.OK       # measured again, and now it works
    text = capsys.readouterr().out
    assert "cells: 1 measured, 0 failed" in text and len(out.read_text().splitlines()) == 2


@pytest.mark.parametrize("extra, code, words", [(["--models", "resnet1"], ExitCode.MODEL, "resnet1"),
                                                (["--backends", "tpu"], ExitCode.USAGE, "--backends"),
                                                (["--threads", "one"], ExitCode.USAGE, "--threads"),
                                                (["--compile-runs", "0"], ExitCode.USAGE, "--compile-runs")])
def test_bench_bad_options(capsys: pytest.CaptureFixture, extra: list[str], code: ExitCode, words: str) -> None:
    assert main(["bench"] + extra) == code
    err = capsys.readouterr().err
    assert err.startswith(f"fxquant: error ({code.name.lower()}):") and words in err


def test_console_script_in_a_subprocess(files: Path) -> None:
    exe = shutil.which("fxquant")
    cmd = [exe] if exe else [sys.executable, "-m", "fxquant"]
    ok = subprocess.run(cmd + ["quantize", f"{files}/models.py:mlp", "--input-shape", "16", "--runs", "2", "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["sqnr_db"] > 25
    assert ok.stderr == ""   # stderr is not a terminal: no progress bars, no warnings
    bad = subprocess.run(cmd + ["quantize", "no_such_model_xyz"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == ExitCode.MODEL and bad.stdout == ""
    assert bad.stderr.startswith("fxquant: error (model): 'no_such_model_xyz'") and bad.stderr.count("\n") == 1


def test_bench_compile_time_is_the_median_of_interleaved_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxquant import bench

    calls: list[str] = []
    times = {"ao": iter([3.0, 1.0, 2.0]), "fxq": iter([0.5, 0.9, 0.1])}

    def fake(kind: str):
        def quantize(*args: object) -> bench.Quantized:
            calls.append(kind)
            return bench.Quantized(nn.Identity(), next(times[kind]))
        return quantize

    monkeypatch.setattr(bench, "quantize_torch_ao", fake("ao"))
    monkeypatch.setattr(bench, "quantize_fxquant", fake("fxq"))
    x = torch.randn(1, 3)
    seen: list[tuple] = []
    ao, fxq, error = bench._compile_rounds(nn.Identity(), bench.Case("m", compile_runs=3), x, [x],
                                           on_round=lambda a, f: seen.append((a, f)))
    assert calls == ["ao", "fxq"] * 3 and error == ""
    assert (ao.compile_s, fxq.compile_s) == (2.0, 0.5)
    assert (ao.rounds_s, fxq.rounds_s) == ([3.0, 1.0, 2.0], [0.5, 0.9, 0.1])
    assert seen == [(3.0, 0.5), (1.0, 0.9), (2.0, 0.1)]
    # the ratio of the rounds' ratios (0.17, 0.9, 0.05): 0.17x; the ratio of the medians would say 0.25x
    result = bench.Result(bench.Case("m"), fxq_compile_s=fxq.compile_s, ao_compile_s=ao.compile_s,
                          fxq_compile_rounds=fxq.rounds_s, ao_compile_rounds=ao.rounds_s)
    assert result.compile_vs_ao() == pytest.approx(0.5 / 3.0)
    assert bench.Result(bench.Case("m"), fxq_compile_s=0.5, ao_compile_s=2.0).compile_vs_ao() == 0.25   # older files


def _run_script(name: str, call):
    """``call`` on the module of tests/``name``.py (a benchmark script, not a package module), with torch's thread
    count restored afterwards (the scripts time on 1 thread)."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.pop(0)
    old = torch.get_num_threads()
    try:
        return call(module)
    finally:
        torch.set_num_threads(old)


def test_bench_compile_script_prints_each_round_and_the_median(capsys: pytest.CaptureFixture) -> None:
    """tests/bench_compile.py: the bench's compile rounds alone, on a real model, each round printed."""
    out = _run_script("bench_compile", lambda m: m.rounds("resnet18", "fbgemm", 2, 1, 32))
    assert len(out["fxq"]) == 2 and all(s > 0 for s in out["fxq"])
    from fxquant import bench
    assert len(out["ao"]) == (2 if bench._ao_available() and not out["ao_error"] else 0)
    err = capsys.readouterr().err
    assert "resnet18 round 1: torch.ao" in err and "resnet18 round 2:" in err


def test_bench_kernels_script_compares_the_same_integers(capsys: pytest.CaptureFixture) -> None:
    """tests/bench_kernels.py: fbgemm's and oneDNN's int8 convs get the same 7-bit activations and weights and give
    the same output integers (within one step), so the table compares the kernels, not two computations."""
    if not hasattr(torch.ops.onednn, "qconv_pointwise"):
        pytest.skip("this torch build has no oneDNN int8 conv")
    script = _run_script("bench_kernels", lambda m: m)
    gen = torch.Generator().manual_seed(0)
    for shape in script.SHAPES:
        fbgemm, onednn = script._conv_pair(*shape, gen)
        a, b = fbgemm(), onednn()
        assert a.shape == b.shape and b.dtype == torch.uint8
        assert int((a.int_repr().int() - b.int()).abs().max()) <= 1, shape
    assert _run_script("bench_kernels", lambda m: m.main(["--runs", "1"])) == 0   # restores the thread count
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| ") and "x |" in r]
    assert len(rows) == len(script.SHAPES) and "geomean oneDNN/fbgemm" in out


def test_bench_kernels_binary_table(capsys: pytest.CaptureFixture) -> None:
    """tests/bench_kernels.py --binary: every cell of the squeeze-excite grid gets a row and no star (the kernel
    stays there); ConvNeXt's layer scale rows carry the star of the float form."""
    script = _run_script("bench_kernels", lambda m: m)
    assert _run_script("bench_kernels", lambda m: m.main(["--binary", "--runs", "1"])) == 0
    out = capsys.readouterr().out
    grid = [r for r in out.splitlines() if r.startswith("| ") and r.split("|")[1].strip().isdigit()]
    cell = re.compile(r"^\d+ / \d+ \(\d+\.\d\dx\)$")
    assert len(grid) == len(script.GATE_CHANNELS)
    cells = [r.split("|")[2:-1] for r in grid]   # both forms timed in every cell, and no star: gates keep the kernel
    assert all(len(c) == len(script.GATE_SIDES) and all(cell.match(x.strip()) for x in c) for c in cells)
    scales = [r for r in out.splitlines() if r.startswith("| layer scale")]
    assert len(scales) == 4 and all(r.rstrip(" |").endswith("*") for r in scales) and "ViT" in out


def test_bench_kernels_dispatch_table(capsys: pytest.CaptureFixture) -> None:
    """tests/bench_kernels.py --dispatch: torch.ao's call and fxquant's give the same integers on every row, and
    every row is timed."""
    script = _run_script("bench_kernels", lambda m: m)
    torch.backends.quantized.engine = "fbgemm"
    pairs = script.dispatch_pairs(torch.Generator().manual_seed(0))
    assert len(pairs) == len(script.DISPATCH_CONVS) + len(script.DISPATCH_LINEARS)
    for label, ao_call, fxq_call in pairs:
        assert torch.equal(ao_call().int_repr(), fxq_call().int_repr()), label
    assert _run_script("bench_kernels", lambda m: m.main(["--dispatch", "--runs", "1"])) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if re.match(r"^\| (conv|linear) .* \| \d+\.\d\dx \|$", r)]
    assert [r.split(" | ")[0][2:] for r in rows] == [label for label, _, _ in pairs]


def test_bench_ops_script_lists_the_ops_where_the_two_int8_models_differ() -> None:
    """tests/bench_ops.py on efficientnet_b0: fxquant runs its SiLUs int8 (sigmoid and mul on quantized tensors),
    torch.ao in float between a dequantize and a quantize; the table has both sides of that, with call counts."""
    from fxquant import bench

    if not bench._ao_available():
        pytest.skip("torch.ao reference not available")
    lines = _run_script("bench_ops", lambda m: m.compare("efficientnet_b0", "fbgemm", 32, runs=2, profiles=1, top=40))
    assert lines[0] == "## efficientnet_b0 (fbgemm, input 32, 1 thread)" and "fxq/ao" in lines[2]
    rows = {r.split("|")[1].strip(" `"): [c.strip() for c in r.split("|")[2:6]] for r in lines if r.startswith("| `")}
    from fxquant.zoo import torchvision_model

    silus = sum(isinstance(m, nn.SiLU) for m in torchvision_model("efficientnet_b0", image_size=32).modules())
    assert float(rows["aten::silu_"][0]) == 0.0 and int(rows["aten::silu_"][3]) == silus   # torch.ao: float SiLU
    assert int(rows["aten::sigmoid"][1]) > int(rows["aten::sigmoid"][3])                   # fxquant: int8 sigmoid


def test_bench_attention_script_builds_the_quantized_matmul_form_of_the_same_attention() -> None:
    """tests/bench_attention.py's other form computes what the library's float-leaf form does (in float), and
    converts with its matmuls and softmax quantized where the library's leaves one float attention leaf."""
    from fxquant.decomposed import DecomposedMultiheadAttention
    from fxquant.report import float_ops

    script = _run_script("bench_attention", lambda m: m)
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 8)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.attn = nn.Linear(8, 16), mha

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            h = self.embed(t)
            return self.attn(h, h, h, need_weights=False)[0]

    net = Net().eval()
    dec = DecomposedMultiheadAttention.from_float(mha)
    h = net.embed(x)
    torch.testing.assert_close(script._matmul_softmax_forward(dec, h, h, h, need_weights=False)[0],
                               dec(h, h, h, need_weights=False)[0], atol=1e-5, rtol=1e-5)
    lefts = []
    for form in (None, script._matmul_softmax_forward):
        library = DecomposedMultiheadAttention.forward
        if form is not None:
            DecomposedMultiheadAttention.forward = form
        try:
            prepared = fxquant.prepare_fx(net, fxquant.get_default_qconfig_mapping("fbgemm"), (x,),
                                          backend_config="fbgemm")
        finally:
            DecomposedMultiheadAttention.forward = library
        fxquant.calibrate(prepared, [torch.randn(2, 5, 8) for _ in range(2)], progress=False)
        lefts.append({f.op for f in float_ops(fxquant.convert_fx(prepared))})
    assert "ScaledDotProductAttention" in lefts[0] and not {"matmul", "softmax"} & lefts[0], lefts[0]
    assert "ScaledDotProductAttention" not in lefts[1] and not {"matmul", "softmax"} & lefts[1], lefts[1]
