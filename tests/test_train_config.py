"""Flags, validation and bad input: one clear line, naming the fix."""

from __future__ import annotations

import pytest
import torch

from lowband.algorithms import ALGORITHMS
from lowband.algorithms.ddp import DDPOptions
from lowband.algorithms.diloco import DiLoCoOptions
from lowband.cli import main as cli_main
from lowband.train.config import TrainConfig
from lowband.train.config import Variant
from lowband.train.flags import config_from_args, parse_train_args


def test_defaults_are_the_main_job() -> None:
    cfg = config_from_args([])
    assert cfg.algos == ("ddp", "diloco")
    assert (cfg.model, cfg.data, cfg.workers, cfg.bandwidth, cfg.latency) == ("gpt", "shakespeare", 4, "100mbit", "20ms")
    assert cfg.variants() == [Variant("ddp"), Variant("diloco")]
    assert cfg.options_for(Variant("diloco")) == DiLoCoOptions(inner_steps=20, outer_lr=0.7, outer_momentum=0.9)


def test_flags_reach_the_algorithm_options() -> None:
    cfg = config_from_args(["--algo", "diloco", "-H", "50", "--outer-lr", "0.5", "--no-nesterov"])
    assert cfg.algos == ("diloco",)
    assert cfg.options_for(Variant("diloco")) == DiLoCoOptions(inner_steps=50, outer_lr=0.5, nesterov=False)


def test_unset_flags_keep_each_algorithms_own_defaults() -> None:
    """--outer-lr etc. override only when given: an algorithm with other defaults keeps them."""
    from lowband.algorithms.streaming_diloco import StreamingDiLoCoOptions

    cfg = config_from_args(["--algo", "streaming-diloco"])
    assert (cfg.inner_steps, cfg.outer_lr, cfg.nesterov) == (None, None, None)
    assert cfg.options_for(Variant("streaming-diloco")) == StreamingDiLoCoOptions()
    given = config_from_args(["--algo", "streaming-diloco", "--outer-lr", "0.3"])
    assert given.options_for(Variant("streaming-diloco")).outer_lr == 0.3


def test_compressors_and_feedback_make_variants_with_labels() -> None:
    cfg = config_from_args(["--algo", "ddp", "--compress", "identity;fp16;bf16", "--feedback", "none;ef"])
    labels = [v.label for v in cfg.variants()]
    assert labels == ["ddp", "ddp+fp16", "ddp+fp16+ef", "ddp+bf16", "ddp+bf16+ef"]
    assert cfg.options_for(cfg.variants()[2]) == DDPOptions(compress="fp16", feedback="ef")
    assert Variant("diloco", "qsgd:bits=4,seed=1", "ef").folder == "diloco+qsgd-bits=4_seed=1+ef"


def test_algorithm_specs_carry_their_own_options() -> None:
    cfg = config_from_args(["--algo", "diloco:inner_steps=50;diloco", "-H", "10"])
    assert cfg.algos == ("diloco:inner_steps=50", "diloco")
    assert [cfg.options_for(v).inner_steps for v in cfg.variants()] == [50, 10]
    assert cfg.variants()[0].algorithm == "diloco" and cfg.variants()[0].label == "diloco:inner_steps=50"


