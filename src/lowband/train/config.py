"""Training configuration: one frozen dataclass, validated on construction.

``lowband train`` and ``torchrun -m lowband.train`` read the same flags into it
(:mod:`lowband.train.flags`); a bad value raises one line saying what is wrong and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowband.adversity.attacks import ATTACKS
from lowband.algorithms import ALGORITHMS
from lowband.comm.robust import RULES
from lowband.devices import DEVICE_CHOICES
from lowband.compress import COMPRESSORS, paper_feedback
from lowband.feedback import FEEDBACK
from lowband.feedback.base import pairing_warning
from lowband.net.link import Network
from lowband.net.units import per_worker
from lowband.registry import build, parse_spec
from lowband.train.checkpoint import resume_mismatch
from lowband.train.checks import check_data, check_init_from, check_model_data
from lowband.train.data import SHARDINGS
from lowband.train.metrics import check_logs
from lowband.train.models import model_builder
from lowband.train.precision import PRECISIONS, check_config as check_precision

SCHEDULES = ("cosine", "constant")
OPTIMIZER_NAMES = ("adamw", "sgd")  # the inner optimizers of lowband.train.loop.OPTIMIZERS
RING_MODES = ("rank", "auto")  # rank order (gloo's); measured pairwise bandwidth at start-up
NET_MODES = ("model", "netns")  # in-process emulation; real namespaces + tc-shaped links (root)
DEFAULT = "default"  # --compress/--feedback: the algorithm's own default


TASK = "what is trained, how long, with which optimizer"
ALGO = "algorithm options, given to every --algo that has them"
NETWORK = "the network (docs/emulation.md, docs/topology.md)"
RUN = "evaluation, output, checkpoints, devices"
ELASTIC = "elastic membership (docs/elastic.md)"
OWN = "(default: each algorithm's own"


def flag(default: Any, help: str, group: str, **argparse_options: Any) -> Any:
    """A :class:`TrainConfig` field and its command-line flag, written once: the default here, the help
    text (``{algorithms}``, ``{compressors}``, ``{feedback}``, ``{models}``, ``{rules}`` are filled with
    the registered names, ``{diloco.<field>}`` with DiLoCo's own default), the help group, and any of ``flag`` (its name, when not the field's),
    ``short``, ``choices``, ``metavar``, ``negate`` (a ``--no-...`` flag that stores False).
    :func:`lowband.train.flags.build_parser` generates the parser from these."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **argparse_options})


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; defaults are the main job (``lowband train``). Each field is
    one flag of ``lowband train`` (``--batch-size`` for ``batch_size``) and one key of ``--config``."""

    # -- what is trained, how long, with which optimizer ----------------------------------------
    algos: tuple[str, ...] = flag(("ddp", "diloco"), "algorithms, run one after the other: {algorithms}; each "
                                  "with options ('diloco:inner_steps=50;localsgd'; docs/cli.md)", TASK, flag="algo",
                                  metavar="SPECS")
    compress: tuple[str, ...] = flag(
        (DEFAULT,), "what gradients (ddp) or outer gradients (diloco) become on the wire: 'default' (the "
        "algorithm's own: fp32 for most, 4-bit for streaming-diloco), {compressors}, with options "
        "('topk:ratio=0.01', 'powersgd:rank=2'); several run one after the other", TASK, metavar="SPECS")
    feedback: tuple[str, ...] = flag((DEFAULT,), "error feedback: 'default' (the algorithm's own), {feedback}; "
                                     "several run one after the other", TASK, metavar="SPECS")
    model: str = flag("gpt", "one of: {models}, or your own: package.module:factory (docs/api.md)", TASK)
    data: str = flag("shakespeare", "shakespeare, mnist, a path to a text file or folder, or your own: "
                     "package.module:factory (docs/api.md)", TASK)
    workers: int = flag(4, "worker processes (ignored under torchrun)", TASK)
    steps: int = flag(400, "training steps per worker (same token budget for every algorithm)", TASK)
    batch_size: int = flag(16, "sequences (or images) per worker per step", TASK)
    optimizer: str = flag("adamw", "inner optimizer of every worker: adamw (betas 0.9/0.95) or sgd (heavy-ball "
                          "--momentum; weight decay as L2, so pass e.g. --weight-decay 5e-4)", TASK,
                          choices=OPTIMIZER_NAMES)
    lr: float = flag(3e-3, "peak (inner) learning rate", TASK)
    momentum: float = flag(0.9, "momentum of --optimizer sgd", TASK)
    min_lr_ratio: float = flag(0.1, "final lr / peak lr for cosine", TASK)
    warmup_steps: int = flag(20, "linear lr warm-up steps", TASK)
    schedule: str = flag("cosine", "lr after the warm-up", TASK, choices=SCHEDULES)
    weight_decay: float = flag(0.1, "weight decay (adamw: decoupled; sgd: L2)", TASK)
    grad_clip: float = flag(1.0, "clip the local gradient norm (0: off)", TASK)
    sharding: str = flag("iid", "how ranks split the training data", TASK, choices=SHARDINGS)
    seed: int = flag(0, "initial model, batches and every seeded draw", TASK)
    # -- the local-update family's hyperparameters: None = each algorithm's own default (DiLoCo: H 20,
    # Nesterov SGD lr 0.7 momentum 0.9); a value given here overrides every algorithm's (options_for)
    inner_steps: int | None = flag(None, "local-update family: inner steps per round " + OWN + "; DiLoCo: {diloco.inner_steps})", ALGO,
                                   short="-H")
    outer_optimizer: str | None = flag(None, "outer optimizer (sgd is Nesterov unless --no-nesterov) " + OWN +
                                       "; DiLoCo: {diloco.outer_optimizer})", ALGO, choices=("sgd", "adam"))
    outer_lr: float | None = flag(None, "outer learning rate " + OWN + "; DiLoCo: {diloco.outer_lr})", ALGO)
    outer_momentum: float | None = flag(None, "outer momentum " + OWN + "; DiLoCo: {diloco.outer_momentum})", ALGO)
    nesterov: bool | None = flag(None, "plain momentum SGD as the outer optimizer", ALGO, negate="no-nesterov")
    bucket_mb: float = flag(25.0, "DDP: gradient bucket size", ALGO)
    aggregate: str | None = flag(None, "robust aggregation for untrusted workers: {rules}, with options "
                                 "('trimmed-mean:trim=0.25', 'centered-clip' (tau = the median distance, 3 iterations); docs/robustness.md) "
                                 "(default: mean)", ALGO)
    attack: str | None = flag(None, "simulate Byzantine ranks (docs/robustness.md): 'signflip:ranks=0', "
                              "'scale:ranks=0+5,factor=-10', 'noise:std=1', 'labelflip:ranks=1' (trains on flipped "
                              "labels)", ALGO)
    straggle: str | None = flag(None, "simulate slow ranks for ddp and ddp-backup: 'fixed:ranks=3,delay=0.5' "
                                "(seconds per step), 'random:prob=0.1,delay=0.5,seed=0' (docs/robustness.md)", ALGO)
    hierarchical: bool | None = flag(None, "--sites: average inside each site first, send one update per site "
                                     "across the WAN", ALGO)
    budget: str | None = flag(None, "diloco, localsgd: inner steps per round, 'fixed' (H each) or 'speed' "
                              "(proportional to each worker's measured speed, updates weighted by the work done)",
                              ALGO, choices=("fixed", "speed"))
    # -- the network; heterogeneity (docs/heterogeneous.md): sites joined by a WAN, uneven workers, ring order
    bandwidth: str = flag("100mbit", "per-worker link: 100mbit, 1gbit, 12.5MB/s, 'none'; or one per worker, "
                          "comma-separated", NETWORK)
    latency: str = flag("20ms", "per-hop latency: 20ms, 'none'; or one per worker", NETWORK)
    sites: str | None = flag(None, "each worker's site, comma-separated ('0,0,1,1'): workers at different sites "
                             "talk through --wan-bandwidth/--wan-latency (docs/heterogeneous.md)", NETWORK)
    wan_bandwidth: str | None = flag(None, "--sites: the link between two sites, per direction, shared by the "
                                     "flows crossing it ('50mbit')", NETWORK)
    wan_latency: str | None = flag(None, "--sites: latency added across sites ('30ms')", NETWORK)
    worker_speed: str | None = flag(None, "compute speed per worker, comma-separated ('1,1,0.5,0.25'; 0.5: each "
                                    "step takes twice as long as measured)", NETWORK)
    ring: str = flag("rank", "ring order of collectives: 'rank', 'auto' (measure pairwise bandwidth at start-up "
                     "and avoid slow links), or an order ('0,2,1,3')", NETWORK)
    net: str = flag("model", "model: in-process link emulation; netns: each worker in a network namespace behind "
                    "a tc-shaped veth link (Linux, root; docs/emulation.md)", NETWORK, choices=NET_MODES)
    # -- evaluation, output, checkpoints, devices ----------------------------------------------
    eval_every: int = flag(25, "steps between held-out evaluations", RUN)
    eval_batches: int = flag(8, "held-out batches per evaluation", RUN)
    target_loss: float | None = flag(None, "validation loss for time-to-target (default: the best loss every "
                                     "algorithm reaches)", RUN)
    threads: int = flag(1, "torch threads per worker", RUN)
    out: str = flag("runs", "folder for run folders", RUN)
    name: str | None = flag(None, "run folder name (default: a timestamp)", RUN)
    progress: bool = flag(True, "no progress bar", RUN, negate="no-progress")
    log: str = flag("jsonl", "where metrics go besides each rank's JSONL: csv and/or tensorboard, comma-separated "
                    "(tensorboard: pip install 'lowband[log]'; event files in <run>/tensorboard)", RUN)
    checkpoint_every: int = flag(0, "save every rank's full state every N steps and at the end (0: never); "
                                 "docs/checkpoints.md", RUN)
    resume: bool = flag(False, "continue the run folder --name from each algorithm's last complete checkpoint "
                        "(an algorithm without one starts from scratch)", RUN)
    init_from: str | None = flag(None, "start every algorithm from a saved model (fine-tuning): a checkpoint file, "
                                 "or an algorithm folder of a run trained with --checkpoint-every (its last "
                                 "complete checkpoint)", RUN, metavar="PATH")
    device: str = flag("auto", "auto: CUDA when available, one GPU per local worker (NCCL), else the CPU (gloo)",
                       RUN, choices=DEVICE_CHOICES)
    precision: str = flag("fp32", "autocast of forward passes; fp16 adds a loss scaler (local-update algorithms "
                          "only)", RUN, choices=tuple(PRECISIONS))
    # -- elastic membership (docs/elastic.md): workers may die, hang, restart and join while training goes on
    elastic: bool = flag(False, "elastic membership (the DiLoCo family, localsgd, gossip): survivors go on when "
                         "workers die or hang, restarted workers join at the next outer step (docs/elastic.md)",
                         ELASTIC)
    min_workers: int = flag(1, "--elastic: stop with an error when fewer workers are left", ELASTIC)
    elastic_timeout: float = flag(30.0, "--elastic: seconds before a silent worker is dropped from the quorum",
                                  ELASTIC)
    rejoin_after: float | None = flag(None, "--elastic: restart a worker that left after this many seconds "
                                      "(default: never)", ELASTIC, metavar="SECONDS")

    def __post_init__(self) -> None:
        self.check_specs()
        check_data(self.data)  # missing, binary, unreadable or too short: before workers start (checks.py)
        check_model_data(self.model, self.data)  # gpt needs text, cnn images
        if Path(self.out).expanduser().exists() and not Path(self.out).expanduser().is_dir():
            raise ValueError(f"--out {self.out} is a file: give a folder for the runs")
        self.check_numbers()
        self.check_network()
        self.check_algorithm_flags()
        check_precision(self)  # --device and --precision
        check_logs(self.log)  # known names; tensorboard installed
        if self.resume:
            self.check_resumable()
        self.check_elastic()
        if self.init_from is not None:
            check_init_from(self.init_from, self.model, self.data)  # exists, SHA-256, loads, fits the model

    def check_specs(self) -> None:
        """Algorithms, model, compressors and feedback exist, with valid options."""
        if not self.algos:
            raise ValueError("give at least one algorithm with --algo")
        model_builder(self.model)  # a registered model, or an importable module:factory
        for spec in self.compress:
            if spec != DEFAULT:
                build(spec, COMPRESSORS)  # raises with the valid names, options and ranges
        for spec in self.feedback:
            if spec != DEFAULT:
                build(spec, FEEDBACK)

    def check_numbers(self) -> None:
        """Counts >= 1, rates finite and > 0 (or >= 0), ratios in range, known schedule and sharding."""
        positive = ("workers", "steps", "batch_size", "inner_steps", "eval_every", "eval_batches", "threads")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "outer_lr", "bucket_mb"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZER_NAMES)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}")
        for name in ("weight_decay", "grad_clip", "outer_momentum"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"unknown sharding {self.sharding!r}; choose one of: {', '.join(SHARDINGS)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0 (0: no checkpoints), got {self.checkpoint_every}")

    def check_network(self) -> None:
        """Links, sites, speeds and ring order describe ``--workers`` workers; --net is known."""
        self.network(self.workers)  # validates units, per-rank lists, sites and the WAN
        self.speeds(self.workers)
        if self.ring not in RING_MODES:
            order = self.ring.split(",")
            if sorted(order) != [str(r) for r in range(self.workers)]:
                raise ValueError(f"--ring must be {', '.join(RING_MODES)} or an order of all workers "
                                 f"0..{self.workers - 1} ('0,2,1,3'), got {self.ring!r}")
        if self.net not in NET_MODES:
            raise ValueError(f"unknown --net {self.net!r}; choose one of: {', '.join(NET_MODES)}")
        if self.net == "netns" and (self.sites is not None or self.ring != "rank"):
            raise ValueError("--sites and --ring are emulated by --net model only (netns shapes one link per worker, "
                             "and gloo's ring follows rank order): use --net model")

    def check_algorithm_flags(self) -> None:
        """A flag that sets an algorithm option (--aggregate, --attack, --budget...) is given only with
        algorithms whose options have it (read from their ``Options``), with valid values."""
        if self.aggregate is not None:
            build(self.aggregate, RULES)  # raises with the valid rules and options
        for flag in ("aggregate", "attack", "straggle", "hierarchical", "budget"):
            lacking = [a for a in self.algos if getattr(self, flag) is not None and flag not in _fields(a)]
            if lacking:
                having = [n for n in ALGORITHMS.names() if flag in _fields(n)]
                raise ValueError(f"--{flag} applies to {', '.join(having)}, not {', '.join(lacking)}")
        if self.attack is not None:
            beyond = sorted(r for r in build(self.attack, ATTACKS).ranks if r >= self.workers)
            if beyond:
                raise ValueError(f"--attack names rank(s) {', '.join(map(str, beyond))}, but ranks run 0.."
                                 f"{self.workers - 1} with --workers {self.workers}")
        if self.elastic and self.attack is not None and self.attack.partition(":")[0].strip() == "labelflip":
            raise ValueError("--attack labelflip poisons data in `lowband train` without --elastic only")
        for algo in self.algos:  # options_for raises with the valid names, options and ranges
            if getattr(self.options_for(Variant(algo)), "hierarchical", False) and \
                    not self.network(self.workers).multisite:
                raise ValueError("--hierarchical averages inside each site first: give workers at several "
                                 "--sites and the link between them (--wan-bandwidth)")

    def check_elastic(self) -> None:
        """``--elastic`` options are consistent (and only given with ``--elastic``)."""
        from lowband.elastic.membership import check_elastic

        if not self.elastic:
            if self.min_workers != 1 or self.rejoin_after is not None:
                raise ValueError("--min-workers and --rejoin-after need --elastic")
            return
        check_elastic(self.algos, self.workers, self.min_workers)
        speed = [a for a in self.algos if getattr(self.options_for(Variant(a)), "budget", "fixed") != "fixed"]
        if self.sites is not None or self.worker_speed is not None or self.ring != "rank" or speed:
            raise ValueError("--elastic does not take --sites, --worker-speed, --ring or --budget speed yet "
                             "(docs/heterogeneous.md)")
        if len(self.variants()) != 1 or self.net != "model" or self.resume or self.checkpoint_every or \
                self.log != "jsonl":
            raise ValueError("--elastic runs one --algo/--compress/--feedback with --net model, "
                             "without --resume, --checkpoint-every or --log")
        if self.elastic_timeout <= 0 or (self.rejoin_after is not None and self.rejoin_after < 0):
            raise ValueError("--elastic-timeout must be > 0 and --rejoin-after >= 0")

    def check_resumable(self) -> None:
        """``--resume`` needs ``--name``, and the run folder's task-defining flags must be these."""
        if not self.name:
            raise ValueError("--resume needs --name: the run folder to continue")
        run_dir = Path(self.out) / self.name
        if not (run_dir / "run.json").is_file():
            raise ValueError(f"nothing to resume: {run_dir} holds no run (check --out and --name, or drop --resume)")
        differing = resume_mismatch(run_dir, self.to_dict())
        if "--workers" in differing and all(parse_spec(a, ALGORITHMS)[0].reshardable for a in self.algos):
            differing.remove("--workers")  # re-sharded on restore (lowband.train.checkpoint)
        if differing:
            raise ValueError(f"cannot resume {run_dir}: it was trained with different {', '.join(differing)} "
                             "(give the same values, or a new --name)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def network(self, world_size: int) -> Network:
        """The emulated network of ``world_size`` workers: per-worker links, sites and the WAN."""
        links = Network.parse(self.bandwidth, self.latency, world_size)
        return Network.with_sites(links, self.sites, self.wan_bandwidth, self.wan_latency)

    def speeds(self, world_size: int) -> tuple[float, ...]:
        """Each worker's compute speed (1: as measured; 0.5: every step takes twice as long)."""
        if self.worker_speed is None:
            return (1.0,) * world_size
        try:
            values = [float(v) for v in per_worker(self.worker_speed)]
        except ValueError:
            raise ValueError(f"--worker-speed takes numbers, comma-separated ('1,1,0.5,0.25'), "
                             f"got {self.worker_speed!r}") from None
        if any(not 0 < v <= 1 for v in values):
            raise ValueError(f"--worker-speed values must be in (0, 1] (1: full speed), got {self.worker_speed!r}")
        if len(values) == 1:
            return tuple(values) * world_size
        if len(values) != world_size:
            raise ValueError(f"--worker-speed lists {len(values)} values for {world_size} workers: give one per worker")
        return tuple(values)

    def variants(self) -> list["Variant"]:
        """Every (algorithm, compressor, feedback) to run, in order; feedback only with compression."""
        out = []
        for algo in self.algos:
            for compress in self.compress:
                for feedback in self.feedback:
                    if compress == "identity" and feedback not in ("none", DEFAULT) and \
                            {"none", DEFAULT} & set(self.feedback):
                        continue  # uncompressed with feedback is uncompressed
                    out.append(Variant(algo, compress, feedback))
        return out

    def feedback_warnings(self) -> list[str]:
        """One line per variant that feeds back the error of a compressor that is not a contraction
        (Compressor.is_contraction): its residual grows without bound and training diverges."""
        out = []
        for variant in self.variants():
            options = self.options_for(variant)
            compress = getattr(options, "compress", "identity")
            line = pairing_warning(build(compress, COMPRESSORS), build(getattr(options, "feedback", "none"), FEEDBACK),
                                   compress)
            if line:
                out.append(f"{variant.label}: {line}")
        return out

    def period_warnings(self) -> list[str]:
        """One line per local-update variant whose period H does not divide ``--steps``: its last
        ``steps % H`` inner steps are never averaged (nothing syncs after the last full round)."""
        out = []
        for variant in self.variants():
            options = self.options_for(variant)
            rest = ALGORITHMS.get(variant.algorithm).tail_steps(options, self.steps)
            if rest:
                h, up = options.inner_steps, self.steps - rest + options.inner_steps
                out.append(f"{variant.label}: --steps {self.steps} is not a multiple of its period H={h}: the last "
                           f"{rest} inner steps are never averaged (the evaluated model is the one synchronised at "
                           f"step {self.steps - rest}); use --steps {up} or an H that divides --steps")
        return out

    def options_for(self, variant: "Variant") -> Any:
        """The variant's algorithm options: the algorithm's defaults, then same-named config fields
        that were given (not None), then the spec's own options (``diloco:inner_steps=50``
        overrides ``--inner-steps``)."""
        cls, spec_kwargs = parse_spec(variant.algo, ALGORITHMS)
        names = {f.name for f in dataclasses.fields(cls.Options)}
        values = {k: v for k, v in self.to_dict().items()
                  if k in names and k not in ("compress", "feedback") and v is not None}
        values.update({k: v for k, v in (("compress", variant.compress), ("feedback", variant.feedback))
                       if v != DEFAULT and k in names})
        merged = {**values, **spec_kwargs}
        if "compress" in merged and "feedback" not in merged and "feedback" in names:
            merged["feedback"] = paper_feedback(merged["compress"])  # a chosen compressor brings its paper's
        return cls.Options(**merged)


def _fields(algo: str) -> set[str]:
    """The option names of algorithm spec ``algo`` (``diloco:inner_steps=5`` -> DiLoCo's Options fields)."""
    return {f.name for f in dataclasses.fields(parse_spec(algo, ALGORITHMS)[0].Options)}


@dataclass(frozen=True)
class Variant:
    """One training run of a comparison: an algorithm with a compressor and a feedback."""

    algo: str  # an algorithm spec: 'diloco' or 'diloco:inner_steps=50'
    compress: str = DEFAULT
    feedback: str = DEFAULT

    @property
    def algorithm(self) -> str:
        """The registered name: ``diloco`` for ``diloco:inner_steps=50``."""
        return self.algo.partition(":")[0].strip()

    @property
    def label(self) -> str:
        """``ddp``, ``ddp+topk:ratio=0.01``, ``diloco+qsgd:bits=4+ef``."""
        defaults = ALGORITHMS.get(self.algorithm).Options()
        own = {"compress": getattr(defaults, "compress", "identity"), "feedback": getattr(defaults, "feedback", "none")}
        feedback = self.feedback  # 'default' with a chosen compressor: its paper's (options_for), shown
        if feedback == DEFAULT and self.compress != DEFAULT and hasattr(defaults, "feedback"):
            feedback = paper_feedback(self.compress)
        parts = [self.algo] + [v for k, v in (("compress", self.compress), ("feedback", feedback))
                               if v not in (DEFAULT, own[k])]
        return "+".join(parts)

    @property
    def folder(self) -> str:
        """The label as a folder name (``:`` and ``,`` are not portable in paths)."""
        return self.label.replace(":", "-").replace(",", "_")
