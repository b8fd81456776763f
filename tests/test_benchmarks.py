"""Smoke tests of the benchmarks: compressors.py (a JSON row per registered compressor) and, in the
slow suite, async_decentralized.py."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from lowband.compress import COMPRESSORS

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "compressors.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_compressors", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    for spec, row in compression.items():
        for model in ("gpt", "cnn", "resnet18"):
            ratio = row["ratio"][model]
            if row["compressor"] == "identity":
                assert ratio == 1.0, (spec, model, ratio)
            else:
                assert ratio > 1, (spec, model, ratio)
    assert compression["fp16"]["ratio"]["resnet18"] == 2.0


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
