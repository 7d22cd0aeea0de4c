"""The upstream registry client: one pooled httpx client per upstream.

It answers auth challenges, follows redirects to blob storage without sending
``Authorization`` to another host, applies connect and stalled-read timeouts, and
turns the upstream's failures into :mod:`dockermirror.errors`.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from urllib.parse import urljoin

import httpx

from dockermirror import __version__
from dockermirror.config import UpstreamConfig
from dockermirror.errors import (
    BlobUnknown,
    Denied,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from dockermirror.oci import MAX_MANIFEST_SIZE
from dockermirror.upstream.auth import AuthError, Authenticator

log = logging.getLogger("dockermirror.upstream")

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
# Headers of a client request worth passing on (Accept is handled on its own).
Headers = Iterable[tuple[str, str]]


class UpstreamUnreachable(Exception):
    """No HTTP answer: connection refused or reset, DNS, TLS, or a timeout."""


@dataclass
class Reply:
    """A complete, small upstream answer (manifest, tag list, HEAD)."""

    status: int
    headers: httpx.Headers
    body: bytes


class BlobStream:
    """An upstream blob body being streamed; satisfies the cache's ``Source``."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        length = response.headers.get("content-length")
        self.size: int | None = int(length) if length and length.isdigit() else None

    def chunks(self) -> AsyncIterator[bytes]:
        return self._response.aiter_raw()

    async def aclose(self) -> None:
        await self._response.aclose()


