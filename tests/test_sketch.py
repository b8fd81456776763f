"""Tests of the ``sketch`` compressor: unbiased de-sketch, linearity, all-reduce of sketches on
2 and 4 gloo ranks, bytes, noise scale, state and option validation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.comm import Comm
from lowband.comm.aggregate import Aggregator
from lowband.comm.group import init_from_env, shutdown
from lowband.compress import COMPRESSORS, build
from lowband.compress.sketch import Sketch, SketchOptions, sketch_size
from lowband.feedback import FEEDBACK
from lowband.train.launch import launch

KINDS = ["sketch:kind=countsketch,ratio=0.25", "sketch:kind=gaussian,ratio=0.25,block=16",
         "sketch:kind=sign,ratio=0.25,block=16"]


def vector(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", KINDS)
def test_desketch_is_unbiased(spec: str) -> None:
    """The mean of S_t^T S_t x over N independent sketches converges to x: every coordinate within
    5 standard errors (estimated from the samples), and the test would see a 10% scale error."""
    x, samples = vector(64, 1), 4000
    comp = build(spec, COMPRESSORS)
    draws = torch.stack([comp.decode(comp.encode(x, "w")) for _ in range(samples)]).double()
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(samples)
    z = ((mean - x) / stderr).abs()
    assert z.max() < 5, f"{spec}: worst coordinate {z.max():.1f} standard errors from x"
    assert (((0.9 * mean - x) / stderr).abs() > 5).any(), "tolerance too loose to detect a 10% bias"
    assert not torch.allclose(draws[0], draws[1]), "S must change every call"


@pytest.mark.parametrize("spec", KINDS)
def test_biased_desketch_is_the_contraction_error_feedback_needs(spec: str) -> None:
    """unbiased=false: E[C(x)] = x / (1 + omega) and E||x - C(x)||^2 = omega / (1 + omega) ||x||^2 < ||x||^2
    (the unbiased de-sketch's error is omega ||x||^2, far above ||x||^2 at ratio 0.25)."""
    x, samples = vector(64, 1), 4000
    comp, unbiased = build(spec + ",unbiased=false", COMPRESSORS), build(spec, COMPRESSORS)
    omega = comp.variance(64)
    draws = torch.stack([comp.decode(comp.encode(x, "w")) for _ in range(samples)]).double()
    stderr = draws.std(0) / math.sqrt(samples)
    assert ((draws.mean(0) - x / (1 + omega)) / stderr).abs().max() < 5
    error = (draws - x).pow(2).sum(1).mean() / x.pow(2).sum()
    assert error == pytest.approx(omega / (1 + omega), rel=0.05) and error < 1
    plain = torch.stack([unbiased.decode(unbiased.encode(x, "w")) for _ in range(500)]).double()
    assert (plain - x).pow(2).sum(1).mean() / x.pow(2).sum() == pytest.approx(omega, rel=0.15)


@pytest.mark.parametrize("spec", KINDS)
def test_sum_of_sketches_is_the_sketch_of_the_sum(spec: str) -> None:
    a, b = vector(1001, 2), vector(1001, 3)
    ca, cb, cs = (build(spec, COMPRESSORS) for _ in range(3))  # same seed, same call counter
    pa, pb, ps = ca.encode(a, "w"), cb.encode(b, "w"), cs.encode(a + b, "w")
    torch.testing.assert_close(pa.tensors[0] + pb.tensors[0], ps.tensors[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ca.decode(pa) + cb.decode(pb), cs.decode(ps), rtol=1e-5, atol=1e-5)


def test_bytes_are_ratio_times_numel_in_fp32() -> None:
    d = 40_000
    for spec in ("sketch:ratio=0.01,kind=countsketch", "sketch:ratio=0.01,kind=gaussian,block=1000",
                 "sketch:ratio=0.5,kind=sign,block=8"):
        comp = build(spec, COMPRESSORS)
        ratio = comp.options.ratio
        assert comp.encode(vector(d, 0), "w").nbytes == round(ratio * d) * 4, spec
        assert comp.encode(vector(d, 0).half(), "h").nbytes == round(ratio * d) * 4, spec  # fp32 whatever the input
    assert sketch_size(0, SketchOptions()) == 0 and sketch_size(3, SketchOptions()) == 1
    assert sketch_size(10, SketchOptions(kind="gaussian", block=4, ratio=0.5)) == 3 * 2  # blocks 4, 4, 2 (padded)


@pytest.mark.parametrize("spec", ["sketch", "sketch:kind=gaussian,block=4", "sketch:kind=sign"])
@pytest.mark.parametrize("n", [0, 1, 3, 7, 1001])
def test_round_trip_shapes_and_dtypes(spec: str, n: int) -> None:
    comp = build(spec, COMPRESSORS)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = vector(2 * n, 5)[::2].to(dtype)  # non-contiguous
        out = comp.decode(comp.encode(x, f"x{dtype}"))
        assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()


def test_noise_scale_matches_the_reported_one() -> None:
    """S^T of one rank's noise has per-coordinate std sigma (any kind); the decoded mean of n
    ranks sigma / sqrt(n), which metrics() reports."""
    sigma = 0.3
    for spec in (f"sketch:ratio=0.1,noise={sigma}", f"sketch:ratio=0.1,kind=gaussian,block=100,noise={sigma}"):
        comp = build(spec, COMPRESSORS)
        noise = comp.decode(comp.encode(torch.zeros(20_000), "w"))
        assert abs(noise.std().item() / sigma - 1) < 0.05, (spec, noise.std().item())
        comp.for_rank(1)
        other = comp.decode(comp.encode(torch.zeros(20_000), "w"))
        assert not torch.equal(noise, other)
    clean = build("sketch", COMPRESSORS)
    assert clean.metrics() == {} and torch.equal(clean.decode(clean.encode(torch.zeros(50), "w")), torch.zeros(50))
    gen = comp.exchange(torch.zeros(10), "m", 4)
    next(gen)
    assert comp.metrics() == {"sketch_noise_std": sigma, "sketch_mean_noise_std": sigma / 2}


def test_state_dict_resumes_the_call_counters() -> None:
    comp = build("sketch", COMPRESSORS)
    for _ in range(3):
        comp.encode(vector(100, 0), "w")
    resumed = build("sketch", COMPRESSORS)
    resumed.load_state_dict(comp.state_dict())
    assert torch.equal(resumed.encode(vector(100, 0), "w").tensors[0], comp.encode(vector(100, 0), "w").tensors[0])


def test_works_with_error_feedback_in_a_world_of_one() -> None:
    """ef keeps x - S^T S x; what is lost in one round is added to the next."""
    comm = Comm()
    agg = Aggregator(comm, build("sketch:ratio=0.1", COMPRESSORS), build("ef", FEEDBACK), small_numel=0)
    x = vector(500, 7)
    first = x.clone()
    agg.mean_([("w", first)])
    residual = agg.feedback.state_dict()
    assert not torch.equal(first, x)
    flat = torch.cat([t.reshape(-1) for t in _tensors(residual)])
    torch.testing.assert_close(flat, x - first, rtol=1e-5, atol=1e-5)


def _tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    return []


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 0.0}, r"^sketch ratio must be in \(0, 1\]"), ({"ratio": 1.5}, r"^sketch ratio must be in \(0, 1\]"),
    ({"kind": "srht"}, r"^unknown sketch kind 'srht'; choose one of: countsketch, gaussian, sign$"),
    ({"noise": -1.0}, r"^sketch noise must be a finite std >= 0"), ({"noise": math.inf}, r"^sketch noise must be"),
    ({"block": 0}, r"^sketch block must be an integer >= 1"),
    ({"unbiased": "maybe"}, r"^sketch unbiased must be true or false|must be a"),
])
def test_options_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SketchOptions(**kwargs)
    spec = "sketch:" + ",".join(f"{k}={v}" for k, v in kwargs.items())
    with pytest.raises(ValueError, match=message):
        build(spec, COMPRESSORS)
    assert isinstance(build("sketch:ratio=1,kind=sign,noise=0.5,block=7", COMPRESSORS), Sketch)


