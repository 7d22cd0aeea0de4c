"""docker-mirror with each request counted once (the totals only), for :mod:`bench.routing`.

    python -P counters_once.py serve --config FILE     (dockermirror on PYTHONPATH)

``Mirror.record`` counts every request twice into the in-memory batch: into the totals
(``requests_hit``...) and for its upstream (``upstream/<key>/requests_hit``...). This runs
the server with the second count left out, so the benchmark can tell what it costs.
It imports nothing but dockermirror, so it runs from a source snapshot.
"""

from __future__ import annotations

import runpy

from dockermirror.mirror import Mirror


def record_totals_only(self: Mirror, cache: str | None, nbytes: int, upstream: str | None = None) -> None:
    if cache:
        kind = cache.lower()
        self.cache.count(f"requests_{kind}")
        self.cache.count(f"bytes_served_{kind}", nbytes)


if __name__ == "__main__":
    Mirror.record = record_totals_only
    runpy.run_module("dockermirror", run_name="__main__", alter_sys=True)
