"""What a balancer costs: 32 clients on a cached 1 MiB blob through HAProxy and from the node directly, in one run.

    .venv/bin/python -m bench.balancer [--rounds 6] [--duration 5]

On 127.0.0.1: an upstream registry (Debian's docker-registry) with one 1 MiB blob, one
docker-mirror node (run from a snapshot of the code, like ``python -m bench``) with that blob
in its cache, and Debian's HAProxy 2.6 (unpacked into the test cache by tests/run.sh, never
installed; tests/support/balancers.py) in front of it, configured by
``docker-mirror lb-config haproxy --listen ... --node ...`` (``--hand-config``: a minimal
configuration written here instead, see :func:`hand_config`). The modes:

  direct   wrk on the node's own port
  haproxy  wrk on HAProxy's port, which passes every request to the same node
  control  wrk on the node's own port again: what two identical runs differ by (the noise)
  haproxy-splice  (--splice) a second HAProxy, the same configuration plus ``option splice-response``
           in its defaults (the kernel moves bodies between the sockets, HAProxy does not copy them)

Every mode runs once per round (``wrk -t2 -c32 -dDs --latency``, keep-alive, the load tool of
the other bench tables), in an order rotated each round (A B C, B C A, ...). Per run: req/s,
MB/s of bodies (10^6 bytes), p50 and p99 latency, CPU seconds (user + system, /proc/PID/stat)
per GB (10^9 bytes of bodies) of the node and of HAProxy separately, wrk's own CPU (so that
the load tool is seen not to be the limit) and what the rest of the machine used meanwhile.
A ratio is the mode's value / direct's of the same round; the table shows the median over the
rounds (min..max). Writes bench/results/balancer.json and the table between the
bench-balancer markers in docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import report
from bench.__main__ import revision
from bench.clients import BenchError, WrkResult, _seconds, wrk
from bench.monitor import Monitor, Usage
from bench.routing import busy_seconds, load_average, order, push_blob
from bench.seed import MiB, random_data
from bench.servers import DockerMirror, snapshot
from tests.support.procs import Registry, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- bench-balancer:begin -->", "<!-- bench-balancer:end -->"
CLIENTS = 32
REPO = "library/mid"
MODES = {
    "direct": "wrk on the node's own port",
    "haproxy": "wrk on HAProxy, in front of the same node",
    "control": "wrk on the node's own port again (the noise)",
    "haproxy-splice": "the same through HAProxy with option splice-response",
}
THROUGH_BALANCER = {"haproxy", "haproxy-splice"}

# metric key -> column label; the order of the table's columns
METRICS = {
    "req/s": "req/s",
    "MB/s": "MB/s",
    "p50 ms": "p50 ms",
    "p99 ms": "p99 ms",
    "node CPU s/GB": "docker-mirror CPU s/GB",
    "haproxy CPU s/GB": "HAProxy CPU s/GB",
    "total CPU s/GB": "both CPU s/GB",
    "wrk CPU %": "wrk CPU % of a core",
    "others CPU %": "others' CPU % of a core",
}
RATIO_METRICS = ["req/s", "MB/s", "p50 ms", "p99 ms", "node CPU s/GB", "total CPU s/GB"]


@dataclass
class Series:
    """One mode's values per round, by metric."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, metric: str, value: float) -> None:
        self.values.setdefault(metric, []).append(value)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.balancer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    parser.add_argument("--duration", type=int, default=5, help="seconds of each 32-client wrk run (default 5)")
    parser.add_argument("--hand-config", action="store_true",
                        help="HAProxy with the minimal configuration written here, not lb-config's")
    parser.add_argument("--splice", action="store_true",
                        help="add a second HAProxy with option splice-response (mode haproxy-splice)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration < 1:
        parser.error("--rounds and --duration must be at least 1")
    return args


def p50(result: WrkResult) -> float:
    """The median latency (seconds) from wrk's --latency distribution."""
    found = re.search(r"^\s+50%\s+(\S+)", result.text, re.M)
    if not found:
        raise BenchError(f"no 50% line in wrk's output:\n{result.text}")
    return _seconds(found.group(1))


def hand_config(listen: str, node: str) -> str:
    """A minimal HAProxy (>= 1.8) configuration of what the contract describes: blobs keyed by
    digest, manifests by repository, consistent hashing, /healthz checks, X-Forwarded-For, no
    buffering of bodies, long timeouts. Used with --hand-config (when lb-config is not there)."""
    return f"""\
# hand-written by bench/balancer.py (--hand-config), for one node
global
    maxconn 4096
defaults
    mode http
    option forwardfor
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout http-request 30s
frontend mirror
    bind {listen}
    http-request set-var(txn.key) path,regsub('^/v2/.+/blobs/','blob:') \
if {{ path_reg ^/v2/.+/blobs/[a-z0-9]+:[a-f0-9]+$ }}
    http-request set-var(txn.key) path,regsub('/manifests/.*$','/'),regsub('/tags/.*$','/'),\
regsub('/referrers/.*$','/') if !{{ var(txn.key) -m found }} {{ path_reg ^/v2/.+/(manifests|tags|referrers)/ }}
    http-request set-header X-Mirror-Key %[var(txn.key)] if {{ var(txn.key) -m found }}
    default_backend nodes
backend nodes
    balance hdr(X-Mirror-Key)
    hash-type consistent
    option httpchk GET /healthz
    server node1 {node} check inter 2s
"""


def with_splice(config: str) -> str:
    """``config`` with ``option splice-response`` as the first line of its (first) defaults section."""
    found = re.search(r"^defaults\b.*$", config, re.M)
    if not found:
        raise BenchError("no defaults section in the HAProxy configuration to add option splice-response to")
    return f"{config[:found.end()]}\n    option splice-response{config[found.end():]}"


def generated_config(code: Path, listen: str, node: str) -> str:
    """``docker-mirror lb-config haproxy --listen LISTEN --node NODE``, run from the snapshot ``code``."""
    argv = [sys.executable, "-P", "-m", "dockermirror", "lb-config", "haproxy", "--listen", listen, "--node", node]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(code)},
                          timeout=60)
    if done.returncode != 0:
        raise BenchError(f"docker-mirror lb-config haproxy exited {done.returncode}: {done.stderr.strip()} "
                         "(--hand-config measures with a configuration written here instead)")
    return done.stdout


