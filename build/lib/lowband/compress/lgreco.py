"""``lgreco``: layer-wise adaptive compression, one setting per layer from a knapsack.

Markov, Alimohammadi, Frantar, Alistarh, "L-GreCo: Layerwise-Adaptive Gradient Compression
for Efficient and Accurate Deep Learning" (MLSys 2024, arXiv:2210.17357). It wraps one
family of the suite — ``powersgd`` (choices are ranks), ``topk`` (densities) or ``qsgd``
(bits) — with one wrapped compressor per candidate setting, built through COMPRESSORS:

1. warm-up: for the first ``warmup`` exchanges of a key, every layer (key) uses ``default``;
2. measure: at exchange ``warmup`` of a key, and every ``every`` exchanges after it, the key
   travels at the most accurate candidate (``measure=max``, the largest setting) or
   uncompressed (``measure=raw``), and on the decoded *mean* that comes back each candidate
   c gives (bytes b_c, error e_c = ||D(C_c(y)) - y||^2): a fresh compressor of that setting
   encodes y (PowerSGD: three warm-started encodes, i.e. three power iterations);
3. assign: at the next exchange of a measured key, :func:`lowband.compress.knapsack.assign`
   picks per measured layer the setting with the fewest total bytes whose total error is at
   most that of ``default`` on every layer (errors discretised into ``levels`` units);
4. compress: every other exchange runs the assigned setting's own ``exchange`` unchanged.

Identical choices on every rank, without communicating. Summable payloads of different
shapes would hang or corrupt the all-reduce, so every rank must choose alike; a compressor
never communicates, so the errors are measured only on data every rank holds bit for bit:
the mean the exchange returns (an all-reduced sum is the same on every rank; an all-gather
hands every rank the same payloads, decoded and averaged in rank order). The probes are
fresh compressors seeded alike on every rank (no ``for_rank``), so given the same mean every
rank computes the same errors, the same integer knapsack and the same assignment — under the
assumption PowerSGD already makes (it orthogonalises the summed P on every rank): ranks run
the same kernels, so equal inputs give equal bits. Why the max-setting mean (default) rather
than an uncompressed round: it costs one max-setting step per ``every`` instead of one fp32
step (on the char-GPT 305 kB instead of 3.3 MB, a rank-4 step being 166 kB), and for
PowerSGD the offset it adds cancels: with y = P P^T M (the mean projected on the max-rank
span) and a candidate's approximation T_c(y) inside that span,
||M - T_c(y)||^2 = ||M - y||^2 + ||y - T_c(y)||^2, so the measured errors are those of T_c(y)
as an approximation of M minus a per-layer constant, which appears on both sides of the
budget constraint.
For top-k and QSGD the same holds approximately; ``measure=raw`` measures on the exact mean.

Bytes: every candidate's bytes are its probe payload's ``nbytes`` (exactly what the ledger
charges for that layer, PowerSGD's two rounds included). ``metrics()`` reports the mean
chosen setting, the bytes of the assignment over those of ``default`` (at the last
measurement's sizes) and the per-layer choices; ``state_dict`` holds the assignment, the
counters, pending measurements, the history of assignments and every wrapped compressor's
state, so a resumed run is bit-identical.

Example::

    agg = Aggregator(comm, build("lgreco:family=powersgd,choices=1+2+4+8,default=4,every=100", COMPRESSORS),
                     build("ef", FEEDBACK))
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional, cast

import torch

from lowband.compress.base import COMPRESSORS, Compressor, CompressorOptions, Exchange, Payload
from lowband.compress.knapsack import Candidate, assign
from lowband.registry import Registry, build, parse_spec


@dataclass(frozen=True)
class Family:
    """How L-GreCo drives one compressor family: the option its choices set, their type and
    defaults, and how many encodes a fresh probe needs to reach its steady-state error."""

    option: str
    integer: bool
    choices: str
    default: float
    probe_encodes: int = 1


FAMILIES: Registry[Family] = Registry("lgreco family")
FAMILIES.register("powersgd")(Family("rank", True, "1+2+4+8", 4, probe_encodes=3))  # warm start = power iterations
FAMILIES.register("topk")(Family("ratio", False, "0.001+0.003+0.01+0.03", 0.01))
FAMILIES.register("qsgd")(Family("bits", True, "2+4+8", 4))
MEASURES = ("max", "raw")


def _text(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class LGreCoOptions(CompressorOptions):
    """``family``: powersgd | topk | qsgd. ``choices``: candidate settings joined by '+' (ranks,
    densities, bits; empty: the family's). ``default``: the uniform setting whose total error is
    the budget (0: the family's). ``every``: exchanges of a key between measurements;
    ``warmup``: exchanges before the first. ``measure``: max | raw (module docstring).
    ``levels``: error units of the knapsack."""

    family: str = "powersgd"
    choices: str = ""
    default: float = 0.0
    every: int = 100
    warmup: int = 100
    measure: str = "max"
    levels: int = 1000

    def __post_init__(self) -> None:
        try:
            fam = FAMILIES.get(self.family)
        except ValueError as err:
            raise ValueError(f"lgreco:family: {err}") from None
        settings = self.settings()  # raises on malformed choices
        if len(set(settings)) != len(settings):
            raise ValueError(f"lgreco:choices lists a setting twice ({self.choices}); list each once")
        if self.default_setting() not in settings:
            raise ValueError(f"lgreco:default={_text(self.default_setting())} is not one of choices "
                             f"{'+'.join(map(_text, settings))}; add it to choices or pick one of them")
        for value in settings:
            try:
                build(self.spec(value), COMPRESSORS)
            except ValueError as err:
                raise ValueError(f"lgreco:choices for {self.family} set {fam.option}: {err}") from None
        for name, minimum in (("every", 1), ("warmup", 0), ("levels", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"lgreco:{name} must be an integer >= {minimum}, got {value!r}")
        if self.measure not in MEASURES:
            raise ValueError(f"lgreco:measure must be one of {', '.join(MEASURES)}, got {self.measure!r}")

    def settings(self) -> tuple[float, ...]:
        """The candidate settings, ascending (ints for ranks and bits)."""
        fam = FAMILIES.get(self.family)
        text = self.choices or fam.choices
        try:
            values = [float(v) for v in text.split("+")]
        except ValueError:
            raise ValueError(f"lgreco:choices must be numbers joined by '+' (e.g. choices={fam.choices}), "
                             f"got {text!r}") from None
        if fam.integer and not all(v.is_integer() for v in values):
            raise ValueError(f"lgreco:choices for {self.family} are integers ({fam.option}), got {text!r}")
        return tuple(sorted(int(v) if fam.integer else v for v in values))

    def default_setting(self) -> float:
        fam = FAMILIES.get(self.family)
        value = float(self.default or fam.default)
        return int(value) if fam.integer and value.is_integer() else value

    def spec(self, setting: float) -> str:
        """The wrapped compressor's spec for one setting: ``powersgd:rank=4``."""
        return f"{self.family}:{FAMILIES.get(self.family).option}={_text(setting)}"


@COMPRESSORS.register("lgreco")
class LGreCo(Compressor):
    """One wrapped compressor per setting, a setting per key chosen by the knapsack; see the module docstring."""

    name = "lgreco"
    Options = LGreCoOptions
    options: LGreCoOptions

    @classmethod
    def wire_bytes(cls, options: CompressorOptions, numel: int, side: int) -> tuple[float, ...]:
        """The family at the uniform default setting: the total error budget the per-layer choice keeps."""
        o = cast(LGreCoOptions, options)
        family, kwargs = parse_spec(o.spec(o.default_setting()), COMPRESSORS)
        return family.wire_bytes(family.Options(**kwargs), numel, side)

    def __init__(self, options: Optional[LGreCoOptions] = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.settings = self.options.settings()
        self.default = self.options.default_setting()
        self.family = FAMILIES.get(self.options.family)
        self.compressors: dict[float, Compressor] = {s: build(self.options.spec(s), COMPRESSORS)
                                                     for s in self.settings}
        # payloads of one family are all summable or none is; the aggregator reads this per instance
        self.summable = COMPRESSORS.get(self.options.family).summable  # type: ignore[misc]
        self.counts: dict[str, int] = {}  # key -> exchanges so far
        self.assignment: dict[str, float] = {}  # key -> setting (absent: default)
        self.pending: dict[str, list[Candidate]] = {}  # key -> candidates measured, not yet assigned
        self.sizes: dict[str, list[int]] = {}  # key -> bytes per setting at its last measurement
        self.history: list[tuple[int, dict[str, float]]] = []  # (exchange count, assignment) per decision

    def for_rank(self, rank: int) -> None:
        for c in self.compressors.values():
            c.for_rank(rank)

    def is_contraction(self) -> bool:
        """As its family at every setting it may choose (powersgd, topk: yes; qsgd: no)."""
        return all(c.is_contraction() for c in self.compressors.values())

    # -- the rounds -----------------------------------------------------------------------
    def exchange(self, x: torch.Tensor, key: str, world_size: int) -> Exchange:
        count = self.counts.get(key, 0)
        self.counts[key] = count + 1
        if key in self.pending:  # this key's measurement is complete, and so is every key's before it
            self._decide(count)
        o = self.options
        if count >= o.warmup and (count - o.warmup) % o.every == 0:
            if o.measure == "raw":
                mean, own = yield from self._raw(x, world_size)
            else:
                mean, own = yield from self.compressors[self.settings[-1]].exchange(x, key, world_size)
            self.pending[key] = self._measure(mean, key)
            return mean, own
        setting = self.assignment.get(key, self.default)
        return (yield from self.compressors[setting].exchange(x, key, world_size))

    def _raw(self, x: torch.Tensor, world_size: int) -> Exchange:
        """One uncompressed round (summed, or gathered and averaged in rank order)."""
        if self.summable:
            summed = yield Payload([(x / world_size).contiguous()])
            assert isinstance(summed, Payload)
            return summed.tensors[0].view(x.shape), x
        everyone = yield Payload([x.contiguous()])
        assert isinstance(everyone, list)
        return torch.stack([p.tensors[0].view(x.shape) for p in everyone]).mean(0), x

    @torch.no_grad()
    def _measure(self, mean: torch.Tensor, key: str) -> list[Candidate]:
        """(bytes, squared error) of every setting on ``mean``, from fresh, identically seeded probes."""
        y = mean.detach().clone()
        exact = y.double()
        out = []
        for setting in self.settings:
            probe: Compressor = build(self.options.spec(setting), COMPRESSORS)
            for _ in range(self.family.probe_encodes):
                payload = probe.encode(y, key)
            error = float((probe.decode(payload).double() - exact).pow(2).sum())
            out.append(Candidate(payload.nbytes, error if math.isfinite(error) else math.inf))
        self.sizes[key] = [c.nbytes for c in out]
        return out

    def _decide(self, count: int) -> None:
        """Solve the knapsack over every measured key; the others keep their settings."""
        keys = sorted(self.pending)
        layers = [self.pending[k] for k in keys]
        default = [self.settings.index(self.default)] * len(keys)
        picked = assign(layers, default, self.options.levels)
        self.assignment.update({k: self.settings[i] for k, i in zip(keys, picked)})
        self.pending = {}
        self.history.append((count, dict(self.assignment)))

    # -- one rank on its own --------------------------------------------------------------
    def encode(self, x: torch.Tensor, key: str) -> Payload:
        """The assigned setting's payload (no measurement; the schedule advances in ``exchange``)."""
        setting = self.assignment.get(key, self.default)
        inner = self.compressors[setting].encode(x, key)
        return Payload(inner.tensors, ctx=(setting, inner.ctx))

    def decode(self, payload: Payload) -> torch.Tensor:
        setting, ctx = payload.ctx
        return self.compressors[setting].decode(Payload(payload.tensors, ctx))

    # -- report and checkpoints -----------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """Mean chosen setting over keys, the assignment's bytes over the default's (at the last
        measured sizes), decisions so far and the per-key choices; empty before the first decision."""
        assignment, sizes, decisions = dict(self.assignment), dict(self.sizes), len(self.history)  # snapshot:
        if not decisions or not assignment:  # an async aggregator's thread may be deciding right now
            return {}
        keys = sorted(assignment)
        index = {s: i for i, s in enumerate(self.settings)}
        d = index[self.default]
        chosen = sum(sizes[k][index[assignment[k]]] for k in keys if k in sizes)
        default = sum(sizes[k][d] for k in keys if k in sizes)
        return {"lgreco_mean_setting": sum(assignment[k] for k in keys) / len(keys),
                "lgreco_bytes_ratio": chosen / default if default else 1.0,
                "lgreco_decisions": decisions,
                "lgreco_choices": {k: assignment[k] for k in keys}}

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy({
            "counts": self.counts, "assignment": self.assignment, "sizes": self.sizes,
            "pending": {k: [tuple(c) for c in v] for k, v in self.pending.items()},
            "history": self.history,
            "wrapped": {self.options.spec(s): c.state_dict() for s, c in self.compressors.items()},
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = copy.deepcopy(state)
        self.counts = {k: int(v) for k, v in state.get("counts", {}).items()}
        self.assignment = dict(state.get("assignment", {}))
        self.sizes = dict(state.get("sizes", {}))
        self.pending = {k: [Candidate(int(b), float(e)) for b, e in v] for k, v in state.get("pending", {}).items()}
        self.history = [(int(c), dict(a)) for c, a in state.get("history", [])]
        wrapped = state.get("wrapped", {})
        for s, c in self.compressors.items():
            if self.options.spec(s) in wrapped:
                c.load_state_dict(wrapped[self.options.spec(s)])
