"""Parse human units for links: ``100mbit``, ``1gbit``, ``12.5MB/s``, ``20ms``, ``1MB``.

Bandwidth follows tc's convention: ``bit``/``kbit``/``mbit``/``gbit``/``tbit`` are bits per
second with decimal prefixes; ``B/s``, ``KB/s``, ``MB/s``, ``GB/s`` are bytes per second.
Every parser returns SI base units (bytes per second, seconds, bytes) and ``None`` for
``none``/``off``/``inf`` (no emulation). Bad input raises ``ValueError`` with one line
that names the accepted forms.
"""

from __future__ import annotations

import re

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_DISABLED = {"none", "off", "inf", "unlimited"}

_BANDWIDTH = {  # -> bytes per second per unit
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "tbit": 1e12 / 8,
    "b/s": 1.0, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9,
}
_TIME = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
_SIZE = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _parse(text: str, table: dict[str, float], what: str, example: str, allow_zero: bool = False) -> float:
    match = re.fullmatch(_NUMBER + r"\s*([a-z/]*)", text.strip().lower())
    if match is None or match.group(2) not in table:
        raise ValueError(
            f"cannot read {what} {text!r}: use a number and one of "
            f"{', '.join(table)} (e.g. {example})"
        )
    value = float(match.group(1)) * table[match.group(2)]
    if value < 0 or (value == 0 and not allow_zero):
        hint = " (use 'none' to disable)" if what != "size" else ""
        raise ValueError(f"{what} must be positive, got {text!r}{hint}")
    return value


def parse_bandwidth(text: str) -> float | None:
    """``'100mbit'`` -> 12_500_000.0 bytes/s; ``'none'`` -> None (unlimited)."""
    if text.strip().lower() in _DISABLED:
        return None
    return _parse(text, _BANDWIDTH, "bandwidth", "100mbit or 12.5MB/s")


def parse_latency(text: str) -> float:
    """``'20ms'`` -> 0.02 seconds; ``'none'`` and ``'0'`` -> 0.0."""
    if text.strip().lower() in _DISABLED | {"0", ""}:
        return 0.0
    return _parse(text, _TIME, "latency", "20ms", allow_zero=True)


def parse_size(text: str) -> int:
    """``'1MB'`` -> 1_000_000 bytes; ``'4KiB'`` -> 4096."""
    return int(_parse(text, _SIZE, "size", "1MB or 64KiB"))


def format_bytes(n: float) -> str:
    """1_234_567 -> '1.23 MB' (decimal, as bandwidths are)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_bandwidth(bytes_per_s: float | None) -> str:
    if bytes_per_s is None:
        return "unlimited"
    bits = bytes_per_s * 8
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits:g}bit"


def format_rate(bytes_per_s: float) -> str:
    """12.5e6 -> '100 Mbit/s' (for people: axis labels, sentences)."""
    bits = bytes_per_s * 8
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits:g} bit/s"


def per_worker(text: str) -> list[str]:
    """A comma-separated list, ``v*k`` standing for k copies of v: ``'0*2,1*2'`` -> 0,0,1,1."""
    out: list[str] = []
    for item in text.split(","):
        value, star, count = item.strip().partition("*")
        if not star:
            out.append(value)
            continue
        if not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"cannot read {item.strip()!r} in {text!r}: 'value*count' needs a whole count >= 1 (e.g. 0.5*16)")
        out += [value.strip()] * int(count)
    return out


def format_seconds(value: float | None) -> str:
    """``12.34`` -> ``'12.3 s'``, ``245`` -> ``'4m 05s'``, ``3725`` -> ``'1h 02m'``."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"
