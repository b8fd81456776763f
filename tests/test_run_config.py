"""``lowband train --config run.toml`` and the parser generated from TrainConfig's fields (docs/cli.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lowband.train.config import TrainConfig
from lowband.train.flags import build_parser, parse_train_args


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_every_field_is_one_flag_with_help_and_the_fields_default() -> None:
    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for field in dataclasses.fields(TrainConfig):
        action = by_dest[field.name]
        assert action.help and "{" not in action.help, field.name  # placeholders filled
        shown = action.default
        if field.name in ("algos", "compress", "feedback"):
            shown = tuple(s for s in shown.replace(";", ",").split(","))
        assert shown == field.default, field.name
    cfg, _ = parse_train_args([])
    assert cfg == TrainConfig()


def test_a_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'algo = ["ddp", "diloco:inner_steps=5"]\nsteps = 30\nbatch-size = 4\nprogress = false\n'
                           'bandwidth = ["1gbit", "100mbit"]\nworkers = 2\nnesterov = false\nouter_lr = 0.5\n'
                           'compress = "fp16;topk:ratio=0.1"\n')
    cfg, _ = parse_train_args(["--config", path, "--steps", "40"])
    assert cfg.algos == ("ddp", "diloco:inner_steps=5")
    assert (cfg.steps, cfg.batch_size, cfg.workers, cfg.outer_lr) == (40, 4, 2, 0.5)
    assert cfg.progress is False and cfg.nesterov is False
    assert cfg.bandwidth == "1gbit,100mbit"
    assert cfg.compress == ("fp16", "topk:ratio=0.1")
    same, _ = parse_train_args([f"--config={path}", "--steps", "40"])
    assert same == cfg
    switched, _ = parse_train_args(["--config", _toml(tmp_path, "no-progress = true\nhierarchical = false\n")])
    assert switched.progress is False and switched.hierarchical is None


@pytest.mark.parametrize("text, message", [
    ("stepz = 3\n", "unknown key 'stepz'; did you mean 'steps'?"),
    ("steps = \n", "is not valid TOML"),
    ("elastic = 3\n", "elastic is a switch: give true or false, not 3"),
    ("[train]\nsteps = 3\n", "train is a table"),
    ("steps = 0\n", "--steps must be >= 1"),
])
def test_a_bad_config_file_fails_with_one_line(tmp_path: Path, text: str, message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_train_args(["--config", _toml(tmp_path, text)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_missing_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_train_args(["--config", str(tmp_path / "nope.toml")])
    assert "nope.toml: cannot read it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_train_args(["--config"])
    assert "--config needs a file" in capsys.readouterr().err
