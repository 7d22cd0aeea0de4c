"""Several upstreams behind one mirror (issue 11), against three real registries on loopback:
docker.io (plain HTTP), ghcr.test (bearer tokens with credentials) and registry.test:5443 (TLS
from a private CA); see tests/support/upstreams.py. Each test asserts what the client got
(bytes, digests), what each upstream saw, the mirror's log lines and its files."""

from __future__ import annotations

import base64
import signal
import socket
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.clients import dir_manifest_digest, skopeo_copy
from tests.support.faultproxy import FaultProxy
from tests.support.procs import Mirror, background_download, wait_until
from tests.support.upstreams import (ALL_MANIFESTS, DOCKER_IO, GHCR, PASSWORD, PRIVATE, PRIVATE_ALIAS, USER, Site,
                                    ThreeUpstreams)
from tests.test_daemon import notify  # noqa: F401 - the notify fixture

ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]


def is_manifest(seeded, digest: str) -> bool:
    return digest == seeded.image.digest or digest in seeded.image.manifests.values()


def pull(client: httpx.Client, site: Site, name: str, path_name: str, ns: str | None = None) -> None:
    """The tag, then every manifest and blob of the image: each equal to the upstream's."""
    seeded, params = site.seeded[name], ({"ns": ns} if ns else None)
    response = client.get(f"/v2/{path_name}/manifests/{seeded.tag}", headers=ACCEPT, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["docker-content-digest"] == seeded.digest
    assert response.headers.get("oci-namespace") == ns
    for digest, path in seeded.image.blob_paths.items():
        kind = "manifests" if is_manifest(seeded, digest) else "blobs"
        got = client.get(f"/v2/{path_name}/{kind}/{digest}", headers=ACCEPT, params=params)
        assert got.status_code == 200, (digest, got.text)
        assert got.content == path.read_bytes()
        assert got.headers["docker-content-digest"] == digest


def blob_gets(site: Site, name: str, since: int = 0) -> dict[str, int]:
    """How many GETs of each of the image's blobs the upstream received."""
    seeded = site.seeded[name]
    return {digest: len(site.requests(since, "GET", f"/blobs/{digest}$"))
            for digest in seeded.image.blob_paths if not is_manifest(seeded, digest)}


def committed(mirror: Mirror, site: Site, name: str) -> None:
    """Wait until each blob of the image is in the cache (committed just after its last byte is sent)."""
    for digest in blob_gets(site, name):
        mirror.committed_blob(digest)


def errors(response: httpx.Response) -> list[str]:
    return [e["code"] for e in response.json()["errors"]]


def reload(mirror: Mirror, upstreams: list[dict]) -> None:
    """Rewrite the mirror's configuration with these upstreams and SIGHUP it."""
    mirror.config = {**mirror.config, "upstreams": upstreams}
    mirror.config_path.write_text(yaml.safe_dump(mirror.config))
    count = mirror.log_text().count("reloaded ")
    mirror.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: mirror.log_text().count("reloaded ") > count, 30, what="the reload")


# --- routing


ROUTES = [
    # site, image, name by ns, name by path prefix
    (DOCKER_IO, "tool", "acme/tool", "docker.io/acme/tool"),
    (GHCR, "widget", "acme/widget", "ghcr.test/acme/widget"),
    (GHCR, "gadget", "acme/gadget", "ghcr.test/acme/gadget"),
    (PRIVATE, "app", "team/app", "registry.test:5443/team/app"),
]


@pytest.mark.parametrize("key, name, by_ns, by_prefix", ROUTES, ids=[f"{r[0]}-{r[1]}" for r in ROUTES])
def test_pull_by_ns_then_by_prefix_is_one_cache_entry(make_mirror, three_upstreams: ThreeUpstreams,
                                                      key, name, by_ns, by_prefix):
    site = three_upstreams.site(key)
    others = [s for s in three_upstreams.sites if s is not site]
    marks = {s.key: s.mark() for s in three_upstreams.sites}
    mirror = make_mirror(upstreams=three_upstreams.config())
    with mirror.client() as client:
        pull(client, site, name, by_ns, ns=key)
        committed(mirror, site, name)
        after_first = site.mark()
        pull(client, site, name, by_prefix)
    # the upstream saw each blob once, and nothing at all for the second pull
    assert set(blob_gets(site, name, marks[key]).values()) == {1}
    assert site.requests(after_first) == []
    assert all(s.requests(marks[s.key]) == [] for s in others)
    if site.proxy is not None:     # the token registry: tokens asked with the password file's credentials
        basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        token_requests = site.proxy.requests("GET", r"^/token\?")
        assert token_requests and all(seen.header_values("Authorization") == [basic] for seen in token_requests)
        assert PASSWORD not in mirror.log_text()
    lines = mirror.access_lines(rf"/v2/{by_ns}/manifests/{site.seeded[name].tag}\?ns=")
    assert len(lines) == 1 and "cache=MISS" in lines[0] and f"upstream={key} upstream_status=200" in lines[0]
    lines = mirror.access_lines(rf"/v2/{by_prefix}/")
    assert lines and all("cache=HIT" in line and f"upstream={key} " in line for line in lines), lines


