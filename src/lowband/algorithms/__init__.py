"""How and when workers synchronise. Every module of this package registers itself in ALGORITHMS."""

from lowband.algorithms.base import ALGORITHMS, Algorithm, Options, SyncOptions
from lowband.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["ALGORITHMS", "Algorithm", "Options", "SyncOptions"]
