"""What the case study's tables say, written from the numbers (``docs/case-study.md``, "What the numbers say").

:func:`findings` turns one sweep's per-network summaries (``summary.json`` of ``lowband report``) into
Markdown bullets: how much of DDP's time is waiting for the link on each network, which methods beat DDP
everywhere, only over the slower links or nowhere, which never reach the target, the most frugal
method, and each lowband method against the peer library running the same algorithm, with a warning
where the two computed at different speeds (the host was busier during one of them: compare their
bytes, not their seconds). Nothing in it is typed by hand but the reasons two peers' bytes differ.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable

from lowband.net.units import format_bytes, parse_bandwidth

FASTER = 1.05  # a speed-up at or above this is "faster than the baseline"; between 1/FASTER and it, level
NOISY = 1.3  # two runs of the same work whose compute per step differs by more than this: host noise (the peers'
# own loop around the same forward, backward and AdamW costs up to ~25% more per step on the small GPT)
Group = dict[str, Any]


def mean(row: dict[str, Any], key: str) -> float | None:
    """The mean of one statistic of a row (``None`` when missing or not reached)."""
    return (row.get(key) or {}).get("mean")


def by_entry(group: Group) -> dict[str, dict[str, Any]]:
    """A network's rows keyed by entry label."""
    return {r["entry"]: r for r in group["rows"]}


def _by_bandwidth(groups: list[Group]) -> list[Group]:
    """Fastest link first."""
    return sorted(groups, key=lambda g: -(parse_bandwidth(g["bandwidth"]) or 0.0))


def _speedups(entry: str, groups: list[Group]) -> list[float | None]:
    return [by_entry(g).get(entry, {}).get("speedup") for g in groups]


def _list(entry: str, values: Iterable[float | None], groups: list[Group]) -> str:
    shown = ", ".join(f"{g['bandwidth']} " + ("-" if v is None else f"{v:.2f}x") for g, v in zip(groups, values))
    return f"{entry} ({shown})"


def _link(groups: list[Group], baseline: str) -> str | None:
    shares, best = [], []
    for g in groups:
        rows = by_entry(g)
        if baseline not in rows or mean(rows[baseline], "utilisation") is None:
            return None
        shares.append(f"{mean(rows[baseline], 'utilisation'):.0%}" + (" of its wall-clock" if not shares else "")
                      + f" over {g['bandwidth']}")
        top = max((r["speedup"] for r in g["rows"] if r["speedup"] is not None), default=None)
        best.append("-" if top is None else f"{top:.1f}x")
    return (f"**The link decides.** {baseline} computes {', '.join(shares)} (the rest is waiting for the network); "
            f"the fastest method's speed-up over it goes {' → '.join(best)}.")


def _ranking(groups: list[Group], baseline: str, steps: int | None, why_unreached: dict[str, str]) -> list[str]:
    entries = list(dict.fromkeys(r["entry"] for g in groups for r in g["rows"] if r["entry"] != baseline))
    everywhere, slow_only, never, unreached = [], [], [], []
    for entry in entries:
        ups = _speedups(entry, groups)
        reached = [u for u in ups if u is not None]
        if not reached:
            finals = [mean(r, "final_val_loss") for g in groups for r in g["rows"] if r["entry"] == entry]
            best = min((f for f in finals if f is not None), default=None)
            reason = f"; {why_unreached[entry]}" if entry in why_unreached else ""
            unreached.append(entry + ("" if best is None else f" (lowest final loss {best:.3f}{reason})"))
        elif all(u >= FASTER for u in reached):
            everywhere.append(_list(entry, ups, groups))
        elif any(u >= FASTER for u in reached):
            slow_only.append(_list(entry, ups, groups))
        else:
            never.append(_list(entry, ups, groups))
    target = groups[0].get("target_loss")
    within = "" if steps is None else f" in {steps} steps"
    lines = [f"**Faster than {baseline} on every network it reached the target** (speed-up ≥ {FASTER}x): "
             + (", ".join(everywhere) or "none") + ".",
             "**Faster over some links only**: " + (", ".join(slow_only) or "none") + ".",
             f"**Never faster than {baseline}** (below {FASTER}x wherever it reached the target): "
             + (", ".join(never) or "none") + "."]
    if unreached and target is not None:
        lines.append(f"**Never reached {target:.3f}{within}**: " + ", ".join(unreached) + ".")
    return lines


