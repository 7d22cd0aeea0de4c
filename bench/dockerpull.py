"""The ``docker pull`` row: a real dockerd pulls the multi-layer image through the mirror.

Each round starts a dockerd of its own (tests/support/clients.py :class:`Dockerd`: sandboxed,
its own data root and socket, Docker Hub's names pinned to 127.0.0.1, the overlay2 storage
driver as Docker's default, vfs only where overlay2 cannot run) with the server under test as
its only registry mirror, so the image is absent from dockerd and (the scenario being ``cold``)
the mirror's cache is empty. dockerd's start is not timed. Then:

* cold: ``docker pull layered`` (docker.io/library/layered, which both mirrors fetch from the
  seeded upstream), timed from the command's start to its exit;
* ``docker rmi``, and a check that dockerd has no image left;
* warm: the same pull again, now from the mirror's cache.

Every pull must have gone through the mirror: dockerd must report each layer pulled, the
image's digest must be the upstream's, and the server's own log must show a GET of every
blob (config and layers) after the pull began, so a fallback to anything else cannot pass
silently (the sandbox makes Docker Hub's names loopback anyway). The cold pull must have made
the mirror GET every blob from the upstream (its cache was empty); the warm pull's upstream
blob GETs are reported (0 when the mirror served them all from its cache). Before the rounds,
one discarded pull through each server (:func:`warm_up`), and the floor: the same pulls
with the upstream registry itself as dockerd's mirror (printed, not a metric). dockerd is
stopped by PID, also on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from types import SimpleNamespace

import httpx

from bench.clients import BenchError
from bench.scenarios import Sample, Setup, settle
from bench.servers import Server, restart_empty
from tests.support.clients import DOCKER_CLI, Dockerd
from tests.support.images import ALL_MANIFESTS
from tests.support.procs import Registry

PULL_TIMEOUT = 600
LOG_WAIT = 5.0          # seconds for a request's log line to appear


def _mark(server: Server) -> int:
    """A position in the server's log (lines so far)."""
    return len(server.log_text().splitlines())


def _served_gets(server: Server | Registry, since: int, digests: list[str]) -> list[str]:
    """The digests of ``digests`` without a GET in the server's log after line ``since`` (waits a
    moment: a request's log line is written just after its response)."""
    missing: list[str] = digests
    deadline = time.monotonic() + LOG_WAIT
    while missing and time.monotonic() < deadline:
        lines = [line for line in server.log_text().splitlines()[since:] if "GET /v2/" in line]
        missing = [d for d in digests if not any(d in line for line in lines)]
        if missing:
            time.sleep(0.1)
    return missing


def _upstream_manifest(setup: Setup) -> tuple[str, list[str]]:
    """The image's manifest digest at the upstream, and its layers' digests."""
    repo, tag = setup.content.layered.split(":")
    response = httpx.get(f"{setup.upstream.url}/v2/{repo}/manifests/{tag}",
                         headers={"Accept": ", ".join(ALL_MANIFESTS)}, timeout=30)
    response.raise_for_status()
    return response.headers["docker-content-digest"], [layer["digest"] for layer in response.json()["layers"]]


def _pull(daemon: Dockerd, server: Server, image: str, blobs: list[str], layers: int) -> float:
    """One timed ``docker pull`` of ``image`` (``blobs``: its config and ``layers`` layers), checked: seconds."""
    mark = _mark(server)
    argv = [DOCKER_CLI, "-H", f"unix://{daemon.socket}", "pull", image]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=PULL_TIMEOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"docker pull {image} via {server.label} exited {done.returncode}: "
                         f"{done.stderr.strip()}\ndockerd's log:\n{daemon.log_text()[-2000:]}")
    complete = len(re.findall(r"^\w+: Pull complete$", done.stdout, re.M))
    if complete != layers:
        raise BenchError(f"docker pull {image} via {server.label}: {complete} layers pulled, "
                         f"expected {layers}:\n{done.stdout}")
    if missing := _served_gets(server, mark, blobs):
        raise BenchError(f"docker pull {image}: {server.label}'s log shows no GET of {', '.join(missing)}: "
                         "dockerd did not pull through it")
    return seconds


