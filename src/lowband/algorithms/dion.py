"""``dion``: orthonormalized low-rank updates whose data-parallel sync is the low-rank factors.

Ahn, Xu, Abreu, Langford et al., "Dion: Distributed Orthonormalized Updates"
(arXiv:2504.05295; Microsoft's reference implementation: github.com/microsoft/dion). The
algorithm is the optimizer: the inner AdamW's own update is never applied; lr
(scheduler-adjusted), betas, eps and weight decay are read from its param groups at every
step.

Matrix parameters (2-D, and n-D viewed as (shape[0], rest) as PowerSGD does; embeddings
and the output head excepted, see below). X is a x b, B the momentum in the orientation
where it is tall (B = M if a >= b, else M^T; the reference transposes the same way), so
P is (max(a, b), r) and Q is (min(a, b), r). Rank r = ``rank``, or
ceil(``rank_fraction`` * min(a, b)), at most min(a, b). Each rank i keeps its own momentum
M_i ("decoupled momentum"); Q is the same on every rank. At each step:

1. M_i <- M_i + G_i (this rank's clipped gradient);
2. P = mean_i B_i Q: all-reduce of P (max(a, b) r floats);
3. P <- orthonormalize(P) (Householder QR), the same on every rank;
4. R = mean_i B_i^T P: all-reduce of R (min(a, b) r floats);
5. error feedback: B_i <- B_i - (1 - mu) P R^T;
6. Q <- column-normalize(R), R_j / (||R_j|| + 1e-8) (a column of R that is exactly zero
   keeps its old Q column as the next warm start; its update column is zero);
7. X <- (1 - lr wd) X - lr_dion sqrt(a / b) P Q^T (transposed back when B = M^T), with
   lr_dion = ``lr_ratio`` * lr (the paper runs Dion at ~10x AdamW's lr; on the char-GPT
   3 measured best, docs/algorithms/dion.md). The decay per step lr * wd is AdamW's (as
   dist-lion keeps it), and sqrt(a / b) = sqrt(d_out / d_in) is the reference's scale.

Steps 1-5 are linear in M, so mean_i M_i follows exactly the single-process Dion fed the
mean gradient (the paper's equivalence; P, R and X are identical on every rank, the M_i
are not). A matrix whose factors would not be smaller than it, (a + b) r >= a b, has its
gradient averaged instead (the reference's rule) and runs the same steps without steps 2
and 4's collectives.

Non-matrix parameters (biases, norms), embeddings (``nn.Embedding``, also when the output
head is tied to one, as in lowband's GPT) and an untied output head (the model's last
``nn.Linear``) use the scalar optimizer on averaged gradients, as the paper and the
reference recommend: ``adamw`` exactly as ``torch.optim.AdamW``, or ``lion``
(Chen et al., arXiv:2302.06675, betas from the param group), at the group's lr. With
``lion`` the untied head runs at lr / sqrt(d_in), the reference's unembedding rule
(``lm_head_lr_scale``, citing the paper's App. D.2); with ``adamw`` it keeps lr, as the
reference does since microsoft/dion#94 (it scaled both before). Embeddings and the head
take the group's weight decay (the reference's ``train.py`` gives them none).

Gradient clipping (``--grad-clip``) scales each rank's local gradient by its own norm
before anything is averaged, so every rank averages the same clipped contributions.

Bytes per rank per step (ledger; :meth:`Dion.bytes_per_step`): three fp32 ring
all-reduces, each charged round(2 (n - 1) / n * 4 * count):
P of all low-rank matrices, count = sum max(a, b) r; R, count = sum min(a, b) r; the
averaged gradients, count = elements of scalar, embedding, head and dense matrices. The
factors cost (a + b) r * 4 bytes per matrix, PowerSGD's price at the same rank.

Example::

    algo = Dion(model, torch.optim.AdamW(model.parameters(), lr=3e-3), comm, DionOptions(rank=4))
    loss.backward(); algo.step(); algo.zero_grad()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowband.algorithms.base import ALGORITHMS, Options, flatten, unflatten_into, views
from lowband.algorithms.commplan import Setup, Sync
from lowband.algorithms.signs import OwnUpdate, param_groups
from lowband.net.cost import ring_all_reduce
from lowband.net.link import Link

DEFAULT_RANK_FRACTION = 0.25  # the reference's best-practice note: 1/4 is near full rank at 3B
SCALAR_OPTIMIZERS = ("adamw", "lion")
DEFAULT_BETAS = (0.9, 0.95)  # for inner optimizers without betas
DEFAULT_EPS = 1e-8
COLUMN_EPS = 1e-8  # the reference's epsilon of the column normalisation
Q_SEED = 20250407  # the initial Q of matrix k: N(0, 1) from seed Q_SEED + k, the same on every rank


@dataclass(frozen=True)
class DionOptions(Options):
    """``rank`` (fixed r per matrix) or ``rank_fraction`` (r = ceil(fraction * min(a, b)); default
    0.25 when neither is given); ``mu``: momentum (error-feedback) factor; ``lr_ratio``: Dion lr /
    the inner optimizer's lr; ``scalar_optimizer``: for non-matrix parameters, embeddings, head."""

    rank: int | None = None
    rank_fraction: float | None = None
    mu: float = 0.95
    lr_ratio: float = 3.0  # measured on the char-GPT (docs/algorithms/dion.md): 1 and 3 best of 1, 3, 10, 30
    scalar_optimizer: str = "adamw"

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank_fraction is not None:
            raise ValueError("give dion:rank or dion:rank_fraction, not both")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.rank_fraction is not None and not 0 < self.rank_fraction <= 1:
            raise ValueError(f"rank_fraction must be in (0, 1], got {self.rank_fraction}")
        if not 0 <= self.mu < 1:
            raise ValueError(f"mu must be in [0, 1), got {self.mu}")
        if not self.lr_ratio > 0:
            raise ValueError(f"lr_ratio must be > 0 (Dion lr = lr_ratio * lr), got {self.lr_ratio}")
        if self.scalar_optimizer not in SCALAR_OPTIMIZERS:
            raise ValueError(f"scalar_optimizer must be one of {', '.join(SCALAR_OPTIMIZERS)}, "
                             f"got {self.scalar_optimizer!r}")

    def matrix_rank(self, a: int, b: int) -> int:
        """r for an a x b matrix."""
        if self.rank is not None:
            return min(self.rank, a, b)
        fraction = DEFAULT_RANK_FRACTION if self.rank_fraction is None else self.rank_fraction
        return min(math.ceil(fraction * min(a, b)), a, b)


