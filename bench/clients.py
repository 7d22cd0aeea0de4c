"""The load: curl for single downloads, wrk for many clients, skopeo for real pulls.

Every response is checked (status, size); anything else raises :class:`BenchError`.
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.clients import client_env, client_sandbox

CURL_FORMAT = "%{time_total} %{time_starttransfer} %{size_download} %{http_code}"


class BenchError(Exception):
    """The benchmark itself failed: a request failed, a tool broke, a server misbehaved."""


@dataclass(frozen=True)
class Download:
    seconds: float
    size: int
    first_byte: float = 0.0    # seconds until the first byte of the body (curl only)


def _curl_argv(url: str, cacert: Path | None) -> list[str]:
    return ["curl", "-s", "--max-time", "600", "-o", "/dev/null", "-w", CURL_FORMAT,
            *(["--cacert", str(cacert)] if cacert else []), url]


def _check(url: str, output: str, size: int) -> Download:
    try:
        seconds, first_byte, got, status = output.split()
    except ValueError:
        raise BenchError(f"curl {url}: unexpected output {output!r}") from None
    if status != "200" or int(got) != size:
        raise BenchError(f"GET {url}: status {status}, {got} bytes (expected 200, {size} bytes)")
    return Download(float(seconds), int(got), float(first_byte))


def curl(url: str, size: int, cacert: Path | None = None) -> Download:
    """One GET with curl, body discarded."""
    done = subprocess.run(_curl_argv(url, cacert), capture_output=True, text=True)
    return _check(url, done.stdout, size)


def curl_herd(url: str, size: int, clients: int) -> tuple[float, list[Download]]:
    """``clients`` curls of one URL started at once; wall seconds until the last one is done."""
    return curl_all([(url, size)] * clients)


def curl_all(downloads: list[tuple[str, int]]) -> tuple[float, list[Download]]:
    """One curl per (URL, expected size), all started at once; wall seconds until the last one is done."""
    started = time.perf_counter()
    procs = [subprocess.Popen(_curl_argv(url, None), stdout=subprocess.PIPE, text=True) for url, _ in downloads]
    outputs = [proc.communicate()[0] for proc in procs]
    wall = time.perf_counter() - started
    return wall, [_check(url, output, size) for (url, size), output in zip(downloads, outputs, strict=True)]


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rps: float
    p99: float               # seconds
    cpu: float               # seconds of CPU wrk itself used
    text: str


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * _UNITS[unit]


def wrk(url: str, connections: int, duration: int, threads: int = 2,
        headers: dict[str, str] | None = None) -> WrkResult:
    """``wrk -t2 -cN -dDs --latency [-H ...] URL``; any non-2xx answer or socket error fails."""
    extra = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "--latency", *extra, url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    bad = re.search(r"Non-2xx or 3xx responses: \d+|Socket errors: .*", text)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    count = re.search(r"^\s+(\d+) requests in", text, re.M)
    if bad or not (rps and p99 and count):
        raise BenchError(f"{' '.join(argv)}: {bad.group(0) if bad else 'unexpected output'}\n{text}")
    return WrkResult(int(count.group(1)), float(rps.group(1)), _seconds(p99.group(1)), cpu, text)


def skopeo_pull(reference: str, dest: Path) -> Download:
    """``skopeo copy docker://REFERENCE dir:DEST`` (plain HTTP): seconds, and bytes of the blobs
    written (skopeo checks every digest). DEST is removed after."""
    argv = ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{reference}", f"dir:{dest}"]
    # the test suite's sandbox (a private /etc and /var/lib/containers, none of the host's
    # environment): skopeo as root writes /var/lib/containers/cache otherwise
    sandbox = client_sandbox(dest.parent)
    try:
        started = time.perf_counter()
        done = subprocess.run(sandbox.argv(argv), capture_output=True, text=True, timeout=600,
                              env=client_env(sandbox.dir))
        seconds = time.perf_counter() - started
    finally:
        sandbox.cleanup()
    try:
        if done.returncode != 0:
            raise BenchError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        blobs = [f for f in dest.iterdir() if f.name not in ("manifest.json", "version")]
        return Download(seconds, sum(f.stat().st_size for f in blobs))
    finally:
        shutil.rmtree(dest, ignore_errors=True)