class UpstreamClient:
    """Talks to one upstream registry."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.base = config.url
        verify: ssl.SSLContext | bool = True
        if config.ca_bundle is not None:
            verify = ssl.create_default_context(cafile=str(config.ca_bundle))
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=config.connect_timeout,
                read=config.read_timeout,
                write=config.read_timeout,
                pool=config.connect_timeout,
            ),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            verify=verify,
            follow_redirects=False,
            headers={"User-Agent": f"docker-mirror/{__version__}", "Accept-Encoding": "identity"},
        )
        self.auth = Authenticator(self._client, config.username, config.password)
        # None until the first request; then whether the last one got an HTTP answer.
        self.reachable: bool | None = None
        self.last_failure: float | None = None

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- the registry API

    async def manifest(self, repository: str, reference: str, accept: list[str], *, head: bool) -> Reply:
        headers = [("Accept", value) for value in accept]
        if head:
            return await self._reply("HEAD", repository, f"manifests/{reference}", headers)
        return await self._reply("GET", repository, f"manifests/{reference}", headers, limit=MAX_MANIFEST_SIZE)

    async def head_blob(self, repository: str, digest: str) -> Reply:
        return await self._reply("HEAD", repository, f"blobs/{digest}", [])

    async def open_blob(self, repository: str, digest: str) -> BlobStream:
        """Start streaming a blob; raises a RegistryError unless the upstream answers 200."""
        response = await self._send("GET", repository, f"blobs/{digest}", [], stream=True)
        if response.status_code != 200:
            try:
                body = await response.aread() if response.status_code != 404 else b""
            finally:
                await response.aclose()
            raise error_for(response.status_code, response.headers, body, unknown=BlobUnknown)
        return BlobStream(response)

    async def tags(self, repository: str, params: Headers) -> Reply:
        query = "&".join(f"{k}={v}" for k, v in params)
        path = "tags/list" + (f"?{query}" if query else "")
        return await self._reply("GET", repository, path, [], limit=16 * 1024 * 1024)

    # --- plumbing

    async def _reply(self, method: str, repository: str, path: str, headers: Headers,
                     limit: int = 0) -> Reply:
        response = await self._send(method, repository, path, headers, stream=True)
        try:
            body = bytearray()
            if method != "HEAD":
                try:
                    async for chunk in response.aiter_raw():
                        body += chunk
                        if len(body) > limit:
                            raise ManifestInvalid(f"upstream answer exceeds {limit} bytes",
                                                  status=502, upstream_status=response.status_code)
                except httpx.TransportError as exc:
                    self._failed()
                    raise UpstreamUnreachable(_describe(exc)) from None
            return Reply(response.status_code, response.headers, bytes(body))
        finally:
            await response.aclose()

    async def _send(self, method: str, repository: str, path: str, headers: Headers,
                    *, stream: bool) -> httpx.Response:
        url = f"{self.base}/v2/{repository}/{path}"
        scope = f"repository:{repository}:pull"
        headers = list(headers)
        try:
            authorization = await self.auth.header_for(scope)
            response = await self._request(method, url, headers, authorization, stream)
            if response.status_code == 401 and "www-authenticate" in response.headers:
                answer = await self.auth.answer(response.headers["www-authenticate"], scope)
                if answer is not None:
                    await response.aclose()
                    authorization = answer
                    response = await self._request(method, url, headers, authorization, stream)
            for _ in range(MAX_REDIRECTS):
                if response.status_code not in REDIRECTS or "location" not in response.headers:
                    break
                location = urljoin(str(response.url), response.headers["location"])
                await response.aclose()
                same_origin = httpx.URL(location).netloc == httpx.URL(url).netloc
                if response.status_code == 303:
                    method = "GET" if method != "HEAD" else "HEAD"
                log.debug("upstream redirect %s -> %s", url, httpx.URL(location).host)
                # Signed blob-storage URLs carry their own authorization: never send ours across hosts.
                response = await self._request(method, location, headers,
                                               authorization if same_origin else None, stream)
                url = location
            else:
                await response.aclose()
                raise RegistryError("upstream redirected too many times", status=502,
                                    upstream_status=response.status_code)
        except httpx.TransportError as exc:
            self._failed()
            raise UpstreamUnreachable(_describe(exc)) from None
        except AuthError as exc:
            if exc.status is None or exc.status >= 500:
                self._failed()
                raise UpstreamUnreachable(str(exc)) from None
            raise Unauthorized(f"upstream authentication failed: {exc}", upstream_status=exc.status) from None
        self.reachable = True
        return response

    async def _request(self, method: str, url: str, headers: list[tuple[str, str]],
                       authorization: str | None, stream: bool) -> httpx.Response:
        all_headers = headers + ([("Authorization", authorization)] if authorization else [])
        request = self._client.build_request(method, url, headers=all_headers)
        return await self._client.send(request, stream=stream)

    def _failed(self) -> None:
        self.reachable = False
        self.last_failure = time.time()


def _describe(exc: httpx.TransportError) -> str:
    kind = type(exc).__name__
    text = str(exc)
    return f"{kind}: {text}" if text else kind


def error_for(status: int, headers: httpx.Headers, body: bytes, *,
              unknown: type[RegistryError] = ManifestUnknown) -> RegistryError:
    """The error to give a client for an upstream answer that is not a success.

    ``unknown`` is the error for a 404 (unless the upstream says the repository is unknown).
    """
    upstream_message = _upstream_message(body)
    suffix = f": {upstream_message}" if upstream_message else ""
    if status == 404:
        if "NAME_UNKNOWN" in _upstream_codes(body):
            unknown = NameUnknown
        return unknown(f"not found upstream{suffix}", upstream_status=404)
    if status == 401:
        return Unauthorized(f"the upstream requires authentication (set upstream.username and "
                            f"upstream.password){suffix}", upstream_status=401)
    if status == 403:
        return Denied(f"the upstream denied access{suffix}", upstream_status=403)
    if status == 429:
        retry = {"Retry-After": headers["retry-after"]} if "retry-after" in headers else {}
        return TooManyRequests(f"the upstream is rate limiting this mirror{suffix}", headers=retry,
                               upstream_status=429)
    if status >= 500:
        return Unavailable(f"the upstream failed with HTTP {status}{suffix}", upstream_status=status)
    code = (_upstream_codes(body) or ["UNKNOWN"])[0]
    return RegistryError(f"the upstream answered HTTP {status}{suffix}", status=status, code=code,
                         upstream_status=status)


def _errors(body: bytes) -> list[dict]:
    try:
        errors = json.loads(body).get("errors")
    except (ValueError, AttributeError):
        return []
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def _upstream_codes(body: bytes) -> list[str]:
    return [str(e.get("code")) for e in _errors(body) if e.get("code")]


def _upstream_message(body: bytes) -> str:
    return "; ".join(str(e.get("message")) for e in _errors(body) if e.get("message"))[:300]
