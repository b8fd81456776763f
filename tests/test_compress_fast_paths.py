"""The compressors' fast paths (issue 26): reused work arrays, word-wise bit packing, table decoding,
16-bit stochastic rounding, sampled exact top-k, mask positions. Each checked against the plain way."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lowband.compress import COMPRESSORS, build, kernels, scratch
from lowband.compress.indices import index_nbytes, pack_at_least, pack_masked, unpack_dense, uses_bitmap
from lowband.compress.packing import decode_levels, pack, unpack
from lowband.compress.quant import NOISE_OFFSET, SeededCompressor
from lowband.compress.bitmaps import CHUNK, MANY_MAX_NUMEL
from lowband.compress.select import PARTITION_MAX_NUMEL, SAMPLED_MIN_NUMEL, compact, expand, largest, positions

CPU = torch.device("cpu")
BIG = SAMPLED_MIN_NUMEL * 2 + 13  # takes the sampled top-k path; not a multiple of 8


@pytest.fixture(scope="module")
def compiled() -> object:
    """The compiled kernels, as :func:`lowband.compress.kernels.loaded` gives them."""
    pytest.importorskip("numba")
    from lowband.compress import _numba_loops

    return _numba_loops


@pytest.fixture(params=["compiled", "numpy"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the compiled kernels (skipped without numba) and with the NumPy passes."""
    fast = request.getfixturevalue("compiled") if request.param == "compiled" else None
    monkeypatch.setattr(kernels, "_LOADED", [fast])
    return request.param


