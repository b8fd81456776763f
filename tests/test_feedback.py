"""``ef21`` and ``econtrol`` in one process: the update rules, convergence, state, and EF21 = EControl(eta=0)."""

from __future__ import annotations

import pytest
import torch

from lowband.comm import Comm
from lowband.comm.aggregate import Aggregator
from lowband.compress import COMPRESSORS, Compressor, Payload, build
from lowband.feedback import FEEDBACK, Feedback
from lowband.feedback.econtrol import EControl, EControlOptions
from lowband.feedback.ef21 import EF21
from tiny import simulate


class TopK(Compressor):
    """Keep the k = ceil(ratio * numel) largest magnitudes (contractive: delta = k / numel). Test only."""

    name = "test-topk"
    summable = False

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = x.reshape(-1)
        k = max(1, int(-(-self.ratio * flat.numel() // 1)))
        idx = flat.abs().topk(k).indices
        return Payload([idx, flat[idx]], ctx=(x.shape, x.numel()))

    def decode(self, payload: Payload) -> torch.Tensor:
        shape, numel = payload.ctx
        idx, values = payload.tensors
        return torch.zeros(numel, dtype=values.dtype).index_put_((idx,), values).view(shape)


def topk(v: torch.Tensor, ratio: float) -> torch.Tensor:
    return TopK(ratio).decode(TopK(ratio).encode(v, ""))


def run(feedback: Feedback, compressor: Compressor, xs: list[torch.Tensor], key: str = "w") -> list[torch.Tensor]:
    """Average each x through the aggregator (one rank); returns what the algorithm would apply."""
    agg = Aggregator(Comm(), compressor, feedback, small_numel=0)
    out = []
    for x in xs:
        t = x.clone()
        agg.mean_([(key, t)])
        out.append(t)
    return out


def inputs(steps: int, shape: tuple[int, ...] = (10, 10), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


# -- options and registry ------------------------------------------------------------------

def test_registered_and_validated() -> None:
    assert isinstance(build("ef21", FEEDBACK), EF21)
    ec = build("econtrol:eta=0.25", FEEDBACK)
    assert isinstance(ec, EControl) and ec.options == EControlOptions(eta=0.25)
    assert EControl().options.eta == 0.1
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"^econtrol:eta must be in \[0, 1\], got {bad}$"):
            EControlOptions(eta=bad)


# -- ef21 ----------------------------------------------------------------------------------

def test_ef21_with_identity_reproduces_the_input() -> None:
    xs = inputs(4)
    out = run(EF21(), build("identity", COMPRESSORS), xs)
    assert torch.equal(out[0], xs[0])  # g = 0 + C(x - 0) = x
    for x, y in zip(xs[1:], out[1:]):  # g + (x - g): x up to one rounding
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", ["topk", "fp16"])
def test_ef21_estimate_converges_to_a_constant_input(spec: str) -> None:
    x = torch.randn(100, generator=torch.Generator().manual_seed(1))
    compressor = TopK(0.1) if spec == "topk" else build("fp16", COMPRESSORS)
    fb = EF21()
    errors = [(y - x).abs().max().item() for y in run(fb, compressor, [x] * 12)]
    assert all(b <= a for a, b in zip(errors, errors[1:])), errors
    if spec == "topk":  # 10 entries a round become exact: all 100 after 10 rounds
        assert errors[0] > 0.1 and errors[9] == 0.0, errors
    else:  # each round sends the remaining fp16 rounding error of the previous one
        assert errors[0] > 1e-5 and errors[-1] < 1e-7, errors
    # one rank: the shared estimate is this worker's
    assert torch.equal(fb.state["w"]["g"], fb.state["w"]["g_i"])


def test_ef21_rule_step_by_step() -> None:
    fb, xs = EF21(), inputs(5)
    g_i = torch.zeros(10, 10)
    for x, y in zip(xs, run(fb, TopK(0.2), xs)):
        g_i = g_i + topk(x - g_i, 0.2)  # c_i = C(x - g_i); g_i += c_i; g += c_i (one rank)
        assert torch.equal(y, g_i)
    assert torch.equal(fb.state["w"]["g_i"], g_i) and torch.equal(fb.state["w"]["g"], g_i)


# -- econtrol ------------------------------------------------------------------------------

def test_econtrol_with_eta_zero_is_ef21() -> None:
    xs = inputs(8, (40,), seed=3)
    ef21 = run(EF21(), TopK(0.1), xs)
    econtrol = run(EControl(EControlOptions(eta=0.0)), TopK(0.1), xs)
    for a, b in zip(ef21, econtrol):
        assert torch.equal(a, b)
    # and with eta > 0 it is not
    other = run(EControl(EControlOptions(eta=0.5)), TopK(0.1), xs)
    assert not torch.equal(other[-1], ef21[-1])


def test_econtrol_implements_the_docstring_equations() -> None:
    eta, ratio, xs = 0.3, 0.25, inputs(7, (8, 5), seed=4)
    fb = EControl(EControlOptions(eta=eta))
    e_i, h_i, h = (torch.zeros(8, 5) for _ in range(3))
    for g_i, y in zip(xs, run(fb, TopK(ratio), xs)):
        delta = topk(eta * e_i + g_i - h_i, ratio)  # 1. Delta_i = C(eta e_i + g_i - h_i)
        e_i = e_i + g_i - h_i - delta  # 2. e_i = e_i + g_i - h_i - Delta_i
        h_i = h_i + delta  # 3. h_i = h_i + Delta_i
        h = h + delta  # 4. h = h + mean Delta (one rank)
        torch.testing.assert_close(y, h, rtol=1e-6, atol=1e-6)
    for name, ref in (("e_i", e_i), ("h_i", h_i), ("h", h)):
        torch.testing.assert_close(fb.state["w"][name], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_econtrol_estimate_converges_to_a_constant_input() -> None:
    x = torch.randn(50, generator=torch.Generator().manual_seed(2))
    out = run(EControl(EControlOptions(eta=0.1)), TopK(0.3), [x] * 120)
    errors = [(y - x).norm().item() / x.norm().item() for y in out]
    assert errors[0] > 0.1 and errors[-1] < 1e-5, errors[::10]


# -- several ranks (simulated): the shared estimate is the mean of the workers' ------------

@pytest.mark.parametrize("name", ["ef21", "econtrol"])
def test_shared_estimate_is_the_mean_of_worker_estimates(name: str) -> None:
    n, xs = 3, [inputs(5, (12, 16), seed=10 + r) for r in range(3)]
    fbs = [build(name, FEEDBACK) for _ in range(n)]
    comps = [build("powersgd:rank=1", COMPRESSORS) for _ in range(n)]
    local = "h_i" if name == "econtrol" else "g_i"
    shared = "h" if name == "econtrol" else "g"
    for step in range(5):
        compensated = [fb.compensate("w", xs[r][step]) for r, fb in enumerate(fbs)]
        results, _ = simulate(comps, compensated, "w")
        outs = []
        for r, fb in enumerate(fbs):
            mean, own = results[r]
            fb.update("w", compensated[r], own)
            outs.append(fb.finalize("w", mean))
        for out in outs[1:]:
            assert torch.equal(out, outs[0])
        mean_local = sum(fb.state["w"][local] for fb in fbs) / n
        torch.testing.assert_close(fbs[0].state["w"][shared], mean_local, rtol=1e-4, atol=1e-5)


# -- state ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [EF21, lambda: EControl(EControlOptions(eta=0.2))], ids=["ef21", "econtrol"])
def test_state_dict_round_trip(make) -> None:
    xs = inputs(6, (30,), seed=5)
    a = make()
    run(a, TopK(0.2), xs[:3])
    saved = a.state_dict()
    expected = run(a, TopK(0.2), xs[3:])  # continuing must not change what was saved
    b = make()
    b.load_state_dict(saved)
    assert sorted(saved["w"]) == sorted(a.state["w"])
    for want, got in zip(expected, run(b, TopK(0.2), xs[3:])):
        assert torch.equal(want, got)
    fresh = run(make(), TopK(0.2), xs[3:4])[0]
    assert not torch.equal(fresh, expected[0])

