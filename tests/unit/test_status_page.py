"""The status page at ``/`` and ``/healthz`` (service/statuspage.py) and the most-pulled tally
behind it (service/pullstats.py), on the in-process application."""

from __future__ import annotations

import asyncio
import base64
import html
import logging
import random
import sqlite3
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import bcrypt
import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.api.accesslog import RequestDone
from dockermirror.app import DockerMirror
from dockermirror.cache.index import Index
from dockermirror.humanize import size
from dockermirror.service.pullstats import CAPACITY, PullStats, SpaceSaving
from dockermirror.service.readings import read
from tests.unit.conftest import config_text
from tests.unit.fakes import ALL_MANIFESTS, UPSTREAM, FakeClock, FakeRegistry

pytestmark = pytest.mark.anyio
ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]


class _Text(HTMLParser):
    """The page as a reader sees it: its text, and each table's rows as lists of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.headings: list[str] = []
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "h2":
            self._heading = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "h2" and self._heading is not None:
            self.headings.append("".join(self._heading))
            self._heading = None
        self.parts.append(" ")

    def handle_data(self, data):
        self.parts.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._heading is not None:
            self._heading.append(data)

    @property
    def text(self) -> str:
        return " ".join("".join(self.parts).split())


def parsed(response: httpx.Response) -> _Text:
    page = _Text()
    page.feed(response.text)
    page.close()
    return page


def table(page: _Text, header: str) -> list[list[str]]:
    """The rows (header row first) of the table whose header row has ``header``."""
    (found,) = [t for t in page.tables if t and header in t[0]]
    return found


async def pull(client: httpx.AsyncClient, repo: str, tag: str, headers: dict[str, str] | None = None) -> httpx.Response:
    response = await client.get(f"/v2/{repo}/manifests/{tag}", headers=[*ACCEPT, *(headers or {}).items()])
    assert response.status_code == 200, response.text
    return response


def done(repository: str, *, upstream: str = "docker.io", status: int = 200, method: str = "GET",
         kind: str = "manifest", cache: str | None = "HIT") -> RequestDone:
    return RequestDone(client="192.0.2.7", method=method, path=f"/v2/{repository}/manifests/1", status=status,
                       sent=10, seconds=0.001, complete=True, kind=kind, cache=cache, upstream=upstream,
                       upstream_status=None, repository=repository, reference="1", identity=None,
                       certificate=None, note=None)


# --- the page


async def test_the_page_shows_cache_use_hit_ratio_upstreams_and_the_most_pulled(mirror):
    hello = mirror.registry.push("library/hello", "latest", layer=b"hello layer\n" * 5000)
    mirror.registry.push("acme/tool", "1.0")
    await pull(mirror.client, "hello", "latest")
    for digest in hello.blobs:
        assert (await mirror.client.get(f"/v2/hello/blobs/{digest}")).status_code == 200
    for _ in range(2):
        await pull(mirror.client, "hello", "latest")       # HITs: the tag is fresh
    await pull(mirror.client, "acme/tool", "1.0")
    assert (await mirror.client.head("/v2/acme/tool/manifests/1.0", headers=ACCEPT)).status_code == 200
    await mirror.app.cache.transfers.wait_all(5)
    await mirror.app.cache.flush()

    response = await mirror.client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"].startswith("default-src 'none'; style-src 'unsafe-inline'")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    assert "<script" not in response.text and "src=" not in response.text and "href=" not in response.text
    page = parsed(response)
    cache = read(mirror.app).cache
    assert cache.entries == 4 and cache.used_bytes > len(b"hello layer\n" * 5000)
    assert f"{size(cache.used_bytes)} used of {size(cache.max_bytes)} max" in page.text
    assert f"entries {cache.entries} (blobs and manifests)" in page.text
    assert f"{size(cache.free_bytes)} free of {size(cache.filesystem_bytes)}" in page.text
    # since start: 2 manifests and 2 blobs missed; 2 manifest GETs and the HEAD were HITs
    ratios = table(page, "since start")
    assert ratios[0][:2] == ["since start", "42.9%"]
    assert ratios[0][2].startswith("of 7 cache answers (HIT 3 · MISS 4 · STALE 0 · COALESCED 0 · PASS 0)")
    lifetime = next(row for row in ratios if row[0] == "lifetime")
    assert lifetime[1:2] == ["42.9%"] and lifetime[2].startswith("of 7 cache answers (HIT 3")
    upstreams = table(page, "registry")
    assert upstreams[1] == ["docker.io default", UPSTREAM, "reachable", "-", "-"]
    # manifest GETs answered 2xx, most first; the HEAD is not a pull
    pulled = table(page, "manifest GETs")
    assert pulled[1:] == [["1", "docker.io/library/hello", "3"], ["2", "docker.io/acme/tool", "1"]]
    assert "No downloads in flight." in page.text
    assert "DEGRADED" not in page.text


async def test_head_gives_the_headers_and_other_methods_the_read_only_refusal(mirror):
    get = await mirror.client.get("/")
    head = await mirror.client.head("/")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-security-policy"] == get.headers["content-security-policy"]
    assert int(head.headers["content-length"]) > 1000
    for path in ("/", "/healthz"):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            refused = await mirror.client.request(method, path)
            assert refused.status_code == 405, (method, path)
            assert refused.headers["allow"] == "GET, HEAD"
            assert refused.json()["errors"][0]["code"] == "UNSUPPORTED"
    health = await mirror.client.head("/healthz")
    assert health.status_code == 200 and health.content == b"" and health.headers["content-length"] == "3"


async def test_a_transfer_in_flight_shows_its_progress(mirror):
    layer = b"y" * (4 * 1024 * 1024)
    image = mirror.registry.push("library/big", "1", layer=layer)
    gate = mirror.registry.held[image.layer] = asyncio.Event()
    await pull(mirror.client, "big", "1")
    pulling = asyncio.ensure_future(mirror.client.get(f"/v2/big/blobs/{image.layer}"))
    for _ in range(500):        # until the client follows it (the body is held: nothing more comes)
        await asyncio.sleep(0.01)
        if (transfers := read(mirror.app).transfers) and transfers[0].followers:
            break
    (before,) = read(mirror.app).transfers
    page = parsed(await mirror.client.get("/"))
    (after,) = read(mirror.app).transfers
    rows = table(page, "followers")
    assert rows[1][:2] == ["docker.io/library/big", image.layer[:19]]
    shown = {f"{size(t.received)} of {size(len(layer))} ({t.received / len(layer) * 100:.0f}%)"
             for t in (before, after)}
    assert rows[1][2] in shown
    assert rows[1][3] == "1"
    gate.set()
    assert (await pulling).content == layer


async def test_what_clients_and_upstreams_chose_is_escaped(mirror):
    """A repository name cannot hold markup once the API has validated it, so it is put in the
    tally as an observer would get it; an upstream's error text can hold anything."""
    hostile = "<script>alert(\"x\")</script>'onmouseover='x"
    mirror.app.status_page.stats(done(hostile))
    mirror.app.status_page.stats(done("ok/<b>bold</b>", upstream='"><img src=x>'))

    def refuse(request: httpx.Request) -> None:
        raise httpx.ConnectError("<script>document.title='owned'</script> & \"quoted\"", request=request)

    mirror.registry.on_request = refuse
    assert (await mirror.client.get("/v2/library/x/manifests/1", headers=ACCEPT)).status_code == 503
    response = await mirror.client.get("/")
    assert "<script" not in response.text and "<img" not in response.text and "<b>bold" not in response.text
    assert html.escape(hostile, quote=True) in response.text
    assert "&lt;script&gt;document.title=&#x27;owned&#x27;&lt;/script&gt; &amp; &quot;quoted&quot;" in response.text
    page = parsed(response)
    pulled = table(page, "manifest GETs")
    assert pulled[1:] == [["1", f"docker.io/{hostile}", "1"], ["2", '"><img src=x>/ok/<b>bold</b>', "1"]]
    assert table(page, "registry")[1][2:4] == ["UNREACHABLE",
                                               "ConnectError: <script>document.title='owned'</script> & \"quoted\""]
    assert set(page.tags) <= {"html", "head", "meta", "title", "style", "body", "header", "h1", "p", "main",
                              "section", "h2", "div", "span", "b", "dl", "dt", "dd", "table", "tr", "th", "td",
                              "br", "code", "footer"}


