"""``docker-mirror lb-config``: the routing key, the flags a user gets wrong, and the examples in
docs/cluster/ (each is the command's output for the command in its first line: a change to the
generator that is not regenerated into the examples fails here). The engines' own checks and a
live balancer are in tests/test_lbconfig_engines.py."""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dockermirror import cli
from dockermirror.service import lbconfig
from dockermirror.service.lbconfig import route_key

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "cluster"
SHA256 = "sha256:" + hashlib.sha256(b"layer").hexdigest()
SHA512 = "sha512:" + hashlib.sha512(b"layer").hexdigest()


# --- the routing key --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [f"/v2/library/alpine/blobs/{SHA256}", f"/v2/a/b/c/blobs/{SHA256}",
                                  f"/v2/org/blobs/x/blobs/{SHA256}", f"/v2/blobs/blobs/{SHA256}",
                                  f"/v2/x/manifests/y/blobs/{SHA256}"])
def test_a_blob_is_keyed_by_its_digest_whatever_repository_names_it(path: str):
    assert route_key(path) == SHA256
    assert route_key(path, "ns=docker.io") == SHA256          # ?ns= does not split a digest


def test_other_digest_algorithms_are_digests_too():
    assert route_key(f"/v2/a/blobs/{SHA512}") == SHA512
    assert route_key("/v2/a/blobs/multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8") == \
        "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8"


@pytest.mark.parametrize("path", ["/v2/a/blobs/SHA256:ABC", "/v2/a/blobs/sha256", "/v2/a/blobs/:abc",
                                  "/v2/a/blobs/sha256:", "/v2/a/blobs/sha256:ab/cd", "/v2/a/blobs/uploads/",
                                  "/v2/a/blobs/sha256:abc%2F..", "/v2/blobs/sha256:abc"])
def test_a_malformed_digest_has_no_key_and_goes_to_any_node_which_refuses_it(path: str):
    assert route_key(path) is None


@pytest.mark.parametrize("path, name", [
    ("/v2/library/alpine/manifests/latest", "library/alpine"),
    (f"/v2/library/alpine/manifests/{SHA256}", "library/alpine"),
    ("/v2/library/alpine/tags/list", "library/alpine"),
    (f"/v2/library/alpine/referrers/{SHA256}", "library/alpine"),
    ("/v2/a/b/c/manifests/1.0", "a/b/c"),
    ("/v2/org/blobs/x/manifests/latest", "org/blobs/x"),
    ("/v2/org/manifests/x/tags/list", "org/manifests/x"),
    ("/v2/x/manifests/manifests/latest", "x/manifests"),
    ("/v2/tags/tags/list", "library/tags"),
])
def test_manifests_tags_and_referrers_are_keyed_by_repository_whatever_ns_says(path: str, name: str):
    assert route_key(path) == name
    for query in ("ns=docker.io", "n=1&ns=ghcr.io&ns=other", "ns=docker%2Eio", "ns=DOCKER.IO", "xns=a"):
        assert route_key(path, query) == name, query


CLIENT_FORMS = {
    "dockerd registry-mirrors, podman": ("/v2/library/alpine/manifests/latest", ""),
    "containerd": ("/v2/library/alpine/manifests/latest", "ns=docker.io"),
    "containerd override_path": ("/v2/docker.io/library/alpine/manifests/latest", "ns=docker.io"),
    "podman prefixed location": ("/v2/docker.io/library/alpine/manifests/latest", ""),
    "docker pull mirror/alpine": ("/v2/alpine/manifests/latest", ""),
    "docker pull mirror/docker.io/alpine": ("/v2/docker.io/alpine/manifests/latest", ""),
    "an alias of Docker Hub": ("/v2/index.docker.io/library/alpine/manifests/latest", ""),
}


def test_every_clients_form_of_one_repository_is_one_key():
    """dockermirror/routing.py serves all of these as docker.io's library/alpine: one node must."""
    keys = {form: route_key(path, query) for form, (path, query) in CLIENT_FORMS.items()}
    assert set(keys.values()) == {"library/alpine"}, keys


@pytest.mark.parametrize("path, name", [
    ("/v2/ghcr.io/org/app/manifests/1", "org/app"),
    ("/v2/registry.example.org:5000/team/app/tags/list", "team/app"),
    ("/v2/localhost/team/app/manifests/1", "team/app"),
    ("/v2/host:5000/app/manifests/1", "library/app"),
    ("/v2/ghcr.io/manifests/1", "library/ghcr.io"),          # no repository after it: not a prefix
    ("/v2/localhost/manifests/1", "library/localhost"),
    ("/v2/team/local.host/manifests/1", "team/local.host"),   # only a FIRST component is a registry
])
def test_a_registry_prefix_is_the_nodes_rule(path: str, name: str):
    """A first component is stripped exactly when routing.looks_like_host says it is a registry."""
    assert route_key(path) == name