# ----------------------------------------------------------------------------- gloo ranks

SHAPES = [("a", (3000,)), ("b", (40, 50)), ("small", (100,))]


@record
def allreduce_worker(spec: str) -> dict[str, Any]:
    """The all-reduced sketches vs the sketch of the sum; the aggregator's mean on every rank."""
    rank, world = init_from_env()
    try:
        comm, out = Comm(), {}
        for name, shape in SHAPES:
            mine = build(spec, COMPRESSORS)
            payload = mine.encode(vector(math.prod(shape), 100 * rank).view(shape), name).tensors[0]
            comm.all_reduce(payload, tag="sketch")
            total = sum(vector(math.prod(shape), 100 * r).view(shape) for r in range(world))
            out[name] = (payload, build(spec, COMPRESSORS).encode(total, name).tensors[0])
        agg = Aggregator(comm, build(spec, COMPRESSORS), build("none", FEEDBACK), small_numel=0)
        named = [(name, vector(math.prod(shape), 7 * rank + 1).view(shape)) for name, shape in SHAPES]
        sent = comm.ledger.bytes_sent
        agg.mean_(named)
        out["payload_bytes"] = comm.ledger.records[-1].payload
        out["sent"] = comm.ledger.bytes_sent - sent
        out["mean"] = torch.cat([t.reshape(-1) for _, t in named])
        comm.close()
        return out
    finally:
        shutdown()


@pytest.mark.parametrize("world", [2, 4])
def test_all_reduce_of_sketches_equals_the_sketch_of_the_sum(world: int) -> None:
    spec = "sketch:ratio=0.05" if world == 2 else "sketch:ratio=0.05,kind=gaussian,block=500"
    results = launch(allreduce_worker, world, spec)
    options = build(spec, COMPRESSORS).options
    entries = sum(sketch_size(math.prod(shape), options) for _, shape in SHAPES)
    # the single-process reference: the mean of n ranks' inputs, sketched and de-sketched
    inputs = [[vector(math.prod(s), 7 * r + 1).view(s) for _, s in SHAPES] for r in range(world)]
    reference = build(spec, COMPRESSORS)
    expected = torch.cat([reference.decode(reference.encode(sum(x[i] for x in inputs) / world, name)).reshape(-1)
                          for i, (name, _) in enumerate(SHAPES)])
    for rank, out in results.items():
        for name, _ in SHAPES:
            summed, of_sum = out[name]
            torch.testing.assert_close(summed, of_sum, rtol=1e-5, atol=1e-4, msg=lambda m: f"rank {rank} {name}: {m}")
        assert out["payload_bytes"] == 4 * entries  # one buffer of every tensor's sketch, fp32
        assert out["sent"] == round(2 * (world - 1) / world * 4 * entries)  # ring all-reduce
        assert torch.equal(out["mean"], results[0]["mean"]), f"rank {rank} decoded a different mean"
        torch.testing.assert_close(out["mean"], expected, rtol=1e-4, atol=1e-4)