@pytest.mark.parametrize("argv, message", [
    (["--algo", "dilco"], "unknown algorithm 'dilco'; choose one of: "),
    (["--algo", "diloco:inner=5"], "algorithm 'diloco': cannot read option 'inner=5'; options are: compress, feedback"),
    (["--algo", "diloco:inner_steps=0"], "inner_steps (H) must be >= 1, got 0"),
    (["--model", "resnet"], "unknown model 'resnet'; choose one of: cnn, gpt"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--inner-steps", "0"], "--inner-steps must be >= 1, got 0"),
    (["--bandwidth=-5mbit"], "cannot read bandwidth '-5mbit'"),
    (["--bandwidth", "0mbit"], "bandwidth must be positive"),
    (["--bandwidth", "fast"], "cannot read bandwidth 'fast': use a number and one of"),
    (["--bandwidth", "1gbit,1gbit,1gbit"], "--bandwidth lists 3 values for 4 workers"),
    (["--latency", "20 parsecs"], "cannot read latency"),
    (["--compress", "zip"], "unknown compressor 'zip'; choose one of:"),
    (["--compress", "fp16:level=3"], "compressor 'fp16': cannot read option 'level=3'; options are: none"),
    (["--feedback", "ef3"], "unknown feedback 'ef3'; choose one of:"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--outer-lr", "inf"], "--outer-lr must be a finite number > 0, got inf"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0, got nan"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0, got -0.1"),
    (["--attack", "signflip:ranks=7", "--workers", "2"],
     "--attack names rank(s) 7, but ranks run 0..1 with --workers 2"),
    (["--resume", "--name", "no-such-run-here", "--out", "/nonexistent"],
     "nothing to resume: /nonexistent/no-such-run-here holds no run (check --out and --name, or drop --resume)"),
])
def test_bad_flags_fail_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err


def test_options_are_validated_on_construction() -> None:
    with pytest.raises(ValueError, match="inner_steps"):
        DiLoCoOptions(inner_steps=0)
    with pytest.raises(ValueError, match="nesterov needs outer_momentum > 0"):
        DiLoCoOptions(outer_momentum=0.0)
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        TrainConfig(steps=0)


def test_cli_unknown_command_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["trian"]) == 2
    from lowband.cli import COMMANDS

    assert f"unknown command 'trian'; choose one of: {', '.join(COMMANDS.names())}" in capsys.readouterr().err
    assert {"train", "report", "plan", "simulate"} <= set(COMMANDS.names())


def test_cli_report_on_missing_folder_names_it(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert cli_main(["report", str(missing)]) == 2  # a bad input (issue 23)
    assert str(missing) in capsys.readouterr().err


def test_outer_optimizer_choices() -> None:
    import torch

    from lowband.algorithms.diloco import DiLoCo
    from lowband.comm import Comm

    model = torch.nn.Linear(3, 2)
    algo = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), Comm(),
                  config_from_args(["--algo", "diloco:outer_optimizer=adam,outer_lr=0.01"]).options_for(
                      Variant("diloco:outer_optimizer=adam,outer_lr=0.01")))
    assert isinstance(algo.outer_optimizer, torch.optim.Adam)
    with pytest.raises(ValueError, match="outer_optimizer must be one of sgd, adam, got 'lamb'"):
        DiLoCoOptions(outer_optimizer="lamb")


def test_default_compress_keeps_each_algorithms_own_default() -> None:
    cfg = config_from_args(["--algo", "ddp;diloco:compress=fp16"])
    assert [cfg.options_for(v).compress for v in cfg.variants()] == ["identity", "fp16"]
    explicit = config_from_args(["--algo", "diloco", "--compress", "identity;fp16"])
    assert [v.label for v in explicit.variants()] == ["diloco", "diloco+fp16"]


def test_aggregate_flag_reaches_averaging_algorithms_only() -> None:
    cfg = config_from_args(["--algo", "ddp;diloco", "--aggregate", "centered-clip:tau=1,iters=3"])
    assert [cfg.options_for(v).aggregate for v in cfg.variants()] == ["centered-clip:tau=1,iters=3"] * 2
    assert config_from_args(["--algo", "ddp"]).options_for(Variant("ddp")).aggregate == "mean"
    with pytest.raises(ValueError, match="not gossip"):
        TrainConfig(algos=("ddp", "gossip"), aggregate="median")
    with pytest.raises(ValueError, match="unknown aggregation rule 'medain'"):
        TrainConfig(algos=("ddp",), aggregate="medain")


