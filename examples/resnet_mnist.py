"""A small ResNet (no torchvision) on MNIST digits, DDP with many gradient buckets, each compressed
by PowerSGD (rank 2) with error feedback through lowband's DDP hook.

    torchrun --standalone --nproc-per-node 2 examples/resnet_mnist.py --steps 200

``bucket_cap_mb`` is small so that DDP makes several buckets: lowband keys its PowerSGD and feedback
state by parameter name, so it survives DDP's bucket rebuild (torch's own powerSGD_hook aborts on
gloo with more than one bucket). Prints ``RESULT {...}`` (rank 0): losses, accuracy, bytes, buckets.
Measured 2026-12-06, 2 CPU workers, 200 steps (19 s): 5 buckets per step, loss 2.34 -> 1.83,
held-out accuracy 30% (500 digits), 3.4 MB sent per rank; a short run: longer ones keep improving.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import lowband
from lowband.train.data import load_dataset


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)
        self.norm1, self.norm2 = nn.GroupNorm(4, width), nn.GroupNorm(4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x))))))


class ResNet(nn.Module):
    """Stem, two residual stages (the second at half resolution), pooling, a linear classifier."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.stage1, self.down, self.stage2 = Block(width), nn.Conv2d(width, width, 3, stride=2, padding=1), Block(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stage2(F.relu(self.down(self.stage1(F.relu(self.stem(x))))))
        logits = self.head(x.mean((2, 3)))
        return logits, F.cross_entropy(logits, y)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = load_dataset("mnist")
    torch.manual_seed(0)
    model = ResNet().to(device)
    state, hook = lowband.ddp_hook(model, compress=lowband.compress.PowerSGD(rank=2), feedback="ef")
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.02)  # ~20 kB buckets: several of them
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    batches = torch.Generator().manual_seed(rank)

    losses = []
    for _ in range(args.steps):
        x, y = (t.to(device) for t in data.batch(batches, args.batch_size, rank, world))
        _, loss = ddp(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    state.close()

    with torch.no_grad():
        correct = sum(int((model(x.to(device), y.to(device))[0].argmax(1) == y.to(device)).sum())
                      for x, y in data.val_batches(250, 2))
    result = {"first_loss": sum(losses[:10]) / 10, "last_loss": sum(losses[-10:]) / 10, "accuracy": correct / 500,
              "bytes_sent": lowband.ledger(state).bytes_sent, "buckets_per_step": state.calls // args.steps}
    if rank == 0:
        print("RESULT", json.dumps(result), flush=True)
    dist.barrier()  # every rank done with the wire before any tears its connections down
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
