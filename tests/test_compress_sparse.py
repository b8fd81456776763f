"""Sparsifiers (topk, randomk, threshold, dgc), their index encoding and the dgc feedback."""

from __future__ import annotations

import math

import pytest
import torch

from lowband.comm import Comm
from lowband.comm.aggregate import Aggregator, small_key
from lowband.compress import COMPRESSORS, Compressor, build
from lowband.compress.dgc import DGC, DGCOptions, density
from lowband.compress.indices import (count_from_nbytes, decode_indices, encode_indices, index_dtype,
                                      index_nbytes, pack, unpack)
from lowband.compress.sparse import RandomK, RandomKOptions, SparseOptions, Threshold, ThresholdOptions, TopK
from lowband.feedback import FEEDBACK
from lowband.feedback.dgc import DGCFeedback, DGCFeedbackOptions
from lowband.feedback.ef import ErrorFeedback

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(0,), (1,), (13,), (7, 3), (5, 0, 2), (257,), (33, 31)]
SPECS = ["topk:ratio=0.1", "topk:k=5", "randomk:ratio=0.1", "threshold:tau=0.5", "dgc:ratio=0.05"]


def rand(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- index encoding -------------------------------------------------------------------------
@pytest.mark.parametrize("n, k, dtype, nbytes", [
    (200, 20, torch.uint8, 20), (256, 3, torch.uint8, 3), (257, 3, torch.uint16, 6),
    (65536, 10, torch.uint16, 20), (65537, 10, torch.uint32, 40), (1000, 500, None, 125),
    (9, 9, None, 2), (1, 1, torch.uint8, 1), (0, 0, torch.uint8, 0),
])
def test_indices_use_the_narrowest_integer_or_a_bitmap(n: int, k: int, dtype: torch.dtype | None,
                                                       nbytes: int) -> None:
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:k].sort().values
    encoded = encode_indices(idx, n)
    assert encoded.dtype == torch.uint8 and encoded.numel() == nbytes == index_nbytes(n, k)
    if dtype is not None:
        assert index_dtype(n) == dtype and nbytes == k * dtype.itemsize
    assert torch.equal(decode_indices(encoded, n, k), idx)
    for value_size in (2, 4):
        assert count_from_nbytes(n, k * value_size + nbytes, value_size) == k


def test_pack_recovers_the_count_from_the_length_and_rejects_bad_lengths() -> None:
    values, idx = torch.randn(600), torch.arange(0, 1200, 2)
    blob = pack(values, idx, 1200)
    assert blob.numel() == 600 * 4 + 150  # bitmap: 150 < 600 * 2
    shifted = torch.cat([torch.zeros(3, dtype=torch.uint8), blob])[3:]  # as it lands in a gathered buffer
    got_values, got_where = unpack(shifted, 1200, torch.float32)
    assert got_where.dtype == torch.bool  # a bitmap comes back as the mask itself
    assert torch.equal(got_values, values) and torch.equal(got_where.nonzero().squeeze(1), idx)
    with pytest.raises(ValueError, match="no sparse payload"):
        count_from_nbytes(1200, blob.numel() + 1, 4)
    with pytest.raises(ValueError, match="takes"):
        unpack(blob, 1200, torch.float32, k=599)


# -- every sparsifier on awkward inputs --------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_keeps_shape_and_dtype_and_sends_exact_values(spec: str, dtype: torch.dtype) -> None:
    compressor: Compressor = build(spec, COMPRESSORS)
    for i, shape in enumerate(SHAPES):
        x = rand(shape, i, dtype)
        for view in (x, x.t() if x.dim() == 2 else x[::2]):  # contiguous and not
            y = compressor.decode(compressor.encode(view, f"t{i}"))
            assert y.shape == view.shape and y.dtype == dtype, (spec, shape)
            sent = y != 0
            expected = view * (view.numel() / max(1, int(sent.sum()))) if spec.startswith("randomk") else view
            assert torch.equal(y[sent], expected[sent].to(dtype)), (spec, shape)


def test_build_from_spec_and_options() -> None:
    c = build("topk:ratio=0.1", COMPRESSORS)
    assert isinstance(c, TopK) and c.options.ratio == 0.1 and not c.summable
    r = build("randomk:k=7,seed=3,unbiased=false", COMPRESSORS)
    assert isinstance(r, RandomK) and r.summable and r.options == RandomKOptions(k=7, seed=3, unbiased=False)
    t = build("threshold:tau=0.25", COMPRESSORS)
    assert isinstance(t, Threshold) and t.fixed_size is False
    d = build("dgc:ratio=0.01,warmup_steps=100", COMPRESSORS)
    assert isinstance(d, DGC) and d.fixed_size is False and d.options.warmup_steps == 100
    assert isinstance(build("dgc:momentum=0.5,clip=2", FEEDBACK), DGCFeedback)


