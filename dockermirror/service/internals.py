"""The start-up self-check of the uvicorn internals the mirror's HTTP protocol reaches into.

:mod:`.zerocopy` subclasses uvicorn's ``HttpToolsProtocol`` (uvicorn.protocols.http.httptools_impl),
measured on uvicorn 0.54 and httptools 0.9 (pyproject.toml bounds them). What it relies on that is
not uvicorn's public API:

* the request side (client limits): the protocol's ``__init__(config, server_state, app_state,
  _loop)``, its ``parser`` (``feed_data``), ``url``, ``scope``, ``cycle``, ``pipeline``, ``transport``,
  ``loop``, ``client``; the httptools callbacks it overrides (``on_message_begin``, ``on_url``,
  ``on_header``, ``on_headers_complete``, ``on_message_complete``) and uvicorn's
  ``on_response_complete``, ``send_400_response``, ``_unset_keepalive_if_required``; httptools'
  ``HttpParserError`` and ``HttpParserUpgrade``;
* the response side (zero-copy send, the send deadline, bodies in pieces, own reason phrases): the
  ``RequestResponseCycle`` the protocol makes in ``on_headers_complete`` (``self.cycle``), its
  ``send``, ``transport``, ``flow`` (uvicorn's FlowControl: ``write_paused``, ``drain()``),
  ``disconnected``, ``keep_alive``, ``response_started``, ``response_complete``, ``chunked_encoding``,
  ``expected_content_length`` (decremented by what sendfile sent, so uvicorn still enforces
  Content-Length), ``scope``; that uvicorn writes the status line and headers in one
  ``transport.write`` beginning with ``STATUS_LINE[status]``.

Names can be checked, meaning cannot: so the check is a probe. Before the server starts, one
request is served through the protocol on 127.0.0.1 in a throwaway event loop, twice on one
keep-alive connection: first with zero-copy off (the request side alone), then with it on (a file
range sent with ``sendfile``, with its own reason phrase). The bytes the client receives must be
exactly what was offered. What fails turns off only what depends on it, with ONE warning:

* the response side: zero-copy off (``ZeroCopyHttpToolsProtocol.zero_copy = False``): the scope
  offers no ``http.response.zerocopysend`` extension, so responses stream through uvicorn as plain
  bytes (correct, more CPU), and uvicorn's own ``send`` is used as it is;
* the request side: the protocol is not used at all: uvicorn's h11 protocol serves instead (its own
  header size limit is set to ``server.max_header_size``; no header deadline, no zero-copy, and no
  ``scope["client_certificate"]``: the access guard then treats every client as anonymous, and
  with ``tls.client_auth: required`` refuses every request: it fails closed).

Only a proven failure turns anything off: an exception or wrong bytes. A probe that does not finish
in time (a busy machine) is tried once more; if that one does not finish either, the check is
inconclusive: one info line, and the mirror's protocol and zero copy stay on. Nothing the probe
started outlives its loop (what is left is cancelled and drained before the loop closes). A probe
that cannot even start (no temporary file, no socket on 127.0.0.1) is not run: one info line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

log = logging.getLogger("dockermirror")

PROBE_TIMEOUT = 5.0          # seconds for one attempt of the probe (it is tried twice at most)
DRAIN_TIMEOUT = 0.5          # seconds for what a probe left running to end after a cancel, per round
PROBE_BODY = 200 * 1024      # bytes of the probe's response: more than uvicorn's 64 KiB pieces
REASON = "OK self-check"


@dataclass(frozen=True)
class Verdict:
    """What of the protocol may be used; ``problem``: why not (empty when all is well)."""

    limits: bool = True          # the request side: our protocol at all
    zero_copy: bool = True       # the response side
    problem: str = ""

    def line(self) -> str:
        """The one log line an operator sees (empty when all is well)."""
        if not self.problem:
            return ""
        versions = ", ".join(f"{name} {_version(name)}" for name in ("uvicorn", "httptools"))
        if not self.limits:
            effect = ("serving with uvicorn's h11 protocol instead: no zero-copy send, no request header "
                      "or send deadline (header size still limited), no client-certificate identities (with "
                      "tls.client_auth: required every request is refused)")
        else:
            effect = ("zero-copy send off: responses stream through uvicorn as plain bytes (correct, more CPU), "
                      "and the send deadline (server.send_timeout) is off with it")
        return (f"self-check: {versions} internals are not what docker-mirror was built against ({self.problem}); "
                f"{effect}. Install the versions in requirements.lock (uvicorn 0.54.x, httptools 0.9.x)")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def check(protocol: type) -> Verdict:
    """Probe ``protocol`` (a ZeroCopyHttpToolsProtocol subclass) in a thread of its own (its own
    event loop: callable whether or not one runs in this thread)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="self-check") as pool:
        return pool.submit(_check, protocol).result()


