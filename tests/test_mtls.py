"""TLS client certificates against a real mirror: `cert init`, `cert client`, `cert revoke`
as an admin runs them, httpx and real clients (skopeo, podman, containerd; dockerd without)
with and without a client certificate, a revocation applied by SIGHUP. Under `required` a client
without a certificate completes the handshake and gets 401 saying why (what each client
prints is checked); a foreign or revoked certificate is refused in the handshake."""

from __future__ import annotations

import hashlib
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ALL_MANIFESTS, Upstream
from tests.support.clients import Containerd, Dockerd, Podman, dir_manifest_digest, skopeo
from tests.support.procs import wait_until

ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dockermirror", *args], capture_output=True, text=True, timeout=60)


class MTLS:
    """A CA and server certificate by `cert init`, client pairs by `cert client` (one directory
    each: client.cert, client.key, ca.crt), a CRL by `cert revoke`; all from one config file."""

    def __init__(self, directory: Path, ip: str = "127.0.0.1") -> None:
        self.dir = directory
        self.ca = directory / "ca" / "ca.crt"
        self.crl = directory / "ca" / "crl.pem"
        self.tls = {"certificate": str(directory / "server.crt"), "key": str(directory / "server.key"),
                    "ca": str(self.ca), "crl": str(self.crl)}
        self.config = directory / "admin.yml"
        self.config.write_text(yaml.safe_dump({"tls": self.tls}))
        self.run("init", "--hostname", "localhost", "--ip", ip)

    def run(self, command: str, *args: str) -> str:
        result = cli("cert", command, "--config", str(self.config), *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def client(self, name: str) -> Path:
        out = self.dir / "clients" / name
        if not out.exists():
            self.run("client", name, "--out", str(out))
        return out


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> MTLS:
    return MTLS(tmp_path_factory.mktemp("mtls"))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> MTLS:
    """Another CA, with a client certificate of the same name."""
    return MTLS(tmp_path_factory.mktemp("foreign"))


def http(mirror, mtls: MTLS, client: Path | None) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(mtls.ca))
    if client is not None:
        context.load_cert_chain(client / "client.cert", client / "client.key")
    return httpx.Client(base_url=mirror.url, verify=context, timeout=60)


def pull(mirror, mtls: MTLS, client: Path | None, upstream: Upstream, name: str = "busybox") -> None:
    """The manifest and a blob of a seeded image, checked against the upstream's digest."""
    seeded = upstream.seeded[name]
    with http(mirror, mtls, client) as session:
        response = session.get(f"/v2/{seeded.repo}/manifests/{seeded.tag}", headers=ACCEPT)
        assert response.status_code == 200
        assert "sha256:" + hashlib.sha256(response.content).hexdigest() == seeded.digest
        manifest = response.json()
        child = manifest["manifests"][0]["digest"] if "manifests" in manifest else None
        if child:
            manifest = session.get(f"/v2/{seeded.repo}/manifests/{child}", headers=ACCEPT).json()
        layer = manifest["layers"][0]["digest"]
        blob = session.get(f"/v2/{seeded.repo}/blobs/{layer}")
        assert blob.status_code == 200 and "sha256:" + hashlib.sha256(blob.content).hexdigest() == layer


def refused(mirror, mtls: MTLS, client: Path | None) -> bool:
    """Whether the server ends the connection in the handshake (TLS 1.3: the client learns it
    at its first read)."""
    try:
        with http(mirror, mtls, client) as session:
            session.get("/v2/")
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return True
    return False


# what a client without a certificate is told under tls.client_auth: required
NO_CERTIFICATE = ("a client certificate is required (tls.client_auth: required); ask the mirror's admin for one "
                  "(docker-mirror cert client NAME)")
REFUSED_LINE = " identity=anonymous refused=no-client-certificate"


def unauthorized(mirror, mtls: MTLS, path: str = "/v2/") -> bool:
    """Whether a client without a certificate completes the handshake and gets 401 UNAUTHORIZED
    with the mirror's message (and no Basic challenge: no password can stand in for it)."""
    with http(mirror, mtls, None) as session:
        response = session.get(path, headers=ACCEPT)
    return (response.status_code == 401 and "www-authenticate" not in response.headers
            and response.reason_phrase == f"Unauthorized: {NO_CERTIFICATE}"
            and response.json() == {"errors": [{"code": "UNAUTHORIZED", "message": NO_CERTIFICATE}]})


