"""The upstream registry client: two pooled httpx clients per upstream.

Blob bodies, which may take minutes, have their own connection pool; manifests, HEADs,
tag lists and tokens use another, so they never wait behind slow blob downloads.
It answers auth challenges (sending credentials only to a token realm it trusts, see
:mod:`.realms`), follows redirects to blob storage without sending ``Authorization`` to
another origin (never from HTTPS to HTTP, never to another scheme, at most MAX_REDIRECTS
hops), applies connect, stalled-read and minimum-progress
timeouts, caps every body it reads into memory (see :mod:`.bodies`), and turns the
upstream's failures into :mod:`dockermirror.errors`.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode, urljoin

import httpx

from dockermirror import __version__
from dockermirror.errors import (
    BlobUnknown,
    Denied,
    ManifestInvalid,
    LoopDetected,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from dockermirror.meter import NULL_METER, Meter, upstream_kind
from dockermirror.oci import MAX_MANIFEST_SIZE, OCI_INDEX
from dockermirror.upstream.auth import AuthError, Authenticator
from dockermirror.upstream import readsize
from dockermirror.upstream.blobtransport import ThreadTransport, proxy_mounts
from dockermirror.upstream.outage import OutageLog
from dockermirror.upstream.peers import KIND, PUBLIC, peer_address, peer_reach, reach, through_proxy
from dockermirror.upstream.realms import RealmRefused, shown
from dockermirror.via import new_pseudonym, outgoing
from dockermirror.upstream.bodies import (
    ERROR_BODY,
    MIN_PROGRESS,
    BadEncoding,
    BodyTooLarge,
    DeadlinePassed,
    MemoryBusy,
    content_length,
    framing_problem,
    paced,
    read_capped,
    send,
    timed,
)

log = logging.getLogger("dockermirror.upstream")

# httpcore reads up to 256 KiB of a response at a time, not 64 KiB (readsize.py: measured, and
# checked at start-up by the service)
readsize.apply()

REDIRECTS = (301, 302, 303, 307, 308)
# Connections to the upstream: blob bodies in one pool, everything else (manifests, HEADs,
# tag lists, tokens) in another, so slow blob downloads can never hold up a manifest.
API_POOL = httpx.Limits(max_connections=32, max_keepalive_connections=16)
BLOB_POOL = httpx.Limits(max_connections=64, max_keepalive_connections=32)
# How long a request waits for a free connection of its pool; then 503 with Retry-After.
POOL_TIMEOUT = 60.0
RETRY_AFTER = "10"
# After the upstream could not be reached, tag revalidation is skipped (cached tags are
# served stale at once) for this long, so a black-holed upstream does not stall every pull.
DOWN_WINDOW = 30.0
MAX_REDIRECTS = 5
# A blob download that breaks off mid-body is resumed with Range where it stopped, as long
# as each attempt brings at least MIN_PROGRESS bytes; it gives up after this many attempts
# in a row that did not, or at upstream.transfer_timeout.
NO_PROGRESS_ATTEMPTS = 3
BACKOFF = 1.0       # seconds before the first retry without progress; doubles with each
TRANSFER_TIMEOUT = 6 * 3600.0
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
    """An upstream blob body being streamed; satisfies the cache's ``Source``.

    When the connection breaks mid-body (reset, closed early, stalled past the read
    timeout, or trickling: fewer than MIN_PROGRESS bytes in a read_timeout window), the
    rest is asked for with ``Range`` and the stream goes on where it stopped. It resumes
    as long as each attempt moves forward (at least MIN_PROGRESS bytes), like wget; it
    gives up after NO_PROGRESS_ATTEMPTS attempts in a row that did not, and at its
    deadline (``upstream.transfer_timeout``) whatever happens. The cache verifies the
    digest over the whole body, so a bad resume can only fail the transfer, never
    corrupt the cache.
    """

    def __init__(self, response: httpx.Response, resume: Callable[[int, int], Awaitable[httpx.Response]],
                 what: str, *, window: float = 60.0, timeout: float = TRANSFER_TIMEOUT,
                 meter: Meter = NULL_METER, upstream: str = "") -> None:
        self._response: httpx.Response | None = response
        self._meter = meter
        self._upstream = upstream
        self._reported = False
        self._resume = resume
        self._what = what
        self._window = window
        self._timeout = timeout
        self._deadline = asyncio.get_running_loop().time() + timeout if timeout > 0 else None
        self.size: int | None = content_length(response.headers)
        self.received = 0
        self.resumes = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        behind = 0          # attempts in a row that brought fewer than MIN_PROGRESS bytes
        start = 0           # where the current attempt began
        while True:
            try:
                if self._response is None:
                    self._response = await self._resume(self.received, self.size or 0)
                async for chunk in paced(self._response, self._window, deadline=self._deadline):
                    self.received += len(chunk)
                    yield chunk
                return
            except DeadlinePassed:
                raise self._timed_out() from None
            except (httpx.TransportError, UpstreamUnreachable, Unavailable) as exc:
                # without a length there is nothing to check the remainder against
                if self.size is None:
                    raise
                if self.received >= self.size:
                    return          # every byte is here; the digest check decides
                behind = 0 if self.received - start >= MIN_PROGRESS else behind + 1
                reason = _describe(exc) if isinstance(exc, httpx.TransportError) else str(exc)
                if behind >= NO_PROGRESS_ATTEMPTS:
                    log.warning("upstream broke off %s at byte %d of %d (%s); giving up after %d attempts "
                                "in a row without progress", self._what, self.received, self.size, reason, behind)
                    raise
                self.resumes += 1
                self._meter.resumed(self._upstream)
                # recovered from (info); giving up fails the request (warning, above)
                log.info("upstream broke off %s at byte %d of %d (%s); resuming there (resume %d, "
                            "%d in a row without progress)", self._what, self.received, self.size, reason,
                            self.resumes, behind)
                if self._response is not None:
                    await self._response.aclose()
                    self._response = None
                if behind:          # back off before asking again an upstream that is not moving
                    pause = BACKOFF * 2.0 ** (behind - 1)
                    if self._deadline is not None:
                        pause = min(pause, self._deadline - asyncio.get_running_loop().time())
                    if pause <= 0:
                        raise self._timed_out() from None
                    await asyncio.sleep(pause)
                start = self.received

    def _timed_out(self) -> RegistryError:
        log.warning("upstream transfer of %s did not finish within upstream.transfer_timeout (%g s); "
                    "ended at byte %d of %s", self._what, self._timeout, self.received, self.size)
        return RegistryError(f"the upstream transfer of {self._what} did not finish within "
                             f"upstream.transfer_timeout", status=504, code="UNAVAILABLE")

    async def aclose(self) -> None:
        if not self._reported:      # the bytes of every attempt, once
            self._reported = True
            self._meter.upstream_received(self._upstream, self.received)
        if self._response is not None:
            await self._response.aclose()


class UpstreamClient:
    """Talks to one upstream registry."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_bundle: Path | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        transfer_timeout: float = TRANSFER_TIMEOUT,
        token_realms: tuple[str, ...] = (),
        transport: httpx.AsyncBaseTransport | None = None,
        meter: Meter = NULL_METER,
        key: str = "",
        namespace: str | None = None,
        pseudonym: str | None = None,
        private_redirects: bool = False,
    ) -> None:
        """``token_realms``: hosts besides the upstream's own site that may get the credentials
        (see :mod:`.realms`); ``transport`` replaces the network (tests pass an ``httpx.MockTransport``);
        ``meter`` hears of each request sent and the bytes received, as this upstream's ``key``;
        ``namespace``: the upstream is another mirror (``send_ns``): every request under ``/v2/<name>/``
        carries ``?ns=<namespace>``, as containerd names the registry to a mirror; ``pseudonym``: this
        mirror's name in the ``Via`` of every request (after the client request's, see dockermirror/via.py);
        ``private_redirects``: follow redirects further inside the network than the upstream (see .peers)."""
        self.base = url.rstrip("/")
        self.private_redirects = private_redirects
        self._ns = f"ns={quote(namespace, safe='')}" if namespace else ""
        self.meter = meter
        self.key = key
        self.pseudonym = pseudonym or new_pseudonym()
        self.read_timeout = read_timeout
        self.transfer_timeout = transfer_timeout
        verify: ssl.SSLContext | bool = True
        if ca_bundle is not None:
            verify = ssl.create_default_context(cafile=str(ca_bundle))
        def pool(limits: httpx.Limits, own: httpx.AsyncBaseTransport | None = None,
                 mounts: dict | None = None) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                # waiting for a free connection (POOL_TIMEOUT) is load, not an upstream failure
                timeout=_timeouts(connect_timeout, read_timeout),
                limits=limits,
                verify=verify,
                transport=own or transport,
                mounts=mounts,
                follow_redirects=False,
                headers={"User-Agent": f"docker-mirror/{__version__}", "Accept-Encoding": "identity"},
                event_hooks={"response": [_refuse_ambiguous_framing]},
            )

        self._client = pool(API_POOL)       # manifests, HEADs, tag lists, tokens
        # blob bodies (and the redirects they follow), read in threads (see .blobtransport) unless
        # a test replaces the network; URLs httpx would send through a proxy stay on httpx's proxy transport
        mounts = proxy_mounts(verify, BLOB_POOL) if transport is None else None
        if transport is None and mounts is not None:
            self._blobs = pool(BLOB_POOL, ThreadTransport(verify=verify, max_connections=BLOB_POOL.max_connections or 64,
                                                          max_keepalive=BLOB_POOL.max_keepalive_connections or 32),
                               mounts)
        else:
            self._blobs = pool(BLOB_POOL)
        self.auth = Authenticator(self._client, username, password, upstream=self.base,
                                  token_realms=token_realms, meter=meter, key=key)
        self.auth.private_realms = private_redirects
        # None until the first request; then whether the last one got an HTTP answer.
        self.reachable: bool | None = None
        self.last_failure: float | None = None
        self.last_error = ""
        self.outage = OutageLog()   # what of its trouble is a warning (once an outage), what a count
        # Docker Hub's pull allowance as last reported ("ratelimit-remaining": "97;w=21600",
        # "ratelimit-limit": "100;w=21600"), as the upstream sent it (untrusted text)
        self.ratelimit_remaining: str | None = None
        self.ratelimit_limit: str | None = None

    @property
    def recently_down(self) -> bool:
        """The last attempt found the upstream unreachable, less than DOWN_WINDOW ago."""
        return (self.reachable is False and self.last_failure is not None
                and time.monotonic() - self.last_failure < DOWN_WINDOW)

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._blobs.aclose()

    def closer(self) -> Callable[[], Awaitable[None]]:
        """What closes this client's connections, without holding the client itself (so that
        its owner can close them once the client is no longer referenced by anyone)."""
        api, blobs = self._client, self._blobs

        async def close() -> None:
            try:
                await api.aclose()
            finally:
                await blobs.aclose()

        return close

    def set_timeouts(self, connect_timeout: float, read_timeout: float, transfer_timeout: float) -> None:
        """New timeouts for requests from now on (those in flight keep theirs)."""
        self.read_timeout = read_timeout
        self.transfer_timeout = transfer_timeout
        for client in (self._client, self._blobs):
            client.timeout = _timeouts(connect_timeout, read_timeout)

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
        response = await self._send("GET", repository, f"blobs/{digest}", [], blob=True)
        if response.status_code != 200:
            try:
                body = await self._error_body(response) if response.status_code != 404 else b""
            finally:
                await response.aclose()
            raise error_for(response.status_code, response.headers, body, unknown=BlobUnknown)

        async def resume(offset: int, size: int) -> httpx.Response:
            """The rest of the blob from ``offset``; anything but exactly that is an error
            (a 5xx or 429 is an upstream that may recover: an attempt without progress)."""
            rest = await self._send("GET", repository, f"blobs/{digest}", [("Range", f"bytes={offset}-")],
                                    blob=True)
            if rest.status_code == 206 and rest.headers.get("content-range") == f"bytes {offset}-{size - 1}/{size}":
                return rest
            await rest.aclose()
            if rest.status_code >= 500 or rest.status_code == 429:
                raise UpstreamUnreachable(f"the upstream answered HTTP {rest.status_code} to a resume")
            raise RegistryError(f"the upstream did not resume {digest} at byte {offset} (answered "
                                f"{rest.status_code}, Content-Range {rest.headers.get('content-range')!r})",
                                status=502, upstream_status=rest.status_code)

        return BlobStream(response, resume, f"{repository}@{digest}", window=self.read_timeout,
                          timeout=self.transfer_timeout, meter=self.meter, upstream=self.key)

    async def tags(self, repository: str, params: Headers) -> Reply:
        """The tag list; ``params`` (``n``, ``last``, checked by the caller) are percent-encoded
        here, so that none can add a parameter of its own."""
        query = urlencode([(k, v) for k, v in params], quote_via=quote, safe="")
        path = "tags/list" + (f"?{query}" if query else "")
        return await self._reply("GET", repository, path, [], limit=16 * 1024 * 1024)

    async def referrers(self, repository: str, digest: str, artifact_type: str | None) -> Reply:
        """The referrers of ``digest`` (an image index), filtered by ``artifactType`` if given
        (a media type, checked by the caller; percent-encoded here: ``+`` is a space in a query)."""
        path = f"referrers/{digest}"
        if artifact_type is not None:
            path += f"?artifactType={quote(artifact_type, safe='')}"
        return await self._reply("GET", repository, path, [("Accept", OCI_INDEX)], limit=MAX_MANIFEST_SIZE)

    # --- plumbing

    async def _reply(self, method: str, repository: str, path: str, headers: Headers,
                     limit: int = 0) -> Reply:
        """A small answer read whole: at most ``limit`` bytes (decoded) of a success, at most
        ERROR_BODY bytes of anything else (the rest is dropped with its connection)."""
        response = await self._send(method, repository, path, headers)
        try:
            body = b""
            if method != "HEAD":
                success = 200 <= response.status_code < 300
                try:
                    body = await read_capped(response, limit if success else ERROR_BODY, self.read_timeout,
                                             truncate=not success)
                except BodyTooLarge:
                    raise ManifestInvalid(f"upstream answer exceeds {limit} bytes",
                                          status=502, upstream_status=response.status_code) from None
                except MemoryBusy as exc:
                    raise Unavailable(f"too many large upstream answers are being read ({exc}); try again",
                                      headers={"Retry-After": RETRY_AFTER}) from None
                except BadEncoding as exc:
                    raise RegistryError(str(exc), status=502, upstream_status=response.status_code) from None
                except httpx.TransportError as exc:
                    raise self._failed(exc) from None
                self.meter.upstream_received(self.key, len(body))
            return Reply(response.status_code, response.headers, body)
        finally:
            await response.aclose()

    async def _error_body(self, response: httpx.Response) -> bytes:
        """The first ERROR_BODY bytes of an error answer, for its message; nothing if it breaks off."""
        try:
            return await read_capped(response, ERROR_BODY, self.read_timeout, truncate=True)
        except httpx.TransportError:
            return b""

    async def _send(self, method: str, repository: str, path: str, headers: Headers,
                    *, blob: bool = False) -> httpx.Response:
        url = f"{self.base}/v2/{repository}/{path}"
        if self._ns:
            url += ("&" if "?" in path else "?") + self._ns
        scope = f"repository:{repository}:pull"
        headers = list(headers)
        kind = upstream_kind(path)
        try:
            authorization = await self.auth.header_for(scope)
            response = await self._request(method, url, headers, authorization, blob, kind)
            pool = self._blobs if blob else self._client
            # how far inside the network the upstream is (see .peers): through a proxy, not known
            proxied = through_proxy(pool, url)    # (None: cannot tell; counted as through one)
            inside = None if proxied is not False else peer_reach(response)
            if inside is not None:
                self.auth.inside = inside    # where its token service may be
            if response.status_code == 401 and "www-authenticate" in response.headers:
                try:
                    answer = await self.auth.answer(response.headers["www-authenticate"], scope, authorization)
                except BaseException:
                    await response.aclose()     # its connection goes back (or is closed), also on a failed token
                    raise
                if answer is not None:
                    await response.aclose()
                    authorization = answer
                    response = await self._request(method, url, headers, authorization, blob, kind)
            hops = 0
            if proxied is False:     # (the answer after a 401 may have come on another connection)
                inside = peer_reach(response)
            while response.status_code in REDIRECTS and "location" in response.headers:
                if hops == MAX_REDIRECTS:
                    await response.aclose()
                    raise RegistryError(f"the upstream redirected too many times (more than {MAX_REDIRECTS})", status=502,
                                        upstream_status=response.status_code)
                hops += 1
                await response.aclose()
                location = _redirect_target(url, response.headers["location"], response.status_code)
                # ours only to the upstream itself (not on to a second hop at the storage's own host)
                same_origin = _origin(location) == _origin(httpx.URL(self.base))
                if response.status_code == 303:
                    method = "GET" if method != "HEAD" else "HEAD"
                log.debug("upstream redirect %s -> %s", shown(httpx.URL(url)), shown(location))
                # Signed blob-storage URLs carry their own authorization: never send ours across origins.
                response = await self._request(method, str(location), headers,
                                               authorization if same_origin else None, blob, kind)
                url = str(location)
                if not self.private_redirects and through_proxy(pool, location) is not True:   # (else: the proxy decides)
                    await self._check_reach(response, inside, location)
        except httpx.PoolTimeout:
            raise Unavailable("too many upstream requests are in progress; try again",
                              headers={"Retry-After": RETRY_AFTER}) from None
        except httpx.LocalProtocolError as exc:
            # our request could not be written (a header value h11 refuses): nothing was sent,
            # so this says nothing about the upstream's reachability
            # (not its text: it quotes the value, which may be a token)
            raise RegistryError("the request could not be sent upstream: a header value is not valid HTTP",
                                status=502) from None
        except httpx.TransportError as exc:
            raise self._failed(exc) from None
        except RealmRefused as exc:
            # 403 DENIED, not a 5xx: clients show a 4xx's message (it says what to configure)
            raise Denied(f"the upstream's token service was refused: {exc}", detail={"realm": exc.realm}) from None
        except AuthError as exc:
            if exc.status is None or exc.status >= 500:
                raise self._failed(exc) from None
            raise Unauthorized(f"upstream authentication failed: {exc}", upstream_status=exc.status) from None
        self._answered(response.status_code)
        remaining = response.headers.get("ratelimit-remaining")
        if remaining is not None:
            self.ratelimit_remaining = remaining
            self.ratelimit_limit = response.headers.get("ratelimit-limit")
        return response

    async def _check_reach(self, response: httpx.Response, inside: int | None, location: httpx.URL) -> None:
        """A redirect must not have led further inside the network than the upstream is (see
        .peers): else its answer is closed unread and the request fails with a 502."""
        address = peer_address(response)
        if address is None:
            return
        ahead, limit = reach(address), PUBLIC if inside is None else inside
        if ahead <= limit:
            return
        await response.aclose()
        log.warning("upstream %s redirected to %s, a %s address (%s), further inside the network than the "
                    "upstream itself; not read (upstream.private_redirects: true allows it)",
                    self._name, shown(location), KIND[ahead], address)
        raise RegistryError(f"the upstream redirected to {location.host}, a {KIND[ahead]} address, which is not "
                            "followed from this upstream", status=502)

    async def _request(self, method: str, url: str, headers: list[tuple[str, str]],
                       authorization: str | None, blob: bool, kind: str) -> httpx.Response:
        all_headers = headers + [("Via", outgoing(self.pseudonym))] + \
            ([("Authorization", authorization)] if authorization else [])
        client = self._blobs if blob else self._client
        request = client.build_request(method, url, headers=all_headers)
        return await timed(self.meter, self.key, kind, send(client, request, self.read_timeout))

    @property
    def _name(self) -> str:
        return self.key or httpx.URL(self.base).host

    def _answered(self, status: int) -> None:
        """The upstream answered (each request's own line is at info; outages: see outage.py)."""
        self.outage.answered(self._name, status)
        self.reachable = True

    def _failed(self, exc: Exception) -> UpstreamUnreachable:
        """Record that the upstream could not be reached; the exception to raise."""
        error = UpstreamUnreachable(_describe(exc) if isinstance(exc, httpx.TransportError) else str(exc))
        self.outage.unreachable(self._name, error)   # each failed request's line is the access line
        self.reachable = False
        self.last_failure = time.monotonic()
        self.last_error = str(error)
        return error


