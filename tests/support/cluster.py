"""A cluster for tests/test_cluster.py: N docker-mirror nodes on loopback behind HAProxy or nginx
configured by ``docker-mirror lb-config``, an upstream registry of its own seeded with ten small
images that share layers (across images and across repository names), and clients that pull
them through the balancer with skopeo.

What the assertions need is here too: which blob digests the upstream served (its access log),
which node's cache holds which digest (``blobs/<algo>/<xx>/<hex>`` in each node's cache dir),
and whether what a client wrote is byte for byte what the upstream has (every file hashed).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support import images
from tests.support.balancers import Balancer
from tests.support.clients import skopeo, skopeo_push
from tests.support.procs import Mirror, Registry, free_port, wait_until

KiB = 1024

# Layers by name and size: the first four are carried by several images (and so by several
# repositories); every image has one layer of its own as well.
SHARED_LAYERS = {"base-a": 256 * KiB, "base-b": 192 * KiB, "runtime-x": 128 * KiB, "runtime-y": 96 * KiB}


@dataclass(frozen=True)
class Planned:
    repo: str
    tag: str
    layers: dict[str, tuple[str, ...]]      # arch -> names of shared layers under its own layer
    same_as: str = ""                       # push the image of this repository again, under this name


# Ten images, 1.2 MiB of blobs in all: base-a is in six repositories, base-b in five, runtime-x in
# four, runtime-y in two; acme/golf is an index of two architectures; mirror/alpha carries the very
# same image as library/alpha (same manifest, same blobs).
PLAN: tuple[Planned, ...] = (
    Planned("library/alpha", "1", {"amd64": ("base-a", "runtime-x")}),
    Planned("library/bravo", "1", {"amd64": ("base-a", "runtime-x")}),
    Planned("library/charlie", "2.0", {"amd64": ("base-a", "runtime-y")}),
    Planned("team/delta", "2", {"amd64": ("base-b", "runtime-y")}),
    Planned("team/echo", "latest", {"amd64": ("base-b",)}),
    Planned("team/foxtrot", "latest", {"amd64": ("base-a", "base-b")}),
    Planned("acme/golf", "1.0", {"amd64": ("base-a",), "arm64": ("base-b",)}),
    Planned("acme/hotel", "3", {"amd64": ("base-b", "runtime-x")}),
    Planned("acme/india", "v1", {"amd64": ()}),
    Planned("mirror/alpha", "1", {}, same_as="library/alpha"),
)


@dataclass
class Pullable:
    """One image of the plan as the upstream serves it."""

    repo: str
    tag: str
    image: images.Image
    digest: str = ""                                    # what the upstream answers for the tag

    @property
    def blobs(self) -> set[str]:
        """Config and layer digests: what a client GETs from /v2/<name>/blobs/."""
        return {d for d in self.image.blob_paths if d not in self.manifests}

    @property
    def manifests(self) -> set[str]:
        return {self.image.digest, *self.image.manifests.values()}


def _layer(layout: images.Layout, name: str, size: int) -> tuple[dict, str]:
    """A gzip layer of ``size`` random bytes (seeded by ``name``: the same name is the same digest)."""
    tar = images.tar_bytes({f"layers/{name}.bin": random.Random(f"cluster/{name}").randbytes(size)})
    return layout.put(gzip.compress(tar, compresslevel=0, mtime=0), images.LAYER_GZIP), images.sha256(tar)


def build(root: Path, planned: Planned) -> images.Image:
    """An OCI layout of ``planned``: per arch, its shared layers and then one of its own."""
    layout = images.Layout(root)
    image = images.Image(tag=planned.tag, digest="")
    descriptors = []
    for arch, shared in planned.layers.items():
        layers = [_layer(layout, name, SHARED_LAYERS[name]) for name in shared]
        own = f"{planned.repo}/{arch}"
        layers.append(_layer(layout, own, 32 * KiB + len(own) * 1024))
        config = {"architecture": arch, "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                  "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
                  "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"cluster test {own}"}]}
        config_desc = layout.put(json.dumps(config, sort_keys=True).encode(), images.OCI_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": images.OCI_MANIFEST, "config": config_desc,
                    "layers": [desc for desc, _ in layers]}
        desc = layout.put(json.dumps(manifest, sort_keys=True).encode(), images.OCI_MANIFEST)
        image.manifests[arch] = desc["digest"]
        image.layers[arch] = [d["digest"] for d, _ in layers]
        for digest in (config_desc["digest"], desc["digest"], *image.layers[arch]):
            image.blob_paths[digest] = layout.path(digest)
        descriptors.append({**desc, "platform": {"architecture": arch, "os": "linux"}})
    if len(descriptors) == 1:
        top = {k: v for k, v in descriptors[0].items() if k != "platform"}
    else:
        index = {"schemaVersion": 2, "mediaType": images.OCI_INDEX, "manifests": descriptors}
        top = layout.put(json.dumps(index, sort_keys=True).encode(), images.OCI_INDEX)
        image.blob_paths[top["digest"]] = layout.path(top["digest"])
    layout.tag(top, planned.tag)
    image.digest = top["digest"]
    return image


@dataclass
class ClusterUpstream:
    """Debian's docker-registry seeded with :data:`PLAN`; counts what it served from its access log."""

    registry: Registry
    pullables: list[Pullable] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def blobs(self) -> set[str]:
        return set().union(*(p.blobs for p in self.pullables))

    def mark(self) -> int:
        return self.registry.mark()

    def blob_gets(self, since: int = 0) -> Counter[str]:
        """How many times each blob digest was downloaded (GET /v2/<name>/blobs/<digest>) after ``since``."""
        counts: Counter[str] = Counter()
        for line in self.registry.requests(since, method="GET", path=r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$"):
            counts[line.rsplit("/", 1)[1]] += 1
        return counts

    def tag_heads(self, since: int = 0) -> Counter[str]:
        """How many times each ``repository:tag`` was asked for (HEAD by tag) after ``since``."""
        counts: Counter[str] = Counter()
        for line in self.registry.requests(since, method="HEAD", path=r"^/v2/.+/manifests/[^/:]+$"):
            m = re.match(r"HEAD /v2/(.+)/manifests/([^/]+)$", line)
            counts[f"{m.group(1)}:{m.group(2)}"] += 1
        return counts

    def manifests_of(self, repos: set[str]) -> set[str]:
        """``repository:digest`` of every manifest of the images of ``repos``."""
        return {f"{p.repo}:{m}" for p in self.pullables if p.repo in repos for m in p.manifests}

    def tags_of(self, repos: set[str]) -> set[str]:
        return {f"{p.repo}:{p.tag}" for p in self.pullables if p.repo in repos}

    @property
    def repos(self) -> set[str]:
        return {p.repo for p in self.pullables}

    def manifest_gets(self, since: int = 0) -> Counter[str]:
        """How many times each ``repository:reference`` manifest was downloaded after ``since``."""
        counts: Counter[str] = Counter()
        for line in self.registry.requests(since, method="GET", path=r"^/v2/.+/manifests/[^/]+$"):
            m = re.match(r"GET /v2/(.+)/manifests/([^/]+)$", line)
            counts[f"{m.group(1)}:{m.group(2)}"] += 1
        return counts


def seed(up: ClusterUpstream, work: Path) -> ClusterUpstream:
    """Push every image of :data:`PLAN` to ``up`` (started), built under ``work``."""
    built: dict[str, tuple[Path, images.Image]] = {}
    for planned in PLAN:
        if planned.same_as:
            layout, image = built[planned.same_as]
        else:
            layout = work / "img" / planned.repo.replace("/", "_")
            image = build(layout, planned)
            built[planned.repo] = (layout, image)
        skopeo_push(layout, planned.tag, f"{up.registry.address}/{planned.repo}:{planned.tag}", all_images=True)
        up.pullables.append(Pullable(planned.repo, planned.tag, image))
    for pullable in up.pullables:
        response = httpx.head(f"{up.url}/v2/{pullable.repo}/manifests/{pullable.tag}",
                              headers=[("Accept", a) for a in images.ALL_MANIFESTS])
        response.raise_for_status()
        pullable.digest = response.headers["docker-content-digest"]
        assert pullable.digest == pullable.image.digest, f"{pullable.repo} changed on the way up"
    return up


# --- the balancer's configuration


def lb_config(kind: str, listen: str, nodes: list[str]) -> str:
    """What ``docker-mirror lb-config KIND --listen LISTEN --node ...`` prints (it must succeed)."""
    argv = [sys.executable, "-m", "dockermirror", "lb-config", kind, "--listen", listen]
    for node in nodes:
        argv += ["--node", node]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"lb-config {kind} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def hand_config(kind: str, listen: str, nodes: list[str], balance: str = "hash") -> str:
    """A minimal configuration written by hand, not by ``lb-config``: blobs keyed by digest, manifests,
    tags and referrers by repository, consistent hashing, ``/healthz`` checks (haproxy). With
    ``balance="roundrobin"`` it ignores the keys: requests go round the nodes; with ``balance="uri"``
    it hashes the whole path, so a layer is routed by repository as well as digest (broken
    routing, both, that the tests must catch); ``balance="map"`` hashes the keys without consistent
    hashing (haproxy: a lost node moves most keys)."""
    if kind == "haproxy":
        algorithm = {"hash": "balance hdr(X-Docker-Mirror-Key)\n    hash-type consistent",
                     "map": "balance hdr(X-Docker-Mirror-Key)\n    hash-type map-based",
                     "uri": "balance uri\n    hash-type consistent", "roundrobin": "balance roundrobin"}[balance]
        servers = "".join(f"    server node{i + 1} {node} check inter 1s fall 2 rise 2\n"
                          for i, node in enumerate(nodes))
        return f"""global
    maxconn 512
defaults
    mode http
    timeout connect 2s
    timeout client 10m
    timeout server 10m
    timeout check 2s
    retries 3
    option redispatch 1
frontend docker_mirror
    bind {listen}
    default_backend nodes
backend nodes
    {algorithm}
    acl blob path_reg ^/v2/.+/blobs/[a-z0-9]+:[0-9a-f]+$
    http-request set-header X-Docker-Mirror-Key %[path,regsub(^/v2/.+/blobs/,)] if blob
    http-request set-header X-Docker-Mirror-Key %[path,regsub(/manifests/.*$,)] if {{ path_reg ^/v2/.+/manifests/ }}
    http-request set-header X-Docker-Mirror-Key %[path,regsub(/tags/.*$,)] if {{ path_reg ^/v2/.+/tags/ }}
    http-request set-header X-Docker-Mirror-Key %[path,regsub(/referrers/.*$,)] if {{ path_reg ^/v2/.+/referrers/ }}
    option httpchk GET /healthz
{servers}"""
    algorithm = {"hash": "hash $docker_mirror_key consistent;", "map": "hash $docker_mirror_key;",
                 "uri": "hash $uri consistent;", "roundrobin": ""}[balance]
    servers = "".join(f"    server {node} max_fails=1 fail_timeout=10s;\n" for node in nodes)
    return f"""map $uri $docker_mirror_key {{
    "~^/v2/.+/blobs/(?<digest>[a-z0-9]+:[0-9a-f]+)$" $digest;
    "~^/v2/(?<name>.+)/(manifests|tags|referrers)/" $arg_ns/$name;
    default "";
}}
upstream docker_mirror_nodes {{
    {algorithm}
{servers}}}
server {{
    listen {listen};
    client_max_body_size 0;
    proxy_buffering off;
    proxy_request_buffering off;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;
    proxy_next_upstream error timeout http_502 http_503;
    proxy_read_timeout 600s;
    location / {{
        proxy_pass http://docker_mirror_nodes;
    }}
}}
"""


# --- the cluster


class Cluster:
    """``size`` docker-mirror nodes (caches of their own, one upstream) and a balancer of ``kind``
    in front, all on 127.0.0.1. :meth:`stop` stops everything that was started, by PID."""

    def __init__(self, workdir: Path, upstream: ClusterUpstream, kind: str, size: int = 3,
                 configure=None) -> None:
        """``configure(kind, listen, nodes)``: the balancer's configuration (default :func:`lb_config`)."""
        self.workdir = workdir
        self.configure = configure or lb_config
        self.upstream = upstream
        self.kind = kind
        # tags are trusted for an hour: within a test, a tag is asked of the upstream only by a node
        # that has not seen it (however slow the machine)
        config = {"upstream": {"url": upstream.url, "registry": "docker.io"}, "cache": {"tag_ttl": "1h"}}
        self.nodes = [Mirror(workdir, {**copy.deepcopy(config), "node": f"node{i + 1}"}, name=f"node{i + 1}")
                      for i in range(size)]
        self.port = free_port()
        self.balancer: Balancer | None = None
        self.config_text = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        self.config_text = self.configure(self.kind, self.address, [node.address for node in self.nodes])
        self.balancer = Balancer(self.kind, self.config_text, self.workdir / f"{self.kind}")
        self.balancer.start()
        return self

    def stop(self) -> None:
        if self.balancer is not None:
            self.balancer.stop()
        for node in self.nodes:
            node.stop()

    def live(self) -> list[Mirror]:
        return [node for node in self.nodes if node.running()]

    def held(self, node: Mirror, digests: set[str]) -> set[str]:
        """Those of ``digests`` committed to ``node``'s cache."""
        return {d for d in digests if node.blob_file(d).exists()}

    def holders(self, digest: str, nodes: list[Mirror] | None = None) -> list[str]:
        """Names of the nodes (of ``nodes``; default all) whose cache holds ``digest``."""
        return [node.config_path.stem for node in (nodes or self.nodes) if node.blob_file(digest).exists()]

    def wait_stored(self, digests: set[str], nodes: list[Mirror], timeout: float = 30) -> None:
        """Wait until every digest is committed somewhere among ``nodes`` (a response ends when the
        client has its bytes; the rename into blobs/ follows a moment later)."""
        try:
            wait_until(lambda: all(self.holders(d, nodes) for d in digests), timeout, what="blobs committed")
        except TimeoutError:
            pass    # the caller's assertion says which

    @staticmethod
    def manifest_repos(node: Mirror) -> set[str]:
        """The repositories whose manifests ``node`` answered (its request log)."""
        return set(re.findall(r' access: \S+ "(?:GET|HEAD) /v2/(.+?)/manifests/', node.log_text()))

    @staticmethod
    def blobs_served(node: Mirror, since: int = 0) -> set[str]:
        """The blob digests ``node`` answered a GET for (its request log, from character ``since``)."""
        return set(re.findall(r' access: \S+ "GET /v2/.+?/blobs/(sha256:[0-9a-f]{64})"', node.log_text()[since:]))

    def back_in_rotation(self, node: Mirror, pullable: Pullable, digest: str, timeout: float = 60) -> None:
        """Wait until the balancer sends ``node`` its keys again: HEAD ``digest`` (one of ``node``'s
        blobs, cached by whichever node answers: the upstream is not asked) through the balancer until
        ``node`` is the one that answers (its health checks passed; nginx: its fail_timeout is over):
        its ``Docker-Mirror-Node`` response header says so."""
        url = f"http://{self.address}/v2/{pullable.repo}/blobs/{digest}"

        def answered_by_node() -> bool:
            return httpx.head(url, timeout=30).headers.get("docker-mirror-node") == node.config["node"]

        wait_until(answered_by_node, timeout, interval=0.5, what=f"{node.config_path.stem} back behind the balancer")

    def logs(self) -> str:
        """Every node's and the balancer's log tail, for a failure message."""
        parts = [f"--- {node.config_path.stem} ({node.address})\n{node.log_text()[-3000:]}" for node in self.nodes]
        if self.balancer is not None:
            parts.append(f"--- {self.kind}\n{self.balancer.log_text()[-3000:]}{self.balancer.error_log()[-3000:]}")
        return "\n".join(parts)


# --- clients


def pull(address: str, pullable: Pullable, dest: Path) -> None:
    """skopeo copy --all of ``pullable`` from ``address`` (plain HTTP) into ``dir:dest``."""
    skopeo("copy", "--quiet", "--all", "--src-tls-verify=false", f"docker://{address}/{pullable.repo}:{pullable.tag}",
           f"dir:{dest}", parent=dest.parent, timeout=180)


def verify_pulled(pullable: Pullable, dest: Path) -> list[str]:
    """What is wrong with what skopeo wrote for ``pullable``: each file's bytes must hash to its
    name (blobs, instance manifests), the top manifest to the upstream's digest, and every blob and
    manifest of the image must be there. Empty: all is well."""
    problems = []
    top = "sha256:" + hashlib.sha256((dest / "manifest.json").read_bytes()).hexdigest()
    if top != pullable.digest:
        problems.append(f"{pullable.repo}:{pullable.tag}: manifest {top}, upstream has {pullable.digest}")
    blobs, manifests = set(), {top}
    for path in dest.iterdir():
        if path.name in ("manifest.json", "version"):
            continue
        name = path.name.removesuffix(".manifest.json")
        digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != f"sha256:{name}":
            problems.append(f"{pullable.repo}: {path.name} hashes to {digest}")
        (manifests if path.name.endswith(".manifest.json") else blobs).add(f"sha256:{name}")
    if blobs != pullable.blobs:
        problems.append(f"{pullable.repo}: blobs {sorted(blobs ^ pullable.blobs)} differ from the upstream's")
    if manifests != pullable.manifests:
        problems.append(f"{pullable.repo}: manifests {sorted(manifests ^ pullable.manifests)} differ "
                        "from the upstream's")
    return problems


def pull_all(address: str, pullables: list[Pullable], workdir: Path, clients: int = 3) -> list[str]:
    """``clients`` clients pull every image at once, each in an order of its own, each into fresh
    ``dir:`` destinations under ``workdir``; returns every failure and every wrong byte (empty: all
    pulled, all equal to the upstream's)."""

    def client(number: int) -> list[str]:
        order = list(pullables)
        random.Random(number).shuffle(order)
        problems = []
        for pullable in order:
            dest = workdir / f"client{number}" / pullable.repo.replace("/", "_")
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                pull(address, pullable, dest)
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                lines = str(exc).strip().splitlines()           # skopeo's last line says why
                problems.append(f"client {number}: pull of {pullable.repo}:{pullable.tag} failed: {lines[-1]}")
                continue
            problems += [f"client {number}: {p}" for p in verify_pulled(pullable, dest)]
        return problems

    with ThreadPoolExecutor(clients) as pool:
        return [problem for found in pool.map(client, range(1, clients + 1)) for problem in found]
