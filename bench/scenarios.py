"""What each scenario does to one server in one round, and what it measures.

A scenario is run on the plain-HTTP or the TLS instance of each mirror (or on a pair set up
for it: its ``variant``); ``cold`` scenarios get a restarted server with an empty cache before
every round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.clients import BenchError, Download, curl, curl_all, curl_herd, skopeo_pull, wrk
from bench.idle import Held
from bench.monitor import process_tree, rss_bytes
from bench.seed import LAYERS_MIB, MANY, MANY_MIB, Blob, Content
from bench.servers import Server
from tests.support.certs import TestPKI
from tests.support.procs import Registry, wait_until

HERD = 8
CLIENTS = 32
IDLE = 1000                    # idle keep-alive connections held in the idle scenario
MiB = 1024 * 1024
TRIES = 7                      # warm: curls of the server and of the sendfile server per round


@dataclass(frozen=True)
class Setup:
    """What every scenario works with."""

    upstream: Registry
    content: Content
    pki: TestPKI
    scratch: Path
    duration: int              # seconds of the 32-client run
    upstream_tls: Registry | None = None   # the same storage served over TLS (the test CA's certificate)
    ceiling: str | None = None             # URL of the trivial sendfile server of the big blob's file


@dataclass(frozen=True)
class Sample:
    metrics: dict[str, float]
    served: int                # bytes sent to clients, for CPU seconds per GB


def _url(server: Server, blob: Blob) -> str:
    return server.url + blob.path()


def _cacert(setup: Setup, server: Server) -> Path | None:
    return setup.pki.ca if server.url.startswith("https:") else None


def settle(server: Server, digest: str) -> None:
    """Wait until the server has ``digest`` on its disk (the reference stores in the background)."""
    wait_until(lambda: server.blob_file(digest).exists(), 300, interval=0.05, what=f"{digest} cached")


def upstream_gets(setup: Setup, since: int, digest: str, upstream: Registry | None = None) -> int:
    """Upstream GETs of ``digest`` since the access-log mark (after a moment for the log to be written)."""
    time.sleep(0.5)
    return len((upstream or setup.upstream).requests(since, method="GET", path=digest))


def prime(blob: Callable[[Content], Blob]) -> Callable[[Setup, Server], None]:
    def fetch_once(setup: Setup, server: Server) -> None:
        b = blob(setup.content)
        curl(_url(server, b), b.size, _cacert(setup, server))
        settle(server, b.digest)
    return fetch_once


def warm(setup: Setup, server: Server) -> Sample:
    big = setup.content.big
    got = curl(_url(server, big), big.size, _cacert(setup, server))
    return Sample({"MB/s": got.size / got.seconds / 1e6}, got.size)


def warm_ceiling(setup: Setup, server: Server) -> Sample:
    """TRIES pairs of the same curl of the big blob: from the server and from the trivial sendfile
    server of the same file (the machine's ceiling), in turn which goes first. The medians of each,
    and the median of the pairs' ratios (the two of a pair run back to back, so a busy moment of
    the machine hits both)."""
    big = setup.content.big

    def pair(ceiling_first: bool) -> tuple[Download, Download]:
        if ceiling_first:
            top = curl(setup.ceiling, big.size)
            return curl(_url(server, big), big.size), top
        return curl(_url(server, big), big.size), curl(setup.ceiling, big.size)

    pairs = [pair(i % 2 == 1) for i in range(TRIES)]
    mine, top = ([d.size / d.seconds / 1e6 for d in side] for side in zip(*pairs, strict=True))
    return Sample({"MB/s": statistics.median(mine), "ceiling MB/s": statistics.median(top),
                   "of ceiling": statistics.median(m / t for m, t in zip(mine, top, strict=True))}, big.size * TRIES)


def clients(setup: Setup, server: Server) -> Sample:
    mid = setup.content.mid
    result = wrk(_url(server, mid), CLIENTS, setup.duration)
    return Sample({"req/s": result.rps, "p99 ms": result.p99 * 1000,
                   "wrk's own CPU %": 100 * result.cpu / setup.duration}, result.requests * mid.size)


def cold(setup: Setup, server: Server, upstream: Registry | None = None) -> Sample:
    big, upstream = setup.content.big, upstream or setup.upstream
    mark = upstream.mark()
    got = curl(_url(server, big), big.size)
    settle(server, big.digest)
    return Sample({"MB/s": got.size / got.seconds / 1e6, "first byte ms": got.first_byte * 1000,
                   "upstream GETs": upstream_gets(setup, mark, big.digest, upstream)}, got.size)


def cold_tls_upstream(setup: Setup, server: Server) -> Sample:
    return cold(setup, server, setup.upstream_tls)


def many(setup: Setup, server: Server) -> Sample:
    """MANY clients at once, each GETs a different cold blob: aggregate MB/s, and the most upstream
    GETs any one blob took."""
    blobs = setup.content.many
    mark = setup.upstream.mark()
    wall, downloads = curl_all([(_url(server, b), b.size) for b in blobs])
    for b in blobs:
        settle(server, b.digest)
    time.sleep(0.5)
    seen = setup.upstream.requests(mark, method="GET", path="/blobs/")
    gets = [sum(line.endswith(b.digest) for line in seen) for b in blobs]
    total = sum(d.size for d in downloads)
    return Sample({"MB/s": total / wall / 1e6, "wall s": wall, "upstream GETs per blob": max(gets)}, total)


def steady_rss(pid: int, timeout: float = 15) -> int:
    """The RSS of ``pid``'s tree once it stops moving (two readings 1 s apart within 1 MiB; a
    garbage-collected server gives memory back for a while after a load)."""
    last, deadline = rss_bytes(process_tree(pid)), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1)
        now = rss_bytes(process_tree(pid))
        if abs(now - last) <= MiB:
            return now
        last = now
    return last


def idle(setup: Setup, server: Server) -> Sample:
    """IDLE keep-alive connections, each after one GET /v2/, held open: the steady RSS of a fresh
    server process (after one GET /v2/) before and while they are held; the 32-client wrk row while they are held; a check that each
    is still open and answers at the end; then, closed, the same wrk row without them."""
    mid = setup.content.mid
    host, port = server.address.rsplit(":", 1)
    Held(host, int(port), "/v2/", 1).close()     # the first request's one-off costs are not the connections'
    before = steady_rss(server.pid)
    with Held(host, int(port), "/v2/", IDLE) as held:
        holding = steady_rss(server.pid)
        during = wrk(_url(server, mid), CLIENTS, setup.duration)
        answering = held.answering()
    if answering < IDLE:    # either server: a dropped connection would make its RSS growth look smaller
        raise BenchError(f"{server.label}: only {answering} of {IDLE} idle connections were still open and answering")
    without = wrk(_url(server, mid), CLIENTS, setup.duration)
    return Sample({"RSS growth MiB": (holding - before) / MiB, "req/s without": without.rps,
                   "req/s held": during.rps, "held / without": during.rps / without.rps,
                   "held still open": answering}, (without.requests + during.requests) * mid.size)


def herd(setup: Setup, server: Server) -> Sample:
    big = setup.content.big
    mark = setup.upstream.mark()
    wall, downloads = curl_herd(_url(server, big), big.size, HERD)
    settle(server, big.digest)
    return Sample({"wall s": wall, "upstream GETs": upstream_gets(setup, mark, big.digest)},
                  sum(d.size for d in downloads))


def pull(setup: Setup, server: Server) -> Sample:
    """skopeo pulls the multi-layer image into an empty cache, then again from the cache."""
    blobs = setup.content.layered_blobs
    reference = f"{server.address}/{setup.content.layered}"
    first = skopeo_pull(reference, setup.scratch / "pull")
    for digest in blobs:
        settle(server, digest)
    second = skopeo_pull(reference, setup.scratch / "pull")
    for got in (first, second):
        if got.size != sum(blobs.values()):
            raise BenchError(f"skopeo pull of {reference} wrote {got.size} bytes, expected {sum(blobs.values())}")
    return Sample({"cold s": first.seconds, "warm s": second.seconds}, first.size + second.size)


def from_dockerpull(name: str) -> Callable:
    """bench/dockerpull.py's function ``name``, imported when called (that module imports this one)."""
    def call(setup: Setup, server: Server):
        from bench import dockerpull
        return getattr(dockerpull, name)(setup, server)
    return call


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    measure: Callable[[Setup, Server], Sample]
    tls: bool = False
    cold: bool = False                                       # empty cache before every round
    fresh: bool = False                                      # a new process (cache kept) before every round
    prime: Callable[[Setup, Server], None] | None = None     # once, before the rounds
    variant: str = ""   # a pair of servers set up for it: "tls-upstream", "long-keepalive" (bench/__main__.py)

    @property
    def pair(self) -> str:
        """Which pair of servers it runs on: http, tls, or either followed by -variant."""
        return "-".join(filter(None, ("tls" if self.tls else "http", self.variant)))


