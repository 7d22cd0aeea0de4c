"""TLS client certificates, in process: the configuration keys, `cert client` / `cert revoke`
(certificates, the index, the CRL), the server contexts (handshakes over memory BIOs) and
what a request's scope and log line say about the certificate."""

from __future__ import annotations

import datetime
import logging
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dockermirror import config as configuration
from dockermirror.config import ConfigError
from dockermirror.service import certs, clientcert, clientcerts
from dockermirror.access.guard import CertificateRefused, Guard
from dockermirror.access.rules import Rules
from dockermirror.service.tls import ClientAuth, Refusals, ServerTLS, TLSError, TrustLost, check_crls

# --- configuration


def test_client_auth_defaults_to_none_and_the_client_ca_to_the_ca():
    tls = configuration.loads("tls:\n  ca: /srv/pki/ca.crt\n").tls
    assert tls.client_auth == "none" and tls.client_ca is None
    assert tls.client_ca_path == Path("/srv/pki/ca.crt")
    assert tls.crl == Path("/etc/pki/docker-mirror/crl.pem")
    assert tls.client_auth_error() is None


def test_client_auth_takes_only_its_three_values():
    with pytest.raises(ConfigError) as caught:
        configuration.loads("tls:\n  enabled: on\n  client_auth: yes\n", source="c.yml")
    assert "c.yml:3: tls.client_auth: expected one of none, optional, required" in str(caught.value)


def test_client_auth_with_tls_off_is_an_error_with_its_line():
    with pytest.raises(ConfigError) as caught:
        configuration.loads("tls:\n  enabled: false\n  client_auth: required\n", source="c.yml")
    assert str(caught.value) == "c.yml:3: tls.client_auth: required needs TLS, but tls.enabled is off"


def test_client_auth_without_a_certificate_on_disk_is_refused_at_start_with_its_line(tmp_path: Path):
    text = f"tls:\n  certificate: {tmp_path}/none.crt\n  client_auth: optional\n  client_ca: {tmp_path}/ca.crt\n"
    tls = configuration.loads(text, source="c.yml").tls
    assert tls.client_ca_path == tmp_path / "ca.crt"
    problem = tls.client_auth_error()
    assert problem is not None and problem.startswith("c.yml:3: tls.client_auth: optional needs TLS")
    assert f"no TLS certificate at {tmp_path}/none.crt" in problem


# --- cert client / cert revoke


