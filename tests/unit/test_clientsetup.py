"""``docker-mirror client-setup`` for one and several upstreams: every file its steps write
parses (TOML for hosts.toml and registries.conf, JSON for daemon.json) and says what it should."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from dockermirror import cli
from dockermirror.service.clientsetup import instructions
from tests.support.pasted import heredocs

HOST = "mirror.example.org:5000"
CA = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----"
THREE = [("docker.io", ()), ("ghcr.io", ("ghcr.example.org",)), ("quay.io", ())]
CONF = "/etc/containers/registries.conf.d/50-docker-mirror.conf"


def setup(registries, *, tls: bool = False) -> tuple[str, dict[str, str]]:
    out = instructions(HOST, tls=tls, ca_pem=CA if tls else None, ca_path=Path("/etc/pki/docker-mirror/ca.crt"),
                       registries=registries)
    return out, heredocs(out)


def hosts_toml(files: dict[str, str], name: str) -> dict:
    return tomllib.loads(files[f"/etc/containerd/certs.d/{name}/hosts.toml"])


def mirrors(files: dict[str, str]) -> dict[str, dict]:
    """registries.conf: {prefix: the block}, each with exactly one mirror."""
    blocks = tomllib.loads(files[CONF])["registry"]
    assert all(len(block["mirror"]) == 1 for block in blocks)
    assert len({block["prefix"] for block in blocks}) == len(blocks)
    return {block["prefix"]: block for block in blocks}


def test_one_upstream_plain_http():
    out, files = setup([("docker.io", ())])
    assert json.loads(files["/etc/docker/daemon.json"]) == {
        "registry-mirrors": [f"http://{HOST}"], "insecure-registries": [HOST]}
    assert hosts_toml(files, "docker.io") == {
        "server": "https://registry-1.docker.io",
        "host": {f"http://{HOST}": {"capabilities": ["pull", "resolve"]}}}
    assert hosts_toml(files, "_default") == {"host": {f"http://{HOST}": {"capabilities": ["pull", "resolve"]}}}
    assert mirrors(files) == {"docker.io": {"prefix": "docker.io", "location": "docker.io",
                                            "mirror": [{"location": f"{HOST}/docker.io", "insecure": True}]}}
    assert set(files) == {"/etc/docker/daemon.json", "/etc/containerd/certs.d/docker.io/hosts.toml",
                          "/etc/containerd/certs.d/_default/hosts.toml", CONF}
    assert "systemctl restart docker" in out and "systemctl restart containerd" in out
    assert "can only mirror Docker Hub" not in out


def test_one_upstream_tls_carries_the_ca():
    out, files = setup([("docker.io", ())], tls=True)
    assert json.loads(files["/etc/docker/daemon.json"]) == {"registry-mirrors": [f"https://{HOST}"]}
    for path in (f"/etc/docker/certs.d/{HOST}/ca.crt", f"/etc/containers/certs.d/{HOST}/ca.crt",
                 "/usr/local/share/ca-certificates/docker-mirror.crt"):     # Debian, the default
        assert files[path] == CA + "\n"
    for name in ("docker.io", "_default"):
        host = hosts_toml(files, name)["host"][f"https://{HOST}"]
        assert files[host["ca"]] == CA + "\n"       # the file it names is written too
    block = mirrors(files)["docker.io"]
    assert block["mirror"] == [{"location": f"{HOST}/docker.io"}]      # no insecure = true
    assert "update-ca-certificates" in out and "update-ca-trust" not in out


def test_three_upstreams():
    out, files = setup(THREE)
    assert out.startswith(f"# docker-mirror at http://{HOST}, mirroring docker.io (the default), ghcr.io, quay.io\n")
    servers = {"docker.io": "https://registry-1.docker.io", "ghcr.io": "https://ghcr.io",
               "ghcr.example.org": "https://ghcr.example.org", "quay.io": "https://quay.io"}
    for name, server in servers.items():
        assert hosts_toml(files, name) == {
            "server": server, "host": {f"http://{HOST}": {"capabilities": ["pull", "resolve"]}}}
    # one file for every registry: no server (containerd falls back to the registry itself)
    assert hosts_toml(files, "_default") == {"host": {f"http://{HOST}": {"capabilities": ["pull", "resolve"]}}}
    assert "404" in out and "falls back" in out
    blocks = mirrors(files)
    assert list(blocks) == ["docker.io", "ghcr.io", "ghcr.example.org", "quay.io"]
    for prefix, block in blocks.items():
        assert block["location"] == prefix
        # the mirror routes by the path prefix; an alias goes to its upstream's name
        key = "ghcr.io" if prefix == "ghcr.example.org" else prefix
        assert block["mirror"] == [{"location": f"{HOST}/{key}", "insecure": True}]
    assert json.loads(files["/etc/docker/daemon.json"]) == {
        "registry-mirrors": [f"http://{HOST}"], "insecure-registries": [HOST]}
    assert f"docker pull {HOST}/ghcr.io/<repository>" in out
    assert f"docker pull {HOST}/quay.io/<repository>" in out


def test_three_upstreams_tls_one_ca_copy_per_client():
    _, files = setup(THREE, tls=True)
    cas = {host["ca"] for name in ("docker.io", "ghcr.io", "ghcr.example.org", "quay.io", "_default")
           for host in hosts_toml(files, name)["host"].values()}
    assert len(cas) == 1 and files[cas.pop()] == CA + "\n"
    assert all("insecure" not in block["mirror"][0] for block in mirrors(files).values())


@pytest.mark.parametrize("tls", [False, True])
def test_dockerd_only_when_docker_hub_is_the_default(tls):
    out, files = setup([("ghcr.io", ()), ("docker.io", ())], tls=tls)
    assert "dockerd can only mirror Docker Hub" in out and "upstream is ghcr.io" in out
    daemon = files.get("/etc/docker/daemon.json")
    if tls:
        assert daemon is None                      # nothing to set: the CA is trusted via certs.d
        assert files[f"/etc/docker/certs.d/{HOST}/ca.crt"] == CA + "\n"
    else:
        assert json.loads(daemon) == {"insecure-registries": [HOST]}     # for docker pull HOST/ghcr.io/...
    assert f"docker pull {HOST}/ghcr.io/<repository>" in out
    assert f"docker pull {HOST}/docker.io/<repository>" in out
    # containerd and podman still get every registry
    assert set(mirrors(files)) == {"ghcr.io", "docker.io"}
    assert hosts_toml(files, "docker.io")["server"] == "https://registry-1.docker.io"


def test_no_docker_hub_at_all():
    out, files = setup([("registry.example.org", ())])
    assert "this mirror does not serve docker.io" in out
    assert "registry-mirrors" not in files["/etc/docker/daemon.json"]
    assert hosts_toml(files, "registry.example.org")["server"] == "https://registry.example.org"
    assert mirrors(files)["registry.example.org"]["mirror"][0]["location"] == f"{HOST}/registry.example.org"


def test_registry_with_a_port():
    """containerd takes any registry name; a repository path cannot carry a port, so podman's
    prefixed location uses an alias without one, and with none there is no block but a hint."""
    _, files = setup([("docker.io", ()), ("registry.example.org:5000", ("registry.example.org",))])
    assert hosts_toml(files, "registry.example.org:5000")["server"] == "https://registry.example.org:5000"
    blocks = mirrors(files)
    assert blocks["registry.example.org:5000"]["mirror"][0]["location"] == f"{HOST}/registry.example.org"
    assert blocks["registry.example.org"]["mirror"][0]["location"] == f"{HOST}/registry.example.org"

    out, files = setup([("docker.io", ()), ("registry.example.org:5000", ())])
    assert list(mirrors(files)) == ["docker.io"]
    assert "registry.example.org:5000: a registry name with a port cannot be a path prefix" in out
    assert hosts_toml(files, "registry.example.org:5000")["server"] == "https://registry.example.org:5000"


def test_the_command_prints_every_configured_upstream(tmp_path: Path, capsys):
    config = tmp_path / "config.yml"
    config.write_text("tls:\n  enabled: false\nupstreams:\n"
                      "  - {registry: docker.io, url: 'http://127.0.0.1:1'}\n"
                      "  - {registry: ghcr.io, url: 'http://127.0.0.1:2', aliases: [ghcr.example.org]}\n"
                      "  - {registry: quay.io, url: 'http://127.0.0.1:3'}\n")
    assert cli.main(["client-setup", "--config", str(config), "--host", HOST]) == 0
    files = heredocs(capsys.readouterr().out)
    for name in ("docker.io", "ghcr.io", "ghcr.example.org", "quay.io", "_default"):
        assert f"http://{HOST}" in hosts_toml(files, name)["host"]
    assert list(mirrors(files)) == ["docker.io", "ghcr.io", "ghcr.example.org", "quay.io"]


def test_containerd_falls_back_to_the_configured_upstream_url():
    """A plain-HTTP private registry, and an alias without the port: containerd's server is the
    URL the mirror uses for that upstream, not https://<name>."""
    text = instructions("mirror.example:5000", tls=False, ca_pem=None, ca_path=Path("/ca.crt"),
                        registries=[("docker.io", ()), ("registry.example.org:5000", ("registry.example.org",))],
                        urls={"docker.io": "https://registry-1.docker.io",
                              "registry.example.org:5000": "http://registry.example.org:5000",
                              "registry.example.org": "http://registry.example.org:5000"})
    files = heredocs(text)
    for name in ("registry.example.org:5000", "registry.example.org"):
        assert tomllib.loads(files[f"/etc/containerd/certs.d/{name}/hosts.toml"])["server"] == \
            "http://registry.example.org:5000"
    assert tomllib.loads(files["/etc/containerd/certs.d/docker.io/hosts.toml"])["server"] == \
        "https://registry-1.docker.io"
