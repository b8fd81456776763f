"""lowband: train deep networks across many workers over slow links.

The public API (docs/api.md), loaded on first use so that ``import lowband`` stays light:
``lowband.init``, ``lowband.wrap``, ``lowband.ddp_hook``, ``lowband.ledger``, ``lowband.save``,
``lowband.load`` and ``lowband.Runtime`` (:mod:`lowband.api`); the registries' packages
``lowband.compress``, ``lowband.feedback`` and ``lowband.algorithms`` (``lowband.compress.PowerSGD``).
"""

from __future__ import annotations

import importlib
from typing import Any

from lowband.version import __version__
API = ("init", "wrap", "ddp_hook", "ledger", "save", "load", "Runtime")
PACKAGES = ("compress", "feedback", "algorithms")
__all__ = [*API, *PACKAGES, "__version__"]


def __getattr__(name: str) -> Any:
    if name in API:
        return getattr(importlib.import_module("lowband.api"), name)
    if name in PACKAGES:
        return importlib.import_module(f"lowband.{name}")
    raise AttributeError(f"module 'lowband' has no attribute {name!r}")