def test_names_without_a_registry_go_to_docker_io(make_mirror, three_upstreams: ThreeUpstreams):
    marks = {s.key: s.mark() for s in three_upstreams.sites}
    mirror = make_mirror(upstreams=three_upstreams.config())
    with mirror.client() as client:
        pull(client, three_upstreams.docker, "hello", "hello")
        pull(client, three_upstreams.docker, "busybox", "library/busybox")
    seen = three_upstreams.docker.requests(marks[DOCKER_IO])
    assert seen and all(line.split()[1].startswith(("/v2/library/hello/", "/v2/library/busybox/")) for line in seen)
    assert three_upstreams.ghcr.requests(marks[GHCR]) == []
    assert three_upstreams.private.requests(marks[PRIVATE]) == []
    assert all(" upstream=docker.io " in line for line in mirror.access_lines())


def test_skopeo_pulls_each_upstream_by_path_prefix(make_mirror, three_upstreams: ThreeUpstreams, tmp_path: Path):
    """A real client naming the registry in the path (``mirror/ghcr.test/acme/gadget``). A
    reference's path has no colon: the TLS registry is named by its alias without the port."""
    mirror = make_mirror(upstreams=three_upstreams.config())
    pulls = ((GHCR, "gadget", "ghcr.test/acme/gadget:latest"), (GHCR, "widget", "ghcr.test/acme/widget:1.0"),
             (PRIVATE, "app", f"{PRIVATE_ALIAS}/team/app:v1"), (DOCKER_IO, "alpine", "docker.io/library/alpine:3"))
    for key, name, reference in pulls:
        site = three_upstreams.site(key)
        copied = skopeo_copy(f"{mirror.address}/{reference}", tmp_path / name, all_images=True)
        assert dir_manifest_digest(copied) == site.seeded[name].digest
        for digest, path in site.seeded[name].image.blob_paths.items():
            if not is_manifest(site.seeded[name], digest):
                assert (copied / digest.removeprefix("sha256:")).read_bytes() == path.read_bytes()
    for prefix, key in ((r"ghcr\.test", GHCR), (r"registry\.test", PRIVATE), (r"docker\.io", DOCKER_IO)):
        lines = mirror.access_lines(rf"/v2/{prefix}/")
        assert lines and {line.split("upstream=")[1].split()[0] for line in lines} == {key}, lines


# --- unknown registries: nothing dialled


