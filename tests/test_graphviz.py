"""fxquant.graphviz: node roles, int8 regions (networkx components), float islands, the DOT text, rendering."""

from __future__ import annotations

import os
import re
import shutil
import stat
import warnings

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import fxquant
from fxquant.graphviz import GraphvizNotFoundError, Role, float_islands, node_roles, quantized_regions, render, to_dot
from fxquant.passes.matching import to_networkx
from fxquant.testing import examples, quant_cases

from models import SmallCNN, seeded


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _chain() -> nn.Module:
    return seeded(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)))


def _convert(model, x, mapping):
    prepared = fxquant.prepare_fx(model, mapping, (x,), backend_config="fbgemm")
    fxquant.calibrate(prepared, [x], progress=False)
    return prepared, fxquant.convert_fx(prepared)


X = torch.randn(2, 3, 16, 16)


def test_roles_of_prepared_and_converted_graphs():
    prepared, converted = _convert(_chain(), X, fxquant.get_default_qconfig_mapping("fbgemm"))
    roles = {n.name: r for n, r in node_roles(prepared).items()}
    assert [roles[n] for n in ("_0", "_2", "_4")] == [Role.INT8] * 3
    assert sum(r is Role.OBSERVER for r in roles.values()) == 4 and roles["input_1"] is Role.IO
    roles = {n.name: r for n, r in node_roles(converted).items()}
    assert roles["input_1_quantize"] is Role.QUANTIZE and roles["dequantize"] is Role.DEQUANTIZE
    assert len(quantized_regions(prepared)) == len(quantized_regions(converted)) == 1
    assert float_islands(converted) == []


def test_a_float_layer_between_int8_layers_is_an_island_that_splits_the_regions():
    mapping = fxquant.get_default_qconfig_mapping("fbgemm").set_module_name("2", None)
    prepared, converted = _convert(_chain(), X, mapping)
    for gm in (prepared, converted):
        assert [sorted(n.name for n in island) for island in float_islands(gm)] == [["_2"]]
        assert len(quantized_regions(gm)) == 2
    dot = to_dot(converted)
    assert "float: " in dot and Role.FLOAT_ISLAND.value in dot   # the reason it stayed float is in the label


@settings(max_examples=examples(15))
@given(quant_cases(["fbgemm"], max_ops=6))
def test_regions_are_maximal_disjoint_and_cover_every_int8_node(case):
    prepared, converted = _convert(case.model, case.example, case.mapping)
    for gm in (prepared, converted):
        roles = node_roles(gm)
        regions = quantized_regions(gm)
        owner = {}
        for i, region in enumerate(regions):
            for n in region:
                assert n not in owner                              # disjoint
                owner[n] = i
        int8 = {n for n, r in roles.items() if r in (Role.INT8, Role.OBSERVER, Role.QUANTIZE, Role.DEQUANTIZE)}
        assert set(owner) == int8                                  # cover exactly the int8 part
        for a, b in to_networkx(gm.graph).edges:                   # maximal: no edge joins two regions
            if a in owner and b in owner:
                assert owner[a] == owner[b]
        g = to_networkx(gm.graph)
        for island in float_islands(gm):
            import networkx as nx
            assert all(roles[n] is Role.FLOAT_ISLAND for n in island)
            assert any(roles[a] is Role.INT8 for n in island for a in nx.ancestors(g, n))
            assert any(roles[d] is Role.INT8 for n in island for d in nx.descendants(g, n))


def test_dot_text_declares_every_node_once_and_every_edge():
    _, converted = _convert(seeded(SmallCNN()), X, fxquant.get_default_qconfig_mapping("fbgemm"))
    dot = to_dot(converted, title="small cnn")
    declared = re.findall(r"^\s+(n\d+) \[label=", dot, re.M)
    nodes = list(converted.graph.nodes)
    assert sorted(declared) == sorted(f"n{i}" for i in range(len(nodes)))
    assert len(re.findall(r"^\s+n\d+ -> n\d+;", dot, re.M)) == sum(len(n.all_input_nodes) for n in nodes)
    assert dot.count("{") == dot.count("}") and 'label="small cnn"' in dot
    assert dot.count("subgraph cluster_int8_") == len(quantized_regions(converted))
    assert all(f"legend_{r.name.lower()}" in dot for r in Role)
    with pytest.raises(TypeError, match="expects a GraphModule"):
        to_dot(nn.ReLU())


def test_render_without_graphviz_says_how_to_get_it(monkeypatch, tmp_path):
    _, converted = _convert(_chain(), X, fxquant.get_default_qconfig_mapping("fbgemm"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(GraphvizNotFoundError, match="'dot' program is not installed.*apt install graphviz.*to_dot"):
        render(converted, tmp_path / "g.svg")


def test_render_hands_the_dot_text_to_the_dot_program(monkeypatch, tmp_path):
    """A stand-in `dot` (Graphviz is not installed here) records its arguments and input."""
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@" > "$3.args"\ncat > "$3"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    _, converted = _convert(_chain(), X, fxquant.get_default_qconfig_mapping("fbgemm"))
    out = render(converted, tmp_path / "g.png")
    assert out.read_text() == to_dot(converted)
    assert (tmp_path / "g.png.args").read_text().split()[:2] == ["-Tpng", "-o"]


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_render_svg_with_real_graphviz(tmp_path):
    _, converted = _convert(_chain(), X, fxquant.get_default_qconfig_mapping("fbgemm"))
    assert "<svg" in render(converted, tmp_path / "g.svg").read_text()
