"""lowband's ``powersgd`` against torch's own ``powerSGD_hook``, on 2 gloo ranks.

Each rank trains two copies of a small CNN on its own batches, from the same init:

* torch: the model wrapped in DDP with ``powerSGD_hook`` (``use_error_feedback=True``,
  ``warm_start=True``), in ONE bucket (the hook aborts on gloo with several:
  ``bucket_cap_mb`` large and ``dist._DEFAULT_FIRST_BUCKET_BYTES`` raised);
* lowband: a plain copy whose gradients go through ``Aggregator(powersgd, ef)``;

and the averaged gradients are compared after every step, compressed steps included.

What is matched, and how:

* start: torch refuses ``start_powerSGD_iter < 2`` with error feedback or warm start (DDP
  rebuilds its buckets after the first iteration), so both use 2: steps 0 and 1 are plain
  averages (lowband: ``start_iter=2``), compression starts at step 2;
* the initial Q: torch draws its Qs for the whole bucket from one seeded stream, in its own
  layout (the compressed tensors of the bucket, in bucket order, grouped by matrix shape);
  lowband draws per tensor from (seed, name). Neither can reproduce the other's stream,
  so before step 2 the test draws one Q per tensor and gives it to both: lowband through
  ``load_state_dict``, torch by pre-filling ``q_memory_dict`` in its layout (its hook then
  takes the warm-start path: orthogonalise the given Q, as lowband does);
* ``small_numel=0``: torch applies the policy per tensor, so lowband must not bucket small
  tensors (a bucketed 1-D tensor is always sent raw, while torch compresses e.g. conv1's
  16 x 27 weight);
* error feedback differs per rank but not in the mean: torch remembers M_i - P Q_mean^T (and
  x_i - mean for uncompressed tensors), lowband M_i - P Q_i^T (and 0). The sums over ranks
  are equal, and PowerSGD's result depends on the inputs only through their sum, so the
  averaged gradients agree up to rounding (asserted below, relative to the gradient scale).

Measured (rank 2 with Gram-Schmidt, rank 4 with QR): max |torch - lowband| / max |exact mean|
is 0 (bit-identical) at steps 0-2, including the first compressed step, then 1e-7 to 2e-5
as the two error-feedback conventions round differently; asserted < 1e-6 and < 1e-4.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP

from lowband.comm import Comm
from lowband.comm.aggregate import Aggregator
from lowband.comm.group import init_from_env, shutdown
from lowband.compress import COMPRESSORS, build
from lowband.feedback import FEEDBACK
from lowband.train.launch import launch

START, STEPS, MIN_RATE, LR = 2, 6, 2.0, 0.05
RANKS = (2, 4)  # torch orthogonalises with Gram-Schmidt at rank <= 2, with QR above; so does lowband


class Net(nn.Module):
    """Compressed (rank 2): conv1 (16 x 27), conv2 (32 x 144), fc1 (24 x 128), fc2, fc3 (24 x 24);
    raw: head (3 x 24, rate 1.3) and every bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(128, 24)
        self.fc2 = nn.Linear(24, 24)
        self.fc3 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))  # (B, 32, 8, 8)
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)  # (B, 128)
        return self.head(F.relu(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)


def torch_layout(bucket_names: list[str], shapes: dict[str, torch.Size], rank: int) -> list[tuple[str, int, int, int]]:
    """(name, n, m, r) of the tensors torch's hook compresses, in the order of its flat P and Q memory."""
    groups: dict[tuple[int, int], list[tuple[str, int, int, int]]] = {}
    for name in bucket_names:
        n = shapes[name][0]
        m = math.prod(shapes[name]) // n
        r = min(n, m, rank)
        if (n + m) * r * MIN_RATE < n * m:  # torch's _should_compress
            groups.setdefault((n, m), []).append((name, n, m, r))
    return [entry for group in groups.values() for entry in group]


def compare(rank_r: int, rank: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    dist._DEFAULT_FIRST_BUCKET_BYTES = 1 << 30
    ddp = DDP(model, bucket_cap_mb=1024)
    state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank_r, start_powerSGD_iter=START,
                               min_compression_rate=MIN_RATE, use_error_feedback=True, warm_start=True)
    names = {id(p): name for name, p in model.named_parameters()}
    buckets: list[tuple[int, bool, list[str]]] = []

    def hook(st, bucket):  # unannotated: DDP rejects the string annotations of `from __future__ import annotations`
        buckets.append((bucket.index(), bucket.is_last(), [names[id(p)] for p in bucket.parameters()]))
        return psgd.powerSGD_hook(st, bucket)

    ddp.register_comm_hook(state, hook)
    comm = Comm()
    spec = f"powersgd:rank={rank_r},min_compression_rate={MIN_RATE},start_iter={START}"
    agg = Aggregator(comm, build(spec, COMPRESSORS), build("ef", FEEDBACK), small_numel=0)
    opt_torch = torch.optim.SGD(ddp.parameters(), lr=LR)
    opt_lowband = torch.optim.SGD(reference.parameters(), lr=LR)
    out: dict[str, object] = {"steps": []}
    for step in range(STEPS):
        if step == START:  # the same initial Q for both, in each one's layout
            layout = torch_layout(buckets[-1][2], shapes, rank_r)
            gen = torch.Generator().manual_seed(1234)
            qs = {name: torch.randn(m, r, generator=gen) for name, n, m, r in layout}
            state.q_memory_dict[0] = torch.cat([qs[name].reshape(-1) for name, *_ in layout])
            state.p_memory_dict[0] = torch.empty(sum(n * r for _, n, _, r in layout))
            saved = agg.compressor.state_dict()
            agg.compressor.load_state_dict({**saved, "q": qs})
            out["compressed"] = sorted(qs)
        x, y = batch(rank, step)
        F.cross_entropy(ddp(x), y).backward()
        F.cross_entropy(reference(x), y).backward()
        exact = {name: p.grad.clone() for name, p in reference.named_parameters()}
        for t in exact.values():
            dist.all_reduce(t)
            t /= dist.get_world_size()
        agg.mean_([(name, p.grad) for name, p in reference.named_parameters()])
        rows = {}
        for (name, p_torch), p_lowband in zip(model.named_parameters(), reference.parameters()):
            scale = exact[name].abs().max().item()
            rows[name] = {"diff": (p_torch.grad - p_lowband.grad).abs().max().item() / scale,
                          "compression": (p_lowband.grad - exact[name]).abs().max().item() / scale}
        out["steps"].append(rows)
        for opt in (opt_torch, opt_lowband):
            opt.step()
            opt.zero_grad()
    out["buckets"] = sorted({(index, last) for index, last, _ in buckets})
    out["lowband_q"] = sorted(agg.compressor.state_dict()["q"])
    comm.close()
    return out


@record
def worker() -> dict[int, dict[str, object]]:
    rank, _ = init_from_env(timeout_s=60)
    torch.set_num_threads(1)  # two ranks on two cores
    try:
        return {rank_r: compare(rank_r, rank) for rank_r in RANKS}
    finally:
        shutdown()


@pytest.fixture(scope="module")
def results() -> dict[int, dict[int, dict[str, object]]]:
    return launch(worker, 2)


def test_torch_hook_cannot_compress_before_step_2() -> None:
    """Why both start at step 2 (torch's check, raised before any process group is needed)."""
    with pytest.raises(ValueError, match="start_powerSGD_iter"):
        psgd.PowerSGDState(process_group=None, start_powerSGD_iter=1, use_error_feedback=True, warm_start=True)


@pytest.mark.parametrize("rank_r", RANKS)
def test_same_tensors_compressed_in_one_bucket(results: dict, rank_r: int) -> None:
    for res in results.values():
        out = res[rank_r]
        assert out["buckets"] == [(0, True)], "torch's hook needs a single bucket on gloo"
        assert out["compressed"] == out["lowband_q"]
        assert out["compressed"] == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]


@pytest.mark.parametrize("rank_r", RANKS)
def test_averaged_gradients_match_torch_hook(results: dict, rank_r: int) -> None:
    for rank, res in results.items():
        steps = res[rank_r]["steps"]
        for step, rows in enumerate(steps):
            for name, row in rows.items():
                tol = 1e-6 if step <= START else 1e-4  # identical up to the first compressed step, then rounding
                assert row["diff"] < tol, f"rank {rank} step {step} {name}: |torch - lowband| / scale = {row['diff']:.2e}"
        # not vacuous: from the start step on, compression visibly changes these weights' gradients
        # (fc2/fc3 gradients are nearly rank 2 here: 3 classes, so their rank-r error is tiny)
        for step in range(START, len(steps)):
            for name in ("conv1.weight", "conv2.weight", "fc1.weight"):
                assert steps[step][name]["compression"] > 5e-2, f"step {step} {name}"
            assert steps[step]["head.weight"]["compression"] == 0.0, "raw tensors are the exact mean"
