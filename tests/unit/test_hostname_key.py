"""The top-level ``hostname:`` key and client-setup's --host: a name or an address, nothing else,
checked where they are read; an IPv6 address is bracketed wherever a host:port is made of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockermirror import cli, config as configuration
from dockermirror.config import ConfigError


@pytest.mark.parametrize("value, problem", [
    ("mirror.example.com:5000", "'mirror.example.com:5000' has a port; give the name only, e.g. mirror.example.com "
                                "(the port comes from listen:)"),
    ("https://mirror.example.com", "'https://mirror.example.com' has a scheme; give the name only, e.g. "
                                   "mirror.example.com"),
    ("mirror.example.com/v2", "'mirror.example.com/v2' has a path; give the name only, e.g. mirror.example.com"),
    ("'[fd00::5]'", "'[fd00::5]' is an IPv6 address in brackets; give it without them: fd00::5"),
    ("'[fd00::5]:5000'", "'[fd00::5]:5000' has a port; give the name only, e.g. mirror.example.com "
                         "(the port comes from listen:)"),
    ("fe80::1%eth0", "'fe80::1%eth0' is a scoped address (%eth0): clients elsewhere cannot use it; give the name "
                     "or a global address"),
    ("my_mirror!", "'my_mirror!' is not a DNS name or an IP address; give the name clients use, e.g. "
                   "mirror.example.com"),
    ("5000", "expected a non-empty string, got 5000"),
])
def test_a_hostname_that_is_no_name_is_refused_at_load(tmp_path: Path, capsys, value: str, problem: str):
    path = tmp_path / "config.yml"
    path.write_text(f"listen: 0.0.0.0:5000\nhostname: {value}\n")
    with pytest.raises(ConfigError) as refused:
        configuration.load(path)
    assert str(refused.value).startswith(f"{path}:2: hostname: {problem}"), str(refused.value)
    assert cli.main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"docker-mirror: {path}:2: hostname: {problem}") and err.count("\n") == 1


@pytest.mark.parametrize("value, loaded", [
    ("mirror.example.com", "mirror.example.com"), ("mirror.example.com.", "mirror.example.com"),
    ("box", "box"), ("localhost", "localhost"), ("10.1.2.3", "10.1.2.3"), ("fd00::5", "fd00::5"),
    ("FD00:0::5", "fd00::5"), ("''", ""),
])
def test_a_name_or_an_address_is_taken(value: str, loaded: str):
    assert configuration.loads(f"hostname: {value}\n", "c.yml").hostname == loaded


def client_setup(tmp_path: Path, capsys, config: str, *argv: str) -> tuple[int, str, str]:
    path = tmp_path / "config.yml"
    path.write_text(config)
    status = cli.main(["client-setup", "--config", str(path), "--for", "debian", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_an_ipv6_hostname_is_bracketed_in_every_address_clients_get(tmp_path: Path, capsys):
    status, out, _ = client_setup(tmp_path, capsys, "hostname: fd00::5\nlisten: '[::]:5001'\ntls: {enabled: false}\n")
    assert status == 0
    assert out.startswith("# docker-mirror at http://[fd00::5]:5001, mirroring docker.io\n"), out
    assert '"insecure-registries": ["[fd00::5]:5001"]' in out
    assert "fd00::5:5001" not in out.replace("[fd00::5]:5001", "")


@pytest.mark.parametrize("host", ["[::1", "fd00::5:5000", "fd00::5", "[fd00::5]x", "[mirror]:5000", "[::1]:",
                                  "mirror:", "my_mirror!:5000", "[fe80::1%eth0]:5000"])
def test_host_that_is_no_host_port_is_refused(tmp_path: Path, capsys, host: str):
    with pytest.raises(SystemExit) as exited:
        client_setup(tmp_path, capsys, "tls: {enabled: false}\n", "--host", host)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"docker-mirror: --host: {host!r} is not HOST:PORT") and err.count("\n") == 1, err


@pytest.mark.parametrize("host, address", [
    ("[fd00::5]:5000", "[fd00::5]:5000"), ("[::1]", "[::1]"), ("mirror.lan:5001", "mirror.lan:5001"),
    ("10.1.2.3:5000", "10.1.2.3:5000"), ("mirror.lan", "mirror.lan"),
])
def test_host_port_and_bracketed_ipv6_are_taken(tmp_path: Path, capsys, host: str, address: str):
    status, out, _ = client_setup(tmp_path, capsys, "tls: {enabled: false}\n", "--host", host)
    assert status == 0 and out.startswith(f"# docker-mirror at http://{address},"), out
