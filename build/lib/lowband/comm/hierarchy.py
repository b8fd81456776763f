"""Hierarchical averaging across sites (``--hierarchical``): reduce inside, one update across.

Holmes (Yang et al., "Holmes: Towards Distributed Training Across Clusters with
Heterogeneous NIC Environment", arXiv:2312.03549) keeps the heavy traffic inside the fast
groups and sends one update per group across the slow link. :class:`HierarchicalAggregator`
does this for the averages of lowband's aggregator (gradients, DiLoCo's outer gradients),
with the sites of the emulated network (``--sites``; each site's **leader** is its lowest rank):

1. **sum inside the site**: one all-reduce of every tensor, uncompressed in its own dtype,
   over the site's fast links (chunked to ``bucket_mb``; tag ``<tag>.site``);
2. **across the sites**: each leader scales its site's sum by ``g / n`` (g sites, n ranks)
   and the leaders average those through a normal :class:`Aggregator` with the algorithm's
   compressor and feedback over the WAN (tag ``<tag>``): ``(1/g) sum_s (g/n) S_s = (1/n) sum_i x_i``,
   the flat mean, for sites of any sizes (3+1 as well as 2+2);
3. **broadcast inside the site** from the leader (tag ``<tag>.bcast``).

Every rank ends with the same mean. The sub-groups are ``dist.new_group``'s (every rank
creates every group, in site order, then the leaders' group); their :class:`Comm` charge the
algorithm Comm's ledger, each on its own network (``Network.subset``: a site's NICs; the
leaders' links through the WAN). Only leaders send across the WAN.

Async: :meth:`mean_async` runs the three steps on this aggregator's thread, in call order;
``wait()`` blocks the training thread and charges its wait to the algorithm's Comm.

State: the compressor and feedback state (PowerSGD's Q, error-feedback residuals) lives on
the leaders only, for their site's scaled sum; non-leaders hold none and save empty state.
A checkpoint therefore resumes with the same ``--sites`` (which a resume requires anyway).

Faults: a non-finite input makes its whole site's sum non-finite; the leaders' aggregator then
excludes that site for the round (and rescales over the others, as it does for ranks). Robust
rules, checksums and update-side attacks need every rank's own contribution: refused
(:class:`lowband.algorithms.base.SyncOptions`).

Example::

    agg = HierarchicalAggregator(comm, lambda c: Aggregator(c, build("powersgd:rank=4", COMPRESSORS),
                                                            build("ef", FEEDBACK), tag="grads"), tag="grads")
    agg.mean_([(name, p.grad) for name, p in model.named_parameters()])
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from lowband.comm import guards
from lowband.comm.aggregate import Aggregator, PendingMean
from lowband.comm.buffers import chunks, write_back
from lowband.comm.comm import Comm

log = logging.getLogger(__name__)


class HierarchicalAggregator:
    """Mean of named tensors over all ranks: inside each site, across the leaders, back (module doc).

    ``across(comm)`` builds the leaders' :class:`Aggregator` over ``comm`` (called on leaders only).
    ``comm.network`` must place the ranks at several sites."""

    def __init__(self, comm: Comm, across: Callable[[Comm], Aggregator], tag: str = "grads",
                 bucket_mb: float = 25.0) -> None:
        network = comm.network
        if network is None or not network.multisite:
            raise ValueError("hierarchical averaging needs workers at several sites: give --sites (e.g. 0,0,1,1) "
                             "and --wan-bandwidth, or drop --hierarchical")
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.comm, self.tag, self.bucket_bytes = comm, tag, int(bucket_mb * 1e6)
        sites = sorted(set(network.sites or ()))
        self.sites = [[r for r in range(comm.world_size) if network.site(r) == s] for s in sites]
        self.leaders = [members[0] for members in self.sites]
        self.members = next(m for m in self.sites if comm.rank in m)  # this rank's site
        self.leader = comm.rank == self.members[0]
        groups = [_new_group(comm, members) for members in self.sites]  # every rank, same order
        leaders_group = _new_group(comm, self.leaders)
        here = self.sites.index(self.members)
        self.site_comm = Comm(groups[here], network.subset(self.members), ledger=comm.ledger)
        self.leader_comm = Comm(leaders_group, network.subset(self.leaders), ledger=comm.ledger) \
            if self.leader else None
        self.across = across(self.leader_comm) if self.leader_comm is not None else None
        self.scale = len(self.sites) / comm.world_size  # g / n: the leaders' mean is then the flat mean
        self._pool: ThreadPoolExecutor | None = None

    # -- the Aggregator interface -------------------------------------------------------------
    def mean_(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Replace every tensor of ``named`` in place with its mean over all ranks (blocks)."""
        self.mean_async(named).wait()

    def mean_async(self, named: Sequence[tuple[str, torch.Tensor]]) -> PendingMean:
        """Start :meth:`mean_` on this aggregator's thread; the tensors are written back by ``wait()``."""
        bad = guards.first_non_finite(named)
        step = self.comm.ledger.step
        if bad is not None:
            log.warning("rank %d step %d: %s %s; its site's contribution is excluded from the round",
                        self.comm.rank, step, self.tag, bad)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowband-hierarchy")
        return PendingMean(self.comm, self._pool.submit(self._run, list(named), step))

    def state_dict(self) -> dict[str, Any]:
        """The leaders' compressor, feedback and rule state; empty on the other ranks."""
        if self.across is None:
            return {"compressor": {}, "feedback": {}, "rule": {}}
        return self.across.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.across is not None:
            self.across.load_state_dict(state)

    def metrics(self) -> dict[str, Any]:
        """The leaders' compressor's numbers (rank 0 is always a leader); none elsewhere."""
        return self.across.metrics() if self.across is not None else {}

    def close(self) -> None:
        """Stop the threads of this aggregator and the leaders' (the sub-groups' Comm stay usable)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.across is not None:
            self.across.close()

    # -- the three steps ----------------------------------------------------------------------
    def _run(self, named: list[tuple[str, torch.Tensor]], step: int) -> None:
        with torch.no_grad(), self.site_comm.background(step):
            tensors = [t for _, t in named]
            for flat, members in _flats(tensors):
                for chunk in chunks(flat, self.bucket_bytes):
                    self.site_comm.all_reduce(chunk, tag=f"{self.tag}.site")  # 1. the site's sum
                flat.mul_(self.scale)
                write_back(flat, members)
            failure: BaseException | None = None
            if self.across is not None:
                try:
                    self.across.mean_at(named, step)  # 2. the leaders' (compressed) mean
                except guards.NonFiniteError as err:  # every site excluded: tell the site, then raise
                    failure = err
                    for t in tensors:
                        t.fill_(float("nan"))
            for flat, members in _flats(tensors):
                for chunk in chunks(flat, self.bucket_bytes):
                    self.site_comm.broadcast(chunk, src=0, tag=f"{self.tag}.bcast")  # 3. from the leader
                if failure is None and not guards.all_finite([flat]):  # host sync: did every site fail?
                    failure = guards.refuse(f"{self.tag}: every site's contribution is non-finite")
                write_back(flat, members)
            if failure is not None:
                raise failure


def _new_group(comm: Comm, ranks: list[int]) -> dist.ProcessGroup | None:
    """``dist.new_group`` over ``ranks`` of ``comm``'s group (a collective: every rank calls it)."""
    if comm.group is not None:
        ranks = [dist.get_global_rank(comm.group, r) for r in ranks]
    return dist.new_group(ranks)


def _flats(tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """One flat copy per dtype of ``tensors``, with the tensors it came from (in order)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        by_dtype[t.dtype].append(t)
    return [(torch.cat([t.reshape(-1) for t in members]), members) for members in by_dtype.values()]
