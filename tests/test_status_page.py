"""The status page of a real mirror after a real pull, loaded in headless Chromium.

The screenshot is kept as an artefact: in ``$DM_TEST_ARTIFACTS`` when set (CI collects that
directory), else in the test's temporary directory (pytest keeps the last three runs' in
/tmp/pytest-of-root, or under --basetemp); its path is printed either way.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import httpx

from dockermirror.humanize import size
from tests.support import progress
from tests.support.browser import chromium
from tests.support.clients import skopeo_copy
from tests.support.procs import wait_until


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("style", "title")

    def handle_endtag(self, tag):
        self.skip -= tag in ("style", "title")
        self.parts.append(" ")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def text_of(dom: str) -> str:
    parser = _Text()
    parser.feed(dom)
    parser.close()
    return " ".join("".join(parser.parts).split())


def cache_stats(cache_dir: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "dockermirror", "cache", "stats", "--json", "--cache-dir",
                             str(cache_dir)], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout)


def artefacts(tmp_path: Path) -> Path:
    where = os.environ.get("DM_TEST_ARTIFACTS")
    directory = Path(where) if where else tmp_path
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def test_the_status_page_in_chromium_shows_cache_use_and_upstreams(make_mirror, upstream, tmp_path):
    mirror = make_mirror()
    hello = upstream.seeded["hello"]
    pulled = skopeo_copy(f"{mirror.address}/{hello.repo}:{hello.tag}", tmp_path / "hello")
    # what skopeo got (the manifest and its blobs) is what the mirror stored
    files = [p for p in pulled.iterdir() if p.name != "version"]
    expected = sum(p.stat().st_size for p in files)
    stats = wait_until(lambda: (s := cache_stats(mirror.cache_dir))["entries"] == len(files) and s, 30,
                       interval=0.5, what=f"{len(files)} entries in the cache")
    assert stats["bytes"] == expected

    screenshot = artefacts(tmp_path) / "status-page.png"
    screenshot.unlink(missing_ok=True)
    chromium(f"{mirror.url}/", tmp_path, f"--screenshot={screenshot}")
    progress.say(f"status page screenshot: {screenshot}")
    header = screenshot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (1200, 900)

    text = text_of(chromium(f"{mirror.url}/", tmp_path, "--dump-dom"))
    assert f"{size(expected)} used of {size(stats['max_bytes'])} max" in text
    assert f"entries {len(files)} (blobs and manifests)" in text
    assert f"docker.io default {upstream.url} reachable" in text
    assert f"1 docker.io/{hello.repo} 1" in text            # most pulled: one manifest GET
    assert "since start" in text and "lifetime" in text
    assert "No downloads in flight." in text

    health = httpx.get(f"{mirror.url}/healthz", timeout=10)
    assert (health.status_code, health.text) == (200, "ok\n")