def s_client(mirror, mtls: MTLS, tmp_path: Path, *args: str) -> str:
    """openssl s_client: one GET /v2/, and what came back (TLS 1.2 or 1.3, as the server allows)."""
    request = "GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    result = subprocess.run(["openssl", "s_client", "-connect", mirror.address, "-CAfile", str(mtls.ca),
                             "-ign_eof", *args], input=request, capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def resumed(mirror, mtls: MTLS, client: Path, tmp_path: Path) -> bool:
    """Whether a client that kept its TLS session (without its certificate now) gets an answer."""
    for name, version in (("session.pem", ()), ("session12.pem", ("-tls1_2",))):
        if (tmp_path / name).exists():      # else the server gave it no session to resume
            if "HTTP/1.1 200" in s_client(mirror, mtls, tmp_path, *version, "-sess_in", str(tmp_path / name)):
                return True
    return False


def reload(mirror) -> None:
    before = mirror.log_text().count(" reloaded ")
    mirror.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: mirror.log_text().count(" reloaded ") > before, 30, what="the reload")


def test_required_a_client_certificate_pulls_and_is_named_in_the_log(make_mirror, mtls, foreign,
                                                                     upstream: Upstream):
    mirror = make_mirror(tls={**mtls.tls, "client_auth": "required"})
    pull(mirror, mtls, mtls.client("alice"), upstream)
    lines = mirror.access_lines("/v2/library/busybox/", at_least=3)
    assert len(lines) >= 3 and all(line.endswith(' cert="CN=alice"') for line in lines)
    mark = upstream.registry.mark()
    assert unauthorized(mirror, mtls, "/v2/")
    assert unauthorized(mirror, mtls, "/v2/library/hello/manifests/latest")
    assert unauthorized(mirror, mtls, "/nowhere")
    assert upstream.registry.requests(mark) == []
    # another CA's certificate is still refused in the handshake
    assert refused(mirror, mtls, foreign.client("alice"))
    log = mirror.log_text()
    assert "TLS handshake refused a client: certificate not signed by the client CA" in log
    assert "no client certificate given" not in log
    refusals = mirror.access_lines(REFUSED_LINE)
    assert refusals and all(' 401 ' in line and "cert=" not in line for line in refusals)
    # every other request came with alice's certificate
    assert all(line.endswith(' cert="CN=alice"') for line in mirror.access_lines("") if REFUSED_LINE not in line)


def test_a_revoked_certificate_is_refused_after_reload_and_the_others_still_pull(make_mirror, mtls, tmp_path,
                                                                                   upstream: Upstream):
    bob, carol = mtls.client("bob"), mtls.client("carol")
    mirror = make_mirror(tls={**mtls.tls, "client_auth": "required"})
    pull(mirror, mtls, bob, upstream)
    pair = ("-cert", str(bob / "client.cert"), "-key", str(bob / "client.key"))
    assert "HTTP/1.1 200" in s_client(mirror, mtls, tmp_path, *pair, "-sess_out", str(tmp_path / "session.pem"))
    # TLS 1.2 is refused with client certificates (its sessions resume from a cache that cannot be
    # turned off): no answer, and no session
    assert "HTTP/1.1 200" not in s_client(mirror, mtls, tmp_path, *pair, "-tls1_2",
                                          "-sess_out", str(tmp_path / "session12.pem"))
    assert "revoked bob" in mtls.run("revoke", "bob")
    assert not refused(mirror, mtls, bob)          # not before the reload
    reload(mirror)
    assert refused(mirror, mtls, bob)
    assert "TLS handshake refused a client: certificate revoked" in mirror.log_text()
    pull(mirror, mtls, carol, upstream, "alpine")
    assert mirror.access_lines('cert="CN=carol"')
    # nor can it resume a session it had before the revocation (a resumed session skips the check)
    assert not resumed(mirror, mtls, bob, tmp_path)
    # a CRL that cannot be read on reload keeps the one in force
    good = mtls.crl.read_bytes()
    try:
        mtls.crl.write_text("garbage\n")
        reload(mirror)
        assert "reload kept the previous TLS certificate, client CA and CRL" in mirror.log_text()
        assert refused(mirror, mtls, bob)
    finally:
        mtls.crl.write_bytes(good)


def test_a_keep_alive_connection_of_a_certificate_revoked_since_is_refused_and_closed(make_mirror, mtls):
    """A client holding its connection open (httpx's pool) across a revocation and a reload: its
    next request is refused (401, saying why) and the connection closed; a new one fails its
    handshake; another client's open connection goes on."""
    frank, grace = mtls.client("frank"), mtls.client("grace")
    mirror = make_mirror(tls={**mtls.tls, "client_auth": "required"}, server={"keepalive_timeout": "120s"})
    with http(mirror, mtls, frank) as held, http(mirror, mtls, grace) as other:
        assert held.get("/v2/").status_code == 200 and other.get("/v2/").status_code == 200
        assert "revoked frank" in mtls.run("revoke", "frank")
        reload(mirror)
        # a 401 (not a failed handshake) shows the request came on the connection opened before
        response = held.get("/v2/", headers=ACCEPT)
        assert response.status_code == 401, response.text
        assert response.json()["errors"][0]["message"].startswith("the client certificate was revoked")
        assert response.headers["connection"] == "close"
        assert other.get("/v2/").status_code == 200
    assert refused(mirror, mtls, frank)
    line = mirror.access_lines("refused=certificate-revoked")[0]
    assert '"GET /v2/" 401 ' in line and "CN=frank" in line