async def test_the_page_can_be_turned_off(tmp_path):
    registry = FakeRegistry()
    config = configuration.loads(config_text(tmp_path / "cache", "status_page: false\n"))
    app = DockerMirror(config, clock=FakeClock(), upstream_transport=registry.transport)
    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            off = await client.get("/")
            assert off.status_code == 404 and "docker-mirror" not in off.text.replace("status_page", "")
            assert (await client.get("/healthz")).text == "ok\n"
            app.reconfigure(configuration.loads(config_text(tmp_path / "cache")))     # a reload turns it on
            assert (await client.get("/")).status_code == 200


# --- who may see what


def _users(path: Path, users: dict[str, str]) -> Path:
    path.write_text("".join(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}\n"
                            for user, password in users.items()))
    return path


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_with_access_rules_the_page_names_only_what_the_viewer_may_pull(mirror, tmp_path):
    mirror.registry.push("library/public", "1")
    mirror.registry.push("secret/payroll", "1")
    secret = mirror.registry.push("secret/payroll", "2", layer=b"z" * (4 * 1024 * 1024))
    await pull(mirror.client, "public", "1")
    await pull(mirror.client, "secret/payroll", "1")
    htpasswd = _users(tmp_path / "htpasswd", {"alice": "alice-secret"})
    rules = ('access:\n  - allow: [anonymous]\n    repositories: ["docker.io/library/*"]\n'
             "  - allow: [user:alice]\n")
    auth = f"auth:\n  htpasswd: {htpasswd}\n"
    mirror.app.reconfigure(configuration.loads(config_text(mirror.cache_dir, rules + auth)))
    # a download in flight for a secret repository
    gate = mirror.registry.held[secret.layer] = asyncio.Event()
    await pull(mirror.client, "secret/payroll", "2", headers=basic("alice", "alice-secret"))
    pulling = asyncio.ensure_future(mirror.client.get(f"/v2/secret/payroll/blobs/{secret.layer}",
                                                      headers=basic("alice", "alice-secret")))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if read(mirror.app).transfers:
            break
    assert read(mirror.app).transfers

    anonymous = await mirror.client.get("/")
    assert anonymous.status_code == 200          # /v2/ lets anonymous in too: it may pull library/*
    assert (await mirror.client.get("/v2/")).status_code == 200
    assert "secret" not in anonymous.text and "payroll" not in anonymous.text
    page = parsed(anonymous)
    assert table(page, "manifest GETs")[1:] == [["1", "docker.io/library/public", "1"]]
    assert "Shown as anonymous: only repositories you may pull." in page.text
    assert "No downloads in flight." in page.text and "1 more of repositories you may not pull." in page.text

    alice = parsed(await mirror.client.get("/", headers=basic("alice", "alice-secret")))
    assert sorted(row[1] for row in table(alice, "manifest GETs")[1:]) == [
        "docker.io/library/public", "docker.io/secret/payroll"]
    assert table(alice, "followers")[1][0] == "docker.io/secret/payroll"
    assert "Shown as user:alice" in alice.text

    wrong = await mirror.client.get("/", headers=basic("alice", "wrong"))
    assert wrong.status_code == 401 and "payroll" not in wrong.text
    gate.set()
    assert (await pulling).status_code == 200

    # users only (no rules): anonymous may pull nothing, so / asks for a login as /v2/ does
    mirror.app.reconfigure(configuration.loads(config_text(mirror.cache_dir, auth)))
    for path in ("/v2/", "/"):
        challenged = await mirror.client.get(path)
        assert challenged.status_code == 401, path
        assert challenged.headers["www-authenticate"] == 'Basic realm="docker-mirror"'
        assert "payroll" not in challenged.text
    assert (await mirror.client.get("/", headers=basic("alice", "alice-secret"))).status_code == 200
    # the health check asks nothing and names no repository
    health = await mirror.client.get("/healthz")
    assert health.status_code == 200 and health.text == "ok\n"


