"""Does routing cost anything? The 32-client rows with one upstream and with three, in one run.

    .venv/bin/python -m bench.routing [--rounds 5] [--duration 6] [--counters-once] [--baseline REV] [--control]
    .venv/bin/python -m bench.routing --auth [--rounds 5] [--duration 6] [--baseline REV] [--control]
    .venv/bin/python -m bench.routing --metrics [--rounds 5] [--duration 6]

One upstream registry (seeded with 1 MiB blobs) and docker-mirror processes on 127.0.0.1,
each run from a snapshot of the code (like ``python -m bench``). The variants:

  one           one upstream (``upstream:``), the plain path ``/v2/library/mid/blobs/D``
  three         three upstreams configured (``upstreams:``: the registry as docker.io, the
                default; ghcr.io at a second, empty loopback registry; quay.io at a closed
                loopback port; only configured, never asked), the plain path
  three-ns      the same server, every request with containerd's ``?ns=docker.io``
  three-prefix  the same server, the path prefix ``/v2/docker.io/library/mid/blobs/D``
  three-once    (--counters-once) three, with ``Mirror.record`` counting each request only
                into the totals, not also for its upstream (bench/counters_once.py)
  before        (--baseline REV) the code of git revision REV, one upstream
  auth          (--auth, instead of the three-upstream variants) one upstream, auth.htpasswd (a
                bcrypt cost-12 user) and an access: rule allowing that user library/*; every
                request with its Basic credentials (checked once, then remembered: issue 16).
                Its table goes between the bench-auth markers and into bench/results/auth.json.
  auth-before   (--auth --baseline REV, instead of before) auth, running the code of REV
  control       (--control) a second server like one, in its own process: what two identical
                servers differ by on this machine (the noise a ratio has to be read against)
  metrics       (--metrics, instead of the three-upstream variants) one upstream with
                metrics.listen on a loopback port, scraped once a second during the whole run
                (GET /metrics, as a Prometheus with a 1 s scrape_interval: 15 times the usual
                load). Adds the servers' RSS after each round's wrk run. Its table goes between
                the bench-metrics markers and into bench/results/metrics.json.

Rows, every variant once per round, in an order rotated each round (A B C, B C A, ...):
  warm: ``wrk -t2 -c32 -dDs`` on the cached 1 MiB blob: req/s, p99, server CPU µs per request
        (with --auth also its user-space part: where the guard runs; the kernel's copy of the
        blob, most of a request's CPU, is system time);
  cold: 32 clients at once (one ``curl --parallel``) GET a 1 MiB blob no variant has cached
        yet (a fresh one each time): wall ms until the last has it all, upstream GETs.
A ratio is variant / one of the same round (they ran back to back), shown as the median over
the rounds with its min..max. The machine is shared: the load average is printed per round.
Writes bench/results/routing.json and the table between the bench-routing markers in docs/performance.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import hashlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from bench import report
from bench.__main__ import revision
from bench.clients import BenchError, curl, wrk
from bench.monitor import TICK, Monitor
from bench.seed import MiB, random_data
from bench.servers import DockerMirror, snapshot
from tests.support.procs import Daemon, Registry, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- bench-routing:begin -->", "<!-- bench-routing:end -->"
CLIENTS = 32
WARM_REPO, COLD_REPO = "library/mid", "library/cold"
HUB = "docker.io"
OTHERS = "others' CPU %"
USER = "user CPU µs/req"


@dataclass(frozen=True)
class Variant:
    name: str
    server: str                    # which mirror process
    path: str                      # "{repo}" and "{digest}" filled in
    title: str
    auth: bool = False             # requests carry the bench user's Basic credentials


VARIANTS = {
    "one": Variant("one", "one", "/v2/{repo}/blobs/{digest}", "one upstream, plain path"),
    "three": Variant("three", "three", "/v2/{repo}/blobs/{digest}", "three upstreams, plain path (default route)"),
    "three-ns": Variant("three-ns", "three", "/v2/{repo}/blobs/{digest}?ns=" + HUB, f"three upstreams, ?ns={HUB}"),
    "three-prefix": Variant("three-prefix", "three", f"/v2/{HUB}/{{repo}}/blobs/{{digest}}",
                            f"three upstreams, path prefix /v2/{HUB}/..."),
    "three-once": Variant("three-once", "three-once", "/v2/{repo}/blobs/{digest}",
                          "three upstreams, each request counted once (totals only)"),
    "before": Variant("before", "before", "/v2/{repo}/blobs/{digest}", "code of --baseline, one upstream"),
    "auth": Variant("auth", "auth", "/v2/{repo}/blobs/{digest}",
                    "one upstream, htpasswd + a rule, Basic credentials", auth=True),
    "control": Variant("control", "control", "/v2/{repo}/blobs/{digest}",
                       "a second server like one (what identical servers differ by)"),
    "auth-before": Variant("auth-before", "auth-before", "/v2/{repo}/blobs/{digest}",
                           "code of --baseline, htpasswd + a rule, Basic credentials", auth=True),
    "metrics": Variant("metrics", "metrics", "/v2/{repo}/blobs/{digest}",
                       "one upstream, metrics.listen scraped every second"),
}
METRICS_BEGIN, METRICS_END = "<!-- bench-metrics:begin -->", "<!-- bench-metrics:end -->"
RSS = "RSS MiB"
SLOW_CALLS = ("text of every series (no readings)",)
AUTH_BEGIN, AUTH_END = "<!-- bench-auth:begin -->", "<!-- bench-auth:end -->"
BENCH_USER, BENCH_PASSWORD = "bench", "bench password"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"{BENCH_USER}:{BENCH_PASSWORD}".encode()).decode()}


@dataclass
class Series:
    """One variant's values per round, by metric."""

    values: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, metric: str, value: float) -> None:
        self.values.setdefault(metric, []).append(value)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--duration", type=int, default=6, help="seconds of each 32-client wrk run (default 6)")
    parser.add_argument("--counters-once", action="store_true",
                        help="add the variant that counts each request once (totals only)")
    parser.add_argument("--baseline", metavar="REV", help="add the variant running git revision REV, one upstream "
                        "(with --auth: htpasswd + a rule)")
    parser.add_argument("--control", action="store_true",
                        help="add a second server like one (what identical servers differ by)")
    parser.add_argument("--auth", action="store_true",
                        help="one upstream with and without htpasswd + a rule (instead of the routing variants)")
    parser.add_argument("--metrics", action="store_true",
                        help="one upstream with and without metrics.listen, scraped every second "
                             "(instead of the routing variants)")
    args = parser.parse_args(argv)
    if args.auth and args.metrics:
        parser.error("--auth and --metrics are separate runs")
    if args.rounds < 1 or args.duration < 1:
        parser.error("--rounds and --duration must be at least 1")
    return args


