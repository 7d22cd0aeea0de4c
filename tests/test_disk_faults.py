"""The cache's filesystem and index misbehave under a real server: a full filesystem, a
read-only one, index.sqlite deleted (while the server runs, and while it is stopped).

Each test mounts its own small tmpfs and unmounts it in a finally."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx

from tests.cachetools import cache_cli, tmpfs
from tests.conftest import ALL_MANIFESTS, Upstream
from tests.support.procs import wait_until
from tests.test_daemon import notify  # noqa: F401 (a fixture these tests use)

ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]


def rows(cache_dir: Path, immutable: bool = False) -> dict[str, tuple[int, str]]:
    """The index's content rows (``immutable``: on a read-only filesystem, with no server running)."""
    db = sqlite3.connect(f"file:{cache_dir / 'index.sqlite'}?mode=ro{'&immutable=1' if immutable else ''}", uri=True)
    try:
        return {d: (s, k) for d, s, k in db.execute("SELECT digest, size, kind FROM content")}
    finally:
        db.close()


def files(cache_dir: Path) -> dict[str, int]:
    return {f"{p.parent.parent.name}:{p.name}": p.stat().st_size
            for p in (cache_dir / "blobs").rglob("*") if p.is_file()}


def pull(client: httpx.Client, repo: str, tag: str) -> dict[str, str]:
    """Manifest and every blob of an image; their digests -> how each was served."""
    manifest = client.get(f"/v2/{repo}/manifests/{tag}", headers=ACCEPT)
    assert manifest.status_code == 200, manifest.text
    document = json.loads(manifest.content)
    served = {manifest.headers["docker-content-digest"]: "manifest"}
    for digest in [document["config"]["digest"]] + [layer["digest"] for layer in document["layers"]]:
        blob = client.get(f"/v2/{repo}/blobs/{digest}")
        assert blob.status_code == 200, blob.text
        assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == digest
        served[digest] = "blob"
    return served


def fill(mountpoint: Path) -> Path:
    ballast = mountpoint / "ballast"
    subprocess.run(["dd", "if=/dev/zero", f"of={ballast}", "bs=64k"], capture_output=True)  # until ENOSPC
    for n in range(1000):   # and the last few blocks, by small files
        try:
            (mountpoint / f"crumb{n}").write_bytes(b"x" * 4096)
        except OSError:
            break
    return ballast


ACCESS = re.compile(r' access: \S+ "([^"]*)" .* cache=(\S+)')


def cache_results(mirror, since: int) -> list[str]:
    """"CACHE-RESULT METHOD PATH" of each access line logged after ``since``: whole lines only (the
    server may be writing the last one: it logs a request once its response has gone out)."""
    text = mirror.log_text()[since:]
    return [f"{found[2]} {found[1]}" for line in text[:text.rfind("\n") + 1].splitlines()
            if (found := ACCESS.search(line))]


def test_full_filesystem_serves_cached_passes_through_the_rest_and_restarts(make_mirror, fault_proxy, notify,
                                                                            upstream: Upstream):
    with tmpfs("40m", "dm-disk") as mountpoint:
        mirror = make_mirror(fault_proxy.url, start=False,
                             cache={"dir": str(mountpoint / "cache"), "max_size": "100%", "min_free": 0,
                                    "tag_ttl": "1s", "pin": ["library/hello"]})   # nothing to evict
        mirror.env = {**mirror.env, "NOTIFY_SOCKET": str(notify.path)}
        mirror.start()
        with mirror.client() as client:
            hello = pull(client, "library/hello", "latest")
        wait_until(lambda: set(hello) <= set(rows(mirror.cache_dir)), 10, what="hello indexed")
        fill(mountpoint)
        time.sleep(1.5)   # tag_ttl passes: the cached tag is revalidated, and its row rewritten
        with mirror.client() as client:
            assert pull(client, "library/hello", "latest") == hello          # cached tag, past tag_ttl
            tool = pull(client, "acme/tool", "1.0")                          # nothing of it cached
        assert all(" 500 " not in line for line in mirror.access_lines())
        assert not set(tool) & set(rows(mirror.cache_dir))
        assert set(files(mirror.cache_dir)) == set(rows(mirror.cache_dir))  # no file without a row

        # and it starts on the full filesystem: degraded, said in the log and in STATUS=
        mirror.restart()
        fault_proxy.seen.clear()
        with mirror.client() as client:
            assert pull(client, "library/hello", "latest") == hello
            assert pull(client, "acme/tool", "1.0") == tool
        fetched = {s.path.rsplit("/", 1)[-1] for s in fault_proxy.requests("GET")}
        assert not fetched & {d for d, kind in hello.items() if kind == "blob"}   # served from the cache
        assert "the cache cannot be written" in mirror.log_text()
        assert any("cache DEGRADED" in message for _, message in notify.messages if "STATUS=" in message)
        assert all(" 500 " not in line for line in mirror.access_lines())
        assert set(files(mirror.cache_dir)) == set(rows(mirror.cache_dir))

        # room again: caching resumes without a restart
        for path in mountpoint.iterdir():
            if path.is_file():
                path.unlink()
        wait_until(lambda: "the cache can be written again" in mirror.log_text(), 60, what="caching to resume")
        with mirror.client() as client:
            assert pull(client, "acme/tool", "1.0") == tool
        wait_until(lambda: set(tool) <= set(rows(mirror.cache_dir)), 10, what="tool cached")
        assert set(files(mirror.cache_dir)) == set(rows(mirror.cache_dir))
        mirror.stop()


