"""Reading upstream bodies without trusting them.

Two rules for every body the upstream client reads:

* **It must keep moving.** httpx's read timeout only fires when *no* byte arrives for
  ``read_timeout``; a body that trickles one byte a minute would hold its connection
  forever. :func:`paced` ends a body that delivers fewer than :data:`MIN_PROGRESS` bytes in
  a window of ``read_timeout`` seconds (time spent waiting on the upstream only: a consumer
  that stops reading does not count against the upstream), and optionally at a deadline.
* **Its headers must arrive in time.** A status line and headers that trickle in a byte
  at a time never trip the read timeout either: :func:`send` gives them ``2 * read_timeout``
  from the moment the request is written (the wait for a free connection is not counted).
* **What is read into memory is capped, after decoding.** We ask for
  ``Accept-Encoding: identity`` and read the raw bytes, so httpx never inflates anything;
  a body the upstream compresses anyway (gzip or deflate) is inflated here at most up to
  the cap (a gzip bomb costs its cap, not its inflated size). Other encodings are refused.
  **And so is all of it at once:** answers read whole (manifests, tag lists, tokens, error
  messages) share WHOLE_BODIES bytes; each may always hold OWN_BODY bytes beyond it (tokens and
  error messages never wait), and one that would take more fails with :class:`MemoryBusy`
  (32 hostile 14 MiB tag lists at once held 220 MiB before).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import httpx

from dockermirror.meter import Meter

MIN_PROGRESS = 64 * 1024    # bytes a body must deliver in every read_timeout window
ERROR_BODY = 64 * 1024      # most bytes of an error answer read (for its message); the rest is dropped


class UpstreamStalled(httpx.ReadTimeout):
    """A body delivered fewer than MIN_PROGRESS bytes in a read_timeout window (a trickle)."""


class DeadlinePassed(Exception):
    """A body was still being read at its deadline."""


class BodyTooLarge(Exception):
    """A body is larger than what may be read into memory."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


class MemoryBusy(Exception):
    """Answers read whole already hold WHOLE_BODIES bytes: this one may not grow past OWN_BODY now."""


WHOLE_BODIES = 64 * 1024 * 1024     # bytes all answers being read whole may hold at once ...
OWN_BODY = 1024 * 1024              # ... beyond what each may always hold (a token's cap, an error's)
_whole = {"held": 0}                # bytes held over OWN_BODY by answers being read whole


class BadEncoding(Exception):
    """A body in a content-coding we cannot (or will not) decode, or corrupt."""


async def paced(response: httpx.Response, window: float, *, deadline: float | None = None) -> AsyncIterator[bytes]:
    """The raw bytes of ``response``, ended with :class:`UpstreamStalled` if fewer than
    MIN_PROGRESS arrive in a ``window`` of waiting, or :class:`DeadlinePassed` at ``deadline``
    (event-loop time)."""
    loop = asyncio.get_running_loop()
    raw = response.aiter_raw()
    left, got = window, 0
    try:
        while True:
            limit = None if got >= MIN_PROGRESS else max(left, 0.0)
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise DeadlinePassed("the transfer deadline passed")
                limit = remaining if limit is None else min(limit, remaining)
            started = loop.time()
            try:
                async with asyncio.timeout(limit):
                    chunk = await anext(raw)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    raise DeadlinePassed("the transfer deadline passed") from None
                raise UpstreamStalled(_stalled(window)) from None
            left -= loop.time() - started
            got += len(chunk)
            if left <= 0:
                if got < MIN_PROGRESS:
                    raise UpstreamStalled(_stalled(window))
                left, got = window, 0
            yield chunk
    finally:
        await raw.aclose()


async def send(client: httpx.AsyncClient, request: httpx.Request, window: float) -> httpx.Response:
    """Send ``request`` and return its response, streamed; :class:`UpstreamStalled` if its
    headers are not complete within ``2 * window`` of the request being written."""
    loop = asyncio.get_running_loop()
    limit = 2 * window
    try:
        async with asyncio.timeout(None) as scope:
            async def trace(event: str, info: dict) -> None:
                # also on a retry over a fresh connection; never after the headers are in
                if event.endswith("send_request_headers.started") and scope.expired() is False:
                    scope.reschedule(loop.time() + limit)

            request.extensions["trace"] = trace
            try:
                return await client.send(request, stream=True)
            finally:
                del request.extensions["trace"]
    except TimeoutError:
        raise UpstreamStalled(f"the answer's headers were not complete within {limit:g} s") from None


async def timed(meter: Meter, key: str, kind: str, sending: Awaitable[httpx.Response]) -> httpx.Response:
    """The response of ``sending`` (a request being sent), told to ``meter`` with the time to its
    headers; a request that got no answer is told without a status. A request that was never
    sent (no free connection in the pool, headers h11 refuses) is not told at all."""
    began = time.monotonic()
    try:
        response = await sending
    except (httpx.PoolTimeout, httpx.LocalProtocolError):
        raise
    except httpx.TransportError:
        meter.upstream_request(key, kind, None, time.monotonic() - began)
        raise
    meter.upstream_request(key, kind, response.status_code, time.monotonic() - began)
    return response


