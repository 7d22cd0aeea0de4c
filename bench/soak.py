"""A soak: a mirror under mixed, hostile load for a bounded time, sampled as it goes.

    .venv/bin/python -m bench.soak [--minutes 2] [--interval 5] [--seed N]      (run as root, from the clone)

Starts a registry (Debian's docker-registry) seeded with five images, a fault proxy in front of
it (tests/support/faultproxy.py) and a mirror whose upstream is the proxy, all on 127.0.0.1, with
a cache smaller than the content (so pulls evict and fetch again). Then, until the time is up:

* pullers pull random images (manifest, config, layers; every digest checked), cold and warm
  (the cache is smaller than the content, and pruned with ``docker-mirror cache prune`` every 20-50 s);
* slow readers read the big blob (20 MiB) at 1-128 KiB/s, for 5-20 s each;
* idle clients hold keep-alive connections open and reopen them when the server closes them;
* a reloader sends SIGHUP every ~15 s, every other time with a changed configuration
  (tag_ttl, upstream.read_timeout, the upstream URL: the same proxy under another name);
* a fault injector switches the proxy every ~12 s between: no fault, bodies cut off, bodies
  slowed down, manifests answered 503, manifests delayed 2 s;
* a normal client reads a small cached blob and a cached manifest twice a second, timed (both of
  library/hello, which ``cache.pin`` keeps cached through evictions and prunes).

Every ``--interval`` seconds it samples the mirror's RSS, threads and open descriptors (by kind:
cache files, client sockets, upstream sockets) and the normal client's latency percentiles.
Writes bench/results/soak.csv (the samples) and soak.json (samples, events, summary), prints a
summary (start, end, max, slope per minute of each series; errors by kind). Stops everything
it started, also on Ctrl-C. Exit status 1 if the mirror died or ``cache verify`` failed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from bench.fuzz import seed_upstream
from dockermirror.service.server import WORKER_THREADS
from dockermirror.service.zerocopy import SENDFILE_THREADS
from tests.support import fuzzing, images
from tests.support.clients import skopeo_push
from tests.support.faultproxy import FaultProxy
from tests.support.procs import Mirror, Registry

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MiB = 1024 * 1024
ACCEPT = [("Accept", a) for a in fuzzing.ALL_MANIFESTS]
BIG = ("library/soakbig", "latest", 20 * MiB)           # a bigger image for slow readers and cold pulls


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="how long the load runs (default 2)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random choices (default random)")
    parser.add_argument("--pullers", type=int, default=3, help="concurrent pullers (default 3)")
    parser.add_argument("--slow", type=int, default=8, help="concurrent slow readers (default 8)")
    parser.add_argument("--idle", type=int, default=50, help="idle keep-alive connections (default 50)")
    parser.add_argument("--cache-mib", type=int, default=24,
                        help="the mirror's cache.max_size in MiB (default 24: less than the content)")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    if not 0 < args.minutes <= 24 * 60:
        parser.error("--minutes must be between 0 and 1440")
    return args


@dataclass
class Shared:
    """What the load threads record, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)         # kind -> count
    latencies: list[float] = field(default_factory=list)     # the normal client's, since the last sample
    events: list[tuple[float, str]] = field(default_factory=list)
    phase: str = "none"

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def error(self, what: str) -> None:
        with self.lock:
            self.errors[what[:160]] += 1

    def event(self, t0: float, what: str) -> None:
        with self.lock:
            self.events.append((round(time.monotonic() - t0, 1), what))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def puller(base: str, pushed: list[tuple[str, str]], rng: random.Random, shared: Shared, stop: threading.Event):
    with httpx.Client(base_url=base, timeout=60) as client:
        while not stop.is_set():
            repo, tag = rng.choice(pushed)
            try:
                top = client.get(f"/v2/{repo}/manifests/{tag}", headers=ACCEPT)
                if top.status_code != 200:
                    shared.error(f"pull {repo}:{tag}: manifest {top.status_code} "
                                 f"{top.json()['errors'][0]['code'] if top.content.startswith(b'{') else ''}")
                    time.sleep(0.5)
                    continue
                document = json.loads(top.content)
                if "manifests" in document:
                    child = rng.choice(document["manifests"])["digest"]
                    got = client.get(f"/v2/{repo}/manifests/{child}", headers=ACCEPT)
                    if got.status_code != 200 or sha256(got.content) != child:
                        shared.error(f"pull {repo}:{tag}: platform manifest {got.status_code}")
                        continue
                    document = json.loads(got.content)
                for descriptor in [document["config"], *document["layers"]]:
                    if stop.is_set():
                        return
                    blob = client.get(f"/v2/{repo}/blobs/{descriptor['digest']}")
                    if blob.status_code != 200:
                        shared.error(f"pull {repo}: blob {blob.status_code}")
                        break
                    if sha256(blob.content) != descriptor["digest"]:
                        shared.error(f"pull {repo}: BLOB BYTES DO NOT MATCH THE DIGEST")
                        break
                    shared.count("blob bytes", len(blob.content))
                else:
                    shared.count("pulls ok")
                    continue
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                shared.error(f"pull {repo}:{tag}: {type(exc).__name__}")
                time.sleep(0.5)
            shared.count("pulls failed")


