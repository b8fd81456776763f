"""Sparsifiers through the aggregator on a real 2-rank gloo process group."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.comm import Comm
from lowband.comm.aggregate import Aggregator, small_key
from lowband.comm.group import init_from_env, shutdown
from lowband.compress import COMPRESSORS, build
from lowband.feedback import FEEDBACK
from lowband.train.launch import launch

SPECS = ["threshold:tau=1", "randomk:ratio=0.1,seed=4", "topk:ratio=0.05", "dgc:ratio=0.05"]
SHAPES = [("embed.weight", (67, 31)), ("block.weight", (1001,)), ("block.bias", (13,)), ("head.weight", (3, 5, 7))]
ROUNDS = 2


def inputs(rank: int, round_: int) -> list[tuple[str, torch.Tensor]]:
    """Rank ``rank``'s tensors in round ``round_``: every rank can regenerate every other's."""
    g = torch.Generator().manual_seed(1000 * rank + round_)
    return [(name, torch.randn(shape, generator=g)) for name, shape in SHAPES]


@record
def worker() -> dict[str, Any]:
    """Per spec: [max |aggregated - mean over ranks of local decode(encode)| per round, own payload bytes]."""
    rank, world = init_from_env()
    try:
        comm, out = Comm(), {}
        for spec in SPECS:
            agg = Aggregator(comm, build(spec, COMPRESSORS), build("none", FEEDBACK), small_numel=100)
            replicas = [build(spec, COMPRESSORS) for _ in range(world)]  # every rank's compressor, simulated
            errors, sizes = [], []
            for round_ in range(ROUNDS):
                named = inputs(rank, round_)
                expected = {}
                for r, replica in enumerate(replicas):
                    for name, x in inputs(r, round_):
                        if x.numel() < 100:  # bucketed below
                            continue
                        payload = replica.encode(x, name)
                        if r == rank:
                            sizes.append(payload.nbytes)
                        expected[name] = expected.get(name, 0) + replica.decode(payload) / world
                small = [x for _, x in named if x.numel() < 100]
                for r, replica in enumerate(replicas):  # the bucket of small tensors, as the aggregator builds it
                    cat = torch.cat([x.reshape(-1) for _, x in inputs(r, round_) if x.numel() < 100])
                    key = small_key(torch.float32, [n for n, x in inputs(r, round_) if x.numel() < 100])
                    bucket = replica.decode(replica.encode(cat, key)) / world
                    expected["small"] = expected.get("small", 0) + bucket
                agg.mean_(named)
                got_small = torch.cat([x.reshape(-1) for x in small])
                worst = float((got_small - expected["small"]).abs().max())
                for name, x in named:
                    if x.numel() >= 100:
                        worst = max(worst, float((x - expected[name]).abs().max()))
                errors.append(worst)
            out[spec] = [errors, sizes]
        out["bytes_sent"] = [float(comm.ledger.bytes_sent)]
        comm.close()
        return out
    finally:
        shutdown()


def test_two_ranks_average_equals_mean_of_local_decodes() -> None:
    results = launch(worker, 2)
    for rank, out in results.items():
        for spec in SPECS:
            errors, _ = out[spec]
            assert max(errors) < 1e-5, f"rank {rank} {spec}: aggregated differs from the mean by {max(errors)}"
        assert out["bytes_sent"][0] > 0
    sizes = {r: results[r]["threshold:tau=1"][1] for r in results}
    assert sizes[0] != sizes[1], "threshold payloads should differ in size between ranks"
