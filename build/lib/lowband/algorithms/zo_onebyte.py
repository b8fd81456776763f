"""``zo-onebyte``: zeroth-order (SPSA) fine-tuning that sends one byte per worker per step.

Zelikman, Huang, Liang, Haber, Goodman, "Just One Byte (per gradient): A Note on
Low-Bandwidth Decentralized Language Model Finetuning Using Shared Randomness"
(arXiv:2306.10015), the decentralised form of MeZO (Malladi et al., "Fine-Tuning Language
Models with Just Forward Passes", arXiv:2305.17333). No backward pass: the algorithm takes a
loss closure (``algo.zo_step(closure)``, ``zeroth_order = True``). At step t = 1, 2, ...,
worker i (its id: the rank):

1. seed s_it from (``seed``, i, t) (:func:`perturbation_seed`); z_i ~ N(0, I) is drawn from it
   parameter by parameter, in parameter order, and never stored (regenerated when needed);
2. theta + eps z_i: loss l+ on the worker's own batch; theta - eps z_i: loss l- (the torch RNG
   is rewound in between, so dropout masks are common to both); theta is then restored
   bit for bit from a copy (subtracting eps z_i again would leave rank-dependent rounding);
3. projected gradient g_i = (l+ - l-) / (2 eps), quantised to ONE byte (:func:`quantize`):
   q_i = clamp(round(g_i / s), -127, 127), sent as q_i + 128 (0 = abstain: a worker whose
   losses are not finite sends 0 and contributes nothing); s is the shared quantiser step;
4. one all-gather of the bytes (``Comm.all_gather``, 1 byte per worker: the ledger charges
   n - 1 bytes sent per worker per step on the ring);
5. every worker regenerates every contributor's z_j from (seed, j, t) and applies, parameter
   by parameter in the same order, theta *= 1 - lr wd; theta -= lr (q_j s / m) z_j for each
   contributor j in worker order (m contributors), with lr and wd read from the inner
   optimizer's param group (so the lr schedule applies; its own update never runs);
6. the step s adapts from the gathered bytes only (:func:`adapt_scale`): x2 if any byte
   saturated (|q| = 127), /2 if every |q| < 32 (``adapt=False``: fixed), within [1e-8, 1e8].

Every rank computes step 5 and 6 from the same (seed, worker ids, t, bytes, lr) with the same
operations in the same order, so parameters stay bit-identical on every rank after every
step, and the whole update is a pure function of those numbers: a log of
(t, s, lr, bytes of each worker id) replays a run from its initial model.

Membership: the contributors of step t are the worker ids whose byte arrived and is not 0;
the mean is over them (m of step t). A worker that leaves simply stops sending (its id is
absent); one that joins needs theta at some step (a checkpoint, or the initial model plus the
byte log to replay) and starts sending the next step under its own id. Nothing depends on
the number of workers except m, so no state has to be resized. In this process-group
implementation the ids are the ranks and a step's contributors are the ranks that did not
abstain.

Memory: the parameters, one copy of them (step 2), one parameter-sized z at a time; no
gradients and one forward pass's activations. ``--grad-clip`` does not apply (no gradient;
the quantiser clips g_i at 127 s).

Example::

    algo = ZOOneByte(model, torch.optim.SGD(model.parameters(), lr=1e-4), comm, ZOOneByteOptions(eps=1e-3))
    loss = algo.zo_step(lambda: model(x, y)[1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lowband import devices
from lowband.algorithms.base import ALGORITHMS, Options
from lowband.algorithms.commplan import Setup, Sync
from lowband.algorithms.signs import OwnUpdate, param_groups
from lowband.compress.sparse import stable_seed

ABSTAIN = 0  # the byte of a worker that contributes nothing this step
OFFSET = 128  # byte = q + OFFSET, q in [-127, 127]
LEVELS = 127
MIN_SCALE, MAX_SCALE = 1e-8, 1e8


@dataclass(frozen=True)
class ZOOneByteOptions(Options):
    """``eps`` perturbation size; ``scale`` the quantiser's initial step (a byte q means q * scale);
    ``adapt`` the step from the gathered bytes; ``seed`` of the perturbations (the run's ``--seed``)."""

    eps: float = 1e-3  # MeZO's default
    scale: float = 0.01  # g up to 1.27 is represented at the start
    adapt: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0 (the perturbation size, e.g. 1e-3), got {self.eps!r}")
        if not (isinstance(self.scale, (int, float)) and MIN_SCALE <= self.scale <= MAX_SCALE):
            raise ValueError(f"scale must be in [{MIN_SCALE:g}, {MAX_SCALE:g}] (the quantiser step, e.g. 0.01), "
                             f"got {self.scale!r}")
        if not isinstance(self.adapt, bool):
            raise ValueError(f"adapt must be true or false, got {self.adapt!r}")


def perturbation_seed(seed: int, worker: int, step: int) -> int:
    """The seed of worker ``worker``'s perturbation at ``step`` (equal in every process)."""
    return stable_seed(seed, f"zo-onebyte\x00{worker}", step)


def quantize(g: float, scale: float) -> int:
    """The byte of projected gradient ``g``: round(g / scale) clamped to [-127, 127], plus 128;
    ABSTAIN (0) for a non-finite ``g``."""
    if not math.isfinite(g):
        return ABSTAIN
    return max(-LEVELS, min(LEVELS, round(g / scale))) + OFFSET


def dequantize(byte: int, scale: float) -> float:
    """What a (non-abstaining) byte stands for."""
    return (byte - OFFSET) * scale


def adapt_scale(scale: float, codes: list[int]) -> float:
    """Next quantiser step from this step's bytes: x2 on saturation, /2 if all |q| < 32."""
    levels = [abs(c - OFFSET) for c in codes if c != ABSTAIN]
    if not levels:
        return scale
    if max(levels) >= LEVELS:
        return min(MAX_SCALE, scale * 2)
    if max(levels) < 32:
        return max(MIN_SCALE, scale / 2)
    return scale


def perturbations(seed: int, worker: int, step: int, params: list[torch.Tensor]) -> Any:
    """z for each of ``params`` in order, drawn from one generator (a generator of tensors).

    Drawn on the parameters' device (a parameter-sized draw every step must not cross the host
    link) from a generator seeded alike on every rank: all ranks of a run share one device type,
    so every rank draws the same z (on the CPU, the values of ``torch.Generator().manual_seed``)."""
    if not params:
        return iter(())
    device = params[0].device
    generator = devices.generator(device, perturbation_seed(seed, worker, step))
    return (torch.randn(p.shape, generator=generator, dtype=p.dtype, device=device) for p in params)


def _accelerator_rng(device: torch.device) -> Any:
    """The torch module whose default generator draws ``device``'s dropout masks (``torch.cuda``), or None."""
    if device.type in ("cpu", "meta"):
        return None
    module = getattr(torch, device.type, None)
    return module if module is not None and hasattr(module, "get_rng_state") else None


def rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The default generators' states: the CPU's and, on an accelerator, ``device``'s (where dropout draws)."""
    module = _accelerator_rng(device)
    return torch.get_rng_state(), None if module is None else module.get_rng_state(device)


def set_rng_states(device: torch.device, states: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    """Rewind to :func:`rng_states`' ``states``."""
    torch.set_rng_state(states[0])
    module = _accelerator_rng(device)
    if module is not None and states[1] is not None:
        module.set_rng_state(states[1], device)


@dataclass(frozen=True)
class StepRecord:
    """What one step applied: all a replay needs (with the parameter groups' lr and wd)."""

    step: int
    scale: float
    codes: tuple[int, ...]  # the byte of each worker id, ABSTAIN for none
    lrs: tuple[float, ...]  # lr of each parameter's group
    loss_plus: float
    loss_minus: float


@ALGORITHMS.register("zo-onebyte")
class ZOOneByte(OwnUpdate):
    """Shared-randomness SPSA, one byte per worker per step; see the module docstring."""

    name = "zo-onebyte"
    zeroth_order = True
    Options = ZOOneByteOptions
    options: ZOOneByteOptions

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """One byte per worker per step, all-gathered."""
        return (Sync("bytes", "all_gather", 1.0),)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.groups = param_groups(self.optimizer, self.params)
        self.scale = float(self.options.scale)
        self.worker = self.comm.rank  # this worker's id
        self.last: StepRecord | None = None

    def step(self) -> None:
        raise TypeError(f"{self.name} is zeroth-order: call algo.zo_step(closure) with a closure returning the "
                        "loss (no backward)")

    def __enter__(self) -> "ZOOneByte":
        raise TypeError(f"{self.name} is zeroth-order: call algo.zo_step(closure), not optimizer.step() inside "
                        "'with algo:'")

    @torch.no_grad()
    def zo_step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Steps 1-6 of the module docstring; returns (l+ + l-) / 2, the loss estimate at theta."""
        t, eps = self.step_count + 1, self.options.eps
        backup = [p.detach().clone() for p in self.params]
        rng = rng_states(self.device)
        for p, z in zip(self.params, perturbations(self.options.seed, self.worker, t, self.params)):
            p.add_(z, alpha=eps)
        plus = closure().detach().float()
        for p, b, z in zip(self.params, backup, perturbations(self.options.seed, self.worker, t, self.params)):
            p.copy_(b).add_(z, alpha=-eps)
        set_rng_states(self.device, rng)  # common random numbers: the same dropout masks for l+ and l-
        minus = closure().detach().float()
        for p, b in zip(self.params, backup):
            p.copy_(b)
        del backup
        # host sync: the byte is quantised on the host (it selects whose perturbations every rank
        # regenerates, and is logged); one read for both losses
        loss_plus, loss_minus = torch.stack([plus.reshape(()), minus.reshape(())]).tolist()
        code = quantize((loss_plus - loss_minus) / (2 * eps), self.scale)
        codes = self.gather(code)
        lrs = self.apply(t, codes)
        self.last = StepRecord(t, self.scale, tuple(codes), lrs, loss_plus, loss_minus)
        if self.options.adapt:
            self.scale = adapt_scale(self.scale, codes)
        self.optimizer._opt_called = True  # type: ignore[attr-defined]  # the lr scheduler's check
        self._after_inner_step()
        return (plus + minus) / 2

    def gather(self, code: int) -> list[int]:
        """Every worker's byte, in worker order (one all-gather of 1 byte)."""
        if self.comm.world_size == 1:
            return [code]
        # on the communication device (NCCL rejects CPU tensors)
        got = self.comm.all_gather(torch.tensor([code], dtype=torch.uint8, device=self.device), tag="zo-bytes")
        # host sync: the bytes choose, on the host, the contributors and the next quantiser step
        return [int(b) for b in torch.cat(got).tolist()]

    @torch.no_grad()
    def apply(self, t: int, codes: list[int]) -> tuple[float, ...]:
        """theta *= 1 - lr wd; theta -= lr mean_j(g_j z_j) over the contributors (step 5)."""
        lrs = tuple(float(group["lr"]) for group in self.groups)
        contributors = [(w, dequantize(c, self.scale)) for w, c in enumerate(codes) if c != ABSTAIN]
        if not contributors:
            return lrs
        m = len(contributors)
        streams = [(perturbations(self.options.seed, w, t, self.params), g / m) for w, g in contributors]
        for p, group, lr in zip(self.params, self.groups, lrs):
            wd = group.get("weight_decay", 0.0)
            if wd:
                p.mul_(1 - lr * wd)
            for zs, coefficient in streams:
                p.add_(next(zs), alpha=-lr * coefficient)
        return lrs

    def metrics(self) -> dict[str, Any]:
        """The quantiser step for the next step and the contributors of the last one."""
        out: dict[str, Any] = {"zo_scale": self.scale}
        if self.last is not None:
            out["zo_contributors"] = sum(c != ABSTAIN for c in self.last.codes)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scale = float(state["scale"])