def _stalled(window: float) -> str:
    return f"fewer than {MIN_PROGRESS // 1024} KiB arrived in {window:g} s"


class _Decoder:
    """Inflates a gzip or deflate body at most ``room`` bytes at a time; identity passes."""

    def __init__(self, header: str) -> None:
        codings = [c.strip().lower() for c in header.split(",") if c.strip().lower() not in ("", "identity")]
        if len(codings) > 1 or (codings and codings[0] not in ("gzip", "x-gzip", "deflate")):
            raise BadEncoding(f"the upstream sent a body encoded as {header!r} (identity was asked for)")
        self.coding = codings[0] if codings else None
        self._inflate: Any = None
        if self.coding in ("gzip", "x-gzip"):
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self.coding == "deflate":
            self._inflate = zlib.decompressobj()
        self._first = True

    def feed(self, data: bytes, room: int) -> bytes:
        """Up to ``room + 1`` decoded bytes of ``data`` (more than ``room``: over the cap)."""
        if self._inflate is None:
            return data[: room + 1]
        try:
            try:
                out = self._inflate.decompress(data, room + 1)
            except zlib.error:
                if not (self._first and self.coding == "deflate"):
                    raise
                self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some servers send
                out = self._inflate.decompress(data, room + 1)
        except zlib.error as exc:
            raise BadEncoding(f"the upstream sent a corrupt {self.coding} body ({exc})") from None
        self._first = False
        return out


class BadLength(ValueError):
    """A Content-Length that is there but is not one plain decimal number."""


def content_length(headers: httpx.Headers, *, strict: bool = False) -> int | None:
    """The Content-Length if it is a plain decimal number: ASCII digits only ("²".isdigit() is
    true), few enough for int() (it refuses ~4,300), no sign; the same number repeated (``42, 42``,
    or two such headers) is that number (RFC 9110 8.6). Anything else is no length at all, or
    with ``strict`` a :class:`BadLength` (no Content-Length at all is None either way)."""
    values = [v.strip() for v in headers.get_list("content-length", split_commas=True)]
    if not values:
        return None
    first = values[0]
    if all(v == first for v in values) and first.isascii() and first.isdigit() and len(first) <= 18:
        return int(first)
    if strict:
        shown = ", ".join(headers.get_list("content-length"))
        raise BadLength(f"Content-Length {shown[:100]!r} is not one plain decimal number of at most 18 digits")
    return None


def framing_problem(headers: httpx.Headers) -> str | None:
    """What makes an upstream answer's body framing ambiguous (RFC 9112 6.1, 6.3), or None: a
    Transfer-Encoding other than exactly ``chunked`` (``gzip, chunked``, ``identity``, ``chunked,
    chunked``, two such headers), both Transfer-Encoding and Content-Length (a request smuggling or
    response splitting attempt: parsers disagree on where the body ends), or a Content-Length that
    is not one plain number (``-1``, ``10, 20``, two that differ). Such an answer is a protocol
    error and its connection is not reused. Checked on the headers of every answer with a body
    (not a HEAD's: it has none), in both pools."""
    if "transfer-encoding" in headers:
        codings = [c.strip().lower() for c in headers.get_list("transfer-encoding", split_commas=True)]
        shown = ", ".join(headers.get_list("transfer-encoding"))[:100]
        if codings != ["chunked"]:
            return f"Transfer-Encoding {shown!r}: only chunked is accepted"
        if "content-length" in headers:
            return "both Transfer-Encoding and Content-Length: the body's end is ambiguous (RFC 9112 6.3)"
    try:
        content_length(headers, strict=True)
    except BadLength as exc:
        return str(exc)
    return None


async def read_capped(response: httpx.Response, limit: int, window: float, *, truncate: bool = False) -> bytes:
    """The decoded body, at most ``limit`` bytes of it.

    Over the limit: :class:`BodyTooLarge`, or with ``truncate`` the first ``limit`` bytes
    (an error answer, read for its message). An encoding we cannot decode: :class:`BadEncoding`,
    or with ``truncate`` nothing. The caller closes the response: a body not read to its end
    closes its connection rather than going back to the pool.
    """
    try:
        decoder = _Decoder(response.headers.get("content-encoding", ""))
    except BadEncoding:
        if truncate:
            return b""
        raise
    # a length that is no plain number is no length at all: the cap below still holds while reading
    announced = content_length(response.headers)
    if decoder.coding is None and announced is not None and not truncate and announced > limit:
        raise BodyTooLarge(limit)
    body = bytearray()
    shared = 0      # of _whole's bytes, this body's
    try:
        async for chunk in paced(response, window):
            try:
                body += decoder.feed(chunk, limit - len(body))
            except BadEncoding:
                if truncate:
                    return b""
                raise
            if len(body) > limit:
                if truncate:
                    return bytes(body[:limit])
                raise BodyTooLarge(limit)
            more = max(0, len(body) - OWN_BODY) - shared
            if more:
                if _whole["held"] + more > WHOLE_BODIES:
                    raise MemoryBusy(f"answers read whole hold {WHOLE_BODIES // (1024 * 1024)} MiB")
                _whole["held"] += more
                shared += more
        return bytes(body)
    finally:
        _whole["held"] -= shared
