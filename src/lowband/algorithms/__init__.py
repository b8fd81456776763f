"""How and when workers synchronise. Importing this package registers every algorithm."""

from lowband.algorithms import ddp, diloco  # noqa: F401  (registration)
from lowband.algorithms.base import ALGORITHMS, Algorithm, Options

__all__ = ["ALGORITHMS", "Algorithm", "Options"]
