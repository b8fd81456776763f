"""The command line of ``lowband train`` and ``torchrun -m lowband.train``: one argparse parser.

Flags are parsed into a validated :class:`~lowband.train.config.TrainConfig` (and the machines of
the run, :class:`~lowband.train.nodes.Nodes`); a bad value exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from lowband.algorithms import ALGORITHMS
from lowband.comm.robust import RULES
from lowband.compress import COMPRESSORS
from lowband.devices import DEVICE_CHOICES
from lowband.feedback import FEEDBACK
from lowband.train.config import DEFAULT, NET_MODES, SCHEDULES, TrainConfig
from lowband.train.data import SHARDINGS
from lowband.train.models import MODELS
from lowband.train.nodes import Nodes, add_arguments as add_node_arguments, check_nodes, pop_nodes
from lowband.train.precision import PRECISIONS


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` only where the help does not speak of its default already and X says
    something (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or isinstance(action.default, bool):
            return text
        return super()._get_help_string(action) or text


def build_parser(prog: str = "lowband train") -> argparse.ArgumentParser:
    """Every flag, in titled groups, with the defaults of :class:`TrainConfig` (the main job)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog=prog, description="Train a model across workers over an emulated slow link.",
                                formatter_class=_Help)
    for add in (_task_flags, _algorithm_flags, _network_flags, _run_flags, _elastic_flags):
        add(p, d)
    add_node_arguments(p)
    return p


def _task_flags(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    p = parser.add_argument_group("what is trained, how long, with which optimizer")
    p.add_argument("--algo", default=",".join(d.algos),
                   help=f"algorithms, run one after the other: {', '.join(ALGORITHMS.names())}; separated by ';' "
                        "(or ',' when none has options), each with options: 'diloco:inner_steps=50;localsgd'")
    p.add_argument("--compress", default=";".join(d.compress),
                   help=f"what gradients (ddp) or outer gradients (diloco) become on the wire: 'default' (the algorithm's own: "
                        f"fp32 for most, 4-bit for streaming-diloco), {', '.join(COMPRESSORS.names())}, "
                        "with options ('topk:ratio=0.01', 'powersgd:rank=2'); several separated by ';' run one after the other")
    p.add_argument("--feedback", default=";".join(d.feedback),
                   help=f"error feedback: 'default' (the algorithm's own), {', '.join(FEEDBACK.names())}; several separated by ';'")
    p.add_argument("--model", default=d.model, help=f"one of: {', '.join(MODELS.names())}, or your own: "
                   "package.module:factory (docs/api.md)")
    p.add_argument("--data", default=d.data, help="shakespeare, mnist, a path to a text file or folder, or your own: "
                   "package.module:factory (docs/api.md)")
    p.add_argument("--workers", type=int, default=d.workers, help="worker processes (ignored under torchrun)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per worker (same token budget for every algorithm)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences (or images) per worker per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak (inner) learning rate, AdamW")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr / peak lr for cosine")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear lr warm-up steps")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES, help="lr after the warm-up")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW's decoupled weight decay")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the local gradient norm (0: off)")
    p.add_argument("--sharding", default=d.sharding, choices=SHARDINGS, help="how ranks split the training data")
    p.add_argument("--seed", type=int, default=d.seed, help="initial model, batches and every seeded draw")


