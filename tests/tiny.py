"""A tiny GPT and deterministic per-rank batches shared by the algorithm tests."""

from __future__ import annotations

from typing import Any

import torch

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


def flat(tensors: Any) -> torch.Tensor:
    """All tensors as one detached 1-D copy."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).clone()
