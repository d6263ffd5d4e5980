"""Compile-time scaling: prepare+convert time and peak memory vs the number of FX nodes.

Run: ``python tests/bench_scaling.py`` (1k, 10k and 50k nodes; a few minutes), or
``--sizes 1000,4000 --families mlp`` for a quick look, ``--markdown docs/benchmarks-scaling.md`` to write the
page, ``--profile`` to cProfile the two largest sizes and list the functions whose own time grows faster
than the node count (the super-linear parts).

Synthetic models (random init, eval mode):

- ``mlp``: ``Linear(128, 128) -> ReLU`` repeated (2 FX nodes per layer);
- ``rescnn``: residual blocks ``conv3x3 -> bn -> relu -> conv3x3 -> bn -> (+ input) -> relu`` with 32
  channels on 8x8 inputs (7 FX nodes per block).

Each (family, size) runs in a fresh subprocess, so its peak memory is its own: the peak RSS reached during
``prepare_fx`` minus the RSS just before it (the float model already built, and a 30-node model of the same
family already quantized, so imports and kernel libraries are not counted), compared with the model's
parameter and buffer bytes. ``prepare_fx`` copies the model's modules but not its weights (it reads them where
they are), so only what prepare adds is counted: folded weights, observers, graph objects; the target is 1.5x.
Time is ``prepare_fx`` + ``convert_fx`` (one calibration batch in between, not counted), 1 torch thread.
The exponent is the least-squares slope of log(time) against log(nodes); the target is <= 1.1.
Timings come from a shared machine: compare within one run.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import json
import math
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Optional

import torch
from torch import fx, nn

FAMILIES = ("mlp", "rescnn")
SIZES = (1000, 10000, 50000)
WIDTH = 128        # mlp features
CHANNELS = 32      # rescnn channels
SPATIAL = 8        # rescnn input height and width
TIME_EXPONENT_TARGET = 1.1
MEMORY_RATIO_TARGET = 1.5


class Block(nn.Module):
    """A ResNet basic block without downsampling (7 FX nodes)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + x)