def test_read_only_filesystem_serves_cached_passes_through_the_rest_and_starts(make_mirror, upstream: Upstream):
    """(Linux refuses to remount a filesystem read-only while files on it are open for writing,
    so the server starts on it: after an admin's remount, or the kernel's errors=remount-ro.)"""
    with tmpfs("40m", "dm-disk") as mountpoint:
        try:
            mirror = make_mirror(cache={"dir": str(mountpoint / "cache"), "max_size": "100%", "min_free": 0,
                                        "tag_ttl": "1s"})
            with mirror.client() as client:
                hello = pull(client, "library/hello", "latest")
            wait_until(lambda: set(hello) <= set(rows(mirror.cache_dir)), 10, what="hello indexed")
            mirror.stop()
            subprocess.run(["mount", "-o", "remount,ro", str(mountpoint)], check=True)
            mirror.start()
            assert "the cache cannot be written" in mirror.log_text()
            since = len(mirror.log_text())
            with mirror.client() as client:
                assert pull(client, "library/hello", "latest") == hello
                pull(client, "acme/tool", "1.0")
                time.sleep(1.5)   # tag_ttl passes: revalidated, the row cannot be written
                assert pull(client, "library/hello", "latest") == hello
            results = cache_results(mirror, since)
            assert all(r.startswith("HIT ") for r in results if "/library/hello/blobs/" in r), results
            assert any(r.startswith("PASS ") for r in results if "/acme/tool/blobs/" in r), results
            assert all(" 500 " not in line for line in mirror.access_lines())
            mirror.stop()
            assert rows(mirror.cache_dir, immutable=True).keys() == hello.keys()
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(mountpoint)], check=False)


def test_index_deleted_while_running_and_while_stopped(make_mirror, fault_proxy, upstream: Upstream):
    mirror = make_mirror(fault_proxy.url)
    with mirror.client() as client:
        hello = pull(client, "library/hello", "latest")
        tool = pull(client, "acme/tool", "1.0")
    content = set(hello) | set(tool)
    wait_until(lambda: content <= set(rows(mirror.cache_dir)), 10, what="everything indexed")
    before = rows(mirror.cache_dir)
    index = mirror.cache_dir / "index.sqlite"

    # deleted under the running server: it writes the index out again from the open database
    index.unlink()
    wait_until(lambda: "written again" in mirror.log_text(), 15, what="the server to notice")
    assert "was deleted while the server runs" in mirror.log_text()
    mirror.restart()
    assert rows(mirror.cache_dir) == before
    assert "checking the cache" not in mirror.log_text()

    # deleted while stopped: the next start adopts every file that hashes to its name
    mirror.stop()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    mirror.start()
    assert "is new or empty" in mirror.log_text()
    assert rows(mirror.cache_dir) == before                         # kinds too: manifests are manifests
    stats = json.loads(cache_cli(mirror, "stats", "--json").stdout)
    assert stats["entries"] == len(before) and stats["bytes"] == sum(files(mirror.cache_dir).values())
    fault_proxy.seen.clear()
    with mirror.client() as client:
        assert pull(client, "library/hello", "latest") == hello
        assert pull(client, "acme/tool", "1.0") == tool
    gets = [s.path for s in fault_proxy.requests("GET")]
    assert not [p for p in gets if p.rsplit("/", 1)[-1] in content], gets    # nothing fetched again
    pruned = cache_cli(mirror, "prune", "--to-size", "0")
    assert pruned.returncode == 0, pruned.stderr
    assert files(mirror.cache_dir) == {} and rows(mirror.cache_dir) == {}
