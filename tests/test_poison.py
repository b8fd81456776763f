"""Label flipping (a data-side attack): the class maps, who is poisoned, and the --attack flag."""

from __future__ import annotations

import pytest
import torch

from lowband.adversity.attacks import ATTACKS
from lowband.adversity.poison import LabelFlip, poisoner
from lowband.algorithms.ddp import DDPOptions
from lowband.comm import Comm
from lowband.comm.aggregate import Aggregator
from lowband.compress import COMPRESSORS
from lowband.feedback import FEEDBACK
from lowband.registry import build
from lowband.train.config import TrainConfig, Variant
from lowband.train.flags import config_from_args


def test_reverse_maps_mnist_digits_to_nine_minus_y_and_characters_backwards() -> None:
    y = torch.arange(10).repeat(3)
    assert torch.equal(poisoner("labelflip:ranks=0", 0, 10)(y), 9 - y)
    chars = torch.tensor([[0, 5, 64], [1, 2, 3]])
    assert torch.equal(poisoner("labelflip:ranks=0", 0, 65)(chars), 64 - chars)


def test_permute_is_a_seeded_derangement() -> None:
    flip = build("labelflip:ranks=0,mode=permute,seed=3", ATTACKS)
    assert isinstance(flip, LabelFlip)
    table = flip.table(65)
    assert sorted(table.tolist()) == list(range(65))  # a permutation
    assert not (table == torch.arange(65)).any()  # no class keeps its label
    assert torch.equal(table, build("labelflip:mode=permute,seed=3", ATTACKS).table(65))
    assert not torch.equal(table, build("labelflip:mode=permute,seed=4", ATTACKS).table(65))


def test_only_the_named_ranks_are_poisoned_and_update_attacks_leave_data_alone() -> None:
    y = torch.arange(10)
    assert poisoner("labelflip:ranks=1+3", 2, 10)(y) is y
    assert torch.equal(poisoner("labelflip:ranks=1+3", 3, 10)(y), 9 - y)
    assert poisoner("signflip:ranks=0", 0, 10)(y) is y
    assert poisoner("none", 0, 10)(y) is y
    with pytest.raises(ValueError, match="labelflip: mode must be one of reverse, permute"):
        DDPOptions(attack="labelflip:mode=shuffle")
    with pytest.raises(ValueError, match="at least 2 classes"):
        poisoner("labelflip:ranks=0", 0, 1)


def test_a_label_flipper_sends_its_update_unchanged() -> None:
    """The update of poisoned data is honest: the aggregator must not transform it again."""
    x = torch.randn(5000)
    want = x.clone()
    Aggregator(Comm(), build("identity", COMPRESSORS), build("none", FEEDBACK),
               attack=build("labelflip:ranks=0", ATTACKS)).mean_([("x", x)])
    assert torch.equal(x, want)


def test_attack_flag_reaches_averaging_algorithms_and_is_refused_elsewhere() -> None:
    cfg = config_from_args(["--algo", "ddp;diloco", "--attack", "labelflip:ranks=1", "--aggregate", "median"])
    assert [cfg.options_for(v).attack for v in cfg.variants()] == ["labelflip:ranks=1"] * 2
    assert config_from_args(["--algo", "ddp"]).options_for(Variant("ddp")).attack == "none"
    with pytest.raises(ValueError, match="--attack applies to co2, ddp, .*, not "):
        TrainConfig(algos=("ddp", "gossip"), attack="signflip:ranks=0")
    with pytest.raises(ValueError, match="unknown attack 'flip'"):
        TrainConfig(algos=("ddp",), attack="flip")
    with pytest.raises(ValueError, match="--attack labelflip poisons data in `lowband train` without --elastic"):
        TrainConfig(algos=("diloco",), attack="labelflip:ranks=1", elastic=True, min_workers=2)
