"""The fuzzer's request-level cases, in-process: the ASGI app called with the scope uvicorn builds.

The same seeded generator as tests/test_fuzz.py (tests/support/fuzzing.py), restricted to single
well-framed requests (hostile paths, references, methods, Accept, Range/If-Range, headers, query
strings); HTTP framing needs the real server and stays in the system tier. Each request must get
an answer below 500 (the fake upstream never fails), with headers uvicorn would send (a header
value with CR/LF makes uvicorn drop the connection), and afterwards no cache file may be left
open, and the index must say what it said before.
"""

from __future__ import annotations

import asyncio
import os
import re
import urllib.parse

import httptools
import pytest

from tests.support import fuzzing
from tests.unit.fakes import ALL_MANIFESTS

pytestmark = pytest.mark.anyio

SEED = int(os.environ.get("DM_FUZZ_SEED", "20261202"))
REQUESTS = 600
HEADER_NAME = re.compile(rb'[\x00-\x1f\x7f()<>@,;:\[\]={} \t\\"]')      # what uvicorn refuses to send
HEADER_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def scope_of(case: fuzzing.Case) -> dict:
    """The ASGI scope uvicorn's httptools protocol builds for this request."""
    url = httptools.parse_url(case.target)
    path = url.path.decode("ascii")
    if "%" in path:
        path = urllib.parse.unquote(path)
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": case.method,
            "scheme": "http", "path": path, "raw_path": url.path, "query_string": url.query or b"",
            "root_path": "", "headers": [(b"host", b"127.0.0.1")] + [(k.lower(), v) for k, v in case.headers],
            "client": ("192.0.2.7", 40000), "server": ("127.0.0.1", 5000), "state": {}}


async def call(app, case: fuzzing.Case) -> tuple[int | None, str]:
    """Run the app on one request: (status, problem or "")."""
    done = asyncio.Event()
    status: int | None = None
    problem = ""
    sent_request = False

    async def receive():
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status, problem
        if message["type"] == "http.response.start":
            status = message["status"]
            for name, value in message.get("headers", []):
                if HEADER_NAME.search(name) or HEADER_VALUE.search(value):
                    problem = f"a response header uvicorn refuses to send (it drops the connection): {name!r}: " \
                              f"{value[:80]!r}"
                    raise RuntimeError("Invalid HTTP header value.")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()
        elif message["type"] == "http.response.zerocopysend":
            raise AssertionError("no zero-copy extension was offered")

    try:
        await asyncio.wait_for(app(scope_of(case), receive, send), 30)
    except Exception as exc:
        if not problem:
            problem = f"an exception escaped the app: {type(exc).__name__}: {str(exc)[:120]}"
    finally:
        done.set()
    return status, problem


def open_cache_files(cache_dir) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(cache_dir / "blobs")) or target.startswith(str(cache_dir / "tmp")):
            found.append(target)
    return found


async def test_malformed_requests_in_process(mirror):
    pushed = [mirror.registry.push("acme/tool", "1.0", layer=b"tool layer\n" * 3000),
              mirror.registry.push("library/hello", "latest", layer=b"hello layer\n" * 50)]
    accept = [("Accept", a) for a in ALL_MANIFESTS]
    targets = fuzzing.Targets([])
    for image in pushed:
        response = await mirror.client.get(f"/v2/{image.repo}/manifests/{image.tag}", headers=accept)
        assert response.status_code == 200
        for digest, data in image.blobs.items():
            assert (await mirror.client.get(f"/v2/{image.repo}/blobs/{digest}")).content == data
        targets.images.append(fuzzing.Image(image.repo, image.tag, image.digest, image.media_type, [image.digest],
                                            {d: len(b) for d, b in image.blobs.items()}))
    await mirror.app.cache.transfers.wait_all(5)
    await mirror.app.cache.flush()
    index_before = fuzzing.index_fingerprint(mirror.cache_dir)
    files_before = open_cache_files(mirror.cache_dir)
    seen_before = len(mirror.registry.seen)

    generator = fuzzing.Generator(SEED, targets, huge=64 * 1024)
    makers = [generator.path, generator.reference, generator.method, generator.accept, generator.range_,
              generator.headers_, generator.query]
    problems = []
    sent = 0
    for number in range(REQUESTS):
        case = generator.pick(makers)()
        case.number = number
        if case.framing != fuzzing.VALID or not case.method or len(case.target) > 65535:
            continue            # framing (and httptools' URL limit) is the real server's business
        sent += 1
        status, problem = await call(mirror.app.asgi, case)
        if not problem and (status is None or status >= 500):
            problem = f"answered {status}"
        if problem:
            problems.append(f"case {number}: {case.what[:140]} -> {problem}")
    await mirror.app.cache.flush()
    await asyncio.sleep(0)
    leaked = sorted(set(open_cache_files(mirror.cache_dir)) - set(files_before))
    if leaked:
        problems.append(f"{len(leaked)} cache file descriptor(s) left open: {leaked[:3]}")
    changes = fuzzing.fingerprint_changes(index_before, fuzzing.index_fingerprint(mirror.cache_dir))
    if changes:
        problems.append("the index changed: " + "; ".join(changes))
    assert sent > REQUESTS // 2
    assert not problems, (f"fuzz seed {SEED}, {sent} requests in-process ({len(mirror.registry.seen) - seen_before}"
                          f" reached the fake upstream), {len(problems)} problems:\n  " + "\n  ".join(problems[:40]))
