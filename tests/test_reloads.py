"""Reloads against a real daemon: many of them during a download, and one while it starts."""

from __future__ import annotations

import signal
import time

import httpx
import yaml

from tests.conftest import ALL_MANIFESTS, Upstream
from tests.support.procs import background_download, wait_until
from tests.test_daemon import daemon, notify  # noqa: F401 - the notify fixture
from tests.test_hostile_clients import rss_kib

ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]


def test_reloads_that_change_the_upstream_during_a_download(make_mirror, fault_proxy, upstream: Upstream):
    """300 reloads, each with another upstream client (the username alternates), while one slow
    download goes on: memory stays flat and the download completes with the right bytes."""
    big = upstream.big_layer
    fault_proxy.slow = (f"/blobs/{big}", 0.02)               # ~3 MB/s: the download spans the reloads
    mirror = make_mirror(fault_proxy.url)
    downloading, result = background_download(f"{mirror.url}/v2/library/big/blobs/{big}")
    wait_until(lambda: fault_proxy.requests("GET", f"/blobs/{big}"), 30, what="the download started")
    with mirror.client() as client:     # a warm process before measuring
        assert client.get("/v2/library/hello/manifests/latest", headers=ACCEPT).status_code == 200
    config = yaml.safe_load(mirror.config_path.read_text())
    rss_before = rss_kib(mirror.pid)
    for n in range(300):
        config["upstream"]["username"] = "mirror" if n % 2 == 0 else None
        mirror.config_path.write_text(yaml.safe_dump(config))
        count = mirror.log_text().count("reloaded ")
        mirror.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: mirror.log_text().count("reloaded ") > count, 30, interval=0.01, what=f"reload {n}")
    assert downloading.is_alive(), "the download ended before the reloads did: slow it down more"
    with mirror.client() as client:     # the current client works
        assert client.get("/v2/acme/tool/manifests/1.0", headers=ACCEPT).status_code == 200
    time.sleep(1)                       # closing the replaced clients' connections is a task
    growth = rss_kib(mirror.pid) - rss_before
    assert growth < 20 * 1024, f"RSS grew by {growth} KiB over 300 reloads"
    downloading.join(180)
    assert result == {"status": 200, "digest": big}
    assert "Traceback" not in mirror.log_text()


def caught_signals(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


def test_sighup_while_starting_is_applied_once_ready(tmp_path, notify, upstream: Upstream):  # noqa: F811
    """A SIGHUP before the server is ready (here: before the cache is even opened) does not
    kill it: the reload is applied once it is ready, after READY=1."""
    mirror = daemon(tmp_path, notify, {}, upstream.url)
    mirror.start(wait=False)
    try:
        index = mirror.cache_dir / "index.sqlite"
        sighup = 1 << (signal.SIGHUP - 1)
        wait_until(lambda: caught_signals(mirror.pid) & sighup or index.exists() or not mirror.running(), 30,
                   interval=0.002, what="a SIGHUP handler")
        assert not index.exists(), "SIGHUP is only handled once the cache is open"
        mirror.proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1", count=2, timeout=60)
        assert mirror.running()
        states = [state for state in notify.states() if state != "WATCHDOG=1"]
        assert states[:3] == ["READY=1", "RELOADING=1", "READY=1"]
        assert "a reload was asked for while starting; reloading now" in mirror.log_text()
        assert httpx.get(f"{mirror.url}/v2/library/hello/manifests/latest", headers=ACCEPT).status_code == 200
    finally:
        mirror.stop()
    assert mirror.proc.returncode in (0, -signal.SIGTERM)


def test_a_restart_stays_pending_over_reloads_until_the_file_is_changed_back(make_mirror, upstream: Upstream):
    """listen changed: every reload says a restart is needed (compared with where the server
    listens, not with the previous file); changed back: it says no restart is needed any more."""
    mirror = make_mirror(upstream.url)
    running = yaml.safe_load(mirror.config_path.read_text())
    moved = {**running, "listen": "127.0.0.1:1"}

    def reload(config: dict) -> str:
        mirror.config_path.write_text(yaml.safe_dump(config))
        before = mirror.log_text()
        mirror.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: mirror.log_text().count("reloaded ") > before.count("reloaded "), 30, what="the reload")
        [line] = [line for line in mirror.log_text()[len(before):].splitlines() if "reloaded " in line]
        return line

    pending = (f"WARNING dockermirror: reloaded {mirror.config_path}; restart to apply: "
               f"listen (running {running['listen']}, configured 127.0.0.1:1)")
    assert reload(moved).endswith(pending)
    assert reload(moved).endswith(pending)              # the second reload has not forgotten
    assert reload(running).endswith(f"INFO dockermirror: reloaded {mirror.config_path}; no restart needed any "
                                    "more: the file is back to what the server runs with")
    assert reload(running).endswith(f"INFO dockermirror: reloaded {mirror.config_path}")
    with mirror.client() as client:                     # still serving where it listened from the start
        assert client.get("/v2/").status_code == 200