def _check(protocol: type) -> Verdict:
    try:
        file = tempfile.TemporaryFile()    # noqa: SIM115  (closed by the with below)
    except Exception as exc:        # ENOSPC, an unusable TMPDIR: the probe must never stop the start
        log.info("self-check of the HTTP protocol not run: no temporary file (%s)", _reason(exc))
        return Verdict()
    with file:
        body = os.urandom(PROBE_BODY)
        try:
            file.write(body)
            file.flush()
        except Exception as exc:
            log.info("self-check of the HTTP protocol not run: cannot write a temporary file (%s)", _reason(exc))
            return Verdict()
        for _attempt in range(2):   # a timeout is tried once more: a busy machine is no drift
            problem = _attempt_probe(protocol, file, body)
            if problem != "timeout":
                break
    if problem == "timeout":
        log.info("self-check of the HTTP protocol could not finish in time (twice %g s: a busy machine?); "
                 "serving with the mirror's protocol and zero-copy send unchecked", PROBE_TIMEOUT)
        return Verdict()
    if problem is None:
        return Verdict()
    side, what = problem
    return Verdict(limits=side != "request", zero_copy=False, problem=what)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


@dataclass
class _Seen:
    """What a probe saw so far: still readable after it timed out."""

    side: str = "request"
    failures: list[str] = field(default_factory=list)


def _attempt_probe(protocol: type, file: Any, body: bytes) -> tuple[str, str] | str | None:
    """One probe in a throw-away loop: None (all well), (side, what went wrong), or "timeout"
    (no wrong bytes, nothing raised, but no end either)."""
    loop = _new_loop()
    seen = _Seen()
    try:
        try:
            return loop.run_until_complete(asyncio.wait_for(_probe(protocol, file, body, seen), PROBE_TIMEOUT))
        except TimeoutError:
            if seen.failures:       # something raised just as the time ran out: proven
                return seen.side, "; ".join(dict.fromkeys(seen.failures))
            return "timeout"
        except Exception as exc:    # anything at all: the probe must never stop the start
            return seen.side, _describe(exc)
    finally:
        _drain(loop)
        loop.close()


