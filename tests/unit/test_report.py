"""``docker-mirror report`` over canned ``journalctl -o json`` output: a stub journalctl first
on PATH prints a known sequence of request entries (and lines the report must skip), and
records the arguments it was given."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from dockermirror import cli
from dockermirror import report as report_module

START = 1_764_700_000_000_000       # microseconds since the epoch


def entry(n: int, method: str, kind: str, status: int, cache: str | None, sent: int, ms: float,
          upstream: str | None = None, repository: str | None = None, reference: str | None = None) -> dict:
    fields = {"METHOD": method, "KIND": kind, "STATUS": str(status), "BYTES": str(sent), "DURATION_MS": f"{ms:.1f}",
              "CLIENT": "192.0.2.7", "CACHE": cache, "UPSTREAM": upstream, "REPOSITORY": repository,
              "REFERENCE": reference}
    return {"__REALTIME_TIMESTAMP": str(START + n * 1_000_000), "_SYSTEMD_UNIT": "docker-mirror.service",
            "PRIORITY": "6", "SYSLOG_IDENTIFIER": "docker-mirror", "DOCKER_MIRROR_COMPONENT": "access",
            "MESSAGE": f"access: request {n}",
            **{f"DOCKER_MIRROR_{k}": v for k, v in fields.items() if v is not None}}


BUSYBOX = ("docker.io", "library/busybox")
APP = ("ghcr.io", "org/app")
SEQUENCE = [
    # a cold pull of busybox, then a warm one (and a HEAD, which is no pull)
    entry(1, "GET", "manifest", 200, "MISS", 500, 20, *BUSYBOX, "latest"),
    entry(2, "GET", "blob", 200, "MISS", 1000, 300, *BUSYBOX, "sha256:" + "1" * 64),
    entry(3, "GET", "blob", 200, "MISS", 2000, 100, *BUSYBOX, "sha256:" + "2" * 64),
    entry(4, "GET", "manifest", 200, "HIT", 500, 2, *BUSYBOX, "latest"),
    entry(5, "GET", "blob", 200, "HIT", 1000, 5, *BUSYBOX, "sha256:" + "1" * 64),
    entry(6, "GET", "blob", 200, "HIT", 2000, 4, *BUSYBOX, "sha256:" + "2" * 64),
    entry(7, "HEAD", "manifest", 200, "HIT", 0, 1.5, *BUSYBOX, "latest"),
    # another upstream: a pull, a stale tag, a blob read while another client downloaded it, a pass-through
    entry(8, "GET", "manifest", 200, "MISS", 700, 50, *APP, "1.0"),
    entry(9, "GET", "manifest", 200, "STALE", 700, 10, *APP, "1.0"),
    entry(10, "GET", "blob", 200, "COALESCED", 4000, 250, *APP, "sha256:" + "3" * 64),
    entry(11, "GET", "blob", 200, "PASS", 9000, 900, *APP, "sha256:" + "4" * 64),
    # no cache result: the version check, a manifest the upstream does not have
    entry(12, "GET", "other", 200, None, 2, 1),
    entry(13, "GET", "manifest", 404, None, 150, 30, "docker.io", "library/nope", "latest"),
]
NOISE = [
    '{"MESSAGE": "mirror: started", "PRIORITY": "6", "__REALTIME_TIMESTAMP": "1764700000000000"}',
    "not json at all",
    "[1, 2, 3]",
    json.dumps({**entry(14, "GET", "blob", 200, "HIT", 10**9, 99999, *BUSYBOX), "PAD": "x" * (2 * 1024 * 1024)}),
    json.dumps({**entry(15, "GET", "blob", 200, "HIT", 1, 1, *BUSYBOX), "DOCKER_MIRROR_STATUS": [50, 48, 48]}),
    "",
]


@pytest.fixture
def journalctl(tmp_path: Path, monkeypatch):
    """A stub journalctl on PATH: prints ``output`` (lines), ``stderr``, exits ``code``; argv -> args.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    class Stub:
        args_file = tmp_path / "args.txt"

        def set(self, lines: list[str], stderr: str = "", code: int = 0) -> None:
            (tmp_path / "out.json").write_text("".join(line + "\n" for line in lines))
            (tmp_path / "err.txt").write_text(stderr)
            script = bin_dir / "journalctl"
            script.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {self.args_file}\n'
                              f"cat {tmp_path / 'out.json'}\ncat {tmp_path / 'err.txt'} >&2\nexit {code}\n")
            script.chmod(script.stat().st_mode | stat.S_IXUSR)

        @property
        def args(self) -> list[str]:
            return self.args_file.read_text().splitlines()

    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    stub = Stub()
    stub.set([])
    return stub


