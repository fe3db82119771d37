"""Program backends behind one interface. A backend's module is imported only when chosen."""

from __future__ import annotations

import importlib

from edge_runtime.backends.base import Backend, Program, TensorSpec
from edge_runtime.errors import ConfigError

_MODULES = {
    "executorch": ("edge_runtime.backends.executorch", "ExecuTorchBackend"),
    "litert": ("edge_runtime.backends.litert", "LiteRTBackend"),
}
BACKEND_NAMES = tuple(_MODULES)


def get_backend(name: str, **options) -> Backend:
    """Import and build the backend ``name`` (``executorch`` or ``litert``)."""
    if name not in _MODULES:
        raise ConfigError(f"unknown backend {name!r}; known: {', '.join(_MODULES)}")
    module, cls = _MODULES[name]
    return getattr(importlib.import_module(module), cls)(**options)


FORMAT_OF = {"executorch": "pte", "litert": "tflite"}

__all__ = ["BACKEND_NAMES", "FORMAT_OF", "Backend", "Program", "TensorSpec", "get_backend"]
