"""Tags and content negotiation: a tag maps to a digest per accept class.

A client that takes no manifest list gets one platform's manifest (or a 404) from the
upstream; that must never change what a client that takes lists gets, in either order,
for HEAD and GET, fresh, revalidated and stale; and its 404 must not forget the tag for
the others. The upstream is faked (tests/unit/fakes.py) and negotiates like Docker Hub
(``dockerhub=True``) or Distribution.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field

import httpx
import pytest

from dockermirror.cache.index import Index
from dockermirror.oci import AS_STORED, accept_class
from tests.unit.fakes import (
    ALL_MANIFESTS,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Answer,
    digest_of,
)

pytestmark = pytest.mark.anyio

EVERYTHING = [("Accept", a) for a in ALL_MANIFESTS]
SCHEMA2_ONLY = [("Accept", DOCKER_MANIFEST)]      # an old client: no lists, no OCI
PATH = "/v2/library/alpine/manifests/3"


def tag_rows(mirror) -> list[tuple[str, str, str]]:
    """(accept class, digest, media type) of every row of library/alpine:3 in the index."""
    db = sqlite3.connect(mirror.cache_dir / "index.sqlite")
    try:
        return sorted(db.execute("SELECT accept, digest, media_type FROM tags WHERE repository = ? AND tag = ?",
                                 ("library/alpine", "3")).fetchall())
    finally:
        db.close()


class Clients:
    """The two kinds of client and what each must get."""

    def __init__(self, mirror, image, method: str, single_gets: str | None) -> None:
        self.mirror, self.image, self.method = mirror, image, method
        self.single_gets = single_gets      # the platform digest a schema2-only client gets, None: 404

    async def list_client(self, phase: str) -> None:
        response = await self.mirror.client.request(self.method, PATH, headers=EVERYTHING)
        assert response.status_code == 200, (phase, response.text)
        assert response.headers["docker-content-digest"] == self.image.digest, phase
        assert response.headers["content-type"] == self.image.media_type, phase
        assert response.headers["content-length"] == str(len(self.image.manifest)), phase
        if self.method == "GET":
            assert response.content == self.image.manifest, phase

    async def single_client(self, phase: str, *, down: bool = False) -> None:
        response = await self.mirror.client.request(self.method, PATH, headers=SCHEMA2_ONLY)
        if self.single_gets is None:
            # never had an answer of its own: 404 from the upstream, 503 while it is down
            assert response.status_code == (503 if down else 404), (phase, response.text)
            return
        child = self.image.children["amd64"]
        assert response.status_code == 200, (phase, response.text)
        assert response.headers["docker-content-digest"] == self.single_gets == child.digest, phase
        assert response.headers["content-type"] == DOCKER_MANIFEST, phase
        if self.method == "GET":
            assert response.content == child.manifest, phase

    async def both(self, order: str, phase: str, *, down: bool = False) -> None:
        """One of each in this order, then the first again."""
        single, multi = (lambda: self.single_client(phase, down=down)), (lambda: self.list_client(phase))
        first, second = (single, multi) if order == "single-first" else (multi, single)
        for pull in (first, second, first):
            await pull()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("order", ["single-first", "list-first"])
@pytest.mark.parametrize("list_type, dockerhub", [
    (DOCKER_LIST, True), (OCI_INDEX, True),      # Docker Hub: amd64 for a client that takes no list
    (DOCKER_LIST, False), (OCI_INDEX, False),    # Distribution: amd64 for a Docker list, 404 for an OCI index
])
async def test_a_client_that_takes_no_list_never_changes_what_list_clients_get(mirror, method, order,
                                                                             list_type, dockerhub):
    mirror.registry.dockerhub = dockerhub
    # schema2 platform manifests (also in the OCI index), so that amd64's suits a schema2-only client
    image = mirror.registry.push_list("library/alpine", "3", list_type, child_type=DOCKER_MANIFEST)
    picks_amd64 = list_type == DOCKER_LIST or dockerhub
    clients = Clients(mirror, image, method, image.children["amd64"].digest if picks_amd64 else None)

    def asked() -> list[str]:
        """The upstream requests made for clients that have an answer to cache (a 404 is not cached)."""
        return [s.headers.get("accept", "") for s in mirror.registry.seen
                if picks_amd64 or s.headers.get("accept") != DOCKER_MANIFEST]

    await clients.both(order, "first pulls")
    before = asked()
    await clients.both(order, "fresh")
    assert asked() == before                            # answered from the cache
    mirror.clock.advance(301)
    await clients.both(order, "revalidated")
    mirror.clock.advance(3600)
    mirror.registry.down = True
    await clients.both(order, "stale", down=True)


async def test_a_404_for_one_client_leaves_the_tag_to_the_others(mirror):
    """Distribution answers 404 for an OCI index to a client that takes no index; the cached
    tag must still be there for the clients that can take it when the upstream goes down."""
    image = mirror.registry.push_list("library/alpine", "3", OCI_INDEX)
    assert (await mirror.client.get(PATH, headers=EVERYTHING)).status_code == 200
    mirror.clock.advance(301)
    narrow = await mirror.client.get(PATH, headers=[("Accept", OCI_MANIFEST)])
    assert narrow.status_code == 404 and narrow.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    mirror.registry.down = True
    stale = await mirror.client.get(PATH, headers=EVERYTHING)
    assert stale.status_code == 200 and stale.content == image.manifest
    assert stale.headers["docker-content-digest"] == image.digest
    assert tag_rows(mirror) == [(AS_STORED, image.digest, OCI_INDEX)]


async def test_a_tag_gone_for_everyone_is_forgotten(mirror):
    mirror.registry.push_list("library/alpine", "3", DOCKER_LIST)
    assert (await mirror.client.get(PATH, headers=EVERYTHING)).status_code == 200
    assert (await mirror.client.get(PATH, headers=SCHEMA2_ONLY)).status_code == 200
    assert {row[0] for row in tag_rows(mirror)} == {AS_STORED, accept_class([DOCKER_MANIFEST])}
    del mirror.registry.manifests[("library/alpine", "3")]
    mirror.clock.advance(301)
    assert (await mirror.client.get(PATH, headers=EVERYTHING)).status_code == 404
    assert (await mirror.client.get(PATH, headers=SCHEMA2_ONLY)).status_code == 404
    assert tag_rows(mirror) == []
    mirror.registry.down = True
    assert (await mirror.client.get(PATH, headers=EVERYTHING)).status_code == 503


async def test_a_single_platform_tag_is_shared_by_every_client_that_takes_its_type(mirror):
    image = mirror.registry.push("library/alpine", "3", media_type=DOCKER_MANIFEST)
    for accept in (EVERYTHING, SCHEMA2_ONLY, EVERYTHING):
        response = await mirror.client.get(PATH, headers=accept)
        assert response.status_code == 200 and response.content == image.manifest
    # the list client's answer is the tag as stored: the schema2-only client took it from the cache
    assert len(mirror.registry.requests("HEAD", "/manifests/3")) == 1
    assert tag_rows(mirror) == [(AS_STORED, image.digest, DOCKER_MANIFEST)]


async def test_a_tag_that_becomes_a_list_is_not_asked_again_on_every_pull(mirror):
    """A schema2-only client that once shared the tag's own manifest and is now answered with
    one platform of a list gets a mapping of its own (and no HEAD on every pull)."""
    mirror.registry.push("library/alpine", "3", media_type=DOCKER_MANIFEST)
    assert (await mirror.client.get(PATH, headers=EVERYTHING)).status_code == 200
    image = mirror.registry.push_list("library/alpine", "3", DOCKER_LIST)
    mirror.clock.advance(301)
    for _ in range(3):
        response = await mirror.client.get(PATH, headers=SCHEMA2_ONLY)
        assert response.headers["docker-content-digest"] == image.children["amd64"].digest
    assert len(mirror.registry.requests("HEAD", "/manifests/3")) == 2
    response = await mirror.client.get(PATH, headers=EVERYTHING)
    assert response.headers["docker-content-digest"] == image.digest


@pytest.mark.parametrize("accept, expected", [
    ([], "*/*"),
    (["*/*"], "*/*"),
    (["application/json"], "*/*"),
    ([DOCKER_MANIFEST], DOCKER_MANIFEST),
    ([f"{DOCKER_MANIFEST};q=0.5, {DOCKER_LIST}"], f"{DOCKER_LIST},{DOCKER_MANIFEST}"),
    ([", ".join(ALL_MANIFESTS)], AS_STORED),
    ([a.upper() for a in ALL_MANIFESTS] + ["application/x-anything-else"], AS_STORED),
])
def test_accept_class(accept, expected):
    assert accept_class(accept) == expected


def test_an_index_from_before_accept_classes_keeps_its_tags(tmp_path):
    """Schema 1 (one row per tag) upgrades in place: a list stays fresh for every client; a
    single manifest (maybe one platform picked for a client that took no list) stays, but is
    revalidated before it is served fresh again."""
    path = tmp_path / "index.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('format', 'docker-mirror-cache/1');
        CREATE TABLE tags (upstream TEXT NOT NULL, repository TEXT NOT NULL, tag TEXT NOT NULL,
            digest TEXT NOT NULL, media_type TEXT, size INTEGER NOT NULL, checked REAL NOT NULL,
            last_access REAL NOT NULL, PRIMARY KEY (upstream, repository, tag)) WITHOUT ROWID;
        CREATE INDEX tags_by_access ON tags (last_access);
    """)
    db.execute("INSERT INTO tags VALUES ('docker.io', 'library/alpine', '3', 'sha256:' || hex(zeroblob(32)),"
               " ?, 500, 1000.0, 1001.0)", (DOCKER_LIST,))
    db.execute("INSERT INTO tags VALUES ('docker.io', 'library/hello', 'latest', 'sha256:' || hex(zeroblob(32)),"
               " ?, 400, 1000.0, 1002.0)", (DOCKER_MANIFEST,))
    db.commit()
    db.close()
    for _ in range(2):      # upgraded once; opening it again changes nothing
        index = Index(path)
        try:
            listed = index.tag("docker.io", "library/alpine", "3", AS_STORED)
            single = index.tag("docker.io", "library/hello", "latest", AS_STORED)
            assert listed is not None and listed.checked == 1000.0 and listed.last_access == 1001.0
            assert listed.media_type == DOCKER_LIST and listed.size == 500
            assert single is not None and single.checked == 0 and single.last_access == 1002.0
            assert index.meta("schema") == "4"
            assert index.tag_count() == 2 and index.tags_of("docker.io", "library/alpine") == ["3"]
            # a second accept class for the same tag is a row of its own
            index.put_tag(type(single)("docker.io", "library/hello", "latest", single.digest, DOCKER_MANIFEST,
                                       400, 5.0, 5.0, accept_class([DOCKER_MANIFEST])))
            assert index.tag_count() == 2
        finally:
            index.close()
    check = sqlite3.connect(path)
    try:
        assert {row[0] for row in check.execute("SELECT name FROM sqlite_master")} >= {"tags", "tags_by_access"}
        assert "tags_v1" not in {row[0] for row in check.execute("SELECT name FROM sqlite_master")}
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        check.close()


