"""A tiny name -> factory registry, shared by compressors, feedback and algorithms.

The CLI and configs resolve names through a registry, never through if/elif chains::

    ALGORITHMS = Registry[type[Algorithm]]("algorithm")

    @ALGORITHMS.register("diloco")
    class DiLoCo(Algorithm): ...

    ALGORITHMS.get("diloco")      # -> DiLoCo
    ALGORITHMS.get("dilco")       # ValueError: unknown algorithm 'dilco'; choose one of: ddp, diloco
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps short names to objects (usually classes); lookups fail with the valid names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a name can be registered once."""

        def decorate(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_submodules(package: str, path: list[str]) -> None:
    """Import every module of a package so that each registers itself (one algorithm per file).

    Called from a package's ``__init__``: ``import_submodules(__name__, __path__)``.
    """
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")
