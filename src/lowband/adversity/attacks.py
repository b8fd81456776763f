"""Simulated Byzantine workers: transforms of a rank's outgoing contribution (tests and benchmarks).

``SyncOptions(attack="scale:ranks=0,factor=-10")`` makes rank 0 send ``-10 x`` instead of
its honest contribution ``x`` (after error-feedback compensation, before compression),
on every aggregation. ``ranks`` lists the attacking ranks joined by ``+`` (``ranks=0+5``:
2 of 8). The attacks are the standard ones of the Byzantine-robust literature
(Karimireddy, He & Jaggi, arXiv:2012.10333, section 6; Allen-Zhu et al., arXiv:2012.14368):

* ``none``: honest (the default);
* ``signflip``: ``-x``;
* ``scale``: ``factor * x`` (a negative factor is a scaled sign flip);
* ``noise``: ``x`` replaced by Gaussian noise of standard deviation ``std``, seeded by
  (``seed``, rank, step, key) so runs are reproducible.

Label flipping is data-side (a worker trains on flipped labels and sends an honest update
of them): :mod:`lowband.adversity.poison` registers it here as ``labelflip``.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowband import devices
from lowband.comm.tamper import Tamper
from lowband.registry import Registry


def parse_ranks(ranks: str) -> frozenset[int]:
    """``'0+5'`` -> {0, 5}; raises on anything but non-negative integers joined by ``+``."""
    try:
        out = frozenset(int(r) for r in ranks.split("+") if r.strip())
    except ValueError:
        raise ValueError(f"attack ranks must be integers joined by '+' (e.g. 0+5), got {ranks!r}") from None
    if not out or min(out) < 0:
        raise ValueError(f"attack ranks must be non-negative integers joined by '+', got {ranks!r}")
    return out


@dataclass(frozen=True)
class AttackOptions:
    ranks: str = "0"  # attacking ranks joined by '+'

    def __post_init__(self) -> None:
        parse_ranks(self.ranks)


class Attack(Tamper, ABC):
    """Base class; subclasses set ``name`` and ``Options`` and register in :data:`ATTACKS`. The aggregator
    applies it through its :class:`~lowband.comm.tamper.Tamper` hook."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[AttackOptions]] = AttackOptions
    idle = False

    def __init__(self, options: AttackOptions | None = None) -> None:
        self.options = options if options is not None else type(self).Options()
        self.ranks = parse_ranks(self.options.ranks)

    def applies(self, rank: int) -> bool:
        return rank in self.ranks

    @abstractmethod
    def __call__(self, x: torch.Tensor, rank: int, step: int, key: str) -> torch.Tensor:
        """What rank ``rank`` sends instead of ``x`` (a new tensor)."""

    # on_wire (Tamper's): attacks change values before compression, so the sealed buffer goes as is;
    # a payload fault (:class:`lowband.adversity.injection.PayloadFaults`) spoils bytes there.


ATTACKS: Registry[type[Attack]] = Registry("attack")


@dataclass(frozen=True)
class NoAttackOptions(AttackOptions):
    ranks: str = ""

    def __post_init__(self) -> None:
        pass


@ATTACKS.register("none")
class NoAttack(Attack):
    name = "none"
    Options = NoAttackOptions
    idle = True

    def __init__(self, options: AttackOptions | None = None) -> None:
        self.options = options if options is not None else NoAttackOptions()
        self.ranks = frozenset()

    def __call__(self, x: torch.Tensor, rank: int, step: int, key: str) -> torch.Tensor:
        return x


@ATTACKS.register("signflip")
class SignFlip(Attack):
    name = "signflip"

    def __call__(self, x: torch.Tensor, rank: int, step: int, key: str) -> torch.Tensor:
        return -x


@dataclass(frozen=True)
class ScaleOptions(AttackOptions):
    factor: float = -10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factor == 1.0:
            raise ValueError("scale: factor 1 is no attack")


@ATTACKS.register("scale")
class Scale(Attack):
    name = "scale"
    Options = ScaleOptions
    options: ScaleOptions

    def __call__(self, x: torch.Tensor, rank: int, step: int, key: str) -> torch.Tensor:
        return x * self.options.factor


@dataclass(frozen=True)
class NoiseOptions(AttackOptions):
    std: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.std <= 0:
            raise ValueError(f"noise: std must be > 0, got {self.std}")


@ATTACKS.register("noise")
class Noise(Attack):
    name = "noise"
    Options = NoiseOptions
    options: NoiseOptions

    def __call__(self, x: torch.Tensor, rank: int, step: int, key: str) -> torch.Tensor:
        seed = zlib.crc32(f"{self.options.seed}\x00{rank}\x00{step}\x00{key}".encode())
        g = devices.generator(x.device, seed)
        return (torch.randn(x.shape, generator=g, dtype=torch.float32, device=x.device) * self.options.std).to(x.dtype)