# --- a hostile upstream: whatever its manifest answers hold, never a 500

@dataclass
class Hostile:
    """What a hostile upstream changes in its manifest answers (to HEAD and/or GET)."""

    headers: dict[str, bytes | None] = field(default_factory=dict)   # None removes the header
    body: bytes | None = None
    status: int | None = None
    methods: tuple[str, ...] = ("HEAD", "GET")
    expected: int = 200             # what a client gets, if the hostile answer reaches it
    stored: tuple[bytes, str] | None = None     # the manifest it holds (by tag and digest) and its type

    def __call__(self, request: httpx.Request, answer: Answer) -> None:
        if request.method not in self.methods:
            return
        for name, value in self.headers.items():
            if value is None:
                answer.headers.pop(name, None)
            else:
                answer.headers[name] = value
        if self.body is not None:
            answer.body = self.body
            if "content-length" not in self.headers:
                answer.headers.pop("content-length", None)
        if self.status is not None:
            answer.status = self.status


NOT_A_MANIFEST = 502
HOSTILE = {
    "digest header not a digest": Hostile({"docker-content-digest": b"sha256:zzz"}),
    "digest header upper case": Hostile({"docker-content-digest": b"sha256:" + b"AB" * 32}),
    "digest header not ASCII": Hostile({"docker-content-digest": b"sha256:\xe2\x82\xac"}),
    "digest header empty": Hostile({"docker-content-digest": b""}),
    # (a HEAD's valid digest is what the tag maps to: only the GET that follows can check it)
    "digest header other algorithm": Hostile({"docker-content-digest": b"sha512:" + b"0" * 128}, methods=("GET",)),
    "digest header a different digest": Hostile({"docker-content-digest": b"sha256:" + b"0" * 64}, methods=("GET",)),
    "HEAD without a digest": Hostile({"docker-content-digest": None}, methods=("HEAD",)),
    "HEAD without anything": Hostile({"docker-content-digest": None, "content-type": None,
                                      "content-length": None}, methods=("HEAD",)),
    "content type not ASCII": Hostile({"content-type": b"application/vnd.oci.image.manifest.v1+json\xe2\x82\xac"}),
    "content type with controls": Hostile({"content-type": b"text/\x7f\x01"}),
    "content type with parameters": Hostile({"content-type": b"application/vnd.oci.image.manifest.v1+json; x=y"}),
    "content length superscript": Hostile({"content-length": "²".encode()}, methods=("HEAD",)),
    "content length 5000 digits": Hostile({"content-length": b"9" * 5000}, methods=("HEAD",)),
    "content length beyond SQLite": Hostile({"content-length": b"1" + b"0" * 30}, methods=("HEAD",)),
    "content length negative": Hostile({"content-length": b"-1"}, methods=("HEAD",)),
    "content length zero": Hostile({"content-length": b"0"}, methods=("HEAD",)),
    "content length not a number": Hostile({"content-length": b"lots"}, methods=("HEAD",)),
    "content length disagrees": Hostile({"content-length": b"3"}, methods=("GET",)),
    "mediaType a number": Hostile(stored=(json.dumps({"schemaVersion": 2, "mediaType": 5, "layers": []}).encode(),
                                          "application/json")),
    "mediaType an object": Hostile(stored=(json.dumps({"schemaVersion": 2, "mediaType": {"a": OCI_MANIFEST}, "layers": []}).encode(),
                                           "application/json")),
    "mediaType not a media type": Hostile(stored=(b'{"schemaVersion": 2, "layers": [], "mediaType": "\\u20ac/\\r\\n"}',
                                          "application/json")),
    "body a JSON array": Hostile(stored=(b"[1, 2]", "application/json"), expected=NOT_A_MANIFEST),
    "body a JSON string": Hostile(stored=(b'"manifest"', OCI_MANIFEST), expected=NOT_A_MANIFEST),
    "body nested too deep": Hostile(stored=(b"[" * 100_000, OCI_MANIFEST), expected=NOT_A_MANIFEST),
    "body not UTF-8": Hostile(stored=(b"\xff\xfe{}", OCI_MANIFEST), expected=NOT_A_MANIFEST),
    "body not JSON": Hostile(stored=(b"<html>hello</html>", OCI_MANIFEST), expected=NOT_A_MANIFEST),
    "error body nested too deep": Hostile({"content-type": b"application/json"}, b"[" * 100_000,
                                          status=404, expected=404),
    "status 204": Hostile({}, b"", status=204, expected=502),
    "status 304": Hostile({}, status=304, expected=502),
}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest.mark.parametrize("case", HOSTILE)
async def test_hostile_manifest_answers_never_cause_a_500(mirror, case, by, method):
    hostile = HOSTILE[case]
    if hostile.stored is not None:
        expected_body, expected_type = hostile.stored
        mirror.registry.manifests[("acme/tool", "1.0")] = hostile.stored
        mirror.registry.manifests[("acme/tool", digest_of(expected_body))] = hostile.stored
    else:
        image = mirror.registry.push("acme/tool", "1.0")
        expected_body, expected_type = image.manifest, OCI_MANIFEST
    mirror.registry.alter_manifest = hostile
    reference = "1.0" if by == "tag" else digest_of(expected_body)
    response = await mirror.client.request(method, f"/v2/acme/tool/manifests/{reference}",
                                           headers=[("Accept", t) for t in (*ALL_MANIFESTS, "application/json")])
    assert response.status_code != 500 and "Traceback" not in response.text
    # The hostile part reaches the client unless it is only in a GET that a HEAD never needs.
    head_is_enough = method == "HEAD" and ("HEAD" not in hostile.methods or hostile.stored is not None)
    if hostile.expected == 200 or head_is_enough:
        assert response.status_code == 200, response.text
        assert response.headers["docker-content-digest"] == digest_of(expected_body)
        assert response.headers["content-type"] == expected_type
        assert response.headers["content-length"] == str(len(expected_body))
        assert response.content == (b"" if method == "HEAD" else expected_body)
        return
    assert response.status_code == hostile.expected, response.text
    if method == "GET":
        assert response.json()["errors"][0]["code"]
    assert mirror.cached_files() == []          # nothing of it kept