async def test_with_access_rules_only_a_client_that_may_pull_nothing_gets_403_not_the_page(mirror, tmp_path):
    """No htpasswd: no login can help, so no Basic prompt either; the page is refused (403 DENIED)."""
    mirror.registry.push("library/public", "1")
    await pull(mirror.client, "public", "1")
    rules = 'access:\n  - allow: ["*"]\n    from: [10.0.0.0/8]\n'
    mirror.app.reconfigure(configuration.loads(config_text(mirror.cache_dir, rules)))
    assert (await mirror.client.get("/v2/library/public/manifests/1", headers=ACCEPT)).status_code == 403
    for method in ("GET", "HEAD"):
        refused = await mirror.client.request(method, "/")
        assert refused.status_code == 403, method
        assert "www-authenticate" not in refused.headers
        assert "public" not in refused.text and "Upstreams" not in refused.text and UPSTREAM not in refused.text
    error = (await mirror.client.get("/")).json()["errors"][0]
    assert error["code"] == "DENIED" and "may pull nothing" in error["message"]
    # a client from the allowed network sees it
    inside = httpx.ASGITransport(app=mirror.app.asgi, client=("10.1.2.3", 40000))
    async with httpx.AsyncClient(transport=inside, base_url="http://mirror.test") as client:
        page = await client.get("/")
    assert page.status_code == 200 and "docker.io/library/public" in page.text
    # with users, a user who may pull nothing from here is refused too (logging in cannot help)
    htpasswd = _users(tmp_path / "htpasswd", {"alice": "alice-secret"})
    rules = 'access:\n  - allow: [user:alice]\n    from: [10.0.0.0/8]\n'
    mirror.app.reconfigure(configuration.loads(config_text(mirror.cache_dir, rules + f"auth:\n  htpasswd: {htpasswd}\n")))
    assert (await mirror.client.get("/")).status_code == 401      # anonymous: the login prompt, as before
    alice = await mirror.client.get("/", headers=basic("alice", "alice-secret"))
    assert alice.status_code == 403 and "public" not in alice.text


