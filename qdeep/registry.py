"""One name -> one part (as timm's model registry): parts, architectures and model kinds are
chosen by name from the CLI or a saved file, and a plugin module (`load_plugins`, --plugin MODULE)
registers more with the same decorator. Bottom layer, so that every package can keep a registry."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from qdeep.errors import QdeepError

T = TypeVar("T")


class Registry(Generic[T]):
    """``register(name)`` decorates (or is called on) a part; ``get(name)`` returns it, or one
    QdeepError line listing the known names and ``hint`` (how to get more)."""

    def __init__(self, kind: str, hint: str = "a plugin module registers more with --plugin MODULE"):
        self.kind, self.hint, self._parts = kind, hint, {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(part: T) -> T:
            if name in self._parts and self._parts[name] is not part:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._parts[name] = part
            part.name = name
            return part

        return add

    def get(self, name: str) -> T:
        if name not in self:
            raise QdeepError(f"unknown {self.kind} {name!r} (known: {', '.join(self.names())}; {self.hint})")
        return self._parts[name]

    def names(self) -> list[str]:
        return sorted(self._parts)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._parts


def load_plugins(modules) -> None:
    """Import modules that register parts. Workers import them too (the name travels in the config)."""
    for module in modules or ():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise QdeepError(f"cannot import plugin module {module!r}: {exc}") from None