async def test_a_head_that_says_too_little_about_a_cached_manifest_costs_no_get(mirror):
    image = mirror.registry.push("acme/tool", "1.0")
    assert (await mirror.client.get("/v2/acme/tool/manifests/1.0", headers=EVERYTHING)).status_code == 200
    mirror.registry.alter_manifest = Hostile({"content-type": None, "content-length": b"x"}, methods=("HEAD",))
    mirror.clock.advance(301)
    again = await mirror.client.get("/v2/acme/tool/manifests/1.0", headers=EVERYTHING)
    assert again.status_code == 200 and again.content == image.manifest
    assert again.headers["content-type"] == OCI_MANIFEST
    assert len(mirror.registry.requests("GET", "/manifests/")) == 1      # the first pull's only


async def test_a_blob_head_with_a_content_length_that_is_not_a_number(mirror):
    image = mirror.registry.push("acme/tool", "1.0")
    original = mirror.registry._blob

    def blob(digest: str, request: httpx.Request) -> httpx.Response:
        answer = original(digest, request)
        headers = [(k, v) for k, v in answer.headers.raw if k.lower() != b"content-length"]
        return httpx.Response(200, headers=headers + [(b"content-length", "²".encode())], content=b"")

    mirror.registry._blob = blob
    response = await mirror.client.head(f"/v2/acme/tool/blobs/{image.layer}")
    # a length passed on to the client must be one: a bad answer (see test_upstream_hostile.py)
    assert response.status_code == 502 and response.content == b""


