"""fxquant's compiler passes (installed as ``fxquant.passes``): one pass per module, each with a contract.

The public pass-authoring API (stable names; see ``docs/pass-authoring.md``):

* passes: :class:`Pass` (the protocol), :class:`PassResult`, :class:`PassManager` (ordering constraints,
  verification between passes, print-after, per-pass :class:`TimingReport`), :func:`recompile` (what a pass
  calls after changing the graph);
* pipelines: :func:`prepare_pipeline`, :func:`convert_pipeline`, :func:`fuse_pipeline` (fresh PassManagers to
  extend and pass to ``prepare_fx(..., pipeline=)`` / ``convert_fx(..., pipeline=)``);
* patterns: :class:`Pattern`, :class:`Op`, :class:`Match`, :func:`find`; rewrites: :class:`Rewrite`,
  :class:`RewritePass`, :func:`rewrite`;
* shared state: :class:`QuantContext`, :class:`NodeRecord` (``node.meta["fxquant"]``), :func:`record`.
"""

from fxquant.passes.base import (CODEGEN, PRINT_AFTER_ENV, Pass, PassManager, PassOrderError, PassResult, PassTiming,
                                 PassVerificationError, TimingReport, recompile)
from fxquant.passes.context import RECORD_KEY, FloatReason, NodeRecord, QuantContext, modules_of, record
from fxquant.passes.matching import Match, Op, Pattern, find
from fxquant.passes.rewrite import Rewrite, RewritePass, rewrite
from fxquant.passes.pipelines import (convert_pipeline, freeze_qat_pipeline, fuse_pipeline, prepare_pipeline,
                                      timing_report)

__all__ = ["Pass", "PassResult", "PassManager", "PassTiming", "TimingReport", "CODEGEN", "PassOrderError",
           "PassVerificationError", "PRINT_AFTER_ENV", "recompile", "QuantContext", "NodeRecord", "FloatReason", "RECORD_KEY",
           "record", "modules_of", "Pattern", "Op", "Match", "find", "Rewrite", "RewritePass", "rewrite",
           "prepare_pipeline", "convert_pipeline", "freeze_qat_pipeline", "fuse_pipeline", "timing_report"]
