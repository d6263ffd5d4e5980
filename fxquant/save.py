"""Saving a quantized model as data, and rebuilding it from the float architecture.

``torch.save(model)`` of a prepared or converted model works (see :mod:`fxquant.serialization`), but loading it
unpickles code objects (``torch.load(..., weights_only=False)``). :func:`save` writes only data: the backend name,
the QConfigMapping in a plain form, the shapes and dtypes of the example inputs, the state_dict, and the weight
grids AdaRound pinned in a prepared model's node records.
:func:`load` reads it with ``torch.load(weights_only=True)`` and rebuilds the model by running ``prepare_fx``
(``prepare_qat_fx`` for QAT models) and, for converted models, ``convert_fx`` on the float model you hand it,
then loads the saved state: observers' statistics for a prepared model, int8 weights and qparams for a
converted one. No calibration data is needed, and the float model's own weights are not used (a fresh
``MyModel()`` will do).

The QConfigMapping is stored as names and numbers. Observer classes must come from fxquant; object types
(``nn.Conv2d``, ``F.relu``, ``operator.add``, your own module classes) are found again in torch, ``operator``
and the modules of the float model given to :func:`load`, never imported from a name in the file.

Example:
    >>> import torch, fxquant                                               # doctest: +SKIP
    >>> fxquant.save(quantized, "model.fxq")                                 # doctest: +SKIP
    >>> same = fxquant.load("model.fxq", MyModel)                            # doctest: +SKIP
"""

from __future__ import annotations

import copy
import operator
import os
from typing import Any, Callable, Optional, Union

import torch
from torch import fx, nn

from fxquant.errors import FxQuantError

__all__ = ["save", "load", "SaveError", "FORMAT"]

FORMAT = "fxquant-save-1"
_SCALARS = (bool, int, float, str, type(None))


class SaveError(FxQuantError):
    """A model or its QConfigMapping cannot be saved as data, or a file does not rebuild the model it describes."""


