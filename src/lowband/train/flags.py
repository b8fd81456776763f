"""The command line of ``lowband train`` and ``torchrun -m lowband.train``: one argparse parser.

Flags are parsed into a validated :class:`~lowband.train.config.TrainConfig` (and the machines of
the run, :class:`~lowband.train.nodes.Nodes`); a bad value exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from lowband.algorithms import ALGORITHMS
from lowband.comm.robust import RULES
from lowband.compress import COMPRESSORS
from lowband.feedback import FEEDBACK
from lowband.train.config import DEFAULT, TrainConfig
from lowband.train.models import MODELS
from lowband.train.nodes import Nodes, add_arguments as add_node_arguments, check_nodes, pop_nodes
from lowband.train.run_config import config_argv

SCALARS = {"int": int, "float": float, "str": str}  # a field's type (its annotation, before '| None')


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` only where the help does not speak of its default already and X says
    something (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or isinstance(action.default, bool):
            return text
        return super()._get_help_string(action) or text


def build_parser(prog: str = "lowband train") -> argparse.ArgumentParser:
    """Every flag, in titled groups, generated from :class:`TrainConfig`'s fields (their defaults, types
    and help: :func:`lowband.train.config.flag`), then the machine flags and ``--config``."""
    p = argparse.ArgumentParser(prog=prog, description="Train a model across workers over an emulated slow link.",
                                formatter_class=_Help)
    p.add_argument("--config", metavar="FILE.toml", help="read flags from a TOML file: the same keys as the flags "
                   "('steps = 400', 'algo = \"ddp,diloco\"'); flags on the command line override it (docs/cli.md)")
    names = {"algorithms": ", ".join(ALGORITHMS.names()), "compressors": ", ".join(COMPRESSORS.names()),
             "feedback": ", ".join(FEEDBACK.names()), "models": ", ".join(MODELS.names()),
             "rules": ", ".join(RULES.names()), "diloco": ALGORITHMS.get("diloco").Options()}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        _add_flag(group, field, meta["help"].format(**names))
    add_node_arguments(p)
    return p


def _add_flag(group: argparse._ArgumentGroup, field: dataclasses.Field, text: str) -> None:
    """One field as one flag: a scalar with its type, a bool as a switch, a tuple as one string of specs."""
    meta, kind = field.metadata, str(field.type).split(" | ")[0]
    names = [f"--{meta.get('flag', field.name).replace('_', '-')}"] + ([meta["short"]] if "short" in meta else [])
    extra = {k: meta[k] for k in ("choices", "metavar") if k in meta}
    if kind == "bool":
        if "negate" in meta:  # --no-progress, --no-nesterov: store False
            group.add_argument(f"--{meta['negate']}", dest=field.name, action="store_false", default=field.default,
                               help=text)
        else:
            group.add_argument(*names, dest=field.name, action="store_true", default=field.default, help=text)
    elif kind.startswith("tuple"):
        group.add_argument(*names, dest=field.name, default=join_specs(field.default), help=text, **extra)
    else:
        group.add_argument(*names, dest=field.name, type=SCALARS[kind], default=field.default, help=text, **extra)


def join_specs(specs: tuple[str, ...]) -> str:
    """The flag form of several specs: ',' between plain names, ';' once any has options (docs/cli.md)."""
    return (";" if any(":" in s or "," in s for s in specs) else ",").join(specs)


def split_specs(text: str) -> tuple[str, ...]:
    """``'ddp;diloco:inner_steps=50'`` -> two specs; ``'ddp,diloco'`` (no options) too (docs/cli.md)."""
    sep = ";" if (";" in text or ":" in text) else ","
    return tuple(part.strip() for part in text.split(sep) if part.strip())


def config_from_args(argv: Sequence[str] | None = None, prog: str = "lowband train") -> TrainConfig:
    """Parse flags into a validated :class:`TrainConfig`; a bad value exits (status 2) with one line,
    ``<prog>: error: <what is wrong and the fix>`` (argparse's own syntax errors add its usage).
    The machine flags (:mod:`lowband.train.nodes`) are refused: they belong to ``lowband train``."""
    cfg, nodes = parse_train_args(argv, prog)
    if nodes != Nodes():
        build_parser(prog).exit(2, f"{prog}: error: --nnodes/--node-rank/--rdzv-endpoint/--iface are for `lowband "
                                   f"train`; under torchrun give torchrun its --nnodes/--rdzv-endpoint, and "
                                   f"LOWBAND_IFACE=<interface> for the workers' sockets\n")
    return cfg


def parse_train_args(argv: Sequence[str] | None = None, prog: str = "lowband train") -> tuple[TrainConfig, Nodes]:
    """:func:`config_from_args` with the machine flags: (the config, the machines of the run)."""
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = config_argv(argv, parser)  # --config FILE: its keys as flags, before the command line's
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    ns = vars(parser.parse_args(argv))
    ns.pop("config")
    ns["algos"] = split_specs(ns["algos"])
    ns["compress"] = split_specs(ns["compress"]) or (DEFAULT,)
    ns["feedback"] = split_specs(ns["feedback"]) or (DEFAULT,)
    try:
        nodes = pop_nodes(ns)
        cfg = TrainConfig(**ns)
        check_nodes(cfg, nodes)
        return cfg, nodes
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
        raise  # unreachable: parser.exit exits
