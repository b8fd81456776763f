"""Elastic membership for ``gossip`` (D-PSGD, Lian et al., arXiv:1705.09056).

Gossip has no global model: each rank mixes its parameters with its neighbours' every
``period`` steps over a graph of the current members. :class:`GossipSync` is attached to it
(``Algorithm.attach``) and runs its synchronisation points (after each step, and finish):

1. **exchange**: as without ``--elastic`` (``Gossip.gossip``). If a neighbour exchange fails
   (a neighbour died: gloo raises "connection closed by peer"), this rank skips that mixing
   step, sets ``broken/<epoch>`` in the store (ranks blocked in an exchange with it poll that
   key and give up within 50 ms instead of waiting for gloo's timeout: closing a group's
   sockets does not wake them), leaves the group and trains alone until the next quorum
   point. A rank whose exchange succeeded keeps the mix: models need not agree in gossip, so
   a one-sided mix is no harm (each side's mixing row still sums to one);
2. **quorum point** every ``quorum_every`` steps (``GossipOptions``, default 10; every
   member counts steps alike, so all arrive at the same step): the quorum service decides
   the members; when they changed (or a rank's group broke) every member rebuilds the
   process group and the topology over the members in rank order (Metropolis weights over
   the new graph), so departures are routed around from here on;
3. **join**: a joiner copies the lowest-ranked holder's model, inner optimizer, lr schedule
   and step (broadcast over the new group, CRC-32 checked; the ``synced`` event logs its
   fingerprint, equal to the sender's at that quorum). A copy, not the average of all
   models: it costs one broadcast and no all-reduce, and the joiner's model then mixes in
   with its neighbours' at every exchange;
4. **finish**: a last quorum, then the merge of ``merge_at_end`` over the members of that
   quorum (if it fails, e.g. a death during it, each rank keeps its own model: logged).

Nothing is committed or rolled back: the vote only confirms the membership (and the
joiner's state); a failed quorum is redone with the survivors. Time lost per departure:
up to ``quorum_every`` steps without mixing for the ranks whose group broke, plus one group
rebuild.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lowband.comm import group
from lowband.elastic.membership import MEMBERSHIPS, ElasticSync, digest_of
from lowband.elastic.quorum import Decision

log = logging.getLogger("lowband.elastic.membership")


class GossipSync(ElasticSync):
    """Quorum points every ``quorum_every`` steps; the graph follows the members (module docstring)."""

    def _setup(self) -> None:
        self.broken = False  # this rank's group failed: no exchanges until the next quorum
        self.quorums = 0  # sync quorums committed (the same count on every member)

    @property
    def rounds(self) -> int:
        return self.quorums

    @torch.no_grad()
    def after_step(self) -> None:
        """In place of the algorithm's own: step 1 every ``period`` steps, step 2 every ``quorum_every`` steps."""
        a = self.algo
        if a.step_count % a.options.period == 0:
            self.exchange()
        if a.step_count % a.options.quorum_every == 0:
            self._until_committed()

    @torch.no_grad()
    def exchange(self) -> None:
        a = self.algo
        if self.broken:
            a.gossip_steps += 1  # trains alone until the next quorum
            return
        try:
            a.gossip(wait=self._wait_exchange)
        except Exception as err:  # noqa: BLE001 - a neighbour died or hung: skip this mix
            log.warning("replica %s, step %d: gossip exchange failed (%s): training alone until the next quorum",
                        self.client.token, self.loop.step, str(err).splitlines()[0] if str(err) else type(err))
            self.store.set(f"broken/{self.epoch}", self.client.token)  # its neighbours stop waiting for it
            self.broken = True
            self._abandon()
            group.shutdown()
            self.epoch = 0

    def _wait_exchange(self, handle: Any) -> None:
        """Wait for this step's neighbour exchange; give up when a member of the group broke."""
        self._wait(handle.done, (f"broken/{self.epoch}",))
        handle.wait()

    def finish(self) -> None:
        """Step 4: a last quorum, then the final merge over its members."""
        self._until_committed()
        try:
            self.algo.end_training()
        except Exception as err:  # noqa: BLE001 - each rank keeps its own model
            log.warning("replica %s: final merge failed (%s): keeping this rank's model", self.client.token, err)

    # -- ElasticSync's hooks --------------------------------------------------------------
    def _snapshot(self) -> Any:
        return None

    def _rollback(self, snapshot: Any) -> None:
        pass  # nothing was applied

    def _regroup(self, d: Decision) -> None:
        super()._regroup(d)
        self.algo.rebuild_topology()
        self.broken = False

    def _attempt(self, d: Decision) -> Any:
        if d.joiners:
            self._transfer(d)  # a refused state raises: this member votes to skip, the state is sent again
        self.faults.trigger("sync", self.loop.step)
        return d.round + 1

    def _apply(self, d: Decision, work: Any) -> None:
        self.quorums = int(work)

    # -- state of a joiner ----------------------------------------------------------------
    def shared_state(self) -> dict[str, Any]:
        return {**super().shared_state(), "params": [p.detach().clone() for p in self.algo.params]}

    @torch.no_grad()
    def load_shared_state(self, state: dict[str, Any]) -> None:
        a = self.algo
        a.load_state_dict(state["algorithm"])
        a.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        buffers = dict(a.model.named_buffers())
        for name, value in state["buffers"].items():
            buffers[name].copy_(value)
        for p, saved in zip(a.params, state["params"]):
            p.copy_(saved)
        loop = state["loop"]
        self.loop.step, self.loop.clock, self.loop.val_loss = int(loop["step"]), float(loop["clock"]), \
            float(loop["val_loss"])

    @torch.no_grad()
    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of this rank's model (gossip's models differ per rank)."""
        return digest_of(self.algo.params)


MEMBERSHIPS.register("gossip")(GossipSync)
