"""``torchrun --standalone --nproc-per-node N -m lowband.train [flags]``: one worker per process.

The same flags as ``lowband train``; under torchrun the worker count comes from torchrun. With
``--device cuda`` (or ``auto`` on a machine with a GPU per local worker) each process takes GPU
``LOCAL_RANK`` and NCCL; a bad flag, or ``--device cuda`` without CUDA, stops every process with
one line before training (:mod:`lowband.train.precision`, :func:`lowband.devices.resolve_device`).
"""

from __future__ import annotations

import sys

from lowband.train.flags import config_from_args
from lowband.train.worker import main as worker_main


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv, prog="torchrun ... -m lowband.train")
    if cfg.elastic:
        raise SystemExit("--elastic is for `lowband train`: it starts, supervises and restarts the workers "
                         "(each its own torchrun job); drop --elastic under torchrun")
    worker_main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
