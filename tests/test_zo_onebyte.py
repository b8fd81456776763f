"""Tests of ``zo-onebyte``: bit-identical ranks after every step (2 and 4 gloo ranks), the update
against a single-process reference built from the seeds and bytes, one byte per worker per step
in the ledger, abstention, fine-tuning lowers the loss, bit-identical resume, --init-from, options."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lowband.algorithms import ALGORITHMS
from lowband.algorithms.zo_onebyte import (ABSTAIN, ZOOneByte, ZOOneByteOptions, adapt_scale, dequantize,
                                           perturbation_seed, quantize)
from lowband.comm import Comm
from lowband.comm.group import init_from_env, shutdown
from lowband.registry import parse_spec
from lowband.train.checkpoint import MARKER, atomic_write_text, load_model_into, rank_file, save_checkpoint
from lowband.train.config import TrainConfig, Variant
from lowband.train.launch import launch
from lowband.train.models.gpt import GPT
from tiny import B, T, VOCAB, batch, flat
from tiny import tiny_gpt as _tiny

LR, WD, EPS, SEED = 3e-3, 0.01, 1e-3, 5
STEPS, NAN_STEP = 6, 3  # rank 1 abstains at NAN_STEP (its losses are NaN)


def tiny_gpt(seed: int = 0) -> GPT:
    return _tiny(seed, n_layer=1, n_embd=16)


def make(comm: Comm, seed: int = 0, lr: float = LR) -> tuple[GPT, ZOOneByte]:
    model = tiny_gpt(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=WD)
    return model, ZOOneByte(model, opt, comm, ZOOneByteOptions(eps=EPS, seed=SEED))


def closure(model: GPT, rank: int, step: int) -> Any:
    x, y = batch(rank, step)
    if rank == 1 and step == NAN_STEP:
        return lambda: model(x, y)[1] * math.nan  # this worker drops out of the step
    return lambda: model(x, y)[1]


def run(model: GPT, algo: ZOOneByte, steps: range, rank: int) -> list[torch.Tensor]:
    out = []
    for step in steps:
        algo.zo_step(closure(model, rank, step))
        out.append(flat(model.parameters()))
    return out


@record
def zo_worker(stop: int | None) -> dict[str, Any]:
    rank, world = init_from_env()
    try:
        comm = Comm()
        model, algo = make(comm, seed=rank + 1)  # the broadcast must equalise the init
        initial = flat(model.parameters())
        history, records, sent = [], [], []
        for step in range(STEPS):
            before = comm.ledger.bytes_sent
            history += run(model, algo, range(step, step + 1), rank)
            records.append(algo.last)
            sent.append(comm.ledger.bytes_sent - before)
        ops = [(r.op, r.tag, r.payload, r.sent) for r in comm.ledger.records if r.tag == "zo-bytes"]
        resumed = None
        if stop is not None:  # train to stop, save, restore into fresh objects, continue
            m2, a2 = make(comm, seed=1)
            run(m2, a2, range(stop), rank)
            saved = copy.deepcopy({"model": m2.state_dict(), "algo": a2.state_dict()})
            m3, a3 = make(comm, seed=9)
            m3.load_state_dict(saved["model"])
            a3.load_state_dict(saved["algo"])
            resumed = run(m3, a3, range(stop, STEPS), rank)[-1]
        comm.close()
        return {"initial": initial, "history": history, "records": records, "sent": sent, "ops": ops,
                "resumed": resumed}
    finally:
        shutdown()


def reference(initial: torch.Tensor, records: list[Any]) -> list[torch.Tensor]:
    """Single process: theta *= 1 - lr wd; theta -= lr mean_j(q_j s z_j), z_j regenerated from the seeds."""
    shapes = [p.shape for p in tiny_gpt().parameters()]
    theta, out = initial.clone().double(), []
    for rec in records:
        lr = rec.lrs[0]
        contributors = [(w, dequantize(c, rec.scale)) for w, c in enumerate(rec.codes) if c != ABSTAIN]
        update = torch.zeros_like(theta)
        for w, g in contributors:
            gen = torch.Generator().manual_seed(perturbation_seed(SEED, w, rec.step))
            z = torch.cat([torch.randn(s, generator=gen).reshape(-1) for s in shapes]).double()
            update += g * z / len(contributors)
        theta = theta * (1 - lr * WD) - lr * update
        out.append(theta.float())
    return out


def reference_bytes(initial: torch.Tensor, records: list[Any], world: int) -> list[list[int]]:
    """Each worker's byte recomputed here: losses at theta +- eps z_w on its batch, quantised."""
    model = tiny_gpt()
    shapes = [p.numel() for p in model.parameters()]
    out, thetas = [], [initial] + reference(initial, records)[:-1]
    with torch.no_grad():
        for rec, theta in zip(records, thetas):
            codes = []
            for w in range(world):
                gen = torch.Generator().manual_seed(perturbation_seed(SEED, w, rec.step))
                z = torch.cat([torch.randn(n, generator=gen) for n in shapes])
                losses = []
                for sign in (1, -1):
                    for p, v in zip(model.parameters(), (theta + sign * EPS * z).split(shapes)):
                        p.copy_(v.view_as(p))
                    losses.append(closure(model, w, rec.step - 1)().item())
                codes.append(quantize((losses[0] - losses[1]) / (2 * EPS), rec.scale))
            out.append(codes)
    return out


