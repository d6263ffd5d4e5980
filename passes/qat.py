"""QAT freeze pass: turn a trained QAT model back into the fused float model that lowering expects.

Contract:
    * input: a GraphModule prepared by ``prepare_qat_fx`` (and trained);
    * output: the same graph, with every QAT module (:class:`fxquant.qat.QATModule`) replaced by its
      :meth:`~fxquant.qat.QATModule.to_float` (batch norm folded from the running statistics, the op + ReLU
      as one fused module), so the lower pass builds the same int8 kernels as for post-training quantization;
    * the node's ``NodeRecord.weight_qparams`` is set to the qparams of the module's ``weight_fake_quant``,
      and lowering quantizes the weight with those rather than observing it again: the converted model
      rounds each weight exactly as the QAT model's fake quantization did (with observers off);
      a module whose weight fake quantizer never ran (or that has none) leaves it ``None``;
    * activation fake quantizers stay in place: lowering reads their ``qparams()`` like observers';
    * functional dropout calls are removed: the model was traced in train mode, so ``F.dropout(x, p,
      self.training)`` holds ``training=True``, and the converted model is for inference (dropout modules
      need nothing: they follow the module's mode);
    * idempotent (a second run finds no QAT module).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch.nn.functional as F
from torch import fx

from fxquant.passes.base import PassResult, recompile
from fxquant.passes.context import QuantContext, modules_of, record
from fxquant.qat import QATModule

__all__ = ["FreezeQATPass"]


@dataclasses.dataclass(frozen=True)
class FreezeQATPass:
    """Replace QAT modules by their float equivalents, keeping their trained weight qparams (see module docstring)."""

    name: str = "freeze_qat"
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: QuantContext) -> PassResult:
        modules = modules_of(gm)
        modified = False
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is F.dropout and isinstance(node.args[0], fx.Node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                modified = True
                continue
            module = modules.get(str(node.target)) if node.op == "call_module" else None
            if not isinstance(module, QATModule):
                continue
            record(node).weight_qparams = module.weight_qparams()
            gm.set_submodule(str(node.target), module.to_float())
            modified = True
        if modified:
            recompile(gm)
        return PassResult(gm, modified)