@pytest.fixture
def paths(tmp_path: Path) -> certs.Paths:
    paths = certs.Paths(tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "ca" / "ca.crt")
    certs.init(paths, ["localhost"], ["127.0.0.1"])
    return paths


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_cert_client_writes_a_clientauth_pair_signed_by_the_ca_and_records_it(paths: certs.Paths, tmp_path: Path):
    out = tmp_path / "out"
    clientcerts.issue_client(paths, "ci-runner", out, days=10)
    cert, ca = _cert(out / "client.cert"), _cert(paths.ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ci-runner"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)
    assert (out / "ca.crt").read_bytes() == paths.ca.read_bytes()
    assert stat.S_IMODE((out / "client.key").stat().st_mode) == 0o600
    assert 9 <= (cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).days <= 10
    assert [c.serial_number for c in clientcerts.issued(paths)] == [cert.serial_number]
    # the key belongs to the certificate: a TLS context takes the pair
    ssl.create_default_context().load_cert_chain(out / "client.cert", out / "client.key")


@pytest.mark.parametrize("name", ["", "a/b", "../x", "-x", "a b", "x" * 65, "é"])
def test_cert_client_refuses_a_name_that_is_no_plain_name(paths: certs.Paths, tmp_path: Path, name: str):
    with pytest.raises(certs.CertError, match="invalid client name"):
        clientcerts.issue_client(paths, name, tmp_path / "out")


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def _cert_client(paths: certs.Paths, tmp_path: Path, capsys, *argv: str) -> tuple[int, str, str]:
    from dockermirror import cli

    config = tmp_path / "config.yml"
    config.write_text(f"tls:\n  certificate: {paths.certificate}\n  key: {paths.key}\n  ca: {paths.ca}\n")
    code = cli.main(["cert", "client", *argv, "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cert_client_whose_files_cannot_be_written_records_nothing(paths: certs.Paths, tmp_path: Path, capsys):
    (tmp_path / "precious").write_text("mine\n")
    before = _tree(paths.ca.parent)
    code, out, err = _cert_client(paths, tmp_path, capsys, "ghost", "--out", str(tmp_path / "precious" / "dir"))
    assert (code, out) == (1, "")
    assert err == f"docker-mirror: {tmp_path / 'precious' / 'dir'}: Not a directory\n"
    assert _tree(paths.ca.parent) == before and clientcerts.issued(paths) == []
    assert (tmp_path / "precious").read_text() == "mine\n"
    # a CA directory that cannot take the record: no client files either
    (paths.ca.parent / "clients").write_text("in the way\n")
    before = _tree(paths.ca.parent)
    code, _, err = _cert_client(paths, tmp_path, capsys, "ghost", "--out", str(tmp_path / "out"))
    assert code == 1 and err.startswith(f"docker-mirror: {paths.ca.parent / 'clients'}")
    assert _tree(paths.ca.parent) == before and not (tmp_path / "out").exists()
    # and with both in order, the files and the record
    (paths.ca.parent / "clients").unlink()
    assert _cert_client(paths, tmp_path, capsys, "ghost", "--out", str(tmp_path / "out"))[0] == 0
    issued = _cert(tmp_path / "out" / "client.cert").serial_number
    assert [c.serial_number for c in clientcerts.issued(paths)] == [issued]
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700


@pytest.mark.parametrize("name", ["", "a/b"])
def test_cert_client_with_an_invalid_name_is_a_usage_error_naming_name(paths: certs.Paths, tmp_path: Path, capsys,
                                                                       name: str):
    before = _tree(tmp_path)
    code, out, err = _cert_client(paths, tmp_path, capsys, name, "--out", str(tmp_path / "out"))
    assert (code, out) == (2, "")
    assert err.startswith(f"docker-mirror: NAME: invalid client name {name!r}: ") and err.count("\n") == 1
    assert _tree(tmp_path) == {**before, "config.yml": (tmp_path / "config.yml").read_bytes()}


def test_cert_client_without_a_ca_says_how_to_make_one(tmp_path: Path):
    paths = certs.Paths(tmp_path / "s.crt", tmp_path / "s.key", tmp_path / "ca" / "ca.crt")
    with pytest.raises(certs.CertError, match="no CA at .*cert init"):
        clientcerts.issue_client(paths, "x", tmp_path / "out")


def test_cert_revoke_adds_every_serial_of_the_name_to_a_crl_signed_by_the_ca(paths: certs.Paths, tmp_path: Path):
    for i, name in enumerate(["alice", "alice", "bob"]):
        clientcerts.issue_client(paths, name, tmp_path / f"out{i}")
    alice = {_cert(tmp_path / f"out{i}" / "client.cert").serial_number for i in (0, 1)}
    bob = _cert(tmp_path / "out2" / "client.cert").serial_number
    crl_path = tmp_path / "ca" / "crl.pem"
    clientcerts.revoke(paths, "alice", crl_path)
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert crl.is_signature_valid(_cert(paths.ca).public_key())
    assert {entry.serial_number for entry in crl} == alice
    assert check_crls(crl_path, paths.ca) == 2
    again = clientcerts.revoke(paths, "alice", crl_path)
    assert "already revoked" in again[0]
    clientcerts.revoke(paths, "bob", crl_path)
    later = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert {entry.serial_number for entry in later} == alice | {bob}
    assert later.last_update_utc > crl.last_update_utc      # OpenSSL takes the newest of two CRLs
    number = later.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    with pytest.raises(certs.CertError, match="no client certificate named 'carol'"):
        clientcerts.revoke(paths, "carol", crl_path)


def test_a_crl_of_another_ca_is_refused(paths: certs.Paths, tmp_path: Path):
    other = certs.Paths(tmp_path / "o.crt", tmp_path / "o.key", tmp_path / "other" / "ca.crt")
    certs.init(other, ["localhost"], [])
    clientcerts.issue_client(other, "x", tmp_path / "out")
    clientcerts.revoke(other, "x", tmp_path / "other-crl.pem")
    with pytest.raises(TLSError, match="is not signed by a CA in"):
        check_crls(tmp_path / "other-crl.pem", paths.ca)
    (tmp_path / "junk.pem").write_text("junk\n")
    with pytest.raises(TLSError, match="holds no PEM CRL"):
        check_crls(tmp_path / "junk.pem", paths.ca)


# --- the server contexts: handshakes over memory BIOs


def handshake(server: ServerTLS, ca: Path, client: Path | None = None) -> dict[str, str] | None:
    """A TLS handshake with the server's listening context; the certificate the server side
    sees (None: none), or ssl.SSLError when the server refuses."""
    return handshake_owed(server, ca, client)[0]


def handshake_owed(server: ServerTLS, ca: Path, client: Path | None = None) -> tuple[dict[str, str] | None, bool]:
    """:func:`handshake`, and whether the connection owes a certificate (client_auth: required)."""
    client_context = ssl.create_default_context(cafile=str(ca))
    client_context.check_hostname = False
    if client is not None:
        client_context.load_cert_chain(client / "client.cert", client / "client.key")
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client_context.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.context.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj, out, peer_in in (("c", c, c_out, s_in), ("s", s, s_out, c_in)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            break
    assert all(done.values())

    class Transport:
        def get_extra_info(self, key: str):
            return {"ssl_object": s, "sslcontext": server.context}.get(key)

    owed = clientcert.owed(Transport())
    seen = clientcert.after_handshake(Transport())
    # handed back to the listening context: no message callback on every record from now on
    assert s.context is server.context
    return seen, owed


@pytest.fixture
def issued(paths: certs.Paths, tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("alice", "bob"):
        out[name] = tmp_path / name
        clientcerts.issue_client(paths, name, out[name])
    return out


def server(paths: certs.Paths, mode: str, crl: Path | None = None, ca: Path | None = None) -> ServerTLS:
    return ServerTLS(paths.certificate, paths.key, "localhost", ClientAuth(mode, ca or paths.ca, crl))


def test_required_verifies_the_certificate_and_the_scope_names_it(paths, issued, tmp_path):
    tls = server(paths, "required")
    seen = handshake(tls, paths.ca, issued["alice"])
    serial = _cert(issued["alice"] / "client.cert").serial_number
    assert seen == {"subject": "CN=alice", "cn": "alice", "serial": f"{serial:x}"}
    # without a certificate the handshake completes (the HTTP layer answers 401 saying why:
    # refused here, the client would see only EOF): the scope names none, and says one is owed
    assert handshake_owed(tls, paths.ca) == (None, True)
    scope: dict = {}
    clientcert.attach(scope, None, owed=True)
    assert scope == {"client_certificate_required": True}
    clientcert.attach(scope := {}, seen, owed=True)
    assert scope == {"client_certificate": seen}
    # a certificate that is shown is verified all the same: another CA's, or a revoked one
    other = certs.Paths(tmp_path / "o.crt", tmp_path / "o.key", tmp_path / "other" / "ca.crt")
    certs.init(other, ["localhost"], [])
    clientcerts.issue_client(other, "alice", tmp_path / "foreign")
    with pytest.raises(ssl.SSLError):
        handshake(tls, paths.ca, tmp_path / "foreign")
    crl = tmp_path / "ca" / "crl.pem"
    clientcerts.revoke(paths, "alice", crl)
    revoked = server(paths, "required", crl)
    with pytest.raises(ssl.SSLError):
        handshake(revoked, paths.ca, issued["alice"])
    assert handshake(revoked, paths.ca, issued["bob"])["cn"] == "bob"


def test_optional_lets_a_client_without_a_certificate_through(paths, issued):
    tls = server(paths, "optional")
    assert handshake_owed(tls, paths.ca) == (None, False)
    assert handshake(tls, paths.ca, issued["bob"])["cn"] == "bob"


def test_optional_refuses_a_revoked_certificate_when_one_is_given(paths, issued, tmp_path):
    crl = tmp_path / "ca" / "crl.pem"
    clientcerts.revoke(paths, "alice", crl)
    tls = server(paths, "optional", crl)
    with pytest.raises(ssl.SSLError):
        handshake(tls, paths.ca, issued["alice"])
    assert handshake(tls, paths.ca) is None
    assert handshake(tls, paths.ca, issued["bob"])["cn"] == "bob"


def test_none_asks_for_no_certificate(paths, issued):
    assert handshake(server(paths, "none"), paths.ca, issued["bob"]) is None


def test_the_system_cas_and_another_ca_sign_no_client_certificate(paths, tmp_path, monkeypatch):
    other = certs.Paths(tmp_path / "o.crt", tmp_path / "o.key", tmp_path / "other" / "ca.crt")
    certs.init(other, ["localhost"], [])
    clientcerts.issue_client(other, "alice", tmp_path / "foreign")
    # the other CA as "the system's CAs" (OpenSSL's default verify paths read SSL_CERT_FILE)
    monkeypatch.setenv("SSL_CERT_FILE", str(other.ca))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "none"))
    tls = server(paths, "required")
    with pytest.raises(ssl.SSLError):
        handshake(tls, paths.ca, tmp_path / "foreign")


def test_a_revocation_applies_on_reload_and_a_bad_crl_keeps_the_old_one(paths, issued, tmp_path):
    crl = tmp_path / "ca" / "crl.pem"
    tls = server(paths, "required", crl)          # no CRL file yet: none is checked
    assert handshake(tls, paths.ca, issued["alice"])["cn"] == "alice"
    clientcerts.revoke(paths, "alice", crl)
    assert handshake(tls, paths.ca, issued["alice"])["cn"] == "alice"     # until the reload
    tls.reload(paths.certificate, paths.key, "localhost", ClientAuth("required", paths.ca, crl))
    assert tls.revoked == 1
    with pytest.raises(ssl.SSLError):
        handshake(tls, paths.ca, issued["alice"])
    assert handshake(tls, paths.ca, issued["bob"])["cn"] == "bob"
    good = crl.read_bytes()
    crl.write_text("not a CRL\n")
    with pytest.raises(TLSError):
        tls.reload(paths.certificate, paths.key, "localhost", ClientAuth("required", paths.ca, crl))
    with pytest.raises(ssl.SSLError):                   # the old CRL still applies
        handshake(tls, paths.ca, issued["alice"])
    crl.write_bytes(good)
    # a CRL removed (moved away, a path mistyped) once one was in force: refused, the old one applies
    crl.rename(tmp_path / "moved.pem")
    with pytest.raises(TrustLost, match=f"the CRL \\(tls.crl\\) {crl} is gone"):
        tls.reload(paths.certificate, paths.key, "localhost", ClientAuth("required", paths.ca, crl))
    with pytest.raises(ssl.SSLError):
        handshake(tls, paths.ca, issued["alice"])
    assert tls.revoked == 1 and tls.trust.revoked
    # so is another path that does not exist; a reload to client_auth: none needs no CRL
    with pytest.raises(TrustLost):
        tls.reload(paths.certificate, paths.key, "localhost", ClientAuth("optional", paths.ca, tmp_path / "typo.pem"))
    tls.reload(paths.certificate, paths.key, "localhost", ClientAuth("none", paths.ca, crl))
    assert handshake(tls, paths.ca, issued["alice"]) is None
    # a new server (a restart) starts without one
    assert handshake(server(paths, "required", crl), paths.ca, issued["alice"])["cn"] == "alice"


def test_a_reload_to_another_client_ca_no_longer_trusts_the_first(paths, issued, tmp_path):
    other = certs.Paths(tmp_path / "o.crt", tmp_path / "o.key", tmp_path / "other" / "ca.crt")
    certs.init(other, ["localhost"], [])
    clientcerts.issue_client(other, "carol", tmp_path / "carol")
    tls = server(paths, "required")
    tls.reload(paths.certificate, paths.key, "localhost", ClientAuth("required", other.ca, None))
    assert handshake(tls, paths.ca, tmp_path / "carol")["cn"] == "carol"
    with pytest.raises(ssl.SSLError):
        handshake(tls, paths.ca, issued["alice"])
    tls.reload(paths.certificate, paths.key, "localhost", ClientAuth("optional", paths.ca, None))
    assert handshake_owed(tls, paths.ca) == (None, False)       # owed only under required
    tls.reload(paths.certificate, paths.key, "localhost", ClientAuth("required", paths.ca, None))
    assert handshake_owed(tls, paths.ca) == (None, True)
    tls.reload(paths.certificate, paths.key, "localhost", ClientAuth("none", paths.ca, None))
    assert handshake(tls, paths.ca, issued["alice"]) is None


def connection_of(server: ServerTLS, ca: Path, client: Path) -> clientcert.ConnectionCertificate:
    """What the HTTP protocol keeps of a connection after its handshake (memory BIOs)."""
    client_context = ssl.create_default_context(cafile=str(ca))
    client_context.check_hostname = False
    client_context.load_cert_chain(client / "client.cert", client / "client.key")
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client_context.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(20):
        for obj, out, peer_in in ((c, c_out, s_in), (s, s_out, c_in)):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            peer_in.write(out.read())

    class Transport:
        def get_extra_info(self, key: str):
            return {"ssl_object": s, "sslcontext": server.context}.get(key)

    return clientcert.ConnectionCertificate(Transport())


def test_each_request_checks_its_connections_certificate_against_the_trust_in_force(paths, issued, tmp_path,
                                                                                    monkeypatch):
    crl = tmp_path / "ca" / "crl.pem"
    tls = server(paths, "optional", crl)
    alice, bob = connection_of(tls, paths.ca, issued["alice"]), connection_of(tls, paths.ca, issued["bob"])
    serial = f'{_cert(issued["alice"] / "client.cert").serial_number:x}'
    alice.attach(scope := {})
    assert scope == {"client_certificate": {"subject": "CN=alice", "cn": "alice", "serial": serial}}
    clientcerts.revoke(paths, "alice", crl)
    alice.attach(scope := {})
    assert "client_certificate" in scope                # until the reload
    tls.reload(paths.certificate, paths.key, "localhost", ClientAuth("optional", paths.ca, crl))
    alice.attach(scope := {})
    assert scope == {"client_certificate_refused": {"reason": "revoked", "subject": "CN=alice", "cn": "alice",
                                                    "serial": serial}}
    # refused: 401, whatever the guard's configuration (here: none at all)
    with pytest.raises(CertificateRefused) as caught:
        Guard(Rules((), None)).admit(scope)
    assert caught.value.status == 401 and caught.value.refused == "certificate-revoked"
    assert caught.value.message.startswith("the client certificate was revoked")
    bob.attach(scope := {})
    assert scope["client_certificate"]["cn"] == "bob"
    # a certificate that expires while its connection is open
    monkeypatch.setattr(clientcert.time, "time", lambda: bob.presented.not_after + 1)
    bob.attach(scope := {})
    assert scope["client_certificate_refused"]["reason"] == "expired"
    monkeypatch.undo()
    # another client CA: no longer trusted; client_auth none: not used (anonymous, as a new connection)
    other = certs.Paths(tmp_path / "o.crt", tmp_path / "o.key", tmp_path / "other" / "ca.crt")
    certs.init(other, ["localhost"], [])
    tls.reload(paths.certificate, paths.key, "localhost", ClientAuth("required", other.ca, None))
    bob.attach(scope := {})
    assert scope["client_certificate_refused"]["reason"] == "untrusted"
    tls.reload(paths.certificate, paths.key, "localhost", ClientAuth("none", paths.ca, None))
    bob.attach(scope := {})
    assert scope == {}


def test_a_missing_client_ca_is_one_line_naming_it(paths, tmp_path):
    with pytest.raises(TLSError, match=f"cannot read the client CA \\(tls.client_ca\\) {tmp_path}/nope.crt"):
        server(paths, "required", ca=tmp_path / "nope.crt")


def test_refusals_are_logged_by_reason_without_flooding(caplog):
    refusals = Refusals()
    with caplog.at_level(logging.INFO, logger="dockermirror.tls"):
        for _ in range(50):
            refusals(None, "write", None, 21, None, b"\x02\x2c")       # certificate_revoked
        refusals(None, "write", None, 21, None, b"\x02\x74")           # certificate_required
        refusals(None, "read", None, 21, None, b"\x02\x2c")            # the client's alert: not ours
        refusals(None, "write", None, 22, None, b"\x02\x2c")           # not an alert
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == ["TLS handshake refused a client: certificate revoked",
                     "TLS handshake refused a client: no client certificate given"]


# --- the request log


def test_the_request_log_names_the_subject_escaped(caplog):
    import asyncio

    from dockermirror.api.accesslog import AccessLog

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message):
        pass

    scope = {"type": "http", "method": "GET", "path": "/v2/", "query_string": b"", "client": ("10.0.0.1", 1),
             "client_certificate": {"subject": 'CN=x\n",O=evil', "cn": "x", "serial": "1"}}
    with caplog.at_level(logging.INFO, logger="dockermirror.access"):
        asyncio.run(AccessLog(app)(scope, None, send))
    line = caplog.records[-1].getMessage()
    assert line.endswith(' cert="CN=x\\x0a\\x22,O=evil"') and "\n" not in line
    scope.pop("client_certificate")
    with caplog.at_level(logging.INFO, logger="dockermirror.access"):
        asyncio.run(AccessLog(app)(scope, None, send))
    assert "cert=" not in caplog.records[-1].getMessage()


# --- client-setup


def test_client_setup_says_where_each_client_keeps_its_pair():
    from dockermirror.service.clientsetup import instructions

    common = {"tls": True, "ca_pem": "PEM", "ca_path": Path("/ca.crt"), "registries": [("docker.io", ())]}
    plain = instructions("m.example:5000", **common)
    assert "client.cert" not in plain
    text = instructions("m.example:5000", **common, client_auth="required")
    assert "docker-mirror cert client NAME --out DIR" in text
    assert "/etc/docker/certs.d/m.example:5000/client.cert" in text
    assert "/etc/containers/certs.d/m.example:5000/client.cert" in text
    assert 'client = [["/etc/containerd/docker-mirror-client.cert"' in text
    assert "client.cert" not in instructions("m.example:5000", **{**common, "tls": False}, client_auth="required")


def test_the_private_tls_message_hook_still_works_on_this_python():
    """service/tls.py logs why a client handshake was refused through CPython's private
    SSLContext._msg_callback, checked at import (MESSAGE_HOOK); without it the refusals are not
    logged. This fails when a new Python changes the hook: check it, then raise the bound."""
    from dockermirror.service import tls

    assert tls.MESSAGE_HOOK
    seen = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context._msg_callback = lambda *args: seen.append(args)
    assert context._msg_callback is not None