@pytest.mark.parametrize("spec, registry", [
    ("topk:ratio=0", COMPRESSORS), ("topk:ratio=1.5", COMPRESSORS), ("topk:k=0", COMPRESSORS),
    ("topk:ratio=0.1,k=3", COMPRESSORS), ("topk:density=0.1", COMPRESSORS), ("topk:k=lots", COMPRESSORS),
    ("randomk:ratio=-1", COMPRESSORS), ("randomk:unbiased=maybe", COMPRESSORS),
    ("threshold:tau=0", COMPRESSORS), ("threshold:tau=-1", COMPRESSORS), ("threshold:tau=inf", COMPRESSORS),
    ("dgc:ratio=2", COMPRESSORS), ("dgc:warmup_steps=-1", COMPRESSORS), ("dgc:sample=0", COMPRESSORS),
    ("dgc:momentum=1", FEEDBACK), ("dgc:clip=-1", FEEDBACK),
])
def test_bad_options_fail_with_one_line(spec: str, registry: object) -> None:
    with pytest.raises(ValueError) as err:
        build(spec, registry)
    assert "\n" not in str(err.value) and str(err.value)


# -- topk -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_keeps_exactly_the_k_largest(dtype: torch.dtype) -> None:
    x = rand((37, 29), 1, dtype)
    k = round(0.1 * x.numel())
    y = TopK(SparseOptions(ratio=0.1)).decode(TopK(SparseOptions(ratio=0.1)).encode(x, "w"))
    top = x.reshape(-1).abs().float().topk(k).indices
    expected = torch.zeros(x.numel(), dtype=dtype)
    expected[top] = x.reshape(-1)[top]
    assert int((y != 0).sum()) == k
    assert torch.equal(y.reshape(-1), expected)


def test_topk_clamps_k_to_the_tensor_size_and_is_a_contraction() -> None:
    x = rand((3, 3), 2)
    assert torch.equal(TopK(SparseOptions(k=100)).decode(TopK(SparseOptions(k=100)).encode(x, "w")), x)
    c = TopK(SparseOptions(ratio=0.05))
    for seed in range(20):
        x = rand((499,), seed)
        err = (c.decode(c.encode(x, "w")) - x).norm() ** 2
        k = round(0.05 * 499)
        assert err <= (1 - k / 499) * x.norm() ** 2 + 1e-6  # Stich et al., Lemma: k-contraction
        assert err <= x.norm() ** 2


@pytest.mark.parametrize("shape, dtype, spec, nbytes", [
    ((200,), torch.float32, "topk:k=20", 20 * 4 + 20),             # uint8 indices
    ((10, 20), torch.float16, "topk:k=20", 20 * 2 + 20),
    ((1000,), torch.float32, "topk:k=500", 500 * 4 + 125),         # bitmap beats 500 * 2
    ((13, 7, 3), torch.float32, "topk:ratio=0.01", 3 * 4 + 3 * 2),  # 273 -> uint16, k = 3
    ((70001,), torch.bfloat16, "topk:k=11", 11 * 2 + 11 * 4),       # uint32
    ((1,), torch.float32, "topk:ratio=0.01", 4 + 1),
    ((0,), torch.float32, "topk:ratio=0.5", 0),
    ((333,), torch.float32, "randomk:k=10", 40),                   # values only
    ((333,), torch.float16, "randomk:ratio=0.1", 33 * 2),
])
def test_exact_payload_bytes(shape: tuple[int, ...], dtype: torch.dtype, spec: str, nbytes: int) -> None:
    payload = build(spec, COMPRESSORS).encode(rand(shape, 3, dtype), "w")
    assert payload.nbytes == nbytes


