"""Stragglers: simulated per-rank compute delays, and the first-n-b arrival protocol of backup workers.

**Simulated stragglers** (``DDPOptions(straggle=...)``, ``lowband train --straggle SPEC``): after
its backward pass a straggling rank's step takes ``delay`` more seconds, as if its device were
slower. The schedule is a pure function of (rank, step), so runs with different algorithms
see the same stragglers at the same steps:

* ``none`` (default);
* ``fixed:ranks=3,delay=0.5``: the listed ranks (joined by ``+``) are slow at every step;
* ``random:prob=0.1,delay=0.5,seed=0``: each rank is slow at each step with probability
  ``prob``, drawn from (seed, rank, step).

**Backup workers** (Chen et al., "Revisiting Distributed Synchronous SGD", arXiv:1604.00981):
a step uses the first ``k = n - b`` gradients to be ready and drops the other ``b``.
An all-reduce has no "first k of n", so :class:`Arrivals` decides who contributes over the
process group's store (control plane, not charged to the emulated link), per step:

1. a rank whose gradient is ready calls ``store.add(arrived, 1)``: the counter's new value is
   its arrival order; the first ``k`` are the contributors, and the ``k``-th sets ``full``;
2. a rank still serving its (simulated) delay polls ``full`` every 5 ms (``store.check``): if
   ``full`` appears before its delay is over it abandons the rest of its computation and
   does not arrive at all (it is dropped);
3. every rank publishes (seconds from step start to ready or to abandoning, censored?,
   last aggregation seconds) under ``t/<rank>``, then joins the all-reduce; dropped ranks
   send zeros and every rank rescales the sum by ``1/k`` instead of ``1/n``.

Exactly ``k`` ranks contribute, whatever the timing: the counter is atomic, and a rank only
abandons after ``k`` arrivals. **What is saved** is the simulated delay after the ``k``-th
arrival. **What is not**: the real forward/backward of a rank is not interruptible here, so
a rank whose *real* compute is slow still holds the all-reduce back (it arrives late, is
dropped, and the collective waits for it to enter); the store round trips (one ``add``, one
``set`` and one ``multi_get`` per step, a ``check`` per 5 ms of a straggler's wait) are not emulated.

**Dynamic b** (in the spirit of DBW, Xu, Neglia & Sebastianelli, arXiv:2004.14696, which picks
``b`` per iteration to maximise convergence speed): :class:`Controller` keeps the last
``window`` steps' published times (identical on every rank) and picks the ``k`` in
``[n - max_backups, n]`` with the most gradients per second, ``k / (T_k + C)``: ``T_k`` the
mean ``k``-th smallest ready time over the steps that observed it, ``C`` the mean smallest
aggregation time. An abandoned rank's time is only a lower bound: once ``T_k`` has left the
window unobserved, the lower bounds stand in for it, the controller errs towards waiting for
one step and measures the true time again (one exploration step per ``window`` at most). DBW's progress model also weighs the
gradient variance of a smaller batch; this throughput proxy does not.
"""

from __future__ import annotations

import time
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from lowband.adversity.attacks import parse_ranks
from lowband.comm import group
from lowband.registry import Registry

POLL_S = 0.005  # how often a straggler checks whether k others are ready


# -- simulated stragglers ---------------------------------------------------------------------
@dataclass(frozen=True)
class StraggleOptions:
    """Base for straggler options (frozen, validated)."""


class Straggle(ABC):
    """Base class; subclasses register in :data:`STRAGGLERS`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[StraggleOptions]] = StraggleOptions

    def __init__(self, options: StraggleOptions | None = None) -> None:
        self.options = options if options is not None else type(self).Options()

    @abstractmethod
    def delay(self, rank: int, step: int) -> float:
        """Extra seconds of compute of ``rank`` at ``step`` (deterministic)."""


STRAGGLERS: Registry[type[Straggle]] = Registry("straggler")


@STRAGGLERS.register("none")
class NoStraggle(Straggle):
    name = "none"

    def delay(self, rank: int, step: int) -> float:
        return 0.0


@dataclass(frozen=True)
class FixedOptions(StraggleOptions):
    ranks: str = "0"  # slow ranks joined by '+'
    delay: float = 0.5  # seconds added to each of their steps

    def __post_init__(self) -> None:
        parse_ranks(self.ranks)
        if self.delay < 0:
            raise ValueError(f"straggler delay must be >= 0 seconds, got {self.delay}")


@STRAGGLERS.register("fixed")
class Fixed(Straggle):
    """The listed ranks are ``delay`` seconds slower at every step."""

    name = "fixed"
    Options = FixedOptions
    options: FixedOptions

    def delay(self, rank: int, step: int) -> float:
        return self.options.delay if rank in parse_ranks(self.options.ranks) else 0.0


@dataclass(frozen=True)
class RandomOptions(StraggleOptions):
    prob: float = 0.1  # chance that a rank is slow at a step
    delay: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.prob <= 1 or self.delay < 0:
            raise ValueError(f"random straggler: prob must be in (0, 1] and delay >= 0, got {self.prob}, {self.delay}")


@STRAGGLERS.register("random")
class Random(Straggle):
    """Each (rank, step) is slow with probability ``prob``, from a hash of (seed, rank, step)."""

    name = "random"
    Options = RandomOptions
    options: RandomOptions

    def delay(self, rank: int, step: int) -> float:
        u = zlib.crc32(f"{self.options.seed}\x00{rank}\x00{step}".encode()) / 2**32
        return self.options.delay if u < self.options.prob else 0.0


# -- first k of n ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arrival:
    """This rank's outcome of one step: did it contribute, and the times it published."""

    contributes: bool
    ready_s: float  # seconds from step start to ready (or to abandoning)
    censored: bool  # abandoned: the true ready time is later than ready_s
    waited_s: float  # seconds spent serving the simulated delay (cut short when abandoned)


