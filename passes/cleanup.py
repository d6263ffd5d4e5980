"""Cleanup pass: drop dead nodes and unused submodules, regenerate the code if that changed the graph.

Contract: the function is unchanged; afterwards no call node is unused (impure calls excepted by
torch.fx's own rules); idempotent.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import fx

from fxquant.passes.base import PassResult, recompile

__all__ = ["CleanupPass"]


@dataclasses.dataclass(frozen=True)
class CleanupPass:
    """Dead-code elimination, unused submodules dropped, and recompilation when nodes were removed."""

    name: str = "cleanup"
    runs_module: ClassVar[bool] = False  # edits the graph only (see passes.base)

    def run(self, gm: fx.GraphModule, ctx: object) -> PassResult:
        modified = gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        if modified:
            recompile(gm)
        return PassResult(gm, bool(modified))
