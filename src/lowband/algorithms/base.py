"""What every synchronisation algorithm is: a wrapper around (model, inner optimizer, comm).

The training loop drives an algorithm like an optimizer::

    algo = ALGORITHMS.get("diloco")(model, torch.optim.AdamW(model.parameters()), comm, DiLoCoOptions())
    for batch in batches:
        loss = model(*batch)[1]
        loss.backward()
        algo.step()          # reduce_gradients(); inner step; after_step()
        algo.zero_grad()

``reduce_gradients`` runs between backward and the inner step (per-step gradient
methods), ``after_step`` after it (local-update methods). ``evaluation_parameters`` is the
model users would deploy at this point (DiLoCo: the last synchronised global model).
``state_dict`` covers all communication state; the inner optimizer saves itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from lowband.adversity.attacks import ATTACKS, NoAttack
from lowband.adversity.injection import payload_faults
from lowband.comm import Comm
from lowband.comm.aggregate import Aggregator
from lowband.comm.hierarchy import HierarchicalAggregator
from lowband.algorithms.commplan import two_phase_capable
from lowband.comm.robust import RULES, Mean
from lowband.compress import COMPRESSORS, build, parse_spec
from lowband.feedback import FEEDBACK
from lowband.registry import Registry


@dataclass(frozen=True)
class Options:
    """Base for algorithm options: frozen, validated in ``__post_init__``."""


@dataclass(frozen=True)
class SyncOptions(Options):
    """Options of an algorithm that averages tensors through an :class:`Aggregator`."""

    compress: str = "identity"  # a compressor spec: 'topk:ratio=0.01', 'powersgd:rank=2'
    feedback: str = "none"  # 'none', 'ef', ...
    small_numel: int = 4096  # tensors smaller than this are bucketed together before compressing
    bucket_mb: float = 25.0  # largest single collective
    aggregate: str = "mean"  # a rule spec (docs/robustness.md): 'median', 'trimmed-mean:trim=0.25', 'centered-clip:tau=1'
    attack: str = "none"  # simulated Byzantine ranks: 'signflip:ranks=0', 'scale:ranks=0+5,factor=-10', 'noise:std=1'
    checksum: bool = False  # CRC-32 per all-gathered payload + one tiny agreement all-reduce per call
    hierarchical: bool = False  # sum inside each --sites site, one compressed update per site across (Holmes)
    # how non-summable payloads travel: 'auto' (the cost model: all-gather, or for a requantizable
    # quantiser the two-phase reduce-scatter whose bytes stay flat in n), 'all_gather', 'two_phase'
    collective: str = "auto"
    # the two-phase path's second quantisation, of the reduced shards ('': the compressor again; a finer
    # requantizable spec such as 'qsgd:bits=8' or 'int8' halves the added error for more bytes on the gather)
    requant: str = ""

    def __post_init__(self) -> None:
        parse_spec(self.compress, COMPRESSORS)  # raises with the valid names and options
        parse_spec(self.feedback, FEEDBACK)
        build(self.aggregate, RULES)  # validates the rule's options too
        build(self.attack, ATTACKS)
        if self.small_numel < 0:
            raise ValueError(f"small_numel must be >= 0, got {self.small_numel}")
        if self.bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {self.bucket_mb}")
        if self.collective not in ("auto", "all_gather", "two_phase"):
            raise ValueError(f"collective must be auto, all_gather or two_phase, got {self.collective!r}")
        if self.collective == "two_phase" and not two_phase_capable(self):
            raise ValueError("collective=two_phase needs a requantizable compressor (qsgd, int8, terngrad) under "
                             "aggregate=mean, without checksum or attack: use collective=auto")
        if self.requant and not build(self.requant, COMPRESSORS).requantizable:
            raise ValueError(f"requant={self.requant!r} must be a requantizable compressor (qsgd, int8, terngrad)")
        if self.hierarchical:
            self._check_hierarchical()

    def _check_hierarchical(self) -> None:
        """What needs every rank's own contribution cannot see it once a site has summed it."""
        if not isinstance(build(self.aggregate, RULES), Mean):
            raise ValueError(f"aggregate={self.aggregate!r} needs every rank's contribution, which hierarchical "
                             "averaging sums inside each site first: use aggregate=mean or drop --hierarchical")
        if self.checksum:
            raise ValueError("checksum covers every rank's all-gathered payload; hierarchical averaging sends one "
                             "per site: drop --checksum or --hierarchical")
        attack = build(self.attack, ATTACKS)
        if not isinstance(attack, NoAttack) and not getattr(attack, "data_side", False):
            raise ValueError(f"attack={self.attack!r} alters every rank's update, which hierarchical averaging sums "
                             "inside each site first: drop --attack (labelflip works) or --hierarchical")


