"""Unit parsing (``lowband.net.units``) and per-rank networks (``lowband.net.link``)."""

from __future__ import annotations

import pytest

from lowband.net.link import Link, Network
from lowband.net.units import (
    format_bandwidth,
    format_bytes,
    parse_bandwidth,
    parse_latency,
    parse_size,
)

# -- bandwidth -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bytes_per_s"),
    [
        ("100mbit", 12_500_000.0),
        ("1gbit", 125_000_000.0),
        ("10kbit", 1_250.0),
        ("8bit", 1.0),
        ("1tbit", 125_000_000_000.0),
        ("12.5MB/s", 12_500_000.0),
        ("1GB/s", 1_000_000_000.0),
        ("3KB/s", 3_000.0),
        ("5B/s", 5.0),
        ("  1GBIT ", 125_000_000.0),  # case and surrounding blanks do not matter
        ("100 mbit", 12_500_000.0),  # a blank between number and unit is fine
        ("2.5e1mbit", 3_125_000.0),
        (".5gbit", 62_500_000.0),
    ],
)
def test_parse_bandwidth(text: str, bytes_per_s: float) -> None:
    assert parse_bandwidth(text) == pytest.approx(bytes_per_s, rel=1e-12)


@pytest.mark.parametrize("text", ["none", "NONE", "off", "inf", "unlimited", " None "])
def test_parse_bandwidth_disabled_is_none(text: str) -> None:
    assert parse_bandwidth(text) is None


# -- latency ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("20ms", 0.02),
        ("1s", 1.0),
        ("250us", 0.00025),
        ("500ns", 5e-7),
        ("0.5 s", 0.5),
        ("0ms", 0.0),
        ("0", 0.0),
        ("none", 0.0),
        ("off", 0.0),
    ],
)
def test_parse_latency(text: str, seconds: float) -> None:
    assert parse_latency(text) == pytest.approx(seconds, rel=1e-12, abs=0.0)


# -- size ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("1MB", 1_000_000),
        ("4KiB", 4096),
        ("64kib", 65_536),
        ("2MiB", 2 * 1024 * 1024),
        ("1GiB", 2**30),
        ("1.5GB", 1_500_000_000),
        ("1e3B", 1000),
        ("7b", 7),
        ("10 kb", 10_000),
    ],
)
def test_parse_size(text: str, nbytes: int) -> None:
    value = parse_size(text)
    assert isinstance(value, int)
    assert value == nbytes


# -- bad input: one line naming the accepted forms --------------------------------------


