"""``lowband bench``: a sweep spec, its units, and the resumable runner.

A sweep is the product of tasks (model, data), worker counts, networks, seeds and entries
(a lowband algorithm with its compressor and feedback, or a peer: another library's
implementation on the same task). Every (task, workers, network, seed, entry) is one
*unit*: a real multi-process run written to its own run folder,

    <out>/<name>/<model>-<data>-w<workers>-<bandwidth>-<latency>-s<seed>/<entry>/

A unit whose folder holds ``done.json`` with the same configuration is not run again, so an
interrupted sweep continues where it stopped; a unit that fails is logged and the sweep goes
on (its partial folder is replaced on the next attempt). Each unit's output goes to its
``train.log``; the terminal shows one progress bar over the sweep with an ETA.

The spec is TOML (``lowband bench sweep.toml``; ``lowband bench --print-spec`` prints the
default) or flags; see ``docs/bench.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

from lowband.net.link import Network
from lowband.train.checkpoint import RUN_CONTROL
from lowband.train.config import DEFAULT, TrainConfig, Variant

DEFAULT_SPEC = """\
# lowband bench: the default sweep (about 20 minutes on 2 cores). Copy, edit, run: lowband bench my.toml
name = "default"
workers = [2]
seeds = [0, 1]
steps = 80
# target_loss = 2.6   # default: ddp's validation loss at half its steps (the largest over seeds)

[[task]]
model = "gpt"
data = "shakespeare"

[[network]]
bandwidth = "100mbit"
latency = "20ms"

[[network]]
bandwidth = "10mbit"
latency = "50ms"

[[entry]]
algo = "ddp"

[[entry]]
algo = "ddp"
compress = "powersgd:rank=2,start_iter=2"  # as torch-powersgd runs it (rank 2, 2 raw steps)
feedback = "ef"

[[entry]]
algo = "diloco"

[[entry]]
algo = "streaming-diloco"

[[entry]]
peer = "torch-powersgd"

[[entry]]
peer = "torchft-diloco"

