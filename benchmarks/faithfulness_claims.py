"""The papers' headline comparisons as data: one :class:`Claim` per algorithm, each a list of checks.

docs/faithfulness.md ("Headline comparisons") lists what each paper claims; here each claim becomes a
direction and a rough size on lowband's task (the char-GPT on Shakespeare), measured by
``benchmarks/faithfulness.py``. A check compares one algorithm with a reference run of the same seed
(paired by seed) and returns whether the claim holds within the seed noise and what it measured:

- :class:`LossGap`: final validation loss at most ``margin`` above the reference's (mean - sd <= margin);
- :class:`LossNotBelow`: not lower than the reference's (mean + sd >= 0);
- :class:`Fewer`: ``factor`` times fewer bytes (or peak bytes in one step) than the reference;
- :class:`FewerSyncs`: fewer steps with communication than the reference;
- :class:`OnlyOps`: no collective kinds but ``allowed`` in the ledger (the initial broadcast left out);
- :class:`PayloadBits`: at most ``bits`` per parameter handed to the collective per synchronisation.

A row's verdict is ``matches`` when every check holds, otherwise ``differs: `` and what each failing
check measured (plus the claim's ``note``, filled from measured values). Nothing here runs anything.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

LOSS_MARGIN = 0.05  # "close to" on this task: about the spread of methods the docs call equal at 150 steps
ONEBIT_WARMUP = 0.2  # onebit-adam's fp32 warm-up as a share of the steps (the paper warms up for 15-25%)


@dataclass(frozen=True)
class Measure:
    """What one variant measured in one seed's run (bytes from the ledger, the initial broadcast left out)."""

    loss: float  # final validation loss (rank 0's last evaluation)
    bytes: float  # training bytes sent per worker (mean over ranks)
    peak: float  # most training bytes one rank sent in one step
    syncs: int  # steps in which rank 0 issued a communication op
    ops: tuple[str, ...]  # kinds of op rank 0 issued (all_reduce, sendrecv, ...)
    payload_bits: float  # bits per parameter handed to the collectives per synchronisation (rank 0)
    wire_bits: float  # bits per parameter rank 0 put on its link per synchronisation


Measures = Mapping[str, Sequence[Measure]]  # variant name -> one Measure per seed


@dataclass(frozen=True)
class Outcome:
    """One check's result: whether the claim holds and what was measured, in one phrase."""

    ok: bool
    text: str


class Check(Protocol):
    """A rule of a claim: ``ref`` names the reference variant it needs (None: the algorithm alone)."""

    @property
    def ref(self) -> str | None: ...

    def __call__(self, name: str, m: Measures) -> Outcome: ...


def spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: Sequence[float], percent: bool = False) -> str:
    """``+0.054±0.010`` (or ``+2.1%±0.4%``)."""
    mean, sd = spread(values)
    return f"{mean:+.1%}±{sd:.1%}" if percent else f"{mean:+.3f}±{sd:.3f}"


@dataclass(frozen=True)
class LossGap:
    """Final validation loss at most ``margin`` above ``ref``'s (``relative``: as a share of it)."""

    ref: str
    margin: float = LOSS_MARGIN
    relative: bool = False

    def __call__(self, name: str, m: Measures) -> Outcome:
        gaps = [(a.loss - b.loss) / (b.loss if self.relative else 1.0) for a, b in zip(m[name], m[self.ref])]
        mean, sd = spread(gaps)
        claim = f"{self.margin:.0%}" if self.relative else f"{self.margin:.2f}"
        return Outcome(mean - sd <= self.margin, f"{pm(gaps, self.relative)} vs {self.ref} (claim <= {claim})")


@dataclass(frozen=True)
class LossNotBelow:
    """Final validation loss not lower than ``ref``'s."""

    ref: str

    def __call__(self, name: str, m: Measures) -> Outcome:
        gaps = [a.loss - b.loss for a, b in zip(m[name], m[self.ref])]
        mean, sd = spread(gaps)
        return Outcome(mean + sd >= 0, f"{pm(gaps)} vs {self.ref} (claim >= 0)")