def push_blob(registry: str, repo: str, data: bytes) -> str:
    """Upload ``data`` into ``repo`` of the registry at URL ``registry``; its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=registry, timeout=60) as client:
        started = client.post(f"/v2/{repo}/blobs/uploads/")
        if started.status_code != 202:
            raise BenchError(f"upload to {registry}/{repo}: HTTP {started.status_code}")
        location = started.headers["location"]
        done = client.put(location + ("&" if "?" in location else "?") + "digest=" + digest, content=data)
        if done.status_code != 201:
            raise BenchError(f"upload of {digest} to {registry}/{repo}: HTTP {done.status_code}")
    return digest


def code_of(revision: str, dest: Path) -> Path:
    """dockermirror/ of git revision ``revision``, extracted under ``dest`` (a PYTHONPATH entry)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "dockermirror"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def curl_parallel(url: str, size: int, clients: int, headers: dict[str, str] | None = None) -> float:
    """``clients`` GETs of ``url`` at once from one curl (--parallel, a connection each):
    wall seconds until the last is done; each must be a 200 with ``size`` bytes."""
    argv = ["curl", "-s", "--max-time", "60", "-Z", "--parallel-immediate", "--parallel-max", str(clients),
            "-w", "%{http_code} %{size_download}\\n"]
    argv += [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    for _ in range(clients):
        argv += ["-o", "/dev/null", url]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - started
    answers = done.stdout.split("\n")[:-1]
    if done.returncode != 0 or answers != [f"200 {size}"] * clients:
        raise BenchError(f"curl --parallel {url}: exit {done.returncode}, answers {sorted(set(answers))}")
    return wall


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores; not idle, not waiting for I/O)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def user_seconds(pid: int) -> float:
    """CPU seconds process ``pid`` (all its threads) has run in user space: where the guard runs
    (the kernel's sendfile copy, most of a request's CPU, is system time)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11]) / TICK


def order(names: list[str], number: int) -> list[str]:
    """Round ``number``'s order: the list rotated by one more each round."""
    shift = number % len(names)
    return names[shift:] + names[:shift]