def check(results: dict[int, dict[str, Any]], world: int) -> None:
    zero = results[0]
    for rank, r in results.items():
        for step in range(STEPS):  # bit-identical on every rank after every step
            assert torch.equal(r["history"][step], zero["history"][step]), f"rank {rank} differs after step {step + 1}"
        assert [x.codes for x in r["records"]] == [x.codes for x in zero["records"]]
        # one 1-byte all-gather per step: (n - 1) bytes sent per worker on the ring
        assert r["ops"] == [("all_gather", "zo-bytes", 1, world - 1)] * STEPS, r["ops"]
        assert r["sent"] == [world - 1] * STEPS
    records = zero["records"]
    assert [x.step for x in records] == list(range(1, STEPS + 1))
    assert records[NAN_STEP].codes[1] == ABSTAIN and sum(c == ABSTAIN for x in records for c in x.codes) == 1
    scales = [x.scale for x in records]
    for prev, rec, nxt in zip(records, records[1:], scales[1:]):
        assert nxt == adapt_scale(prev.scale, list(prev.codes))  # the quantiser step follows the bytes only
    for step, (got, want) in enumerate(zip(zero["history"], reference(zero["initial"], records))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=lambda m: f"step {step + 1}: {m}")
    assert not torch.equal(zero["history"][-1], zero["initial"]), "training stopped"
    for step, (rec, codes) in enumerate(zip(records, reference_bytes(zero["initial"], records, world))):
        for w, (got, want) in enumerate(zip(rec.codes, codes)):
            assert (got == want == ABSTAIN) or abs(got - want) <= 1, f"step {step + 1} worker {w}: {got} vs {want}"


def test_two_ranks_bit_identical_reference_bytes_and_resume() -> None:
    results = launch(zo_worker, 2, 2)
    check(results, 2)
    for rank, r in results.items():
        assert torch.equal(r["resumed"], r["history"][-1]), f"rank {rank}: resume not bit-identical"


def test_four_ranks_bit_identical_and_reference() -> None:
    check(launch(zo_worker, 4, None), 4)


# ----------------------------------------------------------------------------- one process


