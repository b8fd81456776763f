"""``lowband train --elastic``: start, supervise and restart workers; host the store and the quorum.

The driver (this process) owns three things for the whole run:

* a :class:`torch.distributed.TCPStore` server on loopback (``127.0.0.1``, a free port):
  the quorum keys and every process group's rendezvous live in it;
* the :class:`~lowband.elastic.quorum.QuorumService`, polled every 20 ms, which decides each
  outer step's members and whether it commits;
* one single-process job per worker (``python -m lowband.train.elastic_agent``: torchrun's
  launcher API with its stores and the worker's sockets on loopback only), in its own session
  so that it and its worker can be killed together. torchrun's agent stops every worker of a
  job when one dies, so workers are separate jobs and survivors keep running when one exits.

A worker's exit is seen within one poll (its agent notices within 0.1 s): an exit code other
than 0 is a departure; the service fails the quorum in progress at once and forms the next
one without it. ``--rejoin-after S`` restarts a departed worker (same replica id, next
incarnation) S seconds later, unless training has finished; it joins at the next outer step.
Output of each worker goes to ``<run>/<algo>/logs/replica<r>.<incarnation>.log``.

SIGTERM or SIGINT (Ctrl-C) to the driver stops the run: every job gets SIGTERM (its agent stops
its worker, which dies at once), whatever is left of a job after :data:`STOP_GRACE_S` gets SIGKILL,
the jobs' temp folder (their ``TMPDIR``) is removed, the store closes, and the driver ends with
:class:`~lowband.train.launch.Interrupted` ("stopped by signal 15, 3 workers stopped"). Later
signals during that stop are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from lowband.comm import group
from lowband.elastic.quorum import QuorumService, replica_of
from lowband.train.checkpoint import atomic_write_text
from lowband.train.config import TrainConfig
from lowband.train.launch import Interrupted, WorkerFailed
from lowband.train.shutdown import handling

POLL_S = 0.02
STOP_GRACE_S = 3.0  # a stopped job's agent and worker end in well under 1 s; then SIGKILL
AGENT = [sys.executable, "-m", "lowband.train.elastic_agent"]  # one worker, every socket on loopback


class Supervisor:
    """Runs the workers of ``cfg`` as separate torchrun jobs; see the module docstring."""

    def __init__(self, cfg: TrainConfig, algo_dir: Path, config_path: Path,
                 say: Callable[[str], None] = print) -> None:
        self.cfg, self.algo_dir, self.config_path, self.say = cfg, algo_dir, config_path, say
        self.store = group.serve_store()
        self.service = QuorumService(self.store, cfg.min_workers, cfg.elastic_timeout)
        self.procs: dict[str, subprocess.Popen] = {}
        self.respawns: list[tuple[float, int, int]] = []  # (when, replica, incarnation)
        self.exits: dict[str, int] = {}
        self.started = time.monotonic()
        self.signum: int | None = None  # the signal that stops the run, once one came
        self.tmp = ""  # the jobs' temp folder (their TMPDIR), for the run's lifetime

    def spawn(self, replica: int, incarnation: int) -> None:
        token = f"{replica}.{incarnation}"
        env = {**os.environ, "LOWBAND_ELASTIC_STORE": f"127.0.0.1:{self.store.port}",
               "LOWBAND_REPLICA": str(replica), "LOWBAND_INCARNATION": str(incarnation),
               "LOWBAND_ELASTIC_CONFIG": str(self.config_path), "TMPDIR": self.tmp}
        logs = self.algo_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"replica{token}.log").open("w") as out:
            self.procs[token] = subprocess.Popen(AGENT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                 start_new_session=True)
        self.service.spawned(token, starter=incarnation == 0)
        if incarnation:
            self.say(f"{self._t()} replica {replica} restarted (incarnation {incarnation})")

    def run(self) -> dict[str, int]:
        """Supervise until every worker has exited; returns {token: exit code}. Raises
        :class:`~lowband.train.launch.Interrupted` when SIGTERM or SIGINT stopped it (see the module
        docstring). Runs once: the store is closed afterwards."""
        self.tmp = tempfile.mkdtemp(prefix="lowband-elastic-")
        with handling(self._on_signal):
            try:
                for replica in range(self.cfg.workers):
                    if self.signum is None:
                        self.spawn(replica, 0)
                while (self.procs or self.respawns) and self.signum is None:
                    self._reap()
                    self._respawn()
                    self.service.restart_pending = bool(self.respawns)
                    self.service.poll()
                    self._report()
                    if self.service.aborted is not None:
                        raise WorkerFailed(self.service.aborted)
                    time.sleep(POLL_S)
            finally:
                stopped = self.stop()
                shutil.rmtree(self.tmp, ignore_errors=True)
                del self.service, self.store  # the last references: the store's server and its socket close now
        if self.signum is not None:
            err = Interrupted(self.signum, f"{stopped} worker{'s' * (stopped != 1)} stopped")
            raise err
        if not any(code == 0 for code in self.exits.values()):
            raise WorkerFailed(f"no worker finished; see the logs in {self.algo_dir / 'logs'}")
        return self.exits

    def _reap(self) -> None:
        for token, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[token]
            self.exits[token] = code
            self.service.exited(token, code)
            if code == 0:
                continue
            self.say(f"{self._t()} replica {token} left: {self._cause(token, code)}")
            if self.cfg.rejoin_after is not None and not self.service.over:
                replica, incarnation = replica_of(token), int(token.split(".")[1]) + 1
                self.respawns.append((time.monotonic() + self.cfg.rejoin_after, replica, incarnation))

    def _respawn(self) -> None:
        now = time.monotonic()
        for item in [r for r in self.respawns if r[0] <= now]:
            self.respawns.remove(item)
            if not self.service.over:
                self.spawn(item[1], item[2])

    def _report(self) -> None:
        while self.service.events:
            e = self.service.events.pop(0)
            if e["event"] in ("join", "leave"):
                verb = "joined" if e["event"] == "join" else "is out of"
                self.say(f"{self._t()} replica {e['replica']} {verb} the quorum at outer step {e['round']} "
                         f"({e['members']} members)")
            elif e["event"] == "skip":
                why = ", ".join(f"{t} {w}" for t, w in e["why"].items())
                self.say(f"{self._t()} outer step {e['round']} attempt {e['attempt']} not committed ({why}): redone")

    def _cause(self, token: str, code: int) -> str:
        log = self.algo_dir / "logs" / f"replica{token}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        signals = re.findall(r"killed by signal (\d+)", text)  # lowband.train.elastic_agent's line
        if signals:
            return f"killed by signal {signals[-1]}"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line]
        return f"exit code {code}" + (f" ({errors[-1][:200]})" if errors else "")

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signum is None:  # the loop stops within one poll; later signals change nothing
            self.signum = signum

    def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        """Stop every worker still running, its job's process group (torchrun's agent, the worker, the
        agent's resource tracker) together: SIGTERM, then SIGKILL to whatever is left of a group after
        ``grace_s``. Returns how many were running."""
        procs = list(self.procs.values())
        if not procs:
            return 0
        for proc in procs:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            for proc in procs:
                proc.poll()  # reaps the agents that ended
            if not _live_groups({proc.pid for proc in procs}):
                break
            time.sleep(POLL_S)
        for pgid in _live_groups({proc.pid for proc in procs}):
            _signal_group(pgid, signal.SIGKILL)
        for proc in procs:
            proc.wait()
        self.procs.clear()
        return len(procs)

    def _t(self) -> str:
        return f"[{time.monotonic() - self.started:7.1f}s]"


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _live_groups(pgids: set[int]) -> set[int]:
    """Those of ``pgids`` with a process that is not a zombie (from /proc/*/stat)."""
    live: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state ppid pgrp ...
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) in pgids:
            live.add(int(fields[2]))
    return live


def run_elastic(cfg: TrainConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``cfg`` elastically on this machine; returns {token: exit code}. Raises
    :class:`~lowband.train.launch.WorkerFailed` when the quorum aborts or no worker finishes."""
    from lowband.train.data import load_dataset
    from lowband.train.worker import write_run_info

    cfg = dataclasses.replace(cfg, name=cfg.name or time.strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(cfg.out) / str(cfg.name)
    write_run_info(run_dir, cfg, cfg.workers, cfg.network(cfg.workers),
                   load_dataset(cfg.data))
    algo_dir = run_dir / cfg.variants()[0].folder
    algo_dir.mkdir(parents=True, exist_ok=True)
    for stale in ["events.jsonl", *(p.name for p in algo_dir.glob("*rank*.jsonl"))]:
        (algo_dir / stale).unlink(missing_ok=True)
    config_path = run_dir / "elastic_config.json"
    atomic_write_text(config_path, json.dumps(cfg.to_dict()))
    exits = Supervisor(cfg, algo_dir, config_path, say).run()
    from lowband.report.render import show_report

    show_report(run_dir, cfg.target_loss)
    return exits