def test_optional_lets_anonymous_clients_through_and_names_a_certificate_when_given(make_mirror, mtls,
                                                                                  upstream: Upstream):
    mirror = make_mirror(tls={**mtls.tls, "client_auth": "optional"})
    pull(mirror, mtls, None, upstream, "tool")
    assert all("cert=" not in line for line in mirror.access_lines("/v2/acme/tool/", at_least=3))
    pull(mirror, mtls, mtls.client("dave"), upstream, "hello")
    assert all(line.endswith(' cert="CN=dave"') for line in mirror.access_lines("/v2/library/hello/", at_least=3))


def test_a_reload_changes_client_auth_for_new_connections(make_mirror, mtls, upstream: Upstream):
    mirror = make_mirror(tls={**mtls.tls, "client_auth": "required"})
    assert unauthorized(mirror, mtls)
    config = yaml.safe_load(mirror.config_path.read_text())
    config["tls"]["client_auth"] = "optional"
    mirror.config_path.write_text(yaml.safe_dump(config))
    reload(mirror)
    pull(mirror, mtls, None, upstream, "hello")
    config["tls"]["client_auth"] = "required"
    mirror.config_path.write_text(yaml.safe_dump(config))
    reload(mirror)
    assert unauthorized(mirror, mtls)
    pull(mirror, mtls, mtls.client("erin"), upstream, "hello")
    config["tls"]["client_auth"] = "none"
    mirror.config_path.write_text(yaml.safe_dump(config))
    reload(mirror)
    pull(mirror, mtls, None, upstream, "hello")


