"""``torchrun --standalone --nproc-per-node N -m lowband.train [flags]``: one worker per process.

The same flags as ``lowband train``; under torchrun the worker count comes from torchrun.
"""

from __future__ import annotations

import sys

from lowband.train.config import config_from_args
from lowband.train.worker import main as worker_main


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv, prog="torchrun ... -m lowband.train")
    worker_main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
