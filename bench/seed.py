"""The upstream's content: a big single-layer image, a 1 MiB one, a multi-layer one, and
(when asked) an image of ``MANY`` layers of 32 MiB for the many-cold-blobs scenario.

Images are built as OCI layouts (with the test suite's layout writer) and pushed with skopeo.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

from tests.support.clients import skopeo
from tests.support.images import LAYER_GZIP, OCI_CONFIG, OCI_MANIFEST, Layout, sha256, tar_bytes

MiB = 1024 * 1024
LAYERS_MIB = (40, 24, 16, 10, 6, 3, 1)  # the image the skopeo scenario pulls
MANY, MANY_MIB = 16, 32                 # the many-cold-blobs scenario: that many different blobs of that size


@dataclass(frozen=True)
class Blob:
    repo: str
    digest: str
    size: int
    file: Path                     # the same bytes in the image layout

    def path(self) -> str:
        return f"/v2/{self.repo}/blobs/{self.digest}"


@dataclass(frozen=True)
class Content:
    big: Blob
    mid: Blob
    layered: str                   # repo:tag of the multi-layer image
    layered_blobs: dict[str, int]  # its config and layers: digest -> size
    many: tuple[Blob, ...] = ()    # MANY different blobs of MANY_MIB (seeded only when asked)


def random_data(seed: str, size: int) -> bytes:
    """Reproducible random bytes, made in chunks (``randbytes`` stops short of 256 MiB)."""
    rng, chunk = random.Random(seed), 64 * MiB
    return b"".join(rng.randbytes(min(chunk, size - start)) for start in range(0, size, chunk))


def image(root: Path, name: str, sizes: tuple[int, ...]) -> tuple[list[Blob], dict[str, int]]:
    """An OCI layout tagged ``latest`` with one random layer (stored, not deflated) per size in bytes:
    the layers, and every blob (config and layers) by digest with its size."""
    layout = Layout(root)
    layers = []
    for i, size in enumerate(sizes):
        tar = tar_bytes({f"{name}/layer{i}.bin": random_data(f"{name}/{i}", size)})
        layers.append((layout.put(gzip.compress(tar, compresslevel=0, mtime=0), LAYER_GZIP), sha256(tar)))
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]}}
    config_desc = layout.put(json.dumps(config, sort_keys=True).encode(), OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc,
                "layers": [desc for desc, _ in layers]}
    layout.tag(layout.put(json.dumps(manifest, sort_keys=True).encode(), OCI_MANIFEST), "latest")
    blobs = [Blob(f"library/{name}", desc["digest"], desc["size"], layout.path(desc["digest"])) for desc, _ in layers]
    return blobs, {desc["digest"]: desc["size"] for desc in (config_desc, *(desc for desc, _ in layers))}


def push(layout: Path, dest: str) -> None:
    # in the test suite's sandbox: skopeo as root writes /var/lib/containers/cache otherwise
    skopeo("copy", "--quiet", "--all", "--dest-tls-verify=false", f"oci:{layout}:latest", f"docker://{dest}",
           parent=layout.parent, timeout=600)


def seed(registry: str, workdir: Path, big_mib: int, many: bool = False) -> Content:
    """Build the images under ``workdir`` and push them to ``registry`` (HOST:PORT) as library/NAME:latest;
    with ``many``, also library/many (MANY layers of MANY_MIB)."""
    def build_and_push(name: str, sizes_mib: tuple[int, ...]) -> tuple[list[Blob], dict[str, int]]:
        built = image(workdir / name, name, tuple(size * MiB for size in sizes_mib))
        push(workdir / name, f"{registry}/library/{name}:latest")
        return built

    (big,), _ = build_and_push("big", (big_mib,))
    (mid,), _ = build_and_push("mid", (1,))
    _, layered = build_and_push("layered", LAYERS_MIB)
    blobs = build_and_push("many", (MANY_MIB,) * MANY)[0] if many else []
    return Content(big, mid, "library/layered:latest", layered, tuple(blobs))
