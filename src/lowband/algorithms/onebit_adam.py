"""``onebit-adam``: Adam whose momentum travels as 1 bit per element after a warm-up.

Tang et al., "1-bit Adam: Communication Efficient Large-Scale Training with Adam's
Convergence Speed" (ICML 2021, arXiv:2102.02888). The algorithm is the optimizer: the
inner AdamW's own update is never applied; lr (scheduler-adjusted), betas, eps and
weight decay are read from its param groups at every step. At step t = 1, 2, ...:

1. warm-up (t <= ``freeze_step``): gradients are all-reduced in fp32 (averaged) and
   clipped, then one AdamW step exactly as ``torch.optim.AdamW``:
   m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
   theta -= lr (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd theta);
2. from t = ``freeze_step`` + 1, v is frozen (with its bias correction 1 - b2^freeze_step)
   and nothing but momentum is communicated. Each rank i updates the shared momentum with
   its LOCAL (clipped) gradient, m_i = b1 m + (1 - b1) g_i;
3. error-compensated 1-bit all-reduce (:func:`compressed_allreduce`), two-level feedback:
   the worker compresses m_i + e_i chunk by chunk (chunk j of 1/n of the padded flat
   buffer, scale_j = ||x_j||_2 / sqrt(len_j), the paper's norm-preserving scale) and keeps
   e_i = m_i + e_i - C(m_i + e_i); an all-to-all sends chunk j (packed signs + fp32 scale)
   to rank j; rank j averages the n decompressed contributions, adds its server error,
   compresses again and keeps the server error; an all-gather of the server chunks gives
   every rank the same averaged momentum m;
4. theta -= lr (m / (1 - b1^t) / (sqrt(v / (1 - b2^freeze_step)) + eps) + wd theta). The
   bias corrections continue those of the warm-up, so the step size does not jump at
   the freeze (1 - b1^t is ~1 by then anyway).

Against DeepSpeed's ``OnebitAdam`` (deepspeed/runtime/fp16/onebit/adam.py and
runtime/comm/nccl.py; docs/faithfulness.md): the same two stages, local momentum and two-level
error feedback, but (a) DeepSpeed bias-corrects neither m nor v, in warm-up or after; here the
warm-up is ``torch.optim.AdamW`` exactly and step 4 continues its corrections (after a short
warm-up v is far below its stationary scale: uncorrected, 60 steps at b2 = 0.999 would leave
steps ~4x AdamW's); (b) DeepSpeed compresses each parameter tensor with one worker scale,
norm / sqrt(numel) over the padded tensor; here one flat buffer with a scale per chunk, and
the padding keeps no error.

Bytes per rank per step after the freeze: 2 (n - 1) (ceil(numel / 8n) + 4) sent and received,
about numel / 8 on two ranks, against 2 (n - 1) / n * 4 numel for the fp32 all-reduce of
the warm-up (~32x less). Parameters and m stay identical on every rank; the errors do not.
A world of one sends nothing and skips the compression (Adam with v frozen, as DeepSpeed).

Example::

    algo = OneBitAdam(model, torch.optim.AdamW(model.parameters(), lr=3e-3), comm,
                      OneBitAdamOptions(freeze_step=60))
    loss.backward(); algo.step(); algo.zero_grad()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowband.algorithms.base import ALGORITHMS, Options, flatten, unflatten_into, views
from lowband.algorithms.commplan import Setup, Sync
from lowband.algorithms.signs import OwnUpdate, pack_signs, param_groups, unpack_signs
from lowband.comm import Comm

DEFAULT_BETAS = (0.9, 0.999)  # for inner optimizers without betas (SGD)
DEFAULT_EPS = 1e-8


@dataclass(frozen=True)
class OneBitAdamOptions(Options):
    """``freeze_step``: steps of full Adam before v is frozen and the momentum goes 1-bit."""

    freeze_step: int = 60  # 15% of a 400-step run (the paper warms up for ~15-25% of training)

    def __post_init__(self) -> None:
        if isinstance(self.freeze_step, bool) or not isinstance(self.freeze_step, int) or self.freeze_step < 1:
            raise ValueError(f"freeze_step must be an integer >= 1 (v needs a warm-up), got {self.freeze_step!r}")


def padded_numel(numel: int, world_size: int) -> int:
    """``numel`` rounded up so the buffer splits into ``world_size`` chunks of whole bytes."""
    unit = 8 * world_size
    return -(-numel // unit) * unit


def compressed_bytes(numel: int, world_size: int) -> int:
    """Bytes one rank sends (and receives) in one :func:`compressed_allreduce`."""
    chunk_bytes = padded_numel(numel, world_size) // (8 * world_size)
    return 2 * (world_size - 1) * (chunk_bytes + 4)


def _compress(x: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` as (scale per row, decoded scale * sign); ``length``: real elements per row."""
    scales = x.norm(dim=-1) / length.clamp(min=1).sqrt()
    return scales, scales.unsqueeze(-1) * torch.where(x < 0, -1.0, 1.0)