# -- randomk ----------------------------------------------------------------------------------
def test_randomk_ranks_draw_the_same_indices_so_payloads_sum() -> None:
    a, b = RandomK(RandomKOptions(ratio=0.1, seed=5)), RandomK(RandomKOptions(ratio=0.1, seed=5))
    xa, xb = rand((41, 13), 1), rand((41, 13), 2)
    seen = []
    for step in range(3):
        pa, pb = a.encode(xa, "layer.weight"), b.encode(xb, "layer.weight")
        assert torch.equal(pa.ctx[2], pb.ctx[2])
        summed = type(pa)([pa.tensors[0] + pb.tensors[0]], pa.ctx)
        torch.testing.assert_close(a.decode(summed), a.decode(pa) + b.decode(pb))
        seen.append(pa.ctx[2])
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    other_key = RandomK(RandomKOptions(ratio=0.1, seed=5)).encode(xa, "layer.bias").ctx[2]
    other_seed = RandomK(RandomKOptions(ratio=0.1, seed=6)).encode(xa, "layer.weight").ctx[2]
    assert not torch.equal(other_key, seen[0]) and not torch.equal(other_seed, seen[0])
    for idx in seen:
        assert idx.unique().numel() == idx.numel() == round(0.1 * xa.numel())


@pytest.mark.parametrize("n, k", [(50, 10), (64, 40)])  # sampling with repetition, and randperm
def test_randomk_is_unbiased(n: int, k: int) -> None:
    x = rand((n,), 7)
    c, steps = RandomK(RandomKOptions(k=k)), 2000
    total = torch.zeros(n)
    for _ in range(steps):
        total += c.decode(c.encode(x, "w"))
    mean = total / steps
    std = x.abs() * math.sqrt((n / k - 1) / steps)  # per element: scale * Bernoulli(k/n)
    z = ((mean - x).abs() / std).max()
    assert z < 5, f"largest deviation {z:.2f} standard deviations"


def test_randomk_biased_sends_raw_values() -> None:
    x = rand((100,), 8)
    y = build("randomk:k=10,unbiased=false", COMPRESSORS)
    out = y.decode(y.encode(x, "w"))
    sent = out != 0
    assert int(sent.sum()) == 10 and torch.equal(out[sent], x[sent])


# -- threshold --------------------------------------------------------------------------------
def test_threshold_selects_exactly_the_large_elements() -> None:
    x = rand((57, 11), 4)
    x.view(-1)[0] = 0.75  # exactly tau is sent
    c = Threshold(ThresholdOptions(tau=0.75))
    payload = c.encode(x, "w")
    y = c.decode(payload)
    mask = x.abs() >= 0.75
    assert torch.equal(y, torch.where(mask, x, torch.zeros_like(x)))
    k = int(mask.sum())
    assert payload.nbytes == k * 4 + index_nbytes(x.numel(), k)


# -- dgc --------------------------------------------------------------------------------------
def test_dgc_warmup_density_schedule() -> None:
    got = [density(s, 0.001, 8) for s in range(10)]
    assert got == [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625, 0.00390625, 0.00390625, 0.001, 0.001]
    assert [density(s, 0.01, 4) for s in range(5)] == [0.25, 0.0625, 0.015625, 0.01, 0.01]
    assert density(0, 0.001, 0) == 0.001
    c = DGC(DGCOptions(ratio=0.001, warmup_steps=5))
    x = rand((1000,), 5)  # <= 1000 elements: the sample is everything, selection is exact top-k
    counts = [int((c.decode(c.encode(x, "w")) != 0).sum()) for _ in range(7)]
    assert counts == [250, 250, 62, 16, 4, 1, 1]  # round(d * 1000), stage floor(4 s / 5)


def test_dgc_sends_at_most_k_of_the_largest() -> None:
    n, c = 200_003, DGC(DGCOptions(ratio=0.01))
    k = round(0.01 * n)
    for seed in range(3):
        x = rand((n,), seed)
        payload = c.encode(x, "w")
        y = c.decode(payload).abs()
        sent = y != 0
        count = int(sent.sum())
        assert 0.5 * k <= count <= k, count
        assert payload.nbytes == count * 4 + index_nbytes(n, count)
        assert y[sent].min() >= x.abs()[~sent].max()  # a top-count set


def test_dgc_feedback_momentum_correction_and_masking() -> None:
    fb, m = DGCFeedback(DGCFeedbackOptions(momentum=0.5)), 0.5
    g1, g2 = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    v1 = fb.compensate("w", g1)
    assert torch.equal(v1, g1)
    sent = torch.tensor([0.0, 0.0, 3.0, 4.0])
    fb.update("w", v1, sent)
    assert torch.equal(fb.state["w"]["accumulated"], torch.tensor([1.0, 2.0, 0.0, 0.0]))
    assert torch.equal(fb.state["w"]["momentum"], torch.tensor([1.0, 2.0, 0.0, 0.0]))
    v2 = fb.compensate("w", g2)
    u2 = m * torch.tensor([1.0, 2.0, 0.0, 0.0]) + g2
    assert torch.equal(fb.state["w"]["momentum"], u2)
    assert torch.equal(v2, torch.tensor([1.0, 2.0, 0.0, 0.0]) + u2)
    assert torch.equal(g1, torch.tensor([1.0, 2.0, 3.0, 4.0]))  # input untouched