class Arrivals:
    """The store protocol of the module docstring, under ``lowband.backup/<instance>/``."""

    _instances = 0  # every rank builds its algorithms in the same order: same namespace

    def __init__(self, rank: int, world_size: int, store: Any | None = None, instance: int | None = None) -> None:
        if instance is None:
            Arrivals._instances += 1
            instance = Arrivals._instances
        self.store = group.control_store(f"lowband.backup/{instance}/", store)
        self.rank, self.n = rank, world_size

    def arrive(self, step: int, k: int, started: float, delay: float) -> Arrival:
        """Serve ``delay`` seconds unless ``k`` others are ready first; returns this rank's outcome."""
        begin = time.perf_counter()
        deadline = begin + delay
        if k < self.n and delay > 0:  # poll `full` (store.wait's timeout logs C++ warnings each time)
            while (left := deadline - time.perf_counter()) > 0:
                if self.store.check([f"{step}/full"]):
                    now = time.perf_counter()
                    return Arrival(False, now - started, True, now - begin)  # k were ready first: abandon
                time.sleep(min(POLL_S, left))
        elif delay > 0:
            time.sleep(delay)
        now = time.perf_counter()
        order = int(self.store.add(f"{step}/arrived", 1))
        if order == k:
            self.store.set(f"{step}/full", "1")
        return Arrival(order <= k, now - started, False, now - begin)

    def publish(self, step: int, arrival: Arrival, aggregate_s: float) -> None:
        self.store.set(f"{step}/t/{self.rank}", f"{arrival.ready_s:.6f},{int(arrival.censored)},{aggregate_s:.6f}")

    def times(self, step: int) -> list[tuple[float, bool, float]]:
        """Every rank's published (ready_s, censored, last aggregation s) of ``step``; call after the
        step's all-reduce (every rank published before entering it)."""
        raw = self.store.multi_get([f"{step}/t/{r}" for r in range(self.n)])
        out = []
        for value in raw:
            ready, censored, agg = value.decode().split(",")
            out.append((float(ready), censored == "1", float(agg)))
        return out

    def forget(self, step: int) -> None:
        """Delete ``step``'s keys (rank 0, one step later: every rank has read them by then)."""
        for key in [f"{step}/arrived", f"{step}/full", *(f"{step}/t/{r}" for r in range(self.n))]:
            self.store.delete_key(key)


@dataclass
class Controller:
    """Dynamic ``b``: the ``k`` in ``[n - max_backups, n]`` with the most gradients per second."""

    n: int
    max_backups: int
    window: int = 10
    history: list[list[tuple[float, bool, float]]] | None = None

    def observe(self, times: list[tuple[float, bool, float]]) -> None:
        self.history = ((self.history or []) + [times])[-self.window:]

    def choose(self, fallback: int) -> int:
        """``b`` for the next step (``fallback`` before any observation); identical on every rank."""
        if not self.history:
            return fallback
        comm = sum(min(t[2] for t in step) for step in self.history) / len(self.history)
        best_b, best_rate = 0, -1.0
        for b in range(0, self.max_backups + 1):
            k = self.n - b
            t_k = self.ready_time(k)
            rate = k / max(t_k + comm, 1e-9)
            if rate > best_rate * (1 + 1e-9):  # ties keep the smaller b (more gradients)
                best_b, best_rate = b, rate
        return best_b

    def ready_time(self, k: int) -> float:
        """Mean k-th ready time over the steps that observed it (at least k uncensored times); if
        none did, the mean k-th of all times, abandoned ones as lower bounds (optimistic: explore)."""
        history = self.history or []
        seen = [sorted(t[0] for t in step if not t[1]) for step in history]
        seen = [times[k - 1] for times in seen if len(times) >= k]
        if seen:
            return sum(seen) / len(seen)
        return sum(sorted(t[0] for t in step)[k - 1] for step in history) / len(history)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(step) for step in (self.history or [])]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [[tuple(t) for t in step] for step in state.get("history", [])] or None  # type: ignore[misc]
