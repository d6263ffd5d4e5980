"""Graph pictures: a prepared or converted model as Graphviz DOT, quantized regions and float islands colored.

Every node gets a :class:`Role`: int8 op, observer (prepared graphs), quantize / dequantize (the borders of a
converted graph), float, *float island* (float ops with int8 work both before and after them: each one costs a
dequantize and a quantize) or input/output. Quantized regions are the connected components (networkx,
weakly connected) of the graph restricted to int8 ops, observers and borders; each is drawn as a cluster.

:func:`to_dot` returns the DOT text (no dependency); :func:`render` writes SVG/PNG/PDF through Graphviz's
``dot`` program and raises :class:`GraphvizNotFoundError` saying how to get it when it is not installed
(``shutil.which("dot")``). Paste the DOT text into any Graphviz viewer otherwise.

Example:
    >>> import torch, fxquant
    >>> from fxquant.graphviz import to_dot, quantized_regions
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    >>> x = torch.randn(1, 3, 8, 8)
    >>> prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,), backend_config="fbgemm")
    >>> len(quantized_regions(prepared))
    1
    >>> to_dot(prepared).startswith("digraph")
    True
"""

from __future__ import annotations

import enum
import pathlib
import shutil
import subprocess
from typing import Optional, Union

import networkx as nx
from torch import fx

from fxquant.errors import FxQuantError
from fxquant.fake_quantize import is_observer
from fxquant.passes.context import RECORD_KEY
from fxquant.passes.matching import to_networkx

__all__ = ["Role", "node_roles", "quantized_regions", "float_islands", "to_dot", "render", "GraphvizNotFoundError"]


class Role(enum.Enum):
    """What a node is in the picture (value: its fill color)."""

    INT8 = "#9ecae1"
    OBSERVER = "#fdd0a2"
    QUANTIZE = "#c7e9c0"
    DEQUANTIZE = "#a1d99b"
    FLOAT = "#ffffff"
    FLOAT_ISLAND = "#fc9272"
    IO = "#d9d9d9"


class GraphvizNotFoundError(FxQuantError):
    """Graphviz's ``dot`` program is not installed (DOT text is still available from :func:`to_dot`)."""


def _base_role(node: fx.Node, modules: dict, converted: bool) -> Role:
    if node.op in ("placeholder", "output", "get_attr"):
        return Role.IO
    if node.op == "call_module" and is_observer(modules.get(str(node.target))):
        return Role.OBSERVER
    rec = node.meta.get(RECORD_KEY)
    if rec is None:
        return Role.FLOAT
    if rec.quantized_output or rec.quantized_inputs:  # a converted graph
        if rec.quantized_output and rec.quantized_inputs:
            return Role.INT8
        return Role.QUANTIZE if rec.quantized_output else Role.DEQUANTIZE
    return Role.INT8 if rec.quantizable and not converted else Role.FLOAT


_QUANT_ROLES = (Role.INT8, Role.OBSERVER, Role.QUANTIZE, Role.DEQUANTIZE)


def node_roles(gm: fx.GraphModule) -> dict[fx.Node, Role]:
    """Every node's :class:`Role` (float islands found with networkx ancestors / descendants)."""
    modules = dict(gm.named_modules())
    converted = any(getattr(n.meta.get(RECORD_KEY), "quantized_inputs", False) for n in gm.graph.nodes)
    roles = {n: _base_role(n, modules, converted) for n in gm.graph.nodes}
    g = to_networkx(gm.graph)
    int8 = {n for n, r in roles.items() if r is Role.INT8}
    for component in _components(g, {n for n, r in roles.items() if r is Role.FLOAT}):
        before = set().union(*(nx.ancestors(g, n) for n in component))
        after = set().union(*(nx.descendants(g, n) for n in component))
        if before & int8 and after & int8:
            roles.update({n: Role.FLOAT_ISLAND for n in component})
    return roles


def _components(g: nx.DiGraph, nodes: set[fx.Node]) -> list[set[fx.Node]]:
    sub = g.subgraph(nodes)
    order = {n: i for i, n in enumerate(g.nodes)}
    comps = [set(c) for c in nx.weakly_connected_components(sub)]
    return sorted(comps, key=lambda c: min(order[n] for n in c))