# -- scratch ---------------------------------------------------------------------------------------
def test_scratch_reuses_per_slot_and_thread_and_grows() -> None:
    scratch.release()
    a = scratch.buffer("t.a", 1000, torch.float32, CPU)
    assert a.shape == (1000,) and a.dtype == torch.float32
    assert scratch.buffer("t.a", 500, torch.int16, CPU).data_ptr() == a.data_ptr()  # same array, smaller view
    assert scratch.buffer("t.b", 1000, torch.float32, CPU).data_ptr() != a.data_ptr()  # another slot
    other: list[int] = []
    thread = threading.Thread(target=lambda: other.append(scratch.buffer("t.a", 1000, torch.float32, CPU).data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != a.data_ptr()  # threads never share
    grown = scratch.buffer("t.a", 5000, torch.float32, CPU)
    assert grown.numel() == 5000 and scratch.held_bytes() >= 5000 * 4 + 4000
    scratch.release()
    assert scratch.held_bytes() == 0
    assert scratch.buffer("t.z", 0, torch.int64, CPU).numel() == 0


def test_scratch_allocates_fresh_off_the_cpu() -> None:
    meta = torch.device("meta")
    assert scratch.buffer("t.m", 10, torch.float32, meta).device == meta
    assert scratch.held_bytes() == 0 or all(t.device == CPU for t in scratch._pool().values())


def test_fresh_results_hint_whole_huge_pages_and_zeros_are_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(scratch, "_ADVISE", lambda start, length, advice: calls.append((start, length, advice)) or 0)
    small = scratch.fresh(1000, torch.float32, CPU)
    assert small.shape == (1000,) and calls == []  # below HUGE_MIN_NBYTES: no hint
    n = 2 * scratch.HUGE_MIN_NBYTES // 4 + 12345  # holds at least one whole huge page wherever it starts
    z = scratch.zeros(n, torch.float32, CPU)
    assert z.dtype == torch.float32 and z.shape == (n,) and not z.any()
    (start, length, advice), = calls
    end = z.data_ptr() + 4 * n
    assert start % scratch.HUGE_PAGE == 0 and length % scratch.HUGE_PAGE == 0 and advice == 14
    assert z.data_ptr() <= start and start + length <= end  # only whole pages inside the tensor
    assert start - z.data_ptr() < scratch.HUGE_PAGE and end - (start + length) < scratch.HUGE_PAGE
    assert scratch.zeros(7, torch.bfloat16, CPU).dtype == torch.bfloat16
    monkeypatch.setattr(scratch, "_ADVISE", None)  # off Linux, or LOWBAND_HUGEPAGES=0: plain allocations
    assert scratch.fresh(n, torch.uint8, CPU).numel() == n and len(calls) == 1


# -- packing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [8 * 4096, 8 * 4096 + 5, 3 * 4096 + 1])
def test_word_packing_matches_the_bit_layout(bits: int, n: int) -> None:
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n + bits), dtype=torch.uint8)
    packed = pack(codes, bits, check=False)
    per = 8 // bits
    padded = np.zeros(-(-n // per) * per, dtype=np.int64)
    padded[:n] = codes.numpy()
    expected = (padded.reshape(-1, per) << (np.arange(per) * bits)).sum(1).astype(np.uint8)  # code k at bits k*b
    assert np.array_equal(packed.numpy(), expected)
    assert torch.equal(unpack(packed, bits, n), codes)
    levels = torch.randn(1 << bits)
    assert torch.equal(decode_levels(packed, bits, n, levels, torch.empty(n)), levels[codes.long()])


def test_one_bit_packing_of_bools_matches_numpy_packbits() -> None:
    mask = torch.rand(10_007, generator=torch.Generator().manual_seed(1)) < 0.3
    assert np.array_equal(pack(mask, 1).numpy(), np.packbits(mask.numpy(), bitorder="little"))
    assert np.array_equal(pack(mask[3:], 1).numpy(), np.packbits(mask[3:].numpy(), bitorder="little"))  # mid-word view


# -- stochastic rounding ----------------------------------------------------------------------------
def _rounder(seed: int) -> SeededCompressor:
    return build(f"qsgd:seed={seed}", COMPRESSORS)  # any seeded compressor rounds


def _round(rounder: SeededCompressor, values: torch.Tensor, top: int) -> torch.Tensor:
    y = values + NOISE_OFFSET
    return rounder.round_stochastic(y, top, torch.empty(values.numel(), dtype=torch.uint8)).clone()


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour() -> None:
    rounder = _rounder(3)
    values = torch.tensor([0.0, 0.25, 0.5, 0.999, 1.0, 3.3, 6.75, 14.0])
    draws = torch.stack([_round(rounder, values.repeat(2000), 14).float() for _ in range(20)]).view(-1, values.numel())
    assert torch.all((draws == values.floor()) | (draws == values.floor() + 1))
    assert torch.allclose(draws.mean(0), values, atol=0.012)  # 40,000 draws: sd <= 0.0025
    assert torch.equal(draws[:, [0, 4, 7]], values[[0, 4, 7]].expand(draws.shape[0], 3))  # integers stay put


def test_stochastic_rounding_caps_at_top_and_reproduces_from_its_state() -> None:
    rounder = _rounder(5)
    assert int(_round(rounder, torch.full((1000,), 2.0 + 1e-6), 2).max()) == 2
    values = torch.rand(5000, generator=torch.Generator().manual_seed(0)) * 7
    state = rounder.state_dict()
    first = _round(rounder, values, 14)
    again = _rounder(99)
    again.load_state_dict(state)
    assert torch.equal(_round(again, values, 14), first)
    assert not torch.equal(_round(again, values, 14), first)  # the stream moves on


@pytest.mark.parametrize("spec", ["qsgd:bits=2", "qsgd:bits=4", "qsgd:bits=8", "terngrad:clip=0"])
def test_quantizers_round_each_value_to_a_neighbouring_level(spec: str) -> None:
    x = torch.randn(BIG, generator=torch.Generator().manual_seed(2))
    c = build(spec, COMPRESSORS)
    out = c.decode(c.encode(x, "w"))
    if spec.startswith("qsgd"):
        s = (1 << (c.bits - 1)) - 1
        rows = x[:BIG - BIG % 512].view(-1, 512)
        unit = (rows.norm(dim=1, keepdim=True) / s)
        levels = out[:rows.numel()].view(-1, 512) / unit
        scaled = rows / unit
    else:
        unit = x.abs().max()
        levels, scaled = out / unit, x / unit
    assert torch.all((levels - levels.round()).abs() < 1e-3)  # on a level
    assert torch.all((levels - scaled).abs() < 1 + 1e-3)  # and a neighbour of the value, either sign


# -- selection --------------------------------------------------------------------------------------
def _top_set(x: torch.Tensor, k: int) -> set[int]:
    return set(x.abs().topk(k).indices.tolist())


@pytest.mark.parametrize("data", ["normal", "heavy", "sorted", "ties", "constant"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.2])
@pytest.mark.parametrize("n", [BIG, PARTITION_MAX_NUMEL + 13])  # NumPy's argpartition, the sampled threshold
def test_sampled_top_k_is_the_exact_top_k(data: str, density: float, n: int) -> None:
    g = torch.Generator().manual_seed(7)
    x = {"normal": lambda: torch.randn(n, generator=g),
         "heavy": lambda: torch.randn(n, generator=g) ** 5,
         "sorted": lambda: torch.randn(n, generator=g).sort().values,
         "ties": lambda: torch.randint(-3, 4, (n,), generator=g).float(),
         "constant": lambda: torch.full((n,), 0.5)}[data]()
    k = max(1, round(density * n))
    idx = largest(x, k)
    assert idx.numel() == k and torch.all(idx[1:] > idx[:-1])  # k distinct, ascending
    kth = x.abs().topk(k).values[-1]
    chosen = x.abs()[idx]
    assert torch.all(chosen >= kth)  # nothing below the k-th largest magnitude
    assert int((x.abs() > kth).sum()) <= k and set((x.abs() > kth).nonzero().squeeze(1).tolist()) <= set(idx.tolist())
    if data in ("normal", "heavy"):  # no ties: the set itself is unique
        assert set(idx.tolist()) == _top_set(x, k)


def test_positions_are_the_nonzero_indices() -> None:
    mask = torch.rand(100_003, generator=torch.Generator().manual_seed(0)) < 0.05
    assert torch.equal(positions(mask), mask.nonzero().squeeze(1))
    assert positions(torch.zeros(10, dtype=torch.bool)).numel() == 0


def test_threshold_sends_its_mask_as_the_bitmap_when_dense(kernel_path: str) -> None:
    x = torch.randn(BIG, generator=torch.Generator().manual_seed(4))
    c = build("threshold:tau=1.0", COMPRESSORS)
    payload = c.encode(x, "w")
    kept = int((x.abs() >= 1.0).sum())
    assert uses_bitmap(BIG, kept) and payload.nbytes == 4 * kept + index_nbytes(BIG, kept)
    assert torch.equal(c.decode(payload), torch.where(x.abs() >= 1.0, x, torch.zeros_like(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 5, 1000, 3 * CHUNK, 2 * (1 << 20) + 7])
@pytest.mark.parametrize("tau", [0.5, 3.0])  # a bitmap (most kept), an index list (few kept)
def test_chunked_threshold_payload_is_the_masked_pack(dtype: torch.dtype, n: int, tau: float,
                                                      kernel_path: str) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    if n > 4:
        x[3] = float("nan")  # not kept, as |nan| >= tau is false
    mask = x.abs() >= tau
    blob = pack_at_least(x, tau)
    assert torch.equal(blob, pack_masked(x, mask, int(mask.sum())))  # same bytes as the whole-tensor path
    dense = unpack_dense(blob, torch.Size([n]), dtype)
    assert dense.dtype == dtype and torch.equal(dense, torch.where(mask, x, torch.zeros_like(x)))


def test_threshold_decodes_a_tensor_of_fresh_pages(kernel_path: str) -> None:  # zeroed pages, not chunk by chunk
    n = scratch.FRESH_MIN_NBYTES // 4 + 9
    x = torch.randn(n, generator=torch.Generator().manual_seed(2))
    dense = unpack_dense(pack_at_least(x, 1.5), x.shape, x.dtype)
    assert torch.equal(dense, torch.where(x.abs() >= 1.5, x, torch.zeros_like(x)))


@pytest.mark.parametrize("n", [3 * CHUNK + 9, MANY_MAX_NUMEL + 9])  # the many path, the large one
def test_expanding_a_bitmap_checks_its_count(n: int, kernel_path: str) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    blob = pack_at_least(x, 0.5)
    k = int((x.abs() >= 0.5).sum())
    blob[-1] ^= 0x01  # one bit more or less than the values sent
    with pytest.raises(ValueError, match=f"expected {k}"):
        unpack_dense(blob, x.shape, x.dtype, k)


def test_threshold_many_gives_each_payload_as_encode_would(kernel_path: str) -> None:
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(shape, generator=g) for shape in [(64, 129), (7,), (0,), (300, 300), (MANY_MAX_NUMEL + 3,)]]
    xs += [torch.randn(5000, generator=g) * 0.01, torch.randn(999, generator=g).half(), torch.randn(77, generator=g).bfloat16()]
    xs.append(torch.randn(40, 50, generator=g).t())  # not contiguous
    c = build("threshold:tau=0.8", COMPRESSORS)  # 42% kept (a bitmap); the 0.01-scaled tensor keeps none (a list)
    many = c.encode_many(xs, [f"t{i}" for i in range(len(xs))])
    for x, p in zip(xs, many):
        alone = c.encode(x, "a")
        assert torch.equal(p.tensors[0], alone.tensors[0]) and p.ctx[:2] == (x.shape, x.dtype)
    for payloads in (many, [c.encode(x, "a") for x in xs]):
        for got, p, x in zip(c.decode_many(payloads), payloads, xs):
            assert got.shape == x.shape and got.dtype == x.dtype and torch.equal(got, c.decode(p))
            assert torch.equal(got, torch.where(x.abs() >= 0.8, x, torch.zeros_like(x)))


@pytest.mark.parametrize("n", [1, 1000, 3 * CHUNK + 5, 2 * (1 << 20) + 7])  # one chunk; several; two threads
@pytest.mark.parametrize("numpy_from", [1, 1 << 62])  # NumPy's chunk loop at every size; the torch ops at every size
def test_int8_numpy_path_gives_the_torch_ops_bytes(n: int, numpy_from: int, monkeypatch: pytest.MonkeyPatch,
                                                   kernel_path: str) -> None:
    import lowband.compress.int8 as int8_module

    monkeypatch.setattr(int8_module, "NUMPY_MIN_NUMEL", numpy_from)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3 + 1
    lo, hi = x.min(), x.max()
    step = (hi - lo) / 255
    inv = torch.where(step > 0, 1 / step, torch.zeros_like(step))
    codes = ((x - lo) * inv).round().to(torch.uint8)  # the GPU path's ops, in its order
    c = build("int8", COMPRESSORS)
    payload = c.encode(x, "w")
    assert torch.equal(payload.tensors[0], torch.stack([lo, hi])) and torch.equal(payload.tensors[1], codes)
    assert torch.equal(c.decode(payload), codes.float() * step + lo)
    assert torch.equal(c.decode_many([payload, payload])[1], codes.float() * step + lo)


def test_int8_rounds_halves_to_even_on_every_path(kernel_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import lowband.compress.int8 as int8_module

    monkeypatch.setattr(int8_module, "NUMPY_MIN_NUMEL", 1)  # one tensor through the CPU path too
    x = (torch.arange(600, dtype=torch.float32) / 2).clamp(max=255.0)  # lo 0, hi 255: step 1, codes round(x)
    codes = x.round().to(torch.uint8)  # torch rounds half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    c = build("int8", COMPRESSORS)
    for payload in (c.encode(x, "w"), *c.encode_many([x, x], ["a", "b"])):
        assert torch.equal(payload.tensors[1], codes)
        assert torch.equal(c.decode(payload), codes.float())


@pytest.mark.parametrize("spec", ["qsgd:bits=2", "qsgd:bits=4", "qsgd:bits=8", "qsgd:bucket=0", "terngrad",
                                  "terngrad:clip=0"])
@pytest.mark.parametrize("n", [7, 1000, 3 * CHUNK + 77, 2 * (1 << 20) + 5])  # one chunk; several; two threads
def test_stochastic_rounding_in_numpy_gives_the_torch_ops_bytes(spec: str, n: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import lowband.compress.qsgd as qsgd_module
    import lowband.compress.terngrad as terngrad_module

    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    for module in (qsgd_module, terngrad_module):  # the NumPy path at every size
        monkeypatch.setattr(module, "NUMPY_MIN_NUMEL", 1)
    fast = build(spec, COMPRESSORS).encode(x, "w")
    for module in (qsgd_module, terngrad_module):  # the torch ops at every size
        monkeypatch.setattr(module, "NUMPY_MIN_NUMEL", 1 << 62)
    plain = build(spec, COMPRESSORS).encode(x, "w")  # the same seed, the same draws
    assert all(torch.equal(a, b) for a, b in zip(fast.tensors, plain.tensors))


@pytest.mark.parametrize("spec", ["int8", "int8:chunk=1000"])
def test_int8_on_a_large_tensor_with_a_partial_chunk(spec: str) -> None:
    x = torch.randn(BIG, generator=torch.Generator().manual_seed(6))
    c = build(spec, COMPRESSORS)
    out = c.decode(c.encode(x, "w"))
    size = 1000 if "chunk" in spec else BIG
    for start in range(0, BIG, size * 37):  # a sample of chunks, the partial last one included
        for lo in {start, (BIG - 1) // size * size}:
            part = x[lo:lo + size]
            step = (part.max() - part.min()) / 255
            assert float((out[lo:lo + size] - part).abs().max()) <= float(step) / 2 * 1.001 + 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1000, 2 * (1 << 20) + 7])
def test_compact_and_expand_are_masked_select_and_scatter(dtype: torch.dtype, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(dtype)
    mask = torch.rand(n, generator=g) < 0.3
    kept = compact(x, mask, torch.empty(int(mask.sum()), dtype=dtype))
    assert torch.equal(kept, x[mask])
    dense = expand(kept, mask)
    assert dense.dtype == dtype and torch.equal(dense, torch.where(mask, x, torch.zeros_like(x)))
    assert torch.equal(scratch.zeros(n, dtype, CPU), torch.zeros(n, dtype=dtype))


# -- many tensors in one call -----------------------------------------------------------------------
SHAPES_MANY = [(64, 129), (1000,), (7,), (512 * 3,), (300, 300), (600_000,), (0,), (13, 1)]


@pytest.mark.parametrize("spec", ["qsgd:bits=2", "qsgd:bits=4", "qsgd:bits=8", "qsgd:bucket=0", "sign", "int8",
                                  "int8:chunk=100", "terngrad", "terngrad:clip=0",
                                  "qsgd:bits=4,bucket=5"])  # buckets off byte boundaries: each alone
def test_encode_many_gives_each_payload_as_encode_would(spec: str) -> None:
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(shape, generator=g) for shape in SHAPES_MANY]
    keys = [f"t{i}" for i in range(len(xs))]
    c = build(spec, COMPRESSORS)
    many, alone = c.encode_many(xs, keys), [build(spec, COMPRESSORS).encode(x, k) for x, k in zip(xs, keys)]
    for a, b in zip(many, alone):
        assert [(t.shape, t.dtype) for t in a.tensors] == [(t.shape, t.dtype) for t in b.tensors]
        assert a.nbytes == b.nbytes
    for a, b in zip(many, alone):  # the same scales: norms, means, min and max, clipped peaks (to rounding)
        assert torch.allclose(a.tensors[0], b.tensors[0], rtol=1e-4, atol=0), (spec, a.tensors[0], b.tensors[0])
    for payloads in (many, alone):  # decode_many reads either exactly as decode does
        for got, p, x in zip(c.decode_many(payloads), payloads, xs):
            assert got.shape == x.shape and torch.equal(got, c.decode(p))


@pytest.mark.parametrize("spec", ["qsgd:bits=2", "terngrad:clip=0"])
def test_batched_stochastic_rounding_stays_unbiased(spec: str) -> None:
    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(shape, generator=g) for shape in [(50, 40), (700,), (3,)]]
    c = build(spec, COMPRESSORS)
    draws = [c.decode_many(c.encode_many(xs, ["a", "b", "c"])) for _ in range(400)]
    for i, x in enumerate(xs):
        mean = torch.stack([d[i] for d in draws]).mean(0)
        assert float((mean - x).norm() / x.norm()) < 0.25  # one draw's error is ~1-4x the norm


@pytest.mark.parametrize("n", [1, 13, 5000, 3 * CHUNK + 3])
def test_sign_decodes_alike_on_every_path(n: int, kernel_path: str) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    x[0] = 0.0  # a zero sends the sign bit clear: +scale
    c = build("sign", COMPRESSORS)
    payloads = c.encode_many([x, x[:7]], ["a", "b"])
    for p, part in zip(payloads, (x, x[:7])):
        scale = part.abs().mean()
        want = torch.where(part < 0, -scale, scale)
        assert torch.allclose(c.decode(p), want, rtol=1e-6) and torch.equal(c.decode(p), c.decode_many([p])[0])
        assert torch.equal(c.decode(p).abs(), torch.full_like(part, float(p.tensors[0])))


@pytest.mark.parametrize("spec", ["sign", "int8"])
def test_a_payload_of_the_wrong_length_is_refused_on_every_path(spec: str, kernel_path: str) -> None:
    c = build(spec, COMPRESSORS)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    payload = c.encode(x, "w")
    payload.tensors[1] = torch.cat([payload.tensors[1], payload.tensors[1]])  # twice the codes the shape takes
    with pytest.raises((ValueError, RuntimeError)):
        c.decode(payload)