def test_dgc_feedback_clips_each_tensor() -> None:
    fb = DGCFeedback(DGCFeedbackOptions(momentum=0.0, clip=1.0))
    g = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(fb.compensate("w", g), torch.tensor([0.6, 0.8]))
    small = torch.tensor([0.3, 0.4])
    assert torch.equal(DGCFeedback(DGCFeedbackOptions(clip=1.0)).compensate("w", small), small)


@pytest.mark.parametrize("feedback", [ErrorFeedback(), DGCFeedback()])
@pytest.mark.parametrize("spec", ["topk:ratio=0.1", "threshold:tau=1", "dgc:ratio=0.1"])
def test_feedback_identity_compensated_is_decoded_plus_residual(feedback: object, spec: str) -> None:
    compressor = build(spec, COMPRESSORS)
    slot = "residual" if isinstance(feedback, ErrorFeedback) else "accumulated"
    for step in range(4):
        x = feedback.compensate("w", rand((17, 9), step))
        decoded = compressor.decode(compressor.encode(x, "w"))
        feedback.update("w", x, decoded)
        assert torch.equal(x, decoded + feedback.state["w"][slot]), step


def test_state_dicts_round_trip() -> None:
    for make in (lambda: RandomK(RandomKOptions(ratio=0.2)), lambda: DGC(DGCOptions(warmup_steps=4))):
        a = make()
        for i in range(3):
            a.encode(rand((300,), i), "w")
        b = make()
        b.load_state_dict(a.state_dict())
        x = rand((300,), 9)
        pa, pb = a.encode(x, "w"), b.encode(x, "w")
        assert torch.equal(a.decode(pa), b.decode(pb)) and pa.nbytes == pb.nbytes
    fb = DGCFeedback()
    v = fb.compensate("w", rand((10,), 1))
    fb.update("w", v, torch.zeros(10))
    restored = DGCFeedback()
    restored.load_state_dict(fb.state_dict())
    g = rand((10,), 2)
    assert torch.equal(fb.compensate("w", g), restored.compensate("w", g))


# -- through the aggregator, one process -----------------------------------------------------
NAMED_SHAPES = [("embed.weight", (67, 31)), ("block.0.weight", (1001,)), ("block.0.bias", (13,)),
                ("head.weight", (3, 5, 7))]


@pytest.mark.parametrize("spec", ["topk:ratio=0.1", "threshold:tau=1", "randomk:ratio=0.1", "dgc:ratio=0.1"])
@pytest.mark.parametrize("small_numel", [0, 500])  # every tensor alone, or small ones bucketed
def test_aggregator_single_process_equals_decode_of_encode(spec: str, small_numel: int) -> None:
    agg = Aggregator(Comm(), build(spec, COMPRESSORS), build("ef", FEEDBACK), small_numel=small_numel)
    reference = build(spec, COMPRESSORS)
    for round_ in range(2):
        named = [(name, rand(shape, 10 * round_ + i)) for i, (name, shape) in enumerate(NAMED_SHAPES)]
        residual = {key: t["residual"].clone() for key, t in agg.feedback.state.items()}
        small_named = [(n, t) for n, t in named if t.numel() < small_numel]  # the aggregator's grouping
        small = [t for _, t in small_named]
        groups = {name: [t] for name, t in named if t.numel() >= small_numel}
        if small:
            groups[small_key(torch.float32, [n for n, _ in small_named])] = small
        expected = {}
        for key, members in groups.items():
            x = torch.cat([m.reshape(-1) for m in members]) if len(members) > 1 else members[0]
            x = x + residual.get(key, torch.zeros_like(x))
            expected[key] = reference.decode(reference.encode(x, key))
        agg.mean_(named)
        for key, members in groups.items():
            got = torch.cat([m.reshape(-1) for m in members])
            assert torch.equal(got, expected[key].reshape(-1)), (spec, key, round_)
    assert agg.comm.ledger.bytes_sent == 0
