"""Concurrent requests for the same uncached manifest, tag or referrers share one upstream
request: the client whose request asked the upstream is MISS, the others COALESCED, in the
access log and in what every observer gets (metrics, status page, journal fields, report).

The fake upstream's answers are held (tests/unit/fakes.py ``Holding``) until every client's
request is waiting in the mirror, so that they meet whatever the event loop's order.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from dockermirror import report
from dockermirror.api.accesslog import RequestDone
from dockermirror.service.journal import request_fields
from tests.unit.fakes import OCI_MANIFEST, Answer, FakeClock, FakeRegistry, Holding
from tests.unit.test_metrics import Metered, metered

pytestmark = pytest.mark.anyio

N = 5
ACCEPT = {"Accept": OCI_MANIFEST}


@dataclass
class Shared:
    m: Metered
    holding: Holding
    done: list[RequestDone]
    entered: Counter        # calls of Mirror.manifest / Mirror.referrers so far

    async def meet(self, method: str, path: str, entry: str, *, upstream_requests: int = 1) -> list[httpx.Response]:
        """N concurrent requests; each held upstream request is let go only once every client
        waits in the mirror (after the first, once the ones it woke have had their turn)."""
        tasks = [asyncio.create_task(self.m.client.request(method, path, headers=ACCEPT)) for _ in range(N)]
        for held in range(1, upstream_requests + 1):
            await until(lambda: self.entered[entry] == N and len(self.holding.held) == held,
                        f"{N} requests in the mirror and upstream request {held} held")
            for _ in range(50):     # the clients that request woke join the next one
                await asyncio.sleep(0)
            self.holding.release()
        return await asyncio.gather(*tasks)

    def labels(self, kind: str) -> list[str | None]:
        return sorted(d.cache for d in self.done if d.kind == kind)


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
async def shared(tmp_path: Path, registry: FakeRegistry, clock: FakeClock,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Shared]:
    async for harness in sharing(tmp_path, registry, clock, monkeypatch):
        yield harness


async def sharing(tmp_path: Path, registry: FakeRegistry, clock: FakeClock,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Shared]:
    """A metered mirror whose upstream answers can be held (see :meth:`Shared.meet`)."""
    holding = Holding(registry.transport)
    async for m in metered(tmp_path, registry, clock, transport=holding):
        done: list[RequestDone] = []
        m.app.request_observers.append(done.append)
        entered: Counter = Counter()
        for name in ("manifest", "referrers"):
            # counted as it is called: from there it runs on to its single flight without pausing
            def counting(*args, _call=getattr(m.app.mirror, name), _name=name, **kwargs):
                entered[_name] += 1
                return _call(*args, **kwargs)
            monkeypatch.setattr(m.app.mirror, name, counting)
        yield Shared(m, holding, done, entered)


def access_labels(caplog: pytest.LogCaptureFixture, contains: str) -> list[str]:
    return sorted(r.getMessage().split("cache=")[1].split()[0] for r in caplog.records
                  if r.name == "dockermirror.access" and contains in r.getMessage())


def manifest_requests(registry: FakeRegistry, method: str) -> int:
    return len(registry.requests(method, "/manifests/"))


COALESCED_ONCE = ["COALESCED"] * (N - 1) + ["MISS"]


async def test_gets_of_an_uncached_tag_pull_once_one_miss_the_others_coalesced(
        shared: Shared, registry: FakeRegistry, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dockermirror.access")
    image = registry.push("library/alpine", "3.20")
    shared.holding.match = lambda r: "/manifests/" in r.url.path
    # held: the tag's HEAD (all N share it), then the GET of its digest (all N share it too)
    got = await shared.meet("GET", "/v2/library/alpine/manifests/3.20", "manifest", upstream_requests=2)
    assert [r.status_code for r in got] == [200] * N and {r.content for r in got} == {image.manifest}
    assert (manifest_requests(registry, "HEAD"), manifest_requests(registry, "GET")) == (1, 1)
    assert shared.labels("manifest") == COALESCED_ONCE
    assert access_labels(caplog, "/manifests/3.20") == COALESCED_ONCE
    # what the status page and the journal (so `docker-mirror report`) count
    assert shared.m.app.status_page.stats.answers["COALESCED"] == N - 1
    assert shared.m.app.status_page.stats.answers["MISS"] == 1
    # the journal entries `docker-mirror report` reads: 1 pull spent, N - 1 saved, as Docker Hub counts
    tally = report.Tally()
    for r in report.requests(json.dumps(dict(request_fields(d))).encode() for d in shared.done):
        tally.add(r)
    assert tally.summary("docker-mirror.service", None)["upstreams"] == [{
        "upstream": "docker.io", "requests": N, "pulls_spent": 1, "pulls_saved": N - 1,
        "bytes_from_cache": (N - 1) * len(image.manifest), "bytes_from_upstream": len(image.manifest)}]


async def test_heads_of_an_uncached_tag_share_one_upstream_head(shared: Shared, registry: FakeRegistry) -> None:
    image = registry.push("library/alpine", "3.20")
    shared.holding.match = lambda r: "/manifests/" in r.url.path
    got = await shared.meet("HEAD", "/v2/library/alpine/manifests/3.20", "manifest")
    assert {r.headers["docker-content-digest"] for r in got} == {image.digest}
    assert (manifest_requests(registry, "HEAD"), manifest_requests(registry, "GET")) == (1, 0)
    assert shared.labels("manifest") == COALESCED_ONCE


async def test_a_revalidation_that_had_to_get_the_manifest_is_one_pull(shared: Shared, registry: FakeRegistry) -> None:
    """An upstream whose HEAD names no digest: the tag's revalidation GETs the manifest by tag
    (a pull) for all of them; its result is no HIT, for the client that asked or the others."""
    image = registry.push("library/alpine", "3.20")

    def no_digest(request: httpx.Request, answer: Answer) -> None:
        if request.method == "HEAD":
            answer.headers.pop("docker-content-digest")
    registry.alter_manifest = no_digest
    shared.holding.match = lambda r: "/manifests/" in r.url.path and r.method == "HEAD"
    got = await shared.meet("GET", "/v2/library/alpine/manifests/3.20", "manifest")
    assert {r.content for r in got} == {image.manifest}
    assert (manifest_requests(registry, "HEAD"), manifest_requests(registry, "GET")) == (1, 1)
    assert shared.labels("manifest") == COALESCED_ONCE


async def test_gets_of_an_uncached_digest_fetch_once(shared: Shared, registry: FakeRegistry) -> None:
    image = registry.push("library/alpine", "3.20")
    shared.holding.match = lambda r: "/manifests/" in r.url.path
    got = await shared.meet("GET", f"/v2/library/alpine/manifests/{image.digest}", "manifest")
    assert {r.content for r in got} == {image.manifest}
    assert manifest_requests(registry, "GET") == 1
    assert shared.labels("manifest") == COALESCED_ONCE


async def test_referrers_asked_once_for_several_clients(shared: Shared, registry: FakeRegistry,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dockermirror.access")
    registry.referrers = True
    image = registry.push("acme/tool", "1.0")
    registry.push_artifact("acme/tool", image.digest, "application/vnd.dev.cosign.artifact.sig.v1+json")
    shared.holding.match = lambda r: "/referrers/" in r.url.path
    got = await shared.meet("GET", f"/v2/acme/tool/referrers/{image.digest}", "referrers")
    assert {r.content for r in got} == {registry.referrers_body("acme/tool", image.digest)}
    assert len(registry.requests("GET", "/referrers/")) == 1
    assert shared.labels("referrers") == COALESCED_ONCE
    assert access_labels(caplog, "/referrers/") == COALESCED_ONCE


async def test_a_revalidation_shared_by_several_clients_is_counted_once(shared: Shared, registry, clock) -> None:
    """One upstream HEAD after the TTL, for N clients: one revalidation in the metrics."""
    from tests.unit.test_metrics import series

    registry.push("library/alpine", "3.20")
    got = await shared.m.client.get("/v2/library/alpine/manifests/3.20", headers={"Accept": OCI_MANIFEST})
    assert got.status_code == 200
    clock.advance(301)
    shared.entered.clear()
    shared.holding.match = lambda r: "/manifests/" in r.url.path and r.method == "HEAD"
    await shared.meet("GET", "/v2/library/alpine/manifests/3.20", "manifest")
    assert manifest_requests(registry, "HEAD") == 2      # the first pull's and the revalidation's
    counted = {dict(k)["result"]: v for k, v in series(shared.m.text(), "docker_mirror_tag_revalidations_total").items()
               if dict(k)["upstream"] == "docker.io"}
    assert counted == {"unchanged": 1.0, "changed": 0.0, "stale": 0.0, "failed": 0.0}