async def _refuse_ambiguous_framing(response: httpx.Response) -> None:
    """Every answer of both pools, on any transport: one whose body's end is ambiguous (see
    :func:`.bodies.framing_problem`) is a protocol error; httpx closes it unread, and with it
    its connection. (h11 refuses most such answers itself, but reads one with both
    Transfer-Encoding: chunked and Content-Length as chunked; the blob pool's thread transport
    refuses them before this.)"""
    if response.request.method == "HEAD" or response.status_code in (204, 304):    # no body to frame
        return
    problem = framing_problem(response.headers)
    if problem is not None:
        raise httpx.RemoteProtocolError(f"the upstream's answer was refused: {problem}", request=response.request)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"https": 443, "http": 80}.get(url.scheme)
    return url.scheme, url.host.lower().rstrip("."), url.port or default


def _redirect_target(url: str, location: str, status: int) -> httpx.URL:
    """Where a redirect leads, if it may be followed: http(s) only, and never from HTTPS down
    to HTTP (a signed URL or a body would cross the network in clear). Else a 502."""
    try:
        target = httpx.URL(urljoin(url, location))
    except (httpx.InvalidURL, ValueError):
        target = None
    if target is None or target.scheme not in ("http", "https") or not target.host:
        scheme = location.partition(":")[0][:20] if ":" in location else "?"
        log.warning("upstream redirect from %s to a %r URL refused", shown(httpx.URL(url)), scheme)
        raise RegistryError(f"the upstream redirected to a {scheme!r} URL, which is not followed",
                            status=502, upstream_status=status)
    if httpx.URL(url).scheme == "https" and target.scheme != "https":
        log.warning("upstream redirect from %s to plain HTTP (%s) refused", shown(httpx.URL(url)), shown(target))
        raise RegistryError(f"the upstream redirected from HTTPS to plain HTTP ({shown(target)}), which is "
                            "not followed", status=502, upstream_status=status)
    return target