@dataclass(frozen=True)
class Fewer:
    """At least ``factor`` times fewer of ``field`` (``bytes``, or ``peak``: bytes in one step) than ``ref``."""

    ref: str
    field: str
    factor: float

    def __call__(self, name: str, m: Measures) -> Outcome:
        ratios = [getattr(b, self.field) / max(getattr(a, self.field), 1.0) for a, b in zip(m[name], m[self.ref])]
        mean, sd = spread(ratios)
        what = "bytes" if self.field == "bytes" else "peak bytes/step"
        text = f"{mean:.1f}x fewer {what} than {self.ref} (claim >= {self.factor:g}x)"
        return Outcome(mean + sd >= self.factor, text)


@dataclass(frozen=True)
class FewerSyncs:
    """Fewer steps with communication than ``ref``."""

    ref: str

    def __call__(self, name: str, m: Measures) -> Outcome:
        own, other = spread([a.syncs for a in m[name]])[0], spread([b.syncs for b in m[self.ref]])[0]
        return Outcome(own < other, f"{own:.0f} synchronisations vs {self.ref}'s {other:.0f}")


@dataclass(frozen=True)
class OnlyOps:
    """No kinds of communication op but ``allowed`` (the initial broadcast left out)."""

    allowed: tuple[str, ...]
    ref: str | None = None

    def __call__(self, name: str, m: Measures) -> Outcome:
        used = sorted({op for a in m[name] for op in a.ops})
        return Outcome(set(used) <= set(self.allowed), f"ops: {', '.join(used) or 'none'}")


@dataclass(frozen=True)
class PayloadBits:
    """At most ``bits`` per parameter handed to the collectives per synchronisation (the wire's bits stated)."""

    bits: float
    ref: str | None = None

    def __call__(self, name: str, m: Measures) -> Outcome:
        payload, wire = spread([a.payload_bits for a in m[name]])[0], spread([a.wire_bits for a in m[name]])[0]
        return Outcome(payload <= self.bits * 1.01, f"{payload:.2f} bit/param payload per step, "
                       f"{wire:.2f} sent on the wire (claim <= {self.bits:g})")


@dataclass(frozen=True)
class Claim:
    """One paper's headline comparison in miniature: the variant to run, the claim, the rules."""

    algorithm: str
    spec: str  # the --algo spec; {h}, {h_base}, {freeze} are filled from the settings
    paper: str  # the paper's claim, one line (docs/faithfulness.md)
    here: str  # what it becomes on lowband's task
    checks: tuple[Check, ...]
    note: str = ""  # appended to a 'differs' verdict; {rounds} and {steps} are measured