SCENARIOS = {s.name: s for s in (
    Scenario("warm", f"one client GETs the cached big blob ({TRIES} times, each then from a sendfile server: "
             "the ceiling)", warm_ceiling, prime=prime(lambda c: c.big)),
    Scenario("warm-tls", "the same over TLS", warm, tls=True, prime=prime(lambda c: c.big)),
    Scenario("clients", f"{CLIENTS} clients GET a cached 1 MiB blob (wrk)", clients, prime=prime(lambda c: c.mid)),
    Scenario("cold", "one client GETs the big blob, empty cache", cold, cold=True),
    Scenario("herd", f"{HERD} clients GET the big blob at once, empty cache", herd, cold=True),
    Scenario("cold-tls", "cold, the upstream over TLS (test CA)", cold_tls_upstream, cold=True, variant="tls-upstream"),
    Scenario("many", f"{MANY} clients at once, each a different cold {MANY_MIB} MiB blob", many, cold=True),
    Scenario("idle", f"{IDLE:,} idle keep-alive connections held; {CLIENTS} clients (wrk) with them held, then without",
             idle, prime=prime(lambda c: c.mid), variant="long-keepalive", fresh=True),
    Scenario("pull", f"skopeo copy of a {len(LAYERS_MIB)}-layer image, empty cache then cached", pull, cold=True),
    Scenario("docker-pull", f"docker pull (dockerd) of the {len(LAYERS_MIB)}-layer image, empty cache, then cached "
             "(image removed from dockerd before each)", from_dockerpull("docker_pull"), cold=True,
             prime=from_dockerpull("warm_up")),
)}
