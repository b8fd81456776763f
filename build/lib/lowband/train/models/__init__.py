"""Models by name: ``MODELS.get('gpt')(dataset)`` builds a model sized for the dataset."""

from __future__ import annotations

from typing import Callable

from torch import nn

from lowband.registry import Registry
from lowband.train.data import Dataset
from lowband.train.models.cnn import CNN
from lowband.train.models.gpt import GPT, GPTConfig
from lowband.train.user import is_spec, load_callable, user_model

MODELS: Registry[Callable[[Dataset], nn.Module]] = Registry("model")


@MODELS.register("gpt")
def build_gpt(data: Dataset) -> nn.Module:
    if data.kind != "text":
        raise ValueError(f"model 'gpt' needs a text dataset, got {data.name!r} ({data.kind}); try --model cnn")
    return GPT(GPTConfig(vocab_size=data.vocab_size, block_size=data.block_size))


@MODELS.register("gpt-10m")
def build_gpt_10m(data: Dataset) -> nn.Module:
    """The char-GPT scaled to ~10.7M parameters (6 layers, 384 wide, 6 heads): the case study's larger model."""
    if data.kind != "text":
        raise ValueError(f"model 'gpt-10m' needs a text dataset, got {data.name!r} ({data.kind}); try --model cnn")
    return GPT(GPTConfig(vocab_size=data.vocab_size, block_size=data.block_size, n_layer=6, n_head=6, n_embd=384))


@MODELS.register("cnn")
def build_cnn(data: Dataset) -> nn.Module:
    if data.kind != "image":
        raise ValueError(f"model 'cnn' needs an image dataset, got {data.name!r} ({data.kind}); try --data mnist")
    return CNN(num_classes=data.vocab_size)


def model_builder(name: str) -> Callable[[Dataset], nn.Module]:
    """A registered model by name, or a user's factory (``--model module:factory``, :mod:`lowband.train.user`)."""
    if is_spec(name):
        load_callable(name, "--model")  # importable, callable: one line otherwise
        return lambda data: user_model(name, data)
    return MODELS.get(name)


__all__ = ["MODELS", "GPT", "GPTConfig", "CNN", "model_builder"]
