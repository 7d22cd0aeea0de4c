"""Hostile clients, in-process: whatever a request holds, it gets a 4xx OCI JSON error (never
a 500, never a dropped connection), no header we send carries what it chose, no log line
shows its control characters raw, and every file or transfer reader a request opened is
released on every path (refused, answered, abandoned, cancelled)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import httpx
import pytest

from dockermirror.api.ranges import ByteRange, RangeNotSatisfiable, parse_range
from dockermirror.cache import Limits
from dockermirror.cache.inflight import Transfer
from dockermirror.humanize import controls_escaped, printable
from dockermirror.service.logs import OneLineFormatter
from tests.unit.fakes import ALL_MANIFESTS, FakeRegistry

pytestmark = pytest.mark.anyio
ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]
HUGE = "9" * 5000          # more digits than int() takes (ValueError past 4,300)


class HeaderRegistry(FakeRegistry):
    """A fake upstream that adds the headers a test chose to every answer."""

    extra_headers: dict[str, str] = {}

    def handle(self, request: httpx.Request) -> httpx.Response:
        response = super().handle(request)
        for name, value in self.extra_headers.items():
            response.headers[name] = value
        return response


@pytest.fixture
def registry() -> HeaderRegistry:
    registry = HeaderRegistry()
    registry.extra_headers = {}
    return registry


def descriptors_on(path: Path) -> list[str]:
    """This process's open descriptors of ``path``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
        except OSError:
            continue
    return found


async def cached_blob(mirror, repo: str = "acme/tool") -> tuple[str, bytes, Path]:
    image = mirror.registry.push(repo, "1.0", layer=bytes(range(256)) * 64)
    url = f"/v2/{repo}/blobs/{image.layer}"
    assert (await mirror.client.get(url)).status_code == 200
    await mirror.app.cache.transfers.wait_all(5)
    path = mirror.blob_file(image.layer)
    assert path.exists()
    return url, image.blobs[image.layer], path


async def assert_released(mirror, path: Path) -> None:
    """No descriptor of the file is left open, and eviction may remove it (no lease kept)."""
    assert descriptors_on(path) == []
    cache = mirror.app.cache
    cache.set_limits(Limits(max_size=1, min_free=0))
    await cache.enforce()
    assert not path.exists(), "a leaked lease kept the blob from being evicted"


def assert_oci_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["errors"][0]
    assert error["code"] == code and error["message"]


# --- item 6: every path releases what it opened


@pytest.mark.parametrize("header, status, expected", [
    (f"bytes={HUGE}-", 416, None),                     # starts beyond any content
    (f"bytes=0-{HUGE}", 206, slice(None)),             # ends beyond: clipped to the content
    (f"bytes=-{HUGE}", 206, slice(None)),              # a suffix longer than the content
    (f"bytes=10-{HUGE}", 206, slice(10, None)),
    ("bytes=\u00b2-", 200, slice(None)),               # superscript two is no digit: ignored
])
async def test_a_range_with_a_huge_number_is_answered_and_releases_the_file(mirror, header, status, expected):
    url, data, path = await cached_blob(mirror)
    response = await mirror.client.get(url, headers=[(b"Range", header.encode())])
    assert response.status_code == status, response.text
    if expected is not None:
        assert response.content == data[expected]
    else:
        assert_oci_error(response, 416, "RANGE_INVALID")
    await assert_released(mirror, path)


def test_parse_range_never_raises_but_for_unsatisfiable():
    assert parse_range(f"bytes=0-{HUGE}", 100) == ByteRange(0, 100)
    assert parse_range(f"bytes=-{HUGE}", 100) == ByteRange(0, 100)
    assert parse_range("bytes=\u0663-", 100) is None      # Arabic-Indic three: not an ASCII digit
    assert parse_range("bytes=0-\u00b9", 100) is None     # superscript one
    assert parse_range(f"bytes={'0' * 5000}5-9", 100) == ByteRange(5, 10)   # leading zeros are fine
    with pytest.raises(RangeNotSatisfiable):
        parse_range(f"bytes={HUGE}-", 100)