def _drain(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what the probe left running (a stalled response) and let it end, so that no task is
    destroyed pending once the loop is closed. uvicorn answers a cancelled app with a 500 it awaits
    (which a stall holds up again): so a few rounds, each bounded; what still runs then is let go
    without the "destroyed but pending" report."""
    loop.set_exception_handler(_ignore)   # the probe's handler wakes futures of this loop
    for _round in range(3):
        tasks = asyncio.all_tasks(loop)
        if not tasks:
            break
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.wait(tasks, timeout=DRAIN_TIMEOUT))
    for task in asyncio.all_tasks(loop):
        task._log_destroy_pending = False   # type: ignore[attr-defined]


def _ignore(_loop: Any, context: dict[str, Any]) -> None:
    log.debug("self-check: after the probe: %s", _describe(context.get("exception")) or context.get("message", "?"))


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _describe(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}" if exc is not None else ""


async def _probe(protocol: type, file: Any, body: bytes, seen: _Seen) -> tuple[str, str] | None:
    """None if both requests got exactly ``body``; else (side, what went wrong). ``seen``: the side
    being probed and what raised so far."""
    import uvicorn
    from uvicorn.server import ServerState

    from dockermirror.service.zerocopy import EXTENSION

    offered: list[bool] = []
    failures = seen.failures        # what the app's sends raised, what the loop caught (protocol callbacks)
    failed = asyncio.Event()

    def caught(_loop: Any, context: dict[str, Any]) -> None:
        failures.append(_describe(context.get("exception")) or context.get("message", "?"))
        failed.set()

    asyncio.get_running_loop().set_exception_handler(caught)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        zero_copy = EXTENSION in scope.get("extensions", {})
        offered.append(zero_copy)
        try:
            await send({"type": "http.response.start", "status": 200, "reason": REASON,
                        "headers": [(b"content-length", b"%d" % len(body))]})
            if zero_copy:
                await send({"type": EXTENSION, "file": file, "offset": 0, "count": len(body), "more_body": False})
            else:
                await send({"type": "http.response.body", "body": body, "more_body": False})
        except Exception as exc:
            failures.append(_describe(exc))
            failed.set()

    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, http=protocol)
    config.load()
    state = ServerState()
    quiet = logging.getLogger("dockermirror.self-check")    # what uvicorn would log of the probe
    quiet.disabled = True
    probe = type(protocol.__name__, (protocol,), {"zero_copy": False})

    def make() -> asyncio.Protocol:
        instance = probe(config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop())
        instance.logger = quiet
        return instance

    try:
        server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    except OSError as exc:
        log.info("self-check of the HTTP protocol not run: cannot listen on 127.0.0.1 (%s)", exc.strerror or exc)
        return None
    answer: asyncio.Future[str | None] | None = None
    failure: asyncio.Future[Any] | None = None
    try:
        # one keep-alive connection: first the request side alone, then zero-copy (the protocol
        # reads ``zero_copy`` at each request)
        for side, zero_copy in (("request", False), ("response", True)):
            seen.side = side
            probe.zero_copy = zero_copy
            writer.write(b"GET /v2/ HTTP/1.1\r\nHost: self-check\r\n\r\n")
            answer = asyncio.ensure_future(_answer(reader, body, REASON if zero_copy else None))
            failure = asyncio.ensure_future(failed.wait())
            await asyncio.wait({answer, failure}, return_when=asyncio.FIRST_COMPLETED)
            failure.cancel()
            problem = None
            if answer.done():
                problem = answer.result()
            else:                       # something raised (in ``failures``): no answer is coming
                answer.cancel()
            if problem is None and not failures and offered[-1:] != [zero_copy]:
                problem = "the zero-copy extension was not offered" if zero_copy else "unexpected extension"
            if problem is not None or failures:
                return side, "; ".join(dict.fromkeys(failures or [problem or "?"]))
    finally:
        waiting = [task for task in (answer, failure) if task is not None]
        for task in waiting:        # on a timeout, neither is done
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        writer.close()
        server.close()
        for connection in list(state.connections):
            try:
                connection.transport.close()
            except Exception:
                pass
    return None


async def _answer(reader: asyncio.StreamReader, body: bytes, reason: str | None) -> str | None:
    """None if the response is 200 (with ``reason``, if given) and exactly ``body``."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return "the connection closed before a response head"
    except asyncio.LimitOverrunError:
        return "the response did not begin with its head"
    lines = head.decode("latin-1").split("\r\n")
    expected = f"HTTP/1.1 200 {reason or 'OK'}"
    if lines[0] != expected:
        return f"status line {lines[0]!r}, not {expected!r}"
    fields = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:] if line)}
    if fields.get("content-length") != str(len(body)):
        return f"content-length {fields.get('content-length')!r}"
    try:
        got = await reader.readexactly(len(body))
    except asyncio.IncompleteReadError as exc:
        return f"{len(exc.partial)} of {len(body)} body bytes"
    return None if got == body else "the body's bytes differ"