@pytest.mark.parametrize(
    ("parser", "text", "forms"),
    [
        (parse_bandwidth, "fast", ["mbit", "gbit", "MB/s"]),
        (parse_bandwidth, "10mbps", ["mbit", "mb/s"]),
        (parse_bandwidth, "mbit", ["mbit"]),
        (parse_bandwidth, "-5mbit", ["mbit"]),
        (parse_bandwidth, "100", ["mbit"]),  # a bare number is ambiguous: bits or bytes?
        (parse_latency, "20 minutes", ["ms", "us", "s"]),
        (parse_latency, "soon", ["ms"]),
        (parse_latency, "-1ms", ["ms"]),
        (parse_size, "lots", ["MB", "KiB"]),
        (parse_size, "1 MBit", ["mb", "kib"]),
        (parse_size, "none", ["mb"]),  # sizes have no 'disabled' form
    ],
)
def test_bad_input_message_is_one_line_and_names_forms(parser, text: str, forms: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        parser(text)
    message = str(info.value)
    assert "\n" not in message
    assert repr(text) in message, "the message quotes what the user typed"
    lowered = message.lower()
    for form in forms:
        assert form.lower() in lowered, f"{form!r} missing from {message!r}"


@pytest.mark.parametrize(("parser", "text"), [(parse_bandwidth, "0mbit"), (parse_bandwidth, "0B/s"), (parse_size, "0B")])
def test_zero_is_rejected_with_one_line(parser, text: str) -> None:
    with pytest.raises(ValueError, match="positive") as info:
        parser(text)
    assert "\n" not in str(info.value)


# -- formatting ------------------------------------------------------------------------


def test_format_bytes() -> None:
    assert format_bytes(1_234_567) == "1.23 MB"
    assert format_bytes(2_500_000_000) == "2.50 GB"
    assert format_bytes(1_000) == "1.00 kB"
    assert format_bytes(999) == "999 B"
    assert format_bytes(0) == "0 B"


def test_format_bandwidth_round_trips() -> None:
    assert format_bandwidth(None) == "unlimited"
    assert format_bandwidth(12_500_000.0) == "100mbit"
    assert format_bandwidth(125_000_000.0) == "1gbit"
    assert format_bandwidth(125.0) == "1kbit"
    for text in ("100mbit", "1gbit", "10kbit", "2.5gbit"):
        assert format_bandwidth(parse_bandwidth(text)) == text


# -- links and networks ----------------------------------------------------------------


def test_link_transfer_seconds() -> None:
    link = Link(bandwidth=12_500_000.0, latency=0.02)
    assert link.transfer_seconds(1_000_000) == pytest.approx(0.02 + 0.08)
    assert Link().transfer_seconds(10**9) == 0.0
    assert Link(latency=0.005).transfer_seconds(10**9) == pytest.approx(0.005)


@pytest.mark.parametrize("kwargs", [{"bandwidth": 0.0}, {"bandwidth": -1.0}, {"latency": -0.001}])
def test_link_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Link(**kwargs)


def test_network_parse_uniform() -> None:
    net = Network.parse("100mbit", "20ms", world_size=3)
    assert net.links == (Link(12_500_000.0, 0.02),) * 3
    assert net.emulated
    assert net.describe() == "100mbit, 20 ms"


def test_network_parse_per_rank_lists() -> None:
    net = Network.parse("100mbit,100mbit,10mbit,1gbit", "5ms,20ms,5ms,1ms", world_size=4)
    assert [link.bandwidth for link in net.links] == [12_500_000.0, 12_500_000.0, 1_250_000.0, 125_000_000.0]
    assert [link.latency for link in net.links] == pytest.approx([0.005, 0.02, 0.005, 0.001])
    # one list and one scalar mix freely
    mixed = Network.parse("1gbit,10mbit", "3ms", world_size=2)
    assert mixed.links == (Link(125_000_000.0, 0.003), Link(1_250_000.0, 0.003))
    assert "rank 1: 10mbit, 3 ms" in mixed.describe()


def test_network_parse_none_is_not_emulated() -> None:
    net = Network.parse("none", "none", world_size=2)
    assert net.links == (Link(None, 0.0), Link(None, 0.0))
    assert not net.emulated
    assert net.describe() == "not emulated"
    # latency alone is emulation
    assert Network.parse("none", "1ms", world_size=2).emulated


@pytest.mark.parametrize(
    ("bandwidth", "latency", "world_size", "flag", "count"),
    [
        ("1gbit,10mbit,10mbit", "1ms", 2, "--bandwidth", 3),
        ("1gbit", "1ms,2ms", 4, "--latency", 2),
        ("1gbit,1gbit", "1ms", 1, "--bandwidth", 2),
    ],
)
def test_network_parse_length_mismatch(bandwidth: str, latency: str, world_size: int, flag: str, count: int) -> None:
    with pytest.raises(ValueError) as info:
        Network.parse(bandwidth, latency, world_size)
    message = str(info.value)
    assert "\n" not in message
    assert flag in message
    assert f"{count} values for {world_size} workers" in message
    assert "one per worker" in message


def test_network_parse_reports_bad_unit_in_a_list() -> None:
    with pytest.raises(ValueError, match="cannot read bandwidth '10mbps'"):
        Network.parse("1gbit,10mbps", "1ms", world_size=2)


def test_network_needs_a_link() -> None:
    with pytest.raises(ValueError):
        Network(())


def test_bottleneck_min_bandwidth_max_latency() -> None:
    net = Network.parse("100mbit,1gbit,10mbit,1gbit", "5ms,1ms,2ms,20ms", world_size=4)
    everyone = net.bottleneck()
    assert everyone == Link(1_250_000.0, 0.02)  # bandwidth of rank 2, latency of rank 3
    assert net.bottleneck([0, 1]) == Link(12_500_000.0, 0.005)
    assert net.bottleneck([1, 3]) == Link(125_000_000.0, 0.02)
    assert net.bottleneck([1]) == net.links[1]


def test_bottleneck_ignores_unlimited_links() -> None:
    net = Network.parse("none,10mbit,none", "0,0,4ms", world_size=3)
    assert net.bottleneck() == Link(1_250_000.0, 0.004)
    assert net.bottleneck([0, 2]) == Link(None, 0.004)
    assert Network.uniform(2, None).bottleneck() == Link(None, 0.0)
