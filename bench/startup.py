"""Start-up time of the server with a large cache, after a clean stop and after a crash.

    python -m bench.startup [--blobs 100000] [--runs 3]

Builds a cache directory with that many real (small) blob files and their index
rows, then times `docker-mirror serve` from exec until it answers GET /v2/: first
as after a clean stop, then as after kill -9 (the index's "running" marker left set,
so the server checks files against the index before serving).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from dockermirror.cache.index import Index


def build(root: Path, count: int) -> None:
    blobs = root / "blobs" / "sha256"
    (root / "tmp").mkdir(parents=True)
    index = Index(root / "index.sqlite")
    now = time.time()
    rows = []
    for i in range(count):
        data = i.to_bytes(8, "big") * 8
        hexdigest = hashlib.sha256(data).hexdigest()
        path = blobs / hexdigest[:2] / hexdigest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append((f"sha256:{hexdigest}", len(data), now, now))
    with index._transaction() as conn:
        conn.executemany("INSERT INTO content (digest, size, media_type, kind, created, last_access, hits, pinned)"
                         " VALUES (?, ?, NULL, 'blob', ?, ?, 0, 0)", rows)
    index.set_meta("running", "0")
    index.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_time(root: Path) -> float:
    port = free_port()
    argv = [sys.executable, "-m", "dockermirror", "serve", "--listen", f"127.0.0.1:{port}",
            "--cache-dir", str(root), "--upstream", f"http://127.0.0.1:{free_port()}"]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise RuntimeError(proc.stderr.read().decode()) from None
                time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blobs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", "/var/tmp")) as tmp:
        root = Path(tmp) / "cache"
        t = time.perf_counter()
        build(root, args.blobs)
        print(f"built a cache of {args.blobs} blobs in {time.perf_counter() - t:.1f} s")
        clean = [start_time(root) for _ in range(args.runs)]
        print(f"start after a clean stop: median {statistics.median(clean):.2f} s  runs: "
              + " ".join(f"{x:.2f}" for x in clean))
        crashed = []
        for _ in range(args.runs):
            index = Index(root / "index.sqlite")
            index.set_meta("running", "1")
            index.close()
            crashed.append(start_time(root))
        print(f"start after kill -9:      median {statistics.median(crashed):.2f} s  runs: "
              + " ".join(f"{x:.2f}" for x in crashed))
        baseline = Path(tmp) / "empty"
        empty = [start_time(baseline) for _ in range(args.runs)]
        print(f"start with an empty cache: median {statistics.median(empty):.2f} s (interpreter and imports)")


if __name__ == "__main__":
    main()
