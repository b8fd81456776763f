"""Smoke tests of the benchmarks: compressors.py (a JSON row per registered compressor) and, in the
slow suite, async_decentralized.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lowband.compress import COMPRESSORS, parse_spec

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "compressors.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_compressors", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _declares_fewer_bytes(spec: str) -> bool | None:
    """Whether compressor ``spec`` declares fewer bytes than fp32 for a 1000 x 1000 matrix (None: data-dependent)."""
    cls, kwargs = parse_spec(spec, COMPRESSORS)
    try:
        return sum(cls.wire_bytes(cls.Options(**kwargs), 10**6, 1000)) < 4 * 10**6
    except ValueError:
        return None


def test_compressors_benchmark_quick(tmp_path: Path, capsys) -> None:
    bench = _load_benchmark()
    out = tmp_path / "c.json"
    assert bench.main(["--quick", "--numel", "100000", "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ResNet-18 (CIFAR) parameters: 11,173,962" in printed
    data = json.loads(out.read_text())

    assert data["skipped"] == [], data["skipped"]
    assert abs(data["models"]["resnet18"]["params"] - 11.17e6) <= 0.01 * 11.17e6
    assert data["config"]["numel"] == 100_000

    throughput = {row["spec"]: row for row in data["throughput"]}
    compression = {row["spec"]: row for row in data["compression"]}
    assert set(throughput) == set(compression)
    names = {row["compressor"] for row in data["throughput"]}
    assert names == set(COMPRESSORS.names()), f"rows for {sorted(names)}, registered {COMPRESSORS.names()}"

    for spec, row in throughput.items():
        assert row["gbps"] > 0 and math.isfinite(row["gbps"]), spec
        assert row["lowband_s"] > 0 and row["memcpy_s"] > 0, spec
        assert row["payload_bytes"] > 0, spec
        assert row["vs_reference"] is None or row["vs_reference"] > 0, spec
        assert row["contraction"] == (row["rel_error"] <= 1.0), (spec, row["rel_error"])  # what feedback needs
    for spec, row in compression.items():
        compresses = _declares_fewer_bytes(spec)  # from the compressor's own wire model, not a list here
        for model in ("gpt", "cnn", "resnet18"):
            ratio = row["ratio"][model]
            if row["compressor"] == "identity":
                assert ratio == 1.0, (spec, model, ratio)
            elif compresses is not None:
                assert (ratio > 1) == compresses, (spec, model, ratio)
    assert compression["fp16"]["ratio"]["resnet18"] == 2.0
    assert data["config"]["model_repeats"] == 4  # table (c): 4 x --repeats
    for spec, row in data["models_throughput"].items():
        for model, timed in row.items():
            low, high = timed["vs_reference_quartiles"]
            assert 0 < low <= timed["vs_reference"] <= high, (spec, model, low, timed["vs_reference"], high)


CONTRACTIONS = ["randomk:ratio=0.01,unbiased=false", "sketch:ratio=0.05,unbiased=false", "qsgd:bits=8", "lgreco",
                "lgreco:family=topk", "threshold:tau=1.0"]
EXPANSIONS = ["randomk:ratio=0.01", "sketch:ratio=0.05", "qsgd:bits=4", "terngrad", "lgreco:family=qsgd"]


@pytest.mark.parametrize("spec", CONTRACTIONS + EXPANSIONS)
def test_is_contraction_matches_the_benchmarks_measured_error(spec: str) -> None:
    """Options the quick run above does not reach (unbiased=false, L-GreCo's families): what the compressor
    declares (is_contraction) against the benchmark's ||C(x) - x|| / ||x||, mean over 5 gaussian matrices."""
    bench = _load_benchmark()
    compressor = bench.fresh(spec, COMPRESSORS)
    xs = [torch.randn(64, 128, generator=torch.Generator().manual_seed(seed)) for seed in range(5)]
    measured = sum(bench.relative_error(bench.lowband_roundtrip(compressor, "x"), x) for x in xs) / len(xs)
    assert compressor.is_contraction() == (spec in CONTRACTIONS)
    assert (measured <= 1.0) == (spec in CONTRACTIONS), measured


@pytest.mark.slow
def test_async_decentralized_benchmark_quick(tmp_path: Path) -> None:
    """The smoke run of benchmarks/async_decentralized.py: one cell, every algorithm, a JSON row each."""
    spec = importlib.util.spec_from_file_location("benchmark_async", BENCHMARK.parent / "async_decentralized.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "a.json"
    assert bench.main(["--quick", "--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    (cell,) = json.loads(out.read_text())["cells"]
    assert (cell["workers"], cell["steps"], cell["bandwidth"]) == (2, 16, "100mbit")
    assert sorted(row["name"] for row in cell["summary"]["rows"]) == sorted(bench.ALGOS)


def test_eager_stability_limits_shrink_with_workers(tmp_path: Path) -> None:
    """The linear model behind eager-diloco's defaults: DiLoCo's lr 0.7 / momentum 0.9 is unstable
    at N = 4, the defaults lr 0.3 / momentum 0.8 are stable for every N."""
    spec = importlib.util.spec_from_file_location("benchmark_eager", BENCHMARK.parent / "eager_stability.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "e.json"
    assert bench.main(["--workers", "1,4,64", "--momentum", "0.8,0.9", "--out", str(out)]) == 0
    limits = {row["momentum"]: row["max_stable_lr"] for row in json.loads(out.read_text())["rows"]}
    assert limits[0.9]["1"] > 0.7 > limits[0.9]["4"] >= limits[0.9]["64"]
    assert min(limits[0.8].values()) > 0.3


@pytest.mark.slow
def test_heterogeneous_benchmark_quick(tmp_path: Path) -> None:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "heterogeneous.py"
    spec = importlib.util.spec_from_file_location("benchmark_heterogeneous", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "h.json"
    assert module.main(["--quick", "--out", str(tmp_path), "--json", str(out)]) == 0
    rows = {r["entry"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {e.label for e in module.ENTRIES}
    # speed budgets: the slow workers sit out part of each round, so fewer tokens than fixed work
    assert rows["diloco:budget=speed"]["tokens"] < rows["diloco"]["tokens"] == rows["ddp"]["tokens"]
    assert rows["ddp:hierarchical=true"]["final_val_loss"] == pytest.approx(rows["ddp"]["final_val_loss"], abs=1e-3)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARK.parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(entry: str, seconds: float | None, sent: float | None, speedup: float | None = None,
         share: float | None = None) -> dict:
    return {"entry": entry, "time_to_target_s": {"mean": seconds, "sd": None}, "speedup": speedup,
            "bytes_to_target": {"mean": sent, "sd": None}, "utilisation": {"mean": share, "sd": None}}


def test_case_study_summaries_pick_winners_and_pair_peers() -> None:
    study = _load("case_study")
    group = {"bandwidth": "10mbit", "latency": "50ms", "target_loss": 2.5, "rows": [
        _row("ddp", 400.0, 9e8, 1.0, 0.1), _row("diloco", 100.0, 5e7, 4.0, 0.8), _row("dion", 150.0, 2e7, 2.7),
        _row("gossip", None, None), _row("torchft-diloco", 120.0, 5e7, 3.3)]}
    glance = "\n".join(study.glance([group]))
    assert "| 10mbit / 50ms | 2.500 | 400 s (10%) | diloco: 100 s (4.0x ddp, 80%) | dion: 20.00 MB |" in glance, glance
    peers = study.against_peers([group])
    assert len(peers) == 3 and "| 10mbit | diloco | 100 s |" in peers[2] and "torchft-diloco | 120 s" in peers[2]


def test_case_study_findings_classify_methods_and_flag_noisy_peer_pairs() -> None:
    findings = _load("case_study_findings")

    def row(entry: str, seconds: float | None, sent: float | None, speedup: float | None, share: float,
            per_step: float = 0.4, final: float = 2.4) -> dict:
        return {**_row(entry, seconds, sent, speedup, share), "compute_per_step": {"mean": per_step, "sd": None},
                "final_val_loss": {"mean": final, "sd": None}}

    slow = {"bandwidth": "10mbit", "latency": "50ms", "target_loss": 2.5, "baseline": "ddp", "rows": [
        row("ddp", 400.0, 9e8, 1.0, 0.1), row("diloco", 100.0, 5e7, 4.0, 0.8), row("gossip", 500.0, 9e8, 0.8, 0.1),
        row("topk", None, None, None, 0.5, final=3.3), row("torchft-diloco", 120.0, 4e7, 3.3, 0.8, per_step=0.6)]}
    fast = {"bandwidth": "1gbit", "latency": "10ms", "target_loss": 2.5, "baseline": "ddp", "rows": [
        row("ddp", 40.0, 9e8, 1.0, 0.7), row("diloco", 50.0, 5e7, 0.8, 0.9), row("gossip", 50.0, 9e8, 0.8, 0.7),
        row("topk", None, None, None, 0.7, final=3.1), row("torchft-diloco", 45.0, 4e7, 0.89, 0.9)]}
    fast["rows"][1].update(seeds=2, time_to_target_s={"mean": 50.0, "sd": 10.0})
    slow["rows"][0].update(seeds=2, time_to_target_s={"mean": 400.0, "sd": 40.0})
    text = "\n".join(findings.findings([slow, fast], [("diloco", "torchft-diloco")],
                                       {("diloco", "torchft-diloco"): "broadcast"}, steps=150))
    assert "ddp computes 70% of its wall-clock over 1gbit, 10% over 10mbit" in text  # fastest link first
    assert "1.0x → 4.0x" in text
    assert "**Faster over some links only**: diloco (1gbit 0.80x, 10mbit 4.00x), torchft-diloco" in text, text
    assert "**Never faster than ddp** (below 1.05x wherever it reached the target): gossip" in text
    assert "**Never reached 2.500 in 150 steps**: topk (lowest final loss 3.100)" in text
    reasoned = "\n".join(findings.findings([slow, fast], [], {}, steps=150, why_unreached={"topk": "too sparse"}))
    assert "topk (lowest final loss 3.100; too sparse)" in reasoned
    assert "**Fewest bytes to target**: torchft-diloco, 40.00 MB, 22x fewer than ddp's 900.00 MB" in text
    assert "bytes to target 50.00 MB vs 40.00 MB (broadcast)" in text
    assert "1gbit 1.11x (0.40 / 0.40 s), 10mbit 0.83x (0.40 / 0.60 s)" in text
    assert "(10mbit, 50%)" in text and "read their bytes, not their seconds" in text
    assert "varies by 15% (median sd / mean) and up to 20% (diloco over 1gbit)" in text


def test_case_study_packs_measurements_and_a_fresh_clone_resumes_from_them(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    study = _load("case_study")
    monkeypatch.setattr(study, "DATA", tmp_path / "data")
    spec = study.SweepSpec(name="cs", entries=(study.Entry("ddp"), study.Entry("diloco")))
    cell = tmp_path / "runs" / "cs" / "gpt-shakespeare-w2-100mbit-20ms-s0"
    for unit, done in (("ddp", True), ("diloco", False)):
        (cell / unit / unit).mkdir(parents=True)
        (cell / unit / unit / "rank0.jsonl").write_text('{"step": 1}\n')
        (cell / unit / "train.log").write_text("text\n")
        if done:
            (cell / unit / "done.json").write_text("{}")
    (packed,) = study.archive([spec], tmp_path / "runs")
    assert packed == tmp_path / "data" / "cs" / f"{cell.name}.tar.xz"
    assert study.archive([spec], tmp_path / "runs") == []  # unchanged: not rewritten
    assert study.restore([spec], tmp_path / "clone") == 1
    restored = tmp_path / "clone" / "cs" / cell.name
    assert sorted(str(p.relative_to(restored)) for p in restored.rglob("*") if p.is_file()) == [
        "ddp/ddp/rank0.jsonl", "ddp/done.json"]  # only finished units, only what was measured
    assert study.restore([spec], tmp_path / "clone") == 0
    (restored / "ddp" / "done.json").write_text('{"seconds": 1}')  # an older run of the unit: the archive wins
    (restored / "ddp" / "ddp" / "rank0.jsonl").write_text('{"step": 9}\n')
    assert study.restore([spec], tmp_path / "clone") == 1
    assert (restored / "ddp" / "ddp" / "rank0.jsonl").read_text() == '{"step": 1}\n'


def test_case_study_page_from_restored_runs_in_spec_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_sweep import _fake_unit

    study = _load("case_study")
    monkeypatch.setattr(study, "DOCS", tmp_path / "docs")
    monkeypatch.setattr(study, "projection", lambda sweep_dir: ["(projected)"])  # fake runs have no ledgers
    spec = study.SweepSpec(name="cs", networks=(("10mbit", "50ms"), ("100mbit", "20ms")), target_loss=2.6,
                           entries=(study.Entry("ddp"), study.Entry("diloco")))
    for unit in spec.units(tmp_path / "runs"):  # as restored: finished units, no sweep.json
        fast = unit.entry.label == "diloco"
        _fake_unit(unit, [3.0, 2.5], 1.0 if fast else 2.0, 10 if fast else 1000)
    args = study.argparse.Namespace(out=str(tmp_path / "runs"), quick=False)
    unrun = dataclasses.replace(spec, name="cs-later")
    for _ in range(2):  # the second time over the figures the first wrote into the sweep folder
        page = study.write_page([spec, unrun], args).read_text()
    glance = page[page.index("### At a glance"):]
    assert glance.index("| 10mbit / 50ms | 2.600 | 4 s") < glance.index("| 100mbit / 20ms | 2.600 | 4 s"), glance
    assert "diloco: 2 s (2.0x ddp" in glance and "## cs-later\n\n(not run yet)" in page
    assert json.loads((tmp_path / "runs" / "cs" / "sweep.json").read_text())["seeds"] == [0]


def test_case_study_stopped_by_a_signal_packs_what_finished_and_says_how_to_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from lowband.train.launch import Interrupted

    study = _load("case_study")
    monkeypatch.setattr(study, "DOCS", tmp_path / "docs")
    monkeypatch.setattr(study, "DATA", tmp_path / "docs" / "data")
    packed: list[Path] = []

    def stopped(cell: Any, out: Path) -> Any:
        raise Interrupted(15)

    monkeypatch.setattr(study, "run_sweep", stopped)
    monkeypatch.setattr(study, "archive", lambda specs, out: packed.append(out) or [])
    assert study.main(["--out", str(tmp_path / "runs")]) == 128 + 15
    assert packed == [tmp_path / "runs"]  # the finished cells are packed before it exits
    assert "the same command resumes the study" in capsys.readouterr().err


def test_gpu_smoke_dry_run_on_cpu(tmp_path: Path, capsys) -> None:
    """benchmarks/gpu_smoke.py (what a GPU machine runs) works end to end, here on the CPU."""
    spec = importlib.util.spec_from_file_location("gpu_smoke", BENCHMARK.parent / "gpu_smoke.py")
    assert spec is not None and spec.loader is not None
    smoke = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = smoke  # its dataclasses look their module up there
    spec.loader.exec_module(smoke)
    if not torch.cuda.is_available():
        assert smoke.main(["--device", "cuda"]) == 2  # refused in one line, nothing run
    out = tmp_path / "smoke.json"
    assert smoke.main(["--device", "cpu", "--steps", "2", "--only", "ddp-compressed", "--compress", "identity;topk",
                       "--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["run"] for r in data["rows"]] == ["ddp", "ddp+topk"] and not data["failures"]
    assert all(r["ok"] and math.isfinite(r["final_loss"]) for r in data["rows"])
    assert "ddp+topk" in capsys.readouterr().out
