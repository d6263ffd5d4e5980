"""Symbolic tracing with user-chosen leaves and errors that name the module whose code failed.

Example:
    >>> import torch
    >>> from fxquant.tracer import trace
    >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Iterable, Optional

from torch import fx, nn

from fxquant.errors import TraceError

__all__ = ["PrepareCustomConfig", "QuantTracer", "trace"]


@dataclasses.dataclass
class PrepareCustomConfig:
    """Options of ``prepare_fx`` beyond the qconfig mapping (torch.ao-compatible setters).

    Attributes:
        non_traceable_module_names: qualified names of submodules kept as leaves (not traced into).
        non_traceable_module_classes: module classes kept as leaves.

    Example:
        >>> cfg = PrepareCustomConfig().set_non_traceable_module_names(["backbone.head"])
    """

    non_traceable_module_names: list[str] = dataclasses.field(default_factory=list)
    non_traceable_module_classes: list[type] = dataclasses.field(default_factory=list)

    def set_non_traceable_module_names(self, names: Iterable[str]) -> "PrepareCustomConfig":
        self.non_traceable_module_names = list(names)
        return self

    def set_non_traceable_module_classes(self, classes: Iterable[type]) -> "PrepareCustomConfig":
        self.non_traceable_module_classes = list(classes)
        return self

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "PrepareCustomConfig":
        """From torch.ao's dict form (``{"non_traceable_module_name": [...], ...}``)."""
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        known = {"non_traceable_module_name", "non_traceable_module_class"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"prepare_custom_config has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(list(d.get("non_traceable_module_name", [])), list(d.get("non_traceable_module_class", [])))


class QuantTracer(fx.Tracer):
    """A ``torch.fx`` tracer that keeps torch.nn modules, fxquant's own modules and the user's non-traceable
    modules as leaves, and remembers which module it was tracing when user code failed."""

    def __init__(self, config: Optional[PrepareCustomConfig] = None) -> None:
        super().__init__()
        self.config = config or PrepareCustomConfig()
        self._skip_names = set(self.config.non_traceable_module_names)
        self._skip_classes = tuple(self.config.non_traceable_module_classes)
        self.failing_stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._skip_names or (self._skip_classes and isinstance(m, self._skip_classes)):
            return True
        if type(m).__module__.startswith("fxquant."):
            return not getattr(m, "_fxquant_traceable", False)
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        name = self.path_of_module(m)
        self.failing_stack.append(name)
        result = super().call_module(m, forward, args, kwargs)
        self.failing_stack.pop()
        return result


def trace(model: nn.Module, config: Optional[PrepareCustomConfig] = None,
          concrete_args: Optional[dict[str, Any]] = None,
          graph_module_class: type[fx.GraphModule] = fx.GraphModule) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule, or raise :class:`TraceError` naming the failing submodule.

    Args:
        model: the float model (not modified).
        config: leaves to keep untraced.
        concrete_args: forward arguments fixed to constants while tracing (torch.fx's ``concrete_args``).
        graph_module_class: the GraphModule class to build (prepare builds its final class at once: wrapping
            the result later would compile the whole graph's code once more).

    Returns:
        The ``GraphModule``.
    """
    tracer = QuantTracer(config)
    names = {name for name, _ in model.named_modules()}
    unknown = [n for n in tracer.config.non_traceable_module_names if n not in names]
    if unknown:
        warnings.warn(f"non_traceable_module_name {unknown} matches no submodule of {type(model).__name__} (it has "
                      f"{sorted(n for n in names if n)[:5]}...); check the qualified names", stacklevel=3)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # noqa: BLE001 - any failure inside user code becomes a TraceError
        where = tracer.failing_stack[-1] if tracer.failing_stack else ""
        cls = type(model.get_submodule(where)).__name__ if where else type(model).__name__
        shown = f"submodule '{where}' ({cls})" if where else f"the top-level forward of {cls}"
        hint = (f"set_non_traceable_module_names(['{where}']) in a PrepareCustomConfig "
                f"(or prepare_custom_config={{'non_traceable_module_name': ['{where}']}})" if where else
                "make the forward traceable (no data-dependent control flow on tensors) or move the "
                "untraceable part into a submodule and mark it non-traceable")
        raise TraceError(f"torch.fx could not trace {shown}: {type(exc).__name__}: {exc}. "
                         f"To keep it float and trace the rest, {hint}.", where, f"{type(exc).__name__}: {exc}") from exc
    return graph_module_class(model, graph, class_name=type(model).__name__)
