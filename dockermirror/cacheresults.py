"""How the cache answered a request, and the figures every view derives from it.

One definition for the request log, the index's counters (``cache stats``, the status line),
the metrics, the status page and ``docker-mirror report``, so that they agree:

- ``HIT``: served from the cache; ``STALE``: a cached answer served because the upstream
  failed; ``COALESCED``: followed a download another request started (fetched once for
  several clients); ``MISS``: fetched from the upstream for this request; ``PASS``: streamed
  from the upstream without being stored.
- the hit ratio is HIT over every request the cache answered;
- bytes "from the cache" (saved) are those sent as HIT, STALE or COALESCED: the upstream did
  not send them again for this request;
- a pull is a manifest GET answered 2xx: what Docker Hub counts against its rate limit.
"""

from __future__ import annotations

from collections.abc import Mapping

HIT, MISS, STALE, COALESCED, PASS = "HIT", "MISS", "STALE", "COALESCED", "PASS"
CACHE_RESULTS = (HIT, MISS, STALE, COALESCED, PASS)
FROM_CACHE = (HIT, STALE, COALESCED)        # sent without an upstream fetch of its own
FROM_UPSTREAM = (MISS, PASS)


def hit_ratio(answers: Mapping[str, int]) -> float | None:
    """HIT over the requests the cache answered (``answers``: counts by result, upper case);
    None when it answered none."""
    total = sum(answers.get(result, 0) for result in CACHE_RESULTS)
    return answers.get(HIT, 0) / total if total else None


def is_pull(kind: str, method: str, status: int) -> bool:
    """A manifest GET that got its manifest: what Docker Hub counts as a pull."""
    return kind == "manifest" and method == "GET" and 200 <= status < 300