@dataclass
class Matrix:
    """One parameter under Dion: shape (a, b), rank r, orientation, and its scale sqrt(a / b)."""

    param: nn.Parameter
    a: int
    b: int
    r: int
    low_rank: bool  # factors all-reduced; otherwise the gradient is averaged

    @property
    def transposed(self) -> bool:
        return self.a < self.b

    @property
    def p_rows(self) -> int:
        return max(self.a, self.b)

    @property
    def q_rows(self) -> int:
        return min(self.a, self.b)

    def tall(self, m: torch.Tensor) -> torch.Tensor:
        """``m`` (a x b) as the tall view B (no copy)."""
        return m.t() if self.transposed else m


def split_parameters(model: nn.Module, params: list[nn.Parameter]) -> tuple[list[nn.Parameter], set[int], int | None]:
    """(matrix parameters, ids of the scalar ones, id of an untied output head or None)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = id(linears[-1].weight) if linears and id(linears[-1].weight) not in embeddings else None
    scalar = {id(p) for p in params if p.dim() < 2 or id(p) in embeddings or id(p) == head}
    return [p for p in params if id(p) not in scalar], scalar, head


def head_lr_scale(scalar_optimizer: str, head: nn.Parameter) -> float:
    """The untied output head's lr factor: 1 / sqrt(d_in) under Lion (the reference's
    ``lm_head_lr_scale``, the Dion paper's App. D.2), 1 under AdamW."""
    return 1.0 / math.sqrt(head.shape[1]) if scalar_optimizer == "lion" else 1.0