def lines_of(entries: list[dict]) -> list[str]:
    return [json.dumps(e) for e in entries]


def test_json_report_of_a_known_sequence(journalctl, capsys):
    journalctl.set(NOISE[:3] + lines_of(SEQUENCE[:7]) + NOISE[3:] + lines_of(SEQUENCE[7:]))
    assert cli.main(["report", "--since", "1h", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert journalctl.args == ["--unit=docker-mirror", "--output=json", "--no-pager", "--quiet", "--since=-3600s"]
    assert report["requests"] == 13
    assert report["status_classes"] == {"2xx": 12, "4xx": 1}
    assert report["cache"] == {"HIT": 4, "STALE": 1, "COALESCED": 1, "MISS": 4, "PASS": 1, "none": 2}
    assert report["hit_ratio"] == 4 / 11
    assert report["bytes"] == {"from_cache": 500 + 1000 + 2000 + 700 + 4000,
                               "from_upstream": 500 + 1000 + 2000 + 700 + 9000, "other": 152}
    assert report["upstreams"] == [
        {"upstream": "docker.io", "requests": 8, "pulls_spent": 1, "pulls_saved": 1, "bytes_from_cache": 3500,
         "bytes_from_upstream": 3500},
        {"upstream": "ghcr.io", "requests": 4, "pulls_spent": 1, "pulls_saved": 1, "bytes_from_cache": 4700,
         "bytes_from_upstream": 9700},
    ]
    assert report["most_pulled"] == [
        {"upstream": "ghcr.io", "repository": "org/app", "pulls": 2, "requests": 4, "bytes": 14400},
        {"upstream": "docker.io", "repository": "library/busybox", "pulls": 2, "requests": 7, "bytes": 7000},
    ]
    # library/nope got a 404: refused or unknown names fill no repository table
    assert [(r["repository"], r["max_ms"]) for r in report["slowest_repositories"]] == [
        ("org/app", 900.0), ("library/busybox", 300.0)]
    slowest = report["slowest_requests"]
    assert [r["duration_ms"] for r in slowest] == [900.0, 300.0, 250.0, 100.0, 50.0, 30.0, 20.0, 10.0, 5.0, 4.0]
    assert slowest[0] | {"time": None} == {"time": None, "method": "GET", "kind": "blob", "upstream": "ghcr.io",
                                           "repository": "org/app", "reference": "sha256:" + "4" * 64,
                                           "status": 200, "cache": "PASS", "bytes": 9000, "duration_ms": 900.0}


def test_a_flood_of_unknown_names_does_not_push_real_repositories_out(journalctl, capsys, monkeypatch):
    monkeypatch.setattr(report_module, "KEYS_MAX", 5)
    junk = [{**SEQUENCE[0], "DOCKER_MIRROR_REPOSITORY": f"junk/n{i}", "DOCKER_MIRROR_STATUS": "404",
             "DOCKER_MIRROR_CACHE": None} for i in range(50)]
    journalctl.set(lines_of([{k: v for k, v in e.items() if v is not None} for e in junk]) + lines_of(SEQUENCE))
    assert cli.main(["report", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {r["repository"] for r in report["most_pulled"]} == {"org/app", "library/busybox"}
    assert "(others)" not in {r["repository"] for r in report["slowest_repositories"]}


def test_text_report_says_the_figures_and_the_definition(journalctl, capsys):
    journalctl.set(lines_of(SEQUENCE))
    assert cli.main(["report"]) == 0
    out = capsys.readouterr().out
    assert journalctl.args[-1] == "--since=-86400s"          # default: the last 24 hours
    assert "requests: 13 (2xx 12, 4xx 1)" in out
    assert ("hit ratio: 36.4% (4 of 11 requests the cache answered were HITs; "
            "HIT 4, STALE 1, COALESCED 1, MISS 4, PASS 1)") in out
    assert "bytes sent: 8.0 KiB from the cache, 12.9 KiB fetched from upstreams (MISS, PASS), 152 B other" in out
    rows = {line.split()[0]: line.split()[1:4] for line in out.splitlines() if line.startswith(("docker.io", "ghcr"))}
    assert rows == {"docker.io": ["8", "1", "1"], "ghcr.io": ["4", "1", "1"]}
    assert "2 pulls       4 requests    14.1 KiB  ghcr.io/org/app" in out
    assert "900.0 ms  GET blob 200 PASS 8.8 KiB  ghcr.io/org/app@sha256:4444" in out


def test_since_is_one_argument_and_checked(journalctl, capsys):
    assert cli.main(["report", "--since", "2026-12-01 10:00", "--unit", "mirror2"]) == 0
    assert journalctl.args == ["--unit=mirror2", "--output=json", "--no-pager", "--quiet", "--since=2026-12-01 10:00"]
    assert "no request entries in the journal of mirror2" in capsys.readouterr().out
    for bad in ("1h; rm -rf /", "$(id)", "x" * 100, "", "today\n"):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["report", "--since", bad])
        assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["report", "--unit", "--output=cat"])


@pytest.mark.parametrize("since", ["99999999999d", "36501d", "5300w", "1e400h", "-1e400h", "+1e400h", "1e10d",
                                   "-99999999999d"])
def test_since_beyond_100_years_is_one_line_naming_since(journalctl, capsys, since):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", f"--since={since}"])
    assert exit_.value.code == 2
    _, err = capsys.readouterr()
    assert err == (f"docker-mirror: --since: {since!r} is too long; give at most 100 years (36500d); "
                   "see docker-mirror report --help\n")
    assert not journalctl.args_file.exists()      # journalctl never ran


@pytest.mark.parametrize("since", ["@99999999999999999999", "@1e30", "@-5", "@nan", "@NaN", "@inf", "@-inf",
                                   "@1e400", "@-0.5", "@9999999999"])
def test_since_an_epoch_beyond_the_range_is_one_line_naming_since(journalctl, capsys, since):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", f"--since={since}"])
    assert exit_.value.code == 2
    _, err = capsys.readouterr()
    assert err == (f"docker-mirror: --since: {since!r} is out of range; give a time from @0 (1970) to at most "
                   "100 years from now; see docker-mirror report --help\n")
    assert not journalctl.args_file.exists()      # journalctl never ran


@pytest.mark.parametrize("since", ["@", "@1_000", "@0x10", "@ 5", "@1h"])
def test_since_an_epoch_that_is_no_number_is_one_line_naming_since(journalctl, capsys, since):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", f"--since={since}"])
    assert exit_.value.code == 2
    _, err = capsys.readouterr()
    assert err.startswith(f"docker-mirror: --since: invalid time {since!r}") and err.count("\n") == 1, err
    assert not journalctl.args_file.exists()


@pytest.mark.parametrize("since, argument", [("@0", "--since=@0"), ("@1764600000", "--since=@1764600000"),
                                             ("@1.7646e9", "--since=@1764600000"),
                                             ("@1764600000.25", "--since=@1764600000.25"),
                                             ("@+5", "--since=@5"), ("@-0", "--since=@0"),
                                             ("@5.0000001", "--since=@5"), ("@1e-7", "--since=@0")])
def test_since_an_epoch_journalctl_takes(journalctl, capsys, since, argument):
    assert cli.main(["report", f"--since={since}"]) == 0
    assert journalctl.args[-1] == argument


@pytest.mark.parametrize("since, argument", [("36500d", "--since=@0"), ("1.5h", "--since=-5400s"),
                                             ("-2h", "--since=-7200s"), (".5m", "--since=-30s"),
                                             ("+2h", "--since=+2h"), ("1000d", "--since=-86400000s")])
def test_since_a_duration_journalctl_takes(journalctl, capsys, since, argument):
    """A duration that reaches before 1970 is the epoch: journalctl refuses an earlier time."""
    assert cli.main(["report", f"--since={since}"]) == 0
    assert journalctl.args[-1] == argument


def test_journalctl_errors_are_one_line_and_fail(journalctl, capsys, monkeypatch, tmp_path):
    journalctl.set([], stderr="Failed to parse timestamp: tomorrow-ish\n", code=1)
    assert cli.main(["report", "--since", "tomorrow"]) == 1
    assert capsys.readouterr().err == "docker-mirror: report: journalctl exited 1: Failed to parse timestamp: " \
                                      "tomorrow-ish\n"
    journalctl.set([], stderr="Hint: You are currently not seeing messages from other users and the system.\n")
    assert cli.main(["report"]) == 1
    assert "cannot read the system journal: run as root or as a member of the systemd-journal" in \
        capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert cli.main(["report"]) == 1
    assert capsys.readouterr().err == "docker-mirror: report: journalctl not found: the report reads the systemd " \
                                      "journal\n"
