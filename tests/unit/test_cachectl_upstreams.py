"""``docker-mirror cache stats`` and ``cache rm`` with several upstreams, on an index in a temp dir."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from dockermirror import cachectl, cli, config as configuration
from dockermirror.app import DockerMirror
from dockermirror.cache import INDEX_NAME
from dockermirror.cache.index import AccessBatch, Entry, Index, TagEntry
from dockermirror.cache.store import BlobStore
from dockermirror.oci import Digest
from tests.unit.fakes import UPSTREAM

CONFIG = """\
upstreams:
  - registry: docker.io
    url: http://127.0.0.1:9
  - registry: ghcr.io
    url: http://127.0.0.1:9
    aliases: [ghcr.example]
  - registry: registry.example.org:5000
    url: http://127.0.0.1:9
cache:
  dir: {dir}
"""


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Cache:
    """A cache directory with an index, filled by hand."""

    def __init__(self, root: Path, config: str = CONFIG) -> None:
        self.root = root / "cache"
        self.store = BlobStore(self.root)
        self.store.create_dirs()
        self.index = Index(self.root / INDEX_NAME)
        self.config_path = root / "config.yml"
        self.config_path.write_text(config.format(dir=self.root))

    def add(self, data: bytes, *users: tuple[str, str]) -> str:
        digest = digest_of(data)
        self.store.write_bytes(Digest.parse(digest), data)
        entry = Entry(digest, len(data), None, "blob", 1.0, 1.0)
        self.index.add_content(entry, *(users[0] if users else (None, None)))
        for upstream, repository in users[1:]:
            batch = AccessBatch()
            batch.touch(digest, 2.0, upstream, repository)
            self.index.apply(batch)
        return digest

    def tag(self, upstream: str, repository: str, tag: str, digest: str) -> None:
        self.index.put_tag(TagEntry(upstream, repository, tag, digest, None, 1, 1.0, 1.0))

    def count(self, counters: dict[str, int]) -> None:
        batch = AccessBatch()
        for name, value in counters.items():
            batch.count(name, value)
        self.index.apply(batch)

    def rows(self) -> set[str]:
        return set(self.index.sizes())

    def tags(self) -> set[tuple[str, str, str]]:
        return {tuple(row) for row in self.index._reader.execute("SELECT upstream, repository, tag FROM tags")}

    def refs(self) -> set[tuple[str, str, str]]:
        return {tuple(row) for row in self.index._reader.execute("SELECT upstream, repository, digest FROM refs")}


@pytest.fixture
def cache(tmp_path):
    cache = Cache(tmp_path)
    yield cache
    cache.index.close()


def command(cache: Cache, capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["cache", *args[:1], "--config", str(cache.config_path), *args[1:]])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def filled(cache):
    """docker.io and ghcr.io share a layer; old.example is an upstream no longer configured."""
    c = cache
    c.shared = c.add(b"s" * 1000, ("docker.io", "library/hello"), ("ghcr.io", "org/hello"))
    c.hub = c.add(b"h" * 100, ("docker.io", "library/hello"))
    c.ghcr = c.add(b"g" * 10, ("ghcr.io", "org/hello"))
    c.ghcr_app = c.add(b"a" * 20, ("ghcr.io", "org/app"))
    c.old = c.add(b"o" * 5, ("old.example", "team/tool"))
    c.orphan = c.add(b"x" * 7)           # adopted: no repository
    c.tag("docker.io", "library/hello", "latest", c.hub)
    c.tag("ghcr.io", "org/hello", "1", c.ghcr)
    c.tag("ghcr.io", "org/hello", "2", c.ghcr)
    c.tag("ghcr.io", "org/app", "1", c.ghcr_app)
    c.tag("old.example", "team/tool", "1", c.old)
    c.count({"requests_hit": 4, "requests_miss": 2, "bytes_served_hit": 4000, "bytes_fetched": 1135,
             "upstream/docker.io/requests_hit": 3, "upstream/docker.io/requests_miss": 1,
             "upstream/docker.io/bytes_served_hit": 3000, "upstream/docker.io/bytes_fetched": 1100,
             "upstream/ghcr.io/requests_hit": 1, "upstream/ghcr.io/requests_miss": 1,
             "upstream/ghcr.io/bytes_served_hit": 1000, "upstream/ghcr.io/bytes_fetched": 30})
    return c


def test_stats_per_upstream(filled, capsys):
    code, out, err = command(filled, capsys, "stats", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert (data["entries"], data["bytes"], data["tags"]) == (6, 1142, 5)        # the totals as before
    assert data["requests"] == {"hit": 4, "miss": 2} and data["bytes_fetched_upstream"] == 1135
    ups = data["upstreams"]
    assert list(ups) == ["docker.io", "ghcr.io", "registry.example.org:5000", "old.example"]
    hub, ghcr, private, old = ups.values()
    assert (hub["default"], hub["configured"], old["configured"]) == (True, True, False)
    assert (hub["entries"], hub["bytes"], hub["shared"]) == (2, 1100, {"entries": 1, "bytes": 1000})
    assert (ghcr["entries"], ghcr["bytes"], ghcr["shared"]) == (3, 1030, {"entries": 1, "bytes": 1000})
    assert (hub["tags"], ghcr["tags"], private["tags"], old["tags"]) == (1, 3, 0, 1)
    assert (private["entries"], private["bytes"], private["hit_ratio"]) == (0, 0, None)
    assert (old["entries"], old["bytes"]) == (1, 5)
    assert hub["requests"] == {"hit": 3, "miss": 1} and hub["hit_ratio"] == 0.75
    assert ghcr["requests"] == {"hit": 1, "miss": 1} and ghcr["hit_ratio"] == 0.5
    assert (hub["bytes_served_from_cache"], hub["bytes_fetched_upstream"]) == (3000, 1100)
    assert (ghcr["bytes_served_from_cache"], ghcr["bytes_fetched_upstream"]) == (1000, 30)
    assert data["no_upstream"] == {"entries": 1, "bytes": 7}

    code, text, err = command(filled, capsys, "stats")
    assert code == 0, err
    assert "content that several upstreams use is stored once and counted in each" in text
    lines = text.splitlines()
    at = lines.index("  ghcr.io")
    assert lines[at + 1] == ("    content:    3 entries (1.0 KiB); 1 of them (1000 B) also used by other upstreams;"
                             " 3 tags")
    assert lines[at + 2] == "    requests:   hit 1, miss 1; hit ratio 50.0%"
    assert "  docker.io (default)" in lines and "  old.example (not configured any more)" in lines


def test_stats_with_one_upstream_and_an_empty_index(tmp_path, capsys):
    cache = Cache(tmp_path, "cache:\n  dir: {dir}\n")
    try:
        code, out, err = command(cache, capsys, "stats", "--json")
        assert code == 0, err
        data = json.loads(out)
        assert list(data["upstreams"]) == ["docker.io"]
        assert data["upstreams"]["docker.io"]["requests"] == {}
        assert data["upstreams"]["docker.io"]["hit_ratio"] is None
        code, out, err = command(cache, capsys, "stats")
        assert code == 0, err
        assert "per upstream" not in out and out.splitlines()[-1].startswith("from upstream:")   # as before
    finally:
        cache.index.close()


def test_rm_tag_of_another_upstream(filled, capsys):
    code, out, err = command(filled, capsys, "rm", "ghcr.io/org/hello:1")
    assert (code, err) == (0, "")
    assert out == f"forgot ghcr.io/org/hello:1 (was {filled.ghcr}); the next pull asks the upstream\n"
    assert ("ghcr.io", "org/hello", "1") not in filled.tags() and ("ghcr.io", "org/hello", "2") in filled.tags()
    assert filled.ghcr in filled.rows()


def test_rm_by_alias_and_default_upstream(filled, capsys):
    code, out, err = command(filled, capsys, "rm", "ghcr.example/org/hello:2")   # an alias of ghcr.io
    assert code == 0, err
    assert out.startswith("forgot ghcr.io/org/hello:2")
    code, out, err = command(filled, capsys, "rm", "hello:latest")               # docker.io's library/hello
    assert code == 0, err
    assert out.startswith("forgot docker.io/library/hello:latest")
    assert filled.tags() == {("ghcr.io", "org/hello", "1"), ("ghcr.io", "org/app", "1"),
                             ("old.example", "team/tool", "1")}


def test_rm_repository_keeps_content_another_upstream_uses(filled, capsys):
    code, out, err = command(filled, capsys, "rm", "ghcr.io/org/hello")
    assert code == 0, err
    assert out == "removed ghcr.io/org/hello: 2 tag(s), 1 entries (10 B); kept 1 entries other repositories use\n"
    assert filled.ghcr not in filled.rows() and filled.shared in filled.rows()
    assert not filled.store.path(Digest.parse(filled.ghcr)).exists()
    assert filled.store.path(Digest.parse(filled.shared)).exists()
    assert ("docker.io", "library/hello", filled.shared) in filled.refs()
    assert not any(up == "ghcr.io" and repo == "org/hello" for up, repo, _ in filled.refs())


def test_rm_repository_of_a_removed_upstream(filled, capsys):
    """An upstream taken out of the configuration: its cache stays until expiry, or until removed."""
    code, out, err = command(filled, capsys, "rm", "old.example/team/tool")
    assert code == 0, err
    assert out.startswith("removed old.example/team/tool: 1 tag(s), 1 entries (5 B)")
    assert filled.old not in filled.rows()


def test_rm_with_a_registry_port(tmp_path, capsys):
    cache = Cache(tmp_path)
    try:
        layer = cache.add(b"p" * 3, ("registry.example.org:5000", "team/app"))
        cache.tag("registry.example.org:5000", "team/app", "v1", layer)
        code, out, err = command(cache, capsys, "rm", "registry.example.org:5000/team/app:v1")
        assert code == 0, err
        assert out.startswith("forgot registry.example.org:5000/team/app:v1")
        code, out, err = command(cache, capsys, "rm", "registry.example.org:5000/team/app")
        assert code == 0, err
        assert layer not in cache.rows()
    finally:
        cache.index.close()


@pytest.mark.parametrize("target, message", [
    ("quay.io/org/app", "quay.io is not a configured upstream (docker.io, ghcr.io, registry.example.org:5000) "
                        "and the cache holds nothing of it"),
    ("ghcr.io", "ghcr.io is a registry: name a repository in it, as in ghcr.io/<repository>"),
    ("ghcr.io/org/nothing", "ghcr.io/org/nothing is not in the cache"),
    ("ghcr.io/org/hello:9", "ghcr.io/org/hello:9 is not in the cache"),
    ("ghcr.io/Org/App", "'ghcr.io/Org/App' is neither a digest nor [REGISTRY/]REPOSITORY[:TAG]"),
    ("ghcr.io/org/app:bad tag", "'ghcr.io/org/app:bad tag' is neither a digest nor [REGISTRY/]REPOSITORY[:TAG]"),
    ("sha256:abc", "sha256:abc"),
])
def test_rm_errors_are_one_line(filled, capsys, target, message):
    """Not in the cache: could not (exit 1); no digest or reference at all: a mistake (exit 2, TARGET named)."""
    before = (filled.rows(), filled.tags())
    code, out, err = command(filled, capsys, "rm", target)
    mistake = "is not in the cache" not in message
    assert (code, out) == (2 if mistake else 1, "")
    assert err.startswith("docker-mirror: TARGET: " if mistake else "docker-mirror: ") and err.count("\n") == 1
    assert message in err
    assert not mistake or "; give a digest (sha256:...) or [REGISTRY/]REPOSITORY[:TAG]" in err
    assert (filled.rows(), filled.tags()) == before


def test_rm_digest_forgets_tags_of_every_upstream(filled, capsys):
    filled.tag("docker.io", "library/hello", "same", filled.shared)
    filled.tag("ghcr.io", "org/hello", "same", filled.shared)
    code, out, err = command(filled, capsys, "rm", filled.shared)
    assert code == 0, err
    assert "and 2 tag(s) pointing at it" in out
    assert filled.shared not in filled.rows()
    assert not any(tag == "same" for _, _, tag in filled.tags())


def test_open_cache_reads_the_configured_upstreams(cache):
    opened = cachectl.open_cache(configuration.load(cache.config_path))
    try:
        assert opened.upstream == "docker.io"
        assert opened.table.keys == ["docker.io", "ghcr.io", "registry.example.org:5000"]
    finally:
        opened.index.close()


TWO_UPSTREAMS = f"""\
listen: 127.0.0.1:5000
tls:
  enabled: false
