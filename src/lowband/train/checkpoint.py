"""Exact checkpoint and resume of a training run: every rank's full state, written atomically.

What is saved, per rank, every ``--checkpoint-every`` steps (after that step's metrics row):

* the model's ``state_dict`` and the inner optimizer's (AdamW moments, step counts);
* the lr scheduler's ``state_dict``;
* ``algorithm.state_dict()``: all communication state, i.e. compressor state (PowerSGD's Q,
  DGC momentum), error-feedback residuals, the outer optimizer, global parameters, the
  averages in flight (the algorithm waits for them first: that moves time, not results)
  and its step counters;
* the RNG streams: the batch generator's state (the data position) and torch's global RNG;
* the ledger (every communication record so far, hence the byte counters of the metrics),
  the training step, the metrics clock and the last validation loss;
* the world size.

Resuming from the checkpoint of step s gives bit-identical parameters, losses and bytes at
every later step to the run that never stopped (same world size, CPU, same flags); only the
wall-clock columns (``compute_s``, ``comm_s``, ``time_s`` beyond the saved clock) and the
ledger's ``start``/``end`` times differ.

Another world size (``--resume --workers M`` for a run saved by N workers) works for the
algorithms whose state agrees on every rank apart from the model, the inner optimizer and
the error-feedback residuals (``Algorithm.reshardable``: localsgd, qsr, diloco,
streaming-diloco, delayed-diloco). Rank r of M loads rank (r mod N)'s file, and:

* global model, outer optimizer, counters, fragment schedule, compressor state (PowerSGD's Q
  is the same on every rank) and averages in flight: as saved (every rank had the same);
* model and inner optimizer (AdamW moments): rank r mod N's. Checkpoints taken at an outer
  step have every rank's model equal to the global one; mid-round, a new rank starts from a
  copy of another's local progress;
* error-feedback residuals are dropped (zero): a residual is one rank's untransmitted share,
  and no assignment of N ranks' shares to M ranks keeps both each rank's meaning and the
  sum. At most one round of compression error is lost, once;
* the batch generator is re-seeded from (step, rank, M), so no two ranks replay the same
  batches; the ledger of ranks r < N continues, new ranks start with an empty one; rank 0
  removes the logs of ranks r >= M when the world shrinks.

Other algorithms refuse a different world size with one line (eager-diloco keeps each rank's
own outer gradient; the rest have not been checked at another world size).

Guarantee: a file is written to ``<name>.tmp`` in the same folder, flushed and fsynced,
then renamed over ``<name>`` (``os.replace``, atomic on POSIX), so a worker killed while
writing never leaves a half-written checkpoint under its final name. A checkpoint is
*complete* only once every rank has saved (a barrier, uncharged control traffic) and
rank 0 has atomically rewritten the marker ``checkpoint.json``; resuming reads only the
step the marker names, so a half-finished set of rank files is never loaded.

Integrity: every checkpoint file has a SHA-256 digest beside it (``rank0.pt.sha256``, in
``sha256sum`` format: ``sha256sum -c rank0.pt.sha256`` checks it by hand), written after the
file and before the checkpoint is marked complete. Loading verifies it: a file changed after it
was written (a flipped byte, a truncated copy) is refused with one line naming the file, never
loaded. Checkpoints of a run written since digests exist (``"sha256": true`` in the marker) must
have one; a lone ``.pt`` file (``--init-from model.pt``) is verified when its digest is beside it.

Layout, per algorithm folder of a run::

    runs/<name>/<algo folder>/checkpoint.json           {"step": 6, "world_size": 2, "folder": "checkpoints/step6",
                                                         "sha256": true}
    runs/<name>/<algo folder>/checkpoints/step3/rank0.pt
    runs/<name>/<algo folder>/checkpoints/step3/rank0.pt.sha256
    runs/<name>/<algo folder>/checkpoints/step6/rank0.pt ...

The newest :data:`KEEP` complete checkpoints are kept; rank 0 deletes older ones (and
leftovers of a crashed run) after writing the marker.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

    from lowband.algorithms.base import Algorithm

KEEP = 2  # complete checkpoints kept per algorithm folder
MARKER = "checkpoint.json"
# config fields that do not change what a run measures: a resumed run may change them freely,
# and a finished sweep unit stays done whatever they are
RUN_CONTROL = frozenset({"resume", "checkpoint_every", "progress", "out", "name", "target_loss"})


# -- atomic files ---------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """``write(file)`` into ``<path>.tmp``, fsync, rename over ``path``; the temp file is removed on error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save(state)`` to ``path`` atomically (the old file, if any, or the new one, never half),
    then its SHA-256 digest to ``<path>.sha256`` (:func:`digest_file`)."""
    path = Path(path)
    _atomic_write(path, lambda f: torch.save(state, f))
    atomic_write_text(digest_file(path), f"{sha256(path)}  {path.name}\n")


def digest_file(path: Path) -> Path:
    """Where the SHA-256 digest of checkpoint ``path`` lives: ``<path>.sha256``."""
    return path.with_name(path.name + ".sha256")


def sha256(path: Path) -> str:
    """The hex SHA-256 of the file at ``path`` (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, required: bool = False) -> None:
    """Refuse ``path`` unless it matches its digest; a missing digest is refused only when ``required``."""
    path = Path(path)
    digest = digest_file(path)
    if not digest.is_file():
        if required:
            raise ValueError(f"checkpoint {path} has no digest ({digest.name} is missing): the checkpoint is "
                             "incomplete or was tampered with; resume from a complete copy of the run folder")
        return
    expected = digest.read_text().split(maxsplit=1)[0] if digest.stat().st_size else ""
    if sha256(path) != expected:
        raise ValueError(f"checkpoint {path} fails its SHA-256 check: it changed after it was written (a corrupt "
                         "copy or disk?); restore it from a copy of the run folder, or train anew with another --name")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (run.json, the checkpoint marker)."""
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def load_checkpoint(path: Path, require_digest: bool = False) -> dict[str, Any]:
    """The state saved at ``path``; a missing, unreadable or altered file (:func:`verify`) raises one
    line naming it. ``require_digest``: refuse a file without its digest too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    verify(path, require_digest)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        # the first sentence: torch's weights-only refusal goes on to advise weights_only=False, wrong here
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise ValueError(f"checkpoint {path} is corrupt or incomplete: {type(err).__name__}: {cause}; give a "
                         "checkpoint lowband wrote (--checkpoint-every), or restore the file from a copy") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} is corrupt or incomplete: holds a {type(state).__name__}, not a dict")
    return state


