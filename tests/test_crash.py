"""kill -9 during concurrent cold downloads, again and again: nothing corrupt is ever served."""

from __future__ import annotations

import hashlib
import random
import signal
import threading
import time

import httpx
import pytest

from tests.cachetools import MiB, Pushed, cache_cli, push_image
from tests.conftest import Upstream
from tests.support.procs import wait_until

ROUNDS = 20


@pytest.fixture(scope="module")
def layers(upstream: Upstream, tmp_path_factory) -> list[Pushed]:
    work = tmp_path_factory.mktemp("crash")
    return [push_image(upstream, work, f"crash/img{i}", random_bytes=4 * MiB) for i in range(8)]


def test_kill_9_during_cold_downloads(make_mirror, fault_proxy, layers):
    mirror = make_mirror(fault_proxy.url)
    rng = random.Random(20261129)
    urls = [f"{mirror.url}/v2/{p.repo}/blobs/{p.big}" for p in layers]
    for round_ in range(ROUNDS):
        fault_proxy.slow = (r"/blobs/", 0.004)   # ~0.3 s per blob: the kill lands mid-transfer

        def cold_get(url: str) -> None:
            try:
                httpx.get(url, timeout=30)
            except httpx.HTTPError:
                pass  # the server is killed under it

        clients = [threading.Thread(target=cold_get, args=(url,)) for url in urls]
        for c in clients:
            c.start()
        time.sleep(rng.uniform(0.02, 0.6))
        mirror.proc.send_signal(signal.SIGKILL)
        mirror.proc.wait(10)
        for c in clients:
            c.join(30)

        fault_proxy.slow = None
        before = len(mirror.log_text())
        mirror.start()
        assert "did not stop cleanly" in mirror.log_text()[before:]
        verify = cache_cli(mirror, "verify")
        assert verify.returncode == 0, f"round {round_}: {verify.stdout}{verify.stderr}"
        assert " 0 missing, 0 corrupt" in verify.stdout
        for pushed, url in zip(layers, urls, strict=True):
            response = httpx.get(url, timeout=30)
            assert response.status_code == 200
            assert "sha256:" + hashlib.sha256(response.content).hexdigest() == pushed.big, f"round {round_}"
        wait_until(lambda: not any((mirror.cache_dir / "tmp").glob("*.part")), 10, what="transfers committed")
        for pushed in layers:  # cold again for the next round (the server keeps running)
            removed = cache_cli(mirror, "rm", pushed.big)
            assert removed.returncode == 0, removed.stderr
