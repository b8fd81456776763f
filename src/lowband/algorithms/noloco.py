"""``noloco``: "NoLoCo: No-all-reduce Low Communication Training Method for Large Models"
(Kolehmainen, Blagoev, Donaghy, Ersoy, Nies; arXiv:2506.10911).

DiLoCo without the all-reduce: after H inner steps every worker meets one random partner,
and a modified Nesterov outer step both moves it along the pair's mean outer gradient and
pulls its weights part of the way towards the pair's mean. No collective ever runs.

Notation: rank i of N, outer step t = 0, 1, ...; phi_{t,i} the rank's outer weights (where
its round started), theta_{t,i} its model after the round, delta_{t,i} its momentum
(delta_{-1,i} = 0), G_t(i) its group at step t and n = |G_t(i)|. Hyperparameters, named as
in the paper: alpha = ``outer_momentum`` (0.5), beta = ``outer_lr`` (0.7), gamma =
``averaging_weight`` (default: equal to beta).

1. Round t: H inner steps (``inner_steps``, default 20) with the inner optimizer (AdamW in
   the runner; its state is kept across rounds) take theta from phi_{t,i} to theta_{t,i}.
2. Outer gradient: Delta_{t,i} = phi_{t,i} - theta_{t,i}.
3. Groups: ``groups(N, seed, t)``, drawn from a generator seeded with
   ``seed * 1_000_003 + t`` (the same on every rank, nothing is sent): a random permutation
   cut into consecutive pairs; when N is odd the last three form one group of three; with
   N = 1 the rank is alone (n = 1).
4. Exchange: one ``Comm.sendrecv`` with each other member j of the group, of the flat
   tensor c_{t,j} = gamma * phi_{t,j} - beta * Delta_{t,j}: all that rank i needs of j.
5. The modified Nesterov step (the paper's update):

       delta_{t,i} = alpha * delta_{t-1,i} - (beta / n) * sum_{j in G} Delta_{t,j}
                     - gamma * (phi_{t,i} - (1 / n) * sum_{j in G} phi_{t,j})
       phi_{t+1,i} = phi_{t,i} + delta_{t,i}

   computed as delta = alpha * delta - (beta / n) * Delta_i + (1 / n) * sum_{j != i}
   (c_j - gamma * phi_i), equal in exact arithmetic; then theta <- phi_{t+1,i}.

With n = 1 (a world of one) the gamma term vanishes and step 5 is DiLoCo's outer step in
momentum form on the rank's own outer gradient: delta = alpha * delta - beta * Delta.

Choices made here (the paper does not fix them, or lowband differs):

- gamma defaults to beta (``averaging_weight=None``): the authors' released code uses its
  outer learning rate for both terms. Give a value to decouple them.
- The step is implemented exactly as the two equations of step 5 (momentum, then
  phi += delta), as the authors' code does; the Nesterov look-ahead is the next round
  starting from phi_{t+1}. It is not torch's ``nesterov=True`` SGD that ``diloco`` uses.
- The weights averaged are the outer weights phi (the start of the round), not theta.
- One combined tensor is exchanged (N_params floats per peer) instead of phi and Delta
  separately (twice that, as the authors' code sends): the same update up to fp32 rounding.
- Odd worlds: one group of three (the paper's formula with n = 3; its members send to two
  peers), so that no rank ever skips the averaging.
- The paper's random routing of activations between pipeline stages is not modelled:
  lowband workers hold whole models.
- H defaults to 20 (lowband's common period); the authors' NoLoCo configs
  (jkolehm/noloco, ``SparseOptimizerC``) use H = 50 with pairs, beta 0.7, alpha 0.5.
- The pairing draws come from torch's generator, not the authors' numpy one: the same
  distribution (uniform random pairs), other draws.

Ranks differ by design: evaluation uses each rank's own model and ``metrics()`` reports the
consensus distance mean_i ||theta_i - mean_j theta_j|| (uncharged monitoring traffic).
``merge_at_end=True`` makes ``finish()`` average all models once (one charged all-reduce).

Example::

    algo = NoLoCo(model, torch.optim.AdamW(model.parameters(), lr=3e-3), comm,
                  NoLoCoOptions(inner_steps=20))
    # lowband train --algo noloco --workers 4 --inner-steps 20
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowband.algorithms.base import ALGORITHMS, Algorithm, Options, consensus_distance, flatten, unflatten_into
from lowband.algorithms.commplan import Setup, Sync, exchange

SEED_STRIDE = 1_000_003  # generator seed of outer step t: seed * SEED_STRIDE + t


@dataclass(frozen=True)
class NoLoCoOptions(Options):
    """alpha = ``outer_momentum``, beta = ``outer_lr``, gamma = ``averaging_weight`` (None: beta)."""

    inner_steps: int = 20  # H: inner steps between outer steps
    outer_lr: float = 0.7  # beta
    outer_momentum: float = 0.5  # alpha
    averaging_weight: float | None = None  # gamma; None: the same as outer_lr (the authors' code)
    seed: int = 0  # pairing seed, shared by all ranks (the runner passes --seed)
    merge_at_end: bool = False  # finish(): one exact all-reduce average of all models

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps (H) must be >= 1, got {self.inner_steps}")
        if self.outer_lr <= 0:
            raise ValueError(f"outer_lr (beta) must be > 0, got {self.outer_lr}")
        if not 0 <= self.outer_momentum < 1:
            raise ValueError(f"outer_momentum (alpha) must be in [0, 1), got {self.outer_momentum}")
        if self.averaging_weight is not None and not 0 <= self.averaging_weight <= 1:
            raise ValueError(f"averaging_weight (gamma) must be in [0, 1] (or None for outer_lr), "
                             f"got {self.averaging_weight}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def gamma(self) -> float:
        return self.outer_lr if self.averaging_weight is None else self.averaging_weight


def groups(world_size: int, seed: int, outer_step: int) -> list[tuple[int, ...]]:
    """Step 3: the groups of outer step ``outer_step``; every rank in exactly one, each sorted.

    Pairs of a random permutation; the last three form one group when ``world_size`` is odd
    (a world of one is one group of one). Pure: every rank computes the same list."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + outer_step)
    # cpu: the pairing schedule is host data (which rank averages with which)
    perm = torch.randperm(world_size, generator=g).tolist()
    cut = world_size - 3 if world_size % 2 and world_size > 1 else world_size  # pairs end here
    out = [tuple(sorted(perm[k:k + 2])) for k in range(0, cut, 2)]
    return out + [tuple(sorted(perm[cut:]))] if cut < world_size else out