def _frugal(groups: list[Group], baseline: str) -> str | None:
    rows = [(g, r) for g in groups for r in g["rows"] if mean(r, "bytes_to_target") is not None]
    if not rows:
        return None
    g, best = min(rows, key=lambda gr: mean(gr[1], "bytes_to_target"))
    least, base = mean(best, "bytes_to_target"), mean(by_entry(g).get(baseline, {}), "bytes_to_target")
    ratio = "" if not base else f", {base / least:.0f}x fewer than {baseline}'s {format_bytes(base)}"
    return (f"**Fewest bytes to target**: {best['entry']}, {format_bytes(least)}{ratio} "
            "(bytes to target do not depend on the link: the same steps send the same payloads).")


def _spread(groups: list[Group]) -> str | None:
    """The largest relative spread (sd / mean) of time to target among the entries run with several seeds."""
    spreads = [(r["time_to_target_s"]["sd"] / r["time_to_target_s"]["mean"], r["entry"], g["bandwidth"])
               for g in groups for r in g["rows"]
               if r.get("seeds", 1) > 1 and r["time_to_target_s"].get("sd") and r["time_to_target_s"]["mean"]]
    if not spreads:
        return None
    worst, entry, bandwidth = max(spreads)
    typical = statistics.median(s for s, _, _ in spreads)
    return (f"**Seed to seed**: over the entries run with several seeds, time to target varies by {typical:.0%} "
            f"(median sd / mean) and up to {worst:.0%} ({entry} over {bandwidth}); single-seed differences smaller "
            "than that are within the noise.")


def _pair(mine: str, peer: str, groups: list[Group], why: dict[tuple[str, str], str]) -> str | None:
    times, sizes, noisy = [], set(), []
    for g in groups:
        rows = by_entry(g)
        if mine not in rows or peer not in rows:
            continue
        a, b = rows[mine], rows[peer]
        ta, tb = mean(a, "time_to_target_s"), mean(b, "time_to_target_s")
        ca, cb = mean(a, "compute_per_step"), mean(b, "compute_per_step")
        compute = f" ({ca:.2f} / {cb:.2f} s)" if ca and cb else ""
        times.append(f"{g['bandwidth']} " + (f"{ta / tb:.2f}x" if ta and tb else "-") + compute)
        sizes.add((mean(a, "bytes_to_target"), mean(b, "bytes_to_target")))
        if ca and cb and max(ca, cb) / min(ca, cb) > NOISY:
            noisy.append(f"{g['bandwidth']}, {max(ca, cb) / min(ca, cb) - 1:.0%}")
    if not times:
        return None
    same = all(x is not None and y is not None and abs(x - y) <= 0.005 * y for x, y in sizes)
    if same:
        sent = "the same bytes to target (within 0.5%)"
    else:
        sent = "bytes to target " + "; ".join(f"{format_bytes(x) if x else '-'} vs {format_bytes(y) if y else '-'}"
                                              for x, y in sorted(sizes, key=str))
        sent += f" ({why[mine, peer]})" if (mine, peer) in why else ""
    text = (f"{mine} / {peer}: {sent}; time to target, lowband's over the peer's (compute per step, lowband / peer): "
            + ", ".join(times))
    if noisy:
        text += (f". ⚠ compute per step apart by more than {NOISY - 1:.0%} ({'; '.join(noisy)}) for the same "
                 "forward, backward and AdamW: the host was busier during one of the two runs, so read their "
                 "bytes, not their seconds")
    return text + "."


def findings(groups: list[Group], pairs: Iterable[tuple[str, str]], why: dict[tuple[str, str], str],
             steps: int | None = None, why_unreached: dict[str, str] | None = None) -> list[str]:
    """Markdown bullets over one sweep's per-network summaries (see the module docstring); ``why_unreached``:
    a measured reason, by entry, for a method that never reached the target."""
    if not groups:
        return []
    groups = _by_bandwidth(groups)
    baseline = groups[0].get("baseline", "ddp")
    bullets = [b for b in (_link(groups, baseline), *_ranking(groups, baseline, steps, why_unreached or {}), _frugal(groups, baseline),
                           _spread(groups)) if b]
    peers = [p for mine, peer in pairs if (p := _pair(mine, peer, groups, why))]
    if peers:
        bullets.append("**Against the peer running the same algorithm**:\n" + "\n".join(f"  - {p}" for p in peers))
    return [f"- {b}" for b in bullets]
