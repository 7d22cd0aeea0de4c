"""Configuration: defaults, the shipped file, and errors that name the file, key and line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dockermirror import config as configuration
from dockermirror.config import Config, ConfigError, format_duration, parse_duration, parse_size
from tests.support.certs import make_pki

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "etc" / "docker-mirror" / "config.yml"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dockermirror", *args], capture_output=True, text=True, timeout=60)


def test_defaults():
    config = Config()
    assert config.listen_address == ("0.0.0.0", 5000)
    assert config.upstream.url == "https://registry-1.docker.io"
    assert config.upstream.registry == "docker.io"
    assert config.cache.dir == Path("/var/cache/docker-mirror")
    assert config.cache.tag_ttl == 300
    assert config.tls.enabled == "auto"
    assert config.tls.certificate == Path("/etc/pki/tls/certs/docker-mirror.crt")
    assert config.tls.key == Path("/etc/pki/tls/private/docker-mirror.key")
    assert config.tls.ca == Path("/etc/pki/docker-mirror/ca.crt")
    # longer than load balancers' 60 s idle pools (nginx upstream keepalive): they never reuse a closing one
    assert config.server.keepalive_timeout == 75


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("true", "on"), ("false", "off"), ("yes", "on")])
def test_tls_switch(value, expected):
    assert configuration.loads(f"tls:\n  enabled: {value}\n").tls.enabled == expected


def test_shipped_config_is_valid_and_documents_every_key():
    loaded = configuration.load(SHIPPED)
    assert loaded == Config(source=str(SHIPPED))  # it states the defaults
    text = SHIPPED.read_text()
    effective = yaml.safe_load(configuration.dump(Config()))
    for section, values in effective.items():
        keys = values.items() if isinstance(values, dict) else [(None, values)]
        for key, _ in keys:
            assert f"{key or section}:" in text, f"{section}.{key} is not in {SHIPPED}"


def test_shipped_config_documents_upstreams_items(tmp_path):
    """The commented upstreams: example loads once uncommented, and its items (with the
    upstream: section) show every key an upstream takes."""
    lines = SHIPPED.read_text().splitlines()
    start = lines.index("#upstreams:")
    example = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        example.append(line[1:])
    secret = tmp_path / "ghcr.password"
    secret.write_text("from-the-file\n")
    secret.chmod(0o600)
    ca = make_pki(tmp_path / "pki").ca          # a CA bundle is read with the configuration
    text = "\n".join(example).replace("/etc/docker-mirror/ghcr.password", str(secret)) \
        .replace("/etc/docker-mirror/example-ca.pem", str(ca))
    config = configuration.loads(text, source="example")
    assert [up.registry for up in config.upstreams] == ["docker.io", "ghcr.io", "registry.example.org:5000"]
    assert config.upstreams[1].password == "from-the-file"
    given = {key for item in yaml.safe_load(text)["upstreams"] for key in item}
    shown = set(yaml.safe_load(SHIPPED.read_text())["upstream"])
    every = {f.name for f in dataclasses.fields(configuration.UpstreamConfig)}
    assert every - (given | shown) == set(), "keys of an upstream nowhere in the shipped config"
    assert {"registry", "aliases", "username", "password_file", "ca_bundle", "tag_ttl"} <= given


@pytest.mark.parametrize("text, expected", [
    ("30s", 30), ("5m", 300), ("1h30m", 5400), ("7d", 604800), ("250ms", 0.25), (90, 90),
])
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("seconds", [0, 0.25, 30, 300, 5400, 604800, 694861])
def test_durations_print_back(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text, expected", [
    ("1024", 1024), (4096, 4096), ("500MB", 500_000_000), ("20GiB", 20 * 2**30), ("1.5KiB", 1536),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("yaml_text, line, key, words", [
    ("listen: 0.0.0.0:5000\ncahce:\n  dir: /tmp\n", 2, "cahce", "unknown key"),
    ("cache:\n  dir: /tmp\n  tag_ttl: 5x\n", 3, "cache.tag_ttl", "invalid duration"),
    ("cache:\n  tag_ttl: [1, 2]\n", 2, "cache.tag_ttl", "expected a single value"),
    ("upstream:\n  url: ftp://example.org\n", 2, "upstream.url", "invalid URL"),
    ("upstream:\n  connect_timeout: true\n", 2, "upstream.connect_timeout", "expected a duration"),
    ("listen: 5000\n", 1, "listen", "invalid listen address"),
    ("log:\n  level: loud\n", 2, "log.level", "expected one of"),
    ("listen: 127.0.0.1:5000\nstatus_page: maybe\n", 2, "status_page", "expected true or false"),
    ("upstream: https://example.org\n", 1, "upstream", "expected a mapping"),
    ("cache:\n  dir: /a\n  dir: /b\n", 3, "cache.dir", "given twice"),
    ("cache: {dir: /a\n", 2, "", "invalid YAML"),
])
def test_errors_name_file_line_and_key(tmp_path, yaml_text, line, key, words):
    path = tmp_path / "config.yml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as caught:
        configuration.load(path)
    error = caught.value
    assert (error.source, error.line, error.key) == (str(path), line, key)
    assert words in error.message
    assert str(error).startswith(f"{path}:{line}: ")

    checked = cli("check-config", "--config", str(path))
    served = cli("serve", "--config", str(path), "--cache-dir", str(tmp_path / "cache"))
    for result in (checked, served):
        assert result.returncode == 2
        assert result.stderr.strip() == f"docker-mirror: {error}"
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists()  # refused before touching anything


def test_missing_config_file(tmp_path):
    result = cli("check-config", "--config", str(tmp_path / "nope.yml"))
    assert result.returncode == 2
    assert f"{tmp_path / 'nope.yml'}: cannot read configuration: No such file or directory" in result.stderr


def test_check_config_prints_effective_values(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text("upstream:\n  url: https://mirror.example:8443/\n  password: hunter2\n  username: me\n"
                    "cache:\n  tag_ttl: 1h\n")
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["upstream"]["url"] == "https://mirror.example:8443"
    assert printed["cache"]["tag_ttl"] == "1h"
    assert printed["upstream"]["password"] == "********"
    assert "hunter2" not in result.stdout


def test_command_line_overrides_are_checked(tmp_path):
    result = cli("serve", "--config", str(SHIPPED), "--listen", "nowhere", "--cache-dir", str(tmp_path / "c"))
    assert result.returncode == 2
    assert "--listen: invalid listen address 'nowhere'" in result.stderr