def _start(server: Server) -> tuple[Dockerd, float]:
    """A new dockerd with ``server`` as its only registry mirror, and the seconds its start took:
    overlay2 (Docker's default), or vfs where overlay2 cannot run (said once)."""
    global _driver
    started = time.perf_counter()
    daemon = Dockerd(server.url, insecure=server.address, storage_driver=_driver)
    try:
        daemon.start()
    except BaseException as error:
        daemon.stop()       # also on Ctrl-C while it starts: its data root goes too
        if not isinstance(error, RuntimeError):
            raise
        if _driver == "vfs":
            raise BenchError(str(error)) from None
        print(f"  dockerd does not start with the overlay2 storage driver here: using vfs "
              f"(slower layer extraction)\n{str(error)[-500:]}", flush=True)
        _driver = "vfs"
        return _start(server)
    try:
        mirrors = daemon.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout
        if json.loads(mirrors) != [server.url + "/"]:
            raise BenchError(f"dockerd's registry mirrors are {mirrors.strip()}, expected only {server.url}/")
    except BaseException:
        daemon.stop()
        raise
    return daemon, time.perf_counter() - started


_driver = "overlay2"


def _rounds(setup: Setup, server: Server) -> tuple[Sample, float]:
    """One cold and one warm pull through ``server`` by a new dockerd; and the seconds its start took."""
    if server.url.startswith("https:"):
        raise BenchError("the docker pull scenario runs on the plain-HTTP instances only")
    repo, tag = setup.content.layered.split(":")
    image = f"{repo.removeprefix('library/')}:{tag}"
    blobs = setup.content.layered_blobs
    expected, layers = _upstream_manifest(setup)
    if not set(layers) < set(blobs):
        raise BenchError(f"the upstream's {setup.content.layered} is not the seeded image")
    daemon, start = _start(server)      # not timed
    try:
        mark = setup.upstream.mark()
        cold = _pull(daemon, server, image, list(blobs), len(layers))
        if missing := _served_gets(setup.upstream, mark, list(blobs)):
            raise BenchError(f"cold docker pull via {server.label}: the upstream saw no GET of "
                             f"{', '.join(missing)}: the mirror's cache was not empty")
        digests = json.loads(daemon.docker("image", "inspect", "--format", "{{json .RepoDigests}}", image).stdout)
        if f"{repo.removeprefix('library/')}@{expected}" not in digests:
            raise BenchError(f"dockerd's {image} has digests {digests}, the upstream's is {expected}")
        for digest in blobs:
            settle(server, digest)
        daemon.docker("rmi", image)
        if left := daemon.docker("image", "ls", "--all", "--quiet").stdout.split():
            raise BenchError(f"dockerd still has images after docker rmi {image}: {left}")
        mark = setup.upstream.mark()
        warm = _pull(daemon, server, image, list(blobs), len(layers))
        time.sleep(0.5)     # for the upstream's log
        refetched = [line for line in setup.upstream.requests(mark, method="GET", path="/blobs/")
                     if any(digest in line for digest in blobs)]
    finally:
        daemon.stop()
    return Sample({"cold s": cold, "warm s": warm, "warm upstream GETs": len(refetched)},
                  2 * sum(blobs.values())), start


def docker_pull(setup: Setup, server: Server) -> Sample:
    """dockerd pulls the multi-layer image through ``server``, cold then warm (image removed in between)."""
    return _rounds(setup, server)[0]


def floor(setup: Setup) -> list[float]:
    """Seconds of two pulls (image removed in between) by a new dockerd straight from the upstream
    registry, no mirror: dockerd's own share of a pull (what no mirror can make faster)."""
    upstream = SimpleNamespace(label="the upstream", url=setup.upstream.url, address=setup.upstream.address,
                               log_text=setup.upstream.log_text)
    repo, tag = setup.content.layered.split(":")
    image = f"{repo.removeprefix('library/')}:{tag}"
    _, layers = _upstream_manifest(setup)
    daemon, _ = _start(upstream)
    try:
        seconds = []
        for _ in range(2):
            seconds.append(_pull(daemon, upstream, image, list(setup.content.layered_blobs), len(layers)))
            daemon.docker("rmi", image)
        return seconds
    finally:
        daemon.stop()


_floor_shown = False


def warm_up(setup: Setup, server: Server) -> None:
    """One untimed pull through ``server`` before the rounds, so that the first round does not pay
    for first-time work outside the mirrors (reading dockerd's binaries and the upstream's files
    into the page cache) and the server measured first in each round is not at a disadvantage;
    before the first, the :func:`floor` (printed)."""
    global _floor_shown
    if not _floor_shown:
        seconds = floor(setup)
        print(f"  docker-pull floor: dockerd pulling straight from the upstream registry (no mirror): "
              f"{', '.join(f'{s:.3g}' for s in seconds)} s", flush=True)
        _floor_shown = True
    restart_empty(server)   # an earlier scenario (skopeo's pull) may have cached the same image
    sample, start = _rounds(setup, server)
    shown = ", ".join(f"{k} {v:.3g}" for k, v in sample.metrics.items())
    print(f"  docker-pull warm-up {server.label}: dockerd ({_driver}) started in {start:.2f} s (never timed); "
          f"{shown} (discarded)", flush=True)