class Canary:
    """A listening socket on loopback that records whether anything connected to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def connections(self) -> int:
        """Connections made so far (the kernel completes them into the backlog unaccepted)."""
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    def close(self) -> None:
        self.sock.close()


def test_unknown_registry_is_404_and_nothing_is_dialled(make_mirror, three_upstreams: ThreeUpstreams):
    canary = Canary()
    try:
        marks = {s.key: s.mark() for s in three_upstreams.sites}
        mirror = make_mirror(upstreams=three_upstreams.config())
        target = f"127.0.0.1:{canary.port}"
        requests = [
            ("/v2/x/y/manifests/latest", {"ns": target}),
            ("/v2/x/y/blobs/sha256:" + "a" * 64, {"ns": target}),
            ("/v2/x/y/tags/list", {"ns": target}),
            (f"/v2/{target}/x/y/manifests/latest", None),
            (f"/v2/{target}/x/y/blobs/sha256:" + "a" * 64, None),
            (f"/v2/localhost:{canary.port}/x/y/manifests/latest", None),
            ("/v2/evil.test/x/manifests/latest", None),
            ("/v2/x/manifests/latest", {"ns": "evil.test"}),
            ("/v2/acme/widget/manifests/1.0", {"ns": three_upstreams.ghcr.proxy.address}),  # an address, no name
        ]
        with mirror.client() as client:
            for path, params in requests:
                response = client.get(path, headers=ACCEPT, params=params)
                assert response.status_code == 404, (path, params, response.text)
                assert errors(response) == ["NAME_UNKNOWN"], (path, params)
                assert "Traceback" not in response.text
            # the mirror still works for the configured ones
            assert client.get("/v2/ghcr.test/acme/widget/manifests/1.0", headers=ACCEPT).status_code == 200
        assert canary.connections() == 0
        assert three_upstreams.docker.requests(marks[DOCKER_IO]) == []
        assert three_upstreams.private.requests(marks[PRIVATE]) == []
        assert [line for line in three_upstreams.ghcr.requests(marks[GHCR]) if "/acme/widget/" not in line
                and not line.startswith("GET /token")] == []
        lines = mirror.access_lines(r'" 404 ', at_least=len(requests))
        assert len(lines) == len(requests) and not any("upstream_status=" in line and "upstream_status=-" not in line
                                                        for line in lines), lines
    finally:
        canary.close()


# --- one upstream down


def test_one_upstream_down_serves_its_tags_stale_and_only_its_own(make_mirror, three_upstreams: ThreeUpstreams):
    ghcr = three_upstreams.ghcr
    mirror = make_mirror(upstreams=three_upstreams.config(), cache={"tag_ttl": "1s"})
    tags = [(three_upstreams.docker, "hello", "hello"), (ghcr, "widget", "ghcr.test/acme/widget"),
            (three_upstreams.private, "app", "registry.test:5443/team/app")]
    with mirror.client() as client:
        for site, name, path_name in tags:
            pull(client, site, name, path_name)
    stopped_at = mirror.log_text().count(" access: ")
    ghcr.proxy.stop()          # ghcr.test refuses connections now
    marks = {s.key: s.mark() for s in (three_upstreams.docker, three_upstreams.private)}
    time.sleep(1.5)            # every tag is older than the 1 s tag_ttl
    with mirror.client() as client:
        for round_ in range(2):
            for site, name, path_name in tags:
                response = client.get(f"/v2/{path_name}/manifests/{site.seeded[name].tag}", headers=ACCEPT)
                assert response.status_code == 200, (round_, path_name, response.text)
                assert response.headers["docker-content-digest"] == site.seeded[name].digest
                assert response.content == site.upstream.get(site.seeded[name].repo, site.seeded[name].tag).content
    lines = [line for line in mirror.log_text().splitlines() if " access: " in line][stopped_at:]
    tag_lines = {key: [line for line in lines if f" upstream={key} " in line and "/manifests/sha256:" not in line]
                 for key in (DOCKER_IO, GHCR, PRIVATE)}
    assert len(tag_lines[GHCR]) == 2 and all("cache=STALE" in line for line in tag_lines[GHCR]), tag_lines[GHCR]
    for key in (DOCKER_IO, PRIVATE):
        assert tag_lines[key] and not any("STALE" in line for line in tag_lines[key]), tag_lines[key]
        assert any("upstream_status=200" in line for line in tag_lines[key]), tag_lines[key]
    # the others were asked again (revalidated) after ghcr.test failed
    for site in (three_upstreams.docker, three_upstreams.private):
        assert site.requests(marks[site.key], "HEAD", r"/manifests/(latest|v1)$") != []


# --- content-addressed across upstreams


def test_a_layer_of_two_upstreams_is_stored_once(make_mirror, three_upstreams: ThreeUpstreams):
    docker, ghcr = three_upstreams.docker, three_upstreams.ghcr
    shared = docker.seeded["hello"].image.layers["amd64"][0]
    assert shared in ghcr.seeded["widget"].image.layers["amd64"]
    mirror = make_mirror(upstreams=three_upstreams.config())
    mark = ghcr.mark()
    with mirror.client() as client:
        pull(client, docker, "hello", "hello")
        mirror.committed_blob(shared)
        pull(client, ghcr, "widget", "ghcr.test/acme/widget")
    assert ghcr.requests(mark, "GET", f"/blobs/{shared}$") == []      # served from the cache
    files = [p for p in (mirror.cache_dir / "blobs").rglob("*") if p.is_file()]
    assert [p.name for p in files].count(shared.removeprefix("sha256:")) == 1
    assert mirror.blob_file(shared).read_bytes() == docker.upstream.blob(shared)
    mirror.stop()               # the index gets its last writes
    with sqlite3.connect(mirror.cache_dir / "index.sqlite") as db:
        assert db.execute("SELECT count(*) FROM content WHERE digest = ?", (shared,)).fetchone() == (1,)
        refs = db.execute("SELECT upstream, repository FROM refs WHERE digest = ? ORDER BY upstream",
                          (shared,)).fetchall()
    assert refs == [(DOCKER_IO, "library/hello"), (GHCR, "acme/widget")]


# --- reloads


def test_reload_adds_an_upstream_during_a_pull_and_removes_one(make_mirror, three_upstreams: ThreeUpstreams,
                                                              fault_proxy: FaultProxy):
    docker, ghcr, private = three_upstreams.docker, three_upstreams.ghcr, three_upstreams.private
    big = docker.upstream.big_layer
    fault_proxy.slow = (f"/blobs/{big}", 0.01)             # ~6 MB/s: the pull spans the reloads
    upstreams = [{"registry": DOCKER_IO, "url": fault_proxy.url}, ghcr.entry()]
    mirror = make_mirror(upstreams=upstreams)
    with mirror.client() as client:
        pull(client, ghcr, "widget", "ghcr.test/acme/widget")
        missing = client.get("/v2/registry.test:5443/team/app/manifests/v1", headers=ACCEPT)
        assert missing.status_code == 404 and errors(missing) == ["NAME_UNKNOWN"]
    downloading, result = background_download(f"{mirror.url}/v2/library/big/blobs/{big}")
    try:
        wait_until(lambda: fault_proxy.requests("GET", f"/blobs/{big}"), 30, what="the pull started")
        reload(mirror, [*upstreams, private.entry()])
        with mirror.client() as client:
            pull(client, private, "app", "registry.test:5443/team/app")
        assert downloading.is_alive(), "the pull ended before the reload: slow it down more"
        # removed: its names are unknown, what it brought stays on disk
        reload(mirror, [upstreams[0], private.entry()])
        with mirror.client() as client:
            for params, path in ((None, "/v2/ghcr.test/acme/widget/manifests/1.0"),
                                 ({"ns": GHCR}, "/v2/acme/widget/manifests/1.0")):
                gone = client.get(path, headers=ACCEPT, params=params)
                assert gone.status_code == 404 and errors(gone) == ["NAME_UNKNOWN"]
        assert downloading.is_alive(), "the pull ended before the second reload: slow it down more"
    finally:
        fault_proxy.slow = None
        downloading.join(180)
    assert result == {"status": 200, "digest": big}
    assert mirror.committed_blob(big) is not None
    widget = ghcr.seeded["widget"].image
    for digest, path in widget.blob_paths.items():
        if not is_manifest(ghcr.seeded["widget"], digest):
            assert mirror.blob_file(digest).read_bytes() == path.read_bytes()
    assert "upstream registry.test:5443 (" in mirror.log_text() and "upstream ghcr.test removed" in mirror.log_text()
    assert "Traceback" not in mirror.log_text()


# --- the status line


def test_status_says_how_many_upstreams_are_reachable(tmp_path: Path, notify, three_upstreams):  # noqa: F811
    mirror = Mirror(tmp_path, {"upstreams": three_upstreams.config()})
    mirror.env = {**mirror.env, "NOTIFY_SOCKET": str(notify.path)}
    mirror.start()
    try:
        notify.wait_for("READY=1")
        ready = next(message for _, message in notify.messages if "READY=1" in message)
        assert "upstreams 0 of 3 reachable (docker.io, ghcr.test, registry.test:5443 not contacted yet)" in ready
        with mirror.client() as client:
            for path in ("/v2/hello/manifests/latest", "/v2/registry.test:5443/team/app/manifests/v1"):
                assert client.get(path, headers=ACCEPT).status_code == 200
            three_upstreams.ghcr.proxy.stop()
            response = client.get("/v2/ghcr.test/acme/widget/manifests/1.0", headers=ACCEPT)
            assert response.status_code == 503, response.text
        wanted = "upstreams 2 of 3 reachable (ghcr.test UNREACHABLE)"
        wait_until(lambda: any(wanted in message for _, message in notify.messages), 30, what=wanted)
        three_upstreams.ghcr.proxy.start()
        seen = len(notify.messages)
        with mirror.client() as client:
            assert client.get("/v2/ghcr.test/acme/widget/manifests/1.0", headers=ACCEPT).status_code == 200
        wanted = "upstreams 3 of 3 reachable"
        wait_until(lambda: any(f"{wanted} |" in message or message.endswith(wanted)
                               for _, message in notify.messages[seen:]), 30, what=wanted)
    finally:
        mirror.stop()