[train]  # any other `lowband train` option, by its field name
eval_every = 20
eval_batches = 4
"""

SPEC_KEYS = ("name", "workers", "seeds", "steps", "target_loss", "task", "network", "entry", "train")
FIXED = {"algos", "compress", "feedback", "model", "data", "workers", "steps", "bandwidth", "latency", "seed",
         "target_loss", "out", "name", "progress", "resume", "elastic"}  # set by the sweep, not by [train]


class SpecError(ValueError):
    """A sweep spec is invalid; the message is one line naming the fix."""


@dataclass(frozen=True)
class Entry:
    """One compared method: a lowband ``algo`` (with ``compress``/``feedback``) or a ``peer``."""

    algo: str | None = None
    compress: str = DEFAULT
    feedback: str = DEFAULT
    peer: str | None = None

    def __post_init__(self) -> None:
        if (self.algo is None) == (self.peer is None):
            raise SpecError("each [[entry]] needs exactly one of algo = '...' or peer = '...'")
        if self.peer is not None:
            from lowband.bench.peers import PEERS

            PEERS.get(self.peer)  # raises naming the known peers
            if (self.compress, self.feedback) != (DEFAULT, DEFAULT):
                raise SpecError(f"peer {self.peer!r} takes no compress/feedback (they are lowband options)")

    @property
    def label(self) -> str:
        return self.peer if self.peer is not None else Variant(str(self.algo), self.compress, self.feedback).label

    @property
    def folder(self) -> str:
        return folder_name(self.label)


@dataclass(frozen=True)
class Unit:
    """One run of the sweep: an entry on one task, worker count, network and seed."""

    entry: Entry
    config: TrainConfig  # out = the cell folder, name = the entry's folder

    @property
    def cell(self) -> str:
        c = self.config
        return f"{c.model}-{Path(c.data).stem}-w{c.workers}-{c.bandwidth}-{c.latency}-s{c.seed}"

    @property
    def folder(self) -> Path:
        return Path(self.config.out) / str(self.config.name)

    def done(self) -> bool:
        """Finished before with this very configuration."""
        marker = self.folder / "done.json"
        if not marker.is_file():
            return False
        try:
            config = json.loads(marker.read_text()).get("config")
        except ValueError:
            return False
        if not isinstance(config, dict):
            return False
        current = _measured(_jsonable(self.config.to_dict()))
        # a field added since the unit ran (device, precision) counts as its default then
        return _measured({**_defaults(current), **config}) == current


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep; ``units(out)`` lists its runs in spec order (task, workers, network, seed, entry)."""

    name: str = "default"
    tasks: tuple[tuple[str, str], ...] = (("gpt", "shakespeare"),)
    workers: tuple[int, ...] = (2,)
    networks: tuple[tuple[str, str], ...] = (("100mbit", "20ms"),)
    entries: tuple[Entry, ...] = (Entry("ddp"),)
    seeds: tuple[int, ...] = (0,)
    steps: int = 100
    target_loss: float | None = None
    train: tuple[tuple[str, Any], ...] = field(default_factory=tuple)  # extra TrainConfig fields

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise SpecError(f"name must be a non-empty folder name, got {self.name!r}")
        for what, values in (("task", self.tasks), ("workers", self.workers), ("network", self.networks),
                              ("entry", self.entries), ("seeds", self.seeds)):
            if not values:
                raise SpecError(f"the sweep needs at least one {what}")
        labels = [e.label for e in self.entries]
        if len(set(labels)) != len(labels):
            raise SpecError(f"entries repeat: {', '.join(sorted({x for x in labels if labels.count(x) > 1}))}")
        known = {f.name for f in dataclasses.fields(TrainConfig)} - FIXED
        unknown = sorted(k for k, _ in self.train if k not in known)
        if unknown:
            raise SpecError(f"[train] has unknown option(s) {', '.join(unknown)}; choose from: {', '.join(sorted(known))}")
        for bandwidth, latency in self.networks:
            Network.parse(bandwidth, latency, 1)  # raises naming the unit
        self.units(Path("."))  # every unit's TrainConfig validates (algorithms, options, ranges)

    @classmethod
    def from_toml(cls, text: str, source: str = "spec") -> "SweepSpec":
        return cls.from_dict(parse_toml(text, source), source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "spec") -> "SweepSpec":
        unknown = sorted(set(data) - set(SPEC_KEYS))
        if unknown:
            raise SpecError(f"{source}: unknown key(s) {', '.join(unknown)}; the keys are: {', '.join(SPEC_KEYS)}")
        for key in ("task", "network", "entry", "train"):  # tables, not values: `task = [1]` is not a task
            value, table = data.get(key), "a [train] table" if key == "train" else f"[[{key}]] tables"
            if key in data and not (isinstance(value, dict) if key == "train" else
                    isinstance(value, list) and all(isinstance(v, dict) for v in value)):
                raise SpecError(f"{source}: {key} = {value!r} is not written as {table} of key = value "
                                "lines; lowband bench --print-spec shows the format")
        try:
            entries = tuple(Entry(**e) for e in data.get("entry", [{"algo": "ddp"}]))
            return cls(
                name=str(data.get("name", "default")),
                tasks=tuple((t.get("model", "gpt"), t.get("data", "shakespeare")) for t in data.get("task", [{}])),
                workers=tuple(int(w) for w in _list(data.get("workers", [2]))),
                networks=tuple((n["bandwidth"], n.get("latency", "0ms")) for n in data.get("network", [])),
                entries=entries,
                seeds=tuple(int(s) for s in _list(data.get("seeds", [0]))),
                steps=int(data.get("steps", 100)),
                target_loss=data.get("target_loss"),
                train=tuple(sorted(dict(data.get("train", {})).items())),
            )
        except TypeError as err:  # an unknown field in [[entry]], [[task]] ...
            raise SpecError(f"{source}: {err}; entries take algo, compress, feedback or peer") from None
        except KeyError as err:
            raise SpecError(f"{source}: every [[network]] needs {err.args[0]} = '...'") from None

    def units(self, out: Path) -> list[Unit]:
        found = []
        for (model, data), workers, (bandwidth, latency), seed in _product(self.tasks, self.workers,
                                                                           self.networks, self.seeds):
            for entry in self.entries:
                probe = self._config(entry, model, data, workers, bandwidth, latency, seed, out, "")
                unit = Unit(entry, probe)
                found.append(Unit(entry, dataclasses.replace(probe, out=str(out / self.name / unit.cell),
                                                             name=entry.folder)))
        return found

    def _config(self, entry: Entry, model: str, data: str, workers: int, bandwidth: str, latency: str,
                seed: int, out: Path, name: str) -> TrainConfig:
        try:
            return TrainConfig(
                algos=(entry.algo or "ddp",), compress=(entry.compress,), feedback=(entry.feedback,),
                model=model, data=data, workers=workers, steps=self.steps, bandwidth=bandwidth, latency=latency,
                seed=seed, target_loss=self.target_loss, out=str(out), name=name or None, progress=False,
                **dict(self.train))
        except (ValueError, KeyError, TypeError) as err:
            raise SpecError(f"entry {entry.label!r}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tasks": [list(t) for t in self.tasks], "workers": list(self.workers),
                "networks": [list(n) for n in self.networks], "seeds": list(self.seeds), "steps": self.steps,
                "target_loss": self.target_loss, "train": dict(self.train),
                "entries": [dataclasses.asdict(e) | {"label": e.label} for e in self.entries]}


