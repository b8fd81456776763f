"""Peers: other libraries' algorithms run on lowband's task, over lowband's emulated link.

A peer writes the same run-folder format as ``lowband train`` (``<run>/<label>/rank<r>.jsonl``,
``ledger_rank<r>.jsonl``, its label added to ``run.json``), so ``lowband report`` puts it
next to lowband's own algorithms. See ``docs/peers.md``.

* :mod:`lowband.bench.peers.torchft_diloco`: torchft 0.2.0's DiLoCo and Streaming DiLoCo
  (``torchft-diloco``, ``torchft-streaming``).

Peers are optional: importing this package needs none of them.
"""
