"""Build small, real OCI images as image-layout directories (for ``skopeo copy oci:``).

Everything is deterministic: fixed mtimes, gzip without timestamps, seeded random
data, so the same call always yields the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

MTIME = 1700000000
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

ALL_MANIFESTS = [  # what docker and c/image send: one Accept line per type
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_bytes(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MTIME, 0o755 if name.startswith("bin/") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class Image:
    """What was built: digests by role, for assertions."""

    tag: str
    digest: str                                          # what the tag points at
    manifests: dict[str, str] = field(default_factory=dict)   # arch -> manifest digest
    layers: dict[str, list[str]] = field(default_factory=dict)  # arch -> layer digests
    blob_paths: dict[str, Path] = field(default_factory=dict)   # digest -> file in the layout


class Layout:
    """An OCI image-layout directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.index: list[dict] = []

    def put(self, data: bytes, media_type: str) -> dict:
        digest = sha256(data)
        (self.blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def path(self, digest: str) -> Path:
        return self.blobs / digest.removeprefix("sha256:")

    def tag(self, descriptor: dict, tag: str) -> None:
        self.index.append({**descriptor, "annotations": {"org.opencontainers.image.ref.name": tag}})
        (self.root / "index.json").write_text(json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.index}))


def build(root: Path, name: str, tag: str = "latest", archs: tuple[str, ...] = ("amd64",),
          random_bytes: int = 0, seed: str = "", force_index: bool = False, shared: str = "") -> Image:
    """An image with one small gzip layer per arch, plus an optional layer of random data.

    ``shared``: a first layer whose content depends only on this string, so images
    built with the same value share it (same digest).
    """
    layout = Layout(root)
    image = Image(tag=tag, digest="")
    manifests = []
    for arch in archs:
        files = {
            "etc/os-release": f"NAME={name}\nID={name}\n".encode(),
            "hello.txt": f"hello from {name} on {arch} ({seed})\n".encode(),
            "bin/hello": b"#!/bin/sh\necho hello\n",
        }
        small_tar = tar_bytes(files)
        layers = []
        if shared:
            base_tar = tar_bytes({"etc/base.txt": random.Random(shared).randbytes(4096)})
            layers.append((layout.put(gzip.compress(base_tar, mtime=0), LAYER_GZIP), sha256(base_tar)))
        layers.append((layout.put(gzip.compress(small_tar, mtime=0), LAYER_GZIP), sha256(small_tar)))
        if random_bytes:
            data = random.Random(f"{name}/{seed}").randbytes(random_bytes)
            big_tar = tar_bytes({"data/random.bin": data})
            # stored, not deflated: quick to build, and skopeo keeps gzip layers as they are
            layers.append((layout.put(gzip.compress(big_tar, compresslevel=0, mtime=0), LAYER_GZIP),
                           sha256(big_tar)))
        config = {
            "architecture": arch, "os": "linux",
            "config": {"Cmd": ["/bin/hello"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
            "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"test image {name}"}],
        }
        config_desc = layout.put(json.dumps(config, sort_keys=True).encode(), OCI_CONFIG)
        manifest = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc,
            "layers": [desc for desc, _ in layers],
        }
        manifest_desc = layout.put(json.dumps(manifest, sort_keys=True).encode(), OCI_MANIFEST)
        manifest_desc["platform"] = {"architecture": arch, "os": "linux",
                                     **({"variant": "v8"} if arch == "arm64" else {})}
        manifests.append(manifest_desc)
        image.manifests[arch] = manifest_desc["digest"]
        image.layers[arch] = [desc["digest"] for desc, _ in layers]
        for digest in [config_desc["digest"], manifest_desc["digest"], *image.layers[arch]]:
            image.blob_paths[digest] = layout.path(digest)
    if len(manifests) == 1 and not force_index:
        top = {k: v for k, v in manifests[0].items() if k != "platform"}
    else:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        top = layout.put(json.dumps(index, sort_keys=True).encode(), OCI_INDEX)
        image.blob_paths[top["digest"]] = layout.path(top["digest"])
    layout.tag(top, tag)
    image.digest = top["digest"]
    return image
