"""The compress/feedback/communicate pipeline: grouping, errors, and real multi-rank means."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.comm import Comm
from lowband.comm.aggregate import Aggregator, NonFiniteError
from lowband.comm.group import init_from_env, shutdown
from lowband.compress import COMPRESSORS, build
from lowband.feedback import FEEDBACK
from lowband.train.launch import launch

SHAPES = {"w": (64, 80), "b": (80,), "odd": (3, 7), "scalar": (1,), "empty": (0,)}


def tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(name, torch.randn(shape, generator=g)) for name, shape in SHAPES.items()]


def aggregator(compress: str, feedback: str = "none", comm: Comm | None = None) -> Aggregator:
    return Aggregator(comm or Comm(), build(compress, COMPRESSORS), build(feedback, FEEDBACK))


def test_world_of_one_identity_is_exact_and_small_tensors_share_a_bucket() -> None:
    named = tensors(0)
    expected = [t.clone() for _, t in named]
    agg = aggregator("identity", "ef")
    agg.mean_(named)
    for (_, got), want in zip(named, expected):
        assert torch.equal(got, want)
    assert set(agg.feedback.state) == {"w", "small.float32[b..empty]"}  # b, odd, scalar, empty bucketed


@pytest.mark.parametrize("spec, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_world_of_one_half_precision_is_the_cast(spec: str, dtype: torch.dtype) -> None:
    named = tensors(1)
    expected = [t.to(dtype).float() for _, t in named]
    aggregator(spec).mean_(named)
    for (_, got), want in zip(named, expected):
        assert torch.equal(got, want)


def test_error_feedback_keeps_what_was_not_sent() -> None:
    (name, x), = [t for t in tensors(2) if t[0] == "w"]
    original = x.clone()
    agg = aggregator("bf16", "ef")
    agg.mean_([(name, x)])
    residual = agg.feedback.state["w"]["residual"]
    assert residual.abs().max() > 0
    assert torch.equal(x + residual, original)  # decoded + residual == compensated input


def test_non_finite_input_is_refused_with_its_name() -> None:
    named = tensors(3)
    named[0][1][5, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"w holds 1 non-finite values of 5120; not sent"):
        aggregator("identity").mean_(named)


def test_impossible_pairings_are_refused() -> None:
    with pytest.raises(ValueError, match="'fp16' is summable: all_gather would move n times the bytes"):
        Aggregator(Comm(), build("fp16", COMPRESSORS), build("none", FEEDBACK), collective="all_gather")
    with pytest.raises(ValueError, match="'topk' cannot use all_reduce: its payloads from different ranks cannot be summed"):
        Aggregator(Comm(), build("topk", COMPRESSORS), build("none", FEEDBACK), collective="all_reduce")
    with pytest.raises(ValueError, match="unknown collective 'ring'"):
        Aggregator(Comm(), build("fp16", COMPRESSORS), build("none", FEEDBACK), collective="ring")


@record
def means_on_ranks(specs: list[str]) -> dict[str, tuple[float, int]]:
    """Per spec: max |aggregated - exact fp64 mean| and the bytes this rank sent."""
    rank, world = init_from_env()
    try:
        out = {}
        for spec in specs:
            comm = Comm()
            named = tensors(10 + rank)
            exact = [torch.stack([tensors(10 + r)[i][1].double() for r in range(world)]).mean(0)
                     for i in range(len(named))]
            aggregator(spec, comm=comm).mean_(named)
            err = max(float((t.double() - e).abs().max()) if t.numel() else 0.0 for (_, t), e in zip(named, exact))
            out[spec] = (err, comm.ledger.bytes_sent)
            comm.close()
        return out
    finally:
        shutdown()


def test_identity_fp16_bf16_equal_plain_mean_on_two_ranks() -> None:
    results = launch(means_on_ranks, 2, ["identity", "fp16", "bf16"])
    numel = sum(torch.Size(s).numel() for s in SHAPES.values())
    for rank, out in results.items():
        assert out["identity"][0] < 1e-6
        assert out["fp16"][0] < 5e-3
        assert out["bf16"][0] < 3e-2
        # 2 ranks, ring all-reduce: each rank sends its whole payload once.
        assert out["identity"][1] == 4 * numel
        assert out["fp16"][1] == out["bf16"][1] == 2 * numel


def test_gathered_payloads_with_odd_byte_lengths_stay_aligned() -> None:
    """A 3-byte tensor followed by a float32 one: the float must not be viewed at offset 3."""
    from lowband.compress.base import Compressor, Payload

    class OddBytes(Compressor):
        name = "odd-bytes"

        def encode(self, x: torch.Tensor, key: str) -> Payload:
            return Payload([torch.tensor([1, 2, 3], dtype=torch.uint8), x.float().reshape(-1)], ctx=x.shape)

        def decode(self, payload: Payload) -> torch.Tensor:
            return payload.tensors[1].view(payload.ctx)

    named = [("a", torch.randn(5000)), ("b", torch.randn(6000))]
    expected = [t.clone() for _, t in named]
    Aggregator(Comm(), OddBytes(), build("none", FEEDBACK)).mean_(named)
    for (_, got), want in zip(named, expected):
        assert torch.equal(got, want)


@record
def async_overlap() -> tuple[float, float, float, bool]:
    """(modelled s, wall s of mean_async + 0.6 s of 'compute' + wait, blocked s charged, correct)."""
    import time

    from lowband.net.link import Network

    rank, world = init_from_env()
    try:
        comm = Comm(network=Network.parse("20mbit", "0ms", world))
        agg = aggregator("identity", comm=comm)
        x = torch.full((250_000,), float(rank))  # 1 MB
        started = time.perf_counter()
        pending = agg.mean_async([("x", x)])
        time.sleep(0.6)  # the training thread computes meanwhile
        pending.wait()
        wall = time.perf_counter() - started
        modelled = comm.ledger.records[-1].modelled
        ok = bool(torch.all(x == sum(range(world)) / world))
        agg.close()
        comm.close()
        return modelled, wall, comm.wait_seconds, ok
    finally:
        shutdown()


def test_mean_async_overlaps_compute_and_charges_only_exposed_time() -> None:
    for rank, (modelled, wall, blocked, ok) in launch(async_overlap, 2).items():
        assert ok, rank
        assert modelled == pytest.approx(0.4)  # 1 MB ring all-reduce over 20 Mbit/s, 2 ranks
        assert wall < 0.6 + modelled * 0.5, (rank, wall)  # overlapped, not 1.0 s
        assert blocked < 0.15, (rank, blocked)  # only the exposed part is charged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_running_mean_is_the_stacked_mean_and_leaves_its_inputs_alone(dtype: torch.dtype) -> None:
    from lowband.compress.base import RunningMean, running_mean

    g = torch.Generator().manual_seed(3)
    xs = [(torch.randn(257, generator=g) * 10).to(dtype) for _ in range(16)]
    before = [x.clone() for x in xs]
    got = running_mean(iter(xs))
    exact = torch.stack([x.double() for x in xs]).mean(0)
    assert got.dtype == dtype and got.shape == (257,)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 2e-2)  # fp16/bf16: one rounding at the end
    torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)
    if dtype in (torch.float16, torch.bfloat16):  # summed in fp32, rounded once at the end, as torch.mean does
        assert torch.equal(got, torch.stack(xs).mean(0))
    assert all(torch.equal(x, b) for x, b in zip(xs, before))  # the first one is copied, never summed into
    with pytest.raises(ValueError, match="no tensors"):
        RunningMean().mean()
