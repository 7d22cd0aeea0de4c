"""``serve`` raises the soft open-file limit to the hard one (as Go and nginx's worker_rlimit_nofile
do), and says in one line when even that is below what server.max_connections may need. A real
``serve`` process, started with its own low limits (not the host's)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.procs import Mirror

SOFT, HARD = 64, 512


def limits_of(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc/PID/limits")


def serve_with_low_limits(tmp_path: Path, max_connections: int) -> tuple[tuple[int, int], list[str]]:
    if shutil.which("prlimit") is None:
        pytest.fail("prlimit (util-linux) is needed to start serve with its own limits")
    mirror = Mirror(tmp_path, {"upstream": {"url": "http://127.0.0.1:9"},
                               "server": {"max_connections": max_connections}})
    mirror.argv = ["prlimit", f"--nofile={SOFT}:{HARD}", "--", *mirror.argv]
    mirror.start()
    try:
        limits = limits_of(mirror.pid)
    finally:
        mirror.stop()
    return limits, [line for line in mirror.log_text().splitlines() if "open-file limit" in line]


def test_the_soft_limit_is_raised_and_a_limit_below_max_connections_is_said_once(tmp_path: Path) -> None:
    limits, lines = serve_with_low_limits(tmp_path, 10000)
    assert limits == (HARD, HARD)
    assert len(lines) == 1, lines
    assert "open-file limit 512 is below server.max_connections: 10000 + 256; connections beyond about 256 " in lines[0]
    assert "WARNING" in lines[0] or "warning" in lines[0].lower()


def test_enough_for_max_connections_says_nothing(tmp_path: Path) -> None:
    limits, lines = serve_with_low_limits(tmp_path, 250)     # 250 + 256 = 506 descriptors
    assert limits == (HARD, HARD) and lines == []
