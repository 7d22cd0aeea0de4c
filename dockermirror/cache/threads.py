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
    (then the cancellation is raised once they are). Their errors count as seen: the caller
    asks for them if it wants them."""
    pending = [asyncio.wrap_future(f) if isinstance(f, Future) else f for f in futures if not f.done()]
    if not pending:
        return
    # one plain future for all of them: no task per wait (asyncio.run's end cancels tasks, not it)
    all_done = asyncio.get_running_loop().create_future()
    left = len(pending)

    def one_done(future: asyncio.Future) -> None:
        nonlocal left
        retrieved(future)
        left -= 1
        if not left and not all_done.done():
            all_done.set_result(None)

    for future in pending:
        future.add_done_callback(one_done)
    cancelled = False
    while not all_done.done():
        try:
            await asyncio.shield(all_done)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def to_end(call: Callable[..., T], *args: object, executor: Executor | None = None,
                 on_error: Callable[[BaseException], None] | None = None) -> T:
    """``call(*args)`` in a thread (``executor``, or the loop's default); if this is cancelled
    meanwhile, the cancellation is raised only once the thread has returned (and what the
    thread raised goes to ``on_error``, since it cannot be raised then)."""
    job = asyncio.get_running_loop().run_in_executor(executor, functools.partial(call, *args))
    try:
        await finished(job)
    except asyncio.CancelledError:
        if on_error is not None and not job.cancelled() and job.exception() is not None:
            on_error(job.exception())
        raise
    return job.result()


def retrieved(future: asyncio.Future | Future) -> None:
    """A done-callback: the future's exception counts as seen (no "never retrieved" warning)."""
    if not future.cancelled():
        future.exception()