SECRET = json.dumps({"schemaVersion": 2, "AccessKeyId": "AKIA-SECRET", "SecretAccessKey": "s3cret"}).encode()


@pytest.mark.parametrize("path, what", [("/v2/acme/tool/manifests/1.0", "is not a manifest"),
                                        ("/v2/acme/tool/tags/list", "is not a tag list")])
async def test_a_tag_or_tag_list_redirected_to_something_else_is_neither_served_nor_stored(mirror, path, what):
    """The upstream redirects a tag's manifest or a tag list to another host (an internal
    service, a cloud's metadata address) whose JSON is not one: 502, the JSON is not handed to
    the client, and nothing is cached."""
    image = mirror.registry.push("acme/tool", "1.0")
    mirror.registry.redirects[path] = "https://internal.test/latest/credentials"
    mirror.registry.elsewhere["https://internal.test/latest/credentials"] = ("application/json", SECRET)
    response = await mirror.client.get(path, headers=[("Accept", t) for t in ALL_MANIFESTS])
    assert response.status_code == 502, response.text
    assert what in response.json()["errors"][0]["message"] and b"SECRET" not in response.content
    assert [r.url.host for r in mirror.registry.seen][-1] == "internal.test"    # it was followed
    assert not tag_rows(mirror) and mirror.app.cache.index.content(digest_of(SECRET)) is None
    del mirror.registry.redirects[path]     # the upstream mends: served as ever
    response = await mirror.client.get("/v2/acme/tool/manifests/1.0", headers=[("Accept", t) for t in ALL_MANIFESTS])
    assert response.status_code == 200 and response.content == image.manifest


