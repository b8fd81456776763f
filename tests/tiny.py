"""A tiny GPT and deterministic per-rank batches shared by the algorithm tests."""

from __future__ import annotations

from typing import Any

import torch

from lowband.compress import Payload
from lowband.train.models.gpt import GPT, GPTConfig

VOCAB, T, B = 17, 16, 4


def tiny_gpt(seed: int = 0, n_layer: int = 2, n_embd: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=T, n_layer=n_layer, n_head=2, n_embd=n_embd))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: (B, T) inputs and next-token targets."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def train(model: torch.nn.Module, algo: Any, steps: range, rank: int = 0) -> list[torch.Tensor]:
    """Drive ``algo`` on this rank's batches for ``steps``; the flat parameters after each step."""
    history = []
    for step in steps:
        x, y = batch(rank, step)
        model(x, y)[1].backward()
        algo.step()
        algo.zero_grad()
        history.append(flat(model.parameters()))
    return history


def one_step(model: torch.nn.Module, algo: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step on (x, y): ``zo_step`` for zeroth-order algorithms, else backward and ``step()``."""
    if algo.zeroth_order:
        algo.zo_step(lambda: model(x, y)[1])
    else:
        model(x, y)[1].backward()
        algo.step()
    algo.zero_grad()


def flat(tensors: Any) -> torch.Tensor:
    """All tensors as one detached 1-D copy."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).clone()


def simulate(comps: list[Any], xs: list[torch.Tensor], key: str) -> tuple[list[Any], list[Payload]]:
    """One summable exchange on len(xs) simulated ranks (all-reduce = summing the payloads);
    returns (per-rank (mean, own decoded), rank 0's payload of each round)."""
    n = len(xs)
    gens = [c.exchange(x, key, n) for c, x in zip(comps, xs)]
    pending = [next(g) for g in gens]
    rounds, results = [pending[0]], [None] * n
    while pending:
        summed = Payload([sum(p.tensors[i] for p in pending) for i in range(len(pending[0].tensors))],
                         pending[0].ctx)
        nxt = []
        for r, g in enumerate(gens):
            try:
                nxt.append(g.send(summed))
            except StopIteration as done:
                results[r] = done.value
        pending = nxt
        if pending:
            rounds.append(pending[0])
    return results, rounds
