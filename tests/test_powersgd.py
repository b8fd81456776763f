"""``powersgd`` in one process: the algorithm, its policy, its state, and the aggregator path.

Several ranks are simulated by running one exchange generator per rank in lockstep and
summing their payloads, which is what the aggregator's all-reduce does.
"""

from __future__ import annotations

import pytest
import torch

from lowband.comm import Comm
from lowband.comm.aggregate import Aggregator, small_key
from lowband.compress import COMPRESSORS, Payload, build
from lowband.compress.powersgd import PowerSGD, PowerSGDOptions, orthogonalize
from lowband.feedback import FEEDBACK
from lowband.feedback.ef import ErrorFeedback
from tiny import simulate


def one(comp: PowerSGD, x: torch.Tensor, key: str = "w") -> tuple[torch.Tensor, torch.Tensor, list[Payload]]:
    (res,), rounds = simulate([comp], [x], key)
    return res[0], res[1], rounds


def low_rank(n: int, m: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g) @ torch.randn(r, m, generator=g)


def test_options_validated_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"^powersgd:rank must be >= 1, got 0$"):
        build("powersgd:rank=0", COMPRESSORS)
    with pytest.raises(ValueError, match="powersgd:start_iter must be >= 0, got -1"):
        PowerSGDOptions(start_iter=-1)
    with pytest.raises(ValueError, match="powersgd:min_compression_rate must be >= 0"):
        PowerSGDOptions(min_compression_rate=-1.0)
    comp = build("powersgd:rank=3,min_compression_rate=1.5,start_iter=4,seed=7", COMPRESSORS)
    assert comp.options == PowerSGDOptions(rank=3, min_compression_rate=1.5, start_iter=4, seed=7)
    assert comp.summable


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_orthogonalize_gives_orthonormal_columns_of_the_same_span(rank: int) -> None:
    a = torch.randn(50, rank, dtype=torch.float64)
    q = orthogonalize(a.clone())
    torch.testing.assert_close(q.t() @ q, torch.eye(rank, dtype=torch.float64))
    torch.testing.assert_close(q @ (q.t() @ a), a)  # a lies in span(q)
    zero = orthogonalize(torch.zeros(10, 2))
    assert torch.equal(zero, torch.zeros(10, 2)), "a zero column must stay zero, not NaN"


def test_p_is_orthonormal_and_payload_bytes_exact() -> None:
    x = torch.randn(16, 3, 3, 3)  # conv weight: M is (16, 27)
    comp = PowerSGD(PowerSGDOptions(rank=2))
    mean, own, rounds = one(comp, x)
    assert [p.nbytes for p in rounds] == [16 * 2 * 4, 27 * 2 * 4]
    assert sum(p.nbytes for p in rounds) == (16 + 27) * 2 * 4
    payload = PowerSGD(PowerSGDOptions(rank=2)).encode(x, "w")
    p, q = payload.tensors
    assert payload.nbytes == (16 + 27) * 2 * 4
    torch.testing.assert_close(p.t() @ p, torch.eye(2), atol=1e-5, rtol=0)
    # one rank: the result is P^ P^^T M, the projection on span(P^), and own == mean
    m = x.reshape(16, -1)
    torch.testing.assert_close(mean.reshape(16, -1), p @ (p.t() @ m), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(own, mean)
    torch.testing.assert_close(PowerSGD().decode(payload), mean, atol=1e-5, rtol=1e-5)


def test_rank_r_matrix_is_reconstructed_exactly() -> None:
    x = low_rank(64, 48, 2)
    comp = PowerSGD(PowerSGDOptions(rank=2))
    for _ in range(3):  # warm-started steps on the same matrix
        mean, _, _ = one(comp, x)
        torch.testing.assert_close(mean, x, atol=1e-4, rtol=1e-4)


def test_power_iteration_converges_to_the_best_rank_r_approximation() -> None:
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(60, 60, generator=g))
    v, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    s = torch.tensor([10.0, 6.0] + [0.3] * 38)
    x = (u[:, :40] * s) @ v.t()
    best = (u[:, :2] * s[:2]) @ v[:, :2].t()  # Eckart-Young
    comp = PowerSGD(PowerSGDOptions(rank=2))
    errors = [(one(comp, x)[0] - best).norm().item() / best.norm().item() for _ in range(8)]
    assert errors[0] > 1e-2, "a random Q should not already be optimal"
    assert errors[-1] < 1e-5, errors
    assert all(b <= a or b < 1e-5 for a, b in zip(errors, errors[1:])), errors  # down to float32 rounding


