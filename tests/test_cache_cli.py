"""docker-mirror cache stats | prune | verify | rm, run while the server serves."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import httpx
import pytest

from tests.cachetools import ACCEPT, cache_cli, pull
from tests.conftest import Upstream
from tests.support.procs import Mirror, wait_until


@pytest.fixture
def warm(mirror, upstream: Upstream):
    with mirror.client() as client:
        pulled = pull(client, "library/hello") + pull(client, "acme/tool", "1.0")
        assert client.get("/v2/library/hello/manifests/latest", headers=ACCEPT).status_code == 200
    # a response ends when the client has the bytes; the commit to the index follows
    wait_until(lambda: set(pulled) <= set(rows(mirror)), 10, what="every pulled digest indexed")
    return mirror


def rows(mirror) -> dict[str, int]:
    db = sqlite3.connect(mirror.cache_dir / "index.sqlite")
    try:
        return dict(db.execute("SELECT digest, size FROM content"))
    finally:
        db.close()


def test_stats(warm, upstream: Upstream):
    def flushed() -> dict | None:
        result = cache_cli(warm, "stats", "--json")
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        return data if data["requests"].get("hit", 0) >= 1 else None

    data = wait_until(flushed, 30, interval=0.3, what="the server's access counters flushed to the index")
    content = rows(warm)
    assert data["entries"] == len(content) == data["blobs"]["entries"] + data["manifests"]["entries"]
    assert data["bytes"] == sum(content.values())
    on_disk = sum(p.stat().st_size for p in (warm.cache_dir / "blobs").rglob("*") if p.is_file())
    assert data["bytes"] == on_disk
    assert data["tags"] == 2
    assert data["requests"]["hit"] == 1 and data["requests"]["miss"] >= 6
    assert data["bytes_fetched_upstream"] == on_disk
    assert 0 < data["hit_ratio"] < 1
    human = cache_cli(warm, "stats")
    assert "hit ratio:" in human.stdout and "size:" in human.stdout


def test_prune_dry_run_then_for_real(warm):
    before = rows(warm)
    dry = cache_cli(warm, "prune", "--older-than", "0s", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {len(before)} entries" in dry.stdout
    assert rows(warm) == before
    largest = max(before.values())
    sized = cache_cli(warm, "prune", "--to-size", str(largest))
    assert sized.returncode == 0
    assert sum(rows(warm).values()) <= largest
    assert cache_cli(warm, "prune", "--older-than", "0s").returncode == 0
    assert rows(warm) == {}
    assert not any(p.is_file() for p in (warm.cache_dir / "blobs").rglob("*"))
    with warm.client() as client:  # and the server simply fetches again
        pull(client, "library/hello")


def test_verify_finds_and_repairs_corruption(warm, upstream: Upstream):
    layer = upstream.seeded["tool"].image.layers["amd64"][0]
    assert cache_cli(warm, "verify").returncode == 0
    path = warm.blob_file(layer)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    found = cache_cli(warm, "verify")
    assert found.returncode == 1
    assert f"{layer}: corrupt" in found.stdout
    assert "1 corrupt" in found.stdout
    repaired = cache_cli(warm, "verify", "--repair")
    assert repaired.returncode == 1 and "1 removed" in repaired.stdout
    assert layer not in rows(warm) and not path.exists()
    assert cache_cli(warm, "verify").returncode == 0
    good = httpx.get(f"{warm.url}/v2/acme/tool/blobs/{layer}")
    assert good.content == upstream.blob(layer)


def test_verify_repair_adopts_or_removes_files_without_a_row(warm, upstream: Upstream):
    layer = upstream.seeded["tool"].image.layers["amd64"][0]
    db = sqlite3.connect(warm.cache_dir / "index.sqlite")
    db.execute("DELETE FROM content WHERE digest = ?", (layer,))   # a file the index lost
    db.commit()
    db.close()
    liar = warm.cache_dir / "blobs" / "sha256" / "ab" / ("ab" + "0" * 62)
    liar.parent.mkdir(parents=True, exist_ok=True)
    liar.write_bytes(b"not what its name says")
    found = cache_cli(warm, "verify")
    assert "file without an index entry" in found.stdout and liar.exists()
    repaired = cache_cli(warm, "verify", "--repair")
    assert f"{layer}: file without an index entry, matches its digest: adopted" in repaired.stdout
    assert "that does not match its name: removed" in repaired.stdout
    assert layer in rows(warm) and not liar.exists()
    clean = cache_cli(warm, "verify")
    assert clean.returncode == 0 and "file without an index entry" not in clean.stdout


def test_rm_digest_tag_and_repository(warm, upstream: Upstream):
    hello = upstream.seeded["hello"]
    tag_rm = cache_cli(warm, "rm", "hello:latest")
    assert tag_rm.returncode == 0 and "forgot library/hello:latest" in tag_rm.stdout
    assert hello.digest in rows(warm)                      # content stays; only the tag is forgotten
    digest_rm = cache_cli(warm, "rm", hello.digest)
    assert digest_rm.returncode == 0 and hello.digest not in rows(warm)
    repo_rm = cache_cli(warm, "rm", "acme/tool")
    assert repo_rm.returncode == 0, repo_rm.stderr
    assert not set(upstream.seeded["tool"].image.blob_paths) & set(rows(warm))
    missing = cache_cli(warm, "rm", "acme/tool")
    assert missing.returncode == 1 and "acme/tool is not in the cache" in missing.stderr
    bad = cache_cli(warm, "rm", "Not A Name")
    assert bad.returncode == 2 and "neither a digest nor [REGISTRY/]REPOSITORY[:TAG]" in bad.stderr
    with warm.client() as client:
        pull(client, "acme/tool", "1.0")


@pytest.fixture
def two_upstreams(tmp_path, upstream: Upstream):
    """A mirror of two upstreams (both the test registry): docker.io, the default, and ghcr.io."""
    mirror = Mirror(tmp_path, {"upstreams": [{"registry": "docker.io", "url": upstream.url},
                                             {"registry": "ghcr.io", "url": upstream.url}]}, name="two")
    try:
        mirror.start()
        yield mirror
    finally:
        mirror.stop()


def test_stats_and_rm_per_upstream(two_upstreams, upstream: Upstream):
    mirror = two_upstreams
    with mirror.client() as client:
        hello = set(pull(client, "library/hello"))
        shared = set(pull(client, "ghcr.io/library/hello"))     # the same image through the other upstream
        tool = set(pull(client, "ghcr.io/acme/tool", "1.0"))
    assert shared == hello
    wait_until(lambda: hello | tool <= set(rows(mirror)), 10, what="every pulled digest indexed")

    def flushed() -> dict | None:
        result = cache_cli(mirror, "stats", "--json")
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        ups = data["upstreams"]
        return data if ups["docker.io"]["requests"] and ups["ghcr.io"]["requests"] else None

    data = wait_until(flushed, 30, interval=0.3, what="the server's access counters flushed to the index")
    content = rows(mirror)
    hub, ghcr = data["upstreams"]["docker.io"], data["upstreams"]["ghcr.io"]
    assert list(data["upstreams"]) == ["docker.io", "ghcr.io"] and hub["default"] and not ghcr["default"]
    assert (hub["entries"], hub["bytes"]) == (len(hello), sum(content[d] for d in hello))
    assert (ghcr["entries"], ghcr["bytes"]) == (len(hello | tool), sum(content[d] for d in hello | tool))
    assert hub["shared"] == ghcr["shared"] == {"entries": len(hello), "bytes": sum(content[d] for d in hello)}
    assert data["bytes"] == sum(content.values()) < hub["bytes"] + ghcr["bytes"]     # stored once
    assert (hub["tags"], ghcr["tags"], data["tags"]) == (1, 2, 3)
    assert hub["requests"].get("miss", 0) + ghcr["requests"].get("miss", 0) == data["requests"]["miss"]
    assert hub["bytes_fetched_upstream"] + ghcr["bytes_fetched_upstream"] == data["bytes_fetched_upstream"]
    human = cache_cli(mirror, "stats").stdout
    assert "  ghcr.io\n" in human and "  docker.io (default)\n" in human

    forgot = cache_cli(mirror, "rm", "ghcr.io/acme/tool:1.0")
    assert forgot.returncode == 0 and forgot.stdout.startswith("forgot ghcr.io/acme/tool:1.0 (was ")
    removed = cache_cli(mirror, "rm", "ghcr.io/library/hello")
    assert removed.returncode == 0, removed.stderr
    assert f"kept {len(hello)} entries other repositories use" in removed.stdout
    assert hello <= set(rows(mirror))                          # docker.io's library/hello uses them
    tool_rm = cache_cli(mirror, "rm", "ghcr.io/acme/tool")
    assert tool_rm.returncode == 0, tool_rm.stderr
    assert not tool & set(rows(mirror))
    unknown = cache_cli(mirror, "rm", "quay.io/acme/tool")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "quay.io is not a configured upstream" in unknown.stderr
    with mirror.client() as client:                            # and the server fetches again
        assert set(pull(client, "ghcr.io/acme/tool", "1.0")) == tool


@pytest.mark.parametrize("setup, message", [
    ("missing", "no cache at {dir}: the directory does not exist"),
    ("empty", "{dir} is not a docker-mirror cache: it has no index.sqlite"),
    ("foreign", "is an SQLite database of something else: not a docker-mirror cache"),
])
def test_cache_commands_refuse_what_is_not_a_cache(tmp_path, setup, message):
    directory = tmp_path / "cache"
    if setup != "missing":
        directory.mkdir()
    if setup == "foreign":
        sqlite3.connect(directory / "index.sqlite").execute("CREATE TABLE t (x)").connection.commit()
    for command in (["stats"], ["verify"], ["prune", "--dry-run"], ["rm", "library/x"]):
        result = subprocess.run([sys.executable, "-m", "dockermirror", "cache", *command, "--cache-dir",
                                 str(directory)], capture_output=True, text=True)
        assert result.returncode == (1 if setup == "foreign" else 2)   # 2: the user named the wrong directory
        assert message.format(dir=directory) in result.stderr and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr
    if setup == "empty":
        assert list(directory.iterdir()) == []   # nothing created