@pytest.mark.parametrize("list_type", [DOCKER_LIST, OCI_INDEX])
@pytest.mark.parametrize("first", ["everything", "nothing"])
async def test_a_client_that_names_no_type_gets_what_the_upstream_gives_it_whoever_came_first(mirror, list_type,
                                                                                              first):
    """A client with no Accept names no manifest type: the upstream (Distribution) gives it a
    Docker list's linux/amd64 manifest, and 404 for an OCI index. It used to get the whole list
    from the cache once a client that takes every type had pulled the tag."""
    mirror.registry.no_accept_takes_no_list = True
    image = mirror.registry.push_list("library/alpine", "3", list_type, child_type=DOCKER_MANIFEST)
    expected = (200, image.children["amd64"].manifest) if list_type == DOCKER_LIST else (404, None)

    async def nothing() -> None:
        response = await mirror.client.get("/v2/library/alpine/manifests/3")
        assert response.status_code == expected[0], response.text
        if expected[1] is not None:
            assert response.content == expected[1]

    async def everything() -> None:
        response = await mirror.client.get("/v2/library/alpine/manifests/3", headers=EVERYTHING)
        assert response.status_code == 200 and response.content == image.manifest

    for client in ((everything, nothing) if first == "everything" else (nothing, everything)) * 2:
        await client()