async def test_with_client_certificates_required_only_healthz_answers_without_one(tmp_path):
    """tls.client_auth: required (api/gate.py): a probe shows no certificate, a viewer must."""
    registry = FakeRegistry()
    registry.push("library/busybox", "1")
    text = config_text(tmp_path / "cache").replace(
        "tls:\n  enabled: false\n", "tls:\n  certificate: /nonexistent/server.crt\n  client_auth: required\n")
    app = DockerMirror(configuration.loads(text), clock=FakeClock(), upstream_transport=registry.transport)
    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            for method in ("GET", "HEAD"):
                assert (await client.request(method, "/")).status_code == 401
                assert (await client.request(method, "/v2/")).status_code == 401
                health = await client.request(method, "/healthz")
                assert health.status_code == 200
            assert (await client.get("/healthz")).text == "ok\n"
            assert (await client.get("/healthz/")).status_code == 401
            assert (await client.post("/healthz")).status_code == 405
        assert registry.seen == []


# --- /healthz


async def test_healthz_is_ok_and_names_no_repository(mirror, caplog):
    mirror.registry.push("secret/payroll", "1")
    await pull(mirror.client, "secret/payroll", "1")
    caplog.set_level(logging.INFO, "dockermirror.access")
    health = await mirror.client.get("/healthz")
    assert health.status_code == 200
    assert health.headers["content-type"] == "text/plain; charset=utf-8"
    assert health.headers["cache-control"] == "no-store"
    assert health.text == "ok\n"
    assert not [r for r in caplog.records if "/healthz" in r.getMessage()]    # probes stay out of the log


async def test_healthz_says_the_upstream_is_down_and_stays_200(mirror, caplog):
    mirror.registry.down = True
    assert (await mirror.client.get("/v2/library/x/manifests/1", headers=ACCEPT)).status_code == 503
    caplog.set_level(logging.INFO, "dockermirror.access")
    health = await mirror.client.get("/healthz")
    assert health.status_code == 200
    assert health.text == "ok\nupstream docker.io: unreachable: serving what is cached\n"
    assert "connection refused" not in health.text
    assert [r for r in caplog.records if '"GET /healthz" 200' in r.getMessage()]   # ... unless it has news


async def test_healthz_and_the_page_say_the_cache_is_degraded(mirror, monkeypatch):
    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    for name in ("put_tag", "add_content", "apply", "set_meta"):
        monkeypatch.setattr(Index, name, full, raising=False)
    image = mirror.registry.push("acme/tool", "1.0")
    await pull(mirror.client, "acme/tool", "1.0")
    for digest in image.blobs:
        assert (await mirror.client.get(f"/v2/acme/tool/blobs/{digest}")).status_code == 200
    await mirror.app.cache.transfers.wait_all(5)
    await mirror.app.cache.flush()
    assert mirror.app.cache.degraded == "database or disk is full"
    health = await mirror.client.get("/healthz")
    assert health.status_code == 200
    assert health.text == ("ok\ncache: DEGRADED (database or disk is full): serving what is cached, passing the "
                           "rest through uncached\n")
    page = parsed(await mirror.client.get("/"))
    assert "DEGRADED: the cache cannot store (database or disk is full)." in page.text


