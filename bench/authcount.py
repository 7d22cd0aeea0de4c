"""What the guard costs, counted in instructions: repeatable on a busy machine, where req/s is not.

    .venv/bin/python -m bench.authcount [-n 200] [--baseline REV]

The servers of ``bench.routing --auth`` (``one``: no authentication; ``auth``: an htpasswd user
and one rule, every request with its Basic credentials), each under valgrind's callgrind with
instrumentation off until warm: then N sequential GETs of the cached 1 MiB blob on one
keep-alive connection (one curl), counted from ``callgrind_control -i on`` to a dump. Printed:
user-space instructions per request (all threads: the kernel's copy of the blob, most of the
CPU, is not counted; it is the same for both), and auth's extra over one. With ``--baseline
REV`` the same two servers on the code of git revision REV too. Nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.clients import BenchError
from bench.routing import BASIC, ROOT, WARM_REPO, code_of, curl_parallel, guarded, push_blob
from bench.seed import MiB, random_data
from bench.servers import DockerMirror, snapshot
from tests.support.procs import Registry, wait_until

WARM_UP = 20


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.authcount", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="requests counted per server (default 200)")
    parser.add_argument("--baseline", metavar="REV", help="also the two servers on the code of git revision REV")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("-n must be at least 1")
    return args


def gets(url: str, count: int, headers: dict[str, str]) -> None:
    """``count`` GETs of ``url``, one after another on one connection; each must succeed."""
    argv = ["curl", "-s", "--fail", *[arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]]
    for _ in range(count):
        argv += ["-o", "/dev/null", url]
    subprocess.run(argv, check=True, timeout=3600)


def instructions(out: Path) -> int:
    """The instructions a callgrind dump counted (its ``summary:`` or ``totals:`` line)."""
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise BenchError(f"no totals in {out}")


def count(scratch: Path, name: str, source: Path, upstream: str, digest: str, size: int, n: int) -> int:
    """Instructions per request of server ``name`` (one or auth) running the code in ``source``."""
    auth = name.endswith("auth")
    mirror = DockerMirror(scratch / f"dm-{name}", upstream, source)
    out = scratch / f"{name}.callgrind"
    mirror.argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                   sys.executable, "-P", *mirror.argv[2:]]
    if auth:
        guarded(mirror, scratch / f"htpasswd-{name}")
    headers = BASIC if auth else {}
    url = f"{mirror.url}/v2/{WARM_REPO}/blobs/{digest}"
    with contextlib.ExitStack() as stack:
        stack.callback(mirror.stop)
        mirror.start()
        curl_parallel(url, size, 1, headers)
        wait_until(lambda: mirror.blob_file(digest).exists(), 60, what="blob cached")
        gets(url, WARM_UP, headers)
        pid = str(mirror.pid)
        subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
        gets(url, n, headers)
        subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
    # the dump callgrind_control -d asked for is part 1 (the one written at exit counts nothing useful)
    return instructions(out.with_name(out.name + ".1")) // n


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "curl"):
        if shutil.which(tool) is None:
            print(f"bench.authcount: {tool} is needed (apt-get install valgrind curl)", file=sys.stderr)
            return 2
    scratch = Path(tempfile.mkdtemp(prefix="dm-authcount-", dir="/var/tmp"))
    try:
        with contextlib.ExitStack() as stack:
            upstream = Registry(scratch / "upstream")
            stack.callback(upstream.stop)
            upstream.start()
            data = random_data("routing/mid", MiB)
            digest = push_blob(upstream.url, WARM_REPO, data)
            sources = {"": snapshot(ROOT / "dockermirror", scratch / "src")}
            if args.baseline:
                sources[f"{args.baseline} "] = code_of(args.baseline, scratch / "src-before")
            for label, source in sources.items():
                per = {name: count(scratch, f"{label.strip() or 'now'}-{name}", source, upstream.url, digest,
                                   len(data), args.n) for name in ("one", "auth")}
                extra = per["auth"] - per["one"]
                print(f"{label}one {per['one']:,} instructions/request, auth {per['auth']:,} (+{extra:,}, "
                      f"{per['auth'] / per['one']:.3f} of one)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
