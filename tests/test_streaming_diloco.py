"""Streaming DiLoCo: the DiLoCo anchor, the fragment schedule, checkpoints, and real gloo ranks."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.algorithms import ALGORITHMS
from lowband.algorithms.diloco import DiLoCo, DiLoCoOptions
from lowband.algorithms.streaming_diloco import StreamingDiLoCo, StreamingDiLoCoOptions, contiguous_fragments
from lowband.comm import Comm
from lowband.comm.group import init_from_env, shutdown
from lowband.train.config import TrainConfig, Variant
from lowband.train.launch import launch
from lowband.train.models.gpt import GPT
from tiny import batch, flat, tiny_gpt



def make(cls: type, options: Any, seed: int = 0, comm: Comm | None = None) -> tuple[GPT, Any]:
    m = tiny_gpt(seed)
    return m, cls(m, torch.optim.AdamW(m.parameters(), lr=1e-2), comm or Comm(), options)


def run(m: GPT, algo: Any, steps: range, rank: int = 0, after: Any = None) -> None:
    for step in steps:
        x, y = batch(rank, step)
        m(x, y)[1].backward()
        algo.step()
        algo.zero_grad()
        if after is not None:
            after(step + 1)


# -- single process -------------------------------------------------------------------------
@pytest.mark.parametrize("compress", ["identity", "qsgd:bits=4"])
def test_one_fragment_no_overlap_replace_equals_diloco(compress: str) -> None:
    h, rounds = 3, 3
    m1, diloco = make(DiLoCo, DiLoCoOptions(inner_steps=h, compress=compress))
    m2, streaming = make(StreamingDiLoCo, StreamingDiLoCoOptions(inner_steps=h, compress=compress,
                                                                 fragments=1, tau=0, alpha=0.0))
    for step in range(h * rounds):
        run(m1, diloco, range(step, step + 1))
        run(m2, streaming, range(step, step + 1))
        for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
            assert torch.equal(p1, p2), f"step {step + 1}: {name}"
        for g1, g2 in zip(diloco.global_params, streaming.global_params):
            assert torch.equal(g1, g2), f"step {step + 1}: global parameters differ"
    assert streaming.outer_steps == diloco.outer_steps == rounds


def test_fragments_partition_parameters_contiguously() -> None:
    m, algo = make(StreamingDiLoCo, StreamingDiLoCoOptions(fragments=4))
    assert [i for f in algo.fragments for i in f] == list(range(len(algo.params)))  # each once, in order
    assert all(f for f in algo.fragments)
    sizes = [sum(algo.params[i].numel() for i in f) for f in algo.fragments]
    assert max(sizes) <= 1.5 * sum(sizes) / 4, sizes
    assert contiguous_fragments([10, 10, 10, 10], 2) == [[0, 1], [2, 3]]
    assert contiguous_fragments([100, 1, 1, 1], 3) == [[0], [1], [2, 3]]  # never empty
    assert contiguous_fragments([1, 1, 1, 100], 2) == [[0, 1, 2], [3]]
    assert contiguous_fragments([5], 1) == [[0]]
    with pytest.raises(ValueError, match="fragments <= 28"):
        make(StreamingDiLoCo, StreamingDiLoCoOptions(fragments=29, inner_steps=40))


def test_every_parameter_synchronised_once_per_period() -> None:
    h, p_count, tau, steps = 8, 4, 2, 32
    m, algo = make(StreamingDiLoCo, StreamingDiLoCoOptions(inner_steps=h, fragments=p_count, tau=tau,
                                                           compress="identity"))
    starts: list[tuple[int, int]] = []
    applies: list[tuple[int, int]] = []
    start_sync, apply_sync = algo.start_sync, algo.apply_sync
    algo.start_sync = lambda p: (starts.append((algo.step_count, p)), start_sync(p))[1]
    algo.apply_sync = lambda p: (applies.append((algo.step_count, p)), apply_sync(p))[1]
    globals_before = [flat(algo.global_params)]
    run(m, algo, range(steps), after=lambda s: globals_before.append(flat(algo.global_params)))

    assert algo.offsets == [0, 2, 4, 6]
    assert sorted(starts) == sorted((t, p) for t in range(1, steps + 1) for p in range(p_count)
                                    if (t - algo.offsets[p]) % h == 0)
    assert applies == [(t + tau, p) for t, p in starts if t + tau <= steps]
    for window in range(steps // h):  # each parameter starts exactly once in every H consecutive steps
        lo = window * h + 1
        covered = [i for t, p in starts if lo <= t < lo + h for i in algo.fragments[p]]
        assert sorted(covered) == list(range(len(algo.params))), f"steps {lo}..{lo + h - 1}"
    assert {t for t, _ in starts} == {t for t in range(1, steps + 1) if t % (h // p_count) == 0}  # staggered

    # theta_g moves exactly where a fragment's outer step is applied, and only that fragment
    bounds = [0]
    for prm in algo.params:
        bounds.append(bounds[-1] + prm.numel())
    applied = dict(((t, p), True) for t, p in applies)
    for t in range(1, steps + 1):
        before, after = globals_before[t - 1], globals_before[t]
        for p, frag in enumerate(algo.fragments):
            lo, hi = bounds[frag[0]], bounds[frag[-1] + 1]
            moved = not torch.equal(before[lo:hi], after[lo:hi])
            assert moved == ((t, p) in applied), f"step {t} fragment {p}: moved={moved}"
    in_flight = sorted(algo.in_flight)
    algo.finish()  # applies what was still in flight
    assert not algo.in_flight and in_flight == [p for t, p in starts if t + tau > steps]
    assert algo.outer_steps == len(starts) == sum(algo.fragment_outer_steps)


def test_alpha_mixes_the_arriving_fragment() -> None:
    m, algo = make(StreamingDiLoCo, StreamingDiLoCoOptions(inner_steps=2, fragments=1, tau=0, alpha=0.25,
                                                           compress="identity"))
    run(m, algo, range(1))
    local = flat(algo.params)
    x, y = batch(0, 1)
    m(x, y)[1].backward()
    algo.reduce_gradients()
    algo.optimizer.step()
    algo.step_count += 1
    before_merge = flat(algo.params)
    algo.after_step()  # step 2: sync, tau = 0: apply now
    expected = 0.25 * before_merge + 0.75 * flat(algo.global_params)
    torch.testing.assert_close(flat(algo.params), expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(local, before_merge)


@pytest.mark.parametrize("checkpoint_after", [1, 3, 5, 6])
def test_state_dict_resumes_bit_identically(checkpoint_after: int) -> None:
    """P=2, H=4, tau=2: fragment 1 starts after steps 2, 6, 10 and fragment 0 after 4, 8, 12; each lands
    2 steps later (after step 6 fragment 0 has just landed and fragment 1 has just left)."""
    opts = StreamingDiLoCoOptions(inner_steps=4, fragments=2, tau=2, alpha=0.5, feedback="ef")  # qsgd:bits=4
    total = 13
    m1, a1 = make(StreamingDiLoCo, opts)
    run(m1, a1, range(total))
    a1.finish()

    m2, a2 = make(StreamingDiLoCo, opts)
    run(m2, a2, range(checkpoint_after))
    expect_in_flight = {1: [], 3: [1], 5: [0], 6: [1]}[checkpoint_after]
    assert sorted(a2.in_flight) == expect_in_flight
    saved = copy.deepcopy({"model": m2.state_dict(), "inner": a2.optimizer.state_dict(), "algo": a2.state_dict()})
    del m2, a2
    m3, a3 = make(StreamingDiLoCo, opts, seed=5)  # a different init: everything must come from the checkpoint
    m3.load_state_dict(saved["model"])
    a3.optimizer.load_state_dict(saved["inner"])
    a3.load_state_dict(saved["algo"])
    assert sorted(a3.in_flight) == expect_in_flight
    run(m3, a3, range(checkpoint_after, total))
    a3.finish()
    assert a3.outer_steps == a1.outer_steps and a3.fragment_outer_steps == a1.fragment_outer_steps
    for (name, p1), p3 in zip(m1.named_parameters(), m3.parameters()):
        assert torch.equal(p1, p3), name
    for g1, g3 in zip(a1.global_params, a3.global_params):
        assert torch.equal(g1, g3)


def test_options_are_validated() -> None:
    for kwargs, message in [({"fragments": 0}, "fragments"), ({"tau": -1}, "tau"), ({"tau": 20}, "tau"),
                            ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha"), ({"compress": "nope"}, "nope")]:
        with pytest.raises(ValueError, match=message):
            StreamingDiLoCoOptions(**kwargs)
    assert StreamingDiLoCoOptions().compress == "qsgd:bits=4"
    opts = TrainConfig(algos=("streaming-diloco:fragments=2,tau=3,alpha=0.25",)).options_for(
        Variant("streaming-diloco:fragments=2,tau=3,alpha=0.25"))
    assert (opts.fragments, opts.tau, opts.alpha, opts.inner_steps) == (2, 3, 0.25, 20)
    assert ALGORITHMS.get("streaming-diloco") is StreamingDiLoCo


# -- real ranks -------------------------------------------------------------------------------
H, P, TAU, STEPS = 4, 4, 1, 8


@record
def ranks_worker() -> dict[str, Any]:
    """Streaming (4-bit default and fp32) and DiLoCo (fp32): parameter histories and outer records."""
    rank, _ = init_from_env()
    try:
        out: dict[str, Any] = {}
        runs = {"streaming": (StreamingDiLoCo, StreamingDiLoCoOptions(inner_steps=H, fragments=P, tau=TAU)),
                "streaming-fp32": (StreamingDiLoCo, StreamingDiLoCoOptions(inner_steps=H, fragments=P, tau=TAU,
                                                                           compress="identity")),
                "diloco": (DiLoCo, DiLoCoOptions(inner_steps=H))}
        for key, (cls, opts) in runs.items():
            comm = Comm()
            m, algo = make(cls, opts, seed=rank + 1, comm=comm)  # different init per rank: broadcast fixes it
            history: dict[str, list[torch.Tensor]] = {"global": [], "local": []}

            def after(step: int) -> None:
                history["global"].append(flat(algo.global_params))
                history["local"].append(flat(algo.params))

            run(m, algo, range(STEPS), rank, after)
            algo.finish()
            comm.close()
            out[key] = {**history, "outer": [(r.payload, r.sent) for r in comm.ledger.records if r.tag == "outer"],
                        "fragments": getattr(algo, "fragments", None)}
        return out
    finally:
        shutdown()


# 4 ranks only with -m slow: the comm layer's default tests already run 4 ranks
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ranks_agree_and_each_sync_sends_a_fragment(world: int) -> None:
    results = launch(ranks_worker, world)
    for key in ("streaming", "streaming-fp32"):
        for step in range(STEPS):
            globals_ = [results[r][key]["global"][step] for r in range(world)]
            assert all(torch.equal(globals_[0], g) for g in globals_[1:]), f"{key} step {step + 1}: theta_g differs"
            locals_ = [results[r][key]["local"][step] for r in range(world)]
            assert not all(torch.equal(locals_[0], x) for x in locals_[1:]), f"{key} step {step + 1}: no local training"
        # syncs start after every step (offsets 0..3 with H = P = 4) and land TAU = 1 step later
        moved = [not torch.equal(a, b) for a, b in zip(results[0][key]["global"], results[0][key]["global"][1:])]
        assert all(moved), f"{key}: theta_g should move after every step from step 2 on, moved: {moved}"

    fragments = results[0]["streaming-fp32"]["fragments"]
    diloco = results[0]["diloco"]["outer"]
    streaming = results[0]["streaming-fp32"]["outer"]
    assert len(diloco) == STEPS // H and len(streaming) == STEPS  # P syncs per H steps, one per step here
    for rnd in range(STEPS // H):
        cycle = streaming[rnd * P:(rnd + 1) * P]  # syncs started in steps rnd*H+1 .. (rnd+1)*H: every fragment once
        assert sum(payload for payload, _ in cycle) == diloco[rnd][0]
    biggest = max(sent for _, sent in streaming)
    assert biggest <= 1.5 * diloco[0][1] / P, (biggest, diloco[0][1], fragments)
    quantized = max(sent for _, sent in results[0]["streaming"]["outer"])
    assert quantized < biggest / 2, "4-bit outer gradients should cost well under half of fp32"
