"""client-setup without --host: the configured ``hostname:``, else this host's FQDN, and the output
says which; and no step it prints, for any client system, replaces an existing daemon.json."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from dockermirror import cli
from dockermirror.service import clienttargets
from tests.support.pasted import run_pasted

DAEMON = "/etc/docker/daemon.json"
OWN = '{"storage-driver": "devicemapper", "data-root": "/srv/docker"}\n'


def client_setup(tmp_path: Path, capsys, config: str, *argv: str) -> str:
    path = tmp_path / "config.yml"
    path.write_text(config)
    assert cli.main(["client-setup", "--config", str(path), *argv]) == 0
    return capsys.readouterr().out


@pytest.fixture(autouse=True)
def unknown_system(tmp_path, monkeypatch):
    """An os-release none of the targets match: the default (Debian/modern) steps."""
    os_release = tmp_path / "os-release"
    os_release.write_text("ID=arch\n")
    monkeypatch.setattr(clienttargets, "OS_RELEASE", os_release)
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "host1.example.net")


def test_the_configured_hostname_is_the_default(tmp_path, capsys):
    out = client_setup(tmp_path, capsys, "hostname: mirror.example.com\nlisten: 0.0.0.0:5001\ntls: {enabled: false}\n")
    assert out.startswith("# docker-mirror at http://mirror.example.com:5001, mirroring docker.io\n")
    assert f"# name: mirror.example.com (hostname: in {tmp_path / 'config.yml'})" in out
    assert "host1.example.net" not in out


def test_without_hostname_it_falls_back_to_the_fqdn_and_says_so(tmp_path, capsys):
    out = client_setup(tmp_path, capsys, "listen: 0.0.0.0:5001\ntls: {enabled: false}\n")
    assert out.startswith("# docker-mirror at http://host1.example.net:5001, mirroring docker.io\n")
    note = [line for line in out.splitlines() if line.startswith("# name: ")]
    assert note and "this host's FQDN" in note[0] and "hostname: is not set" in note[0], note


def test_host_wins_and_needs_no_note(tmp_path, capsys):
    out = client_setup(tmp_path, capsys, "hostname: mirror.example.com\ntls: {enabled: false}\n",
                       "--host", "other.example.org:6000")
    assert out.startswith("# docker-mirror at http://other.example.org:6000,")
    assert "# name: " not in out and "mirror.example.com" not in out


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize("target", [None, *clienttargets.TARGETS])
def test_no_step_replaces_an_existing_daemon_json(tmp_path, capsys, target, tls):
    """Every target's steps (and the default's, for a system none matches), pasted on a client
    that has a daemon.json of its own: its keys are kept, the mirror's merged in."""
    config = "hostname: mirror.example.com\nlisten: 0.0.0.0:5000\n"
    if tls:
        from tests.support.certs import make_pki

        ca = make_pki(tmp_path / "pki").ca     # (client-setup pastes only a certificate it can parse)
        cert = tmp_path / "server.crt"
        cert.write_text("")
        config += f"tls: {{enabled: auto, ca: {ca}, certificate: {cert}}}\n"
    else:
        config += "tls: {enabled: false}\n"
    out = client_setup(tmp_path, capsys, config, *(["--for", target] if target else []))
    # every write of daemon.json the steps print is a `cat >` under the "missing or empty" test
    writes = [m.start() for m in re.finditer(r"(cat >|tee( -a)?|>>?|cp .*|mv .*)\s*/etc/docker/daemon\.json\b", out)]
    assert len(writes) == 1, out
    guard = out.rfind("\nif ", 0, writes[0])
    assert out[guard:writes[0]].startswith('\nif [ -z "$now" ] || [ "$now" = \'{}\' ]; then'), out[guard:writes[0]]
    root = tmp_path / "pasted"
    (root / "etc/docker").mkdir(parents=True)
    (root / "etc/docker/daemon.json").write_text(OWN)
    result = run_pasted(out, root)
    merged = json.loads(result.files[DAEMON])
    assert {k: merged[k] for k in json.loads(OWN)} == json.loads(OWN)
    assert merged["registry-mirrors"] == [f"{'https' if tls else 'http'}://mirror.example.com:5000"]


@pytest.mark.parametrize("fqdn", ["localhost", "localhost.localdomain", "127.0.0.1", "::1", "", "under_score.lan"])
def test_an_fqdn_clients_cannot_use_falls_back_to_the_host_name_and_says_so(tmp_path, capsys, monkeypatch, fqdn):
    """/etc/hosts listing ``127.0.0.1 localhost box`` makes getfqdn() say localhost."""
    monkeypatch.setattr(socket, "getfqdn", lambda *a: fqdn)
    monkeypatch.setattr(socket, "gethostname", lambda: "box")
    out = client_setup(tmp_path, capsys, "listen: 0.0.0.0:5001\ntls: {enabled: false}\n")
    assert out.startswith("# docker-mirror at http://box:5001, mirroring docker.io\n"), out
    steps = "\n".join(line for line in out.splitlines() if not line.startswith("# name: "))
    assert f"/{fqdn}:5001" not in steps and f'"{fqdn}:5001' not in steps
    assert "[::1]" not in steps and "box:5001" in steps
    note = [line for line in out.splitlines() if line.startswith("# name: ")]
    assert note == [f"# name: box (this host's name: its FQDN {fqdn!r} is no name clients can use, and hostname: "
                    f"is not set in {tmp_path / 'config.yml'}; set it to the name clients use); or give --host "
                    "NAME:PORT"], note


@pytest.mark.parametrize("short", ["localhost", "localhost6", ""])
def test_no_usable_name_at_all_asks_for_hostname_or_host(tmp_path, capsys, monkeypatch, short):
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "localhost")
    monkeypatch.setattr(socket, "gethostname", lambda: short)
    path = tmp_path / "config.yml"
    path.write_text("listen: 0.0.0.0:5001\ntls: {enabled: false}\n")
    assert cli.main(["client-setup", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"docker-mirror: --host: this host has no name clients can use (its FQDN is 'localhost', its "
                   f"host name {short!r}); set hostname: in {path} to the name clients use, or give --host "
                   "NAME:PORT\n")
    # with --host it needs none
    assert cli.main(["client-setup", "--config", str(path), "--host", "mirror.lan:5001"]) == 0
    assert capsys.readouterr().out.startswith("# docker-mirror at http://mirror.lan:5001,")


def test_the_server_checks_its_certificate_against_the_same_name(monkeypatch):
    """serve warns when the certificate does not cover the mirror's name: the name client-setup
    and cert init use, not localhost."""
    from dockermirror import config as configuration
    from dockermirror.service.server import public_hostname

    monkeypatch.setattr(socket, "getfqdn", lambda *a: "localhost")
    monkeypatch.setattr(socket, "gethostname", lambda: "box")
    assert public_hostname(configuration.loads("listen: 0.0.0.0:5000\n", "c.yml")) == "box"
    assert public_hostname(configuration.loads("hostname: m.example\n", "c.yml")) == "m.example"