def parse_toml(text: str, source: str = "spec") -> dict[str, Any]:
    """The raw spec dict of a TOML text (what :meth:`SweepSpec.from_dict` takes)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{source} is not valid TOML: {err}") from None


# -- running ------------------------------------------------------------------------------


@dataclass
class SweepResult:
    ran: list[Unit] = field(default_factory=list)
    skipped: list[Unit] = field(default_factory=list)  # finished earlier
    unavailable: list[tuple[Unit, str]] = field(default_factory=list)  # a peer whose package is absent
    failed: list[tuple[Unit, str]] = field(default_factory=list)


def run_sweep(spec: SweepSpec, out: Path, console: Console | None = None, dry_run: bool = False) -> SweepResult:
    """Run every unit not yet done; never stops at a failed unit. Returns what happened."""
    sweep_dir = out / spec.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps(spec.to_dict(), indent=1) + "\n")
    units = spec.units(out)
    result = SweepResult(skipped=[u for u in units if u.done()])
    for unit in units:
        reason = _missing(unit.entry)
        if reason is not None and unit not in result.skipped:
            result.unavailable.append((unit, reason))
    todo = [u for u in units if not u.done() and _missing(u.entry) is None]
    with _terminal() as term:
        console = console or Console(file=term, highlight=False)
        console.print(f"[bold]lowband bench[/bold] {spec.name}: {len(units)} runs, {len(result.skipped)} done "
                      f"before, {len(todo)} to run -> {sweep_dir}")
        for label, reason in sorted({(u.entry.label, r) for u, r in result.unavailable}):
            console.print(f"  [yellow]skipping {label}[/yellow]: {reason}")
        if dry_run:
            for u in units:
                state = "done" if u in result.skipped else "todo" if u in todo else "skip"
                console.print(f"  {state}  {u.cell}/{u.entry.folder}")
            return result
        if not todo:  # all done: no empty progress bar
            return result
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("sweep", total=sum(u.config.steps for u in todo) or 1)
            for unit in todo:
                progress.update(bar, description=f"{unit.cell} {unit.entry.label}")
                error = _run_unit(unit)
                if error is None:
                    result.ran.append(unit)
                else:
                    result.failed.append((unit, error))
                    progress.console.print(f"[red]failed[/red] {unit.cell}/{unit.entry.folder}: {error} "
                                           f"(log: {unit.folder / 'train.log'})")
                progress.advance(bar, unit.config.steps)
    return result


def _missing(entry: Entry) -> str | None:
    if entry.peer is None:
        return None
    from lowband.bench.peers import missing

    return missing(entry.peer)


def _run_unit(unit: Unit) -> str | None:
    """Train one unit into a fresh folder with its output in ``train.log``; None on success."""
    from lowband.train.run import run

    if unit.folder.exists():
        shutil.rmtree(unit.folder)  # a partial earlier attempt
    unit.folder.mkdir(parents=True)
    started = time.perf_counter()
    try:
        with _output_to(unit.folder / "train.log"):
            if unit.entry.peer is not None:
                from lowband.bench.peers import PEERS

                PEERS.get(unit.entry.peer)(unit.config, unit.folder)
            else:
                run(unit.config)
    except Exception as err:  # noqa: BLE001 - a failed unit is reported, the sweep goes on
        return f"{type(err).__name__}: {err}".splitlines()[0]
    (unit.folder / "done.json").write_text(json.dumps({
        "config": _jsonable(unit.config.to_dict()), "label": unit.entry.label,
        "seconds": time.perf_counter() - started}, indent=1) + "\n")
    return None


@contextlib.contextmanager
def _terminal() -> Iterator[Any]:
    """A file on the real stderr, which stays the terminal while units write to their logs."""
    sys.stderr.flush()
    term = os.fdopen(os.dup(2), "w", buffering=1)
    try:
        yield term
    finally:
        term.close()


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """Send this process's (and its workers') stdout and stderr to ``log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _measured(config: dict[str, Any]) -> dict[str, Any]:
    """A unit's configuration without what does not change its measurements (where it was written,
    the target loss of its report): a moved sweep folder, or a new target, leaves it done."""
    return {k: v for k, v in config.items() if k not in RUN_CONTROL}


def _defaults(keys: Any) -> dict[str, Any]:
    """The defaults of the TrainConfig fields named in ``keys`` (JSON form)."""
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    return _jsonable({k: fields[k] for k in keys if k in fields})


def folder_name(label: str) -> str:
    """An entry's label as a portable folder name (``:`` ``,`` ``/`` are not)."""
    return label.replace(":", "-").replace(",", "_").replace("/", "_")


def _product(*axes: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
    import itertools

    return itertools.product(*axes)


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))