def build(family: str, nodes: int) -> tuple[nn.Module, torch.Tensor]:
    """A model of ``family`` with about ``nodes`` FX nodes, and an example input."""
    torch.manual_seed(0)
    if family == "mlp":
        layers: list[nn.Module] = []
        for _ in range(max(1, (nodes - 2) // 2)):
            layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
        return nn.Sequential(*layers).eval(), torch.randn(1, WIDTH)
    if family == "rescnn":
        model = nn.Sequential(*[Block(CHANNELS) for _ in range(max(1, (nodes - 2) // 7))])
        # batch-norm statistics from one batch (as fxquant.zoo does for torchvision models): with the default
        # running statistics every block scales its input up, and activations overflow after ~4k blocks
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average: one batch sets the statistics exactly
        with torch.no_grad():
            model.train()(torch.randn(8, CHANNELS, SPATIAL, SPATIAL))
        return model.eval(), torch.randn(1, CHANNELS, SPATIAL, SPATIAL)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@dataclasses.dataclass
class Measurement:
    """One (family, size) run."""

    family: str
    nodes: int
    param_bytes: int
    prepare_s: float
    convert_s: float
    prepare_peak_bytes: int
    convert_peak_bytes: int
    pass_s: dict[str, float]

    @property
    def total_s(self) -> float:
        return self.prepare_s + self.convert_s

    @property
    def memory_ratio(self) -> float:
        return self.prepare_peak_bytes / self.param_bytes


def _peak_since(rss_before: int) -> int:
    return max(_maxrss_bytes() - rss_before, 0)


def _calibrated(prepared: nn.Module, x: torch.Tensor) -> nn.Module:
    import fxquant

    fxquant.calibrate(prepared, [x], progress=False)
    return prepared


def measure_one(family: str, nodes: int, profile: Optional[str] = None) -> Measurement:
    """Build, prepare, calibrate (1 batch), convert; time and memory of prepare and convert (this process)."""
    import fxquant

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    small, sx = build(family, 30)  # warm-up: imports, kernel libraries and first-call costs are not the model's
    fxquant.convert_fx(_calibrated(fxquant.prepare_fx(small, fxquant.get_default_qconfig_mapping("fbgemm"), (sx,),
                                                      backend_config="fbgemm"), sx))
    del small
    model, x = build(family, nodes)
    param_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    qmap = fxquant.get_default_qconfig_mapping("fbgemm")
    gc.collect()
    prof = cProfile.Profile() if profile else None
    rss = _rss_bytes()
    start = time.perf_counter()
    if prof:
        prof.enable()
    prepared = fxquant.prepare_fx(model, qmap, (x,), backend_config="fbgemm")
    prepare_s = time.perf_counter() - start
    prepare_peak = _peak_since(rss)
    fxquant.calibrate(prepared, [x], progress=False)
    gc.collect()
    rss = _rss_bytes()
    start = time.perf_counter()
    quantized = fxquant.convert_fx(prepared)
    convert_s = time.perf_counter() - start
    if prof:
        prof.disable()
        prof.dump_stats(profile)
    convert_peak = _peak_since(rss)
    pass_s: dict[str, float] = {}
    for t in quantized.meta["fxquant_state"].timings:  # the prepare passes' timings, then convert's
        pass_s[t.name] = pass_s.get(t.name, 0.0) + t.seconds
    pass_s["rest (trace, copies, verification)"] = prepare_s + convert_s - sum(pass_s.values())
    traced_nodes = len(fx.symbolic_trace(model).graph.nodes)  # counted last: its memory must not blur the peaks
    return Measurement(family, traced_nodes, param_bytes, prepare_s, convert_s, prepare_peak, convert_peak, pass_s)


def memory_breakdown(family: str, nodes: int) -> str:
    """Where prepare's memory goes: tensors of the prepared model (weights, observer buffers) and Python objects
    (tracemalloc peak of a second prepare_fx; tracemalloc does not see tensor storage)."""
    import tracemalloc

    import fxquant
    from fxquant.observers import ObserverBase

    warnings.simplefilter("ignore")
    model, x = build(family, nodes)
    qmap = fxquant.get_default_qconfig_mapping("fbgemm")
    params = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    prepared = fxquant.prepare_fx(model, qmap, (x,), backend_config="fbgemm")
    users = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: set[int] = set()

    def new_bytes(ts: list[torch.Tensor]) -> int:  # memory prepare added: not the user's, each storage once
        total = 0
        for t in ts:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in users and ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        return total

    observer = new_bytes([t for m in prepared.modules() if isinstance(m, ObserverBase) for t in m.buffers()])
    tensors = observer + new_bytes(list(prepared.parameters()) + list(prepared.buffers()))
    del prepared
    gc.collect()
    tracemalloc.start()
    prepared = fxquant.prepare_fx(model, qmap, (x,), backend_config="fbgemm")
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n = len(prepared.graph.nodes)
    return (f"{family}, {nodes} FX nodes ({n} after prepare), parameters {params / 1e6:.1f} MB: prepared model's "
            f"own weights and buffers {(tensors - observer) / params:.2f}x (the rest it reads from the float model), "
            f"observer buffers {observer / params:.2f}x "
            f"({observer / max(1, n) / 1e3:.1f} kB per prepared node), Python objects at peak "
            f"{python_peak / params:.2f}x ({python_peak / n / 1e3:.1f} kB per prepared node)")


def run_child(family: str, nodes: int, profile: Optional[str] = None) -> Measurement:
    """:func:`measure_one` in a fresh Python process (its own peak RSS)."""
    cmd = [sys.executable, __file__, "--child", family, str(nodes)] + (["--profile-to", profile] if profile else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{family} with {nodes} nodes failed:\n{out.stderr[-3000:]}")
    return Measurement(**json.loads(out.stdout.strip().splitlines()[-1]))


def fit_exponent(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    xs, ys = [math.log(a) for a, _ in points], [math.log(b) for _, b in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


HEADER = ("family", "FX nodes", "params MB", "prepare s", "convert s", "total s", "us / node",
          "prepare peak MB", "peak / params", "convert peak MB")


def _cells(m: Measurement) -> tuple[str, ...]:
    return (m.family, str(m.nodes), f"{m.param_bytes / 1e6:.1f}", f"{m.prepare_s:.2f}", f"{m.convert_s:.2f}",
            f"{m.total_s:.2f}", f"{m.total_s / m.nodes * 1e6:.0f}", f"{m.prepare_peak_bytes / 1e6:.1f}",
            f"{m.memory_ratio:.2f}x", f"{m.convert_peak_bytes / 1e6:.1f}")


def _fits(results: list[Measurement]) -> list[str]:
    lines = []
    for family in dict.fromkeys(m.family for m in results):
        rows = [m for m in results if m.family == family]
        if len(rows) < 2:
            continue
        total = fit_exponent([(m.nodes, m.total_s) for m in rows])
        prep = fit_exponent([(m.nodes, m.prepare_s) for m in rows])
        conv = fit_exponent([(m.nodes, m.convert_s) for m in rows])
        mem = max(m.memory_ratio for m in rows)
        ok = "meets" if total <= TIME_EXPONENT_TARGET else "misses"
        okm = "meets" if mem <= MEMORY_RATIO_TARGET else "misses"
        lines.append(f"{family}: time ~ nodes^{total:.2f} (prepare ^{prep:.2f}, convert ^{conv:.2f}; {ok} the "
                     f"<= {TIME_EXPONENT_TARGET} target); prepare peak memory up to {mem:.2f}x the parameters "
                     f"({okm} the <= {MEMORY_RATIO_TARGET}x target)")
    return lines


def _pass_table(results: list[Measurement]) -> list[str]:
    """Seconds per pass at each size, and each pass's own fitted exponent."""
    names = list(dict.fromkeys(n for m in results for n in m.pass_s))
    lines = ["| family | pass | " + " | ".join(f"{m.nodes} nodes s" for m in results if m.family == results[0].family)
             + " | exponent |", "|---|---|" + "---|" * (sum(m.family == results[0].family for m in results) + 1)]
    for family in dict.fromkeys(m.family for m in results):
        rows = [m for m in results if m.family == family]
        for name in names:
            pts = [(m.nodes, m.pass_s.get(name, 0.0)) for m in rows]
            exp = fit_exponent(pts) if len(pts) > 1 and all(t > 1e-4 for _, t in pts) else float("nan")
            lines.append(f"| {family} | {name} | " + " | ".join(f"{t:.2f}" for _, t in pts) + f" | {exp:.2f} |")
    return lines


def superlinear(small: str, large: str, ratio: float, top: int = 12) -> list[str]:
    """Functions whose own time grows fastest between two profiles (sizes ``ratio`` apart)."""
    a, b = pstats.Stats(small).stats, pstats.Stats(large).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in b.values())
    rows = []
    for key, vb in b.items():
        va = a.get(key)
        if va is None or va[2] <= 1e-3 or vb[2] < 0.01 * total:
            continue
        rows.append((math.log(vb[2] / va[2]) / math.log(ratio), vb[2], vb[1], key))
    rows.sort(reverse=True)
    return [f"  exponent {e:.2f}  {t:7.2f} s own time  {calls:8d} calls  {k[0]}:{k[1]}({k[2]})"
            for e, t, calls, k in rows[:top]]


def markdown(results: list[Measurement], command: str) -> str:
    """The page section: settings, the table, the fits and the per-pass times."""
    head = "| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER)
    body = "\n".join("| " + " | ".join(_cells(m)) + " |" for m in results)
    return (f"Command: `{command}`\n\n{head}\n{body}\n\n" + "\n".join(f"- {line}" for line in _fits(results))
            + "\n\nSeconds per pass (prepare and convert pipelines):\n\n" + "\n".join(_pass_table(results)) + "\n")


def _child(argv: list[str]) -> None:
    family, nodes = argv[0], int(argv[1])
    profile = argv[3] if len(argv) > 3 and argv[2] == "--profile-to" else None
    print(json.dumps(dataclasses.asdict(measure_one(family, nodes, profile))))


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="FX node counts")
    ap.add_argument("--markdown", default="", help="write the results page here (e.g. docs/benchmarks-scaling.md)")
    ap.add_argument("--breakdown", action="store_true", help="where prepare's memory goes, at the smallest size")
    ap.add_argument("--profile", action="store_true", help="cProfile the two largest sizes; list super-linear functions")
    args = ap.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    results = []
    for family in args.families.split(","):
        for n in sizes:
            results.append(run_child(family, n))
            print(" | ".join(_cells(results[-1])), flush=True)
    print()
    print("\n".join(_fits(results)))
    print("\n" + "\n".join(_pass_table(results)))
    if args.breakdown:
        print()
        for family in args.families.split(","):
            print(memory_breakdown(family, sizes[0]))
    if args.profile and len(sizes) > 1:
        with tempfile.TemporaryDirectory() as tmp:
            for family in args.families.split(","):
                files = [os.path.join(tmp, f"{family}{n}.prof") for n in sizes[-2:]]
                for n, f in zip(sizes[-2:], files):
                    run_child(family, n, f)
                print(f"\n{family}: functions whose own time grows fastest from {sizes[-2]} to {sizes[-1]} nodes")
                print("\n".join(superlinear(files[0], files[1], sizes[-1] / sizes[-2])))
    if args.markdown:
        write_page(args.markdown, markdown(results, "python tests/bench_scaling.py " + " ".join(argv)))


PAGE_HEAD = """# Compile-time scaling

How `prepare_fx` + `convert_fx` time and memory grow with the size of the graph. Targets: time linear in the
number of FX nodes (fitted exponent <= 1.1) up to 50k nodes, and peak memory of `prepare_fx` <= 1.5x the
model's parameter memory. The settings are in `tests/bench_scaling.py`'s docstring; in short: deep MLPs of
`Linear(128, 128) + ReLU` and residual CNN stacks of 32-channel basic blocks on 8x8 inputs, fbgemm, 1 torch
thread, each size in a fresh process; peak memory is the peak RSS during `prepare_fx` minus the RSS before it.
Timings are from a 2-core machine; compare within one run.

"""
RESULTS_MARK = "## Results"


def write_page(path: str, section: str) -> None:
    """Write the page: the fixed head, then the results section (replacing an earlier one); text the page
    has after the results (findings) is kept."""
    tail = ""
    if os.path.exists(path):
        old = open(path, encoding="utf-8").read()
        if "\n## Findings" in old:
            tail = old[old.index("\n## Findings"):]
    with open(path, "w", encoding="utf-8") as f:
        f.write(PAGE_HEAD + RESULTS_MARK + "\n\n" + section + tail)


if __name__ == "__main__":
    main()