def _algorithm_flags(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    p = parser.add_argument_group("algorithm options, given to every --algo that has them")
    own = "(default: each algorithm's own"
    p.add_argument("--inner-steps", "-H", type=int, default=None,
                   help=f"local-update family: inner steps per round {own}; DiLoCo: 20)")
    p.add_argument("--outer-optimizer", default=None, choices=("sgd", "adam"),
                   help=f"outer optimizer (sgd is Nesterov unless --no-nesterov) {own}; DiLoCo: sgd)")
    p.add_argument("--outer-lr", type=float, default=None, help=f"outer learning rate {own}; DiLoCo: 0.7)")
    p.add_argument("--outer-momentum", type=float, default=None, help=f"outer momentum {own}; DiLoCo: 0.9)")
    p.add_argument("--no-nesterov", dest="nesterov", action="store_false", default=None,
                   help="plain momentum SGD as the outer optimizer")
    p.add_argument("--bucket-mb", type=float, default=d.bucket_mb, help="DDP: gradient bucket size")
    p.add_argument("--aggregate", default=None,
                   help=f"robust aggregation for untrusted workers: {', '.join(RULES.names())}, with options "
                        "('trimmed-mean:trim=0.25', 'centered-clip:tau=1,iters=3'; docs/robustness.md) (default: mean)")
    p.add_argument("--attack", default=None,
                   help="simulate Byzantine ranks (docs/robustness.md): 'signflip:ranks=0', "
                        "'scale:ranks=0+5,factor=-10', 'noise:std=1', 'labelflip:ranks=1' (trains on flipped labels)")
    p.add_argument("--straggle", default=None,
                   help="simulate slow ranks for ddp and ddp-backup: 'fixed:ranks=3,delay=0.5' (seconds per step), "
                        "'random:prob=0.1,delay=0.5,seed=0' (docs/robustness.md)")
    p.add_argument("--hierarchical", action="store_true", default=None,
                   help="--sites: average inside each site first, send one update per site across the WAN")
    p.add_argument("--budget", default=None, choices=("fixed", "speed"),
                   help="diloco, localsgd: inner steps per round, 'fixed' (H each) or 'speed' (proportional to each "
                        "worker's measured speed, updates weighted by the work done)")


def _network_flags(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    p = parser.add_argument_group("the network (docs/emulation.md, docs/topology.md)")
    p.add_argument("--bandwidth", default=d.bandwidth, help="per-worker link: 100mbit, 1gbit, 12.5MB/s, 'none'; or one per worker, comma-separated")
    p.add_argument("--latency", default=d.latency, help="per-hop latency: 20ms, 'none'; or one per worker")
    p.add_argument("--sites", default=None, help="each worker's site, comma-separated ('0,0,1,1'): workers at "
                   "different sites talk through --wan-bandwidth/--wan-latency (docs/heterogeneous.md)")
    p.add_argument("--wan-bandwidth", default=None, help="--sites: the link between two sites, per direction, "
                   "shared by the flows crossing it ('50mbit')")
    p.add_argument("--wan-latency", default=None, help="--sites: latency added across sites ('30ms')")
    p.add_argument("--worker-speed", default=None, help="compute speed per worker, comma-separated ('1,1,0.5,0.25'; "
                   "0.5: each step takes twice as long as measured)")
    p.add_argument("--ring", default=d.ring, help="ring order of collectives: 'rank', 'auto' (measure pairwise "
                   "bandwidth at start-up and avoid slow links), or an order ('0,2,1,3')")
    p.add_argument("--net", default=d.net, choices=NET_MODES,
                   help="model: in-process link emulation; netns: each worker in a network namespace behind a "
                        "tc-shaped veth link (Linux, root; docs/emulation.md)")


def _run_flags(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    p = parser.add_argument_group("evaluation, output, checkpoints, devices")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="held-out batches per evaluation")
    p.add_argument("--target-loss", type=float, default=None, help="validation loss for time-to-target (default: the best loss every algorithm reaches)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per worker")
    p.add_argument("--out", default=d.out, help="folder for run folders")
    p.add_argument("--name", default=None, help="run folder name (default: a timestamp)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--log", default=d.log, help="where metrics go besides each rank's JSONL: csv and/or tensorboard, "
                   "comma-separated (tensorboard: pip install 'lowband[log]'; event files in <run>/tensorboard)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="save every rank's full state every N steps and at the end (0: never); docs/checkpoints.md")
    p.add_argument("--resume", action="store_true",
                   help="continue the run folder --name from each algorithm's last complete checkpoint "
                        "(an algorithm without one starts from scratch)")
    p.add_argument("--init-from", default=None, metavar="PATH",
                   help="start every algorithm from a saved model (fine-tuning): a checkpoint file, or an algorithm "
                        "folder of a run trained with --checkpoint-every (its last complete checkpoint)")
    p.add_argument("--device", default=d.device, choices=DEVICE_CHOICES, help="auto: CUDA when available, one GPU "
                   "per local worker (NCCL), else the CPU (gloo)")
    p.add_argument("--precision", default=d.precision, choices=tuple(PRECISIONS),
                   help="autocast of forward passes; fp16 adds a loss scaler (local-update algorithms only)")


def _elastic_flags(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    p = parser.add_argument_group("elastic membership (docs/elastic.md)")
    p.add_argument("--elastic", action="store_true",
                   help="elastic membership (the DiLoCo family, localsgd, gossip): survivors go on when workers die or hang, "
                        "restarted workers join at the next outer step (docs/elastic.md)")
    p.add_argument("--min-workers", type=int, default=d.min_workers,
                   help="--elastic: stop with an error when fewer workers are left")
    p.add_argument("--elastic-timeout", type=float, default=d.elastic_timeout,
                   help="--elastic: seconds before a silent worker is dropped from the quorum")
    p.add_argument("--rejoin-after", type=float, default=None, metavar="SECONDS",
                   help="--elastic: restart a worker that left after this many seconds (default: never)")


def split_specs(text: str) -> tuple[str, ...]:
    """``'ddp;diloco:inner_steps=50'`` -> two specs; ``'ddp,diloco'`` (no options) too."""
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
    ns = vars(parser.parse_args(argv))
    ns["algos"] = split_specs(ns.pop("algo"))
    ns["compress"] = tuple(c.strip() for c in ns["compress"].split(";") if c.strip()) or (DEFAULT,)
    ns["feedback"] = tuple(f.strip() for f in ns["feedback"].split(";") if f.strip()) or (DEFAULT,)
    try:
        nodes = pop_nodes(ns)
        cfg = TrainConfig(**ns)
        check_nodes(cfg, nodes)
        return cfg, nodes
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
        raise  # unreachable: parser.exit exits