def _name_of(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _encode_value(value: Any, where: str) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.qscheme):
        return {"qscheme": str(value).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        return [_encode_value(v, where) for v in value]
    return _encode_factory(value, where)


def _encode_factory(factory: Any, where: str) -> Any:
    from fxquant.observers import ObserverFactory

    if factory is None:
        return None
    if isinstance(factory, ObserverFactory):
        cls, kwargs = factory.cls, factory.kwargs
    elif isinstance(factory, type):
        cls, kwargs = factory, {}
    else:
        raise SaveError(f"fxquant.save: {where}: cannot store {factory!r} as data (only observer classes and "
                        "Observer.with_args(...) factories); save with torch.save(model) instead")
    if not cls.__module__.startswith("fxquant."):
        raise SaveError(f"fxquant.save: {where}: observer class {_name_of(cls)} is not one of fxquant's; save with "
                        "torch.save(model) instead")
    return {"cls": _name_of(cls), "kwargs": {k: _encode_value(v, where) for k, v in kwargs.items()}}


def _encode_qconfig(qconfig: Any, where: str) -> Any:
    if qconfig is None:
        return None
    return {"activation": _encode_factory(qconfig.activation, f"{where} activation"),
            "weight": _encode_factory(qconfig.weight, f"{where} weight")}


def _encode_mapping(mapping: Any) -> dict[str, Any]:
    d = mapping.to_dict()
    return {
        "global": _encode_qconfig(d[""], "global qconfig"),
        "object_type": [[_name_of(t), _encode_qconfig(qc, f"object type {t}")] for t, qc in d["object_type"]],
        "module_name_regex": [[r, _encode_qconfig(qc, f"regex {r!r}")] for r, qc in d["module_name_regex"]],
        "module_name": [[n, _encode_qconfig(qc, f"module {n!r}")] for n, qc in d["module_name"]],
        "module_name_object_type_order": [[n, _name_of(t), i, _encode_qconfig(qc, f"module {n!r}")]
                                          for n, t, i, qc in d["module_name_object_type_order"]],
    }


def _input_specs(gm: fx.GraphModule) -> list[list[Any]]:
    specs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None:
            raise SaveError(f"fxquant.save: input '{node.target}' has no recorded shape; pass example_inputs=")
        specs.append([list(meta.shape), str(meta.dtype).removeprefix("torch.")])
    return specs


def save(model: nn.Module, path: Union[str, os.PathLike], *,
         example_inputs: Optional[tuple[torch.Tensor, ...]] = None) -> None:
    """Write a prepared (calibrated or trained) or converted fxquant model as data.

    Args:
        model: from :func:`fxquant.prepare_fx`, :func:`fxquant.prepare_qat_fx` or :func:`fxquant.convert_fx`.
        path: the file to write (``torch.save`` format, loadable with ``weights_only=True``).
        example_inputs: tensors whose shapes and dtypes :func:`load` re-creates for tracing (default: those the
            model was prepared with).

    Raises:
        SaveError: the model is not a whole fxquant GraphModule, its backend table is not a built-in one, or its
            QConfigMapping holds something other than fxquant observers.
    """
    from fxquant.api import STATE_KEY
    from fxquant.backends import BACKENDS, get_backend_config

    state = model.meta.get(STATE_KEY) if isinstance(model, fx.GraphModule) else None
    if state is None or state.stage not in ("prepared", "converted"):
        raise SaveError("fxquant.save expects a model from fxquant.prepare_fx / prepare_qat_fx / convert_fx (a "
                        "partially traced model or a reference model: use torch.save(model))")
    name = state.backend.name
    if name not in BACKENDS or get_backend_config(name) != state.backend:
        raise SaveError(f"fxquant.save: backend '{name}' is a custom table, which cannot be stored as data; "
                        "save with torch.save(model) instead")
    specs = ([[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in example_inputs]
             if example_inputs is not None else _input_specs(model))
    torch.save({"format": FORMAT, "stage": state.stage, "backend": name, "is_qat": bool(state.is_qat),
                "qconfig_mapping": _encode_mapping(state.qconfig_mapping), "inputs": specs,
                "code": model.code, "state_dict": model.state_dict(),
                "pinned_weight_qparams": _pinned(model) if state.stage == "prepared" else {}}, path)


def _pinned(model: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """The weight grids pinned in the node records of a prepared model (AdaRound's), as data, by node name: its
    weights are on those grids, and a grid observed again from the rounded weights would round them again."""
    from fxquant.passes.context import RECORD_KEY

    out = {}
    for node in model.graph.nodes:
        qp = getattr(node.meta.get(RECORD_KEY), "weight_qparams", None)
        if qp is not None:
            out[node.name] = {"scale": qp.scale, "zero_point": qp.zero_point, "dtype": str(qp.dtype).removeprefix("torch."),
                              "qscheme": str(qp.qscheme).removeprefix("torch."), "quant_min": qp.quant_min,
                              "quant_max": qp.quant_max, "axis": qp.axis}
    return out


def _pin(model: fx.GraphModule, pinned: dict[str, dict[str, Any]]) -> None:
    """Put the grids :func:`_pinned` stored back into ``model``'s node records."""
    import dataclasses

    from fxquant.passes.context import RECORD_KEY
    from fxquant.qparams import QParams

    nodes = {n.name: n for n in model.graph.nodes}
    for name, qp in pinned.items():
        node = nodes.get(name)
        if node is None or node.meta.get(RECORD_KEY) is None:
            raise SaveError(f"fxquant.load: the saved model pins the weight grid of node '{name}', which the rebuilt "
                            "graph does not have; load it into the float model it was saved from")
        grid = QParams(qp["scale"], qp["zero_point"], getattr(torch, qp["dtype"]), getattr(torch, qp["qscheme"]),
                       int(qp["quant_min"]), int(qp["quant_max"]), qp["axis"])
        node.meta[RECORD_KEY] = dataclasses.replace(node.meta[RECORD_KEY], weight_qparams=grid)


class _Decoder:
    """Turns the stored names back into objects, looking only in torch, operator, fxquant and the float model."""

    def __init__(self, float_model: nn.Module) -> None:
        import torch.nn.functional as F

        self.types: dict[str, Any] = {}
        for space in (nn, F, torch, operator):
            for attr in dir(space):
                obj = getattr(space, attr, None)
                if isinstance(obj, type) or callable(obj):
                    try:
                        self.types.setdefault(_name_of(obj), obj)
                    except AttributeError:
                        continue
        for module in float_model.modules():
            self.types.setdefault(_name_of(type(module)), type(module))

    def object_type(self, name: str) -> Any:
        if name not in self.types:
            raise SaveError(f"fxquant.load: the saved QConfigMapping names {name}, which is neither in torch nor "
                            "among the float model's modules; pass qconfig_mapping= to load")
        return self.types[name]

    def factory(self, enc: Any) -> Any:
        import fxquant.fake_quantize
        import fxquant.observers
        import fxquant.qat_fake_quantize
        from fxquant.observers import ObserverFactory

        if enc is None:
            return None
        module, _, qualname = enc["cls"].partition(":")
        spaces = {m.__name__: m for m in (fxquant.observers, fxquant.fake_quantize, fxquant.qat_fake_quantize)}
        cls = getattr(spaces.get(module), qualname, None)
        if not isinstance(cls, type):
            raise SaveError(f"fxquant.load: unknown observer class {enc['cls']} (fxquant's observers and fake "
                            "quantizers only)")
        kwargs = {k: self.value(v) for k, v in enc["kwargs"].items()}
        return ObserverFactory(cls, kwargs) if kwargs else cls

    def value(self, enc: Any) -> Any:
        if isinstance(enc, list):
            return tuple(self.value(v) for v in enc)
        if isinstance(enc, dict) and "dtype" in enc:
            return getattr(torch, enc["dtype"])
        if isinstance(enc, dict) and "qscheme" in enc:
            return getattr(torch, enc["qscheme"])
        if isinstance(enc, dict):
            return self.factory(enc)
        return enc

    def qconfig(self, enc: Any) -> Any:
        from fxquant.qconfig import QConfig

        return None if enc is None else QConfig(self.factory(enc["activation"]), weight=self.factory(enc["weight"]))

    def mapping(self, enc: dict[str, Any]) -> Any:
        from fxquant.qconfig import QConfigMapping

        m = QConfigMapping().set_global(self.qconfig(enc["global"]))
        for t, qc in enc["object_type"]:
            m.set_object_type(self.object_type(t), self.qconfig(qc))
        for r, qc in enc["module_name_regex"]:
            m.set_module_name_regex(r, self.qconfig(qc))
        for n, qc in enc["module_name"]:
            m.set_module_name(n, self.qconfig(qc))
        for n, t, i, qc in enc["module_name_object_type_order"]:
            m.set_module_name_object_type_order(n, self.object_type(t), i, self.qconfig(qc))
        return m


def load(path: Union[str, os.PathLike], float_model: Union[nn.Module, Callable[[], nn.Module]], *,
         prepare_custom_config: Any = None, qconfig_mapping: Any = None) -> fx.GraphModule:
    """Rebuild a model written by :func:`save` (``torch.load(weights_only=True)``).

    Args:
        path: the file.
        float_model: the float model (not modified; its weights are not used) or a zero-argument factory for it.
        prepare_custom_config: the non-traceable module configuration used when the model was prepared.
        qconfig_mapping: use this mapping instead of the stored one.

    Returns:
        The prepared or converted GraphModule, with the saved state.

    Raises:
        SaveError: the file is not an fxquant save, or the float model does not rebuild the saved graph.
    """
    import fxquant

    data = torch.load(path, weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SaveError(f"fxquant.load: {os.fspath(path)} is not a file written by fxquant.save ({FORMAT})")
    model = copy.deepcopy(float_model) if isinstance(float_model, nn.Module) else float_model()
    mapping = qconfig_mapping if qconfig_mapping is not None else _Decoder(model).mapping(data["qconfig_mapping"])
    inputs = tuple(torch.randn(shape).to(getattr(torch, dtype)) for shape, dtype in data["inputs"])
    if data["is_qat"]:
        gm = fxquant.prepare_qat_fx(model.train(), mapping, inputs, prepare_custom_config, data["backend"])
    else:
        gm = fxquant.prepare_fx(model.eval(), mapping, inputs, prepare_custom_config, data["backend"])
    if data["stage"] == "converted":  # any data gives the observers qparams; the saved state replaces them
        with torch.no_grad():
            gm(*inputs)
        gm = fxquant.convert_fx(gm)
    if gm.code != data["code"]:
        raise SaveError("fxquant.load: the float model rebuilds another graph than the one saved (a different "
                        "architecture, prepare_custom_config, or a decision that depended on the saved qparams); "
                        "save and load the prepared model instead, or use torch.save(model)")
    gm.load_state_dict(data["state_dict"])
    _pin(gm, data.get("pinned_weight_qparams", {}))
    return gm
