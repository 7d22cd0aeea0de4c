"""Through a proxy, the upstream's own address is not known: a redirect that goes round the
proxy (NO_PROXY) is measured as from a public upstream, not from the proxy's (here loopback)
address; one that goes through the proxy too is the proxy's to decide. Real sockets, 127.0.0.1."""
from __future__ import annotations

import http.server
import threading

import pytest

from dockermirror.errors import RegistryError
from dockermirror.upstream.client import UpstreamClient

pytestmark = pytest.mark.anyio


def serve(handler_class):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.mark.parametrize("through", [False, True])
async def test_a_redirect_round_the_proxy_is_measured_against_a_public_upstream(monkeypatch, through):
    asked: list[str] = []

    class Storage(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "6")
            self.end_headers()
            self.wfile.write(b"secret")

        def log_message(self, *args):
            pass

    storage = serve(Storage)

    class Proxy(http.server.BaseHTTPRequestHandler):     # answers as the (public) registry would
        def do_GET(self):
            if self.path.startswith("http://storage.example/"):     # a storage host it reaches
                self.send_response(200)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"data")
                return
            self.send_response(307)
            self.send_header("Location", "http://storage.example/blob" if through
                             else f"http://127.0.0.1:{storage.server_address[1]}/latest/meta-data")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    proxy = serve(Proxy)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for name in ("HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    try:
        client = UpstreamClient("http://registry.example")
        try:
            if through:
                stream = await client.open_blob("a/b", "sha256:" + "0" * 64)
                try:
                    assert b"".join([c async for c in stream.chunks()]) == b"data"
                finally:
                    await stream.aclose()
            else:
                with pytest.raises(RegistryError) as caught:
                    stream = await client.open_blob("a/b", "sha256:" + "0" * 64)
                    await stream.aclose()
                assert caught.value.status == 502
                assert caught.value.message == ("the upstream redirected to 127.0.0.1, a loopback or "
                                                "link-local address, which is not followed from this upstream")
        finally:
            await client.aclose()
    finally:
        proxy.shutdown()
        storage.shutdown()
        proxy.server_close()
        storage.server_close()


def test_through_proxy_reads_httpx_and_fails_closed_when_it_cannot(monkeypatch, caplog):
    import logging

    import httpx

    from dockermirror.upstream import peers

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                 "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    plain = httpx.AsyncClient()
    assert peers.through_proxy(plain, "http://storage.example/x") is False      # no proxy set: no internals read
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "direct.example")
    proxied = httpx.AsyncClient()
    assert peers.through_proxy(proxied, "http://storage.example/x") is True
    assert peers.through_proxy(proxied, "http://direct.example/x") is False
    # httpx's internals moved: cannot tell (None: the callers check every hop), one warning
    monkeypatch.setattr(peers, "_drift_logged", False)
    monkeypatch.delattr(httpx.AsyncClient, "_transport_for_url")
    caplog.set_level(logging.WARNING, "dockermirror.upstream")
    assert peers.through_proxy(proxied, "http://storage.example/x") is None
    assert peers.through_proxy(proxied, "http://direct.example/x") is None
    assert len([r for r in caplog.records if "self-check: httpx" in r.getMessage()]) == 1
