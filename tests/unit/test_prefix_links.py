"""A tag list's next page, asked through a registry path prefix, stays with that registry."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from dockermirror import config as configuration
from dockermirror.app import DockerMirror
from tests.unit.fakes import response

pytestmark = pytest.mark.anyio

CONFIG = """\
tls: {{enabled: false}}
upstreams:
  - {{registry: docker.io, url: "https://hub.test"}}
  - {{registry: ghcr.io, url: "https://ghcr.test"}}
cache: {{dir: {cache}}}
"""


def upstreams(seen: list[str]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.host} {request.url.path}?{request.url.query.decode()}")
        path = request.url.path
        if path.endswith("/tags/list"):
            repo = path.removeprefix("/v2/").removesuffix("/tags/list")
            if "last=" in str(request.url):
                return response(200, json_body={"name": repo, "tags": ["2"]})
            return response(200, {"Link": f'</v2/{repo}/tags/list?last=1&n=1>; rel="next"'},
                            json_body={"name": repo, "tags": ["1"]})
        return response(404, json_body={"errors": [{"code": "NAME_UNKNOWN", "message": "no"}]})

    return httpx.MockTransport(handle)


async def test_next_page_link_keeps_the_registry_prefix(tmp_path: Path):
    seen: list[str] = []
    app = DockerMirror(configuration.loads(CONFIG.format(cache=tmp_path / "cache")),
                       upstream_transport=upstreams(seen))
    async with app.running(), httpx.AsyncClient(transport=httpx.ASGITransport(app.asgi),
                                                base_url="http://mirror.test") as client:
        first = await client.get("/v2/ghcr.io/org/app/tags/list?n=1")
        assert first.status_code == 200
        assert first.headers["link"] == '</v2/ghcr.io/org/app/tags/list?last=1&n=1>; rel="next"'
        link = first.headers["link"].split(">")[0].removeprefix("<")
        second = await client.get(link)
        assert second.json() == {"name": "org/app", "tags": ["2"]}
        # without a prefix the upstream's link is passed on as it is (it already routes right)
        plain = await client.get("/v2/acme/tool/tags/list?n=1")
        assert plain.headers["link"] == '</v2/acme/tool/tags/list?last=1&n=1>; rel="next"'
    assert seen == ["ghcr.test /v2/org/app/tags/list?n=1", "ghcr.test /v2/org/app/tags/list?n=1&last=1",
                    "hub.test /v2/acme/tool/tags/list?n=1"]