def test_one_repository_is_one_key_and_a_tag_and_its_digest_meet():
    keys = {route_key(p, "ns=docker.io") for p in ("/v2/library/alpine/manifests/3.20",
                                                    f"/v2/library/alpine/manifests/{SHA256}",
                                                    "/v2/library/alpine/tags/list")}
    assert keys == {"library/alpine"}
    assert route_key("/v2/library/debian/manifests/3.20") != "library/alpine"


@pytest.mark.parametrize("path", ["/v2/", "/v2", "/healthz", "/", "/v2/_catalog", "/token",
                                  "/v2/a/manifests/", "/v2/a/manifests/x/y", "/v2/manifests/latest"])
def test_everything_else_has_no_key(path: str):
    assert route_key(path) is None


def test_the_engines_use_the_same_patterns_as_route_key():
    haproxy = lbconfig.haproxy(lbconfig.Options("0.0.0.0:5000", ("10.0.0.1:5000",)))
    assert f"acl dm_blob path_reg {lbconfig.BLOB_PATH}\n" in haproxy
    assert f"acl dm_repo path_reg {lbconfig.REPO_PATH}\n" in haproxy
    nginx = lbconfig.nginx(lbconfig.Options("0.0.0.0:5000", ("10.0.0.1:5000",)))
    assert lbconfig.BLOB_PATH.replace("blobs/", "blobs/(?<docker_mirror_digest>").replace("$", ")$") in nginx
    assert f"replace-header {lbconfig.KEY_HEADER} {lbconfig.REPO_KEY} \\3 if" in haproxy
    assert "urlp(ns)" not in haproxy and "$arg_ns" not in nginx


# --- the command line --------------------------------------------------------------------------------------

def lb_config(capsys, *args: str) -> str:
    assert cli.main(["lb-config", *args]) == 0
    return capsys.readouterr().out


def test_the_configuration_names_its_nodes_and_the_versions_it_needs(capsys):
    text = lb_config(capsys, "haproxy", "--listen", "0.0.0.0:5000", "--node", "10.0.0.1:5000",
                     "--node", "[2001:db8::2]:5000")
    # fixed ids: the ring follows them, so removing node1 later does not renumber node2
    assert "server node1 10.0.0.1:5000 id 1 check\n" in text and "server node2 [2001:db8::2]:5000 id 2 check\n" in text
    assert "Needs HAProxy >= 1.5" in text and "hash-type consistent" in text
    text = lb_config(capsys, "nginx", "--listen", "0.0.0.0:5000", "--node", "10.0.0.1:5000")
    assert "Needs nginx >= 1.12" in text and "hash $docker_mirror_key consistent;" in text
    assert "no active health checks" in text


def test_tls_at_the_balancer_has_a_protocol_floor_and_names_the_nginx_it_needs(capsys):
    text = lb_config(capsys, "haproxy", "--listen", "0.0.0.0:443", "--node", "10.0.0.1:5000", "--tls-cert", "/lb.pem")
    assert "bind 0.0.0.0:443 ssl crt /lb.pem no-sslv3 no-tlsv10 no-tlsv11 " in text
    text = lb_config(capsys, "nginx", "--listen", "0.0.0.0:443", "--node", "10.0.0.1:5000", "--tls-cert", "/lb.pem")
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text and "Needs nginx >= 1.13" in text and ">= 1.12" not in text


def test_nodes_over_tls_say_client_certificates_are_not_sent_and_nginx_verifies_one_intermediate(capsys):
    for engine in ("haproxy", "nginx"):
        text = lb_config(capsys, engine, "--listen", "0.0.0.0:443", "--node", "10.0.0.1:5000", "--node-tls",
                         "--node-ca", "/ca.crt", "--node-tls-name", "node.example")
        assert "tls.client_auth: required" in text
    assert "proxy_ssl_verify_depth 2;" in text
    plain = lb_config(capsys, "nginx", "--listen", "0.0.0.0:443", "--node", "10.0.0.1:5000")
    assert "client_auth" not in plain


def test_a_client_certificate_for_the_nodes(capsys):
    args = ["--listen", "0.0.0.0:443", "--node", "10.0.0.1:5000", "--node-tls", "--node-client-cert", "/lb-client.pem"]
    text = lb_config(capsys, "haproxy", *args)
    assert "server node1 10.0.0.1:5000 id 1 check ssl verify none crt /lb-client.pem\n" in text
    assert "tls.client_auth: required pass /healthz" not in text
    text = lb_config(capsys, "nginx", *args)
    assert "proxy_ssl_certificate /lb-client.pem;" in text and "proxy_ssl_certificate_key /lb-client.pem;" in text


