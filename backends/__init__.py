"""Backend tables: what each backend can quantize, how, and which kernel runs it.

Example:
    >>> from fxquant.backends import get_backend_config, BACKENDS
    >>> sorted(BACKENDS)
    ['fbgemm', 'qnnpack', 'x86']
    >>> get_backend_config("qnnpack").entry("conv2d").constraints.weight_range
    (-127, 127)
"""

from __future__ import annotations

import functools
from typing import Callable, Union

from fxquant.backends.config import (BackendConfig, Constraints, DTypeConfig, Observation, OpEntry, OpKind,
                                     QSpec, WeightRule)

__all__ = [
    "BACKENDS",
    "get_backend_config",
    "resolve_backend",
    "BackendConfig",
    "Constraints",
    "DTypeConfig",
    "Observation",
    "OpEntry",
    "OpKind",
    "QSpec",
    "WeightRule",
]


def _fbgemm() -> BackendConfig:
    from fxquant.backends.fbgemm import make_fbgemm_config
    return make_fbgemm_config()


def _x86() -> BackendConfig:
    from fxquant.backends.x86 import make_x86_config
    return make_x86_config()


def _qnnpack() -> BackendConfig:
    from fxquant.backends.qnnpack import make_qnnpack_config
    return make_qnnpack_config()


#: the built-in backends, by name (factories: tables are built on first use)
BACKENDS: dict[str, Callable[[], BackendConfig]] = {"fbgemm": _fbgemm, "x86": _x86, "qnnpack": _qnnpack}


@functools.lru_cache(maxsize=None)
def get_backend_config(name: str) -> BackendConfig:
    """The built-in table called ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; use one of {sorted(BACKENDS)} "
                         "or pass your own fxquant.backends.BackendConfig as backend_config=")
    return BACKENDS[name]()


def resolve_backend(backend: Union[str, BackendConfig, None], default: str = "x86") -> BackendConfig:
    """A BackendConfig from a name, a config, or ``None`` (the default backend)."""
    if backend is None:
        return get_backend_config(default)
    if isinstance(backend, BackendConfig):
        return backend
    if isinstance(backend, str):
        return get_backend_config(backend)
    raise TypeError(f"backend_config must be a backend name or a BackendConfig, got {type(backend).__name__}")
