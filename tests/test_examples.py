"""The scripts in examples/ (docs/api.md), each run as a user would, under torchrun with 2 workers for
a few steps: the run ends, the training loss falls and bytes crossed the wire. Their docstrings give
the longer runs; ``--steps`` here only keeps the suite short."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> dict:
    """``torchrun --standalone --nproc-per-node 2 examples/<name> args``; rank 0's RESULT line."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, done.stdout[-2000:]
    return json.loads(lines[0][len("RESULT "):])


@pytest.mark.parametrize("name, args", [
    ("nanogpt_ddp.py", ["--steps", "30", "--batch-size", "8"]),
    ("nanogpt_diloco.py", ["--steps", "30", "--batch-size", "8", "--inner-steps", "5"]),
    ("resnet_mnist.py", ["--steps", "40", "--batch-size", "16"]),
    ("hf_diloco.py", ["--steps", "30", "--batch-size", "8", "--inner-steps", "5"]),
])
def test_example_trains(name: str, args: list[str]) -> None:
    if name.startswith("hf_"):
        pytest.importorskip("transformers", reason="the optional extra lowband[hf] is not installed")
    result = run_example(name, *args)
    assert result["last_loss"] < result["first_loss"], result
    assert result["bytes_sent"] > 0, result
    if "outer_steps" in result:
        assert result["outer_steps"] == 30 // 5, result
    if name == "resnet_mnist.py":
        assert result["buckets_per_step"] > 1, result  # the point of the example: several buckets
