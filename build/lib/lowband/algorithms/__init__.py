"""How and when workers synchronise. Every module of this package registers itself in ALGORITHMS."""

from typing import Any

from lowband.algorithms.base import ALGORITHMS, Algorithm, Options, SyncOptions
from lowband.registry import class_named, import_submodules

import_submodules(__name__, __path__)

__all__ = ["ALGORITHMS", "Algorithm", "Options", "SyncOptions"]


def __getattr__(name: str) -> Any:
    """Every registered class by its class name: ``lowband.algorithms.DiLoCo``."""
    return class_named(ALGORITHMS, name)
