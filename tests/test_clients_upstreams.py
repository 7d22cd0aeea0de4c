"""Real clients set up by pasting ``docker-mirror client-setup``'s output pull from three
upstreams through one mirror (issue 11): docker.io (the default), ghcr.test (bearer tokens)
and registry.test:5443 (TLS from a private CA); see tests/support/upstreams.py.

client-setup runs against the mirror's own configuration; its steps are run with ``sh`` as
pasted (tests/support/pasted.py, /etc moved to a scratch directory) and the files they wrote
become the client's /etc inside its sandbox. The test registries' names are pinned to
127.0.0.1 there, like Docker Hub's, so a client that falls back from the mirror to "the
registry itself" fails at once on loopback: a passing pull came through the mirror, as the
mirror's request log shows too. Each pulled digest must equal the upstream's.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from tests.support.clients import (
    Containerd,
    Dockerd,
    Podman,
    client_env,
    client_sandbox,
    dir_manifest_digest,
    skopeo,
    skopeo_copy,
)
from tests.support.pasted import paste
from tests.support.procs import Mirror
from tests.support.upstreams import DOCKER_IO, GHCR, PRIVATE, ThreeUpstreams

# registry.test:5443's name has a port, which cannot be a path prefix (podman, skopeo): the
# mirror knows it by an alias too
PRIVATE_ALIAS = "registry.test"
PINNED = ("ghcr.test", "registry.test")
PULLS = [  # (upstream, seeded name, the reference a client uses)
    (DOCKER_IO, "tool", "docker.io/acme/tool:1.0"),
    (GHCR, "gadget", "ghcr.test/acme/gadget:latest"),          # an OCI index (two platforms)
    (PRIVATE, "app", "registry.test:5443/team/app:v1"),
]
_ACCESS = re.compile(r'"(?:GET|HEAD) (/v2/[^"?\s]*)(?:\?([^"\s]*))?" \d+ .* upstream=(\S+) ')


def mirror_of_three(make_mirror, three_upstreams: ThreeUpstreams, pki=None) -> Mirror:
    """A mirror of the three upstreams; with ``pki``, over TLS (the CA in client-setup's steps)."""
    upstreams = three_upstreams.config(**{PRIVATE: {"aliases": [PRIVATE_ALIAS]}})
    if pki is None:
        return make_mirror(upstreams=upstreams)
    return make_mirror(upstreams=upstreams, tls={"certificate": str(pki.certificate), "key": str(pki.key),
                                                  "ca": str(pki.ca)})


@pytest.fixture
def served(make_mirror, three_upstreams: ThreeUpstreams, pki) -> Mirror:
    return mirror_of_three(make_mirror, three_upstreams, pki)


def setup_steps(mirror: Mirror, *options: str) -> str:
    """client-setup's output for ``mirror``; for Debian, the clients here, unless ``options`` name
    a target (without ``--for`` it would depend on the machine the tests run on)."""
    target = () if "--for" in options else ("--for", "debian")
    result = subprocess.run([sys.executable, "-m", "dockermirror", "client-setup", "--config",
                             str(mirror.config_path), "--host", mirror.address, *target, *options],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def pasted(mirror: Mirror, tmp_path: Path, steps: str | None = None,
           before: dict[str, str] | None = None) -> dict[str, str]:
    """client-setup for ``mirror``, run as pasted: {path under /etc, relative: content};
    ``before``: files already in that /etc (relative paths)."""
    for path, content in (before or {}).items():
        (tmp_path / "pasted" / "etc" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pasted" / "etc" / path).write_text(content)
    files, _ = paste(steps or setup_steps(mirror), tmp_path / "pasted")
    return {path.removeprefix("/etc/"): content for path, content in files.items()}


def only(files: dict[str, str], *prefixes: str) -> dict[str, str]:
    return {path: content for path, content in files.items() if path.startswith(prefixes)}


def requests(mirror: Mirror) -> list[tuple[str, dict, str]]:
    """(path, query, upstream) of each request in the mirror's log."""
    found = []
    for line in mirror.access_lines("/v2/."):
        match = _ACCESS.search(line)
        if match:
            found.append((match.group(1), parse_qs(match.group(2) or ""), match.group(3)))
    return found


def test_containerd_default_hosts_toml_pulls_from_every_upstream(served, three_upstreams, tmp_path):
    files = pasted(served, tmp_path)
    # only the one file for every registry (and the CA it names)
    etc = only(files, "containerd/certs.d/_default/", "containerd/docker-mirror-ca.crt")
    assert "containerd/certs.d/_default/hosts.toml" in etc
    daemon = Containerd(etc=etc, pin=PINNED)
    daemon.start()
    try:
        for key, name, ref in PULLS:
            daemon.ctr("images", "pull", "--hosts-dir", "/etc/containerd/certs.d", ref)
            assert daemon.image_digest(ref) == three_upstreams.site(key).seeded[name].digest, ref
    finally:
        daemon.stop()
    # containerd named each registry with ?ns=, and the mirror sent each to that upstream
    seen = {(query["ns"][0], upstream) for path, query, upstream in requests(served) if "ns" in query}
    assert seen == {(DOCKER_IO, DOCKER_IO), (GHCR, GHCR), (PRIVATE, PRIVATE)}


def test_podman_prefixed_mirror_locations(served, three_upstreams, tmp_path):
    files = pasted(served, tmp_path)
    podman = Podman(etc=only(files, "containers/"), pin=PINNED)
    try:
        for key, name, ref in PULLS[:2]:
            podman("pull", ref)
            repository = ref.rsplit(":", 1)[0]
            assert f"{repository}@{three_upstreams.site(key).seeded[name].digest}" in podman.repo_digests(ref)
    finally:
        podman.cleanup()
    # the registry came as a path prefix
    paths = {(path.split("/manifests/")[0], upstream) for path, _, upstream in requests(served)
             if "/manifests/" in path}
    assert paths == {("/v2/docker.io/acme/tool", DOCKER_IO), ("/v2/ghcr.test/acme/gadget", GHCR)}


def test_skopeo_by_prefix(served, three_upstreams, pki, tmp_path):
    files = only(pasted(served, tmp_path), "containers/")
    for key, name, ref in PULLS:
        dest = tmp_path / name
        skopeo("copy", "--quiet", "--all", f"docker://{ref}", f"dir:{dest}", parent=tmp_path, etc=files, pin=PINNED)
        assert dir_manifest_digest(dest) == three_upstreams.site(key).seeded[name].digest, ref
    # and named in the mirror's path directly (what client-setup shows for docker pull)
    direct = skopeo_copy(f"{served.address}/{GHCR}/acme/widget:1.0", tmp_path / "widget", cert_dir=pki.cert_dir)
    assert dir_manifest_digest(direct) == three_upstreams.ghcr.seeded["widget"].digest
    routed = {(path.split("/manifests/")[0], upstream) for path, _, upstream in requests(served)
              if "/manifests/" in path}
    assert routed == {("/v2/docker.io/acme/tool", DOCKER_IO), ("/v2/ghcr.test/acme/gadget", GHCR),
                      (f"/v2/{PRIVATE_ALIAS}/team/app", PRIVATE), ("/v2/ghcr.test/acme/widget", GHCR)}


def test_dockerd_mirrors_docker_hub_from_the_default_upstream(make_mirror, three_upstreams, tmp_path):
    served = mirror_of_three(make_mirror, three_upstreams)      # plain HTTP: insecure-registries
    steps = setup_steps(served)
    files = pasted(served, tmp_path, steps)
    # what client-setup says dockerd can do for the other registries: name them in the mirror's path
    hint = re.search(rf"^#   docker pull ({re.escape(served.address)}/{GHCR})/<repository>", steps, re.MULTILINE)
    assert hint, steps
    widget = f"{hint.group(1)}/acme/widget:1.0"
    daemon = Dockerd(None, etc=only(files, "docker/"))
    daemon.start()
    try:
        assert served.url in daemon.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout
        for ref, digest in (("hello", three_upstreams.docker.seeded["hello"].digest),
                            (widget, three_upstreams.ghcr.seeded["widget"].digest)):
            daemon.docker("pull", ref)
            digests = daemon.docker("image", "inspect", "--format", "{{json .RepoDigests}}", ref).stdout
            assert f"{ref.rsplit(':', 1)[0]}@{digest}" in digests, ref
    finally:
        daemon.stop()
    routed = {(path, upstream) for path, _, upstream in requests(served) if "/manifests/" in path and ":" not in path}
    # dockerd names no registry for Docker Hub names: the mirror's default upstream, with library/
    assert routed == {("/v2/library/hello/manifests/latest", DOCKER_IO),
                      ("/v2/ghcr.test/acme/widget/manifests/1.0", GHCR)}


def test_skopeo_with_the_el7_registries_conf(served, three_upstreams, tmp_path):
    """client-setup --for el7 on a client with CentOS 7's v1 registries.conf: the v2 file its steps
    write in its place (no drop-in: podman 1.6 reads none) parses in today's containers/image
    (skopeo 1.9) and sends each registry through the mirror. (The sandbox hides
    registries.conf.d, as podman 1.6 would not read it.)"""
    from tests.unit.test_clientsetup_targets import EL7_V1, assert_podman_1_6_reads

    files = pasted(served, tmp_path, setup_steps(served, "--for", "el7"), before={"containers/registries.conf": EL7_V1})
    assert "containers/registries.conf.d/50-docker-mirror.conf" not in files
    assert files["containers/registries.conf.before-docker-mirror"] == EL7_V1
    assert_podman_1_6_reads(files["containers/registries.conf"])
    etc = only(files, "containers/registries.conf", "containers/certs.d/")
    for key, name, ref in PULLS[:2]:
        dest = tmp_path / name
        skopeo("copy", "--quiet", "--all", f"docker://{ref}", f"dir:{dest}", parent=tmp_path, etc=etc, pin=PINNED)
        assert dir_manifest_digest(dest) == three_upstreams.site(key).seeded[name].digest, ref
    routed = {(path.split("/manifests/")[0], upstream) for path, _, upstream in requests(served)
              if "/manifests/" in path}
    assert routed == {("/v2/docker.io/acme/tool", DOCKER_IO), ("/v2/ghcr.test/acme/gadget", GHCR)}


def skopeo_reads(registries_conf: str, parent: Path) -> str:
    """skopeo's complaint about ``registries_conf`` as /etc/containers/registries.conf ("" if none):
    it loads the file before anything else, then fails at once on a closed loopback port."""
    sandbox = client_sandbox(parent, {"containers/registries.conf": registries_conf})
    try:
        result = subprocess.run(sandbox.argv(["skopeo", "inspect", "docker://127.0.0.1:9/acme/tool:1.0"]),
                                capture_output=True, text=True, timeout=120, env=client_env(sandbox.dir))
    finally:
        sandbox.cleanup()
    assert result.returncode != 0 and "127.0.0.1:9" in result.stderr, result.stderr
    return result.stderr if "registries configuration" in result.stderr else ""


def test_el7_registries_conf_conversions_parse_in_containers_image(tmp_path):
    """Each file EL7's pasted steps write (from the shipped v1 file, with insecure and blocked
    registries, one registry both, from none) is read by today's containers/image; the v1 file with the entries
    merely added, as a naive edit would do, is refused: the parser here is the real one."""
    from tests.support.pasted import run_pasted
    from tests.unit.test_clientsetup_targets import EL7_V1, steps

    insecure = EL7_V1.replace("[registries.insecure]\nregistries = []",
                              "[registries.insecure]\nregistries = ['registry.internal:5000']")
    insecure = insecure.replace("[registries.block]\nregistries = []",
                                "[registries.block]\nregistries = ['evil.example']")
    # one registry both insecure and blocked: one entry with both (two entries would be "defined multiple times")
    both = insecure.replace("['evil.example']", "['evil.example', 'registry.internal:5000']")
    for number, before in enumerate((EL7_V1, insecure, None, both)):
        root = tmp_path / f"pasted{number}"
        if before is not None:
            (root / "etc/containers").mkdir(parents=True)
            (root / "etc/containers/registries.conf").write_text(before)
        written = run_pasted(steps("el7", tls=number != 1), root).files
        assert written["/etc/containers/registries.conf"].startswith("# written by docker-mirror")
        assert skopeo_reads(written["/etc/containers/registries.conf"], tmp_path) == ""
    conf = written["/etc/containers/registries.conf"]
    assert 'location = "registry.internal:5000"\ninsecure = true\nblocked = true\n' in conf
    split = conf.replace('insecure = true\nblocked = true\n',
                         'insecure = true\n\n[[registry]]\nlocation = "registry.internal:5000"\nblocked = true\n')
    assert "defined multiple times" in skopeo_reads(split, tmp_path)
    mixed = EL7_V1 + "\n" + written["/etc/containers/docker-mirror.registries.conf"]
    assert "mixing sysregistry v1/v2 is not supported" in skopeo_reads(mixed, tmp_path)