def shifted(step: int, size: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: every sequence counts up by 3 (mod VOCAB) from a random start."""
    g = torch.Generator().manual_seed(step)
    seq = (torch.randint(0, VOCAB, (size, 1), generator=g) + 3 * torch.arange(T + 1)) % VOCAB
    return seq[:, :-1], seq[:, 1:]


def test_fine_tuning_lowers_the_loss_of_a_pretrained_model() -> None:
    model = tiny_gpt()
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(15):  # "pre-training": part of the way
        adam.zero_grad()
        model(*shifted(step))[1].backward()
        adam.step()
    held_out = [shifted(10_000 + i, 16) for i in range(4)]

    def loss() -> float:
        with torch.no_grad():
            return sum(model(x, y)[1].item() for x, y in held_out) / len(held_out)

    before = loss()
    algo = ZOOneByte(model, torch.optim.SGD(model.parameters(), lr=3e-3), Comm(), ZOOneByteOptions())
    for step in range(200):
        x, y = shifted(100 + step)
        algo.zo_step(lambda: model(x, y)[1])
    after = loss()
    assert after < 0.93 * before, f"held-out loss {before:.3f} -> {after:.3f}"
    assert algo.comm.ledger.bytes_sent == 0 and algo.step_count == 200


def test_quantiser() -> None:
    assert quantize(0.0, 0.01) == 128 and quantize(0.034, 0.01) == 131 and quantize(-0.034, 0.01) == 125
    assert quantize(5.0, 0.01) == 255 and quantize(-5.0, 0.01) == 1  # clipped at +-127 steps
    assert quantize(math.nan, 0.01) == quantize(math.inf, 0.01) == ABSTAIN
    assert dequantize(131, 0.01) == pytest.approx(0.03)
    assert adapt_scale(0.01, [255, 130]) == 0.02  # saturated: grow
    assert adapt_scale(0.01, [150, 128]) == 0.005  # every |q| < 32: shrink
    assert adapt_scale(0.01, [200, ABSTAIN]) == 0.01 and adapt_scale(0.01, [ABSTAIN]) == 0.01


def test_step_refuses_gradients_and_state_covers_the_quantiser() -> None:
    model, algo = make(Comm())
    with pytest.raises(TypeError, match=r"zeroth-order: call algo.zo_step\(closure\)"):
        algo.step()
    with pytest.raises(TypeError, match="zeroth-order"):
        with algo:
            pass
    for step in range(3):
        algo.zo_step(closure(model, 0, step))
    state = algo.state_dict()
    assert state == {"step_count": 3, "scale": algo.scale}
    _, fresh = make(Comm())
    fresh.load_state_dict(state)
    assert (fresh.step_count, fresh.scale) == (3, algo.scale)
    assert set(algo.metrics()) == {"zo_scale", "zo_contributors"}


def test_registered_with_validated_options() -> None:
    cls, kwargs = parse_spec("zo-onebyte:eps=0.01,scale=0.1,adapt=false", ALGORITHMS)
    assert cls is ZOOneByte and cls.zeroth_order and cls.Options(**kwargs) == ZOOneByteOptions(0.01, 0.1, False)
    assert not ALGORITHMS.get("ddp").zeroth_order
    for bad, message in [({"eps": 0.0}, r"^eps must be a finite number > 0"), ({"eps": math.nan}, "^eps must"),
                         ({"scale": 0.0}, r"^scale must be in \[1e-08, 1e\+08\]"),
                         ({"adapt": 1}, "^adapt must be true or false")]:
        with pytest.raises(ValueError, match=message):
            ZOOneByteOptions(**bad)
    assert TrainConfig(algos=("zo-onebyte",), seed=7).options_for(Variant("zo-onebyte")).seed == 7  # the run's seed


def test_init_from_loads_a_checkpoint_file_or_folder(tmp_path: Path) -> None:
    trained = tiny_gpt(3)
    save_checkpoint(tmp_path / "model.pt", {"model": trained.state_dict()})  # a bare state_dict works too
    algo_dir = tmp_path / "run" / "ddp"  # an algorithm folder: its last complete checkpoint, rank 0
    save_checkpoint(rank_file(algo_dir, 4, 0), {"model": trained.state_dict()})
    atomic_write_text(algo_dir / MARKER, json.dumps({"step": 4}))
    for path in (tmp_path / "model.pt", algo_dir):
        model = tiny_gpt(0)
        load_model_into(model, path)
        assert torch.equal(flat(model.parameters()), flat(trained.parameters()))
    with pytest.raises(ValueError, match=r"^--init-from .*nowhere.pt: no such file or folder$"):
        TrainConfig(init_from=str(tmp_path / "nowhere.pt"))
    with pytest.raises(ValueError, match=r"no complete checkpoint in this folder"):
        TrainConfig(init_from=str(tmp_path))
    save_checkpoint(tmp_path / "other.pt", _tiny(0, n_layer=2, n_embd=16).state_dict())
    with pytest.raises(ValueError, match=r"the saved model does not fit this one .*same --model and --data"):
        load_model_into(tiny_gpt(0), tmp_path / "other.pt")
