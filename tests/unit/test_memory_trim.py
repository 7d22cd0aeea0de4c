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
        first = bytearray(MiB)      # freed once: glibc maps 1 MiB blocks no more, they come from the heap
        del first
        buffers = [bytearray(MiB) for _ in range(96)]
        held.append(bytearray(64))      # (a small block after them: the heap's top cannot shrink)
        del buffers

    thread = threading.Thread(target=burst)
    thread.start()
    thread.join()
    before = rss()
    trimmer.trim()
    after = rss()
    assert before - after >= 48 * MiB, (before / MiB, after / MiB)
