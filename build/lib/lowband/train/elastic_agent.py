"""One ``--elastic`` worker's launcher: torchrun's launcher API for a single process, on loopback.

The elastic driver (:mod:`lowband.train.elastic`) starts each worker as its own job, so that a
survivor keeps running when another exits. Each job is ``python -m lowband.train.elastic_agent``:
:func:`lowband.train.launch.launch` with one process, whose rendezvous store, the worker's
shared store and the worker's gloo sockets all listen on ``127.0.0.1`` only. (``torchrun
--standalone``, used before, hosts both stores on every interface.) The worker itself
(:func:`lowband.train.elastic_worker.main`) builds its process groups from the driver's store.

A failure ends the job with exit code 1 and one line on stderr (``lowband elastic worker:
worker rank 0 failed: killed by signal 9``), which the driver reads back from the log. SIGTERM
(the driver stopping the run) kills the worker at once (:func:`lowband.train.shutdown.stop_on_signal`)
and ends the job with 128 + 15 and one line.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from lowband.train.launch import Interrupted, WorkerFailed, launch
from lowband.train.shutdown import stop_on_signal


@record
def run_worker() -> None:
    """The worker process: :func:`lowband.train.elastic_worker.main`, its exit code kept."""
    from lowband.train import elastic_worker

    code = elastic_worker.main()
    if code:
        sys.exit(code)


def main() -> int:
    try:
        with stop_on_signal():
            launch(run_worker, 1)
    except WorkerFailed as err:
        print(f"lowband elastic worker: {err}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as err:
        print(f"lowband elastic worker: {err}", file=sys.stderr, flush=True)
        return 128 + err.sigval
    return 0


if __name__ == "__main__":
    sys.exit(main())
