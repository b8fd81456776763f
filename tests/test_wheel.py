"""The package as a user installs it (issue 25): a wheel built from this tree, installed with pip into
an empty folder, runs ``lowband --version`` and a 2-worker ``lowband train`` from there, with this
tree's sources out of the way (a folder elsewhere as the working directory, the wheel first on the path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_built_wheel_installs_and_trains(tmp_path: Path) -> None:
    wheels, target, work, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "work", tmp_path / "source"
    work.mkdir()
    # setuptools writes build/ next to the sources: build from a copy, never into the checkout
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(wheels)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel, = wheels.glob("lowband-*.whl")
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
    train = subprocess.run([sys.executable, "-m", "lowband", "train", "--algo", "ddp", "--workers", "2", "--steps", "3",
                            "--batch-size", "2", "--eval-every", "3", "--eval-batches", "1", "--no-progress",
                            "--out", str(work / "runs"), "--name", "w"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    assert (work / "runs" / "w" / "report.html").is_file()
