"""What each scenario does to one server in one round, and what it measures.

A scenario is run on the plain-HTTP or the TLS instance of each mirror; ``cold``
scenarios get a restarted server with an empty cache before every round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.clients import BenchError, curl, curl_herd, skopeo_pull, wrk
from bench.seed import LAYERS_MIB, Blob, Content
from bench.servers import Server
from tests.support.certs import TestPKI
from tests.support.procs import Registry, wait_until

HERD = 8
CLIENTS = 32


@dataclass(frozen=True)
class Setup:
    """What every scenario works with."""

    upstream: Registry
    content: Content
    pki: TestPKI
    scratch: Path
    duration: int              # seconds of the 32-client run


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


def upstream_gets(setup: Setup, since: int, digest: str) -> int:
    """Upstream GETs of ``digest`` since the access-log mark (after a moment for the log to be written)."""
    time.sleep(0.5)
    return len(setup.upstream.requests(since, method="GET", path=digest))


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


def clients(setup: Setup, server: Server) -> Sample:
    mid = setup.content.mid
    result = wrk(_url(server, mid), CLIENTS, setup.duration)
    return Sample({"req/s": result.rps, "p99 ms": result.p99 * 1000,
                   "wrk's own CPU %": 100 * result.cpu / setup.duration}, result.requests * mid.size)


def cold(setup: Setup, server: Server) -> Sample:
    big = setup.content.big
    mark = setup.upstream.mark()
    got = curl(_url(server, big), big.size)
    settle(server, big.digest)
    return Sample({"MB/s": got.size / got.seconds / 1e6, "first byte ms": got.first_byte * 1000,
                   "upstream GETs": upstream_gets(setup, mark, big.digest)}, got.size)


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
    prime: Callable[[Setup, Server], None] | None = None     # once, before the rounds


SCENARIOS = {s.name: s for s in (
    Scenario("warm", "one client GETs the cached big blob", warm, prime=prime(lambda c: c.big)),
    Scenario("warm-tls", "the same over TLS", warm, tls=True, prime=prime(lambda c: c.big)),
    Scenario("clients", f"{CLIENTS} clients GET a cached 1 MiB blob (wrk)", clients, prime=prime(lambda c: c.mid)),
    Scenario("cold", "one client GETs the big blob, empty cache", cold, cold=True),
    Scenario("herd", f"{HERD} clients GET the big blob at once, empty cache", herd, cold=True),
    Scenario("pull", f"skopeo copy of a {len(LAYERS_MIB)}-layer image, empty cache then cached", pull, cold=True),
    Scenario("docker-pull", f"docker pull (dockerd) of the {len(LAYERS_MIB)}-layer image, empty cache, then cached "
             "(image removed from dockerd before each)", from_dockerpull("docker_pull"), cold=True,
             prime=from_dockerpull("warm_up")),
)}