upstreams:
  - registry: docker.io
    url: {UPSTREAM}
  - registry: ghcr.io
    url: {UPSTREAM}
cache:
  dir: {{dir}}
"""


@pytest.mark.anyio
async def test_mirror_counts_each_upstreams_traffic(tmp_path, registry, clock, capsys):
    """What the server counts per upstream (requests, bytes served, bytes fetched) is what stats shows."""
    config_path = tmp_path / "config.yml"
    config_path.write_text(TWO_UPSTREAMS.format(dir=tmp_path / "cache"))
    hello = registry.push("library/hello", "latest", b"hello layer" * 10)
    app_image = registry.push("acme/app", "1", b"app layer" * 30)
    app = DockerMirror(configuration.load(config_path), clock=clock, upstream_transport=registry.transport)
    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            async def pull(name: str, image) -> int:
                got = await client.get(f"/v2/{name}/manifests/{image.tag}", headers={"Accept": image.media_type})
                assert got.status_code == 200
                size = len(got.content)
                for digest, data in image.blobs.items():
                    blob = await client.get(f"/v2/{name}/blobs/{digest}")
                    assert blob.content == data
                    size += len(data)
                return size

            hub_bytes = await pull("hello", hello)                  # docker.io's library/hello
            ghcr_bytes = await pull("ghcr.io/acme/app", app_image)
            await app.cache.transfers.wait_all(5)    # committed: the same pull again is all hits
            await pull("ghcr.io/acme/app", app_image)
            await app.cache.flush()
            counters = app.cache.index.counters()
            code = cli.main(["cache", "stats", "--json", "--config", str(config_path)])
    out, err = capsys.readouterr()
    assert counters["upstream/docker.io/bytes_fetched"] == hub_bytes
    assert counters["upstream/ghcr.io/bytes_fetched"] == ghcr_bytes
    assert counters["bytes_fetched"] == hub_bytes + ghcr_bytes
    assert code == 0, err
    ups = json.loads(out)["upstreams"]
    assert (ups["docker.io"]["bytes_fetched_upstream"], ups["ghcr.io"]["bytes_fetched_upstream"]) == (
        hub_bytes, ghcr_bytes)
    assert ups["docker.io"]["requests"] == {"miss": 3}
    assert ups["ghcr.io"]["requests"] == {"miss": 3, "hit": 3}
    assert ups["ghcr.io"]["hit_ratio"] == 0.5 and ups["ghcr.io"]["bytes_served_from_cache"] == ghcr_bytes
    assert ups["ghcr.io"]["tags"] == 1 and ups["ghcr.io"]["entries"] == 3
