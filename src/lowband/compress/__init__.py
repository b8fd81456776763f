"""What a tensor becomes on the wire. Pure: no process group inside.

Every module of this package is imported here and registers its compressors in
``COMPRESSORS`` (one family per file); see :mod:`lowband.compress.base` for the contract.
"""

from typing import Any

from lowband.compress.base import COMPRESSORS, Compressor, CompressorOptions, Payload, build, parse_spec
from lowband.registry import class_named, import_submodules

import_submodules(__name__, __path__)

__all__ = ["COMPRESSORS", "Compressor", "CompressorOptions", "Payload", "build", "paper_feedback", "parse_spec"]


def paper_feedback(compress: str) -> str:
    """The error feedback the compressor spec ``compress`` declares (``Compressor.paper_feedback``): what
    ``--feedback default`` and the public API give a compressor chosen without one."""
    return parse_spec(compress, COMPRESSORS)[0].paper_feedback


def __getattr__(name: str) -> Any:
    """Every registered class by its class name: ``lowband.compress.PowerSGD``."""
    return class_named(COMPRESSORS, name)