DELAY = "one round of delay is 1/{rounds} of the {steps}-step run"
REFERENCES = {"ddp": "ddp", "diloco": "diloco:inner_steps={h}", "localsgd": "localsgd:inner_steps={h_base}"}
CLAIMS: tuple[Claim, ...] = (
    Claim("eager-diloco", "eager-diloco:inner_steps={h}",
          "eager updates match DiLoCo at the same H and stay close to data-parallel (1B: 2.69 vs DP 2.67)",
          "val loss within 0.05 of diloco at the same H", (LossGap("diloco"),), DELAY),
    Claim("delayed-diloco", "delayed-diloco:inner_steps={h}",
          "naive one-step-delayed outer gradients degrade convergence against DiLoCo; eager repairs it",
          "val loss no lower than eager-diloco's or diloco's at the same H",
          (LossNotBelow("eager-diloco"), LossNotBelow("diloco"))),
    Claim("co2", "co2:inner_steps={h}",
          "full overlap with convergence comparable to the synchronous baselines",
          "val loss within 0.05 of diloco at the same H (its blocking counterpart); the gap to ddp stated",
          (LossGap("diloco"),), DELAY),
    Claim("streaming-diloco", "streaming-diloco:inner_steps={h}",
          "better than DiLoCo, similar to DP, two orders of magnitude less bandwidth (2.66 vs DP 2.67; 1.10 vs 441 TB)",
          "val loss within 0.05 of diloco (or below), >= 4x fewer peak bytes per step than diloco (P = 4), "
          ">= 10x fewer bytes than ddp", (LossGap("diloco"), Fewer("diloco", "peak", 4), Fewer("ddp", "bytes", 10))),
    Claim("noloco", "noloco:inner_steps={h}",
          "no collective at all, yet up to 4% faster convergence than DiLoCo",
          "val loss within 2% of diloco's at the same H; point-to-point ops only; fewer bytes than diloco",
          (LossGap("diloco", 0.02, relative=True), OnlyOps(("sendrecv",)), Fewer("diloco", "bytes", 1))),
    Claim("qsr", "qsr",
          "H ~ 1/lr^2 beats constant H in final accuracy while communicating less (ViT-B: 79.32% -> 80.98%)",
          "val loss no higher than localsgd at constant H = H_base = {h_base}, with fewer synchronisations",
          (LossGap("localsgd", 0.0), FewerSyncs("localsgd"))),
    Claim("dist-lion", "dist-lion",
          "1 bit per parameter each way, accuracy close to global Lion / AdamW",
          "val loss within 0.05 of ddp (AdamW); 1 bit per parameter in each worker's payload",
          (LossGap("ddp"), PayloadBits(1.0))),
    Claim("onebit-adam", "onebit-adam:freeze_step={freeze}",
          "same convergence as uncompressed Adam with up to 5x less communication (BERT)",
          "val loss within 0.05 of ddp (the same AdamW), >= 3x fewer bytes; fp32 warm-up for 20% of the steps "
          "(paper: 15-25%)", (LossGap("ddp"), Fewer("ddp", "bytes", 3))),
    Claim("dion", "dion",
          "orthonormalized updates at low rank keep their benefit at much lower communication than full gradients",
          "val loss within 0.05 of ddp (or below), >= 2x fewer bytes (rank 1/4 of a 128-wide model)",
          (LossGap("ddp"), Fewer("ddp", "bytes", 2))),
)
BY_NAME = {claim.algorithm: claim for claim in CLAIMS}


def settings_for(steps: int, h: int, h_base: int = 4) -> dict[str, int]:
    """The values the specs' placeholders take for a run of ``steps`` steps."""
    return {"steps": steps, "h": h, "h_base": h_base, "freeze": max(1, round(ONEBIT_WARMUP * steps))}


def variants(algorithms: Sequence[str], settings: Mapping[str, int]) -> dict[str, str]:
    """Name -> --algo spec of every run the chosen claims need: ddp first (the baseline), then the
    references and the claimed algorithms, in registry order."""
    needed = {"ddp", *algorithms}
    for name in algorithms:
        needed |= {check.ref for check in BY_NAME[name].checks if check.ref is not None}
    specs = {**{name: claim.spec for name, claim in BY_NAME.items()}, **REFERENCES}
    order = ["ddp", *(n for n in REFERENCES if n != "ddp"), *BY_NAME]
    return {name: specs[name].format(**settings) for name in order if name in needed}


def judge(claim: Claim, m: Measures, settings: Mapping[str, int]) -> dict[str, Any]:
    """One table row: the claim, what was measured (the loss, every check, the gap to ddp) and the verdict."""
    outcomes = [check(claim.algorithm, m) for check in claim.checks]
    texts = [o.text for o in outcomes]
    if all(check.ref != "ddp" for check in claim.checks) and "ddp" in m:
        texts.append(LossGap("ddp")(claim.algorithm, m).text.split(" (")[0])
    mean, sd = spread([a.loss for a in m[claim.algorithm]])
    failing = [o.text for o in outcomes if not o.ok]
    rounds = round(spread([a.syncs for a in m[claim.algorithm]])[0])
    note = claim.note.format(rounds=rounds, steps=settings["steps"]) if claim.note else ""
    verdict = "matches" if not failing else "differs: " + "; ".join(failing + ([note] if note else []))
    return {"algorithm": claim.algorithm, "paper_claim": claim.paper, "here": claim.here.format(**settings),
            "measured": f"val {mean:.3f}±{sd:.3f}; " + "; ".join(texts), "verdict": verdict,
            "checks": [{"ok": o.ok, "text": o.text} for o in outcomes]}
