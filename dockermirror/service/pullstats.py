"""What was pulled since the server started, told by each finished request (a request observer):
requests by how the cache answered them (the hit ratio since start) and the most pulled
repositories.

The most-pulled table must stay small whatever clients ask for, so:

- only a successful pull counts: a ``GET`` of a manifest answered 2xx (what Docker Hub counts
  as a pull). A name that does not exist, is refused or is malformed never gets in; a ``HEAD``
  (a tag check) is not a pull;
- the table holds at most ``capacity`` repositories (1000: a few hundred KiB), kept with the
  *space-saving* algorithm (Metwally, Agrawal and El Abbadi, 2005): a repository not in a full
  table takes the place of one with the lowest count and starts from that count plus one,
  remembering that count as its possible over-count (``error``). So every repository pulled more
  than (pulls counted / capacity) times is in the table, a count is never too low, and a count
  is too high by at most its ``error``. Millions of distinct names churn the bottom of the
  table only; each update is O(1) (buckets of equal counts, no scan, no sort).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from dockermirror.api.accesslog import RequestDone
from dockermirror.cacheresults import CACHE_RESULTS

K = TypeVar("K", bound=Hashable)

CAPACITY = 1000
# longer than any valid name (255) with its upstream key: not a repository, not counted
_LONGEST_KEY = 600


@dataclass(frozen=True, slots=True)
class Counted(Generic[K]):
    key: K
    count: int          # never lower than the true count
    error: int          # the count may be this much too high (0: exact)


class SpaceSaving(Generic[K]):
    """The most frequent keys of a stream, in at most ``capacity`` entries, O(1) per key."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.seen = 0                                   # keys added, in all
        self._entries: dict[K, tuple[int, int]] = {}    # key -> (count, error)
        self._buckets: dict[int, dict[K, None]] = {}    # count -> its keys, the longest there first
        self._lowest = 0                                # the lowest count in the table

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: K) -> None:
        self.seen += 1
        entry = self._entries.get(key)
        if entry is not None:
            count, error = entry
            self._leave(key, count, count + 1)
            self._enter(key, count + 1, error)
            return
        if len(self._entries) < self.capacity:
            self._enter(key, 1, 0)
            self._lowest = 1
            return
        floor = self._lowest
        bucket = self._buckets[floor]
        victim = next(iter(bucket))
        del self._entries[victim]
        self._leave(victim, floor, floor + 1)
        self._enter(key, floor + 1, floor)

    def _enter(self, key: K, count: int, error: int) -> None:
        self._entries[key] = (count, error)
        self._buckets.setdefault(count, {})[key] = None

    def _leave(self, key: K, count: int, next_lowest: int) -> None:
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]
            if count == self._lowest:
                self._lowest = next_lowest

    def top(self, n: int, keep: Callable[[K], bool] = lambda key: True) -> list[Counted[K]]:
        """The ``n`` highest counts among the keys ``keep`` accepts, highest first."""
        found: list[Counted[K]] = []
        for key, (count, error) in self._ranked():
            if len(found) >= n:
                break
            if keep(key):
                found.append(Counted(key, count, error))
        return found

    def _ranked(self) -> Iterator[tuple[K, tuple[int, int]]]:
        return iter(sorted(self._entries.items(), key=lambda item: (-item[1][0], item[1][1])))


class PullStats:
    """The request observer behind the status page: O(1) per request, no I/O."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.answers = dict.fromkeys(CACHE_RESULTS, 0)     # requests answered, by cache result
        self.pulls: SpaceSaving[tuple[str, str]] = SpaceSaving(capacity)   # (upstream, repository)

    def __call__(self, done: RequestDone) -> None:
        if done.cache in self.answers:
            self.answers[done.cache] += 1
        if (done.pull
                and done.upstream and done.repository
                and len(done.upstream) + len(done.repository) <= _LONGEST_KEY):
            self.pulls.add((done.upstream, done.repository))
