"""The reference representation of a quantized model: float ops between quantize / dequantize pairs.

:func:`convert_to_reference_fx` (also ``fxquant.convert_to_reference_fx``) turns a calibrated prepared model
into a GraphModule that computes the int8 model's arithmetic in float: each quantized tensor is written as
``dequantize(quantize(x))`` with :mod:`fxquant.qdq` operators on plain integer tensors, each quantized conv /
linear keeps its weight as an int8 buffer followed by ``dequantize``, and the ops themselves are the float
ones. It equals the fake-quant simulation bit for bit, and is what exporters read
(:func:`fxquant.export_onnx` turns the pairs into ONNX QuantizeLinear / DequantizeLinear).

``decomposed=True`` goes one step further: the quantize / dequantize operators become the plain aten ops they
stand for (``mul``, ``round``, ``add``, ``clamp``, ``to(torch.uint8)``; ``to(torch.float32)``, ``sub``, ``mul``),
for consumers that know no custom operator.

Example:
    >>> import torch, fxquant
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    >>> x = torch.randn(2, 3, 16, 16)
    >>> prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("fbgemm"), (x,),
    ...                               backend_config="fbgemm")
    >>> fxquant.calibrate(prepared, [x], progress=False)
    >>> ref = fxquant.convert_to_reference_fx(prepared)
    >>> [n.target.__name__ for n in ref.graph.nodes if n.op == "call_function"]  # doctest: +NORMALIZE_WHITESPACE
    ['quantize_per_tensor.default', 'dequantize_per_tensor.default', 'dequantize_per_channel.default', 'conv2d',
     'relu', 'quantize_per_tensor.default', 'dequantize_per_tensor.default']
"""

from __future__ import annotations

import copy
from typing import Optional, Union

from torch import fx

from fxquant.api import STATE_KEY, QuantState, _state, freeze_qat_pipeline
from fxquant.backends import BackendConfig, resolve_backend
from fxquant.errors import ConvertError
from fxquant.partial import PARTIAL_ATTR, convert_partial
from fxquant.passes.base import PassManager
from fxquant.passes.cleanup import CleanupPass
from fxquant.passes.context import QuantContext
from fxquant.passes.reference import DecomposeQDQPass, ReferencePass
from fxquant.passes.verify import CONVERT_VERIFIERS
from fxquant.serialization import as_quant_graph_module

__all__ = ["convert_to_reference_fx", "reference_pipeline"]

REFERENCE_ORDER = [("reference", "decompose_qdq"), ("reference", "cleanup"), ("decompose_qdq", "cleanup")]


def reference_pipeline(decomposed: bool = False, verify: bool = True) -> PassManager:
    """The passes of :func:`convert_to_reference_fx`: ``reference`` [``decompose_qdq``] ``cleanup``."""
    passes = [ReferencePass(), *([DecomposeQDQPass()] if decomposed else []), CleanupPass()]
    return PassManager(passes, REFERENCE_ORDER, CONVERT_VERIFIERS, verify)


def convert_to_reference_fx(graph_module: fx.GraphModule, convert_custom_config: Optional[dict] = None,
                            backend_config: Union[str, BackendConfig, None] = None, *, decomposed: bool = False,
                            verify: bool = True) -> fx.GraphModule:
    """The reference representation of a calibrated prepared (or trained QAT) model.

    Args:
        graph_module: the result of :func:`fxquant.prepare_fx` after calibration, or of
            :func:`fxquant.prepare_qat_fx` after training (not modified).
        convert_custom_config: accepted for torch.ao compatibility; no options are used.
        backend_config: must match the one used to prepare, if given.
        decomposed: write quantize / dequantize as plain aten ops instead of :mod:`fxquant.qdq` operators.
        verify: lint and check invariants between passes.

    Returns:
        A float GraphModule (runs on any engine and device) whose quantized tensors pass through
        ``quantize`` -> ``dequantize``; ``meta["fxquant_state"].stage == "reference"``.
    """
    partial_state = getattr(graph_module, PARTIAL_ATTR, None)
    if partial_state is not None:
        if partial_state.converted:
            raise ConvertError("convert_to_reference_fx: this model is already converted; pass the prepared model")
        out = convert_partial(copy.deepcopy(graph_module), lambda gm: convert_to_reference_fx(
            gm, convert_custom_config, backend_config, decomposed=decomposed, verify=verify))
        getattr(out, PARTIAL_ATTR).converted = True
        return out
    state = _state(graph_module, "convert_to_reference_fx")
    if backend_config is not None and resolve_backend(backend_config).name != state.backend.name:
        raise ConvertError(f"convert_to_reference_fx: the model was prepared for backend '{state.backend.name}', "
                           f"not '{resolve_backend(backend_config).name}'; leave backend_config out")
    ctx = QuantContext(backend=state.backend, qconfig_mapping=state.qconfig_mapping,
                       float_reasons=list(state.float_reasons))
    gm = copy.deepcopy(graph_module).cpu()  # the passes rewrite in place: never the user's model
    timings = list(state.timings)
    if state.is_qat:
        freeze = freeze_qat_pipeline(verify)
        gm = freeze.run(gm, ctx)
        timings += freeze.timings
    gm.eval()
    pm = reference_pipeline(decomposed, verify)
    gm = as_quant_graph_module(pm.run(gm, ctx))
    gm.meta[STATE_KEY] = QuantState(state.backend, state.qconfig_mapping, "reference", ctx.float_reasons,
                                    timings + pm.timings, is_qat=state.is_qat)
    return gm
