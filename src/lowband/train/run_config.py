"""``lowband train --config run.toml``: a run's flags in a file.

The keys are the flags of ``lowband train`` without the dashes, written with ``-`` or ``_``
(``batch-size = 16`` or ``batch_size = 16``; ``algo`` or ``algos``); values are TOML strings,
numbers, booleans, or lists (several specs: ``algo = ["ddp", "diloco:inner_steps=50"]``; one
value per worker: ``bandwidth = ["100mbit", "1gbit"]``)::

    algo = "ddp,diloco"
    steps = 200
    bandwidth = "50mbit"
    inner-steps = 10
    progress = false

The file becomes flags placed before the command line's, so a flag given on the command line
overrides the file; the file is checked by the same parser and the same validation as flags.
A switch (``elastic = true``, ``progress = false``) cannot be turned back from the command line.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any, Sequence

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SPEC_LISTS = ("algos", "compress", "feedback")  # several specs, run one after the other: joined by ';'


def config_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with ``--config FILE`` replaced by the file's keys as flags, in front (docs/cli.md)."""
    argv, path = _without_config(argv)
    if path is None:
        return argv
    return [*file_flags(Path(path), parser), *argv]


def _without_config(argv: Sequence[str]) -> tuple[list[str], str | None]:
    out, path, items = [], None, list(argv)
    while items:
        item = items.pop(0)
        if item == "--config":
            if not items:
                raise ValueError("--config needs a file: --config run.toml")
            path = items.pop(0)
        elif item.startswith("--config="):
            path = item.partition("=")[2]
        else:
            out.append(item)
    return out, path


def file_flags(path: Path, parser: argparse.ArgumentParser) -> list[str]:
    """The flags that ``path``'s keys stand for; one-line errors for a missing or malformed file and
    for a key that is no flag."""
    try:
        table = tomllib.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"--config {path}: cannot read it ({err.strerror or err}): give a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path} is not valid TOML: {err}") from None
    actions = _actions(parser)
    out: list[str] = []
    for key, value in table.items():
        if isinstance(value, dict):
            raise ValueError(f"--config {path}: {key} is a table; give the flags as top-level keys "
                             f"('steps = 400'), not under [{key}]")
        action = actions.get(key.replace("-", "_"))
        if action is None:
            close = difflib.get_close_matches(key, sorted(_names(parser)), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"--config {path}: unknown key {key!r}; {hint}the keys are the flags of `lowband train` "
                             "without dashes (lowband train --help)")
        out += _tokens(path, key, value, action)
    return out


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each flag's action under its field name (``algos``), its flag name (``algo``, ``batch_size``) and,
    for a ``--no-x`` switch, ``x`` (``progress``)."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        out[action.dest] = action
        for option in action.option_strings:
            if option.startswith("--"):
                out[option[2:].replace("-", "_")] = action
    return out


def _names(parser: argparse.ArgumentParser) -> set[str]:
    return {o[2:] for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def _tokens(path: Path, key: str, value: Any, action: argparse.Action) -> list[str]:
    flag = next(o for o in action.option_strings if o.startswith("--"))
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"--config {path}: {key} is a switch: give true or false, not {value!r}")
        negated = key.replace("-", "_") == action.dest and isinstance(action, argparse._StoreFalseAction)
        return [flag] if value != negated else []  # 'progress = false' and 'no-progress = true' both give it
    if isinstance(value, list):
        sep = ";" if action.dest in SPEC_LISTS else ","
        return [f"{flag}={sep.join(str(v) for v in value)}"]
    return [f"{flag}={value}"]
