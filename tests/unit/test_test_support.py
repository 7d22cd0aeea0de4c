"""The suite's own machinery that keeps a run safe on someone else's machine: the check
that system files were left alone, and the wait for another package manager's lock."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

from tests.support import hostguard
from tests.support.procs import wait_until

REPO = Path(__file__).resolve().parents[2]


def test_snapshot_sees_content_mode_links_creations_and_removals(tmp_path: Path):
    top = tmp_path / "etc"
    (top / "sub").mkdir(parents=True)
    (top / "hosts").write_text("127.0.0.1 localhost\n")
    (top / "sub" / "keep").write_text("same")
    (top / "gone").write_text("x")
    (top / "link").symlink_to("hosts")
    watched = (str(top), str(tmp_path / "absent"))
    before = hostguard.snapshot(watched)
    assert hostguard.changes(before, hostguard.snapshot(watched)) == []

    (top / "hosts").write_text("")                       # emptied, as the old hosts pinning did
    (top / "gone").unlink()
    (top / "new").write_text("y")
    (top / "sub" / "keep").chmod(0o600)
    (top / "link").unlink()
    (top / "link").symlink_to("new")
    (tmp_path / "absent").mkdir()
    assert hostguard.changes(before, hostguard.snapshot(watched)) == [
        f"created: {tmp_path / 'absent'}",
        f"removed: {top / 'gone'}",
        f"changed: {top / 'hosts'} (content)",
        f"changed: {top / 'link'} (link hosts -> new)",
        f"created: {top / 'new'}",
        f"changed: {top / 'sub' / 'keep'} (mode 0644 -> 0600)",
    ]


def test_leftovers_finds_only_processes_with_this_runs_mark(tmp_path: Path):
    marked = subprocess.Popen(["sleep", "60"], env={**os.environ, hostguard.MARK: "run-a"})
    other = subprocess.Popen(["sleep", "60"], env={**os.environ, hostguard.MARK: "run-b"})
    try:
        # until exec has happened, /proc shows the forked copy of this process
        found = wait_until(lambda: (f := hostguard.leftovers("run-a", exclude={os.getpid()})).get(marked.pid)
                           == "sleep 60" and f, 10, what="sleep to start")
        assert marked.pid in found and other.pid not in found
        assert found[marked.pid] == "sleep 60"
        hostguard.stop({marked.pid: "sleep 60"}, grace=5)
        assert marked.wait(5) is not None
    finally:
        for proc in (marked, other):
            proc.kill()
            proc.wait()


def fake_apt(tmp_path: Path, locked_times: int) -> dict[str, str]:
    """apt-get that reports a held lock ``locked_times`` times, then succeeds; dpkg-query
    that knows no package. Both log their calls."""
    log = tmp_path / "calls"
    count = tmp_path / "count"
    count.write_text("0")
    apt = tmp_path / "apt-get"
    apt.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "apt-get $*" >> {log}
        n=$(cat {count}); echo $((n + 1)) > {count}
        if [ "$n" -lt {locked_times} ]; then
            echo "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (unattended-upgr)" >&2
            exit 100
        fi
        """))
    query = tmp_path / "dpkg-query"
    query.write_text("#!/bin/sh\nexit 1\n")
    apt.chmod(0o755)
    query.chmod(0o755)
    return {"APT_GET": str(apt), "DPKG_QUERY": str(query), "APT_LOCK_POLL": "0.1", "PATH": os.environ["PATH"]}


def test_apt_ensure_waits_for_another_package_manager(tmp_path: Path):
    env = fake_apt(tmp_path, locked_times=3)
    result = subprocess.run(["sh", str(REPO / "tests/apt-ensure.sh"), "pkg-a", "pkg-b"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "another package manager holds the lock (held by process 4242 (unattended-upgr)); waiting" \
        in result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[-1] == "apt-get -o DPkg::Lock::Timeout=0.1 install -y -q --no-install-recommends pkg-a pkg-b"
    assert sum("update" in call for call in calls) == 4          # 3 refused, then done


def test_apt_ensure_gives_up_after_its_deadline_and_fails_at_once_on_other_errors(tmp_path: Path):
    env = {**fake_apt(tmp_path, locked_times=10**6), "APT_LOCK_WAIT": "1"}
    result = subprocess.run(["sh", str(REPO / "tests/apt-ensure.sh"), "pkg"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 100
    assert "gave up waiting for the apt/dpkg lock" in result.stderr

    broken = tmp_path / "broken"
    broken.mkdir()
    env = fake_apt(broken, locked_times=0)
    Path(env["APT_GET"]).write_text("#!/bin/sh\necho 'E: Unable to locate package pkg' >&2\nexit 100\n")
    result = subprocess.run(["sh", str(REPO / "tests/apt-ensure.sh"), "pkg"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 100 and "Unable to locate package" in result.stderr
    assert "waiting" not in result.stderr
