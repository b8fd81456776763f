"""The public API (:mod:`lowband.api`, docs/api.md): what a user writes in their own training script,
on two real ranks, and its one-line errors and warnings in one process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

import lowband
from lowband.compress import COMPRESSORS
from lowband.registry import resolve
from lowband.train.launch import launch
from tiny import batch, flat, tiny_gpt


@record
def _user_script(folder: str) -> dict[str, Any]:
    """What docs/api.md shows: init, wrap + save/load, and the DDP hook with a compressor object."""
    rt = lowband.init(device="cpu")
    try:
        model = tiny_gpt().to(rt.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        algo = lowband.wrap(model, opt, "diloco", comm=rt.comm, inner_steps=2, compress="qsgd:bits=8")
        for step in range(4):
            model(*batch(rt.rank, step))[1].backward()
            algo.step()
            algo.zero_grad()
        path = Path(folder) / f"rank{rt.rank}.pt"
        lowband.save(path, model, opt, algo, step=4)
        fresh = tiny_gpt()
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        fresh_algo = lowband.wrap(fresh, fresh_opt, "diloco", comm=lowband.init(device="cpu").comm, inner_steps=2,
                                  compress="qsgd:bits=8")
        extra = lowband.load(path, fresh, fresh_opt, fresh_algo)
        restored = torch.equal(flat(model.parameters()), flat(fresh.parameters())) and \
            fresh_algo.outer_steps == algo.outer_steps == 2
        diloco_bytes = lowband.ledger(algo).bytes_sent

        ddp_model = tiny_gpt()
        state, hook = lowband.ddp_hook(ddp_model, compress=lowband.compress.TopK(ratio=0.5), feedback="ef")
        ddp = DistributedDataParallel(ddp_model)
        ddp.register_comm_hook(state, hook)
        ddp_opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(2):
            ddp(*batch(rt.rank, step))[1].backward()
            ddp_opt.step()
            ddp_opt.zero_grad()
        state.close()
        params = flat(ddp_model.parameters())
        everyone = [torch.empty_like(params) for _ in range(rt.world_size)]
        dist.all_gather(everyone, params)
        return {"restored": restored, "extra": extra, "diloco_bytes": diloco_bytes,
                "hook_bytes": lowband.ledger(state).bytes_sent, "replicas_equal": torch.equal(*everyone),
                "device": str(rt.device), "world": rt.world_size}
    finally:
        dist.destroy_process_group()


def test_a_user_script_on_two_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    results = launch(_user_script, 2, str(tmp_path))
    for rank, r in results.items():
        assert r["world"] == 2 and r["device"] == "cpu", r
        assert r["restored"], f"rank {rank}: lowband.load did not restore the model and DiLoCo's state"
        assert r["extra"] == {"step": 4}
        assert r["diloco_bytes"] > 0 and r["hook_bytes"] > 0, r
        assert r["replicas_equal"], f"rank {rank}: the DDP hook left the replicas apart"
        assert (tmp_path / f"rank{rank}.pt.sha256").is_file()


def test_options_are_validated_with_the_valid_names() -> None:
    model = tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="DiLoCoOptions has no option inner_stepz; options are: .*inner_steps"):
        lowband.wrap(model, opt, "diloco", inner_stepz=3)
    with pytest.raises(ValueError, match="PowerSGDOptions has no option rnk; options are: rank"):
        lowband.compress.PowerSGD(rnk=2)
    with pytest.raises(ValueError, match="unknown algorithm 'dilocco'"):
        lowband.wrap(model, opt, "dilocco")
    with pytest.raises(ValueError, match="go with a name or a class, not with an instance"):
        resolve(lowband.compress.TopK(ratio=0.5), COMPRESSORS, ratio=1)
    assert resolve("powersgd", COMPRESSORS, rank=3).options.rank == 3  # a name with keyword options
    assert resolve(lowband.compress.PowerSGD, COMPRESSORS, rank=4).options.rank == 4  # a class


def test_feeding_back_a_non_contraction_warns_in_the_library() -> None:
    model = tiny_gpt()
    with pytest.warns(UserWarning, match="terngrad is not a contraction"):
        state, _ = lowband.ddp_hook(model, compress="terngrad", feedback="ef21")
    state.close()
    with pytest.warns(UserWarning, match="qsgd:bits=2 is not a contraction"):
        lowband.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), "ddp", compress="qsgd:bits=2", feedback="ef")


def test_ledger_and_load_refuse_what_they_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="no ledger in a str"):
        lowband.ledger("grads")
    model = tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lowband.save(tmp_path / "model.pt", model)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        lowband.load(tmp_path / "model.pt", model, opt)
    (tmp_path / "model.pt.sha256").unlink()
    with pytest.raises(ValueError, match="has no digest"):
        lowband.load(tmp_path / "model.pt", model)


def test_python_m_lowband_and_version() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lowband", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(f"lowband {lowband.__version__} (torch "), done



def test_a_compressor_given_alone_gets_its_own_feedback_pairing() -> None:
    model = tiny_gpt()
    state, _ = lowband.ddp_hook(model, compress=lowband.compress.PowerSGD(rank=2))
    assert state.aggregator.feedback.name == "ef"  # as torch's powerSGD_hook
    state.close()
    state, _ = lowband.ddp_hook(model, compress="powersgd:rank=2", feedback="none")
    assert state.aggregator.feedback.name == "none"
    state.close()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert lowband.wrap(model, opt, "ddp", compress="powersgd:rank=2").options.feedback == "ef"
    assert lowband.wrap(model, opt, "ddp", compress="topk:ratio=0.1").options.feedback == "none"
    assert lowband.wrap(model, opt, "diloco").options.feedback == "none"
