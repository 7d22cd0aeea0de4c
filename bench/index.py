"""Cost of the cache index's operations as it grows: lookup, touch, add, evict.

    python -m bench.index [--sizes 10000,100000,1000000] [--ops 2000]

For each size it fills a fresh index with that many entries, then times single
operations and prints p50/p99 in microseconds. O(log n) shows as nearly flat rows.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import tempfile
import time
from pathlib import Path

from dockermirror.cache.index import AccessBatch, Entry, Index


def digest(i: int) -> str:
    return "sha256:" + hashlib.sha256(i.to_bytes(8, "big")).hexdigest()


def fill(index: Index, n: int) -> None:
    now = time.time()
    with index._transaction() as conn:
        conn.executemany(
            "INSERT INTO content (digest, size, media_type, kind, created, last_access, hits, pinned)"
            " VALUES (?, ?, NULL, 'blob', ?, ?, 0, 0)",
            ((digest(i), 1000 + i % 5000, now - n + i, now - n + i) for i in range(n)))
        conn.executemany("INSERT INTO refs (upstream, repository, digest) VALUES ('docker.io', ?, ?)",
                         ((f"library/r{i % 1000}", digest(i)) for i in range(n)))


def timed(op, count: int) -> tuple[float, float]:
    samples = []
    for i in range(count):
        start = time.perf_counter()
        op(i)
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def run(n: int, ops: int) -> dict[str, tuple[float, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        index = Index(Path(tmp) / "index.sqlite")
        fill(index, n)
        rng = random.Random(n)
        now = time.time()

        def lookup(i: int) -> None:
            assert index.content(digest(rng.randrange(n))) is not None

        def touch(i: int) -> None:
            batch = AccessBatch()
            batch.touch(digest(rng.randrange(n)), now + i, "docker.io", "library/r1")
            index.apply(batch)

        def add(i: int) -> None:
            d = digest(n + i)
            index.add_content(Entry(d, 1234, None, "blob", now, now), "docker.io", "library/new")

        def evict(i: int) -> None:
            oldest = index.lru(1)[0]
            index.remove_content([oldest.digest])

        results = {name: timed(op, ops) for name, op in
                   (("lookup", lookup), ("touch", touch), ("add", add), ("evict", evict))}
        results["totals"] = timed(lambda i: index.totals(), ops)
        index.close()
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--ops", type=int, default=2000)
    args = parser.parse_args()
    print(f"{'entries':>10}  " + "  ".join(f"{op + ' p50/p99 us':>22}" for op in
                                           ("lookup", "touch", "add", "evict", "totals")))
    for n in (int(s) for s in args.sizes.split(",")):
        results = run(n, args.ops)
        print(f"{n:>10}  " + "  ".join(f"{p50:>10.1f} / {p99:>9.1f}" for p50, p99 in results.values()), flush=True)


if __name__ == "__main__":
    main()