def group_of(rank: int, world_size: int, seed: int, outer_step: int) -> tuple[int, ...]:
    """The group ``rank`` belongs to at ``outer_step``."""
    return next(g for g in groups(world_size, seed, outer_step) if rank in g)


@ALGORITHMS.register("noloco")
class NoLoCo(Algorithm):
    """Local rounds, then a pairwise modified Nesterov step; see the module docstring."""

    name = "noloco"
    Options = NoLoCoOptions
    options: NoLoCoOptions

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """The fp32 model to one partner (two in an odd world's group of three) every H steps."""
        return exchange(options, setup, options.inner_steps, min(setup.workers - 1, 2 if setup.workers % 2 else 1))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if len({p.dtype for p in self.params}) > 1:
            raise ValueError("noloco needs all trainable parameters in one dtype; cast the model first")
        self.outer_params = self._flat()  # phi_{t,i}
        self.momentum = torch.zeros_like(self.outer_params)  # delta_{t-1,i}
        self.outer_steps = 0
        self.local_steps = 0  # inner steps since the last outer step
        self.group: tuple[int, ...] = (self.comm.rank,)  # the group of the last outer step

    def _flat(self) -> torch.Tensor:
        return flatten([p.detach() for p in self.params])

    @torch.no_grad()
    def after_step(self) -> None:
        self.local_steps += 1
        if self.local_steps >= self.options.inner_steps:
            self.outer_step()
            self.local_steps = 0

    def exchange(self, peers: list[int], send: torch.Tensor) -> dict[int, torch.Tensor]:
        """Step 4: send ``send`` to every peer, receive each peer's; one sendrecv."""
        recvs = {j: torch.empty_like(send) for j in peers}
        self.comm.sendrecv({j: send for j in peers}, recvs, tag="outer")
        return recvs

    @torch.no_grad()
    def outer_step(self) -> None:
        """Steps 2-5 on the flat parameters."""
        o, rank = self.options, self.comm.rank
        alpha, beta, gamma = o.outer_momentum, o.outer_lr, o.gamma
        self.group = group_of(rank, self.comm.world_size, o.seed, self.outer_steps)
        n = len(self.group)
        phi = self.outer_params
        outer_grad = phi - self._flat()  # Delta_{t,i}
        self.momentum.mul_(alpha).add_(outer_grad, alpha=-beta / n)
        peers = [j for j in self.group if j != rank]
        if peers:
            received = self.exchange(peers, gamma * phi - beta * outer_grad)  # c_{t,i}
            for c in received.values():  # (c_j - gamma * phi_i) / n
                self.momentum.add_(c.sub_(phi, alpha=gamma), alpha=1.0 / n)
        phi.add_(self.momentum)
        unflatten_into(phi, self.params)
        self.outer_steps += 1

    @torch.no_grad()
    def end_training(self) -> None:
        """Nothing beyond the base class, unless ``merge_at_end``: one exact average of all models."""
        if self.options.merge_at_end and self.comm.world_size > 1:
            flat = self._flat()
            self.comm.all_reduce(flat, average=True, tag="merge")
            unflatten_into(flat, self.params)
            self.outer_params.copy_(flat)
        super().end_training()

    def metrics(self) -> dict[str, float]:
        """Consensus distance mean_i ||theta_i - mean_j theta_j|| (L2, float64, not charged)."""
        return {"consensus_distance": consensus_distance(self.comm, self.params)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "outer_steps": self.outer_steps, "local_steps": self.local_steps,
                "outer_params": self.outer_params.clone(), "momentum": self.momentum.clone(),
                "group": list(self.group)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.outer_steps = int(state["outer_steps"])
        self.local_steps = int(state["local_steps"])
        self.outer_params.copy_(state["outer_params"])
        self.momentum.copy_(state["momentum"])
        self.group = tuple(state["group"])
