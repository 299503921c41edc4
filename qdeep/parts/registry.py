"""Plugin modules: imported by name, they register parts in the registries (qdeep.registry)."""

from __future__ import annotations

import importlib

from qdeep.errors import QdeepError
from qdeep.registry import Registry

__all__ = ["Registry", "load_plugins"]


def load_plugins(modules) -> None:
    """Import modules that register parts. Workers import them too (the name travels in the config)."""
    for module in modules or ():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise QdeepError(f"cannot import plugin module {module!r}: {exc}") from None
