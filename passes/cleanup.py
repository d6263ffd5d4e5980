"""Cleanup pass: drop dead nodes and unused submodules, regenerate code.

Contract: the function is unchanged; afterwards no call node is unused (impure calls excepted by
torch.fx's own rules); idempotent.
"""

from __future__ import annotations

import dataclasses

from torch import fx

from fxquant.passes.base import PassResult

__all__ = ["CleanupPass"]


@dataclasses.dataclass(frozen=True)
class CleanupPass:
    """Dead-code elimination and recompilation."""

    name: str = "cleanup"

    def run(self, gm: fx.GraphModule, ctx: object) -> PassResult:
        modified = gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return PassResult(gm, bool(modified))