def compressed_allreduce(comm: Comm, x: torch.Tensor, worker_error: torch.Tensor, server_error: torch.Tensor,
                         tag: str = "momentum") -> torch.Tensor:
    """The mean of ``x`` (flat fp32) over ranks through 1-bit compression with worker and server
    error feedback (step 3). ``worker_error`` (padded numel) and ``server_error`` (this rank's
    chunk) are updated in place; padding never carries error."""
    n, world, rank = x.numel(), comm.world_size, comm.rank
    padded = worker_error.numel()
    chunk = padded // world
    nbytes = chunk // 8
    device = x.device
    # real elements per chunk
    length = (n - torch.arange(world, device=device) * chunk).clamp(0, chunk).to(torch.float32)
    valid = (torch.arange(padded, device=device) < n).view(world, chunk)

    buf = torch.zeros(padded, dtype=torch.float32, device=device)
    buf[:n] = x
    buf.add_(worker_error)
    rows = buf.view(world, chunk)
    scales, decoded = _compress(rows, length)
    worker_error.copy_(((rows - decoded) * valid).reshape(-1))
    send = torch.cat([pack_signs(rows).view(world, nbytes), scales.contiguous().view(torch.uint8).view(world, 4)], 1)
    got = comm.all_to_all(send.reshape(-1), tag=tag).view(world, nbytes + 4)  # row i: rank i's part of my chunk

    signs = unpack_signs(got[:, :nbytes].reshape(-1), world * chunk).view(world, chunk)
    mine = (signs * got[:, nbytes:].contiguous().view(torch.float32)).mean(0) * valid[rank]
    mine.add_(server_error)
    scale, decoded_mine = _compress(mine, length[rank])
    server_error.copy_((mine - decoded_mine) * valid[rank])
    payload = torch.cat([pack_signs(mine), scale.reshape(1).view(torch.uint8)])
    gathered = comm.all_gather(payload, tag=tag)
    out = torch.cat([unpack_signs(g[:nbytes], chunk) * g[nbytes:].clone().view(torch.float32) for g in gathered])
    return out[:n]


@ALGORITHMS.register("onebit-adam")
class OneBitAdam(OwnUpdate):
    name = "onebit-adam"
    Options = OneBitAdamOptions
    options: OneBitAdamOptions

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """fp32 all-reduce of the gradients until freeze_step, then 1-bit chunks: all-to-all + all-gather."""
        chunk = padded_numel(setup.params, setup.workers) // (8 * setup.workers) + 4  # packed signs + one fp32 scale
        return (Sync("grads", "all_reduce", 4.0 * setup.params, stop=options.freeze_step),
                Sync("momentum.a2a", "all_to_all", float(setup.workers * chunk), start=options.freeze_step),
                Sync("momentum.gather", "all_gather", float(chunk), start=options.freeze_step))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.groups = param_groups(self.optimizer, self.params)
        self.numel = sum(p.numel() for p in self.params)
        padded = padded_numel(self.numel, self.comm.world_size)
        zeros = lambda n: torch.zeros(n, dtype=torch.float32, device=self.device)  # noqa: E731
        self.m = zeros(self.numel)
        self.v = zeros(self.numel)
        self.worker_error = zeros(padded)
        self.server_error = zeros(padded // self.comm.world_size)

    @property
    def frozen(self) -> bool:
        """Whether the next step is a compressed one (v frozen)."""
        return self.step_count >= self.options.freeze_step

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Warm-up: average the gradients in fp32 (step 1); afterwards they stay local."""
        grads = self.local_gradients()
        if self.frozen or self.comm.world_size == 1 or not grads:
            return
        flat = flatten([g.float() for g in grads])
        self.comm.all_reduce(flat, average=True, tag="grads")
        unflatten_into(flat, grads)

    @torch.no_grad()
    def update(self) -> None:
        t, frozen = self.step_count + 1, self.frozen
        ms, vs = views(self.m, self.params), views(self.v, self.params)
        for p, group, m, v in zip(self.params, self.groups, ms, vs):
            b1, b2 = group.get("betas", DEFAULT_BETAS)
            g = p.grad.float()
            m.lerp_(g, 1 - b1)
            if not frozen:
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
        if frozen and self.comm.world_size > 1:
            self.m.copy_(compressed_allreduce(self.comm, self.m, self.worker_error, self.server_error))
        t_v = min(t, self.options.freeze_step)
        for p, group, m, v in zip(self.params, self.groups, ms, vs):
            b1, b2 = group.get("betas", DEFAULT_BETAS)
            lr, wd = group["lr"], group.get("weight_decay", 0.0)
            p.mul_(1 - lr * wd)
            denom = (v.sqrt() / (1 - b2 ** t_v) ** 0.5).add_(group.get("eps", DEFAULT_EPS))
            p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "m": self.m.clone(), "v": self.v.clone(),
                "worker_error": self.worker_error.clone(), "server_error": self.server_error.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("m", "v", "worker_error", "server_error"):
            mine = getattr(self, key)
            if state[key].shape != mine.shape:
                raise ValueError(f"{key} has shape {tuple(state[key].shape)}, expected {tuple(mine.shape)}: "
                                 "resume with the same model and number of workers")
            mine.copy_(state[key])
        super().load_state_dict(state)
