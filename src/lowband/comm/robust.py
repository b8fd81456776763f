"""Aggregation rules for untrusted workers: mean, coordinate-wise median, trimmed mean, centered clipping.

A rule turns the contributions of the ranks that took part in a round, one row each,
into the aggregate every rank applies. :class:`lowband.comm.aggregate.Aggregator` calls
it with the same rows in the same rank order on every rank, and every rule here is
deterministic, so all ranks compute bit-identical aggregates. Rules are chosen by spec,
like compressors (``SyncOptions(aggregate="centered-clip:tau=auto,iters=3")``)::

    rule = build("trimmed-mean:trim=0.25", RULES)
    aggregate = rule("grads", rows, ranks=[0, 1, 2, 3])   # rows: (k, d) -> (d,)

* ``mean``: the plain average (what all-reduce computes; not robust to a single bad worker).
* ``median``: coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498); with an even count,
  the mean of the two middle values.
* ``trimmed-mean``: per coordinate, drop the ``floor(trim * k)`` largest and smallest values
  and average the rest (Yin et al. 2018).
* ``centered-clip``: centered clipping (Karimireddy, He & Jaggi, "Learning from History for
  Byzantine Robust Optimization", ICML 2021, arXiv:2012.10333), ``iters`` (L) iterations of
  ``v <- v + 1/k sum_i (x_i - v) min(1, tau / ||x_i - v||)`` started at the previous
  round's aggregate (zero before the first). The norm is taken over the whole
  contribution (every tensor of the call), as in the paper. Defaults: ``tau=auto``, at each
  iteration the (lower) median of the distances ``||x_i - v||``, and ``iters=3``: the paper's
  analysis sets tau at the scale of the honest spread, which no fixed number is for gradients,
  outer gradients and every model size at once (a fixed tau=1, iters=1 lost to the mean on
  clean runs; docs/robustness.md); with fewer than half the ranks Byzantine the median is an
  honest distance, so the nearest half of the rows pass unclipped.

The paper applies centered clipping to *worker momentum*, not to raw gradients: history
(momentum) is what makes the rule robust to attacks that hide in the gradient noise. With
``ddp`` the rows are gradients; ``centered-clip:momentum=0.9`` makes the rule keep each
rank's momentum of its received contributions, ``m_i <- beta m_i + (1 - beta) x_i``
(initialised to the first contribution), and clip those, as the paper's Algorithm 2 does
on the server. With ``diloco`` the rows are outer gradients, already a sum of many steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from lowband.registry import Registry, build, parse_spec  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class RuleOptions:
    """Base for rule options (frozen, validated in ``__post_init__``)."""


class Rule(ABC):
    """Base class; subclasses set ``name`` and ``Options`` and register in :data:`RULES`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[RuleOptions]] = RuleOptions

    def __init__(self, options: RuleOptions | None = None) -> None:
        self.options = options if options is not None else type(self).Options()

    @abstractmethod
    def __call__(self, key: str, rows: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
        """The aggregate of ``rows`` (k, d), row i from rank ``ranks[i]``; ``key`` names the call."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


RULES: Registry[type[Rule]] = Registry("aggregation rule")


@RULES.register("mean")
class Mean(Rule):
    """The plain average; the Aggregator runs it as a (compressed) all-reduce, not through rows."""

    name = "mean"

    def __call__(self, key: str, rows: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
        return rows.mean(0)


@RULES.register("median")
class Median(Rule):
    """Coordinate-wise median (Yin et al. 2018, arXiv:1803.01498); even k: mean of the two middles."""

    name = "median"

    def __call__(self, key: str, rows: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
        k = rows.shape[0]
        ordered = rows.sort(0).values
        return (ordered[(k - 1) // 2] + ordered[k // 2]) / 2


@dataclass(frozen=True)
class TrimmedMeanOptions(RuleOptions):
    trim: float = 0.25  # fraction of the k values dropped at each end, per coordinate

    def __post_init__(self) -> None:
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trimmed-mean: trim must be in [0, 0.5), got {self.trim}")


@RULES.register("trimmed-mean")
class TrimmedMean(Rule):
    """Per coordinate, drop the ``floor(trim * k)`` largest and smallest values; average the rest
    (Yin et al. 2018, arXiv:1803.01498). ``trim < 0.5`` always leaves at least one value."""

    name = "trimmed-mean"
    Options = TrimmedMeanOptions
    options: TrimmedMeanOptions

    def __call__(self, key: str, rows: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
        k = rows.shape[0]
        b = int(self.options.trim * k)
        return rows.sort(0).values[b:k - b].mean(0)


@dataclass(frozen=True)
class CenteredClipOptions(RuleOptions):
    tau: float | str = "auto"  # clipping radius around the centre; auto: the median distance to it
    iters: int = 3  # L: clipping iterations per round (the paper uses 1 to 3)
    momentum: float = 0.0  # beta of each rank's momentum of its contributions (0: clip the rows)

    def __post_init__(self) -> None:
        if self.tau != "auto" and (isinstance(self.tau, str) or not self.tau > 0):
            raise ValueError(f"centered-clip: tau must be a radius > 0 or 'auto', got {self.tau!r}")
        if not 1 <= self.iters <= 10:
            raise ValueError(f"centered-clip: iters (L) must be in 1..10, got {self.iters}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"centered-clip: momentum must be in [0, 1), got {self.momentum}")


@RULES.register("centered-clip")
class CenteredClip(Rule):
    """Centered clipping (Karimireddy, He & Jaggi 2021, arXiv:2012.10333), eq. (CC):

        v_{l+1} = v_l + 1/k sum_i (x_i - v_l) min(1, tau / ||x_i - v_l||),  l = 0..L-1,

    with v_0 the previous round's aggregate of the same ``key`` and x_i the rows (or each
    rank's momentum of them when ``momentum > 0``). State: the last aggregate per key and
    each rank's momentum per key.
    """

    name = "centered-clip"
    Options = CenteredClipOptions
    options: CenteredClipOptions

    def __init__(self, options: RuleOptions | None = None) -> None:
        super().__init__(options)
        self.previous: dict[str, torch.Tensor] = {}
        self.momenta: dict[str, dict[int, torch.Tensor]] = {}

    def __call__(self, key: str, rows: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
        o = self.options
        if o.momentum > 0:
            momenta = self.momenta.setdefault(key, {})
            for i, r in enumerate(ranks):
                m = momenta.get(r)
                momenta[r] = rows[i].clone() if m is None else m.mul_(o.momentum).add_(rows[i], alpha=1 - o.momentum)
            rows = torch.stack([momenta[r] for r in ranks])
        v = self.previous.get(key)
        v = torch.zeros_like(rows[0]) if v is None or v.shape != rows[0].shape else v.to(rows.dtype)
        for _ in range(o.iters):
            diff = rows - v
            norms = torch.linalg.vector_norm(diff, dim=1, keepdim=True)
            tau = norms.median() if o.tau == "auto" else torch.tensor(float(o.tau), dtype=norms.dtype,
                                                                        device=norms.device)
            scale = torch.where(norms > tau, tau / norms.clamp_min(torch.finfo(rows.dtype).tiny),
                                torch.ones_like(norms))
            v = v + (diff * scale).mean(0)
        self.previous[key] = v.clone()
        return v

    def state_dict(self) -> dict[str, Any]:
        return {"previous": {k: v.clone() for k, v in self.previous.items()},
                "momenta": {k: {r: m.clone() for r, m in ms.items()} for k, ms in self.momenta.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = {k: v.clone() for k, v in state.get("previous", {}).items()}
        self.momenta = {k: {int(r): m.clone() for r, m in ms.items()} for k, ms in state.get("momenta", {}).items()}