def quantized_regions(gm: fx.GraphModule) -> list[set[fx.Node]]:
    """The int8 regions: weakly connected components of int8 ops, observers, quantize and dequantize nodes,
    in graph order."""
    roles = node_roles(gm)
    return _components(to_networkx(gm.graph), {n for n, r in roles.items() if r in _QUANT_ROLES})


def float_islands(gm: fx.GraphModule) -> list[set[fx.Node]]:
    """Float ops with int8 work before and after them (each a dequantize / quantize round trip), in graph order."""
    roles = node_roles(gm)
    return _components(to_networkx(gm.graph), {n for n, r in roles.items() if r is Role.FLOAT_ISLAND})


def _label(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        what = type(gm.get_submodule(str(node.target))).__name__
    elif node.op == "call_function":
        what = getattr(node.target, "__name__", str(node.target))
    else:
        what = str(node.target) if node.op == "call_method" else node.op
    rec = node.meta.get(RECORD_KEY)
    why = None if rec is None or rec.quantized_inputs or rec.quantized_output or rec.quantizable else (
        rec.float_reason or ("its qconfig is None" if rec.entry is not None and rec.qconfig is None else None))
    reason = f"\\nfloat: {why[:48]}" if why and node.op.startswith("call") else ""
    return f"{node.name}\\n{what}{reason}".replace('"', "'")


def to_dot(gm: fx.GraphModule, title: Optional[str] = None) -> str:
    """The graph as DOT text: one cluster per quantized region, nodes filled by :class:`Role`, with a legend."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"to_dot expects a GraphModule from prepare_fx / convert_fx, got {type(gm).__name__}")
    roles = node_roles(gm)
    ids = {n: f"n{i}" for i, n in enumerate(gm.graph.nodes)}
    lines = ["digraph fxquant {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontsize=10];',
             f'  label="{(title or type(gm).__name__)}"; labelloc=t;']
    in_region: set[fx.Node] = set()
    for i, region in enumerate(quantized_regions(gm)):
        ops = sum(1 for n in region if roles[n] is Role.INT8)
        lines += [f"  subgraph cluster_int8_{i} {{", '    style="dashed"; color="#3182bd";',
                  f'    label="int8 region {i} ({ops} ops)";']
        lines += [f'    {ids[n]} [label="{_label(n, gm)}", fillcolor="{roles[n].value}"];'
                  for n in gm.graph.nodes if n in region]
        lines.append("  }")
        in_region |= region
    lines += [f'  {ids[n]} [label="{_label(n, gm)}", fillcolor="{roles[n].value}"];'
              for n in gm.graph.nodes if n not in in_region]
    lines += [f"  {ids[a]} -> {ids[n]};" for n in gm.graph.nodes for a in n.all_input_nodes]
    lines += ["  subgraph cluster_legend {", '    label="legend"; style="solid"; color="#bdbdbd";']
    lines += [f'    legend_{r.name.lower()} [label="{r.name.lower().replace("_", " ")}", fillcolor="{r.value}"];'
              for r in Role]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def render(gm: fx.GraphModule, path: Union[str, pathlib.Path], fmt: Optional[str] = None,
           title: Optional[str] = None) -> pathlib.Path:
    """Write the picture with Graphviz's ``dot`` (format from ``fmt`` or the suffix: svg, png, pdf).

    Raises:
        GraphvizNotFoundError: ``dot`` is not on the PATH (install Graphviz, e.g. ``apt install graphviz``, or
            write ``to_dot(gm)`` to a ``.dot`` file and open it in any Graphviz viewer).
    """
    path = pathlib.Path(path)
    fmt = fmt or path.suffix.lstrip(".") or "svg"
    dot = shutil.which("dot")
    if dot is None:
        raise GraphvizNotFoundError(f"cannot write {path}: Graphviz's 'dot' program is not installed (apt install "
                                    "graphviz / brew install graphviz / conda install graphviz); "
                                    "fxquant.graphviz.to_dot(gm) gives the DOT text without it")
    subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=to_dot(gm, title), text=True, check=True)
    return path