def model_file(path: str | Path) -> Path:
    """The file ``--init-from PATH`` loads: PATH itself, or for an algorithm folder (``runs/<name>/ddp``)
    rank 0's file of its last complete checkpoint. Raises one line naming the path."""
    path = Path(path).expanduser()
    if path.is_dir():
        step = last_complete_step(path)
        if step is None:
            raise ValueError(f"--init-from {path}: no complete checkpoint in this folder (train with "
                             "--checkpoint-every, then give its algorithm folder, e.g. runs/<name>/ddp, or a .pt file)")
        path = rank_file(path, step, 0)
    if not path.is_file():
        raise ValueError(f"--init-from {path}: no such file or folder")
    return path


def init_state(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The file ``--init-from PATH`` loads (:func:`model_file`) and the model state it holds (a checkpoint's
    ``model``, or a bare state_dict), verified as :func:`load_checkpoint` does (a folder's checkpoints must
    have their digest when its marker says they do). Raises one line naming the file."""
    file = model_file(path)
    folder = Path(path).expanduser()
    state = load_checkpoint(file, require_digest=folder.is_dir() and digests_required(folder))
    return file, state.get("model", state)


def load_model_into(model: nn.Module, path: str | Path) -> None:
    """Load the model saved at ``path`` (a checkpoint's ``model``, or a bare state_dict) into ``model``."""
    file, state = init_state(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"--init-from {file}: the saved model does not fit this one ({first}); give the same "
                         "--model and --data it was trained with") from None


# -- the layout -----------------------------------------------------------------------------
def step_folder(algo_dir: Path, step: int) -> Path:
    return algo_dir / "checkpoints" / f"step{step}"


def rank_file(algo_dir: Path, step: int, rank: int) -> Path:
    return step_folder(algo_dir, step) / f"rank{rank}.pt"


def last_complete_step(algo_dir: Path) -> int | None:
    """The step of the newest complete checkpoint of ``algo_dir`` (its marker), or None."""
    marker = algo_dir / MARKER
    if not marker.is_file():
        return None
    try:
        return int(json.loads(marker.read_text())["step"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"checkpoint marker {marker} is unreadable: {err}") from None


def digests_required(algo_dir: Path) -> bool:
    """Whether the marker of ``algo_dir`` says its checkpoints carry digests (runs since they exist)."""
    try:
        return bool(json.loads((algo_dir / MARKER).read_text()).get("sha256", False))
    except (OSError, ValueError, AttributeError):
        return False


def _prune(algo_dir: Path, step: int) -> None:
    """Keep the newest :data:`KEEP` checkpoints up to ``step``; delete the rest (rank 0)."""
    root = algo_dir / "checkpoints"
    steps = sorted(int(p.name[4:]) for p in root.glob("step*") if p.name[4:].isdigit())
    keep = [s for s in steps if s <= step][-KEEP:]
    for s in steps:
        if s not in keep:
            shutil.rmtree(step_folder(algo_dir, s), ignore_errors=True)


# -- one rank's training state --------------------------------------------------------------
@dataclass
class Resumed:
    """Where the training loop continues after :meth:`RunCheckpoint.restore`."""

    step: int
    clock: float
    val_loss: float


class RunCheckpoint:
    """Saves and restores everything one rank's training loop needs to continue exactly.

    Example (what :func:`lowband.train.loop.train_one` does)::

        ckpt = RunCheckpoint(algo_dir, model, algo, scheduler, generator)
        resumed = ckpt.restore() if cfg.resume else None
        ...
        ckpt.save(step, clock, val_loss)  # collective: every rank calls it at the same step
    """

    def __init__(self, algo_dir: Path, model: nn.Module, algo: Algorithm,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator) -> None:
        self.algo_dir, self.model, self.algo = Path(algo_dir), model, algo
        self.scheduler, self.generator, self.comm = scheduler, generator, algo.comm

    def save(self, step: int, clock: float, val_loss: float) -> None:
        """Write this rank's state for ``step``; rank 0 marks it complete once every rank has.

        Collective: every rank must call it at the same step."""
        algo_state = self.algo.state_dict()  # waits for averages in flight: their records land in the ledger
        self.comm.barrier()  # runs after every op queued before it on the comm thread: the ledger is final
        state = {
            "step": step, "world_size": self.comm.world_size, "clock": clock, "val_loss": val_loss,
            "model": self.model.state_dict(), "optimizer": self.algo.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "algorithm": algo_state,
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "ledger": self.comm.ledger.state_dict(),
        }
        save_checkpoint(rank_file(self.algo_dir, step, self.comm.rank), state)
        self.comm.barrier()  # every rank's file is in place
        if self.comm.rank == 0:
            marker = {"step": step, "world_size": self.comm.world_size,
                      "folder": str(step_folder(self.algo_dir, step).relative_to(self.algo_dir)), "sha256": True}
            atomic_write_text(self.algo_dir / MARKER, json.dumps(marker))
            _prune(self.algo_dir, step)

    def restore(self) -> Resumed | None:
        """Load the last complete checkpoint of this algorithm folder, or None if there is none."""
        step = last_complete_step(self.algo_dir)
        if step is None:
            return None
        saved_world = int(json.loads((self.algo_dir / MARKER).read_text()).get("world_size", self.comm.world_size))
        rank, world = self.comm.rank, self.comm.world_size
        if saved_world != world and not self.algo.reshardable:
            raise ValueError(f"checkpoint of {self.algo_dir} was written by {saved_world} workers, this run has "
                             f"{world}: {self.algo.name} resumes only at the same world size")
        state = load_checkpoint(rank_file(self.algo_dir, step, rank % saved_world),
                                require_digest=digests_required(self.algo_dir))
        self.model.load_state_dict(state["model"])
        self.algo.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        algorithm = state["algorithm"]
        if saved_world != world:  # re-shard: see "Another world size" in the module docstring
            algorithm = {**algorithm, **{k: v for k, v in self.algo.state_dict().items() if k == "feedback"}}
        self.algo.load_state_dict(algorithm)
        torch.set_rng_state(state["torch_rng"])
        if saved_world == world:
            self.generator.set_state(state["generator"])
            self.comm.ledger.load_state_dict(state["ledger"])
        else:
            self.generator.manual_seed(reshard_seed(step, rank, world))
            if rank < saved_world:  # this rank's own byte history; a new rank starts from none
                self.comm.ledger.load_state_dict(state["ledger"])
            if rank == 0:
                _drop_rank_logs(self.algo_dir, world)
        return Resumed(int(state["step"]), float(state["clock"]), float(state.get("val_loss", math.nan)))


def reshard_seed(step: int, rank: int, world_size: int) -> int:
    """The batch generator's seed of ``rank`` after a resume at another world size."""
    return (1_000_003 * step + 7_919 * rank + world_size) % (2**63)


def _drop_rank_logs(algo_dir: Path, world_size: int) -> None:
    """Remove the metrics and ledger files of ranks a smaller world no longer has."""
    for path in [*algo_dir.glob("rank*.jsonl"), *algo_dir.glob("ledger_rank*.jsonl")]:
        digits = path.stem.rpartition("rank")[2]
        if digits.isdigit() and int(digits) >= world_size:
            path.unlink()


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the JSONL rows of ``path`` up to ``step`` (and nothing after a torn line), atomically.

    Rows an interrupted run wrote after its last checkpoint are dropped, so the resumed run's
    file ends up exactly as an uninterrupted run's."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            break  # a row torn by a kill: nothing after it is kept
        if not line.endswith("\n") or int(row.get("step", 0)) > step:
            break
        kept.append(line)
    atomic_write_text(path, "".join(kept))


# -- may this run folder be resumed with this config? ---------------------------------------
def flag_name(field: str) -> str:
    """The command-line flag of a :class:`~lowband.train.config.TrainConfig` field."""
    return {"algos": "--algo", "nesterov": "--no-nesterov"}.get(field, "--" + field.replace("_", "-"))


def resume_mismatch(run_dir: Path, config: dict[str, Any]) -> list[str]:
    """The flags whose values differ between ``config`` and the run folder's ``run.json``
    (run-control fields such as ``--out`` or ``--checkpoint-every`` aside); [] when there is
    no ``run.json`` yet (nothing to resume: the run starts fresh)."""
    info = run_dir / "run.json"
    if not info.is_file():
        return []
    try:
        saved = json.loads(info.read_text())["config"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot resume: {info} is unreadable: {err}") from None
    current = json.loads(json.dumps(config))  # tuples as lists, as run.json has them
    return [flag_name(k) for k, v in current.items()
            if k not in RUN_CONTROL and k in saved and saved[k] != v]
