"""Helpers for the cache-policy tests: extra images, pulls over HTTP, a disk-usage sampler, a tmpfs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import ALL_MANIFESTS, Upstream
from tests.support import images
from tests.support.clients import skopeo_push

MiB = 1024 * 1024
ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]


@contextlib.contextmanager
def tmpfs(size: str, name: str = "dm-tmpfs") -> Iterator[Path]:
    """A tmpfs of ``size`` of the test's own under /tmp, unmounted and removed afterwards."""
    mountpoint = Path(subprocess.run(["mktemp", "-d", f"/tmp/{name}-XXXXXX"], capture_output=True, text=True,
                                     check=True).stdout.strip())
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        mountpoint.rmdir()


@dataclass
class Pushed:
    repo: str
    image: images.Image

    @property
    def big(self) -> str:
        return self.image.layers["amd64"][-1]


def push_image(upstream: Upstream, workdir: Path, repo: str, *, random_bytes: int, shared: str = "") -> Pushed:
    name = repo.replace("/", "-")
    image = images.build(workdir / name, name, random_bytes=random_bytes, seed=repo, shared=shared)
    skopeo_push(workdir / name, "latest", f"{upstream.registry.address}/{repo}:latest")
    return Pushed(repo, image)


def pull(client: httpx.Client, repo: str, tag: str = "latest") -> list[str]:
    """Pull an image like a client would: manifest, config, layers; check every digest."""
    response = client.get(f"/v2/{repo}/manifests/{tag}", headers=ACCEPT)
    assert response.status_code == 200, response.text
    manifest = json.loads(response.content)
    digests = [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]
    for digest in digests:
        blob = client.get(f"/v2/{repo}/blobs/{digest}")
        assert blob.status_code == 200, blob.text
        assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == digest
    return [response.headers["docker-content-digest"], *digests]


def content_files(cache_dir: Path) -> dict[tuple[int, int], int]:
    """Size of every content file (stored, in flight, being deleted) under a cache directory,
    by (device, inode): files move between blobs/ and tmp/ by rename while we walk.
    Content passing through uncached (``tmp/*.pass``) is outside max_size: not counted."""
    sizes: dict[tuple[int, int], int] = {}
    for sub in ("blobs", "tmp"):
        for dirpath, _, files in os.walk(cache_dir / sub):
            for name in files:
                if name.endswith(".pass"):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                sizes[(st.st_dev, st.st_ino)] = st.st_size
    return sizes


def disk_usage(cache_dir: Path) -> int:
    """Bytes of content files under a cache directory (for a cache nothing is writing to)."""
    return sum(content_files(cache_dir).values())


def consistent_usage(cache_dir: Path, attempts: int = 50) -> int | None:
    """Bytes of content files at one real moment, or None if the cache never held still.

    One walk is not a snapshot: it can count a file in blobs/ that is evicted before the walk
    reaches tmp/, and there a new download that only the eviction made room for. Two walks
    that see the same files describe a moment between them, when all of those files existed."""
    previous = None
    for _ in range(attempts):
        current = content_files(cache_dir)
        if current == previous:
            return sum(current.values())
        previous = current
    return None


class Sampler(threading.Thread):
    """Samples the cache's disk usage (at real moments) every few milliseconds while a test runs."""

    def __init__(self, cache_dir: Path, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.cache_dir, self.interval = cache_dir, interval
        self.samples: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            usage = consistent_usage(self.cache_dir)
            if usage is not None:
                self.samples.append(usage)

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._halt.set()
        self.join()


def cache_cli(mirror, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dockermirror", "cache", *args, "--config", str(mirror.config_path)],
                          capture_output=True, text=True, timeout=300)
