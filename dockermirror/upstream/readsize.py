"""How much of an upstream response httpcore reads at a time, and the check that it still listens.

httpcore reads a response 64 KiB at a time (``AsyncHTTP11Connection.READ_NUM_BYTES``, a class
attribute, not public API; measured on httpcore 1.0.9, bounded in pyproject.toml). For
multi-hundred-MiB layers the per-read overhead (anyio, h11) is what limits a cold download on the
event loop: reading up to READ_SIZE at a time streams ~35% faster (measured: 850 -> 1170 MB/s on
loopback). :func:`apply` sets it when this module is imported (upstream/client.py does).

An httpcore that renamed the attribute, or no longer reads it, would make that setting silently
nothing: :func:`check` (run once at start-up by the service) serves one response to an
``AsyncHTTP11Connection`` over an in-memory stream and looks at the read sizes it asks for. If they
are not READ_SIZE, the setting is undone and the one line it returns says so (responses are then
read at httpcore's default size: correct, slower).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import Any

import httpcore

READ_SIZE = 256 * 1024
_ATTRIBUTE = "READ_NUM_BYTES"
_original: Any = None


def apply() -> None:
    """Have httpcore read READ_SIZE at a time, if it has the attribute at all (:func:`check` says
    whether it is honoured)."""
    global _original
    cls = getattr(httpcore, "AsyncHTTP11Connection", None)
    if cls is not None and isinstance(getattr(cls, _ATTRIBUTE, None), int):
        if _original is None:
            _original = getattr(cls, _ATTRIBUTE)
        setattr(cls, _ATTRIBUTE, READ_SIZE)


def check() -> str:
    """"" if httpcore reads READ_SIZE at a time; else the one line saying it does not (and the
    setting undone). Runs in a thread of its own (its own event loop)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="self-check") as pool:
        problem = pool.submit(_check).result()
    if not problem:
        return ""
    cls = getattr(httpcore, "AsyncHTTP11Connection", None)
    if cls is not None and _original is not None:
        setattr(cls, _ATTRIBUTE, _original)
    try:
        version = metadata.version("httpcore")
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    return (f"self-check: httpcore {version} internals are not what docker-mirror was built against "
            f"({problem}); upstream responses are read at httpcore's default size (correct, slower cold "
            f"downloads). Install the version in requirements.lock (httpcore 1.0.x)")


def _check() -> str:
    try:
        return asyncio.run(asyncio.wait_for(_probe(), 5.0))
    except Exception as exc:     # anything at all: the probe must never stop the start
        return f"{type(exc).__name__}: {exc}"


class _Stream:
    """An in-memory network stream holding one response; records the read sizes asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.asked: list[int] = []

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self.asked.append(max_bytes)
        data, self.data = self.data[:max_bytes], self.data[max_bytes:]
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def start_tls(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def get_extra_info(self, info: str) -> Any:
        return None


async def _probe() -> str:
    cls = getattr(httpcore, "AsyncHTTP11Connection", None)
    if cls is None:
        return "no httpcore.AsyncHTTP11Connection"
    if not isinstance(getattr(cls, _ATTRIBUTE, None), int):
        return f"AsyncHTTP11Connection has no {_ATTRIBUTE}"
    body = b"x" * 1000
    stream = _Stream(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    async with cls(origin=httpcore.Origin(b"http", b"self-check", 80), stream=stream) as connection:
        response = await connection.handle_async_request(httpcore.Request("GET", "http://self-check/", headers=[(b"Host", b"self-check")]))
        got = b"".join([piece async for piece in response.aiter_stream()])
        await response.aclose()
    if got != body:
        return "the probe's body came back wrong"
    if not stream.asked or any(size != READ_SIZE for size in stream.asked):
        return f"it read {sorted(set(stream.asked))} bytes at a time, not {READ_SIZE} ({_ATTRIBUTE} ignored)"
    return ""
