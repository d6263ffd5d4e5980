"""Residual-stream pass: keep a transformer's residual stream, and the LayerNorms that read it, in float.

Per-tensor 8-bit quantization of a pre-LayerNorm residual stream fails on transformers: the stream mixes
tokens of very different magnitudes (a ViT's class token starts near zero beside large patch tokens), so
one scale erases the small ones before LayerNorm renormalizes them, and every block's add requantizes the
stream again. Measured on torchvision vit_b_16 (random init): quantizing only the first block's ln_1 drops
the output to 13.9 dB. Keeping the stream float costs one dequantize per residual add; the projections,
matmuls and MLPs, where the time goes, stay int8.

Contract:
    * input: an annotated graph; output: the same graph, with every LayerNorm whose input is produced by a
      chain of adds, and those adds, marked float with a reason (shown by ``fxquant.report``). Layout ops
      (reshape / view, permute, transpose, contiguous, flatten, squeeze, unsqueeze) may sit between an add and
      what reads it: they move the stream's values without mixing them, as MaxViT's window and grid partitions
      do between a residual add and the next attention's LayerNorm (measured on torchvision maxvit_t, random
      init, 7-bit activations: with its first block's stream quantized the window attention alone costs 2.5 dB,
      torch.ao, whose LayerNorm reads a float stream there, 0.6 dB);
    * post-norm blocks (Swin V2: ``x + norm(attn(x))``) have no LayerNorm reading the stream: an add with a
      LayerNorm's output as an operand starts a stream too, kept float with the adds before it (measured on
      torchvision swin_v2_t, random init, 7-bit activations: 24.7 -> 25.7 dB, torch.ao 26.0);
    * runs between annotate and observe; idempotent.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import fx

from fxquant.backends.common import LAYOUT_KINDS
from fxquant.passes.base import PassResult
from fxquant.passes.context import QuantContext, record

__all__ = ["FloatResidualStreamPass"]

_STREAM_REASON = ("residual stream read by LayerNorm: kept float (one per-tensor scale would erase small tokens; "
                  "see passes/residual.py)")


#: the entries of the ops that only move values (``LAYOUT_KINDS``): the stream passes through them
_LAYOUT = frozenset(kind.name for kind in LAYOUT_KINDS)


def _is(node: object, entry_name: str) -> bool:
    if not isinstance(node, fx.Node):
        return False
    rec = record(node)
    return rec.entry is not None and rec.entry.name == entry_name and rec.quantizable


def _behind_layout(node: object) -> object:
    """What ``node`` reads through a chain of layout ops (``node`` itself if it is none)."""
    while isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node):
        rec = record(node)
        if rec.entry is None or rec.entry.name not in _LAYOUT:
            break
        node = node.args[0]
    return node


@dataclasses.dataclass(frozen=True)
class FloatResidualStreamPass:
    """Mark residual streams feeding LayerNorm float (see module docstring)."""

    name: str = "residual_stream"
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: QuantContext) -> PassResult:
        starts: list[fx.Node] = []   # the last add of each stream
        for node in gm.graph.nodes:
            src = _behind_layout(node.args[0] if node.args else next(iter(node.kwargs.values()), None))
            if _is(node, "layer_norm") and _is(src, "add"):   # pre-norm: a LayerNorm reads the stream
                ctx.keep_float(node, "layer_norm", _STREAM_REASON)
                starts.append(src)
            elif _is(node, "add") and any(_is(_behind_layout(a), "layer_norm") for a in node.args):   # post-norm
                starts.append(node)
        stack = list(starts)
        while stack:
            add = stack.pop()
            if not _is(add, "add"):   # already marked float: its adds are done
                continue
            ctx.keep_float(add, "add", _STREAM_REASON)
            stack.extend(a for a in map(_behind_layout, add.args) if _is(a, "add"))
        return PassResult(gm, bool(starts))
