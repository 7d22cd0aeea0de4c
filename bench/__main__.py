"""docker-mirror against the reference mirror (CNCF Distribution in proxy mode), side by side.

    bench/run.sh [--rounds 5] [--only warm,clients] [--duration 20] [--big-mib 300]
    (= .venv/bin/python -m bench ..., after installing what it needs)

Starts an upstream registry seeded with a big blob, a 1 MiB blob and a multi-layer
image, then an HTTP and a TLS instance of each mirror with its own empty cache, all on
127.0.0.1; runs every scenario on both mirrors in turn; prints medians, ratios and
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
from bench.monitor import Monitor
from bench.scenarios import CLIENTS, SCENARIOS, Setup
from bench.seed import seed
from bench.servers import DockerMirror, Reference, Server, snapshot
from tests.support.certs import make_pki
from tests.support.procs import Daemon, Registry

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) | level=(error|fatal|panic) ")   # docker-mirror's, Distribution's
STAMP = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d |time="[^"]*" )')


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
        print(f"upstream {upstream.url}: seeding a {args.big_mib} MiB blob, a 1 MiB blob, a multi-layer image",
              flush=True)
        content = seed(upstream.address, scratch / "images", args.big_mib)
        pki = make_pki(scratch / "pki", days=365, names=("localhost", socket.gethostname()))
        servers: dict[bool, list[Server]] = {}
        for tls in sorted({SCENARIOS[name].tls for name in args.only}):
            kind, cert = ("tls", pki) if tls else ("http", None)
            mirror = DockerMirror(scratch / f"dm-{kind}", upstream.url, code, cert)
            reference = Reference(scratch / f"ref-{kind}", upstream.url, cert)
            servers[tls] = [start(f"docker-mirror-{kind}", mirror), start(f"reference-{kind}", reference)]
            print(f"{kind}: docker-mirror {servers[tls][0].url}, reference {servers[tls][1].url}", flush=True)
        setup = Setup(upstream, content, pki, scratch, args.duration)
        if "clients" in args.only:
            ceiling = static.ceiling(content.mid.file, scratch, CLIENTS, args.duration)
            print(f"load tool ceiling: wrk against a trivial sendfile server, same 1 MiB file: "
                  f"{ceiling.rps:,.0f} req/s, p99 {ceiling.p99 * 1000:.0f} ms, wrk CPU "
                  f"{100 * ceiling.cpu / args.duration:.0f}%", flush=True)
        with Monitor() as monitor:
            for name in args.only:
                scenario = SCENARIOS[name]
                print(f"{name}: {scenario.title}", flush=True)
                results[name] = harness.run(scenario, servers[scenario.tls], setup, args.rounds, monitor)
    return results, ceiling


def keep_logs(logs: dict[str, Path]) -> dict[str, list[str]]:
    """Copy the logs to bench/results/logs/; return the mirrors' warning and error lines (without time)."""
    RESULTS.joinpath("logs").mkdir(parents=True, exist_ok=True)
    problems = {}
    for name, path in logs.items():
        text = path.read_text(errors="replace") if path.exists() else ""
        RESULTS.joinpath("logs", f"{name}.log").write_text(text)
        if name != "upstream":   # its errors are the 404s of skopeo's checks while seeding
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
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
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
