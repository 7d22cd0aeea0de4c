"""docker-mirror against the reference mirror (CNCF Distribution in proxy mode), side by side.

    bench/run.sh [--rounds 5] [--only warm,clients] [--duration 20] [--big-mib 300]
    (= .venv/bin/python -m bench ..., after installing what it needs)

Starts an upstream registry seeded with a big blob, a 1 MiB blob and a multi-layer
image (and 16 blobs of 32 MiB for the many scenario), then an HTTP and a TLS instance of each
mirror with its own empty cache, all on 127.0.0.1 (plus, when their scenarios run, the same
storage served over TLS with a pair of mirrors fetching from it, a pair that keeps idle
connections long, and a trivial sendfile server of the big blob's file); runs every scenario
on both mirrors in turn; prints medians, ratios and
PASS/MISS against the targets; writes bench/results/latest.json and, after a run of
every scenario, the table in docs/performance.md. A missed target is not a failure: the exit
status is non-zero only when the benchmark itself broke (a failed request, a dead server).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import hashlib
import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import harness, report, static
from bench.clients import WrkResult
from bench.idle import raise_nofile
from bench.monitor import Monitor
from bench.scenarios import CLIENTS, IDLE, SCENARIOS, Setup
from bench.seed import MANY, MANY_MIB, seed
from bench.servers import DockerMirror, Reference, Server, snapshot
from tests.support.certs import TestPKI, make_pki
from tests.support.procs import Daemon, Registry

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) | level=(error|fatal|panic) ")   # docker-mirror's, Distribution's
STAMP = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d |time="[^"]*" )')
# The long-keepalive pair keeps idle connections for the idle scenario: docker-mirror's
# server.keepalive_timeout, and Distribution 2.8, which sets no idle timeout on its http.Server.
LONG_KEEPALIVE = "1h"
KEEPALIVE_NOTE = (f"The idle row runs on its own pair of servers: docker-mirror with server.keepalive_timeout "
                  f"{LONG_KEEPALIVE} (so the {IDLE:,} connections stay open for the row), the reference as always "
                  "(Distribution 2.8 closes no idle connection); the benchmark's open-files limit is raised to "
                  "its hard limit, which the servers inherit.")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per scenario (default 5)")
    parser.add_argument("--only", type=lambda v: v.split(","), default=list(SCENARIOS),
                        help=f"comma-separated scenarios out of {','.join(SCENARIOS)} (default all)")
    parser.add_argument("--duration", type=int, default=20, help="seconds of each 32-client run (default 20)")
    parser.add_argument("--big-mib", type=int, default=300, help="size of the big blob in MiB (default 300)")
    args = parser.parse_args(argv)
    if unknown := set(args.only) - set(SCENARIOS):
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def revision(source: Path) -> str:
    """The docker-mirror code measured: the commit, and a hash of the copy if dockermirror/ had local changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if not git("status", "--porcelain", "dockermirror"):
        return commit
    digest = hashlib.sha256()
    for path in sorted(source.rglob("*.py")):
        digest.update(path.relative_to(source).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{commit} + uncommitted changes in dockermirror/ (sources sha256 {digest.hexdigest()[:12]})"


def measure(args: argparse.Namespace, scratch: Path, code: Path,
            logs: dict[str, Path]) -> tuple[report.Results, WrkResult | None]:
    """Start everything, run the scenarios, stop everything (also on failure).

    docker-mirror runs from the copy of its package in ``code``; ``logs`` gets each
    server's log file, by name, as the server starts.
    """
    results: report.Results = {}
    ceiling = None
    with contextlib.ExitStack() as stack:
        def start(name: str, server: Daemon) -> Daemon:
            logs[name] = server.log_path
            stack.callback(server.stop)
            server.start()
            return server

        upstream = start("upstream", Registry(scratch / "upstream"))
        many = "many" in args.only
        print(f"upstream {upstream.url}: seeding a {args.big_mib} MiB blob, a 1 MiB blob, a multi-layer image"
              f"{f', {MANY} blobs of {MANY_MIB} MiB' if many else ''}", flush=True)
        content = seed(upstream.address, scratch / "images", args.big_mib, many=many)
        pki = make_pki(scratch / "pki", days=365, names=("localhost", socket.gethostname()))
        pairs = {SCENARIOS[name].pair for name in args.only}
        upstream_tls = None
        if any(pair.endswith("-tls-upstream") for pair in pairs):
            upstream_tls = start("upstream-tls", Registry(scratch / "upstream-tls", storage=upstream.storage,
                                                          tls=(pki.certificate, pki.key)))
            print(f"upstream over TLS {upstream_tls.url}: the same storage", flush=True)
        servers: dict[str, list[Server]] = {}
        for pair in sorted(pairs):
            servers[pair] = [start(f"{server.label}-{pair}", server)
                             for server in make_pair(pair, scratch, code, upstream, upstream_tls, pki)]
            print(f"{pair}: docker-mirror {servers[pair][0].url}, reference {servers[pair][1].url}", flush=True)
        if "idle" in args.only:
            print(KEEPALIVE_NOTE, flush=True)
        ceiling_url = stack.enter_context(static.running(content.big.file, scratch)) if "warm" in args.only else None
        setup = Setup(upstream, content, pki, scratch, args.duration, upstream_tls, ceiling_url)
        if "clients" in args.only:
            ceiling = static.ceiling(content.mid.file, scratch, CLIENTS, args.duration)
            print(f"load tool ceiling: wrk against a trivial sendfile server, same 1 MiB file: "
                  f"{ceiling.rps:,.0f} req/s, p99 {ceiling.p99 * 1000:.0f} ms, wrk CPU "
                  f"{100 * ceiling.cpu / args.duration:.0f}%", flush=True)
        with Monitor() as monitor:
            for name in args.only:
                scenario = SCENARIOS[name]
                print(f"{name}: {scenario.title}", flush=True)
                results[name] = harness.run(scenario, servers[scenario.pair], setup, args.rounds, monitor)
    return results, ceiling


def make_pair(pair: str, scratch: Path, code: Path, upstream: Registry, upstream_tls: Registry | None,
              pki: TestPKI) -> list[Server]:
    """docker-mirror and the reference for a :attr:`Scenario.pair`: http or tls to the clients, then
    the variant: -tls-upstream (both fetch from the TLS upstream, trusting the test CA), -long-keepalive
    (docker-mirror keeps idle client connections for LONG_KEEPALIVE)."""
    kind, _, variant = pair.partition("-")
    cert = pki if kind == "tls" else None
    url, ca = (upstream_tls.url, pki.ca) if variant == "tls-upstream" and upstream_tls else (upstream.url, None)
    server = {"keepalive_timeout": LONG_KEEPALIVE} if variant == "long-keepalive" else None
    return [DockerMirror(scratch / f"dm-{pair}", url, code, cert, upstream_ca=ca, server=server),
            Reference(scratch / f"ref-{pair}", url, cert, upstream_ca=ca)]


def keep_logs(logs: dict[str, Path]) -> dict[str, list[str]]:
    """Copy the logs to bench/results/logs/; return the mirrors' warning and error lines (without time)."""
    RESULTS.joinpath("logs").mkdir(parents=True, exist_ok=True)
    problems = {}
    for name, path in logs.items():
        text = path.read_text(errors="replace") if path.exists() else ""
        RESULTS.joinpath("logs", f"{name}.log").write_text(text)
        if not name.startswith("upstream"):   # their errors are the 404s of skopeo's checks while seeding
            problems[name] = [STAMP.sub("", line) for line in text.splitlines() if PROBLEM.search(line)]
    return problems


def summary(args: argparse.Namespace, results: report.Results, ceiling: WrkResult | None, command: str,
            date: datetime.datetime, source: str, seconds: float, load: str) -> str:
    """The Markdown that is printed and goes into docs/performance.md."""
    parts = [
        f"Measured {date:%Y-%m-%d %H:%M} UTC on {report.machine()}; docker-mirror {source}.",
        f"Command: `{command}` ({args.rounds} round{'s' if args.rounds > 1 else ''}, run time {seconds / 60:.1f} min, "
        f"1-minute load average at the start: {load}). "
        "Values are medians over the rounds (peak RSS: the highest sample, every 50 ms, of the "
        "server's processes; CPU: user + system seconds per GB sent to clients); ratio = docker-mirror / "
        "reference. Everything runs on one machine over loopback; the clients (curl, wrk, skopeo) share its cores.",
        "", report.targets_table(results, args.big_mib), "",
        report.all_metrics_table(results, {name: SCENARIOS[name].title for name in results}),
    ]
    if ceiling:
        fastest = max(r.summary("req/s") for r in results["clients"].values()) if "clients" in results else 0
        verdict = ("more than either mirror gets, so the load tool is not what limits them" if ceiling.rps > fastest
                   else "NOT more than the mirrors get: the load tool may be what limits them")
        parts += ["", f"Load tool ceiling: the same wrk load (`wrk -t2 -c{CLIENTS} -d{args.duration}s --latency`) "
                  "against a trivial server (`python -m bench.static`: http.server + sendfile) of the same 1 MiB "
                  f"file gets {ceiling.rps:,.0f} req/s (p99 {ceiling.p99 * 1000:.0f} ms, wrk's own CPU "
                  f"{100 * ceiling.cpu / args.duration:.0f}% of the 200% its two threads can use): {verdict}."]
    if "idle" in results:
        parts += ["", KEEPALIVE_NOTE]
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    raise_nofile()   # the idle scenario's connections; the servers started from here inherit it
    command = shlex.join(["bench/run.sh", *argv])
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # stop what we started, as on Ctrl-C
    date, started = datetime.datetime.now(datetime.UTC), time.monotonic()
    load = Path("/proc/loadavg").read_text().split()[0]   # other work on the machine is noise
    scratch = Path(tempfile.mkdtemp(prefix="dm-bench-", dir="/var/tmp"))
    logs: dict[str, Path] = {}
    try:
        code = snapshot(ROOT / "dockermirror", scratch / "src")
        source = revision(code)
        results, ceiling = measure(args, scratch, code, logs)
    finally:
        problems = keep_logs(logs)
        shutil.rmtree(scratch, ignore_errors=True)
        print("server logs: bench/results/logs/", flush=True)
    seconds = time.monotonic() - started
    text = summary(args, results, ceiling, command, date, source, seconds, load)
    print("\n" + text + "\n")
    for name, lines in problems.items():
        for line, count in collections.Counter(lines).items():
            print(f"{name} log: {count} x {line}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps({
        "command": command, "date": date.isoformat(timespec="seconds"),
        "machine": report.machine(), "revision": source, "seconds": round(seconds, 1), "load_average": load,
        "args": vars(args),
        "load_tool_ceiling": ceiling and {"rps": ceiling.rps, "p99_ms": ceiling.p99 * 1000,
                                          "wrk_cpu_s": ceiling.cpu, "output": ceiling.text},
        "scenarios": {name: {label: rounds.to_json() for label, rounds in pair.items()}
                      for name, pair in results.items()},
        "log_problems": problems,
    }, indent=2) + "\n")
    print("wrote bench/results/latest.json")
    if set(args.only) == set(SCENARIOS):
        report.replace_readme(ROOT / "docs" / "performance.md", text)
        print("updated the table in docs/performance.md")
    else:
        print("docs/performance.md left alone (only a full run of every scenario updates it)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