async def test_healthz_says_the_filesystem_is_full(tmp_path):
    """cache.min_free: 100% is more than any filesystem has free: as a full disk looks."""
    registry = FakeRegistry()
    text = config_text(tmp_path / "cache").replace("  tag_ttl: 5m\n", "  tag_ttl: 5m\n  min_free: 100%\n")
    app = DockerMirror(configuration.loads(text), clock=FakeClock(), upstream_transport=registry.transport)
    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            health = await client.get("/healthz")
            cache = read(app).cache
            assert health.status_code == 200
            assert health.text == (f"ok\ncache: filesystem full: {size(cache.free_bytes)} free, less than "
                                   f"cache.min_free ({size(cache.min_free_bytes)}): new content evicts older "
                                   "content or passes through uncached\n")
            assert "The filesystem is full" in parsed(await client.get("/")).text


async def test_healthz_answers_when_the_cache_cannot_even_be_looked_at(mirror, monkeypatch):
    def gone(path):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr("dockermirror.service.readings.filesystem", gone)
    health = await mirror.client.get("/healthz")
    assert (health.status_code, health.text) == (200, "ok\ncache: its state cannot be read (No such file or "
                                                      "directory)\n")


# --- the tally


async def test_only_successful_manifest_gets_are_counted(mirror):
    image = mirror.registry.push("acme/tool", "1.0")
    stats = mirror.app.status_page.stats
    for n in range(50):                                             # names that do not exist
        assert (await mirror.client.get(f"/v2/nope/n{n}/manifests/1", headers=ACCEPT)).status_code == 404
    assert (await mirror.client.get("/v2/BAD/manifests/1")).status_code == 400
    assert (await mirror.client.head("/v2/acme/tool/manifests/1.0", headers=ACCEPT)).status_code == 200
    assert (await mirror.client.get(f"/v2/acme/tool/blobs/{image.layer}")).status_code == 200
    assert (await mirror.client.get("/v2/acme/tool/tags/list")).status_code == 200
    assert len(stats.pulls) == 0
    await pull(mirror.client, "acme/tool", "1.0")
    assert [(c.key, c.count) for c in stats.pulls.top(10)] == [(("docker.io", "acme/tool"), 1)]


async def test_the_tally_stays_bounded_through_the_app(mirror):
    mirror.app.status_page.stats.pulls = SpaceSaving(8)
    mirror.registry.push("acme/popular", "1")
    for n in range(40):
        mirror.registry.push(f"spray/n{n}", "1")
    for n in range(40):
        await pull(mirror.client, f"spray/n{n}", "1")
        if n % 4 == 0:
            await pull(mirror.client, "acme/popular", "1")
    assert len(mirror.app.status_page.stats.pulls) == 8
    rows = table(parsed(await mirror.client.get("/")), "manifest GETs")
    assert rows[1][:3] == ["1", "docker.io/acme/popular", "10"]
    assert len(rows) == 9
    # the others took the place of displaced ones: at least 1, at most their count
    low, _, high = rows[2][2].partition(" to ")
    assert rows[2][1].startswith("docker.io/spray/n") and int(low) >= 1 and int(high) > int(low)


def test_space_saving_bounds_memory_and_keeps_the_heavy_hitters():
    tally: SpaceSaving[str] = SpaceSaving(100)
    truth: Counter[str] = Counter()
    rng = random.Random(12)
    heavy = [f"heavy{i}" for i in range(5)]
    for n in range(200_000):
        key = rng.choice(heavy) if n % 10 == 0 else f"spray{n}"    # a client requesting distinct names
        tally.add(key)
        truth[key] += 1
    assert len(tally) == 100 and tally.seen == 200_000
    assert len(tally._buckets) <= 100
    top = tally.top(5)
    assert sorted(c.key for c in top) == sorted(heavy)
    for counted in tally.top(100):
        assert counted.count - counted.error <= truth[counted.key] <= counted.count
    # every key pulled more than seen / capacity times is in the table
    assert all(key in {c.key for c in tally.top(100)} for key, n in truth.items() if n > 200_000 / 100)


def test_space_saving_is_exact_while_it_has_room():
    tally: SpaceSaving[str] = SpaceSaving(10)
    for key in "abracadabra":
        tally.add(key)
    assert [(c.key, c.count, c.error) for c in tally.top(3)] == [("a", 5, 0), ("b", 2, 0), ("r", 2, 0)]
    assert [c.key for c in tally.top(10, keep=lambda key: key in "cd")] == ["c", "d"]


def test_the_default_tally_capacity_holds_under_many_names():
    stats = PullStats()
    for n in range(100_000):
        stats(done(f"spray/n{n}"))
    stats(done("x", status=404))
    assert len(stats.pulls) == CAPACITY
    assert stats.answers["HIT"] == 100_001
