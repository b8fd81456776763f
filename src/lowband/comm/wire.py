"""The aggregator's payloads on the wire: summed, or gathered as bytes with a validity trailer; registers nothing.

:class:`PayloadWire` moves one round of a call's payloads (every group's, in one flat buffer chunked to
``bucket_bytes``) through :class:`lowband.comm.comm.Comm`:

1. :meth:`PayloadWire.all_reduce`: the tensors of each dtype concatenated and all-reduced (summable
   compressors); ``poison`` fills them with NaN first, so every rank sees an invalid sender's round;
2. :meth:`PayloadWire.all_gather`: every rank's tensors as one byte buffer padded to the longest rank's
   (sizes all-gathered first when a compressor's payload sizes vary), sealed with a valid-flag byte (and a
   CRC-32 with ``checksum``, :mod:`lowband.comm.guards`), passed through the ``attack`` hook
   (:mod:`lowband.comm.tamper`), all-gathered, verified, and cut back into each rank's payloads;
3. :meth:`PayloadWire.agree`: which ranks count; with ``checksum`` one all-reduce of n flags makes every rank
   exclude a sender any receiver saw corrupted, so all ranks stay equal.

Split from :mod:`lowband.comm.aggregate`, which decides what to send and how to combine it.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from lowband.comm import guards
from lowband.comm.buffers import as_bytes, chunks, cut_payloads
from lowband.comm.comm import Comm
from lowband.comm.tamper import Tamper
from lowband.compress.base import Payload


class PayloadWire:
    """One aggregator's collectives for its payloads (``tag`` names them in the ledger)."""

    def __init__(self, comm: Comm, tag: str, bucket_bytes: int, attack: Tamper, checksum: bool,
                 fixed_size: bool = True) -> None:
        self.comm, self.tag, self.bucket_bytes = comm, tag, bucket_bytes
        self.attack, self.checksum, self.fixed_size = attack, checksum, fixed_size

    def all_reduce(self, pending: dict[str, Payload], poison: bool = False) -> dict[str, Payload]:
        """The payloads summed over ranks (views of one buffer per dtype); ``poison``: NaN-filled first."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        for payload in pending.values():
            for t in payload.tensors:
                by_dtype[t.dtype].append(t)
        summed: dict[int, torch.Tensor] = {}
        for tensors in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            if poison:
                guards.poison_(flat)
            for chunk in chunks(flat, self.bucket_bytes):
                self.comm.all_reduce(chunk, tag=self.tag)
            offset = 0
            for t in tensors:
                summed[id(t)] = flat[offset:offset + t.numel()].view_as(t)
                offset += t.numel()
        return {key: Payload([summed[id(t)] for t in p.tensors], p.ctx) for key, p in pending.items()}

    def all_gather(self, pending: dict[str, Payload], valid: bool = True,
                   step: int = 0) -> tuple[dict[str, list[Payload]], list[bool]]:
        """Every rank's payloads, and which ranks' are valid (flag byte, CRC-32 with ``checksum``)."""
        n = self.comm.world_size
        tensors = [t.contiguous() for p in pending.values() for t in p.tensors]
        if n == 1 or not tensors:
            return {key: [p] * n for key, p in pending.items()}, [True] * n
        sizes = self.gathered_sizes(tensors)  # [rank][tensor] element counts, on the host
        own = as_bytes(tensors)
        width = max(sum(c * t.element_size() for c, t in zip(row, tensors)) for row in sizes)
        padded = torch.zeros(width, dtype=torch.uint8, device=own.device)
        padded[:own.numel()] = own
        parts: list[list[torch.Tensor]] = [[] for _ in range(n)]
        sealed = self.attack.on_wire(guards.seal(padded, valid, self.checksum), own.numel(), self.comm.rank, step)
        for chunk in chunks(sealed, self.bucket_bytes):
            gathered = self.comm.all_gather(chunk, tag=self.tag)
            for r, piece in enumerate(gathered):
                parts[r].append(piece)
        per_rank = [torch.cat(p) for p in parts]
        guards.apply_corruptions(per_rank, width, self.comm.rank)
        mask = self.agree(guards.verify_all(per_rank, width, self.checksum), step, own.device)
        out: dict[str, list[Payload]] = {key: [] for key in pending}
        for r, buf in enumerate(per_rank):
            for key, payload in zip(pending, cut_payloads(buf, list(pending.values()), sizes[r])):
                out[key].append(payload)
        return out, mask

    def agree(self, reasons: list[str | None], step: int, device: torch.device) -> list[bool]:
        """Which ranks' contributions count. With ``checksum``, one all-reduce of n int32 flags (on
        ``device``, the payload's) makes every rank exclude a sender that any receiver saw corrupted
        (ranks must stay equal)."""
        bad = [int(r is not None) for r in reasons]
        if self.checksum:
            flags = torch.tensor(bad, dtype=torch.int32, device=device)
            self.comm.all_reduce(flags, tag=f"{self.tag}.valid")
            bad = flags.tolist()  # host sync: the agreed exclusions
        excluded = [r for r in range(len(reasons)) if bad[r] > 0]
        if len(excluded) == len(reasons):
            raise guards.refuse(f"{self.tag}: no rank has a valid contribution")
        if excluded:
            why = ", ".join(sorted({reasons[r] or "checksum seen by another rank" for r in excluded}))
            guards.warn_excluded(self.comm.rank, self.tag, step, excluded, why)
        return [r not in excluded for r in range(len(reasons))]

    def gathered_sizes(self, tensors: list[torch.Tensor]) -> list[list[int]]:
        """Element counts of every payload tensor on every rank (one small all-gather if they vary)."""
        own = [t.numel() for t in tensors]
        if self.fixed_size or self.comm.world_size == 1:
            return [own] * self.comm.world_size
        sent = torch.tensor(own, dtype=torch.int64, device=tensors[0].device)
        # host sync: the receive buffers' sizes
        return torch.stack(self.comm.all_gather(sent, tag=f"{self.tag}.sizes")).tolist()