def _timeouts(connect_timeout: float, read_timeout: float) -> httpx.Timeout:
    # waiting for a free connection is load, not an upstream failure
    return httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=POOL_TIMEOUT)


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
    if status == 508:    # a request loop (via.py): the upstream's own words, passed on
        return LoopDetected(upstream_message or "request loop: the upstream answered 508 Loop Detected (an "
                            "upstream on the way leads back to a mirror before it; check each tier's upstream.url)",
                            upstream_status=508)
    if status == 429:
        after = _retry_after(headers.get("retry-after"))
        retry = {"Retry-After": after} if after is not None else {}
        return TooManyRequests(f"the upstream is rate limiting this mirror{suffix}", headers=retry,
                               upstream_status=429)
    if status >= 500:
        return Unavailable(f"the upstream failed with HTTP {status}{suffix}", upstream_status=status)
    if status < 400:    # not an answer this call can use (a 204, 206, 304, a redirect without a way on)
        return RegistryError(f"the upstream answered HTTP {status}, which this request cannot use",
                             status=502, upstream_status=status)
    code = (_upstream_codes(body) or ["UNKNOWN"])[0]
    return RegistryError(f"the upstream answered HTTP {status}{suffix}", status=status, code=code,
                         upstream_status=status)


def _retry_after(value: str | None) -> str | None:
    """The upstream's Retry-After if it is one (RFC 9110: seconds, or an HTTP date), else None."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= 10:
        return value
    try:
        email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return value if len(value) <= 64 else None


def _errors(body: bytes) -> list[dict]:
    try:
        errors = json.loads(body).get("errors")
    except (ValueError, AttributeError, RecursionError):     # not JSON, not an object, nested too deep
        return []
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def _upstream_codes(body: bytes) -> list[str]:
    return [str(e.get("code")) for e in _errors(body) if e.get("code")]


def _upstream_message(body: bytes) -> str:
    return "; ".join(str(e.get("message")) for e in _errors(body) if e.get("message"))[:300]
