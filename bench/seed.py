"""The upstream's content: a big single-layer image, a 1 MiB one, and a multi-layer one.

Images are built as OCI layouts by the test suite's builder and pushed with skopeo.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.images import LAYER_GZIP, OCI_CONFIG, OCI_MANIFEST, Layout, build, sha256, tar_bytes

MiB = 1024 * 1024
LAYERS_MIB = (40, 24, 16, 10, 6, 3, 1)  # the image the skopeo scenario pulls


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


def layered_image(root: Path, sizes_mib: tuple[int, ...]) -> dict[str, int]:
    """An OCI layout tagged ``latest`` with one random (stored, not deflated) layer per size."""
    layout = Layout(root)
    layers = []
    for i, size in enumerate(sizes_mib):
        tar = tar_bytes({f"layer{i}/data.bin": random.Random(f"layered/{i}").randbytes(size * MiB)})
        layers.append((layout.put(gzip.compress(tar, compresslevel=0, mtime=0), LAYER_GZIP), sha256(tar)))
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]}}
    config_desc = layout.put(json.dumps(config, sort_keys=True).encode(), OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc,
                "layers": [desc for desc, _ in layers]}
    layout.tag(layout.put(json.dumps(manifest, sort_keys=True).encode(), OCI_MANIFEST), "latest")
    return {desc["digest"]: desc["size"] for desc in (config_desc, *(desc for desc, _ in layers))}


def push(layout: Path, dest: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false",
                    f"oci:{layout}:latest", f"docker://{dest}"], check=True, capture_output=True, timeout=600)


def _random_layer(root: Path, name: str, size: int) -> Blob:
    image = build(root, name, random_bytes=size, seed="bench")
    digest = image.layers["amd64"][-1]
    file = image.blob_paths[digest]
    return Blob(f"library/{name}", digest, file.stat().st_size, file)


def seed(registry: str, workdir: Path, big_mib: int) -> Content:
    """Build the images under ``workdir`` and push them to ``registry`` (HOST:PORT)."""
    big = _random_layer(workdir / "big", "big", big_mib * MiB)
    push(workdir / "big", f"{registry}/{big.repo}:latest")
    mid = _random_layer(workdir / "mid", "mid", MiB)
    push(workdir / "mid", f"{registry}/{mid.repo}:latest")
    layered_blobs = layered_image(workdir / "layered", LAYERS_MIB)
    push(workdir / "layered", f"{registry}/library/layered:latest")
    return Content(big, mid, "library/layered:latest", layered_blobs)
