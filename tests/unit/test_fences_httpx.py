"""The one private part of httpx that upstream/blobtransport.py reads: its proxy rule
(``httpx._utils.get_environment_proxies``). On the pinned httpx it is found and agrees with what
httpx itself does; when it is gone and proxies are set, blob bodies go through httpx itself and
one warning says so."""

from __future__ import annotations

import logging
import sys
import types

import httpx

from dockermirror.upstream import blobtransport
from dockermirror.upstream.client import BLOB_POOL, UpstreamClient


def test_the_pinned_httpx_has_the_proxy_rule_the_transport_reads(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    mounts = blobtransport.proxy_mounts(True, BLOB_POOL)
    assert mounts is not None, "httpx's proxy rule moved: see pyproject.toml's bound on httpx"
    assert set(mounts) == {"https://", "all://*internal.example"}
    assert isinstance(mounts["https://"], httpx.AsyncHTTPTransport) and mounts["all://*internal.example"] is None


def test_without_the_rule_and_with_proxies_blobs_go_through_httpx_with_one_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "httpx._utils", types.ModuleType("httpx._utils"))   # the rule is gone
    monkeypatch.setattr(blobtransport, "_drift_logged", False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    with caplog.at_level(logging.WARNING, logger="dockermirror.upstream"):
        clients = [UpstreamClient("https://registry.example") for _ in range(3)]
    for client in clients:
        assert not isinstance(client._blobs._transport, blobtransport.ThreadTransport)
    lines = [r for r in caplog.records if "self-check: httpx" in r.getMessage()]
    assert len(lines) == 1 and "proxy rule" in lines[0].getMessage()


def test_without_the_rule_and_without_proxies_the_thread_reader_stays(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "httpx._utils", types.ModuleType("httpx._utils"))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.WARNING, logger="dockermirror.upstream"):
        client = UpstreamClient("https://registry.example")
    assert isinstance(client._blobs._transport, blobtransport.ThreadTransport)
    assert "self-check" not in caplog.text