async def test_a_namespace_with_a_newline_is_refused_and_releases_the_file(mirror):
    url, _, path = await cached_blob(mirror)
    response = await mirror.client.get(url + "?ns=docker.io%0A")
    assert_oci_error(response, 400, "NAME_INVALID")
    assert "oci-namespace" not in response.headers
    await assert_released(mirror, path)


def http_scope(path: str, method: str = "GET", headers: list[tuple[bytes, bytes]] = ()) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"mirror.test"), *headers], "client": ("192.0.2.7", 40000),
            "server": ("mirror.test", 80)}


def request_then(disconnect: asyncio.Event):
    """An ASGI receive: the (empty) request body, then a disconnect once ``disconnect`` is set."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    return receive


async def test_a_refused_response_start_releases_the_file(mirror):
    """uvicorn refuses a response start it cannot send (e.g. a header value with a newline)."""
    url, _, path = await cached_blob(mirror)
    starts = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            starts.append(message)
            raise RuntimeError("Invalid HTTP header value.")

    await mirror.app.asgi(http_scope(url), request_then(asyncio.Event()), send)
    assert len(starts) == 1 and starts[0]["status"] == 200
    await assert_released(mirror, path)


async def test_a_cancelled_response_releases_the_file(mirror):
    """Cancelled while the response start is being sent (server shutdown, a task group)."""
    url, _, path = await cached_blob(mirror)
    started = asyncio.Event()

    async def send(message: dict) -> None:
        started.set()
        await asyncio.Event().wait()        # the client never takes anything

    task = asyncio.get_running_loop().create_task(mirror.app.asgi(http_scope(url), request_then(asyncio.Event()),
                                                                  send))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_released(mirror, path)


async def test_a_client_gone_before_the_body_releases_the_file(mirror):
    url, _, path = await cached_blob(mirror)
    gone = asyncio.Event()
    gone.set()
    messages = []

    async def send(message: dict) -> None:
        messages.append(message["type"])
        if message["type"] != "http.response.start":
            raise ConnectionError("the client went away")

    await mirror.app.asgi(http_scope(url), request_then(gone), send)
    assert messages[0] == "http.response.start"
    await assert_released(mirror, path)


@pytest.mark.parametrize("failure", ["refused start", "cancelled"])
async def test_a_transfer_reader_is_released_on_every_path(mirror, monkeypatch, failure):
    """A reader of a download (MISS) that never reads is unregistered: it would otherwise hold
    the download's bytes in memory for nobody, and keep an uncached one running."""
    image = mirror.registry.push("acme/tool", "1.0", layer=b"z" * (3 * 1024 * 1024))
    followed: list[tuple[Transfer, object]] = []
    follow = Transfer.follow

    def recording_follow(self, start=0):
        follower = follow(self, start)
        followed.append((self, follower))
        return follower

    monkeypatch.setattr(Transfer, "follow", recording_follow)
    started = asyncio.Event()

    async def send(message: dict) -> None:
        started.set()
        if failure == "refused start":
            raise RuntimeError("Invalid HTTP header value.")
        await asyncio.Event().wait()

    run = mirror.app.asgi(http_scope(f"/v2/acme/tool/blobs/{image.layer}"), request_then(asyncio.Event()), send)
    task = asyncio.get_running_loop().create_task(run)
    await asyncio.wait_for(started.wait(), 10)
    if failure == "cancelled":
        task.cancel()
    await asyncio.wait({task}, timeout=10)
    assert len(followed) == 1
    transfer, _ = followed[0]
    assert transfer._readers == {}
    await mirror.app.cache.transfers.wait_all(10)


# --- item 16: bad input is a 4xx OCI error, never a 500


