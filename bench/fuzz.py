"""A longer fuzz run: malformed requests against a docker-mirror process, then its health.

    .venv/bin/python -m bench.fuzz [--requests 10000] [--seed N] [--workers 4] [--huge-mib 1]
                                   [--only 12,345]                  (run as root, from the clone)

Starts a registry (Debian's docker-registry) on 127.0.0.1, seeds it with four small images
(one multi-platform OCI index, one Docker manifest list), starts a mirror in front of it
with an empty cache, pulls every image through the mirror (so every name the fuzzer uses is
cached), sends the seeded malformed requests (tests/support/fuzzing.py says what each kind is
and how an answer is judged), and then checks: no 5xx (502/503/504 only if the upstream
itself answered 5xx), no connection dropped without an answer where the framing was valid,
descriptors back to where they were, the index and the cache files unchanged, ``cache verify``
clean, the same pulls giving the same digests, no traceback or raw control character in the
log. Prints the findings (each with its case number: ``--only N`` replays it) and writes
bench/results/fuzz.json. Exit status 1 if anything failed, 0 if all held.
Everything it starts listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.support import fuzzing, images
from tests.support.clients import skopeo_push
from tests.support.procs import Mirror, Registry

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# name: (repo, tag, build kwargs, extra skopeo arguments), as the test suite's upstream has them
IMAGES = {
    "hello": ("library/hello", "latest", {}, ()),
    "busybox": ("library/busybox", "latest", {"archs": ("amd64", "arm64")}, ()),
    "alpine": ("library/alpine", "3", {"archs": ("amd64", "arm64")}, ("--format", "v2s2")),
    "tool": ("acme/tool", "1.0", {"random_bytes": 3 * 1024 * 1024}, ()),
}


def seed_upstream(registry: Registry, workdir: Path) -> list[tuple[str, str]]:
    """Build the images and push them to ``registry``; returns (repo, tag) of each."""
    pushed = []
    for name, (repo, tag, kwargs, extra) in IMAGES.items():
        images.build(workdir / name, name, tag=tag, seed=name, **kwargs)
        skopeo_push(workdir / name, tag, f"{registry.address}/{repo}:{tag}", *extra, all_images=True)
        pushed.append((repo, tag))
    return pushed


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10000, help="number of cases (default 10000)")
    parser.add_argument("--seed", type=int, default=None, help="the generator's seed (default: a random one)")
    parser.add_argument("--workers", type=int, default=4, help="connections at a time (default 4)")
    parser.add_argument("--huge-mib", type=float, default=1.0,
                        help="the largest header or target sent, in MiB (default 1)")
    parser.add_argument("--only", type=lambda v: {int(x) for x in v.split(",")}, default=None,
                        help="replay only these case numbers (of the same --seed and --requests)")
    parser.add_argument("--kinds", type=lambda v: set(v.split(",")), default=None,
                        help="send only cases of these kinds (path, reference, method, accept, range, headers, "
                             "query, framing, pipeline, pipeline-garbage, session, early-close)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a case may take (default 30)")
    parser.add_argument("--fd-limit", type=int, default=0,
                        help="run the mirror with this RLIMIT_NOFILE (default: inherited)")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # stop what we started, as on Ctrl-C
    print(f"fuzz seed {args.seed}, {args.requests} requests", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="dm-fuzz-", dir="/var/tmp"))
    try:
        with contextlib.ExitStack() as stack:
            registry = Registry(scratch / "upstream")
            stack.callback(registry.stop)
            registry.start()
            pushed = seed_upstream(registry, scratch / "images")
            mirror = Mirror(scratch, {"upstream": {"url": registry.url, "registry": "docker.io"}})
            if args.fd_limit:
                mirror.argv = ["prlimit", f"--nofile={args.fd_limit}", "--", *mirror.argv]
            stack.callback(mirror.stop)
            mirror.start()
            print(f"upstream {registry.url}, mirror {mirror.url} (pid {mirror.pid}); warming the cache", flush=True)
            targets = fuzzing.warm(mirror.url, pushed)
            started = time.monotonic()

            def progress(done: int) -> None:
                if done % 1000 == 0:
                    print(f"  {done} cases sent ({time.monotonic() - started:.0f}s)", flush=True)

            report = fuzzing.fuzz_mirror(mirror, registry, targets, seed=args.seed, count=args.requests,
                                         workers=args.workers, huge=int(args.huge_mib * 1024 * 1024),
                                         only=args.only, timeout=args.timeout, progress=progress,
                                         kinds=args.kinds)
            text = report.text(limit=200)
            print(text, flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "fuzz.json").write_text(json.dumps({
                "seed": args.seed, "requests": args.requests, "seconds": round(report.run.seconds, 1),
                "statuses": report.run.statuses(), "failures": report.failures, "notes": report.notes,
                "findings": [{"case": f.case.number, "kind": f.case.kind, "framing": f.case.framing,
                              "what": f.case.what, "problem": f.problem, "statuses": f.outcome.statuses,
                              "connection": f.outcome.ended} for f in report.run.findings],
            }, indent=2) + "\n")
            shutil.copy(mirror.log_path, RESULTS / "fuzz-mirror.log")
            print("wrote bench/results/fuzz.json and bench/results/fuzz-mirror.log")
            return 1 if report.failures else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
