"""bench/balancer.py's report: the tables, the ratios, wrk's median, the splice variant's
configuration and the markers it writes between (no processes: the measurement itself is
``python -m bench.balancer``, run by hand)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from bench import report
from bench.balancer import BEGIN, END, Series, hand_config, p50, ratios_table, render, values_table, with_splice
from bench.clients import BenchError, WrkResult

ROOT = Path(__file__).resolve().parents[2]

WRK_TEXT = """\
Running 5s test @ http://127.0.0.1:4000/v2/library/mid/blobs/sha256:ab
  2 threads and 32 connections
  Latency Distribution
     50%   14.60ms
     75%   20.10ms
     90%   30.00ms
     99%   71.00ms
  8000 requests in 5.00s, 7.81GB read
Requests/sec:   1600.00
"""


def sample() -> dict[str, Series]:
    def mode(rps: list[float], node: list[float], lb: list[float]) -> Series:
        s = Series()
        for r, n, b in zip(rps, node, lb, strict=True):
            for metric, value in (("req/s", r), ("MB/s", r * 1.048576), ("p50 ms", 20), ("p99 ms", 60),
                                  ("node CPU s/GB", n), ("haproxy CPU s/GB", b), ("total CPU s/GB", n + b),
                                  ("wrk CPU %", 30), ("others CPU %", 10)):
                s.add(metric, value)
        return s

    return {"direct": mode([1000, 2000, 1500], [0.5, 0.5, 0.5], [0, 0, 0]),
            "haproxy": mode([500, 1000, 1200], [0.5, 0.5, 0.5], [0.5, 0.25, 0.5]),
            "control": mode([1000, 2200, 1500], [0.5, 0.5, 0.5], [0, 0, 0])}


def test_p50_is_read_from_wrks_latency_distribution():
    result = WrkResult(8000, 1600.0, 0.071, 1.2, WRK_TEXT)
    assert p50(result) == pytest.approx(0.0146)
    with pytest.raises(BenchError, match="50%"):
        p50(WrkResult(1, 1.0, 0.1, 0.1, "Requests/sec: 1\n"))


def test_values_table_shows_haproxys_cpu_only_where_requests_went_through_it():
    lines = values_table(sample()).splitlines()
    assert lines[0].startswith("| mode | req/s | MB/s | p50 ms | p99 ms | docker-mirror CPU s/GB | HAProxy CPU s/GB")
    direct, haproxy, control = lines[2:]
    assert direct.startswith("| direct: ") and "| 1,500 (1,000..2,000) |" in direct
    assert direct.split(" | ")[6] == "-" and control.split(" | ")[6] == "-"
    assert haproxy.split(" | ")[6] == "0.5 (0.25..0.5)"      # median (min..max) over the rounds
    assert haproxy.split(" | ")[7] == "1 (0.75..1)"          # node + HAProxy


def test_ratios_are_per_round_against_direct_then_the_median():
    lines = ratios_table(sample()).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| haproxy / direct", "| control / direct"]
    haproxy = lines[2].split(" | ")
    assert haproxy[1] == "0.500 (0.500..0.800)"               # 500/1000, 1000/2000, 1200/1500
    assert haproxy[-1] == "2.000 (1.500..2.000) |"            # both CPU s/GB: 1/0.5, 0.75/0.5, 1/0.5
    assert lines[3].split(" | ")[1] == "1.000 (1.000..1.100)"


def test_render_names_the_run_and_its_load():
    text = render(sample(), date=datetime.datetime(2026, 12, 2, 23, 0, tzinfo=datetime.UTC), machine="a machine",
                  head="abc1234", command=".venv/bin/python -m bench.balancer --rounds 3", rounds=3, duration=5,
                  seconds=90, loads=[1.5, 2.25], config_source="`docker-mirror lb-config haproxy ...`",
                  haproxy_version="HAProxy version 2.6.12")
    assert text.startswith("Measured 2026-12-02 23:00 UTC on a machine; docker-mirror abc1234; HAProxy version 2.6.12.")
    assert "load average per round 1.50..2.25" in text
    assert "`wrk -t2 -c32 -d5s --latency`" in text
    assert "Through HAProxy / direct (median of the per-round ratios): req/s 0.500, p99 1.000" in text
    assert "control / direct): req/s 1.000" in text
    assert "HAProxy's own CPU 0.50 s/GB against the node's 0.50 s/GB direct" in text
    assert "splice" not in text


def test_the_splice_mode_gets_its_row_and_its_sentence():
    modes = sample()
    modes["haproxy-splice"] = modes.pop("control")
    text = render(modes, date=datetime.datetime(2026, 12, 2, 23, 0, tzinfo=datetime.UTC), machine="m", head="h",
                  command="c", rounds=3, duration=5, seconds=90, loads=[1.0], config_source="s",
                  haproxy_version="v")
    assert "| haproxy-splice: the same through HAProxy with option splice-response | 1,500 (1,000..2,200) |" in text
    assert "| haproxy-splice / direct | 1.000 (1.000..1.100) |" in text
    assert "with option splice-response: HAProxy 0.00 s/GB, req/s 1.000" in text


def test_the_splice_variant_adds_one_option_to_the_defaults_section():
    config = hand_config("127.0.0.1:8000", "127.0.0.1:5000")
    spliced = with_splice(config)
    assert spliced.replace("    option splice-response\n", "", 1) == config
    assert "\ndefaults\n    option splice-response\n" in spliced
    with pytest.raises(BenchError):
        with_splice("frontend x\n    bind 127.0.0.1:1\n")


def test_the_table_goes_between_its_markers_in_docs_performance(tmp_path):
    docs = ROOT / "docs" / "performance.md"
    original = docs.read_text()
    assert original.count(BEGIN) == 1 and original.count(END) == 1
    copy = tmp_path / "performance.md"
    copy.write_text(original)
    report.replace_readme(copy, "| the | table |", BEGIN, END)
    head, _, rest = copy.read_text().partition(BEGIN + "\n")
    assert rest.startswith("| the | table |\n" + END)
    assert head == original.partition(BEGIN)[0]
