"""A hostile or broken upstream: huge and compressed bodies, trickles, deadlines, endless cuts.

Bodies here are generated as they are read (a "1 GiB" body is never held anywhere) and count
what was pulled from them, so a test asserts that the mirror read no more than its cap. Each
carries a fuse: past FUSE bytes it breaks off, so a mirror without the cap fails the test
instead of exhausting the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.app import DockerMirror
from dockermirror.errors import RegistryError
from dockermirror.mirror import Repo
from dockermirror.oci import MAX_MANIFEST_SIZE, Digest
from dockermirror.upstream import bodies as bodies_module
from dockermirror.upstream import client as upstream_client
from dockermirror.upstream.client import UpstreamClient
from tests.unit.conftest import config_text
from tests.unit.fakes import ALL_MANIFESTS, UPSTREAM, FakeRegistry, digest_of, response

pytestmark = pytest.mark.anyio
ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]
KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
FUSE = 32 * MiB         # (decoded) bytes after which a test body breaks off
# The promises under test (dockermirror.upstream.bodies, .auth, .client), spelled out here
ERROR_BODY = 64 * KiB           # most bytes of an error answer read
MAX_TOKEN_RESPONSE = MiB        # most bytes of a token response read
MIN_PROGRESS = 64 * KiB         # what an attempt must bring to count as progress
NO_PROGRESS_ATTEMPTS = 3        # attempts in a row without progress before giving up


class Lazy(httpx.AsyncByteStream):
    """``total`` bytes of ``piece`` repeated, made as they are read; ``pulled`` counts them."""

    def __init__(self, piece: bytes, total: int) -> None:
        self.piece, self.total, self.pulled = piece, total, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.pulled < self.total:
            if self.pulled >= FUSE:
                raise httpx.ReadError("the test's fuse: far more was read than any cap allows")
            self.pulled += len(self.piece)
            yield self.piece


class GzipBomb(httpx.AsyncByteStream):
    """A gzip stream of ``total`` zero bytes, compressed as it is read (about 1 KiB per MiB);
    ``pulled`` counts the bytes it stands for once inflated."""

    def __init__(self, total: int = GiB) -> None:
        self.total, self.pulled = total, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        zeros = bytes(MiB)
        while self.pulled < self.total:
            if self.pulled >= FUSE:
                raise httpx.ReadError("the test's fuse: far more was inflated than any cap allows")
            self.pulled += MiB
            yield deflate.compress(zeros) + deflate.flush(zlib.Z_SYNC_FLUSH)
        yield deflate.flush()


def huge(status: int, encoding: str, headers: dict[str, str] | None = None) -> tuple[httpx.Response, Lazy | GzipBomb]:
    """A 1 GiB answer (no length), plain or a gzip bomb."""
    body: Lazy | GzipBomb = GzipBomb() if encoding == "gzip" else Lazy(b"x" * (64 * KiB), GiB)
    headers = {"Content-Type": "application/json", **(headers or {})}
    if encoding == "gzip":
        headers["Content-Encoding"] = "gzip"
    return httpx.Response(status, headers=headers, stream=body), body


@contextlib.asynccontextmanager
async def mirror_with(tmp_path: Path, handle: Callable[[httpx.Request], httpx.Response],
                      extra: str = "") -> AsyncIterator[httpx.AsyncClient]:
    config = configuration.loads(config_text(tmp_path / "cache", extra))
    app = DockerMirror(config, upstream_transport=httpx.MockTransport(handle))
    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            yield client


def oci_error(answer: httpx.Response) -> str:
    assert answer.headers["content-type"].startswith("application/json")
    return answer.json()["errors"][0]["code"]


# --- item 11: every body read into memory is capped, after decoding


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
@pytest.mark.parametrize("path", ["/v2/acme/tool/manifests/sha256:" + "a" * 64,
                                  "/v2/acme/tool/blobs/sha256:" + "b" * 64,
                                  "/v2/acme/tool/tags/list"])
async def test_a_huge_error_body_is_read_only_up_to_its_cap(tmp_path, path, encoding):
    bodies = []

    def handle(request: httpx.Request) -> httpx.Response:
        answer, body = huge(500, encoding)
        bodies.append(body)
        return answer

    async with mirror_with(tmp_path, handle) as client:
        answer = await client.get(path, headers=ACCEPT)
    assert answer.status_code == 503 and oci_error(answer) == "UNAVAILABLE"
    assert len(bodies) == 1
    # at most the cap, and one piece (64 KiB, or 1 MiB inflated) it arrived in
    assert bodies[0].pulled <= ERROR_BODY + (MiB if encoding == "gzip" else 64 * KiB)


@pytest.mark.parametrize("kind", ["gzip bomb", "endless", "announced 1 GiB"])
async def test_a_huge_token_response_is_refused_without_reading_it(tmp_path, kind):
    registry = FakeRegistry(token="t")
    registry.push("acme/tool", "1.0")
    bodies = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host != "auth.test":
            return registry.handle(request)
        registry.seen.append(request)
        if kind == "announced 1 GiB":
            body = Lazy(b" " * (64 * KiB), GiB)
            bodies.append(body)
            return httpx.Response(200, headers={"Content-Length": str(GiB)}, stream=body)
        answer, body = huge(200, "gzip" if kind == "gzip bomb" else "identity")
        bodies.append(body)
        return answer

    async with mirror_with(tmp_path, handle) as client:
        answer = await client.get("/v2/acme/tool/manifests/1.0", headers=ACCEPT)
    assert answer.status_code == 503 and oci_error(answer) == "UNAVAILABLE"
    assert "token service auth.test" in answer.json()["errors"][0]["message"]
    assert len(bodies) == 1
    assert bodies[0].pulled <= MAX_TOKEN_RESPONSE + MiB


class Paused(httpx.AsyncByteStream):
    """``body`` in 256 KiB pieces, pausing ``pause`` seconds halfway."""

    def __init__(self, body: bytes, pause: float) -> None:
        self.body, self.pause = body, pause

    async def __aiter__(self) -> AsyncIterator[bytes]:
        half = len(self.body) // 2
        for start in range(0, len(self.body), 256 * KiB):
            if start <= half < start + 256 * KiB:
                await asyncio.sleep(self.pause)
            yield self.body[start:start + 256 * KiB]


async def test_large_answers_read_whole_at_once_share_one_memory_budget(tmp_path, monkeypatch):
    """Many clients asking for large tag lists at once (or a hostile upstream's) hold at most
    WHOLE_BODIES bytes over OWN_BODY each: the others get 503 + Retry-After, those within it the
    whole list; afterwards the budget is all free again."""
    monkeypatch.setattr(bodies_module, "WHOLE_BODIES", 8 * MiB)
    monkeypatch.setattr(bodies_module, "OWN_BODY", 1 * MiB)
    tags = json.dumps({"name": "acme/tool", "tags": [f"t{n:07d}" for n in range(600_000)]}).encode()
    assert 6 * MiB < len(tags) < 8 * MiB

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": "application/json"}, stream=Paused(tags, 0.3))

    async with mirror_with(tmp_path, handle) as client:
        answers = await asyncio.gather(*(client.get(f"/v2/acme/tool{n}/tags/list") for n in range(8)))
    ok = [a for a in answers if a.status_code == 200]
    busy = [a for a in answers if a.status_code == 503]
    assert len(ok) + len(busy) == 8 and 1 <= len(ok) <= 3 and busy       # 8 MiB: about 2 of them at once
    assert all(a.content == tags for a in ok)
    assert all(oci_error(a) == "UNAVAILABLE" and a.headers["retry-after"] for a in busy)
    assert bodies_module._whole["held"] == 0


async def test_a_gzip_bomb_manifest_is_refused_at_the_manifest_cap(tmp_path):
    bodies = []

    def handle(request: httpx.Request) -> httpx.Response:
        answer, body = huge(200, "gzip", {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        bodies.append(body)
        return answer

    async with mirror_with(tmp_path, handle) as client:
        answer = await client.get("/v2/acme/tool/manifests/sha256:" + "c" * 64, headers=ACCEPT)
    assert answer.status_code == 502 and oci_error(answer) == "MANIFEST_INVALID"
    assert bodies[0].pulled <= MAX_MANIFEST_SIZE + MiB


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_manifest_is_inflated_and_verified(tmp_path, encoding):
    """We ask for identity; an upstream (or CDN) that compresses anyway still gets the right bytes."""
    registry = FakeRegistry()
    image = registry.push("acme/tool", "1.0")

    def handle(request: httpx.Request) -> httpx.Response:
        answer = registry.handle(request)
        if "/manifests/" not in request.url.path or request.method != "GET":
            return answer
        plain = image.manifest
        packed = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
        return response(200, {"Content-Type": answer.headers["content-type"], "Content-Encoding": encoding,
                              "Docker-Content-Digest": image.digest}, packed)

    async with mirror_with(tmp_path, handle) as client:
        answer = await client.get("/v2/acme/tool/manifests/1.0", headers=ACCEPT)
    assert answer.status_code == 200
    assert answer.content == image.manifest and answer.headers["docker-content-digest"] == image.digest


async def test_an_encoding_we_cannot_decode_is_a_clean_502(tmp_path):
    def handle(request: httpx.Request) -> httpx.Response:
        return response(200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json",
                              "Content-Encoding": "br"}, b"\x1b\x00\x00not really brotli")

    async with mirror_with(tmp_path, handle) as client:
        answer = await client.get("/v2/acme/tool/manifests/sha256:" + "d" * 64, headers=ACCEPT)
    assert answer.status_code == 502
    assert "encoded as 'br'" in answer.json()["errors"][0]["message"]


# --- item 9: a body must keep moving, and a transfer has a deadline


def blob_server(data: bytes, body_for: Callable[[int, int], httpx.AsyncByteStream],
                seen: list[httpx.Request]) -> Callable[[httpx.Request], httpx.Response]:
    """Serves one blob, honouring ``Range: bytes=N-``; ``body_for(attempt, start)`` makes each body."""
    size = len(data)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        start = int(request.headers.get("range", "bytes=0-")[6:-1])
        headers = {"Content-Length": str(size - start), "Content-Type": "application/octet-stream"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        return httpx.Response(206 if start else 200, headers=headers, stream=body_for(len(seen), start))

    return handle


class Paced(httpx.AsyncByteStream):
    """``data`` from ``start``: ``piece`` bytes every ``every`` seconds, the first ``slow`` bytes
    only (then the rest at once); breaks off after ``cut`` bytes if given."""

    def __init__(self, data: bytes, start: int, *, piece: int = 64 * KiB, every: float = 0.0,
                 slow: int | None = None, cut: int | None = None) -> None:
        self.data, self.start, self.piece, self.every, self.slow, self.cut = data, start, piece, every, slow, cut

    async def __aiter__(self) -> AsyncIterator[bytes]:
        pos, sent = self.start, 0
        while pos < len(self.data):
            if self.cut is not None and sent >= self.cut:
                raise httpx.ReadError("connection reset by the test upstream")
            slow = self.slow is None or sent < self.slow
            step = self.piece if slow else 64 * KiB
            if self.cut is not None:
                step = min(step, self.cut - sent)
            chunk = self.data[pos:pos + step]
            if slow and self.every:
                await asyncio.sleep(self.every)
            pos += len(chunk)
            sent += len(chunk)
            yield chunk


async def read_all(client: UpstreamClient, digest: str, pause: float = 0.0) -> bytes:
    stream = await client.open_blob("acme/tool", digest)
    try:
        parts = []
        async for chunk in stream.chunks():
            parts.append(chunk)
            if pause:
                await asyncio.sleep(pause)
        return b"".join(parts)
    finally:
        await stream.aclose()


async def test_a_trickling_blob_body_is_treated_as_stalled_and_resumed(caplog):
    """One byte every 10 ms never trips httpx's read timeout; fewer than MIN_PROGRESS bytes in
    a read_timeout window does: the rest is asked for with Range."""
    data = bytes(range(256)) * 4096            # 1 MiB
    seen: list[httpx.Request] = []
    # the first answer trickles its first 500 bytes (5 s), then would send the rest at once
    handle = blob_server(data, lambda attempt, start: Paced(data, start, piece=1, every=0.01, slow=500)
                         if attempt == 1 else Paced(data, start), seen)
    client = UpstreamClient(UPSTREAM, transport=httpx.MockTransport(handle), read_timeout=0.5)
    caplog.set_level(logging.INFO, "dockermirror.upstream")
    try:
        assert await read_all(client, digest_of(data)) == data
    finally:
        await client.aclose()
    assert len(seen) == 2
    resumed_at = int(seen[1].headers["range"][6:-1])
    assert 0 < resumed_at < 500
    assert "UpstreamStalled: fewer than 64 KiB arrived in 0.5 s); resuming there" in caplog.text


async def test_a_consumer_that_pauses_is_not_taken_for_a_stalled_upstream(caplog):
    """Only time spent waiting on the upstream counts: a slow reader of the stream is no stall."""
    data = bytes(4 * MiB)
    seen: list[httpx.Request] = []
    handle = blob_server(data, lambda attempt, start: Paced(data, start, piece=MiB), seen)
    client = UpstreamClient(UPSTREAM, transport=httpx.MockTransport(handle), read_timeout=0.2)
    try:
        assert await read_all(client, digest_of(data), pause=0.4) == data
    finally:
        await client.aclose()
    assert len(seen) == 1


async def test_a_transfer_is_ended_at_its_deadline(caplog):
    """Moving, but too slowly to finish within upstream.transfer_timeout: ended, not held forever."""
    data = bytes(16 * MiB)                     # 64 KiB every 50 ms: 12.8 s
    seen: list[httpx.Request] = []
    handle = blob_server(data, lambda attempt, start: Paced(data, start, every=0.05), seen)
    client = UpstreamClient(UPSTREAM, transport=httpx.MockTransport(handle), read_timeout=0.5,
                            transfer_timeout=1.0)
    caplog.set_level(logging.WARNING, "dockermirror.upstream")
    try:
        with pytest.raises(RegistryError) as caught:
            await read_all(client, digest_of(data))
    finally:
        await client.aclose()
    assert caught.value.status == 504
    assert "did not finish within upstream.transfer_timeout (1 s)" in caplog.text
    assert len(seen) == 1


# --- item 12: resume as long as each attempt moves forward


async def test_a_body_cut_every_256_KiB_is_resumed_to_the_end(tmp_path, caplog):
    data = bytes(range(251)) * (16 * KiB)      # ~3.9 MiB: 16 cuts
    digest = digest_of(data)
    seen: list[httpx.Request] = []
    handle = blob_server(data, lambda attempt, start: Paced(data, start, cut=256 * KiB), seen)
    caplog.set_level(logging.INFO, "dockermirror.upstream")
    async with mirror_with(tmp_path, handle) as client:
        answer = await client.get(f"/v2/acme/tool/blobs/{digest}")
    assert answer.status_code == 200 and answer.content == data
    assert len(seen) == -(-len(data) // (256 * KiB))
    assert [r.headers.get("range") for r in seen[:3]] == [None, f"bytes={256 * KiB}-", f"bytes={512 * KiB}-"]
    assert caplog.text.count(f"upstream broke off acme/tool@{digest}") == len(seen) - 1
    blob = tmp_path / "cache" / "blobs" / "sha256" / digest[7:9] / digest[7:]
    assert blob.read_bytes() == data           # verified and cached


@pytest.mark.parametrize("stuck", ["cut where it starts", "answers 503"])
async def test_an_upstream_that_stops_moving_is_given_up_after_the_bound(tmp_path, caplog, monkeypatch, stuck):
    """Five attempts that each bring 256 KiB, then none: resumed while it moved, then
    NO_PROGRESS_ATTEMPTS more, then its client is cut off."""
    monkeypatch.setattr(upstream_client, "BACKOFF", 0.01, raising=False)
    data = bytes(range(251)) * (16 * KiB)
    digest = digest_of(data)
    seen: list[httpx.Request] = []
    moving = 5

    def body_for(attempt: int, start: int) -> httpx.AsyncByteStream:
        return Paced(data, start, cut=256 * KiB if attempt <= moving else 0)

    serve = blob_server(data, body_for, seen)

    def handle(request: httpx.Request) -> httpx.Response:
        if stuck == "answers 503" and len(seen) >= moving:
            seen.append(request)
            return response(503, json_body={"errors": [{"code": "UNAVAILABLE", "message": "busy"}]})
        return serve(request)

    caplog.set_level(logging.WARNING, "dockermirror.upstream")
    async with mirror_with(tmp_path, handle) as client:
        try:
            answer = await client.get(f"/v2/acme/tool/blobs/{digest}")
        except Exception:  # cut off: whatever the client library raises
            pass
        else:
            pytest.fail(f"answered completely: {answer.status_code}")
    assert len(seen) == moving + NO_PROGRESS_ATTEMPTS
    assert seen[-1].headers["range"] == f"bytes={moving * 256 * KiB}-"
    assert (f"at byte {moving * 256 * KiB} of {len(data)}" in caplog.text
            and f"giving up after {NO_PROGRESS_ATTEMPTS} attempts in a row without progress" in caplog.text)
    assert not list((tmp_path / "cache" / "blobs").rglob(digest[7:]))


def test_the_promises_spelled_out_here_are_the_code_s():
    from dockermirror.upstream import auth, bodies

    assert (bodies.ERROR_BODY, auth.MAX_TOKEN_RESPONSE, bodies.MIN_PROGRESS, upstream_client.NO_PROGRESS_ATTEMPTS) \
        == (ERROR_BODY, MAX_TOKEN_RESPONSE, MIN_PROGRESS, NO_PROGRESS_ATTEMPTS)


# --- item 9: a full connection pool is load: 503 with Retry-After, not a hang


@pytest.mark.parametrize("path", ["/v2/acme/tool/blobs/sha256:" + "e" * 64,
                                  "/v2/acme/tool/manifests/sha256:" + "e" * 64])
async def test_a_full_connection_pool_is_a_503_with_retry_after(tmp_path, path):
    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.PoolTimeout("no free connection", request=request)

    async with mirror_with(tmp_path, handle) as client:
        answer = await client.get(path, headers=ACCEPT)
    assert answer.status_code == 503 and oci_error(answer) == "UNAVAILABLE"
    assert int(answer.headers["retry-after"]) > 0


@pytest.mark.parametrize("length", [b"\xb2", b"9" * 5000])     # "²".isdigit(); int() takes at most 4300 digits
async def test_an_odd_content_length_on_a_manifest_is_no_500(tmp_path, length):
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=[(b"Content-Type", b"application/vnd.oci.image.manifest.v1+json"),
                                            (b"Content-Length", length)], stream=Lazy(b"{}", 2))

    async with mirror_with(tmp_path, handle) as client:
        answer = await client.get("/v2/acme/tool/manifests/sha256:" + "f" * 64, headers=ACCEPT)
    # no plain number: the body's end is unknown, a protocol error (as h11 says on a real socket)
    assert answer.status_code == 503 and oci_error(answer) == "UNAVAILABLE"
    assert "Content-Length" in answer.json()["errors"][0]["message"]


@pytest.mark.parametrize("where", ["error body", "token response"])
async def test_deeply_nested_json_from_the_upstream_is_no_500(tmp_path, where):
    """json.loads('[' * 60000) raises RecursionError, not ValueError."""
    registry = FakeRegistry(token="t" if where == "token response" else None)
    registry.push("acme/tool", "1.0")
    nested = b"[" * 60000

    def handle(request: httpx.Request) -> httpx.Response:
        if where == "token response" and request.url.host == "auth.test":
            return response(200, {"Content-Type": "application/json"}, nested)
        if where == "error body":
            return response(500, {"Content-Type": "application/json"}, nested)
        return registry.handle(request)

    reference = "1.0" if where == "token response" else "sha256:" + "a" * 64   # a GET: an error body
    async with mirror_with(tmp_path, handle) as client:
        answer = await client.get(f"/v2/acme/tool/manifests/{reference}", headers=ACCEPT)
    assert answer.status_code == 503 and oci_error(answer) == "UNAVAILABLE"


# --- the Content-Length of a blob HEAD is passed on to the client: it must be one plain number

BLOB = "sha256:" + "b" * 64


@pytest.mark.parametrize("lengths", [
    [b"-1"], [b"abc"], [b"10, 20"], [b"1 0"], [b"+10"], [b"1_0"], [b"0x10"], [b"\xb2"], [b""],
    [str(2 ** 63).encode()], [b"9" * 19], [b"9" * 5000],
    [b"10", b"20"],                     # two Content-Length headers that differ
])
async def test_a_blob_head_with_a_length_that_is_no_plain_number_is_a_502(tmp_path, lengths):
    """The mirror answers a HEAD of a blob it does not hold with the upstream's HEAD, whose length
    it passes on: one that is not one plain decimal number is a bad upstream answer, 502 (the
    error's code and message are read from the mirror's core: a HEAD answer carries no body)."""
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.method == "HEAD"
        return httpx.Response(200, headers=[(b"Docker-Content-Digest", BLOB.encode()),
                                            *((b"Content-Length", length) for length in lengths)])

    async with mirror_with(tmp_path, handle) as client:
        answer = await client.head(f"/v2/acme/tool/blobs/{BLOB}")
    assert answer.status_code == 502 and answer.content == b""
    assert answer.headers["content-type"].startswith("application/json")

    config = configuration.loads(config_text(tmp_path / "cache2"))
    app = DockerMirror(config, upstream_transport=httpx.MockTransport(handle))
    async with app.running():
        repo = Repo(app.mirror.upstream, "acme/tool")
        with pytest.raises(RegistryError) as caught:
            await app.mirror.blob(repo, Digest.parse(BLOB), head=True)
    assert caught.value.status == 502 and caught.value.code == "UNKNOWN"
    assert caught.value.upstream_status == 200
    assert f"HEAD of blob {BLOB}" in caught.value.message and "Content-Length" in caught.value.message


@pytest.mark.parametrize("lengths, expected", [([b"1234"], "1234"), ([b" 1234 "], "1234"),
                                               ([b"1234", b"1234"], "1234"), ([b"1234, 1234"], "1234"),
                                               ([b"0"], "0"), ([b"9" * 18], "9" * 18), ([], None)])
async def test_a_blob_head_with_a_plain_length_passes_it_on(tmp_path, lengths, expected):
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=[(b"Docker-Content-Digest", BLOB.encode()),
                                            *((b"Content-Length", length) for length in lengths)])

    async with mirror_with(tmp_path, handle) as client:
        answer = await client.head(f"/v2/acme/tool/blobs/{BLOB}")
    assert answer.status_code == 200 and answer.headers["docker-content-digest"] == BLOB
    assert answer.headers.get("content-length") == expected
