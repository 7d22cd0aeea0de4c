"""check-config runs serve's TLS checks, and tls.ca is certificates only (check-config and client-setup)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockermirror import cli
from tests.support.certs import make_pki
from tests.support.pasted import heredocs

HOST = "mirror.example:5000"


def write_config(tmp_path: Path, certificate: Path, key: Path, ca: Path, enabled: str = "true") -> Path:
    path = tmp_path / "config.yml"
    path.write_text(f"listen: 127.0.0.1:5000\ncache:\n  dir: {tmp_path / 'cache'}\n"
                    f"tls:\n  enabled: {enabled}\n  certificate: {certificate}\n  key: {key}\n  ca: {ca}\n")
    return path


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case", ["missing certificate", "missing key", "other key"])
def test_check_config_refuses_the_tls_files_serve_refuses(tmp_path, capsys, case):
    pki = make_pki(tmp_path / "pki")
    certificate, key = pki.certificate, pki.key
    if case == "missing certificate":
        certificate = tmp_path / "none.crt"
        problem = f"docker-mirror: cannot read TLS certificate {certificate}: No such file or directory\n"
    elif case == "missing key":
        key = tmp_path / "none.key"
        problem = f"docker-mirror: cannot read TLS key {key}: No such file or directory\n"
    else:
        key = make_pki(tmp_path / "other").key
        problem = f"docker-mirror: TLS key {key} does not belong to certificate {certificate}\n"
    path = write_config(tmp_path, certificate, key, pki.ca)
    assert cli.main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and one_line(err) == problem


def test_check_config_accepts_a_good_pair(tmp_path, capsys):
    pki = make_pki(tmp_path / "pki")
    path = write_config(tmp_path, pki.certificate, pki.key, pki.ca)
    assert cli.main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().err == ""


def key_in_ca(tmp_path: Path, case: str) -> tuple[Path, Path, str]:
    """A tls.ca that must be refused: the CA's key, or a certificate with a key after it."""
    pki = make_pki(tmp_path / "pki")
    if case == "key":
        ca = pki.key
    elif case == "certificate and key":
        ca = tmp_path / "bundle.crt"
        ca.write_bytes(pki.ca.read_bytes() + pki.key.read_bytes())
    else:
        ca = tmp_path / "empty.crt"
        ca.write_text("not a certificate\n")
    path = write_config(tmp_path, pki.certificate, pki.key, ca)
    problem = (f"docker-mirror: {path}: tls.ca: {ca} holds no PEM certificate: give the CA certificate clients trust\n"
               if case == "no certificate" else
               f"docker-mirror: {path}: tls.ca: {ca} holds a private key (PRIVATE KEY): give the CA certificate "
               "clients trust, never a key\n")
    return path, ca, problem


@pytest.mark.parametrize("case", ["key", "certificate and key", "no certificate"])
@pytest.mark.parametrize("command", [["check-config"], ["client-setup", "--host", HOST]])
def test_a_tls_ca_with_a_private_key_or_no_certificate_is_refused(tmp_path, capsys, case, command):
    path, ca, problem = key_in_ca(tmp_path, case)
    assert cli.main([*command, "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and one_line(err) == problem
    assert "PRIVATE" not in out


def test_client_setup_pastes_only_the_certificates_of_tls_ca(tmp_path, capsys):
    pki = make_pki(tmp_path / "pki")
    ca = tmp_path / "ca.crt"
    pem = pki.ca.read_text()
    ca.write_text("Bag Attributes\n    friendlyName: docker-mirror CA\n" + pem + "# a comment\n")
    path = write_config(tmp_path, pki.certificate, pki.key, ca)
    assert cli.main(["client-setup", "--config", str(path), "--host", HOST]) == 0
    pasted = [content for name, content in heredocs(capsys.readouterr().out).items() if name.endswith("ca.crt")]
    assert pasted and all(content.strip() == pem.strip() for content in pasted)


def test_client_setup_still_shows_the_path_of_a_ca_it_cannot_read(tmp_path, capsys):
    pki = make_pki(tmp_path / "pki")
    path = write_config(tmp_path, pki.certificate, pki.key, tmp_path / "none.crt")
    assert cli.main(["client-setup", "--config", str(path), "--host", HOST]) == 0
    assert f"<contents of {tmp_path / 'none.crt'}>" in capsys.readouterr().out
    assert cli.main(["check-config", "--config", str(path)]) == 0