@pytest.mark.parametrize("method, path, headers, status, code", [
    # a manifest that cannot exist: neither a tag nor a digest (OCI conformance v1.1.1)
    ("GET", "/v2/acme/tool/manifests/.INVALID_MANIFEST_NAME", [], 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/acme/tool/manifests/-bad-tag", [], 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/acme/tool/manifests/" + "a" * 129, [], 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/acme/tool/manifests/tag%0A", [], 404, "MANIFEST_UNKNOWN"),
    # but a malformed digest stays a digest error
    ("GET", "/v2/acme/tool/manifests/sha256:1234", [], 400, "DIGEST_INVALID"),
    ("GET", "/v2/acme/tool/manifests/sha256:" + "a" * 63 + "%0A", [], 400, "DIGEST_INVALID"),
    # Accept is forwarded upstream: ASCII only
    ("GET", "/v2/acme/tool/manifests/1.0", [(b"Accept", "application/vnd.oci.image.index.v1+json\u00e9".encode())],
     400, "UNSUPPORTED"),
    ("GET", "/v2/acme/tool/manifests/1.0", [(b"Accept", b"\xc3\xa9\xff")], 400, "UNSUPPORTED"),
    # tags/list parameters
    ("GET", "/v2/acme/tool/tags/list?last=%0A", [], 400, "TAG_INVALID"),
    ("GET", "/v2/acme/tool/tags/list?last=%00", [], 400, "TAG_INVALID"),
    ("GET", "/v2/acme/tool/tags/list?last=a%26n%3D1", [], 400, "TAG_INVALID"),    # no parameter smuggling
    ("GET", "/v2/acme/tool/tags/list?n=%C2%B2", [], 400, "PAGINATION_NUMBER_INVALID"),   # n=²
    ("GET", "/v2/acme/tool/tags/list?n=%D9%A3", [], 400, "PAGINATION_NUMBER_INVALID"),   # Arabic-Indic 3
    ("GET", "/v2/acme/tool/tags/list?n=-1", [], 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", f"/v2/acme/tool/tags/list?n={HUGE}", [], 400, "PAGINATION_NUMBER_INVALID"),
    # ns: a registry host name, nothing else
    ("GET", "/v2/acme/tool/manifests/1.0?ns=docker.io%0A", [], 400, "NAME_INVALID"),
    ("GET", "/v2/acme/tool/manifests/1.0?ns=docker.io%0D%0AX-Evil:%201", [], 400, "NAME_INVALID"),
    ("GET", "/v2/acme/tool/manifests/1.0?ns=docker.io%00", [], 400, "NAME_INVALID"),
    ("GET", "/v2/acme/tool/manifests/1.0?ns=doc%E2%84%AAer.io", [], 400, "NAME_INVALID"),   # Kelvin sign K
    ("GET", "/v2/acme/tool/manifests/1.0?ns=%C2%A0docker.io", [], 400, "NAME_INVALID"),     # no-break space
    ("GET", "/v2/acme/tool/manifests/1.0?ns=docker.io%E2%80%A8", [], 400, "NAME_INVALID"),  # line separator
    ("GET", "/v2/acme/tool/manifests/1.0?ns=", [], 400, "NAME_INVALID"),
    ("GET", "/v2/acme/tool/tags/list?ns=docker.io%0A", [], 400, "NAME_INVALID"),
    ("GET", f"/v2/acme/tool/blobs/sha256:{'0' * 64}?ns=docker.io%0A", [], 400, "NAME_INVALID"),
    ("GET", "/v2/acme/tool/manifests/1.0?ns=" + "a" * 300, [], 400, "NAME_INVALID"),
    # names
    ("GET", "/v2/acme/t%C3%B6ol/manifests/1.0", [], 400, "NAME_INVALID"),
    ("GET", "/v2/acme/tool%0A/manifests/1.0", [], 400, "NAME_INVALID"),
])
async def test_bad_input_gets_a_4xx_oci_error_and_never_reaches_the_upstream(mirror, method, path, headers,
                                                                             status, code):
    mirror.registry.push("acme/tool", "1.0")
    response = await mirror.client.request(method, path, headers=[*ACCEPT[:1], *headers]
                                           if not any(k.lower() == b"accept" for k, _ in headers) else headers)
    assert_oci_error(response, status, code)
    assert all(value.isascii() and value.isprintable() for value in response.headers.values())
    assert mirror.registry.seen == []


@pytest.mark.parametrize("method", ["PROPFIND", "TRACE", "CONNECT", "OPTIONS", "FOO"])
async def test_any_other_method_is_a_405_in_json(mirror, method):
    for path in ("/v2/", "/v2/acme/tool/manifests/1.0"):
        response = await mirror.client.request(method, path)
        assert_oci_error(response, 405, "UNSUPPORTED")
        assert response.headers["allow"] == "GET, HEAD"
    assert mirror.registry.seen == []


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_conformance_nonexistent_manifest_is_404(mirror, method):
    response = await mirror.client.request(method, "/v2/acme/tool/manifests/.INVALID_MANIFEST_NAME")
    assert response.status_code == 404
    if method == "GET":
        assert response.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert mirror.registry.seen == []


async def test_valid_namespaces_are_echoed(mirror):
    image = mirror.registry.push("library/busybox", "latest")
    for namespace in ("docker.io", "registry-1.docker.io", "DOCKER.IO", "index.docker.io"):
        response = await mirror.client.get(f"/v2/library/busybox/manifests/latest?ns={namespace}", headers=ACCEPT)
        assert response.status_code == 200 and response.content == image.manifest, namespace
        assert response.headers["oci-namespace"] == namespace
    blob = await mirror.client.get(f"/v2/library/busybox/blobs/{image.layer}?ns=docker.io")
    assert blob.status_code == 200 and blob.headers["oci-namespace"] == "docker.io"
    other = await mirror.client.get("/v2/library/busybox/manifests/latest?ns=quay.io", headers=ACCEPT)
    assert_oci_error(other, 404, "NAME_UNKNOWN")


async def test_a_large_page_is_asked_for_as_the_largest_page(mirror):
    mirror.registry.push("acme/tool", "1.0")
    response = await mirror.client.get("/v2/acme/tool/tags/list?n=1000000&last=0.9")
    assert response.status_code == 200 and response.json()["tags"] == ["1.0"]
    assert [str(s.url.query, "ascii") for s in mirror.registry.requests("GET", "/tags/list")] == [
        "n=10000&last=0.9"]
    zero = await mirror.client.get("/v2/acme/tool/tags/list?n=0")
    assert zero.status_code == 200


@pytest.mark.parametrize("header, value", [
    ("Link", '</v2/acme/tool/tags/list?last=1.0>; rel="next"\u00e9'),
    ("Link", '</v2/acme/tool/tags/list?last=1.0>; rel="next"\x7f'),
])
async def test_an_upstream_header_that_cannot_be_forwarded_is_a_502(mirror, header, value):
    mirror.registry.push("acme/tool", "1.0")
    mirror.registry.extra_headers = {header: value}
    response = await mirror.client.get("/v2/acme/tool/tags/list")
    assert_oci_error(response, 502, "UNKNOWN")
    assert header.lower() not in response.headers


async def test_an_unsendable_retry_after_is_left_out_of_the_error(mirror):
    mirror.registry.push("acme/tool", "1.0")
    mirror.registry.status = 429
    mirror.registry.extra_headers = {"Retry-After": "10\x01"}
    response = await mirror.client.get("/v2/acme/tool/manifests/1.0", headers=ACCEPT)
    assert_oci_error(response, 429, "TOOMANYREQUESTS")
    assert "retry-after" not in response.headers


@pytest.mark.parametrize("value, passed", [("120", "120"), ("Wed, 21 Oct 2026 07:28:00 GMT", "Wed, 21 Oct 2026 07:28:00 GMT"),
                                           ("9" * 60_000, None), ("soon", None), ("-5", None), ("1e9", None)])
async def test_only_a_retry_after_that_is_one_is_passed_on(mirror, value, passed):
    """The upstream's 429 Retry-After reaches the client only as seconds (at most 10 digits) or an
    HTTP date; anything else (60,000 digits, words) is left out."""
    mirror.registry.push("acme/tool", "1.0")
    mirror.registry.status = 429
    mirror.registry.extra_headers = {"Retry-After": value}
    response = await mirror.client.get("/v2/acme/tool/manifests/1.0", headers=ACCEPT)
    assert_oci_error(response, 429, "TOOMANYREQUESTS")
    assert response.headers.get("retry-after") == passed


# --- item 17: the log shows control characters, never obeys them


async def test_control_characters_in_the_request_are_escaped_in_the_access_log(mirror, caplog):
    caplog.set_level(logging.INFO, "dockermirror.access")
    path = "/v2/acme/to%0D%0A1.2.3.4%20%22GET%20/v2/%22%20200%1B%5B2K/manifests/%C3%BC%5C"
    response = await mirror.client.get(path + "?ns=%0D%0A&x=%1B", headers=ACCEPT)
    assert response.status_code == 400
    [line] = [r.getMessage() for r in caplog.records if r.name == "dockermirror.access"]
    assert line.startswith('192.0.2.7 "GET /v2/acme/to\\x0d\\x0a1.2.3.4 \\x22GET /v2/\\x22 200\\x1b[2K'
                           '/manifests/\\xc3\\xbc\\x5c?ns=%0D%0A&x=%1B" 400 '), line
    assert line.isprintable()
    assert 'note="NAME_INVALID: invalid namespace ' in line


def test_the_log_formatter_escapes_what_any_message_holds():
    record = logging.LogRecord("dockermirror.mirror", logging.WARNING, __file__, 1,
                               "upstream said %s", ("a\rb\x1b[31mc\u2028d\x85e\nf",), None)
    line = OneLineFormatter().format(record)
    assert line.endswith("mirror: upstream said a\\x0db\\x1b[31mc\\u2028d\\x85e | f"), line
    assert line.isprintable()


def test_printable():
    assert printable("/v2/library/alpine/manifests/3") == "/v2/library/alpine/manifests/3"
    assert printable('a"b\\c\x00\x7f\u00fc') == "a\\x22b\\x5cc\\x00\\x7f\\xc3\\xbc"
    assert printable(b"q=\xff\x0a") == "q=\\xff\\x0a"
    assert printable('say "hi"', quote=False) == 'say "hi"'
    assert controls_escaped("tab\tstays, CR\rdoes not") == "tab\tstays, CR\\x0ddoes not"
    assert json.dumps(printable("\ud800")) == '"\\\\xed\\\\xa0\\\\x80"'


@pytest.mark.parametrize("length", ["\u00b2", "9" * 5000])
async def test_an_upstream_length_that_is_no_number_is_not_a_500(mirror, length):
    """str.isdigit() takes "²", and int() refuses 5,000 digits: no crash, but no plain number is a
    body whose end is unknown (RFC 9112 6.3): refused as a protocol error, as h11 does."""
    image = mirror.registry.push("acme/tool", "1.0")
    mirror.registry.extra_headers = {"Content-Length": length}
    blob = await mirror.client.get(f"/v2/acme/tool/blobs/{image.layer}")
    assert blob.status_code == 503 and blob.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert "Content-Length" in blob.json()["errors"][0]["message"]
    head = await mirror.client.head("/v2/acme/tool/manifests/1.0", headers=ACCEPT)
    assert head.status_code == 503


async def test_accept_lines_are_forwarded_without_surrounding_spaces(mirror):
    """A field value may not begin or end with a space (h11 refuses to send one, which the mirror
    took for an unreachable upstream: 503, then 30 s of stale tags): they are stripped."""
    image = mirror.registry.push("acme/tool", "1.0")
    accept = [("Accept", f" {a}\t ") for a in ALL_MANIFESTS] + [("Accept", "  ")]
    response = await mirror.client.get("/v2/acme/tool/manifests/1.0", headers=accept)
    assert response.status_code == 200 and response.content == image.manifest
    sent = mirror.registry.requests(path_contains="/manifests/1.0")[-1].headers.get_list("accept")
    assert sent == ALL_MANIFESTS


async def test_a_long_accept_line_is_refused_and_not_echoed_whole(mirror):
    mirror.registry.push("acme/tool", "1.0")
    response = await mirror.client.get("/v2/acme/tool/manifests/1.0", headers=[("Accept", "a/b," * 2000)])
    assert_oci_error(response, 400, "UNSUPPORTED")
    assert len(response.content) < 1000
    assert not mirror.registry.requests(path_contains="/manifests/")