@ALGORITHMS.register("dion")
class Dion(OwnUpdate):
    name = "dion"
    Options = DionOptions
    options: DionOptions

    @classmethod
    def comm_plan(cls, options: Any, setup: Setup) -> tuple[Sync, ...]:
        """P then R (d r floats each per d x d matrix) all-reduced every step, or the fp32 gradients when
        the factors are no smaller (embeddings and 1-D parameters counted as matrices)."""
        d = setup.side
        r = options.matrix_rank(d, d)
        if 2 * d * r >= d * d:
            return (Sync("grads", "all_reduce", 4.0 * setup.params),)
        factors = 4.0 * setup.params / d * r  # params / d^2 matrices, d r floats each
        return (Sync("dion.P", "all_reduce", factors), Sync("dion.R", "all_reduce", factors))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        o = self.options
        matrix_params, scalar_ids, head = split_parameters(self.model, self.params)
        self.matrices: list[Matrix] = []
        for p in matrix_params:
            a, b = p.shape[0], p.numel() // p.shape[0]
            r = o.matrix_rank(a, b)
            self.matrices.append(Matrix(p, a, b, r, (a + b) * r < a * b))
        self.scalars = [p for p in self.params if id(p) in scalar_ids]
        self.scalar_lr_scale = [head_lr_scale(o.scalar_optimizer, p) if id(p) == head else 1.0 for p in self.scalars]
        self.dense = [mx.param for mx in self.matrices if not mx.low_rank]  # averaged like the scalars
        groups = param_groups(self.optimizer, self.params)
        group_of = {id(p): g for p, g in zip(self.params, groups)}
        self.matrix_groups = [group_of[id(mx.param)] for mx in self.matrices]
        self.scalar_groups = [group_of[id(p)] for p in self.scalars]

        device = self.device
        self.momentum = [torch.zeros(mx.a, mx.b, dtype=torch.float32, device=device) for mx in self.matrices]
        # cpu: shared randomness, drawn from a CPU generator (the same on every rank and device), moved once
        self.q = [torch.randn(mx.q_rows, mx.r, generator=torch.Generator().manual_seed(Q_SEED + k)).to(device)
                  for k, mx in enumerate(self.matrices)]
        numel = sum(p.numel() for p in self.scalars)
        self.scalar_m = torch.zeros(numel, dtype=torch.float32, device=device)
        self.scalar_v = torch.zeros(numel if o.scalar_optimizer == "adamw" else 0, dtype=torch.float32, device=device)

    # -- communication plan ------------------------------------------------------------
    def wire_counts(self) -> tuple[int, int, int]:
        """Floats in each step's three all-reduces: (P factors, R factors, averaged gradients)."""
        low = [mx for mx in self.matrices if mx.low_rank]
        averaged = sum(p.numel() for p in self.scalars) + sum(p.numel() for p in self.dense)
        return sum(mx.p_rows * mx.r for mx in low), sum(mx.q_rows * mx.r for mx in low), averaged

    def bytes_per_step(self, world_size: int | None = None) -> int:
        """Bytes one rank sends per step (the ledger's count): one fp32 ring all-reduce per non-empty count."""
        n = self.comm.world_size if world_size is None else world_size
        return sum(ring_all_reduce(4 * c, n, Link()).sent for c in self.wire_counts() if c)

    # -- the step ----------------------------------------------------------------------
    def _before_inner_step(self, *_: Any) -> None:
        """Clip each rank's local gradient by its own norm, then average what is averaged."""
        self.local_gradients()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.reduce_gradients()

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average the gradients of scalar parameters and dense matrices (fp32, one all-reduce)."""
        grads = [p.grad for p in self.scalars + self.dense]
        if self.comm.world_size == 1 or not grads:
            return
        flat = flatten([g.float() for g in grads])
        self.comm.all_reduce(flat, average=True, tag="grads")
        unflatten_into(flat, grads)

    @torch.no_grad()
    def update(self) -> None:
        self._matrix_update()
        self._scalar_update()

    @torch.no_grad()
    def _matrix_update(self) -> None:
        if not self.matrices:
            return
        mu = self.options.mu
        tall = []
        for mx, m in zip(self.matrices, self.momentum):
            m.add_(mx.param.grad.reshape(mx.a, mx.b).float())  # step 1
            tall.append(mx.tall(m))
        ps = [b @ q for b, q in zip(tall, self.q)]
        self._average([p for p, mx in zip(ps, self.matrices) if mx.low_rank], "dion_p")  # step 2
        ps = [torch.linalg.qr(p).Q for p in ps]  # step 3
        rs = [b.t() @ p for b, p in zip(tall, ps)]
        self._average([r for r, mx in zip(rs, self.matrices) if mx.low_rank], "dion_r")  # step 4
        for k, (mx, group, b, p, r) in enumerate(zip(self.matrices, self.matrix_groups, tall, ps, rs)):
            b.addmm_(p, r.t(), alpha=-(1 - mu))  # step 5 (in place in M)
            norms = r.norm(dim=0, keepdim=True)
            q = r / (norms + COLUMN_EPS)  # step 6
            self.q[k] = torch.where(norms > 0, q, self.q[k])
            lr, wd = group["lr"], group.get("weight_decay", 0.0)
            direction = p @ q.t()
            if mx.transposed:
                direction = direction.t()
            x = mx.param
            x.mul_(1 - lr * wd)  # step 7
            x.add_(direction.reshape(x.shape).to(x.dtype), alpha=-self.options.lr_ratio * lr * math.sqrt(mx.a / mx.b))

    def _average(self, tensors: list[torch.Tensor], tag: str) -> None:
        """Replace ``tensors`` in place by their means over ranks (one fp32 all-reduce)."""
        if self.comm.world_size == 1 or not tensors:
            return
        flat = flatten(tensors)
        self.comm.all_reduce(flat, average=True, tag=tag)
        unflatten_into(flat, tensors)

    @torch.no_grad()
    def _scalar_update(self) -> None:
        t = self.step_count + 1
        ms = views(self.scalar_m, self.scalars)
        vs = views(self.scalar_v, self.scalars) if self.options.scalar_optimizer == "adamw" else ms
        for p, group, scale, m, v in zip(self.scalars, self.scalar_groups, self.scalar_lr_scale, ms, vs):
            b1, b2 = group.get("betas", DEFAULT_BETAS)
            lr, wd = group["lr"] * scale, group.get("weight_decay", 0.0)
            g = p.grad.float()
            p.mul_(1 - lr * wd)
            if self.options.scalar_optimizer == "lion":
                p.add_(torch.sign(m * b1 + g * (1 - b1)).to(p.dtype), alpha=-lr)
                m.lerp_(g, 1 - b2)
                continue
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(group.get("eps", DEFAULT_EPS))
            p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "momentum": [m.clone() for m in self.momentum],
                "q": [q.clone() for q in self.q], "scalar_m": self.scalar_m.clone(), "scalar_v": self.scalar_v.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pairs = [(f"momentum[{k}]", m, s) for k, (m, s) in enumerate(zip(self.momentum, state["momentum"]))]
        pairs += [(f"q[{k}]", q, s) for k, (q, s) in enumerate(zip(self.q, state["q"]))]
        pairs += [("scalar_m", self.scalar_m, state["scalar_m"]), ("scalar_v", self.scalar_v, state["scalar_v"])]
        if len(state["momentum"]) != len(self.momentum) or len(state["q"]) != len(self.q):
            raise ValueError(f"the state has {len(state['momentum'])} matrices, expected {len(self.momentum)}: "
                             "resume with the same model and dion options")
        for key, mine, saved in pairs:
            if saved.shape != mine.shape:
                raise ValueError(f"{key} has shape {tuple(saved.shape)}, expected {tuple(mine.shape)}: "
                                 "resume with the same model and dion options")
        for _, mine, saved in pairs:
            mine.copy_(saved)
        super().load_state_dict(state)