def test_feedback_on_a_non_contraction_warns_once_per_variant(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_from_args(["--algo", "ddp", "--compress", "randomk:ratio=0.01;topk:ratio=0.01;qsgd:bits=8",
                            "--feedback", "ef;none"])
    (line,) = cfg.feedback_warnings()
    assert line.startswith("ddp+randomk:ratio=0.01+ef: randomk:ratio=0.01 is not a contraction"), line
    assert "--feedback none" in line and "unbiased=false" in line
    every = ";".join(ALGORITHMS.names())
    assert config_from_args(["--algo", every]).feedback_warnings() == []  # no algorithm's defaults trip it
    monkeypatch.setattr("lowband.train.run.run", lambda cfg, *where: {})  # the warning, not the training
    assert cli_main(["train", "--algo", "ddp", "--compress", "terngrad", "--feedback", "ef21"]) == 0
    assert "warning: ddp+terngrad+ef21: terngrad is not a contraction" in capsys.readouterr().err


def test_bad_data_and_out_fail_before_any_worker_starts(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """A binary or too-short --data file and an --out that is a file: one line each, in the parent."""
    binary, short, a_file = tmp_path / "model.bin", tmp_path / "short.txt", tmp_path / "runs"
    binary.write_bytes(bytes([0, 1, 255, 254]) * 100)
    short.write_text("To be, or not to be")
    a_file.write_text("")
    cases = [(["--data", str(binary)], f"--data {binary} is not UTF-8 text (byte 2: a binary file?)"),
             (["--data", str(short)], f"--data {short} has 19 characters: too short for block size 128"),
             (["--out", str(a_file)], f"--out {a_file} is a file: give a folder for the runs")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            config_from_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    long = tmp_path / "long.txt"
    long.write_text("All the world's a stage. " * 100)
    assert config_from_args(["--data", str(long)]).data == str(long)


def test_help_has_groups_every_flag_explained_and_no_default_twice() -> None:
    from lowband.train.flags import build_parser

    parser = build_parser()
    titles = {g.title for g in parser._action_groups}
    assert {"what is trained, how long, with which optimizer", "the network (docs/emulation.md, docs/topology.md)",
            "machines (docs/multinode.md)"} <= titles, titles
    unexplained = [a.option_strings for a in parser._actions if not a.help]
    assert not unexplained, f"flags without help: {unexplained}"
    text = parser.format_help()
    for block in text.split("\n  -")[1:]:
        assert block.count("(default") + block.count("(Default") <= 1, block


def test_a_chosen_compressor_brings_its_papers_feedback_unless_told_otherwise() -> None:
    cfg, _ = parse_train_args(["--algo", "ddp", "--compress", "powersgd:rank=2;dgc;topk:ratio=0.01;qsgd"])
    got = {v.label: cfg.options_for(v).feedback for v in cfg.variants()}
    assert got == {"ddp+powersgd:rank=2+ef": "ef", "ddp+dgc+dgc": "dgc", "ddp+topk:ratio=0.01": "none",
                   "ddp+qsgd": "none"}
    off, _ = parse_train_args(["--algo", "ddp", "--compress", "powersgd:rank=2", "--feedback", "none"])
    assert [(v.label, off.options_for(v).feedback) for v in off.variants()] == [("ddp+powersgd:rank=2", "none")]
    spec, _ = parse_train_args(["--algo", "ddp:compress=powersgd"])
    assert spec.options_for(spec.variants()[0]).feedback == "ef"
    own, _ = parse_train_args(["--algo", "streaming-diloco"])  # the algorithm's own compressor: its own feedback
    assert own.options_for(own.variants()[0]).feedback == "none"


def test_a_period_that_does_not_divide_the_steps_is_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = parse_train_args(["--algo", "diloco;localsgd:inner_steps=10;streaming-diloco;ddp", "--steps", "30"])
    assert cfg.period_warnings() == [
        "diloco: --steps 30 is not a multiple of its period H=20: the last 10 inner steps are never averaged (the "
        "evaluated model is the one synchronised at step 20); use --steps 40 or an H that divides --steps"]
    assert parse_train_args(["--algo", "diloco", "--steps", "40"])[0].period_warnings() == []


def test_the_inner_optimizer_is_chosen_by_flag() -> None:
    from lowband.train.loop import OPTIMIZERS

    cfg, _ = parse_train_args(["--optimizer", "sgd", "--momentum", "0.8", "--lr", "0.05", "--weight-decay", "5e-4"])
    opt = OPTIMIZERS[cfg.optimizer](torch.nn.Linear(3, 2), cfg)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.8 and opt.defaults["lr"] == 0.05 and opt.defaults["weight_decay"] == 5e-4
    default, _ = parse_train_args([])
    assert isinstance(OPTIMIZERS[default.optimizer](torch.nn.Linear(3, 2), default), torch.optim.AdamW)
    with pytest.raises(ValueError, match=r"--momentum must be in \[0, 1\), got 1.0"):
        TrainConfig(optimizer="sgd", momentum=1.0)