@pytest.mark.parametrize("media_type", ["application/vnd.oci.artifact.manifest.v1+json",
                                        "application/vnd.cncf.oras.artifact.manifest.v1+json"])
async def test_an_artifact_manifest_without_schema_version_is_served_by_tag(mirror, media_type):
    body = json.dumps({"mediaType": media_type, "artifactType": "application/x-test", "blobs": []}).encode()
    mirror.registry.manifests[("acme/tool", "sig")] = (body, media_type)
    mirror.registry.manifests[("acme/tool", digest_of(body))] = (body, media_type)
    response = await mirror.client.get("/v2/acme/tool/manifests/sig", headers=[("Accept", media_type)])
    assert response.status_code == 200 and response.content == body


async def test_a_large_tag_list_with_its_keys_in_any_order_is_passed_on(mirror):
    """Over TAG_LIST_PARSED bytes a tag list is not parsed (it held the event loop): it passes if
    it begins as a JSON object and has "tags", in whatever order (GCR's begins with "child")."""
    mirror.registry.push("acme/tool", "1.0")
    tags = [f"v{n}" for n in range(200_000)]
    body = json.dumps({"child": [], "manifest": {}, "name": "acme/tool", "tags": tags}).encode()
    assert len(body) > 1024 * 1024
    mirror.registry.redirects["/v2/acme/tool/tags/list"] = "https://gcr.test/v2/acme/tool/tags/list"
    mirror.registry.elsewhere["https://gcr.test/v2/acme/tool/tags/list"] = ("application/json", body)
    response = await mirror.client.get("/v2/acme/tool/tags/list")
    assert response.status_code == 200 and response.content == body