def test_client_auth_without_tls_refuses_to_start(make_mirror, tmp_path):
    mirror = make_mirror(start=False, tls={"certificate": str(tmp_path / "none.crt"), "enabled": "auto",
                                           "client_auth": "required"})
    mirror.tls = False
    result = subprocess.run([sys.executable, "-m", "dockermirror", "serve", "--config", str(mirror.config_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"{mirror.config_path}:" in result.stderr and "tls.client_auth: required needs TLS" in result.stderr
    checked = cli("check-config", "--config", str(mirror.config_path))
    assert checked.returncode == 2 and "tls.client_auth: required needs TLS" in checked.stderr


# --- real clients


def cert_dir(mtls: MTLS, name: str | None) -> Path:
    """What skopeo's --cert-dir and certs.d/<host>/ hold: ca.crt, and the client pair if named."""
    if name is None:
        bare = mtls.dir / "ca-only"
        bare.mkdir(exist_ok=True)
        (bare / "ca.crt").write_bytes(mtls.ca.read_bytes())
        return bare
    return mtls.client(name)


def test_skopeo_with_a_client_certificate_pulls_and_without_one_fails(make_mirror, mtls, upstream: Upstream,
                                                                      tmp_path):
    mirror = make_mirror(tls={**mtls.tls, "client_auth": "required"})
    seeded = upstream.seeded["busybox"]
    source = f"docker://{mirror.address}/{seeded.repo}:{seeded.tag}"
    skopeo("copy", "--quiet", "--all", "--src-cert-dir", str(cert_dir(mtls, "skopeo")), source,
           f"dir:{tmp_path / 'ok'}", parent=tmp_path)
    assert dir_manifest_digest(tmp_path / "ok") == seeded.digest
    assert mirror.access_lines('cert="CN=skopeo"')
    mark = upstream.registry.mark()
    with pytest.raises(AssertionError) as failed:
        skopeo("copy", "--quiet", "--src-cert-dir", str(cert_dir(mtls, None)), source, f"dir:{tmp_path / 'no'}",
               parent=tmp_path, timeout=120)
    # skopeo prints the mirror's error: "reading manifest latest in 127.0.0.1:PORT/library/busybox:
    # unauthorized: a client certificate is required ..." (it was "pinging container registry ...: EOF")
    assert f"unauthorized: {NO_CERTIFICATE}" in str(failed.value)
    assert upstream.registry.requests(mark) == []
    # one line at info (its first request, /v2/), the others at debug: a client cannot flood the log
    assert [line.split(" access: ")[1].split('" ')[0] for line in mirror.access_lines(REFUSED_LINE)] == \
        ['127.0.0.1 "GET /v2/']


def test_podman_with_certs_d_pulls_and_without_a_certificate_fails(make_mirror, mtls, upstream: Upstream):
    mirror = make_mirror(tls={**mtls.tls, "client_auth": "required"})
    conf = f'[[registry]]\nprefix = "docker.io"\nlocation = "{mirror.address}"\n'
    pair = mtls.client("podman")
    with_cert = Podman(conf, etc={f"containers/certs.d/{mirror.address}/{name}": (pair / name).read_bytes()
                                  for name in ("client.cert", "client.key", "ca.crt")})
    try:
        with_cert("pull", "docker.io/acme/tool:1.0")
        assert f"docker.io/acme/tool@{upstream.seeded['tool'].digest}" in with_cert.repo_digests(
            "docker.io/acme/tool:1.0")
        assert mirror.access_lines('/v2/acme/tool/manifests/.* cert="CN=podman"')
    finally:
        with_cert.cleanup()
    without = Podman(conf, etc={f"containers/certs.d/{mirror.address}/ca.crt": mtls.ca.read_bytes()})
    try:
        mark = upstream.registry.mark()
        with pytest.raises(AssertionError) as failed:
            without("pull", "docker.io/library/hello:latest")
        # "Error: initializing source docker://hello:latest: reading manifest latest in
        # 127.0.0.1:PORT/library/hello: unauthorized: a client certificate is required ...", at once:
        # no retries, no password asked for (it was "pinging container registry ...: EOF", 3 retries)
        assert f"unauthorized: {NO_CERTIFICATE}" in str(failed.value)
        assert "retrying" not in str(failed.value)
        assert upstream.registry.requests(mark) == []
        assert [line.split(" access: ")[1].split('" ')[0] for line in mirror.access_lines(REFUSED_LINE)] == \
            ['127.0.0.1 "GET /v2/']
    finally:
        without.cleanup()


def test_containerd_with_a_client_pair_in_hosts_toml_pulls(make_mirror, mtls, upstream: Upstream):
    mirror = make_mirror(tls={**mtls.tls, "client_auth": "required"})
    pair = mtls.client("containerd")
    daemon = Containerd()
    daemon.start()
    try:
        hosts = daemon.dir / "hosts" / "docker.io"
        hosts.mkdir(parents=True)
        toml = (f'server = "https://registry-1.docker.io"\n\n[host."{mirror.url}"]\n'
                f'  capabilities = ["pull", "resolve"]\n  ca = "{pair}/ca.crt"\n')
        (hosts / "hosts.toml").write_text(toml + f'  client = [["{pair}/client.cert", "{pair}/client.key"]]\n')
        daemon.ctr("images", "pull", "--hosts-dir", str(hosts.parent), "docker.io/library/alpine:3")
        assert daemon.image_digest("docker.io/library/alpine:3") == upstream.seeded["alpine"].digest
        assert mirror.access_lines('/v2/library/alpine/manifests/.* cert="CN=containerd"')
        (hosts / "hosts.toml").write_text(toml)        # no client pair: 401 from the mirror
        mark = upstream.registry.mark()
        with pytest.raises(AssertionError) as failed:
            daemon.ctr("images", "pull", "--hosts-dir", str(hosts.parent), "docker.io/acme/tool:1.0")
        # containerd resolves with HEAD (no body to show) and prints only the status line, which says it:
        # "pulling from host 127.0.0.1:PORT failed with status code [manifests 1.0]: 401 Unauthorized:
        # a client certificate is required ..." (it was "failed to do request: Head ...: EOF")
        assert f"pulling from host {mirror.address} failed with status code [manifests 1.0]: 401 Unauthorized: " \
            f"{NO_CERTIFICATE}" in str(failed.value)
        assert upstream.registry.requests(mark) == []
        assert mirror.access_lines(f'"HEAD /v2/acme/tool/manifests/1.0\\?ns=docker.io" 401 .*{REFUSED_LINE}')
    finally:
        daemon.stop()


# dockerd with a certificate is tested in tests/test_mtls_dockerd.py: it counts every loopback
# registry as insecure (127.0.0.0/8 is always in its insecure-registries), and for an insecure
# registry it neither verifies the server nor reads certs.d/<host>/client.cert; there the mirror
# has another address. Without a certificate, it is a client like the others:


def test_dockerd_without_a_certificate_is_told_why(make_mirror, mtls, upstream: Upstream):
    mirror = make_mirror(tls={**mtls.tls, "client_auth": "required"})
    daemon = Dockerd(None, etc={"docker/daemon.json": "{}"})
    daemon.start()
    try:
        mark = upstream.registry.mark()
        with pytest.raises(AssertionError) as failed:
            daemon.docker("pull", f"{mirror.address}/acme/tool:1.0")
        # "Error response from daemon: unauthorized: a client certificate is required ..."
        assert f"Error response from daemon: unauthorized: {NO_CERTIFICATE}" in str(failed.value)
        assert upstream.registry.requests(mark) == []
        assert mirror.access_lines(f'"GET /v2/" 401 .*{REFUSED_LINE}')
    finally:
        daemon.stop()