def test_simulated_ranks_agree_and_average() -> None:
    n, key = 3, "layer.weight"
    xs = [torch.randn(20, 30) for _ in range(n)]
    comps = [PowerSGD(PowerSGDOptions(rank=2, seed=5)) for _ in range(n)]
    for _ in range(3):
        results, _ = simulate(comps, xs, key)
        means = [mean for mean, _ in results]
        for mean in means[1:]:
            torch.testing.assert_close(mean, means[0])
        # the mean of the own decodings is the mean (what error feedback relies on)
        torch.testing.assert_close(sum(own for _, own in results) / n, means[0], atol=1e-5, rtol=1e-5)
    # the result depends on the inputs only through their mean: one rank holding the mean agrees
    solo = PowerSGD(PowerSGDOptions(rank=2, seed=5))
    solo.load_state_dict(comps[0].state_dict())
    results, _ = simulate(comps, xs, key)
    mean_1, _, _ = one(solo, sum(xs) / n, key)
    torch.testing.assert_close(results[0][0], mean_1, atol=1e-5, rtol=1e-4)


def test_initial_q_depends_on_seed_and_key_only() -> None:
    x = torch.randn(32, 32)
    a, _, _ = one(PowerSGD(PowerSGDOptions(seed=1)), x, "k")
    b, _, _ = one(PowerSGD(PowerSGDOptions(seed=1)), x, "k")
    c, _, _ = one(PowerSGD(PowerSGDOptions(seed=2)), x, "k")
    d, _, _ = one(PowerSGD(PowerSGDOptions(seed=1)), x, "other")
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize("x", [torch.randn(100), torch.randn(3, 128), torch.randn(8, 8), torch.randn(2, 2)],
                         ids=["1-D", "rate 1.47", "rate exactly 2", "tiny"])
def test_policy_sends_vectors_and_poor_rates_raw(x: torch.Tensor) -> None:
    mean, own, rounds = one(PowerSGD(PowerSGDOptions(rank=2, min_compression_rate=2.0)), x)
    assert len(rounds) == 1 and rounds[0].nbytes == x.numel() * 4
    assert torch.equal(mean, x) and own is x


def test_min_compression_rate_threshold_is_strict_like_torch() -> None:
    x = torch.randn(8, 8)  # 64 / ((8 + 8) * 2) = 2.0
    _, _, rounds = one(PowerSGD(PowerSGDOptions(rank=2, min_compression_rate=1.99)), x)
    assert len(rounds) == 2
    _, _, rounds = one(PowerSGD(PowerSGDOptions(rank=2, min_compression_rate=2.0)), x)
    assert len(rounds) == 1


def test_rank_is_capped_by_the_matrix_shape() -> None:
    x = torch.randn(3, 400)  # rank 8 -> r = 3: 1200 / (403 * 3) < 2 -> raw; with rate 0.5 -> compressed
    _, _, rounds = one(PowerSGD(PowerSGDOptions(rank=8, min_compression_rate=0.5)), x)
    assert [p.tensors[0].shape for p in rounds] == [(3, 3), (400, 3)]


