"""Who may pull, with real parts (issue 16): a mirror with an htpasswd file made by
``docker-mirror user add`` and ``access:`` rules, in front of the session's Debian
docker-registry. skopeo and podman with credentials pull; a wrong or missing password is
refused; a denied repository gets 403 and the upstream's own access log shows no request for
it; a forwarded-for header does not make a client another network's; a reload applies new
rules."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.clients import Podman, dir_manifest_digest, skopeo
from tests.support.images import ALL_MANIFESTS
from tests.support.procs import Mirror, wait_until
from tests.test_mtls import MTLS, http

PASSWORD = "correct horse battery staple"
RULES = [
    {"allow": ["anonymous"], "from": ["10.0.0.0/8"], "repositories": ["library/*"]},
    {"deny": ["user:ci"], "repositories": ["library/big"]},
    {"allow": ["user:ci"], "repositories": ["docker.io/library/*", "acme/*"]},
]
CHALLENGE = 'Basic realm="docker-mirror"'
ACCEPT_HEADERS = {"Accept": ", ".join(ALL_MANIFESTS)}


def user_add(htpasswd: Path, name: str, password: str) -> None:
    result = subprocess.run([sys.executable, "-m", "dockermirror", "user", "add", name, "--file", str(htpasswd),
                             "--password-stdin", "--cost", "10"], input=password + "\n", capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def guarded(make_mirror, tmp_path: Path) -> Mirror:
    htpasswd = tmp_path / "htpasswd"
    user_add(htpasswd, "ci", PASSWORD)
    user_add(htpasswd, "other", "other password")
    mirror = make_mirror(auth={"htpasswd": str(htpasswd)}, start=False)
    mirror.config["access"] = RULES
    mirror.config_path.write_text(yaml.safe_dump(mirror.config))
    mirror.start()
    return mirror


def authfile(path: Path, registry: str, user: str, password: str) -> Path:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry: {"auth": token}}}))
    return path


def skopeo_pull(mirror: Mirror, reference: str, dest: Path, *creds: str) -> subprocess.CompletedProcess:
    """skopeo copy from the mirror (plain HTTP) in its sandbox; the result whether it worked or not."""
    try:
        return skopeo("copy", "--quiet", "--src-tls-verify=false", *creds, f"docker://{mirror.address}/{reference}",
                      f"dir:{dest}", parent=dest.parent)
    except AssertionError as exc:       # clients.run: the command failed (its output in the message)
        return subprocess.CompletedProcess([], 1, "", str(exc))


def test_skopeo_with_credentials_pulls_and_without_is_refused(guarded, upstream, tmp_path):
    tool = upstream.seeded["tool"]
    good = skopeo_pull(guarded, "acme/tool:1.0", tmp_path / "good", "--src-creds", f"ci:{PASSWORD}")
    assert good.returncode == 0, good.stderr
    assert dir_manifest_digest(tmp_path / "good") == tool.digest
    wrong = skopeo_pull(guarded, "acme/tool:1.0", tmp_path / "wrong", "--src-creds", "ci:not the password")
    assert wrong.returncode != 0 and ("401" in wrong.stderr or "unauthorized" in wrong.stderr.lower()), wrong.stderr
    missing = skopeo_pull(guarded, "acme/tool:1.0", tmp_path / "missing")
    assert missing.returncode != 0
    assert "401" in missing.stderr or "unauthorized" in missing.stderr.lower(), missing.stderr
    # the one with credentials was user:ci; the others never got past the guard
    assert guarded.access_lines(r'"GET /v2/acme/tool/manifests/1\.0" 200 .* identity=user:ci')
    assert guarded.access_lines(r'"GET /v2/" 401 .* identity=anonymous')
    assert not guarded.access_lines(r"/v2/acme/tool/.* 200 .* identity=anonymous", at_least=0)


def test_podman_with_an_authfile_pulls(guarded, upstream, tmp_path):
    hello = upstream.seeded["hello"]
    auth = authfile(tmp_path / "auth.json", guarded.address, "ci", PASSWORD)
    podman = Podman()
    try:
        reference = f"{guarded.address}/library/hello:latest"
        podman("pull", "--tls-verify=false", "--authfile", str(auth), reference)
        assert f"{guarded.address}/library/hello@{hello.digest}" in podman.repo_digests(reference)
        wrong = authfile(tmp_path / "wrong.json", guarded.address, "ci", "nope")
        with pytest.raises(AssertionError, match=r"(?i)401|unauthorized"):
            podman("pull", "--tls-verify=false", "--authfile", str(wrong), f"{guarded.address}/acme/tool:1.0")
    finally:
        podman.cleanup()
    assert guarded.access_lines(r"/v2/library/hello/manifests/latest\" 200 .* identity=user:ci")


def test_a_denied_repository_gets_403_and_the_upstream_sees_nothing(guarded, upstream, tmp_path):
    mark = upstream.registry.mark()
    with guarded.client() as client:
        for path in ("/v2/library/big/manifests/latest", f"/v2/library/big/blobs/{upstream.seeded['big'].digest}"):
            response = client.get(path, headers=basic("ci", PASSWORD))
            assert response.status_code == 403, path
            error = response.json()["errors"][0]
            assert error["code"] == "DENIED"
            assert "access[1] (line" in error["message"] and error["detail"]["rule"] == 1
        # a user no rule allows: default deny; nobody: asked to log in
        response = client.get("/v2/acme/tool/manifests/1.0", headers=basic("other", "other password"))
        assert response.status_code == 403 and response.json()["errors"][0]["detail"]["rule"] == "default deny"
        anonymous = client.get("/v2/acme/tool/manifests/1.0")
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == CHALLENGE
        assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
    failed = skopeo_pull(guarded, "library/big:latest", tmp_path / "big", "--src-creds", f"ci:{PASSWORD}")
    assert failed.returncode != 0 and ("403" in failed.stderr or "denied" in failed.stderr.lower()), failed.stderr
    assert upstream.registry.requests(mark, path="/v2/library/big/") == []
    assert upstream.registry.requests(mark, path="/v2/acme/tool/") == []


def test_a_forwarded_for_header_is_not_the_client_address(guarded, upstream):
    """Anonymous clients from 10/8 may pull library/*; a local client saying it forwards for
    10.1.2.3 is still 127.0.0.1 (uvicorn would believe a peer at 127.0.0.1 by default)."""
    mark = upstream.registry.mark()
    with guarded.client() as client:
        for headers in ({"X-Forwarded-For": "10.1.2.3"}, {"Forwarded": "for=10.1.2.3"},
                        {"X-Forwarded-For": "10.1.2.3", "X-Forwarded-Proto": "https"}):
            response = client.get("/v2/library/hello/manifests/latest", headers=headers)
            assert response.status_code == 401, headers
    assert upstream.registry.requests(mark, path="/v2/library/hello/") == []
    assert guarded.access_lines(r"^.*access: 127\.0\.0\.1 \"GET /v2/library/hello/manifests/latest\" 401")


def test_a_reload_applies_new_rules_and_users(guarded, upstream, tmp_path):
    with guarded.client() as client:
        assert client.get("/v2/library/hello/manifests/latest").status_code == 401
        config = yaml.safe_load(guarded.config_path.read_text())
        config["access"] = [{"allow": ["anonymous"], "repositories": ["library/hello"]},
                            {"allow": ["user:new"]}]
        guarded.config_path.write_text(yaml.safe_dump(config))
        user_add(Path(config["auth"]["htpasswd"]), "new", "new password")
        offset = len(guarded.log_text())
        os.kill(guarded.pid, signal.SIGHUP)
        wait_until(lambda: "reloaded " in guarded.log_text()[offset:], 30, what="the reload")
        accept = {"Accept": ", ".join(ALL_MANIFESTS)}
        assert client.get("/v2/library/hello/manifests/latest", headers=accept).status_code == 200
        assert client.get("/v2/").status_code == 200     # anonymous may pull something now
        assert client.get("/v2/acme/tool/manifests/1.0", headers=basic("ci", PASSWORD)).status_code == 403
        assert client.get("/v2/acme/tool/manifests/1.0", headers={**accept, **basic("new", "new password")}
                          ).status_code == 200


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> MTLS:
    return MTLS(tmp_path_factory.mktemp("access-mtls"))


def test_client_certificates_and_rules(make_mirror, certificates, upstream, tmp_path):
    """tls.client_auth: optional and a rule for one certificate's common name: that certificate
    pulls, another gets 403 naming the rule, no certificate gets 403 saying one may help; the
    upstream sees nothing of the refused ones."""
    mirror = make_mirror(tls={**certificates.tls, "client_auth": "optional"}, start=False)
    mirror.config["access"] = [{"deny": ["cert:laptop"], "repositories": ["acme/*"]},
                               {"allow": ["cert:builder"], "repositories": ["acme/*"]}]
    mirror.config_path.write_text(yaml.safe_dump(mirror.config))
    mirror.start()
    tool = upstream.seeded["tool"]
    path = f"/v2/{tool.repo}/manifests/{tool.tag}"
    mark = upstream.registry.mark()
    with http(mirror, certificates, certificates.client("laptop")) as laptop:
        denied = laptop.get(path, headers=dict(ACCEPT_HEADERS))
        assert denied.status_code == 403
        assert denied.json()["errors"][0]["detail"]["rule"] == 0
    with http(mirror, certificates, None) as nobody:
        refused = nobody.get(path, headers=dict(ACCEPT_HEADERS))
        assert refused.status_code == 403 and "client certificate may be allowed" in refused.text
        assert nobody.get("/v2/").status_code == 200
    assert upstream.registry.requests(mark, path=f"/v2/{tool.repo}/") == []
    with http(mirror, certificates, certificates.client("builder")) as builder:
        allowed = builder.get(path, headers=dict(ACCEPT_HEADERS))
        assert allowed.status_code == 200 and allowed.headers["docker-content-digest"] == tool.digest
    assert mirror.access_lines(rf'"GET {path}" 200 .* identity=cert:builder cert="CN=builder"')
    assert mirror.access_lines(rf'"GET {path}" 403 .* identity=cert:laptop cert="CN=laptop"')
    assert mirror.access_lines(rf'"GET {path}" 403 .* identity=anonymous ')
