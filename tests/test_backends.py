"""Backend tables: well-formed, consistent with the kernel layer, and rendered into docs without drift."""

from __future__ import annotations

import dataclasses
import operator
import os

import pytest
import torch
import torchvision
from torch import nn

import fxquant

from fxquant.backends import BACKENDS, Observation, get_backend_config, resolve_backend
from fxquant.backends.config import OpKind
from fxquant.backends.kernels import get_kernels
from fxquant.backends.render import render_markdown
from fxquant.passes import QuantContext
from fxquant.passes.fuse import FusePass
from fxquant.tracer import trace

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "backends.md")


def test_docs_backends_md_is_generated_from_the_tables():
    with open(DOCS, encoding="utf-8") as f:
        on_disk = f.read()
    assert on_disk == render_markdown(), (
        "docs/backends.md drifted from the tables: run python -m fxquant.backends.render > docs/backends.md")


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_lowering_target_is_built_by_the_kernel_layer(name):
    cfg = get_backend_config(name)
    kernels = get_kernels(cfg)
    known = kernels.targets()
    for e in cfg.entries:
        if e.lowering is not None:
            assert e.lowering in known, f"{name}.{e.name} lowers to {e.lowering}, unknown to {kernels.name}"


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_entries_are_consistent(name):
    cfg = get_backend_config(name)
    for e in cfg.entries:
        assert e.patterns, e.name
        if any(len(p) > 1 for p in e.patterns) and e.op.modules:
            assert e.fuser is not None, f"{e.name} fuses modules but has no fuser"
        if e.observation is Observation.FIXED:
            assert e.constraints.fixed_qparams is not None, e.name
        if e.weight is not None:  # static kernels take qint8 weights; dynamic ones also float16 and 8/4-bit rows
            allowed = {torch.qint8, torch.float16, torch.quint8, torch.quint4x2} if e.is_dynamic else {torch.qint8}
            assert e.weight.dtype in allowed, e.name
    assert cfg.engine in ("fbgemm", "x86", "qnnpack")


def test_qnnpack_limits_are_in_the_table():
    q = get_backend_config("qnnpack")
    assert q.entry("conv2d").constraints.weight_range == (-127, 127)
    assert q.entry("conv2d").constraints.min_scale is None  # measured unnecessary: see backends/qnnpack.py
    assert q.entry("add").constraints.input_output_scale_ratio == (2.0 ** -14, 2.0 ** 8)
    assert (q.weight.quant_min, q.weight.quant_max) == (-127, 127)
    assert get_backend_config("fbgemm").entry("conv2d").constraints.depthwise_channel_multiple == 8


def test_longest_fusion_patterns_come_first():
    entries = get_backend_config("fbgemm").fusion_entries()
    lengths = [max(len(p) for p in e.patterns) for e in entries]
    assert lengths == sorted(lengths, reverse=True)


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown backend 'tpu'.*fbgemm"):
        get_backend_config("tpu")
    with pytest.raises(TypeError, match="backend_config must be"):
        resolve_backend(3)  # type: ignore[arg-type]


def test_duplicate_entry_names_rejected():
    cfg = get_backend_config("fbgemm")
    with pytest.raises(ValueError, match="duplicate entry names"):
        cfg.replace(entries=cfg.entries + (cfg.entries[0],))


def _scan(cfg, node, modules):
    """What entry_for answers by definition: the first static entry whose op or QAT op matches."""
    return next((e for e in cfg.entries if not e.is_dynamic and (e.op.matches(node, modules) or (
        e.qat_op is not None and e.qat_op.matches(node, modules)))), None)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_entry_for_looks_up_what_a_scan_of_the_table_finds(backend):
    cfg = get_backend_config(backend)
    checked = 0
    for model in (torchvision.models.mobilenet_v3_small(), torchvision.models.swin_t(),
                  torchvision.models.googlenet(init_weights=False, aux_logits=False)):
        gm = FusePass().run(trace(model.eval()), QuantContext(backend=cfg)).graph_module
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            assert cfg.entry_for(node, modules) is _scan(cfg, node, modules), node.format_node()
            checked += _scan(cfg, node, modules) is not None
    assert checked > 50

    class Everything(OpKind):   # an op kind with a rule of its own: the table is scanned, not indexed
        def matches(self, node, modules):
            return node.op == "call_function"

    mine = dataclasses.replace(cfg, entries=(dataclasses.replace(cfg.entries[0], op=Everything("everything")),)
                               + cfg.entries[1:])
    add = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert mine.entry_for(add, modules) is mine.entries[0]


def test_an_unhashable_function_in_a_table_is_matched_by_the_scan():
    """A table may name a callable that cannot be hashed: the index is not built and the scan answers."""
    @dataclasses.dataclass        # eq=True without frozen: instances are unhashable
    class Scaled:
        factor: float

        def __call__(self, x):
            return x * self.factor

    cfg = get_backend_config("fbgemm")
    mine = dataclasses.replace(cfg, entries=(dataclasses.replace(
        cfg.entries[0], op=OpKind("scaled", functions=(Scaled(2.0), operator.add))),) + cfg.entries[1:])
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(operator.add, (x, x))
    assert mine.entry_for(node, {}) is mine.entries[0] is _scan(mine, node, {})


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
def test_gelu_writes_its_own_grid_which_starts_at_its_minimum(backend, restore_engine):
    """GELU's output (from about -0.17 up) is not its input's range: on the quantized-tensor kernels it gets its own
    observer, so its grid starts near -0.17 instead of at the linear's most negative output, and the int8 model
    computes exactly what the reference model (quantize / dequantize around the float op) does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(8, 16) * 2
    torch.backends.quantized.engine = backend
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(backend), (x,), backend_config=backend)
    fxquant.calibrate(prepared, [torch.randn(8, 16) * 2 for _ in range(4)], progress=False)
    reference = fxquant.convert_to_reference_fx(prepared)
    quantized = fxquant.convert_fx(prepared)
    gelu = next(m for m in quantized.modules() if type(m).__name__ == "QuantizedGELU")
    linear = next(m for m in quantized.modules() if type(m).__name__ == "QuantizedLinear")
    lowest = lambda m: -m._zp * m._scale   # noqa: E731 - the grid's lowest value
    assert -0.2 <= lowest(gelu) <= -0.1 and lowest(linear) < -1.0
    with torch.no_grad():
        assert torch.equal(quantized(x), reference(x))