def ratios(series: dict[str, Series], variant: str, metric: str) -> list[float]:
    """Per round: the variant's value / one's."""
    return [v / o for v, o in zip(series[variant].values[metric], series["one"].values[metric], strict=True) if o]


def gets_text(series: dict[str, Series]) -> str:
    counts = sorted({int(v) for s in series.values() for v in s.values["upstream GETs"]})
    return f"{counts[0]} in every round" if len(counts) == 1 else f"between {counts[0]} and {counts[-1]}"


def _n(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table(series: dict[str, Series], metrics: list[tuple[str, str]]) -> str:
    lines = ["| variant | " + " | ".join(f"{label} (min..max)" for _, label in metrics) + " | "
             + " | ".join(f"{label} / one (min..max)" for _, label in metrics) + " |",
             "|---|" + "--:|" * (2 * len(metrics))]
    for name, s in series.items():
        cells = [f"{_n(statistics.median(s.values[m]))} ({_n(min(s.values[m]))}..{_n(max(s.values[m]))})"
                 for m, _ in metrics]
        if name == "one":
            cells += ["1"] * len(metrics)
        else:
            for m, _ in metrics:
                r = ratios(series, name, m)
                cells.append(f"{statistics.median(r):.3f} ({min(r):.3f}..{max(r):.3f})")
        lines.append(f"| {name}: {VARIANTS[name].title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_lines(series: dict[str, Series]) -> list[str]:
    """RSS with metrics against without (same round), and during the run; the scraping done."""
    on, off = series["metrics"].values[RSS], series["one"].values[RSS]
    more = [a - b for a, b in zip(on, off, strict=True)]
    extra = series["metrics"].extra
    return [f"RSS: metrics - one, per round, median {statistics.median(more):+.1f} MiB ({min(more):+.1f}.."
            f"{max(more):+.1f}); the metrics server's RSS from the first round to the last {on[-1] - on[0]:+.1f} MiB "
            f"(one: {off[-1] - off[0]:+.1f} MiB). Scrapes during the run: {extra.get('scrapes', 0):.0f}, "
            f"{extra.get('scrape bytes', 0):,.0f} bytes each; cache hits the metrics counted: "
            f"{extra.get('hits counted', 0):,.0f}.", ""]


def guarded(mirror: DockerMirror, htpasswd: Path) -> None:
    """Give ``mirror`` an htpasswd file with the bench user (bcrypt, cost 12, as ``user add``
    makes it) and one rule allowing that user the default upstream's library/."""
    import bcrypt

    htpasswd.write_text(f"{BENCH_USER}:{bcrypt.hashpw(BENCH_PASSWORD.encode(), bcrypt.gensalt(12)).decode()}\n")
    mirror.config["auth"] = {"htpasswd": str(htpasswd)}
    mirror.config["access"] = [{"allow": [f"user:{BENCH_USER}"], "repositories": ["library/*"]}]
    mirror.config_path.write_text(yaml.safe_dump(mirror.config))


def micro(number: int = 100_000, auth: bool = False, metrics: bool = False) -> dict[str, float]:
    """What routing and counting cost per request, in this process: µs per call (best of 5 runs),
    of Mirror.resolve with one and with three upstreams, Mirror.record with and without the
    per-upstream counts, and the request log's extra field (``upstream=KEY``)."""
    from bench.counters_once import record_totals_only
    from dockermirror.cache.index import AccessBatch
    from dockermirror.humanize import printable
    from dockermirror.mirror import Mirror, Upstream, Upstreams

    def mirror(keys: list[str]) -> Mirror:
        batch = AccessBatch()
        return Mirror(Upstreams(Upstream(key, None) for key in keys), batch, tag_ttl=60)  # type: ignore[arg-type]

    one, three = mirror([HUB]), mirror([HUB, "ghcr.io", "quay.io"])
    calls = {
        "resolve, one upstream": lambda: one.resolve(WARM_REPO),
        "resolve, three, plain path": lambda: three.resolve(WARM_REPO),
        f"resolve, three, ?ns={HUB}": lambda: three.resolve(WARM_REPO, HUB),
        f"resolve, three, prefix {HUB}/": lambda: three.resolve(f"{HUB}/{WARM_REPO}"),
        "record, totals and per upstream": lambda: three.record("HIT", MiB, HUB),
        "record, totals only": lambda: record_totals_only(three, "HIT", MiB, HUB),
        "log field upstream=KEY": lambda: printable(str(HUB or "-")),
    }
    if auth or metrics:
        calls = {name: call for name, call in calls.items() if "three" not in name and "once" not in name}
    if auth:
        calls.update(_auth_calls())
    if metrics:
        calls.update(_metrics_calls())
    def per_call(name: str, call) -> float:
        n = max(1, number // 500) if name in SLOW_CALLS else number    # a scrape takes milliseconds
        return min(timeit.repeat(call, number=n, repeat=5)) / n * 1e6

    return {name: per_call(name, call) for name, call in calls.items()}


def _metrics_calls() -> dict:
    """What the metrics do per request (the observer) and per scrape (the text, readings aside)."""
    from dockermirror.api.accesslog import RequestDone
    from dockermirror.service.metrics import Metrics

    metrics = Metrics([HUB])
    done = RequestDone(client="127.0.0.1", method="GET", path="/v2/library/mid/blobs/sha256:x", status=200,
                       sent=MiB, seconds=0.01, complete=True, kind="blob", cache="HIT", upstream=HUB,
                       upstream_status=None, repository=WARM_REPO, reference="sha256:x", identity=None,
                       certificate=None, note=None)
    return {
        "metrics observer, one request": lambda: metrics.observe(done),
        "meter, one upstream request": lambda: metrics.upstream_request(HUB, "blob", 200, 0.01),
        SLOW_CALLS[0]: metrics.exposition,
    }


def _auth_calls() -> dict:
    """What the guard does per request once a credential is remembered (issue 16)."""
    import bcrypt

    from dockermirror.access.htpasswd import Htpasswd, parse_basic
    from dockermirror.access.identity import Identity
    from dockermirror.access.rules import Rule, Rules, client_address
    from dockermirror.routing import RegistryTable

    users = Htpasswd({BENCH_USER: bcrypt.hashpw(BENCH_PASSWORD.encode(), bcrypt.gensalt(4)).decode()})
    users.verify(BENCH_USER, BENCH_PASSWORD)
    rules = Rules((Rule(True, (f"user:{BENCH_USER}",), None, ("library/*",)),), RegistryTable([(HUB, ())]))
    who = Identity.user(BENCH_USER)
    header = BASIC["Authorization"]
    return {
        "parse_basic": lambda: parse_basic(header),
        "remembered credential (HMAC + lookup)": lambda: users.verify(BENCH_USER, BENCH_PASSWORD),
        "rule decision, one rule": lambda: rules.decide(who, client_address("127.0.0.1"), HUB, WARM_REPO),
    }


def rss_mib(pid: int) -> float:
    """The resident memory of process ``pid`` now (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def scraping(url: str, interval: float = 1.0):
    """GET ``url`` every ``interval`` seconds in a thread (a Prometheus); yields the list of
    scrape sizes so far; each must be a 200."""
    import threading

    sizes: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def run() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    got = client.get(url)
                    if got.status_code == 200:
                        sizes.append(len(got.content))
                    else:
                        failures.append(f"HTTP {got.status_code}")
                except httpx.HTTPError as exc:
                    failures.append(str(exc))
                stop.wait(interval)

    thread = threading.Thread(target=run, name="scraper", daemon=True)
    thread.start()
    try:
        yield sizes
    finally:
        stop.set()
        thread.join(15)
        if failures:
            raise BenchError(f"{len(failures)} scrape(s) of {url} failed, first: {failures[0]}")


def measure(args: argparse.Namespace, scratch: Path, names: list[str],
            loads: list[float]) -> dict[str, Series]:
    series = {name: Series() for name in names}
    with contextlib.ExitStack() as stack:
        def start(server: Daemon) -> Daemon:
            stack.callback(server.stop)
            server.start()
            return server

        upstream = start(Registry(scratch / "upstream"))
        other = start(Registry(scratch / "other"))
        closed = free_port()     # nothing listens there (and nothing is ever sent to it)
        warm_data = random_data("routing/mid", MiB)
        warm = push_blob(upstream.url, WARM_REPO, warm_data)
        cold = [[push_blob(upstream.url, COLD_REPO, random_data(f"routing/cold/{r}/{name}", MiB)) for name in names]
                for r in range(args.rounds)]
        three = [{"registry": HUB, "url": upstream.url}, {"registry": "ghcr.io", "url": other.url},
                 {"registry": "quay.io", "url": f"http://127.0.0.1:{closed}"}]
        code = snapshot(ROOT / "dockermirror", scratch / "src")
        shutil.copy(Path(__file__).with_name("counters_once.py"), code)
        servers: dict[str, DockerMirror] = {}
        wanted = {VARIANTS[name].server for name in names}
        metrics_url = ""
        for key in ("one", "control", "three", "three-once", "before", "auth", "auth-before", "metrics"):
            if key not in wanted:
                continue
            source = code_of(args.baseline, scratch / f"src-{key}") if key.endswith("before") else code
            mirror = DockerMirror(scratch / f"dm-{key}", upstream.url, source,
                                  upstreams=three if key.startswith("three") else None)
            if key == "three-once":
                mirror.argv = [sys.executable, "-P", str(code / "counters_once.py"), *mirror.argv[4:]]
            if key.startswith("auth"):
                guarded(mirror, scratch / f"htpasswd-{key}")
            if key == "metrics":
                metrics_port = free_port()
                metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
                mirror.config["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
                mirror.config_path.write_text(yaml.safe_dump(mirror.config))
            servers[key] = start(mirror)
            print(f"{key}: {mirror.url} ({'three upstreams' if key.startswith('three') else 'one upstream'}"
                  f"{', code of ' + args.baseline if key.endswith('before') else ''})", flush=True)

        def url(name: str, repo: str, digest: str) -> str:
            return servers[VARIANTS[name].server].url + VARIANTS[name].path.format(repo=repo, digest=digest)

        def headers(name: str) -> dict[str, str]:
            return BASIC if VARIANTS[name].auth else {}

        for name in names:   # cache the warm blob, then a short wrk run as a warm-up
            curl_parallel(url(name, WARM_REPO, warm), len(warm_data), 1, headers(name))
            server = servers[VARIANTS[name].server]
            wait_until(lambda s=server: s.blob_file(warm).exists(), 30, what="warm blob cached")
            wrk(url(name, WARM_REPO, warm), CLIENTS, 2, headers=headers(name))
            if not name.endswith("before"):    # served from the cache, routed to the registry (its log line says so)
                path = VARIANTS[name].path.format(repo=WARM_REPO, digest=warm)
                who = f" identity=user:{BENCH_USER}" if VARIANTS[name].auth else ""
                if not any(f'"GET {path}" 200 ' in line and f" cache=HIT upstream={HUB} " in line and who in line
                           for line in server.log_text().splitlines()):
                    raise BenchError(f"{name}: no log line of GET {path} served from the cache for {HUB}{who}")
            if VARIANTS[name].auth:     # and without credentials it is refused
                status = httpx.get(url(name, WARM_REPO, warm)).status_code
                if status != 401:
                    raise BenchError(f"{name}: a request without credentials got HTTP {status}, not 401")
        scraper = scraping(metrics_url) if metrics_url else contextlib.nullcontext([])
        with Monitor() as monitor, scraper as scrapes:
            for number in range(args.rounds):
                loads.append(load_average())
                print(f"round {number + 1}/{args.rounds} (load average {loads[-1]:.2f})", flush=True)
                for i, name in enumerate(order(names, number)):
                    server = servers[VARIANTS[name].server]
                    busy, user = busy_seconds(), user_seconds(server.pid)
                    with monitor.watch(server.pid) as usage:
                        result = wrk(url(name, WARM_REPO, warm), CLIENTS, args.duration, headers=headers(name))
                    user = user_seconds(server.pid) - user
                    others = busy_seconds() - busy - usage.cpu - result.cpu
                    rss = rss_mib(server.pid)
                    digest = cold[number][names.index(name)]
                    mark = upstream.mark()
                    wall = curl_parallel(url(name, COLD_REPO, digest), MiB, CLIENTS, headers(name))
                    wait_until(lambda s=server, d=digest: s.blob_file(d).exists(), 30, what="cold blob cached")
                    time.sleep(0.3)   # the upstream's access log line
                    gets = len(upstream.requests(mark, method="GET", path=digest))
                    s = series[name]
                    s.add("req/s", result.rps)
                    s.add("p99 ms", result.p99 * 1000)
                    s.add("CPU µs/req", usage.cpu / result.requests * 1e6)
                    s.add(USER, user / result.requests * 1e6)
                    s.add(OTHERS, 100 * others / args.duration)
                    s.add(RSS, rss)
                    s.add("cold wall ms", wall * 1000)
                    s.add("upstream GETs", gets)
                    print(f"  {name}: {result.rps:,.0f} req/s, p99 {result.p99 * 1000:.1f} ms, "
                          f"CPU {usage.cpu / result.requests * 1e6:.0f} µs/req, others' CPU "
                          f"{100 * others / args.duration:.0f}%, RSS {rss:.1f} MiB; cold {wall * 1000:.0f} ms, "
                          f"{gets} upstream GET(s)", flush=True)
        if metrics_url:
            if not scrapes:
                raise BenchError(f"no scrape of {metrics_url} succeeded")
            text = httpx.get(metrics_url, timeout=10).text
            served = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith("docker_mirror_requests_total{") and 'cache="hit"' in line)
            if served < 1000:
                raise BenchError(f"the metrics say {served:.0f} cache hits: the requests were not counted")
            series["metrics"].extra = {"scrapes": len(scrapes), "scrape bytes": scrapes[-1], "hits counted": served}
        loads.append(load_average())
        for key, server in servers.items():
            problems = [line for line in server.log_text().splitlines() if " WARNING " in line or " ERROR " in line]
            if problems:
                print(f"{key} log: {len(problems)} warning/error line(s), first: {problems[0]}")
            if not server.running():
                raise BenchError(f"mirror {key} died:\n{server.log_text()[-2000:]}")
    return series


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "-m", "bench.routing", *argv])
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    names = ["one", "auth"] if args.auth else ["one", "metrics"] if args.metrics else \
        ["one", "three", "three-ns", "three-prefix"]
    names += ["three-once"] if args.counters_once else []
    names += (["auth-before"] if args.auth else ["before"]) if args.baseline else []
    names += ["control"] if args.control else []
    date, started = datetime.datetime.now(datetime.UTC), time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="dm-routing-", dir="/var/tmp"))
    loads: list[float] = []
    costs = micro(auth=args.auth, metrics=args.metrics)
    print("in-process, µs per call: " + ", ".join(f"{name} {us:.2f}" for name, us in costs.items()), flush=True)
    try:
        series = measure(args, scratch, names, loads)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.monotonic() - started
    head = revision(ROOT / "dockermirror")
    text = "\n".join([
        f"Measured {date:%Y-%m-%d %H:%M} UTC on {report.machine()}; docker-mirror {head}"
        + (f", baseline {args.baseline}" if args.baseline else "") + ".",
        f"Command: `{command}` ({args.rounds} rounds, run time {seconds / 60:.1f} min, 1-minute load average "
        f"per round {min(loads):.2f}..{max(loads):.2f}: the machine is shared). Values: median over the rounds "
        "(min..max); a ratio is the variant's value / one's of the same round, median (min..max) over the rounds.",
        "",
        f"Warm: `wrk -t2 -c{CLIENTS} -d{args.duration}s` on a cached 1 MiB blob (CPU: the server's user + system "
        "time per request" + ("; user CPU: its user-space part, where the guard runs" if args.auth else "")
        + "; others' CPU: what the rest of the machine (other work, the benchmark itself) used "
        "meanwhile, % of one core, out of 200; /proc/stat less the server's and wrk's time, so a few % either way).",
        "",
        table(series, [("req/s", "req/s"), ("p99 ms", "p99 ms"), ("CPU µs/req", "CPU µs/req")]
              + ([(RSS, RSS)] if args.metrics else [])
              + ([(USER, "user CPU µs/req")] if args.auth else [])),
        "",
        *(metrics_lines(series) if args.metrics else []),
        "Others' CPU during each variant's wrk runs, % of one core, median (min..max): " + ", ".join(
            f"{name} {statistics.median(v := s.values[OTHERS]):.0f} ({min(v):.0f}..{max(v):.0f})"
            for name, s in series.items()) + ".",
        "",
        f"Cold: {CLIENTS} clients at once (`curl --parallel`) GET a 1 MiB blob not cached yet; upstream GETs "
        f"of it: {gets_text(series)}.",
        "",
        table(series, [("cold wall ms", "wall ms")]),
        "",
        "In-process cost per call (`bench.routing.micro`, best of 5 runs of 100,000 calls; 200 for a scrape's "
        "text), µs: "
        + ", ".join(f"{name} {us:.2f}" for name, us in costs.items()) + ".",
    ])
    print("\n" + text + "\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result_file = "auth.json" if args.auth else "metrics.json" if args.metrics else "routing.json"
    (RESULTS / result_file).write_text(json.dumps({
        "command": command, "date": date.isoformat(timespec="seconds"), "machine": report.machine(),
        "revision": head, "seconds": round(seconds, 1), "load_average_per_round": loads, "args": vars(args),
        "in_process_us_per_call": costs,
        "variants": {name: {"title": VARIANTS[name].title, "rounds": s.values, **s.extra}
                     for name, s in series.items()},
    }, indent=2) + "\n")
    if args.metrics:
        print("wrote bench/results/metrics.json")
        report.replace_readme(ROOT / "docs" / "performance.md", text, METRICS_BEGIN, METRICS_END)
        print("updated the metrics table in docs/performance.md")
        return 0
    if args.auth:
        print("wrote bench/results/auth.json")
        report.replace_readme(ROOT / "docs" / "performance.md", text, AUTH_BEGIN, AUTH_END)
        print("updated the auth table in docs/performance.md")
        return 0
    print("wrote bench/results/routing.json")
    report.replace_readme(ROOT / "docs" / "performance.md", text, BEGIN, END)
    print("updated the routing table in docs/performance.md")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
