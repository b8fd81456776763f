"""A compressed mean whose bytes per rank stay flat in n: quantised reduce-scatter, then all-gather.

A quantiser's payloads cannot be summed (each carries its own scales), so the plain path
all-gathers them: every rank sends its C(S) bytes to n - 1 others, (n - 1) C(S) per rank, which
grows with n (63x fp32's all-reduce at 1,024 workers for 4-bit QSGD). Here, as in ZeRO++'s
quantised gradient averaging (Wang et al., arXiv:2306.10209, "qgZ": quantise, all-to-all,
reduce, requantise, gather), for every group of the call:

1. pad the flat tensor to ``n`` equal chunks of ``c`` elements; encode each chunk with the
   compressor (key ``<key>/<j>``); this rank's own chunks, decoded, are what error feedback sees;
2. **all-to-all**: chunk ``j``'s payload bytes go to rank ``j`` (n equal slots, each with a
   valid-flag byte after the payload, padded to 8 bytes: a rank whose input failed its guard sends
   zeros flagged invalid);
3. rank ``j`` decodes the n payloads of its chunk and averages the valid ones;
4. it **re-encodes** that reduced chunk (key ``<key>/reduced``): a second quantisation, whose
   error is not fed back (as in ZeRO++), with the compressor itself or, with the algorithm option
   ``requant`` (``ddp:compress=qsgd:bits=4,requant=qsgd:bits=8``), a finer requantizable one: the
   reduced chunk is 1/n of the tensor, so its bits cost (n - 1)/n x its size on the gather;
5. **all-gather** of the re-encoded chunks (tag ``<tag>.shards``); every rank decodes all n and
   concatenates them: the mean, the same on every rank.

Bytes per rank: (n - 1)/n C(S) in step 2 plus (n - 1) C(S/n) in step 5, about 2 (n - 1)/n C(S),
against (n - 1) C(S): equal at n = 2, 1.5x fewer at 4, n/2 fewer in general. Latency: two ops of
n - 1 hops each, against one. :func:`prefer` chooses between the paths by the cost model of the
rank's link (bytes alone without one). Used by :class:`~lowband.comm.aggregate.Aggregator` for
compressors that declare ``requantizable`` under the plain mean, without checksums or a
simulated attack on the wire (those need every rank's own payload: all-gather).
"""

from __future__ import annotations

import math

import torch

from lowband.comm import guards
from lowband.comm.buffers import as_bytes, cut_payloads
from lowband.comm.comm import Comm
from lowband.compress.base import Compressor
from lowband.net import cost
from lowband.net.link import Link

SHARDS = ".shards"  # tag suffix of step 5's all-gather: its per-rank payload is 1/n of the tensor's (predict/)


def prefer(payload_bytes: int, n: int, link: Link) -> bool:
    """Whether the two-phase path beats all-gathering ``payload_bytes`` per rank among ``n`` ranks on
    ``link``: by modelled seconds, or by bytes where the link costs nothing (no emulation)."""
    if n < 3:
        return False  # the same bytes at n = 2, two quantisations and two latencies
    gather = cost.ring_all_gather(payload_bytes, n, link)
    scatter = cost.all_to_all(payload_bytes, n, link)
    shards = cost.ring_all_gather(math.ceil(payload_bytes / n), n, link)
    two = scatter.seconds + shards.seconds
    if two == gather.seconds:
        return scatter.sent + shards.sent < gather.sent
    return two < gather.seconds


class TwoPhase:
    """The path of the module docstring for one :class:`~lowband.comm.aggregate.Aggregator`."""

    def __init__(self, comm: Comm, compressor: Compressor, tag: str, requant: Compressor | None = None) -> None:
        self.comm, self.compressor, self.tag = comm, compressor, tag
        self.requant = requant if requant is not None else compressor  # step 4's (None: the same compressor)
        if requant is not None:
            requant.for_rank(comm.rank)

    def mean(self, inputs: dict[str, torch.Tensor], valid: bool,
             step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{key: (mean over valid ranks, this rank's own decoded input)}`` for every group."""
        n, rank = self.comm.world_size, self.comm.rank
        chunks = {key: _chunks(x, n) for key, x in inputs.items()}
        payloads = {key: [self.compressor.encode(c, f"{key}/{j}") for j, c in enumerate(cs)]
                    for key, cs in chunks.items()}
        own = {key: _joined([self.compressor.decode(p) for p in ps], inputs[key]) for key, ps in payloads.items()}
        slots = [as_bytes([t for key in inputs for t in payloads[key][j].tensors]) for j in range(n)]
        width = slots[0].numel()
        stride = (width + 1 + 7) // 8 * 8  # payload, the valid flag, padding: every slot 8-byte aligned
        send = torch.zeros(n, stride, dtype=torch.uint8, device=slots[0].device)
        for j, s in enumerate(slots):
            send[j, :width] = s
        send[:, width] = int(valid)
        rows = self.comm.all_to_all(send.view(-1), tag=self.tag).view(n, stride)
        flags = rows[:, width].tolist()  # host sync, one per call: who contributed
        keep = [r for r in range(n) if flags[r] == 1]
        if not keep:
            raise guards.refuse(f"{self.tag}: no rank has a valid contribution")
        if len(keep) < n:
            guards.warn_excluded(rank, self.tag, step, [r for r in range(n) if r not in keep], "non-finite")
        templates = [payloads[key][rank] for key in inputs]
        reduced = [torch.stack([self.compressor.decode(pieces[i]) for pieces in
                                (cut_payloads(rows[r, :width], templates) for r in keep)]).mean(0)
                   for i in range(len(templates))]
        again = [self.requant.encode(r, f"{key}/reduced") for key, r in zip(inputs, reduced)]
        gathered = self.comm.all_gather(as_bytes([t for p in again for t in p.tensors]), tag=self.tag + SHARDS)
        shards = [cut_payloads(buf, again) for buf in gathered]
        return {key: (_joined([self.requant.decode(s[i]) for s in shards], inputs[key]), own[key])
                for i, key in enumerate(inputs)}


def _chunks(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``x`` flattened, zero-padded to ``n`` chunks of equal length."""
    flat = x.detach().reshape(-1)
    size = max(1, math.ceil(flat.numel() / n))
    padded = torch.zeros(size * n, dtype=flat.dtype, device=flat.device)
    padded[:flat.numel()] = flat
    return list(padded.view(n, size).unbind(0))


def _joined(pieces: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Decoded chunks back into ``like``'s shape (the padding dropped)."""
    return torch.cat([p.reshape(-1) for p in pieces])[:like.numel()].view(like.shape).to(like.dtype)