def test_start_iter_sends_raw_first() -> None:
    comp = PowerSGD(PowerSGDOptions(rank=1, start_iter=2))
    x = torch.randn(40, 50)
    for step in range(4):
        mean, _, rounds = one(comp, x)
        assert len(rounds) == (1 if step < 2 else 2), f"step {step}"
        assert torch.equal(mean, x) == (step < 2)
    assert comp.state_dict()["steps"] == {"w": 4}


def test_state_dict_round_trip_reproduces_the_next_exchange() -> None:
    opts = PowerSGDOptions(rank=2, start_iter=1)
    xs = [torch.randn(30, 20) for _ in range(5)]
    a = PowerSGD(opts)
    for x in xs[:3]:
        one(a, x)
    saved = a.state_dict()
    expected = [one(a, x)[:2] for x in xs[3:]]  # moving on must not change what was saved
    b = PowerSGD(opts)
    b.load_state_dict(saved)
    for x, (mean, own) in zip(xs[3:], expected):
        m, o, _ = one(b, x)
        assert torch.equal(m, mean) and torch.equal(o, own)
    assert b.state_dict()["steps"] == {"w": 5}
    cold, _, _ = one(PowerSGD(PowerSGDOptions(rank=2)), xs[3])  # without the state: another Q
    assert not torch.allclose(cold, expected[0][0])


def test_error_feedback_identity() -> None:
    comp, ef = PowerSGD(PowerSGDOptions(rank=1)), ErrorFeedback()
    total_in, total_out = torch.zeros(24, 36), torch.zeros(24, 36)
    for step in range(6):
        x = torch.randn(24, 36, generator=torch.Generator().manual_seed(step))
        compensated = ef.compensate("w", x)
        mean, own, _ = one(comp, compensated)
        ef.update("w", compensated, own)
        residual = ef.state["w"]["residual"]
        torch.testing.assert_close(compensated, own + residual)
        assert residual.abs().max() > 1e-3, "rank 1 of a random matrix must leave an error"
        total_in += x
        total_out += ef.finalize("w", mean)
    # one rank: nothing is lost, only delayed
    torch.testing.assert_close(total_out + ef.state["w"]["residual"], total_in, atol=1e-4, rtol=1e-4)


def test_through_the_aggregator_in_one_process() -> None:
    comm = Comm()
    assert comm.world_size == 1
    agg = Aggregator(comm, build("powersgd:rank=2", COMPRESSORS), build("ef", FEEDBACK))
    gen = torch.Generator().manual_seed(0)
    shapes = {"conv.weight": (32, 16, 3, 3), "fc.weight": (64, 96), "fc.bias": (64,),
              "head.weight": (10, 64), "head.bias": (10,), "norm.weight": (96,)}
    sums_in = {k: torch.zeros(s) for k, s in shapes.items()}
    sums_out = {k: torch.zeros(s) for k, s in shapes.items()}
    for _ in range(4):
        grads = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        originals = {k: v.clone() for k, v in grads.items()}
        agg.mean_(list(grads.items()))
        for k in shapes:
            sums_in[k] += originals[k]
            sums_out[k] += grads[k]
            if k in ("conv.weight", "fc.weight"):  # >= small_numel: compressed to rank 2
                assert torch.linalg.matrix_rank(grads[k].reshape(shapes[k][0], -1)) <= 2
            else:  # bucketed as the 1-D small-tensor bucket: sent raw
                assert torch.equal(grads[k], originals[k]), k
    state = agg.compressor.state_dict()
    assert set(state["q"]) == {"conv.weight", "fc.weight"}
    small = small_key(torch.float32, [k for k in shapes if k not in ("conv.weight", "fc.weight")])
    assert state["steps"] == {"conv.weight": 4, "fc.weight": 4, small: 4}
    for k in ("conv.weight", "fc.weight"):  # error feedback: sent + residual == input
        residual = agg.feedback.state[k]["residual"].view(shapes[k])
        torch.testing.assert_close(sums_out[k] + residual, sums_in[k], atol=1e-4, rtol=1e-4)