def slow_reader(address: tuple[str, int], blobs: list[tuple[str, str, int]], rng: random.Random, shared: Shared,
                stop: threading.Event):
    while not stop.is_set():
        repo, digest, size = rng.choice(blobs)
        rate = rng.choice([1, 8, 32, 128]) * 1024
        budget = time.monotonic() + rng.uniform(5, 20)
        try:
            with socket.create_connection(address, timeout=30) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.sendall(f"GET /v2/{repo}/blobs/{digest} HTTP/1.1\r\nHost: soak\r\n\r\n".encode())
                received = 0
                head, end = b"", None       # the response's head, and its whole length once known
                while time.monotonic() < budget and not stop.is_set() and (end is None or received < end):
                    data = sock.recv(rate // 10)
                    if not data:
                        break
                    received += len(data)
                    if end is None and len(head) < 64 * 1024:
                        head += data
                        if b"\r\n\r\n" in head:
                            found = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
                            end = head.index(b"\r\n\r\n") + 4 + int(found[1]) if found else None
                    time.sleep(0.1)
                shared.count("slow reads")
                shared.count("slow bytes", received)
        except OSError as exc:
            shared.error(f"slow reader: {type(exc).__name__}")
            time.sleep(1)


def idle_clients(address: tuple[str, int], count: int, shared: Shared, stop: threading.Event):
    """``count`` keep-alive connections, each used once, then left idle; reopened when closed."""
    sockets: list[socket.socket | None] = [None] * count

    def open_one() -> socket.socket | None:
        try:
            sock = socket.create_connection(address, timeout=10)
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: soak\r\n\r\n")
            sock.recv(4096)
            sock.setblocking(False)
            return sock
        except OSError as exc:
            shared.error(f"idle client: {type(exc).__name__}")
            return None

    try:
        while not stop.wait(1.0):
            for i, sock in enumerate(sockets):
                if sock is not None:
                    try:
                        closed = sock.recv(1) == b""
                    except BlockingIOError:
                        closed = False
                    except OSError:
                        closed = True
                    if not closed:
                        continue
                    sock.close()
                    shared.count("idle connections closed by the server")
                sockets[i] = open_one()
    finally:
        for sock in sockets:
            if sock is not None:
                sock.close()


def reloader(mirror: Mirror, proxy_urls: list[str], rng: random.Random, shared: Shared, stop: threading.Event,
             t0: float):
    number = 0
    while not stop.wait(rng.uniform(10, 20)):
        number += 1
        config = yaml.safe_load(mirror.config_path.read_text())
        what = "SIGHUP (same configuration)"
        if number % 2 == 0:
            config["cache"]["tag_ttl"] = rng.choice(["10s", "1m", "5m"])
            config["upstream"]["read_timeout"] = rng.choice(["20s", "60s"])
            config["upstream"]["url"] = rng.choice(proxy_urls)
            mirror.config_path.write_text(yaml.safe_dump(config))
            what = (f"SIGHUP: tag_ttl {config['cache']['tag_ttl']}, read_timeout {config['upstream']['read_timeout']}"
                    f", upstream {config['upstream']['url']}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(mirror.pid, signal.SIGHUP)
        shared.count("reloads")
        shared.event(t0, what)


def fault_injector(proxy: FaultProxy, rng: random.Random, shared: Shared, stop: threading.Event, t0: float):
    phases = ["none", "cut", "slow", "503", "delay", "none"]
    while not stop.wait(rng.uniform(8, 16)):
        phase = rng.choice(phases)
        proxy.cut = proxy.slow = proxy.status = proxy.delay = None
        proxy.cuts = None
        if phase == "cut":
            proxy.cut, proxy.cuts = (r"/blobs/", rng.choice([100_000, 1_000_000, 5_000_000])), rng.choice([3, 10, None])
        elif phase == "slow":
            proxy.slow = (r"/blobs/", 0.05)
        elif phase == "503":
            proxy.status = (r"/manifests/", 503)
        elif phase == "delay":
            proxy.delay = (r"/manifests/", 2.0)
        with shared.lock:
            shared.phase = phase
        shared.event(t0, f"upstream fault: {phase}" + (f" (cut at {proxy.cut[1]} bytes, {proxy.cuts} times)"
                                                        if phase == "cut" else ""))
    proxy.cut = proxy.slow = proxy.status = proxy.delay = None


def pruner(mirror: Mirror, rng: random.Random, shared: Shared, stop: threading.Event, t0: float):
    """Now and then empty the cache (next pulls are cold), with the CLI, while the server serves."""
    while not stop.wait(rng.uniform(20, 50)):
        result = subprocess.run([sys.executable, "-m", "dockermirror", "cache", "prune", "--older-than", "0s",
                                 "--config", str(mirror.config_path)], capture_output=True, text=True, timeout=120)
        shared.event(t0, f"cache prune --older-than 0s: exit {result.returncode} {result.stdout.strip()[-80:]}")
        if result.returncode != 0:
            shared.error(f"cache prune: exit {result.returncode}: {result.stderr.strip()[-100:]}")


def normal_client(base: str, blob: str, manifest: str, shared: Shared, stop: threading.Event):
    with httpx.Client(base_url=base, timeout=60) as client:
        while not stop.wait(0.5):
            for path, headers in ((blob, []), (manifest, ACCEPT)):
                started = time.perf_counter()
                response = None
                try:
                    response = client.get(path, headers=headers)
                    ok = response.status_code == 200
                except httpx.HTTPError as exc:
                    ok = False
                    shared.error(f"normal client: {type(exc).__name__}")
                elapsed = time.perf_counter() - started
                with shared.lock:
                    shared.latencies.append(elapsed)
                if not ok:
                    shared.error(f"normal client: {path.split('/')[-2]} answered "
                                 f"{response.status_code if response is not None else '-'}")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per minute."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] / 60 for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


SERIES = ("rss_mib", "threads", "fds", "cache_fds", "client_sockets", "upstream_sockets", "p50_ms", "p99_ms",
          "max_ms")


def sample(mirror: Mirror, shared: Shared, t0: float) -> dict:
    status = fuzzing.proc_status(mirror.pid)
    census = fuzzing.fd_census(mirror.pid, mirror.cache_dir, mirror.port)
    with shared.lock:
        latencies, shared.latencies = shared.latencies, []
        phase = shared.phase
        counts = dict(shared.counts)
        errors = sum(shared.errors.values())
    return {
        "t": round(time.monotonic() - t0, 1), "rss_mib": round(status["rss"] / MiB, 1),
        "threads": status["threads"], "fds": census["total"], "cache_fds": census["cache_files"],
        "client_sockets": census["clients"], "upstream_sockets": census["upstream"],
        "requests": len(latencies), "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(max(latencies, default=float("nan")) * 1000, 1),
        "fault": phase, "pulls_ok": counts.get("pulls ok", 0), "pulls_failed": counts.get("pulls failed", 0),
        "errors": errors, "reloads": counts.get("reloads", 0),
    }


def summarize(samples: list[dict], final: dict | None) -> list[str]:
    lines = ["| series | start | end (load) | after the load | max | slope /min |", "|---|---|---|---|---|---|"]
    for name in SERIES:
        points = [(s["t"], s[name]) for s in samples if s[name] == s[name]]   # drop NaN
        if not points:
            continue
        after = final[name] if final and final.get(name) == final.get(name) else "-"
        lines.append(f"| {name} | {points[0][1]} | {points[-1][1]} | {after} | {max(p[1] for p in points)} | "
                     f"{slope_per_minute(points):+.2f} |")
    return lines


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    rng = random.Random(args.seed)
    print(f"soak: {args.minutes} min, seed {args.seed}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="dm-soak-", dir="/var/tmp"))
    shared = Shared()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    samples: list[dict] = []
    final = baseline = None
    log = b""
    code = 0
    try:
        with contextlib.ExitStack() as stack:
            registry = Registry(scratch / "upstream")
            stack.callback(registry.stop)
            registry.start()
            print("seeding the upstream", flush=True)
            pushed = seed_upstream(registry, scratch / "images")
            repo, tag, size = BIG
            images.build(scratch / "images" / "soakbig", "soakbig", tag=tag, seed="soak", random_bytes=size)
            skopeo_push(scratch / "images" / "soakbig", tag, f"{registry.address}/{repo}:{tag}")
            pushed.append((repo, tag))
            proxy = FaultProxy(registry.address).start()
            stack.callback(proxy.stop)
            proxy_urls = [proxy.url, f"http://localhost:{proxy.port}"]
            mirror = Mirror(scratch, {"upstream": {"url": proxy.url, "registry": "docker.io"},
                                      "cache": {"max_size": f"{args.cache_mib}MiB", "min_free": 0, "tag_ttl": "1m",
                                                "pin": ["library/hello"]}})
            stack.callback(mirror.stop)
            mirror.start()
            print(f"upstream {registry.url}, fault proxy {proxy.url}, mirror {mirror.url} (pid {mirror.pid})",
                  flush=True)
            targets = fuzzing.warm(mirror.url, [(r, t) for r, t in pushed if r != BIG[0]])
            hello = targets.images[0]             # pinned: the normal client always reads cached content
            small = min(((hello.repo, d, n) for d, n in hello.blobs.items()), key=lambda b: b[2])
            # slow readers read the big image's big layers: more than socket buffers hold (a small
            # one is taken in one read, and the reader would then wait on a kept-alive connection)
            big_manifest = httpx.get(f"{mirror.url}/v2/{BIG[0]}/manifests/{BIG[1]}", headers=ACCEPT, timeout=60)
            blobs = [(BIG[0], layer["digest"], layer["size"])
                     for layer in json.loads(big_manifest.content)["layers"] if layer["size"] >= MiB]
            address = ("127.0.0.1", mirror.port)
            time.sleep(2)                      # the warm-up's connections close, its accesses are flushed
            t0 = time.monotonic()
            baseline = sample(mirror, shared, t0)
            plan = [(puller, (mirror.url, pushed, random.Random(rng.random()), shared, stop))
                    for _ in range(args.pullers)]
            plan += [(slow_reader, (address, blobs, random.Random(rng.random()), shared, stop))
                     for _ in range(args.slow)]
            plan += [(idle_clients, (address, args.idle, shared, stop)),
                     (reloader, (mirror, proxy_urls, random.Random(rng.random()), shared, stop, t0)),
                     (fault_injector, (proxy, random.Random(rng.random()), shared, stop, t0)),
                     (pruner, (mirror, random.Random(rng.random()), shared, stop, t0)),
                     (normal_client, (mirror.url, f"/v2/{small[0]}/blobs/{small[1]}",
                                      f"/v2/{hello.repo}/manifests/{hello.digest}", shared, stop))]
            for target, arguments in plan:
                thread = threading.Thread(target=target, args=arguments, daemon=True, name=target.__name__)
                thread.start()
                threads.append(thread)
            deadline = t0 + args.minutes * 60
            while time.monotonic() < deadline:
                time.sleep(min(args.interval, max(0.0, deadline - time.monotonic())))
                if not mirror.running():
                    shared.event(t0, f"THE MIRROR DIED (exit status {mirror.proc.returncode})")
                    code = 1
                    break
                samples.append(sample(mirror, shared, t0))
                s = samples[-1]
                print(f"  {s['t']:7.0f}s rss {s['rss_mib']:6.1f} MiB threads {s['threads']:3d} fds {s['fds']:4d} "
                      f"(cache {s['cache_fds']}, clients {s['client_sockets']}, upstream {s['upstream_sockets']}) "
                      f"latency p50 {s['p50_ms']} p99 {s['p99_ms']} max {s['max_ms']} ms; fault {s['fault']}; "
                      f"pulls {s['pulls_ok']} ok {s['pulls_failed']} failed", flush=True)
            stop.set()
            for thread in threads:
                thread.join(30)
            proxy.cut = proxy.slow = proxy.status = proxy.delay = None
            if mirror.running():
                time.sleep(10)                 # connections close, transfers finish
                final = sample(mirror, shared, t0)
                verify = subprocess.run([sys.executable, "-m", "dockermirror", "cache", "verify", "--config",
                                         str(mirror.config_path)], capture_output=True, text=True, timeout=300)
                shared.event(t0, f"cache verify: exit {verify.returncode}: {verify.stdout.strip()[-120:]}")
                if verify.returncode != 0:
                    code = 1
                problems = fuzzing.pull_again(mirror.url, targets)
                shared.event(t0, "pull after the soak: " + ("; ".join(problems) if problems else "correct"))
            else:
                code = 1
            log = mirror.log_path.read_bytes()
            RESULTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(mirror.log_path, RESULTS / "soak-mirror.log")
    except KeyboardInterrupt:
        stop.set()
        code = 130
    finally:
        stop.set()
        shutil.rmtree(scratch, ignore_errors=True)
    log_lines = Counter()
    for line in log.decode("utf-8", "replace").splitlines():
        for level in (" WARNING ", " ERROR ", " CRITICAL "):
            if level in line:
                text = line.split(level, 1)[1]
                log_lines[(level.strip() + " " + " ".join(text.split()[:8]))[:120]] += 1
    table = summarize(samples, final)
    verdicts = []
    if final is not None and baseline is not None:
        for name, why in (("cache_fds", "cache files open"), ("client_sockets", "client connections open")):
            verdicts.append(f"{why}: {baseline[name]} before the load, {final[name]} 10 s after it"
                            + ("" if final[name] <= baseline[name] else "  <-- NOT BACK"))
        verdicts.append(f"threads: {baseline['threads']} before the load, {final['threads']} after it (thread pools "
                        "keep their threads: at most "
                        f"{SENDFILE_THREADS} sendfile + {WORKER_THREADS} workers)")
        verdicts.append(f"RSS: {baseline['rss_mib']} MiB before the load, {final['rss_mib']} MiB after it")
    text = [f"soak: {args.minutes} min, seed {args.seed}, sampled every {args.interval}s; "
            f"{shared.counts.get('pulls ok', 0)} pulls ok, {shared.counts.get('pulls failed', 0)} failed, "
            f"{shared.counts.get('slow reads', 0)} slow reads, {shared.counts.get('reloads', 0)} reloads, "
            f"{shared.counts.get('idle connections closed by the server', 0)} idle connections closed by the server",
            "", *table, "", *verdicts, "client-side errors:"]
    text += [f"  {n:5d} x {what}" for what, n in shared.errors.most_common(20)] or ["  none"]
    text += ["mirror log, warnings and errors (first words):"]
    text += [f"  {n:5d} x {what}" for what, n in log_lines.most_common(20)] or ["  none"]
    text += ["events:"] + [f"  {t:7.1f}s {what}" for t, what in shared.events[-40:]]
    print("\n".join(text), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "soak.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(samples[0]) if samples else ["t"])
        writer.writeheader()
        writer.writerows(samples)
    (RESULTS / "soak.json").write_text(json.dumps({
        "args": vars(args), "baseline": baseline, "samples": samples, "after_load": final, "events": shared.events,
        "counts": dict(shared.counts), "client_errors": dict(shared.errors),
        "log_lines": {k: v for k, v in log_lines.most_common(50)}, "summary": text,
    }, indent=2) + "\n")
    print("wrote bench/results/soak.csv and bench/results/soak.json")
    return code


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
