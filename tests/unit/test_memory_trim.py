"""Freed memory given back after a burst of downloads (dockermirror.service.memory)."""

from __future__ import annotations

import threading

import pytest

from dockermirror.service.memory import Trimmer, rss

MiB = 1024 * 1024


def test_a_trim_is_due_once_after_each_burst_and_never_during_one():
    calls: list[int] = []
    trimmer = Trimmer(trim=lambda pad: calls.append(pad) or 1)
    ticks = [False, False, True, True, False, False, False, True, False]
    due = [trimmer.due(busy) for busy in ticks]
    assert due == [False, False, False, False, True, False, False, False, True]
    trimmer.trim()
    assert calls == [0] and trimmer.trims == 1


def test_without_malloc_trim_nothing_is_due():
    trimmer = Trimmer(trim=None)
    trimmer._trim = None        # (as on musl: the C library has no malloc_trim)
    assert not trimmer.available
    assert [trimmer.due(b) for b in (True, False)] == [False, False]
    trimmer.trim()
    assert trimmer.trims == 0


def test_the_heaps_free_memory_goes_back_to_the_system():
    """What downloads do to glibc's heaps: 1 MiB buffers allocated and freed in other threads
    stay in the process (RSS) until the trim gives them back."""
    trimmer = Trimmer()
    if not trimmer.available or rss() is None:
        pytest.skip("no malloc_trim (not glibc) or no /proc/self/statm")
    held: list[bytearray] = []

    def burst() -> None:
        first = bytearray(4 * MiB)  # mapped on its own, and freed: glibc maps blocks under 4 MiB no more
        del first
        buffers = [bytearray(MiB) for _ in range(96)]
        held.extend(buffers[1::2])      # every other one stays: the freed ones are holes inside the heap
        del buffers

    thread = threading.Thread(target=burst)
    thread.start()
    thread.join()
    before = rss()
    trimmer.trim()
    after = rss()
    assert before - after >= 32 * MiB, (before / MiB, after / MiB)


@pytest.mark.anyio
async def test_a_failed_trim_does_not_end_the_status_loop(tmp_path, monkeypatch, caplog):
    """The status loop calls the trim; if it fails (no thread to be had, ...) STATUS= goes on."""
    import asyncio
    import logging

    from dockermirror import config as configuration
    from dockermirror.service import server
    from tests.unit.conftest import config_text

    def boom(pad: int) -> int:
        raise RuntimeError("can't start new thread")

    service = server.Service(configuration.loads(config_text(tmp_path / "cache")), reload_config=lambda: None)
    statuses: list[str] = []
    monkeypatch.setattr(server, "STATUS_INTERVAL", 0.01)
    monkeypatch.setattr(service.systemd, "status", statuses.append)
    service.trimmer = Trimmer(trim=boom)
    busy = iter([True, False, True, False])
    monkeypatch.setattr(service.trimmer, "due", lambda busy, _real=service.trimmer.due, _ticks=busy: _real(next(_ticks, False)))
    caplog.set_level(logging.WARNING, logger="dockermirror")
    task = asyncio.get_running_loop().create_task(service._keep_status())
    try:
        await asyncio.sleep(0.2)
        assert not task.done(), task.exception()
        assert len(statuses) >= 6
        assert [r.getMessage() for r in caplog.records if "freed memory" in r.getMessage()] == [
            "giving freed memory back after downloads failed: RuntimeError: can't start new thread"] * 2
    finally:
        task.cancel()
        await service.app.cache.close()