def test_passthrough_says_content_routing_is_lost(capsys):
    for engine in ("haproxy", "nginx"):
        text = lb_config(capsys, engine, "--listen", "0.0.0.0:443", "--node", "10.0.0.1:443", "--passthrough")
        assert "NO content routing" in text and "once per NODE" in text
        assert "docker_mirror_key" not in text and "dm_blob" not in text


def test_a_relative_certificate_path_is_made_absolute(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = lb_config(capsys, "nginx", "--listen", "0.0.0.0:443", "--node", "10.0.0.1:5000", "--tls-cert", "lb.pem")
    assert f"ssl_certificate {tmp_path}/lb.pem;" in text


MISTAKES = {
    "no-node": (["nginx", "--listen", "0.0.0.0:5000"], "--node", "give --node HOST:PORT"),
    "node-url": (["haproxy", "--listen", "0.0.0.0:5000", "--node", "http://10.0.0.1:5000"], "--node",
                 "no scheme"),
    "node-no-port": (["haproxy", "--listen", "0.0.0.0:5000", "--node", "10.0.0.1"], "--node", "HOST:PORT"),
    "node-port-range": (["haproxy", "--listen", "0.0.0.0:5000", "--node", "10.0.0.1:70000"], "--node",
                        "HOST:PORT"),
    "node-twice": (["haproxy", "--listen", "0.0.0.0:5000", "--node", "a:1", "--node", "a:1"], "--node",
                   "give each node once"),
    "listen-garbage": (["nginx", "--listen", "5000; evil", "--node", "a:1"], "--listen", "HOST:PORT"),
    "listen-missing": (["nginx", "--node", "a:1"], "--listen", "required"),
    "engine-unknown": (["traefik", "--listen", "0.0.0.0:5000", "--node", "a:1"], "engine", "invalid choice"),
    "cert-injection": (["nginx", "--listen", "0.0.0.0:443", "--node", "a:1", "--tls-cert", "/x.pem; evil"],
                       "--tls-cert", "absolute path without spaces"),
    "passthrough-cert": (["haproxy", "--listen", "0.0.0.0:443", "--node", "a:1", "--passthrough", "--tls-cert",
                          "/x.pem"], "--passthrough", "drop --tls-cert"),
    "ca-without-tls": (["haproxy", "--listen", "0.0.0.0:5000", "--node", "a:1", "--node-ca", "/ca.crt"],
                       "--node-ca", "add --node-tls"),
    "nginx-ca-without-name": (["nginx", "--listen", "0.0.0.0:5000", "--node", "a:1", "--node-tls", "--node-ca",
                               "/ca.crt"], "--node-ca", "add --node-tls-name"),
    "client-cert-without-tls": (["nginx", "--listen", "0.0.0.0:5000", "--node", "a:1", "--node-client-cert",
                                 "/c.pem"], "--node-client-cert", "add --node-tls"),
    "client-cert-passthrough": (["haproxy", "--listen", "0.0.0.0:443", "--node", "a:1", "--passthrough",
                                 "--node-client-cert", "/c.pem"], "--node-client-cert", "drop --node-client-cert"),
    "name-without-ca": (["haproxy", "--listen", "0.0.0.0:5000", "--node", "a:1", "--node-tls", "--node-tls-name",
                         "x.example"], "--node-tls-name", "add --node-ca"),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_a_mistake_is_one_line_that_names_the_flag_and_exit_2(case: str, tmp_path: Path):
    args, flag, words = MISTAKES[case]
    result = subprocess.run([sys.executable, "-m", "dockermirror", "lb-config", *args], capture_output=True,
                            text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("docker-mirror: "), result.stderr
    assert flag in lines[0] and words in lines[0] and "; " in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


# --- the examples in docs/cluster/ ---------------------------------------------------------------------------

EXPECTED_EXAMPLES = {"haproxy.cfg", "nginx.conf", "haproxy-tls.cfg", "nginx-tls.conf", "haproxy-passthrough.cfg",
                     "nginx-passthrough.conf"}


def test_every_example_is_there():
    assert {p.name for p in EXAMPLES.iterdir()} >= EXPECTED_EXAMPLES


@pytest.mark.parametrize("name", sorted(EXPECTED_EXAMPLES))
def test_each_example_is_the_output_of_the_command_in_its_first_line(name: str, capsys):
    text = (EXAMPLES / name).read_text()
    first = text.splitlines()[0]
    assert first.startswith("# docker-mirror lb-config "), first
    argv = shlex.split(first.removeprefix("# docker-mirror "))
    assert argv[1] == ("haproxy" if name.startswith("haproxy") else "nginx")
    assert ("--tls-cert" in argv) == ("-tls" in name) and ("--passthrough" in argv) == ("passthrough" in name)
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == text, (f"docs/cluster/{name} differs from the output of its command; "
                                             f"regenerate it: {first[2:]} > docs/cluster/{name}")