def ratios(series: dict[str, Series], mode: str, metric: str) -> list[float]:
    """Per round: the mode's value / direct's."""
    return [v / d for v, d in zip(series[mode].values[metric], series["direct"].values[metric], strict=True) if d]


def _n(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _cell(values: list[float]) -> str:
    return f"{_n(statistics.median(values))} ({_n(min(values))}..{_n(max(values))})"


def values_table(series: dict[str, Series]) -> str:
    """Each mode's median (min..max) over the rounds; HAProxy's CPU only where requests went through it."""
    lines = ["| mode | " + " | ".join(METRICS.values()) + " |", "|---|" + "--:|" * len(METRICS)]
    for name, s in series.items():
        cells = [_cell(s.values[m]) if m in s.values and (not m.startswith("haproxy") or name in THROUGH_BALANCER)
                 else "-" for m in METRICS]
        lines.append(f"| {name}: {MODES[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios_table(series: dict[str, Series]) -> str:
    """mode / direct, per round, median (min..max) over the rounds."""
    lines = ["| ratio, same round | " + " | ".join(METRICS[m] for m in RATIO_METRICS) + " |",
             "|---|" + "--:|" * len(RATIO_METRICS)]
    for name in series:
        if name == "direct":
            continue
        cells = []
        for metric in RATIO_METRICS:
            r = ratios(series, name, metric)
            cells.append(f"{statistics.median(r):.3f} ({min(r):.3f}..{max(r):.3f})" if r else "-")
        lines.append(f"| {name} / direct | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_line(series: dict[str, Series]) -> str:
    """One sentence with the headline ratios."""
    def med(mode: str, metric: str) -> float:
        return statistics.median(ratios(series, mode, metric))

    parts = [f"Through HAProxy / direct (median of the per-round ratios): req/s {med('haproxy', 'req/s'):.3f}, "
             f"p99 {med('haproxy', 'p99 ms'):.3f}, CPU per GB of docker-mirror and HAProxy together "
             f"{med('haproxy', 'total CPU s/GB'):.3f}"]
    lb = statistics.median(series["haproxy"].values["haproxy CPU s/GB"])
    node = statistics.median(series["direct"].values["node CPU s/GB"])
    parts.append(f"; HAProxy's own CPU {lb:.2f} s/GB against the node's {node:.2f} s/GB direct")
    if "haproxy-splice" in series:
        spliced = statistics.median(series["haproxy-splice"].values["haproxy CPU s/GB"])
        parts.append(f"; with option splice-response: HAProxy {spliced:.2f} s/GB, req/s "
                     f"{med('haproxy-splice', 'req/s'):.3f}, p99 {med('haproxy-splice', 'p99 ms'):.3f}, CPU per GB "
                     f"together {med('haproxy-splice', 'total CPU s/GB'):.3f} of direct")
    if "control" in series:
        parts.append(f"; two identical direct runs (control / direct): req/s {med('control', 'req/s'):.3f}, "
                     f"p99 {med('control', 'p99 ms'):.3f}, CPU per GB {med('control', 'total CPU s/GB'):.3f}")
    return "".join(parts) + "."


def render(series: dict[str, Series], *, date: datetime.datetime, machine: str, head: str, command: str,
           rounds: int, duration: int, seconds: float, loads: list[float], config_source: str,
           haproxy_version: str) -> str:
    """The Markdown that is printed and goes between the bench-balancer markers."""
    return "\n".join([
        f"Measured {date:%Y-%m-%d %H:%M} UTC on {machine}; docker-mirror {head}; {haproxy_version}.",
        f"Command: `{command}` ({rounds} round{'s' if rounds > 1 else ''}, run time {seconds / 60:.1f} min, "
        f"1-minute load average per round {min(loads):.2f}..{max(loads):.2f}: the machine is shared). "
        f"HAProxy's configuration: {config_source}.",
        "",
        f"`wrk -t2 -c{CLIENTS} -d{duration}s --latency` (keep-alive) on a cached 1 MiB blob. Values: median over "
        "the rounds (min..max). CPU: user + system seconds per GB (10^9 bytes) of bodies sent, from /proc/PID/stat "
        "of the docker-mirror node and of HAProxy separately (both: their sum); wrk CPU: the load tool's own, "
        "% of one core (out of 200); others': the rest of the machine meanwhile (/proc/stat less the node, "
        "HAProxy and wrk, so a few % either way).",
        "",
        values_table(series),
        "",
        ratios_table(series),
        "",
        summary_line(series),
    ])


def measure(args: argparse.Namespace, scratch: Path, loads: list[float]) -> tuple[dict[str, Series], dict]:
    """Start everything, run the rounds, stop everything (by PID, also on failure)."""
    from tests.support.balancers import Balancer, haproxy_binary, haproxy_env

    names = [name for name in MODES if args.splice or name != "haproxy-splice"]
    series = {name: Series() for name in names}
    info: dict = {}
    with contextlib.ExitStack() as stack:
        upstream = Registry(scratch / "upstream")
        stack.callback(upstream.stop)
        upstream.start()
        data = random_data("balancer/mid", MiB)
        digest = push_blob(upstream.url, REPO, data)
        code = snapshot(ROOT / "dockermirror", scratch / "src")
        node = DockerMirror(scratch / "node", upstream.url, code)
        stack.callback(node.stop)
        node.start()
        path = f"/v2/{REPO}/blobs/{digest}"
        got = httpx.get(node.url + path, timeout=60)
        if got.status_code != 200 or got.content != data:
            raise BenchError(f"GET {node.url}{path}: HTTP {got.status_code}, {len(got.content)} bytes")
        wait_until(lambda: node.blob_file(digest).exists(), 30, what="blob cached on the node")

        node_address = node.url.removeprefix("http://")
        listen = f"127.0.0.1:{free_port()}"
        if args.hand_config:
            config, info["config_source"] = hand_config(listen, node_address), "hand-written (--hand-config)"
        else:
            config = generated_config(code, listen, node_address)
            info["config_source"] = f"`docker-mirror lb-config haproxy --listen {listen} --node {node_address}`"
        info["config"] = config
        info["haproxy_version"] = subprocess.run([haproxy_binary(), "-v"], capture_output=True, text=True,
                                                 env=haproxy_env()).stdout.split("\n")[0].strip()
        balancers = {}
        for name in (n for n in names if n in THROUGH_BALANCER):
            text = with_splice(config) if name == "haproxy-splice" else config
            if name != "haproxy":     # its own port; the same configuration otherwise
                port = free_port()
                text = text.replace(listen, f"127.0.0.1:{port}")
            else:
                port = int(listen.rsplit(":", 1)[1])
            balancers[name] = Balancer("haproxy", text, scratch / name, port=port)
            stack.callback(balancers[name].stop)
            balancers[name].start()
        urls = {name: balancers[name].url + path if name in balancers else node.url + path for name in names}
        for name, balancer in balancers.items():
            got = httpx.get(urls[name], timeout=60)
            if got.status_code != 200 or hashlib.sha256(got.content).hexdigest() != digest.split(":")[1]:
                raise BenchError(f"GET {urls[name]}: HTTP {got.status_code}, not the blob")
            print(f"{name}: {balancer.url} (pid {balancer.pid}) in front of the node {node.url} (pid {node.pid})",
                  flush=True)
        print(f"{info['haproxy_version']}; configuration: {info['config_source']}", flush=True)
        for name in names:     # a short warm-up of each path
            wrk(urls[name], CLIENTS, 2)
        with Monitor() as monitor:
            for number in range(args.rounds):
                loads.append(load_average())
                print(f"round {number + 1}/{args.rounds} (load average {loads[-1]:.2f})", flush=True)
                for name in order(names, number):
                    busy = busy_seconds()
                    with contextlib.ExitStack() as watching:
                        node_usage = watching.enter_context(monitor.watch(node.pid))
                        lb_usages = {key: watching.enter_context(monitor.watch(b.pid)) for key, b in balancers.items()}
                        result = wrk(urls[name], CLIENTS, args.duration)
                    idle = sum(u.cpu for key, u in lb_usages.items() if key != name)   # the others' checks
                    lb_usage = lb_usages.get(name, Usage())
                    others = busy_seconds() - busy - node_usage.cpu - lb_usage.cpu - result.cpu
                    gb = result.requests * len(data) / 1e9
                    s = series[name]
                    s.add("req/s", result.rps)
                    s.add("MB/s", result.rps * len(data) / 1e6)
                    s.add("p50 ms", p50(result) * 1000)
                    s.add("p99 ms", result.p99 * 1000)
                    s.add("node CPU s/GB", node_usage.cpu / gb)
                    s.add("haproxy CPU s/GB", lb_usage.cpu / gb)
                    s.add("total CPU s/GB", (node_usage.cpu + lb_usage.cpu) / gb)
                    s.add("wrk CPU %", 100 * result.cpu / args.duration)
                    s.add("others CPU %", 100 * others / args.duration)
                    s.add("idle HAProxy CPU %", 100 * idle / args.duration)
                    print(f"  {name}: {result.rps:,.0f} req/s, p50 {p50(result) * 1000:.1f} ms, "
                          f"p99 {result.p99 * 1000:.1f} ms, node {node_usage.cpu / gb:.2f} s/GB, "
                          f"HAProxy {lb_usage.cpu / gb:.2f} s/GB, wrk {100 * result.cpu / args.duration:.0f}%, "
                          f"others {s.values['others CPU %'][-1]:.0f}%", flush=True)
        loads.append(load_average())
        problems = [line for line in node.log_text().splitlines() if " WARNING " in line or " ERROR " in line]
        if problems:
            print(f"node log: {len(problems)} warning/error line(s), first: {problems[0]}")
        for what, process in (("the node", node), *balancers.items()):
            if not process.running():
                raise BenchError(f"{what} died:\n{process.log_text()[-2000:]}")
    return series, info


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "-m", "bench.balancer", *argv])
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    date, started = datetime.datetime.now(datetime.UTC), time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="dm-balancer-", dir="/var/tmp"))
    loads: list[float] = []
    try:
        series, info = measure(args, scratch, loads)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.monotonic() - started
    head = revision(ROOT / "dockermirror")
    text = render(series, date=date, machine=report.machine(), head=head, command=command, rounds=args.rounds,
                  duration=args.duration, seconds=seconds, loads=loads, config_source=info["config_source"],
                  haproxy_version=info["haproxy_version"])
    print("\n" + text + "\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "balancer.json").write_text(json.dumps({
        "command": command, "date": date.isoformat(timespec="seconds"), "machine": report.machine(),
        "revision": head, "seconds": round(seconds, 1), "load_average_per_round": loads, "args": vars(args),
        "haproxy_version": info["haproxy_version"], "haproxy_config_source": info["config_source"],
        "haproxy_config": info["config"],
        "modes": {name: {"title": MODES[name], "rounds": s.values} for name, s in series.items()},
    }, indent=2) + "\n")
    print("wrote bench/results/balancer.json")
    report.replace_readme(ROOT / "docs" / "performance.md", text, BEGIN, END)
    print("updated the balancer table in docs/performance.md")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
