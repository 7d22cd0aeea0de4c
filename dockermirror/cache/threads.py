"""Work in threads that holds a resource (a file descriptor, the index) the caller releases
after it: cancelling the task that awaits a thread does not stop the thread, so the caller
waits for the thread to return before the cancellation goes on."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import TypeVar

T = TypeVar("T")


async def finished(*futures: Future | asyncio.Future) -> None:
    """Wait until every one of ``futures`` is done, however often this is cancelled meanwhile
    (then the cancellation is raised once they are)."""
    pending = [asyncio.wrap_future(f) if isinstance(f, Future) else f for f in futures if not f.done()]
    cancelled = False
    while pending:
        try:
            await asyncio.shield(asyncio.wait(pending))
        except asyncio.CancelledError:
            cancelled = True
        pending = [f for f in pending if not f.done()]
    if cancelled:
        raise asyncio.CancelledError


async def to_end(call: Callable[..., T], *args: object, executor: Executor | None = None) -> T:
    """``call(*args)`` in a thread (``executor``, or the loop's default); if this is cancelled
    meanwhile, the cancellation is raised only once the thread has returned."""
    job = asyncio.get_running_loop().run_in_executor(executor, functools.partial(call, *args))
    await finished(job)
    return job.result()


def retrieved(future: asyncio.Future | Future) -> None:
    """A done-callback: the future's exception counts as seen (no "never retrieved" warning)."""
    if not future.cancelled():
        future.exception()
