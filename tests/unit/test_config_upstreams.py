"""The ``upstreams:`` list in the configuration: every mistake is one line naming file, line
and key; secrets never shown; ``--upstream`` and the single ``upstream:`` section as before."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from dockermirror import cli, config as configuration
from dockermirror.app import DockerMirror
from dockermirror.config import ConfigError
from tests.unit.fakes import UPSTREAM

TWO = """\
upstreams:
  - registry: docker.io
  - registry: ghcr.io
    url: https://ghcr.example
"""


def check_config(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dockermirror", "check-config", *args],
                          capture_output=True, text=True, timeout=60)


def secret_file(directory: Path, text: str, mode: int = 0o600, name: str = "password") -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(mode)
    return path


# (YAML, line, key, words in the message); {pw} is a password file made by the test
MISTAKES = [
    pytest.param("upstreams:\n  - registry: ghcr.io\n  - registry: quay.io\n  - registry: ghcr.io\n",
                 4, "upstreams[2].registry", "'ghcr.io' is already a name of upstreams[0] (line 2",
                 id="duplicate-name"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    aliases: [r.example]\n"
                 "  - registry: quay.io\n    aliases: [r.example]\n",
                 5, "upstreams[1].aliases", "'r.example' is already a name of upstreams[0] (line 3",
                 id="duplicate-alias"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n  - registry: quay.io\n    aliases: [ghcr.io]\n",
                 4, "upstreams[1].aliases", "'ghcr.io' is already a name of upstreams[0]", id="alias-is-other-name"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    aliases: [quay.io]\n  - registry: quay.io\n",
                 4, "upstreams[1].registry", "'quay.io' is already a name of upstreams[0] (line 3",
                 id="name-is-earlier-alias"),
    pytest.param("upstreams:\n  - registry: docker.io\n  - registry: ghcr.io\n    aliases: [index.docker.io]\n",
                 4, "upstreams[1].aliases", "are all Docker Hub", id="alias-is-docker-hub"),
    pytest.param("upstreams:\n  - registry: registry-1.docker.io\n  - registry: docker.io\n",
                 3, "upstreams[1].registry", "already a name of upstreams[0]", id="docker-hub-twice"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    aliases: [ghcr.io]\n",
                 3, "upstreams[0].aliases", "already a name of the same upstream", id="alias-is-own-name"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    aliases:\n      - a.example\n      - b.example\n"
                 "  - registry: quay.io\n    aliases:\n      - c.example\n      - b.example\n",
                 9, "upstreams[1].aliases", "'b.example' is already a name of upstreams[0] (line 5)",
                 id="alias-in-block-list"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    url: ghcr.io\n",
                 3, "upstreams[0].url", "has no scheme; write https://ghcr.io", id="url-without-scheme"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    url: ftp://ghcr.io\n",
                 3, "upstreams[0].url", "invalid URL", id="url-not-http"),
    pytest.param("upstream:\n  url: https://a.example\nupstreams:\n  - registry: ghcr.io\n",
                 3, "upstreams", "not both (upstream: is on line 1)", id="upstream-and-upstreams"),
    pytest.param("upstreams:\n  - registry: ghcr.io\nupstream:\n  url: https://a.example\n",
                 1, "upstreams", "not both (upstream: is on line 3)", id="upstreams-and-upstream"),
    pytest.param("upstreams: []\n", 1, "upstreams", "the list is empty", id="empty-list"),
    pytest.param("upstreams:\n  registry: ghcr.io\n", 1, "upstreams", "expected a list", id="not-a-list"),
    pytest.param("upstreams:\n  - ghcr.io\n", 2, "upstreams[0]", "expected a mapping", id="item-not-mapping"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n  -\n", 3, "upstreams[1]", "expected a mapping", id="item-empty"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    passwrd: x\n",
                 3, "upstreams[0].passwrd", "unknown key (known here: url, registry,", id="unknown-key"),
    pytest.param("upstreams:\n  - url: https://ghcr.io\n", 2, "upstreams[0]", "no registry",
                 id="item-without-registry"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    username: me\n    password: x\n    password_file: {pw}\n",
                 5, "upstreams[0].password_file", "password or password_file, not both", id="password-and-file"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    password: x\n",
                 3, "upstreams[0].password", "a password needs a username", id="password-without-username"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    password_file: {pw}\n",
                 3, "upstreams[0].password_file", "a password needs a username", id="file-without-username"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    username: me\n    password_file: {pw}.missing\n",
                 4, "upstreams[0].password_file", "No such file or directory", id="password-file-missing"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    username: me\n    password_file: {world}\n",
                 4, "upstreams[0].password_file", "can be read by every user", id="password-file-world-readable"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    username: me\n    password_file: {empty}\n",
                 4, "upstreams[0].password_file", "holds no password", id="password-file-empty"),
    pytest.param("upstreams:\n  - registry: ghcr.io\ncache:\n  pin:\n    - myorg/*\n    - quay.io/org/*\n",
                 6, "cache.pin", "this mirror does not serve quay.io (it serves ghcr.io)", id="pin-unknown-registry"),
    pytest.param("cache:\n  pin: [ghcr.io/org/*]\n", 2, "cache.pin", "does not serve ghcr.io (it serves docker.io)",
                 id="pin-unknown-registry-single-upstream"),
    pytest.param("upstreams:\n  - registry: ghcr\n", 2, "upstreams[0].registry", "needs a dot or a :PORT",
                 id="registry-not-host"),
    pytest.param("upstreams:\n  - registry: https://ghcr.io\n", 2, "upstreams[0].registry", "invalid registry name",
                 id="registry-is-url"),
    pytest.param("upstreams:\n  - registry: ghcr.io/org\n", 2, "upstreams[0].registry", "invalid registry name",
                 id="registry-with-path"),
    pytest.param("upstreams:\n  - registry: r.example:99999\n", 2, "upstreams[0].registry", "invalid port",
                 id="registry-port-out-of-range"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    aliases: [ghcr]\n", 3, "upstreams[0].aliases",
                 "needs a dot or a :PORT", id="alias-not-host"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    aliases: ghcr.example\n", 3, "upstreams[0].aliases",
                 "expected a list", id="aliases-not-list"),
    pytest.param("upstreams:\n  - registry: ghcr.io\n    tag_ttl: soon\n", 3, "upstreams[0].tag_ttl",
                 "invalid duration", id="tag-ttl"),
]


@pytest.fixture
def files(tmp_path):
    return {"pw": secret_file(tmp_path, "pw\n"), "world": secret_file(tmp_path, "pw\n", 0o644, "world"),
            "empty": secret_file(tmp_path, "\n", 0o600, "empty")}


@pytest.mark.parametrize("text, line, key, words", MISTAKES)
def test_each_mistake_is_one_line_with_file_line_and_key(tmp_path, files, capsys, text, line, key, words):
    path = tmp_path / "config.yml"
    path.write_text(text.format(**files))
    with pytest.raises(ConfigError) as caught:
        configuration.load(path)
    error = caught.value
    assert (error.source, error.line, error.key) == (str(path), line, key)
    assert words in error.message
    assert str(error).startswith(f"{path}:{line}: {key}: ")

    assert cli.main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"docker-mirror: {error}\n"     # one line


def test_check_config_command_reports_one_line(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(MISTAKES[0].values[0])
    result = check_config("--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"docker-mirror: {path}:4: upstreams[2].registry: "
                                          "'ghcr.io' is already a name of upstreams[0] (line 2): each registry name "
                                          "and alias must name one upstream"]


def test_check_config_never_shows_secrets(tmp_path):
    pw = secret_file(tmp_path, "file-s3cret-value\nsecond line\n", 0o640)
    path = tmp_path / "config.yml"
    path.write_text(TWO + "    username: me\n    password_file: " + str(pw) + "\n"
                    "  - registry: quay.io\n    username: you\n    password: inline-s3cret-value\n")
    result = check_config("--config", str(path))
    assert result.returncode == 0, result.stderr
    for secret in ("file-s3cret-value", "inline-s3cret-value", "second line"):
        assert secret not in result.stdout + result.stderr
    printed = yaml.safe_load(result.stdout)
    assert "upstream" not in printed
    ghcr, quay = printed["upstreams"][1], printed["upstreams"][2]
    assert ghcr["password_file"] == str(pw) and "password" not in ghcr     # read from the file: no password line
    assert quay["password"] == "********" and quay["password_file"] is None
    assert list(ghcr)[:2] == ["registry", "url"]
    # what check-config prints is a configuration that loads again (not both password and password_file)
    again = configuration.loads(result.stdout.replace("'********'", "x"))
    assert [up.registry for up in again.upstreams] == ["docker.io", "ghcr.io", "quay.io"]


@pytest.mark.parametrize("text, shown", [
    ("    username: me\n    password: 123456789\n", "123456789"),          # a number: its error named the value
    ("    username: me\n    password: [hunter2, x]\n", "hunter2"),
    ("    url: https://me:hunter2@ghcr.example\n", "hunter2"),
    ("    url: me:hunter2@ghcr.example\n", "hunter2"),
])
def test_errors_never_show_secrets(tmp_path, text, shown):
    path = tmp_path / "config.yml"
    path.write_text("upstreams:\n  - registry: ghcr.io\n" + text)
    result = check_config("--config", str(path))
    assert shown not in result.stdout + result.stderr
    if result.returncode != 0:
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
        assert f"{path}:" in result.stderr


def test_password_is_the_text_as_written():
    config = configuration.loads("upstreams:\n  - registry: ghcr.io\n    username: me\n    password: 0123\n")
    assert config.upstreams[0].password == "0123"       # not YAML 1.1's octal 83


def test_password_file_is_read_again_at_each_load(tmp_path):
    """systemctl reload loads the configuration again: a rotated password is used without a restart."""
    pw = secret_file(tmp_path, "first\n")
    path = tmp_path / "config.yml"
    path.write_text(TWO + f"    username: me\n    password_file: {pw}\n")
    assert configuration.load(path).upstreams[1].password == "first"
    pw.write_text("second\r\n")
    assert configuration.load(path).upstreams[1].password == "second"
    pw.chmod(0o604)
    with pytest.raises(ConfigError, match="can be read by every user"):
        configuration.load(path)


def test_url_defaults_to_the_registry_in_a_list():
    config = configuration.loads("upstreams:\n  - registry: docker.io\n  - registry: ghcr.io\n"
                                 "  - registry: r.example:5000\n    url: http://10.0.0.1:5000/\n")
    assert [up.url for up in config.upstreams] == ["https://registry-1.docker.io", "https://ghcr.io",
                                                   "http://10.0.0.1:5000"]


def test_serve_upstream_flag_changes_the_default_upstream_of_a_list(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(TWO)
    args = cli.parser().parse_args(["serve", "--config", str(path), "--upstream", "http://127.0.0.1:5001"])
    config = cli._load(args)
    assert [(up.registry, up.url) for up in config.registries] == [
        ("docker.io", "http://127.0.0.1:5001"), ("ghcr.io", "https://ghcr.example")]
    bad = cli.parser().parse_args(["serve", "--config", str(path), "--upstream", "127.0.0.1:5001"])
    with pytest.raises(ConfigError) as caught:
        cli._load(bad)
    assert str(caught.value).startswith("--upstream: URL '127.0.0.1:5001' has no scheme")


def test_single_upstream_section_unchanged(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text("upstream:\n  url: https://r.example:5000/\n  registry: r.example:5000\n  username: me\n"
                    "  password: pw\n")
    config = configuration.load(path)
    assert config.upstreams == ()
    assert config.registries == (config.upstream,) and config.default_upstream is config.upstream
    assert (config.upstream.url, config.upstream.registry, config.upstream.password) == (
        "https://r.example:5000", "r.example:5000", "pw")
    plain = configuration.load(_write(tmp_path, "upstream:\n  url: https://r.example\n"))
    assert plain.upstream.registry == "docker.io"
    args = cli.parser().parse_args(["serve", "--config", str(path), "--upstream", "http://127.0.0.1:5001"])
    assert cli._load(args).upstream.url == "http://127.0.0.1:5001"
    printed = yaml.safe_load(configuration.dump(config))
    assert "upstreams" not in printed and printed["upstream"]["registry"] == "r.example:5000"
    pw = secret_file(tmp_path, "from-file\n")       # the new keys work in upstream: too
    single = configuration.load(_write(tmp_path, f"upstream:\n  username: me\n  password_file: {pw}\n"
                                                 "  aliases: [hub.example]\n  tag_ttl: 1m\n"))
    assert (single.upstream.password, single.upstream.aliases, single.upstream.tag_ttl) == (
        "from-file", ("hub.example",), 60)


def _write(directory: Path, text: str) -> Path:
    path = directory / "other.yml"
    path.write_text(text)
    return path


@pytest.mark.anyio
async def test_reload_uses_a_rotated_password_file(tmp_path, registry, clock):
    """systemctl reload: the password file is read again and the upstream's next token request
    carries the new password."""
    registry.token = "t0ken"
    first = registry.push("acme/one", "1")
    second = registry.push("acme/two", "1")
    pw = secret_file(tmp_path, "first-password\n")
    path = tmp_path / "config.yml"
    path.write_text(f"upstreams:\n  - registry: docker.io\n    url: {UPSTREAM}\n    username: me\n"
                    f"    password_file: {pw}\n    token_realms: [auth.test]\ncache:\n  dir: {tmp_path / 'cache'}\n")
    app = DockerMirror(configuration.load(path), clock=clock, upstream_transport=registry.transport)

    def sent() -> list[str]:
        return [base64.b64decode(s.headers["authorization"].removeprefix("Basic ")).decode()
                for s in registry.requests("GET") if s.url.host == "auth.test"]

    async with app.running():
        transport = httpx.ASGITransport(app=app.asgi, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            got = await client.get("/v2/acme/one/manifests/1", headers={"Accept": first.media_type})
            assert got.status_code == 200
            assert sent() == ["me:first-password"]
            pw.write_text("second-password\n")
            assert app.reconfigure(configuration.load(path)) == []
            got = await client.get("/v2/acme/two/manifests/1", headers={"Accept": second.media_type})
            assert got.status_code == 200
            assert sent()[-1] == "me:second-password"


# --- an upstream that is this mirror itself

@pytest.mark.parametrize("listen, section, key", [
    ("0.0.0.0:5000", "upstream:\n  url: http://127.0.0.1:5000\n", "upstream.url"),
    ("0.0.0.0:5000", "upstream:\n  url: http://localhost:5000/\n", "upstream.url"),
    ("[::]:5000", "upstream:\n  url: http://[::1]:5000\n", "upstream.url"),
    ("127.0.0.1:5000", "upstream:\n  url: http://127.0.0.1:5000\n", "upstream.url"),
    ("127.0.0.1:5000", "upstream:\n  url: https://127.0.0.1:5000\n", "upstream.url"),    # TLS: the same port
    ("mirror.example.org:443", "upstream:\n  url: https://Mirror.Example.Org.\n", "upstream.url"),
    ("0.0.0.0:80", "upstreams:\n  - registry: docker.io\n  - registry: ghcr.io\n    url: http://127.0.0.2\n",
     "upstreams[1].url"),
])
def test_check_config_warns_of_an_upstream_that_is_this_mirror(tmp_path, capsys, listen, section, key):
    path = tmp_path / "config.yml"
    path.write_text(f"listen: {listen!r}\ncache:\n  dir: {tmp_path / 'cache'}\n" + section)
    assert cli.main(["check-config", "--config", str(path)]) == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"docker-mirror: warning: {path}: {key} ")
    assert f"is this mirror's own listen address ({listen}): every request to it would come back here" in line


@pytest.mark.parametrize("listen, url", [
    ("0.0.0.0:5000", "http://127.0.0.1:5001"),         # another port
    ("10.0.0.5:5000", "http://127.0.0.1:5000"),        # listens on another address: loopback is someone else
    ("0.0.0.0:443", "https://registry-1.docker.io"),
])
def test_check_config_says_nothing_of_an_upstream_elsewhere(tmp_path, capsys, listen, url):
    path = tmp_path / "config.yml"
    path.write_text(f"listen: {listen!r}\ncache:\n  dir: {tmp_path / 'cache'}\nupstream:\n  url: {url}\n")
    assert cli.main(["check-config", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "own listen address" not in err
