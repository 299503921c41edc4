"""One name -> one part (as timm's model registry): parts are chosen by name from the CLI or a
config, and a plugin module registers new ones with the same decorator."""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from qdeep.errors import QdeepError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind, self._parts = kind, {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(part: T) -> T:
            if name in self._parts and self._parts[name] is not part:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._parts[name] = part
            part.name = name
            return part

        return add

    def get(self, name: str) -> T:
        if name not in self._parts:
            raise QdeepError(f"unknown {self.kind} {name!r} (known: {', '.join(self.names())}; "
                             "a plugin module registers more with --plugin MODULE)")
        return self._parts[name]

    def names(self) -> list[str]:
        return sorted(self._parts)

    def __contains__(self, name: str) -> bool:
        return name in self._parts


def load_plugins(modules) -> None:
    """Import modules that register parts. Workers import them too (the name travels in the config)."""
    for module in modules or ():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise QdeepError(f"cannot import plugin module {module!r}: {exc}") from None
