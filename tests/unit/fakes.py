"""An upstream registry faked in memory (served through ``httpx.MockTransport``) and a clock.

:class:`FakeRegistry` answers the pull side of the distribution API the way Distribution and
Docker Hub do: manifests by tag or digest with ``Docker-Content-Digest``, content negotiated
by ``Accept`` (a client that takes no list gets the list's linux/amd64 manifest, as Docker Hub
and Distribution answer for a Docker manifest list, or 404, as Distribution answers for an OCI
index; ``dockerhub=True`` picks the platform for both), blobs, tag lists; optionally a
bearer-token challenge, a redirect of blobs to another host, tampered bytes, altered manifest
answers (``alter_manifest``) or no answer at all. With ``referrers=True`` it answers the OCI 1.1
referrers API from the manifests it holds that have a ``subject`` (``push_artifact``), applying
the ``artifactType`` filter unless ``filters=False``; without it, referrers get a 404 as
Distribution 2.8 answers (``alter_referrers`` changes that answer too). It records every request it gets, so a
test asserts what the upstream saw.
"""

from __future__ import annotations

import asyncio
import os

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ALL_MANIFESTS = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST]
UPSTREAM = "https://registry.test"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeClock:
    """Wall-clock time that moves only when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Image:
    repo: str
    tag: str
    manifest: bytes
    media_type: str
    blobs: dict[str, bytes]

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    @property
    def layer(self) -> str:
        return json.loads(self.manifest)["layers"][0]["digest"]


@dataclass
class ImageList:
    repo: str
    tag: str
    manifest: bytes
    media_type: str
    children: dict[str, Image]      # architecture -> its image

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)


@dataclass
class Answer:
    """A manifest answer about to be sent: raw headers, so that a test can put any bytes in them;
    the Content-Length is added from the body unless the headers have one."""

    status: int
    headers: dict[str, bytes]
    body: bytes

    def response(self, head: bool) -> httpx.Response:
        raw = [(k.encode(), v) for k, v in self.headers.items()]
        if "content-length" not in self.headers:
            raw.append((b"content-length", str(len(self.body)).encode()))
        return httpx.Response(self.status, headers=raw, stream=Body(b"" if head else self.body))


@dataclass
class Seen:
    method: str
    url: httpx.URL
    headers: httpx.Headers

    @property
    def path(self) -> str:
        return self.url.path


@dataclass
class FakeRegistry:
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)   # (repo, ref) -> body, type
    blobs: dict[str, bytes] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    down: bool = False                    # no HTTP answer at all (connection refused)
    status: int | None = None             # answer every registry request with this status
    token: str | None = None              # require "Bearer <token>", issued by https://<auth_host>/token
    auth_host: str = "auth.test"          # the token service's host
    realm: str | None = None              # the challenge's realm instead of https://<auth_host>/token
                                          # (requests to its scheme, host, port and path are token requests)
    redirect_blobs: bool = False          # blobs answer 307 to https://cdn.test/...
    tamper: set[str] = field(default_factory=set)   # blob digests served with wrong bytes
    on_request: Callable[[httpx.Request], None] | None = None
    dockerhub: bool = False               # an OCI index falls back to amd64 too (Distribution: 404)
    # a client that sends no Accept takes no list (as Distribution and Docker Hub answer it); off:
    # it gets what the tag holds
    no_accept_takes_no_list: bool = False
    # changes the answer to a manifest request (a hostile upstream) before it is sent
    alter_manifest: Callable[[httpx.Request, Answer], None] | None = None
    referrers: bool = False               # answers GET /v2/<name>/referrers/<digest> (OCI 1.1)
    filters: bool = True                  # ... and applies ?artifactType= (says so: OCI-Filters-Applied)
    alter_referrers: Callable[[httpx.Request, Answer], None] | None = None
    # blobs are served only for a repository an image holding them was pushed to (as a real
    # registry does); off: any repository serves any blob it has
    scoped_blobs: bool = False
    owners: dict[str, set[str]] = field(default_factory=dict)   # blob digest -> repositories
    # blob digest -> an event: its body stops after the first chunk until the event is set
    held: dict[str, asyncio.Event] = field(default_factory=dict)
    # path -> URL: a request for the path (after authentication) is answered 307 to the URL
    redirects: dict[str, str] = field(default_factory=dict)
    # URL -> (content type, body): what another host answers (a redirect's target)
    elsewhere: dict[str, tuple[str, bytes]] = field(default_factory=dict)

    # --- content

    def push(self, repo: str, tag: str | None, layer: bytes = b"layer bytes\n" * 100, *,
             config: bytes | None = None, media_type: str = OCI_MANIFEST, architecture: str = "amd64") -> Image:
        """An image; ``tag=None`` stores it by digest only (a list's child)."""
        config = config if config is not None else json.dumps({"architecture": architecture, "os": "linux",
                                                               "tag": tag}).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": media_type,
            "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(layer), "size": len(layer)}],
        }, indent=3).encode()
        self.blobs[digest_of(config)] = config
        self.blobs[digest_of(layer)] = layer
        for digest in (digest_of(config), digest_of(layer)):
            self.owners.setdefault(digest, set()).add(repo)
        self.manifests[(repo, digest_of(manifest))] = (manifest, media_type)
        if tag is not None:
            self.manifests[(repo, tag)] = (manifest, media_type)
        return Image(repo, tag or "", manifest, media_type, {digest_of(config): config, digest_of(layer): layer})

    def push_list(self, repo: str, tag: str, media_type: str = DOCKER_LIST,
                  architectures: tuple[str, ...] = ("amd64", "arm64"), child_type: str | None = None) -> ImageList:
        """A multi-platform image: a Docker manifest list of Docker schema2 manifests, or an OCI
        index of OCI manifests (unless ``child_type`` says otherwise)."""
        child_type = child_type or (DOCKER_MANIFEST if media_type == DOCKER_LIST else OCI_MANIFEST)
        children = {arch: self.push(repo, None, f"{arch} layer of {repo}:{tag}\n".encode() * 50,
                                    media_type=child_type, architecture=arch) for arch in architectures}
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": media_type,
            "manifests": [{"mediaType": child_type, "digest": child.digest, "size": len(child.manifest),
                           "platform": {"architecture": arch, "os": "linux"}} for arch, child in children.items()],
        }, indent=3).encode()
        self.manifests[(repo, tag)] = self.manifests[(repo, digest_of(manifest))] = (manifest, media_type)
        return ImageList(repo, tag, manifest, media_type, children)

    def push_artifact(self, repo: str, subject: str, artifact_type: str, data: bytes = b"signature\n") -> Image:
        """An artifact (a signature, an SBOM) whose ``subject`` is the manifest ``subject``, by digest only."""
        empty = b"{}"
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of(empty), "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": digest_of(data), "size": len(data)}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1234},
            "annotations": {"org.example.kind": artifact_type.rsplit("/", 1)[-1]},
        }).encode()
        self.blobs[digest_of(empty)] = empty
        self.blobs[digest_of(data)] = data
        self.manifests[(repo, digest_of(manifest))] = (manifest, OCI_MANIFEST)
        return Image(repo, "", manifest, OCI_MANIFEST, {digest_of(empty): empty, digest_of(data): data})

    def referrers_of(self, repo: str, subject: str, artifact_type: str | None = None) -> list[dict]:
        """The descriptors the referrers API lists for ``subject``, in digest order."""
        found = []
        for (r, reference), (body, media_type) in sorted(self.manifests.items()):
            if r != repo or not reference.startswith("sha256:"):
                continue
            document = json.loads(body)
            if not isinstance(document, dict) or (document.get("subject") or {}).get("digest") != subject:
                continue
            if artifact_type is not None and document.get("artifactType") != artifact_type:
                continue
            found.append({"mediaType": media_type, "digest": reference, "size": len(body),
                          "artifactType": document["artifactType"], "annotations": document["annotations"]})
        return found

    def referrers_body(self, repo: str, subject: str, artifact_type: str | None = None) -> bytes:
        """The exact bytes it answers (what the mirror must pass on)."""
        return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                           "manifests": self.referrers_of(repo, subject, artifact_type)}).encode()

    @property
    def realm_url(self) -> str:
        return self.realm or f"https://{self.auth_host}/token"

    def _is_realm(self, url: httpx.URL) -> bool:
        if self.realm is None:
            return False
        realm = httpx.URL(self.realm)
        return (url.scheme, url.host, url.port, url.path) == (realm.scheme, realm.host, realm.port, realm.path)

    # --- what it saw

    def requests(self, method: str | None = None, path_contains: str = "") -> list[Seen]:
        return [s for s in self.seen if (method is None or s.method == method) and path_contains in s.path]

    # --- the transport

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(Seen(request.method, request.url, request.headers))
        if self.on_request is not None:
            self.on_request(request)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.host == self.auth_host or self._is_realm(request.url):
            return response(200, json_body={"token": self.token, "expires_in": 300})
        if request.url.host == "cdn.test":
            return self._blob(request.url.path.rsplit("/", 1)[-1], request)
        if str(request.url) in self.elsewhere:
            content_type, body = self.elsewhere[str(request.url)]
            return httpx.Response(200, headers={"content-type": content_type}, stream=Body(body))
        if self.token is not None and request.headers.get("authorization") != f"Bearer {self.token}":
            scope = ""
            if request.url.path.startswith("/v2/") and request.url.path.count("/") >= 4:
                repo = request.url.path[4:].rsplit("/", 2)[0]
                scope = f',scope="repository:{repo}:pull"'
            return response(401, {"WWW-Authenticate": f'Bearer realm="{self.realm_url}",'
                                                      f'service="registry.test"{scope}'},
                            json_body={"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]})
        if self.status is not None:
            return _error(self.status, "UNKNOWN", "upstream trouble")
        if request.url.path in self.redirects:
            return response(307, {"Location": self.redirects[request.url.path]})
        path = request.url.path.removeprefix("/v2/")
        if path == "":
            return response(200, json_body={})
        if "/manifests/" in path:
            repo, _, reference = path.rpartition("/manifests/")
            return self._manifest(repo, reference, request)
        if "/blobs/" in path:
            if self.scoped_blobs and repo_of_blob(path) not in self.owners.get(path.rsplit("/", 1)[-1], ()):
                return _error(404, "BLOB_UNKNOWN", "blob unknown to registry")
            if self.redirect_blobs:
                digest = path.rsplit("/", 1)[-1]
                return response(307, {"Location": f"https://cdn.test/signed/{digest}"})
            return self._blob(path.rsplit("/", 1)[-1], request)
        if "/referrers/" in path:
            repo, _, subject = path.rpartition("/referrers/")
            return self._referrers(repo, subject, request)
        if path.endswith("/tags/list"):
            repo = path.removesuffix("/tags/list")
            tags = sorted(ref for r, ref in self.manifests if r == repo and ":" not in ref)
            if not tags:
                return _error(404, "NAME_UNKNOWN", "repository name not known to registry")
            return response(200, json_body={"name": repo, "tags": tags})
        return _error(404, "NAME_UNKNOWN", "no such endpoint")

    def _manifest(self, repo: str, reference: str, request: httpx.Request) -> httpx.Response:
        answer = self._negotiate(repo, reference, request)
        if isinstance(answer, httpx.Response):
            return answer
        if self.alter_manifest is not None:
            self.alter_manifest(request, answer)
        return answer.response(head=request.method == "HEAD")

    def _negotiate(self, repo: str, reference: str, request: httpx.Request) -> Answer | httpx.Response:
        found = self.manifests.get((repo, reference))
        if found is None:
            return _error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        body, media_type = found
        accepted = {item.split(";", 1)[0].strip() for value in request.headers.get_list("accept")
                    for item in value.split(",")}
        if self.no_accept_takes_no_list:
            accepted.discard("*/*")     # (what httpx sends for a client that sent none)
        takes_no_list = self.no_accept_takes_no_list and media_type in (DOCKER_LIST, OCI_INDEX)
        if (accepted or takes_no_list) and media_type not in accepted:
            platform = None
            if media_type == DOCKER_LIST or (media_type == OCI_INDEX and self.dockerhub):
                # what Docker Hub and Distribution give a client that takes no list: linux/amd64
                entries = json.loads(body)["manifests"]
                platform = next((e for e in entries if e["platform"]["architecture"] == "amd64"), None)
            if platform is None:
                return _error(404, "MANIFEST_UNKNOWN", "manifest unknown in the accepted formats")
            body, media_type = self.manifests[(repo, platform["digest"])]
            if accepted and media_type not in accepted:
                return _error(404, "MANIFEST_UNKNOWN", "manifest unknown in the accepted formats")
        return Answer(200, {"content-type": media_type.encode(), "docker-content-digest": digest_of(body).encode(),
                            "content-length": str(len(body)).encode()}, body)

    def _referrers(self, repo: str, subject: str, request: httpx.Request) -> httpx.Response:
        if not self.referrers:      # Distribution 2.8: no such route
            answer = Answer(404, {"content-type": b"text/plain; charset=utf-8"}, b"404 page not found\n")
        else:
            wanted = request.url.params.get("artifactType")
            applied = wanted is not None and self.filters
            body = self.referrers_body(repo, subject, wanted if applied else None)
            headers = {"content-type": OCI_INDEX.encode()}
            if applied:
                headers["oci-filters-applied"] = b"artifactType"
            answer = Answer(200, headers, body)
        if self.alter_referrers is not None:
            self.alter_referrers(request, answer)
        return answer.response(head=request.method == "HEAD")

    def _blob(self, digest: str, request: httpx.Request) -> httpx.Response:
        data = self.blobs.get(digest)
        if data is None:
            return _error(404, "BLOB_UNKNOWN", "blob unknown to registry")
        if digest in self.tamper:
            data = bytes(b ^ 0xFF for b in data)
        headers = {"Content-Length": str(len(data)), "Docker-Content-Digest": digest,
                   "Content-Type": "application/octet-stream"}
        if digest in self.held and request.method != "HEAD":
            return httpx.Response(200, headers=headers, stream=Body(data, hold=self.held[digest]))
        return response(200, headers, b"" if request.method == "HEAD" else data)


class Body(httpx.AsyncByteStream):
    """A body that is streamed, like a real connection's (``content=`` would be read at once,
    and the mirror reads upstream bodies with ``aiter_raw``)."""

    def __init__(self, data: bytes, chunk: int = 64 * 1024, hold: asyncio.Event | None = None) -> None:
        self.data = data
        self.chunk = chunk
        self.hold = hold            # set: the rest of the body follows the first chunk

    async def __aiter__(self):
        for offset in range(0, len(self.data), self.chunk):
            yield self.data[offset:offset + self.chunk]
            if self.hold is not None:
                await self.hold.wait()


def response(status: int, headers: dict[str, str] | None = None, body: bytes = b"", *,
             json_body: object = None) -> httpx.Response:
    headers = dict(headers or {})
    if json_body is not None:
        body = json.dumps(json_body).encode()
        headers.setdefault("Content-Type", "application/json")
    headers.setdefault("Content-Length", str(len(body)))
    return httpx.Response(status, headers=headers, stream=Body(body))


def repo_of_blob(path: str) -> str:
    """``a/b/blobs/<digest>`` -> ``a/b``."""
    return path.rpartition("/blobs/")[0]


def _error(status: int, code: str, message: str) -> httpx.Response:
    return response(status, json_body={"errors": [{"code": code, "message": message}]})


class Holding(httpx.AsyncBaseTransport):
    """An upstream transport (the fake registry's) that holds each request ``match`` picks
    until :meth:`release`, so that concurrent clients meet in the mirror while it waits."""

    def __init__(self, inner: httpx.AsyncBaseTransport,
                 match: Callable[[httpx.Request], bool] = lambda request: False) -> None:
        self.inner = inner
        self.match = match
        self.held: list[tuple[httpx.Request, asyncio.Event]] = []    # every request held, in order

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.match(request):
            event = asyncio.Event()
            self.held.append((request, event))
            await event.wait()
        return await self.inner.handle_async_request(request)

    def release(self) -> None:
        """Let every request held so far go on."""
        for _, event in self.held:
            event.set()


class RoomForAll:
    """A cache accountant (inflight.Space) that says yes to everything; counts disk_full()."""

    full = 0

    async def reserve(self, size: int) -> bool:
        return True

    def release(self, size: int) -> None:
        pass

    def disk_full(self) -> None:
        self.full += 1

    def capacity(self) -> int:
        return 1 << 40

    def spill_room(self, size: int) -> bool:
        return True

    def lease(self, digest: str):
        return lambda: None


def piece_bytes(piece) -> bytes:
    """The bytes of one piece a blob body yields: bytes, a list of buffers (from memory), or a
    file range."""
    if isinstance(piece, (bytes, bytearray)):
        return bytes(piece)
    if isinstance(piece, list):
        return b"".join(bytes(buffer) for buffer in piece)
    return os.pread(piece.fileno(), piece.count, piece.offset)