class Algorithm:
    """Base class; subclasses register with ``@ALGORITHMS.register(name)`` and set ``Options``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    # its state_dict is the same on every rank except the model, inner optimizer and feedback
    # residuals, so a checkpoint can be resumed at another world size (lowband.train.checkpoint)
    reshardable: ClassVar[bool] = False
    zeroth_order: ClassVar[bool] = False  # True: driven by zo_step(closure) instead of backward + step()
    deterministic: ClassVar[bool] = True  # False: the result depends on timing (who arrives first), not only seeds
    # how lowband.elastic drives it through membership changes: the name of a membership protocol
    # (lowband.elastic.MEMBERSHIPS: 'rounds', 'delayed', ...), declared by each class that supports
    # --elastic ('' = it does not: --elastic refuses it with one line)
    elastic: ClassVar[str] = ""
    membership: Any = None  # the membership composed with this algorithm (attach), if any

    @classmethod
    def comm_plan(cls, options: Any, setup: Any) -> tuple[Any, ...]:
        """What one rank sends, as the planner charges it (:mod:`lowband.algorithms.commplan`): a tuple of
        ``Sync`` events built from ``options`` and the ``Setup`` (model size, workers, link). Every
        registered algorithm declares its own next to the code that communicates."""
        raise ValueError(f"algorithm {cls.name!r} declares no communication plan: define comm_plan in its class "
                         f"(lowband.algorithms.commplan)")

    @classmethod
    def tail_steps(cls, options: Any, steps: int) -> int:
        """Inner steps at the end of a ``steps``-step run that no synchronisation averages (a local-update
        method whose period does not divide the run; ``lowband train`` warns). Default: none."""
        return 0

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, comm: Comm,
                 options: Options | None = None, grad_clip: float = 0.0) -> None:
        self.model, self.optimizer, self.comm = model, optimizer, comm
        self.options = options if options is not None else type(self).Options()
        self.grad_clip = grad_clip
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        # where the algorithm's state and every tensor it makes live (lowband.devices, rule 1); the
        # CPU for a model without trainable parameters
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.step_count = 0
        self.broadcast_parameters()

    # -- driven by the training loop ---------------------------------------------------
    def step(self) -> None:
        """One training step after ``loss.backward()``: reduce, clip, inner step, synchronise."""
        self._before_inner_step()
        self.optimizer.step()
        self._after_inner_step()

    def zo_step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One step of a zeroth-order algorithm (``zeroth_order``) from a closure returning the loss
        (no backward); returns the loss to report. Gradient-based algorithms have none."""
        raise TypeError(f"{self.name} is trained with loss.backward() and algo.step(), not zo_step")

    def _before_inner_step(self, *_: Any) -> None:
        self.reduce_gradients()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)

    def _after_inner_step(self, *_: Any) -> None:
        self.step_count += 1
        (self.after_step if self.membership is None else self.membership.after_step)()

    # -- synchronisation points: where a membership composes with the algorithm ----------------
    def attach(self, membership: Any) -> None:
        """Drive this algorithm's synchronisation points through ``membership`` (an elastic membership,
        :mod:`lowband.elastic`): from now on the point after each inner step calls
        ``membership.after_step()``, :meth:`sync_point` calls ``membership.synchronise()`` and
        :meth:`finish` calls ``membership.finish()``; the membership runs its quorum around them and
        calls this algorithm's own :meth:`after_step`, :meth:`synchronise` and :meth:`end_training`
        when they are due. Nothing of the algorithm is replaced."""
        self.membership = membership

    def sync_point(self) -> None:
        """Where the algorithm synchronises (DiLoCo: every H steps): its own :meth:`synchronise`, or
        the attached membership's (a quorum round around it)."""
        (self.synchronise if self.membership is None else self.membership.synchronise)()

    def synchronise(self) -> None:
        """One synchronisation with the other ranks (the local-update family); default: nothing
        (per-step methods communicate in :meth:`reduce_gradients`)."""

    def __enter__(self) -> "Algorithm":
        """Context-manager use (torchft's style): inside, plain ``optimizer.step()`` does it all.

            with ALGORITHMS.get("diloco")(model, opt, comm) as algo:
                for x, y in batches:
                    model(x, y)[1].backward(); opt.step(); opt.zero_grad()
        """
        self._hooks = [self.optimizer.register_step_pre_hook(self._before_inner_step),
                       self.optimizer.register_step_post_hook(self._after_inner_step)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []
        if exc[0] is None:
            self.finish()

    # -- compute-aware work (DiLoCo's budget="speed" overrides these) -------------------------
    @property
    def compute_aware(self) -> bool:
        """True when this rank may sit out iterations (then tokens count its inner steps only)."""
        return False

    def wants_compute(self) -> bool:
        """Whether this rank computes a step at this iteration (else the loop calls :meth:`idle`)."""
        return True

    def idle(self) -> None:
        """An iteration this rank sits out (only when :meth:`wants_compute` declines)."""
        raise RuntimeError(f"{self.name} never sits out an iteration: call step()")

    def record_compute(self, seconds: float) -> None:
        """The loop's compute seconds for the step in progress, reported before :meth:`step`."""

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def reduce_gradients(self) -> None:
        """Between backward and the inner step; default: nothing (local gradients)."""

    def after_step(self) -> None:
        """After the inner step; default: nothing."""

    def finish(self) -> None:
        """At the end of training: :meth:`end_training`, or the attached membership's last quorum
        around it. Subclasses override :meth:`end_training`, not this."""
        (self.end_training if self.membership is None else self.membership.finish)()

    def end_training(self) -> None:
        """The algorithm's own end of training: complete anything in flight, stop background threads."""
        aggregator = getattr(self, "aggregator", None)
        if aggregator is not None:
            aggregator.close()

    def metrics(self) -> dict[str, Any]:
        """Extra numbers for the metrics row at each evaluation (gossip: consensus distance;
        by default the aggregator's compressor's, e.g. lgreco's choices). Collective on every
        rank; monitoring traffic goes through ``Comm.monitor_all_reduce``."""
        aggregator = getattr(self, "aggregator", None)
        return aggregator.metrics() if aggregator is not None else {}

    @contextlib.contextmanager
    def evaluation_parameters(self) -> Iterator[None]:
        """Within this context the model holds the parameters to evaluate (default: its own)."""
        yield

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])

    # -- helpers ------------------------------------------------------------------------
    def build_aggregator(self, tag: str) -> Aggregator | HierarchicalAggregator:
        """The compress/feedback pipeline of this algorithm's :class:`SyncOptions`; with
        ``hierarchical``, summed inside each site and through the pipeline across the leaders."""
        o = self.options
        assert isinstance(o, SyncOptions), f"{type(self).__name__} options do not configure compression"

        def pipeline(comm: Comm) -> Aggregator:
            compressor, rule = build(o.compress, COMPRESSORS), build(o.aggregate, RULES)
            summed = compressor.summable and isinstance(rule, Mean)  # an all-reduce: no per-rank bytes to spoil
            attack = payload_faults(build(o.attack, ATTACKS), summed)  # and LOWBAND_FAULT's payload faults, if any
            collective = "auto" if compressor.summable else o.collective  # summable: always all-reduced
            return Aggregator(comm, compressor, build(o.feedback, FEEDBACK), tag=tag, small_numel=o.small_numel,
                              bucket_mb=o.bucket_mb, collective=collective, rule=rule, attack=attack,
                              checksum=o.checksum, requant=build(o.requant, COMPRESSORS) if o.requant else None)

        return HierarchicalAggregator(self.comm, pipeline, tag, o.bucket_mb) if o.hierarchical else pipeline(self.comm)

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        """Start every rank from rank 0's parameters and buffers (as torch DDP does)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        if self.comm.world_size == 1 or not tensors:
            return
        flat = flatten([t.detach() for t in tensors])
        self.comm.broadcast(flat, src=0, tag="init")
        unflatten_into(flat, tensors)


@torch.no_grad()
def consensus_distance(comm: Comm, params: list[torch.Tensor]) -> float:
    """mean_i ||x_i - mean_j x_j|| (L2 over all parameters, float64) for methods whose ranks'
    models differ (gossip, noloco); collective, through uncharged monitoring traffic."""
    n = comm.world_size
    flat = flatten([p.detach() for p in params]).double()
    mean = comm.monitor_all_reduce(flat.clone()).div_(n)
    distance = torch.linalg.vector_norm(flat - mean).reshape(1)
    # host sync: the metrics row takes a Python float (once per evaluation, not per step)
    return comm.monitor_all_reduce(distance).item() / n


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One contiguous 1-D copy of ``tensors`` (all the same dtype)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive slices of ``flat`` shaped like each tensor of ``like`` (no copy)."""
    out, offset = [], 0
    for t in like:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


@torch.no_grad()
def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into ``tensors``."""
    for t, v in zip(tensors, views(flat, tensors)):
        t.copy_(v)


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")
