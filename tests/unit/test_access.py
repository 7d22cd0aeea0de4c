"""Who may pull (issue 16): the ``access:`` rules (parsing with lines, first match, default
deny, networks, patterns per upstream, shadowed rules), the guard in every request (401 vs
403, nothing reaches the upstream when denied, blobs checked like manifests, /v2/, identity in
the request log, reload), and ``docker-mirror access check``."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import bcrypt
import httpx
import pytest

from dockermirror import cli
from dockermirror import config as configuration
from dockermirror.access.guard import Guard
from dockermirror.access.identity import ANONYMOUS, Identity
from dockermirror.access.rules import Rules, client_address
from dockermirror.app import DockerMirror
from dockermirror.config import ConfigError
from dockermirror.routing import RegistryTable
from tests.unit.fakes import ALL_MANIFESTS, FakeClock, FakeRegistry

ACCEPT = [("Accept", a) for a in ALL_MANIFESTS]
ACCEPT_H = {"Accept": ", ".join(ALL_MANIFESTS)}
HEAD = """listen: 127.0.0.1:5000
tls:
  enabled: false
upstreams:
  - registry: docker.io
    url: https://registry.test
  - registry: ghcr.io
    url: https://ghcr.test
    aliases: [ghcr.example.org]
cache:
  dir: {cache_dir}
"""
RULES = """access:
  - allow: [anonymous]
    from: [10.0.0.0/8, "2001:db8::/32"]
    repositories: ["docker.io/library/*"]
  - deny: [user:mallory]
  - allow: [user:ci, cert:build-runner]
    repositories: ["ghcr.io/myorg/*", "docker.io/*"]
"""
TABLE = RegistryTable([("docker.io", ()), ("ghcr.io", ("ghcr.example.org",))])


def config_of(rules: str, cache_dir: Path = Path("/nonexistent")) -> configuration.Config:
    return configuration.loads(HEAD.format(cache_dir=cache_dir) + rules)


def rules_of(text: str) -> Rules:
    return Rules(config_of(text).access, TABLE)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        config_of(text)
    return str(caught.value)


# --- parsing: every error names its line (HEAD is 11 lines: access: is line 12)


@pytest.mark.parametrize("rules, where", [
    ("access:\n  - allow: [anonymous]\n    deny: [user:x]\n", "<string>:13: access[0]: a rule needs one of allow"),
    ("access:\n  - repositories: ['*']\n", "<string>:13: access[0]: a rule needs one of allow"),
    ("access:\n  - allow: [anonymous]\n    to: [x]\n", "<string>:14: access[0].to: unknown key"),
    ("access:\n  - allow: [anonymous]\n  - allow: [nobody]\n", "<string>:14: access[1].allow[0]: invalid identity"),
    ("access:\n  - allow: ['user:']\n", "<string>:13: access[0].allow[0]: invalid identity"),
    ("access:\n  - allow: [user: ci]\n", "<string>:13: access[0].allow[0]: expected a single value (a colon"),
    ("access:\n  - allow: [anonymous]\n    from:\n      - 10.0.0.0/8\n      - 10.1.2.3/8\n",
     "<string>:16: access[0].from[1]: invalid network '10.1.2.3/8'"),
    ("access:\n  - allow: [anonymous]\n    from: ['::ffff:10.0.0.0/104']\n",
     "<string>:14: access[0].from[0]: network '::ffff:10.0.0.0/104' is IPv4-mapped"),
    ("access:\n  - allow: [anonymous]\n    repositories: [Library/X]\n",
     "<string>:14: access[0].repositories[0]: invalid repository pattern"),
    ("access:\n  - allow: [anonymous]\n    repositories: [quay.io/x/*]\n",
     "<string>:13: access[0].repositories: repository pattern 'quay.io/x/*': this mirror does not serve quay.io"),
    ("access:\n  - allow: [anonymous]\n    repositories: [ghcr.io]\n",
     "<string>:13: access[0].repositories: repository pattern 'ghcr.io': ghcr.io names a registry: add the "
     "repositories, as in ghcr.io/*"),
    ("access:\n  - allow: []\n", "<string>:13: access[0].allow: expected a list with at least one entry"),
    ("access:\n  - allow: anonymous\n", "<string>:13: access[0].allow: expected a list"),
    ("access:\n  allow: [anonymous]\n", "<string>:13: access: expected a list of rules"),
    ("access:\n  - allow: [anonymous]\n    allow: [anonymous]\n", "<string>:14: access[0].allow: key given twice"),
])
def test_rule_errors_name_their_line(rules, where):
    assert where in error_of(rules)


def test_rules_are_kept_with_their_index_and_line():
    rules = config_of(RULES).access
    assert [(r.index, r.line, r.action) for r in rules] == [(0, 13, "allow"), (1, 16, "deny"), (2, 17, "allow")]
    assert rules[1].repositories == ("*",) and rules[1].networks is None
    assert rules[0].networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    # the effective configuration shows them, and loads back the same
    again = configuration.loads(configuration.dump(config_of(RULES)))
    assert [(r.allow, r.identities, r.networks, r.repositories) for r in again.access] == \
        [(r.allow, r.identities, r.networks, r.repositories) for r in rules]


# --- deciding


def decide(rules: Rules, who: str, address: str | None, name: str) -> tuple[bool, int | None]:
    route = TABLE.route(name)
    decision = rules.decide(Identity.parse(who), client_address(address), route.registry, route.repository)
    return decision.allowed, decision.rule.index if decision.rule else None


def test_first_match_wins_and_no_match_is_denied():
    rules = rules_of(RULES)
    assert decide(rules, "user:ci", None, "ghcr.io/myorg/app") == (True, 2)
    assert decide(rules, "user:ci", None, "ghcr.io/other/app") == (False, None)       # default deny
    assert decide(rules, "user:mallory", None, "ghcr.io/myorg/app") == (False, 1)     # before the allow
    assert decide(rules, "cert:build-runner", None, "busybox") == (True, 2)
    assert decide(rules, "anonymous", "10.1.2.3", "busybox") == (True, 0)
    assert decide(rules, "anonymous", "10.1.2.3", "myorg/app") == (False, None)      # not library/


def test_no_rules_allow_everyone():
    assert rules_of("").decide(ANONYMOUS, None, "docker.io", "library/x").allowed


@pytest.mark.parametrize("address, allowed", [
    ("10.200.0.1", True), ("11.0.0.1", False), ("::ffff:10.1.2.3", True), ("::ffff:11.1.2.3", False),
    ("2001:db8::5", True), ("2001:db9::5", False), ("fe80::1%eth0", False), (None, False), ("testclient", False),
])
def test_source_networks(address, allowed):
    assert decide(rules_of(RULES), "anonymous", address, "library/busybox")[0] is allowed


@pytest.mark.parametrize("pattern, name, matches", [
    ("docker.io/library/*", "busybox", True),
    ("docker.io/library/*", "docker.io/library/busybox", True),
    ("docker.io/library/*", "ghcr.io/library/busybox", False),
    ("library/centos", "centos", True),           # no registry: the default upstream, as cache.pin
    ("centos", "library/centos", True),
    ("centos", "ghcr.io/centos", False),
    ("ghcr.io/myorg/*", "ghcr.io/myorg/team/app", True),     # * takes / too
    ("ghcr.io/myorg/*", "ghcr.example.org/myorg/app", True),  # an alias is the same upstream
    ("ghcr.example.org/myorg/*", "ghcr.io/myorg/app", True),
    ("ghcr.io/myorg/*", "ghcr.io/myorganisation/app", False),
    ("ghcr.io/*", "ghcr.io/anything/at/all", True),
    ("ghcr.io/*", "busybox", False),
    ("docker.io/*", "someone/app", True),
    ("*", "ghcr.io/x/y", True),
    ("*", "busybox", True),
    ("myorg/app?", "myorg/app1", True),
])
def test_patterns_name_their_upstream(pattern, name, matches):
    rules = rules_of(f"access:\n  - allow: ['*']\n    repositories: ['{pattern}']\n")
    assert decide(rules, "user:x", None, name)[0] is matches


@pytest.mark.parametrize("identities, who, matches", [
    ("['*']", "anonymous", True), ("['*']", "cert:a", True),
    ("[authenticated]", "anonymous", False), ("[authenticated]", "user:a", True), ("[authenticated]", "cert:a", True),
    ("['user:*']", "user:a", True), ("['user:*']", "cert:a", False), ("['cert:*']", "cert:a", True),
    ("[user:a]", "user:a", True), ("[user:a]", "cert:a", False), ("[cert:a]", "user:a", False),
    ("[anonymous]", "user:a", False),
])
def test_identities(identities, who, matches):
    assert decide(rules_of(f"access:\n  - allow: {identities}\n"), who, None, "x")[0] is matches


# --- rules that never apply


@pytest.mark.parametrize("rules, shadowed", [
    (RULES, []),
    ("access:\n  - allow: ['*']\n  - deny: [anonymous]\n    repositories: [x]\n", [(1, 0)]),
    ("access:\n  - allow: [authenticated]\n    repositories: [ghcr.io/*]\n"
     "  - deny: [user:a, cert:b]\n    repositories: [ghcr.io/myorg/*, ghcr.example.org/x]\n", [(1, 0)]),
    ("access:\n  - allow: [authenticated]\n  - deny: [user:a, anonymous]\n", []),
    ("access:\n  - allow: ['user:*']\n    from: [10.0.0.0/8]\n  - allow: [user:a]\n    from: [10.1.0.0/16]\n"
     "  - allow: [user:a]\n  - allow: [user:a]\n    from: ['2001:db8::/32']\n", [(1, 0), (3, 2)]),
    ("access:\n  - allow: [user:a]\n    from: [10.0.0.0/16]\n  - deny: [user:a]\n    from: [10.1.0.0/16, 10.0.1.0/24]\n"
     "  - deny: [user:a]\n    from: [10.0.2.0/24]\n", [(2, 0)]),
    ("access:\n  - allow: [user:a]\n    repositories: [library/*]\n"
     "  - deny: [user:a]\n    repositories: [library/b*, busybox]\n"
     "  - deny: [user:a]\n    repositories: [docker.io/*]\n", [(1, 0)]),
    ("access:\n  - allow: [user:a]\n    repositories: ['library/a?']\n"
     "  - deny: [user:a]\n    repositories: [library/a*]\n  - deny: [user:a]\n    repositories: [library/ab]\n",
     [(2, 0)]),
])
def test_shadowed_rules(rules, shadowed):
    assert [(r.index, by.index) for r, (by,) in rules_of(rules).shadowed()] == shadowed


@pytest.mark.parametrize("rules, shadowed", [
    # patterns: library/alpine by rule 0, ghcr.io/myorg/app by rule 1
    ("access:\n  - allow: [anonymous]\n    repositories: [docker.io/library/*]\n"
     "  - deny: [anonymous]\n    repositories: [ghcr.io/*]\n"
     "  - allow: [anonymous]\n    repositories: [library/alpine, ghcr.io/myorg/app]\n", [(2, (0, 1))]),
    # ... not when a pattern reaches beyond them (docker.io/myorg/app)
    ("access:\n  - allow: [anonymous]\n    repositories: [docker.io/library/*]\n"
     "  - deny: [anonymous]\n    repositories: [ghcr.io/*]\n"
     "  - allow: [anonymous]\n    repositories: [library/alpine, docker.io/myorg/app]\n", []),
    # identities: user:a by one rule, user:b by another; authenticated = user:* and cert:*
    ("access:\n  - allow: [user:a]\n  - deny: [user:b]\n  - allow: [user:a, user:b]\n    repositories: [x]\n",
     [(2, (0, 1))]),
    ("access:\n  - allow: ['user:*']\n  - deny: ['cert:*']\n  - deny: [authenticated]\n"
     "  - deny: ['*']\n", [(2, (0, 1))]),
    ("access:\n  - allow: ['user:*']\n  - deny: ['cert:*']\n  - deny: [anonymous]\n"
     "  - deny: ['*']\n", [(3, (0, 1, 2))]),
    # names of users never make up user:*
    ("access:\n  - allow: [user:a]\n  - allow: [user:b]\n  - deny: ['user:*']\n", []),
    # networks: two halves make the whole; one half and a gap do not; "anywhere" only from a rule without from:
    ("access:\n  - allow: [user:a]\n    from: [10.0.0.0/9]\n  - deny: [user:a]\n    from: [10.128.0.0/10]\n"
     "  - allow: [user:a]\n    from: [10.192.0.0/10]\n  - deny: [user:a]\n    from: [10.0.0.0/8]\n",
     [(3, (0, 1, 2))]),
    ("access:\n  - allow: [user:a]\n    from: [10.0.0.0/9]\n  - deny: [user:a]\n    from: [10.192.0.0/10]\n"
     "  - deny: [user:a]\n    from: [10.0.0.0/8]\n", []),
    ("access:\n  - allow: [user:a]\n    from: [0.0.0.0/0]\n  - allow: [user:a]\n    from: ['::/0']\n"
     "  - deny: [user:a]\n", []),
    # every repository of every upstream: each configured registry's
    ("access:\n  - allow: [anonymous]\n    repositories: [docker.io/*]\n"
     "  - deny: [anonymous]\n    repositories: [ghcr.io/*]\n  - deny: [anonymous]\n", [(2, (0, 1))]),
    ("access:\n  - allow: [anonymous]\n    repositories: [docker.io/*]\n  - deny: [anonymous]\n", []),
    # pieces in several dimensions at once: each piece by its own rules
    ("access:\n  - allow: [user:a]\n    from: [10.0.0.0/9]\n    repositories: [library/*]\n"
     "  - allow: [user:a]\n    from: [10.128.0.0/9]\n    repositories: [docker.io/*]\n"
     "  - deny: [user:b]\n    repositories: [library/*]\n"
     "  - allow: [user:a, user:b]\n    from: [10.0.0.0/8]\n    repositories: [library/x]\n", [(3, (0, 1, 2))]),
    ("access:\n  - allow: [user:a]\n    from: [10.0.0.0/9]\n    repositories: [library/*]\n"
     "  - allow: [user:a]\n    from: [10.128.0.0/9]\n    repositories: [library/y]\n"
     "  - allow: [user:a]\n    from: [10.0.0.0/8]\n    repositories: [library/x]\n", []),
])
def test_rules_shadowed_by_several_together(rules, shadowed):
    assert [(r.index, tuple(e.index for e in by)) for r, by in rules_of(rules).shadowed()] == shadowed


def test_check_config_warns_of_rules_that_never_apply(tmp_path, capsys):
    path = tmp_path / "config.yml"
    (tmp_path / "htpasswd").write_text("")
    path.write_text(HEAD.format(cache_dir=tmp_path) + RULES
                    + "  - allow: [user:ci]\n    repositories: [ghcr.io/myorg/app]\n"
                    + f"auth:\n  htpasswd: {tmp_path / 'htpasswd'}\n")
    assert cli.main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "access:\n- allow:\n  - anonymous\n  from:\n  - 10.0.0.0/8" in out
    assert err == (f"docker-mirror: warning: {path}:19: access[3] (allow) never applies: access[2] (line 17) "
                   "(allow) already matches every request it matches\n")



def test_check_config_names_the_rules_that_shadow_one_together(tmp_path, capsys):
    path = tmp_path / "config.yml"
    path.write_text(HEAD.format(cache_dir=tmp_path) + "access:\n"
                    "  - allow: [anonymous]\n    repositories: [docker.io/library/*]\n"
                    "  - deny: [anonymous]\n    repositories: [ghcr.io/*]\n"
                    "  - allow: [anonymous]\n    repositories: [library/alpine, ghcr.io/myorg/app]\n")
    assert cli.main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().err == (
        f"docker-mirror: warning: {path}:17: access[2] (allow) never applies: access[0] (line 13) (allow), "
        "access[1] (line 15) (deny) together already match every request it matches\n")


def test_check_config_warns_of_users_without_a_password_file(tmp_path, capsys):
    path = tmp_path / "config.yml"
    path.write_text(HEAD.format(cache_dir=tmp_path) + "access:\n  - allow: [anonymous]\n    repositories: [x]\n"
                    "  - allow: [cert:a, user:ci]\n")
    assert cli.main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().err == (f"docker-mirror: warning: {path}:15: access[1] names user:ci, but there are "
                                       "no users without auth.htpasswd\n")
    path.write_text(path.read_text() + f"auth:\n  htpasswd: {tmp_path / 'htpasswd'}\n")
    (tmp_path / "htpasswd").write_text("")
    assert cli.main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().err == ""


# --- access check


def access_check(tmp_path: Path, capsys, *args: str, rules: str = RULES) -> tuple[int, str, str]:
    path = tmp_path / "config.yml"
    path.write_text(HEAD.format(cache_dir=tmp_path) + rules)
    code = cli.main(["access", "check", *args, "--config", str(path)])
    out, err = capsys.readouterr()
    return code, out.replace(str(path), "CONFIG"), err


def test_access_check_prints_the_deciding_rule(tmp_path, capsys):
    assert access_check(tmp_path, capsys, "user:ci", "ghcr.io/myorg/app") == (
        0, "allow: access[2] (line 17) of CONFIG decides for user:ci pulling ghcr.io/myorg/app\n", "")
    assert access_check(tmp_path, capsys, "user:mallory", "busybox") == (
        1, "deny: access[1] (line 16) of CONFIG decides for user:mallory pulling docker.io/library/busybox\n", "")
    assert access_check(tmp_path, capsys, "anonymous", "busybox", "--from", "::ffff:10.0.0.9") == (
        0, "allow: access[0] (line 13) of CONFIG decides for anonymous from ::ffff:10.0.0.9 pulling "
           "docker.io/library/busybox\n", "")
    assert access_check(tmp_path, capsys, "anonymous", "busybox") == (
        1, "deny: default deny: no rule of access: matches anonymous pulling docker.io/library/busybox\n", "")
    assert access_check(tmp_path, capsys, "anonymous", "busybox", rules="") == (
        0, "allow: no rules: anyone may pull (anonymous pulling docker.io/library/busybox)\n", "")
    code, out, err = access_check(tmp_path, capsys, "root", "busybox")
    assert (code, out) == (2, "") and "invalid identity 'root'" in err
    code, out, err = access_check(tmp_path, capsys, "anonymous", "quay.io/x/y")
    assert (code, out) == (2, "") and "does not serve quay.io" in err
    code, out, err = access_check(tmp_path, capsys, "anonymous", "x", "--from", "10.0.0.300")
    assert (code, out) == (2, "") and "invalid address" in err


# --- the guard in the running mirror


PASSWORDS = {"ci": "ci-secret", "mallory": "mallory-secret"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class WithCertificate:
    """What the TLS layer does for a verified client certificate: a key in the scope."""

    def __init__(self, app, certificate: dict[str, str] | None) -> None:
        self.app, self.certificate = app, certificate

    async def __call__(self, scope, receive, send):
        if self.certificate is not None and scope["type"] == "http":
            scope = {**scope, "client_certificate": self.certificate}
        await self.app(scope, receive, send)


class Mirror:
    def __init__(self, app: DockerMirror, registry: FakeRegistry) -> None:
        self.app, self.registry = app, registry

    def client(self, address: str = "192.0.2.7", certificate: dict[str, str] | None = None) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=WithCertificate(self.app.asgi, certificate), client=(address, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://mirror.test", headers=ACCEPT_H)

    def use(self, rules: str, users: dict[str, str] | None = PASSWORDS) -> None:
        """New rules and users (auth.htpasswd), applied as a reload applies them."""
        auth = ""
        if users is not None:
            path = self.app.config.cache.dir.parent / "htpasswd"
            path.write_text("".join(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}\n"
                                    for user, password in users.items()))
            auth = f"auth:\n  htpasswd: {path}\n"
        self.app.reconfigure(config_of(rules + auth, self.app.config.cache.dir))


@pytest.fixture
async def access(tmp_path: Path) -> AsyncIterator[Mirror]:
    registry = FakeRegistry()
    app = DockerMirror(config_of("", tmp_path / "cache"), clock=FakeClock(), upstream_transport=registry.transport)
    async with app.running():
        yield Mirror(app, registry)


def errors(response: httpx.Response) -> dict:
    return json.loads(response.content)["errors"][0]


@pytest.mark.anyio
async def test_a_denied_user_gets_403_naming_the_rule_and_nothing_reaches_the_upstream(access):
    access.registry.push("library/busybox", "1")
    access.use(RULES)
    async with access.client() as client:
        denied = await client.get("/v2/library/busybox/manifests/1", headers=basic("mallory", "mallory-secret"))
        assert denied.status_code == 403
        assert "www-authenticate" not in denied.headers
        assert errors(denied) == {
            "code": "DENIED",
            "message": "user:mallory may not pull docker.io/library/busybox: denied by rule access[1] (line 16) "
                       "of access:",
            "detail": {"repository": "docker.io/library/busybox", "rule": 1, "line": 16}}
        other = await client.get("/v2/ghcr.io/other/app/tags/list", headers=basic("ci", "ci-secret"))
        assert other.status_code == 403
        assert errors(other)["detail"] == {"repository": "ghcr.io/other/app", "rule": "default deny"}
        assert access.registry.seen == []
        allowed = await client.get("/v2/library/busybox/manifests/1", headers={**basic("ci", "ci-secret")})
        assert allowed.status_code == 200
        assert access.registry.requests(path_contains="/v2/library/busybox/manifests/")


@pytest.mark.anyio
async def test_anonymous_gets_401_where_credentials_could_help_and_403_where_not(access):
    access.use(RULES)
    async with access.client() as client:
        asked = await client.get("/v2/library/busybox/manifests/1")
        assert asked.status_code == 401
        assert asked.headers["www-authenticate"] == 'Basic realm="docker-mirror"'
        assert errors(asked)["code"] == "UNAUTHORIZED"
        # only a certificate could: 403, saying so
        access.use("access:\n  - allow: [cert:build-runner]\n")
        refused = await client.get("/v2/library/busybox/manifests/1")
        assert refused.status_code == 403 and "a client certificate may be allowed" in errors(refused)["message"]
        # nobody could
        access.use("access:\n  - deny: ['user:*']\n  - allow: [user:ci]\n")
        assert (await client.get("/v2/library/busybox/manifests/1")).status_code == 403
        # without a password file, no challenge is offered
        access.use(RULES, users=None)
        nobody = await client.get("/v2/library/busybox/manifests/1")
        assert nobody.status_code == 403 and "www-authenticate" not in nobody.headers
    assert access.registry.seen == []


@pytest.mark.anyio
async def test_wrong_or_malformed_credentials_get_401(access, caplog):
    caplog.set_level(logging.INFO, "dockermirror.access")
    access.registry.push("library/busybox", "1")
    access.use(RULES)
    async with access.client(address="10.0.0.1") as client:
        for headers in (basic("ci", "wrong"), basic("nobody", "ci-secret"), {"Authorization": "Basic !!!"}):
            response = await client.get("/v2/library/busybox/manifests/1", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == 'Basic realm="docker-mirror"'
            assert errors(response)["code"] == "UNAUTHORIZED"
            assert "secret" not in response.text and "nobody" not in response.text
        # ... even where anonymous may pull; and /v2/ too
        assert (await client.get("/v2/", headers=basic("ci", "wrong"))).status_code == 401
        # an empty login, or another scheme, is anonymous (here: may pull library/)
        assert (await client.get("/v2/library/busybox/manifests/1",
                                 headers={"Authorization": "Basic Og=="})).status_code == 200
        assert (await client.get("/v2/library/busybox/manifests/1",
                                 headers={"Authorization": "Bearer abc"})).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "dockermirror.access"]
    assert "(user 'nobody')" in lines[1] and "(user 'ci')" in lines[0]
    assert "ci-secret" not in "".join(lines) and basic("ci", "wrong")["Authorization"][6:] not in "".join(lines)
    assert access.registry.requests("GET", "/manifests/") and len(access.registry.requests("GET", "/manifests/")) == 1


@pytest.mark.anyio
async def test_blobs_are_checked_against_their_repository(access):
    """A blob in the cache (pulled by someone allowed) is checked against the repository it is
    asked through, as a manifest is. (Whether a cached blob may be served through another
    repository the client may pull is the mirror's cross-repository check, not a rule's.)"""
    image = access.registry.push("myorg/private", "1")
    access.use("access:\n  - allow: [user:ci]\n    repositories: [myorg/*]\n  - allow: [user:mallory]\n"
               "    repositories: [library/*]\n")
    async with access.client() as client:
        got = await client.get(f"/v2/myorg/private/blobs/{image.layer}", headers=basic("ci", "ci-secret"))
        assert got.status_code == 200 and got.content == image.blobs[image.layer]
        seen = len(access.registry.seen)
        path = f"/v2/myorg/private/blobs/{image.layer}"
        for method in ("GET", "HEAD"):
            anonymous = await client.request(method, path)
            assert anonymous.status_code == 401, method
            assert "docker-content-digest" not in anonymous.headers
            denied = await client.request(method, path, headers=basic("mallory", "mallory-secret"))
            assert denied.status_code == 403, method
            assert image.blobs[image.layer] not in anonymous.content + denied.content
        ranged = await client.get(path, headers={"Range": "bytes=0-3", **basic("mallory", "mallory-secret")})
        assert ranged.status_code == 403
        assert (await client.get(f"/v2/myorg/private/referrers/{image.layer}")).status_code == 401
        assert (await client.get("/v2/myorg/private/tags/list")).status_code == 401
        assert len(access.registry.seen) == seen


@pytest.mark.anyio
async def test_the_v2_ping(access):
    access.use(RULES)
    # anonymous may pull nothing from here: challenged, so that clients send their credentials
    async with access.client(address="192.0.2.7") as client:
        ping = await client.get("/v2/")
        assert ping.status_code == 401 and ping.headers["www-authenticate"] == 'Basic realm="docker-mirror"'
        assert (await client.get("/v2/", headers=basic("ci", "ci-secret"))).status_code == 200
        assert (await client.get("/v2/", headers=basic("mallory", "mallory-secret"))).status_code == 200
    # from 10/8 anonymous may pull library/: 200
    async with access.client(address="10.9.9.9") as client:
        assert (await client.get("/v2/")).status_code == 200
    # no password file: nothing to ask for
    access.use(RULES, users=None)
    async with access.client() as client:
        assert (await client.get("/v2/")).status_code == 200


@pytest.mark.anyio
async def test_a_client_certificate_is_the_identity(access, caplog):
    caplog.set_level(logging.INFO, "dockermirror.access")
    image = access.registry.push("myorg/app", "1")
    access.use(RULES)
    runner = {"subject": "CN=build-runner,O=Example \"CI\"", "cn": "build-runner", "serial": "1f"}
    async with access.client(certificate=runner) as client:
        # a certificate is enough; Basic credentials next to it are not looked at
        assert (await client.get("/v2/myorg/app/manifests/1", headers=ACCEPT)).status_code == 200
        assert (await client.get("/v2/myorg/app/manifests/1", headers=basic("ci", "wrong"))).status_code == 200
    other = {"subject": "CN=laptop", "cn": "laptop", "serial": "20"}
    async with access.client(certificate=other) as client:
        assert (await client.get(f"/v2/myorg/app/blobs/{image.layer}")).status_code == 403
    lines = [r.getMessage() for r in caplog.records if r.name == "dockermirror.access"]
    assert ' identity=cert:build-runner cert="CN=build-runner,O=Example \\x22CI\\x22"' in lines[0]
    assert ' identity=cert:laptop cert="CN=laptop"' in lines[2] and '403' in lines[2]


@pytest.mark.anyio
async def test_the_identity_is_in_the_request_log(access, caplog):
    caplog.set_level(logging.INFO, "dockermirror.access")
    access.registry.push("library/busybox", "1")
    async with access.client() as client:
        await client.get("/v2/library/busybox/manifests/1")                      # no rules: as before
        access.use(RULES)
        await client.get("/v2/library/busybox/manifests/1", headers={**basic("ci", "ci-secret")})
        await client.get("/v2/library/busybox/manifests/1")
        await client.get("/v2/library/busybox/manifests/1", headers=basic("mallory", "mallory-secret"))
    access.use(RULES, users=None)
    evil = {"subject": "CN=a b\nFAKE", "cn": "a b\nFAKE", "serial": "1"}
    async with access.client(certificate=evil) as client:
        await client.get("/v2/library/busybox/manifests/1")
    lines = [r.getMessage() for r in caplog.records if r.name == "dockermirror.access"]
    assert "identity=" not in lines[0] and " 200 " in lines[0]
    assert lines[1].endswith(" identity=user:ci") and " 200 " in lines[1]
    assert " identity=anonymous note=\"UNAUTHORIZED: " in lines[2] and " 401 " in lines[2]
    assert " identity=user:mallory note=\"DENIED: " in lines[3] and " 403 " in lines[3]
    assert ' identity="cert:a b\\x0aFAKE" cert="CN=a b\\x0aFAKE"' in lines[4] and "\n" not in lines[4]


@pytest.mark.anyio
async def test_no_rules_and_no_users_is_todays_mirror(access, caplog):
    caplog.set_level(logging.INFO, "dockermirror.access")
    image = access.registry.push("myorg/app", "1")
    assert not access.app.api.guard.active
    async with access.client(address="203.0.113.9") as client:
        assert (await client.get("/v2/")).status_code == 200
        assert (await client.get("/v2/myorg/app/manifests/1", headers=basic("x", "y"))).status_code == 200
        assert (await client.get(f"/v2/ghcr.io/myorg/app/blobs/{image.layer}")).status_code == 200
    assert all("identity=" not in r.getMessage() for r in caplog.records if r.name == "dockermirror.access")


@pytest.mark.anyio
async def test_users_without_rules_may_pull_everything_and_anonymous_nothing(access):
    access.registry.push("library/busybox", "1")
    access.use("")
    async with access.client() as client:
        assert (await client.get("/v2/")).status_code == 401
        assert (await client.get("/v2/library/busybox/manifests/1")).status_code == 401
        ok = await client.get("/v2/library/busybox/manifests/1", headers=basic("ci", "ci-secret"))
        assert ok.status_code == 200


@pytest.mark.anyio
async def test_a_reload_applies_new_rules(access):
    access.registry.push("library/busybox", "1")
    access.use("access:\n  - allow: [anonymous]\n")
    async with access.client() as client:
        assert (await client.get("/v2/library/busybox/manifests/1")).status_code == 200
        access.use("access:\n  - deny: [anonymous]\n    repositories: [busybox]\n  - allow: [anonymous]\n")
        assert (await client.get("/v2/library/busybox/manifests/1")).status_code == 403
        assert (await client.get("/v2/library/other/manifests/1")).status_code == 404
        access.use("")
        access.use("", users=None)
        assert (await client.get("/v2/library/busybox/manifests/1")).status_code == 200


@pytest.mark.anyio
async def test_networks_are_the_peer_address_never_a_forwarded_header(access):
    access.registry.push("library/busybox", "1")
    access.use("access:\n  - allow: [anonymous]\n    from: [10.0.0.0/8, '2001:db8::/32']\n")
    cases = [("10.0.0.1", 200), ("::ffff:10.0.0.1", 200), ("2001:db8::1", 200), ("192.0.2.7", 403),
             ("2001:db9::1", 403)]
    for address, status in cases:
        async with access.client(address=address) as client:
            response = await client.get("/v2/library/busybox/manifests/1",
                                        headers={"X-Forwarded-For": "10.0.0.1", "X-Real-IP": "10.0.0.1",
                                                 "Forwarded": "for=10.0.0.1"})
            assert response.status_code == status, address


def test_identity_names():
    assert str(ANONYMOUS) == "anonymous" and not ANONYMOUS.authenticated
    assert str(Identity.user("ci")) == "user:ci"
    cert = Identity.certificate({"subject": "CN=r,O=x", "cn": "r", "serial": "1"})
    assert str(cert) == "cert:r" and cert.subject == "CN=r,O=x" and cert.authenticated
    assert str(Identity.certificate({"subject": "O=x", "cn": "", "serial": "1"})) == "cert:O=x"
    assert Identity.parse("cert:r") == Identity("certificate", "r")


def test_the_guard_of_no_rules_is_inactive():
    assert not Guard(Rules((), TABLE)).active


@pytest.mark.anyio
@pytest.mark.parametrize("path, params", [
    ("/v2/quay.io/acme/tool/manifests/1", None),
    ("/v2/acme/tool/manifests/1", {"ns": "quay.io"}),
    ("/v2/quay.io/acme/tool/blobs/sha256:" + "a" * 64, None),
])
async def test_an_unknown_registry_is_named_but_the_configured_ones_are_not(access, path, params):
    """404 NAME_UNKNOWN names only the registry the client asked for: which registries this
    mirror serves (some private, behind rules) is not told to whoever asks."""
    access.use(RULES)
    async with access.client() as client:
        for headers in ({}, basic("ci", "ci-secret")):
            response = await client.get(path, params=params, headers=headers)
            assert response.status_code == 404
            assert errors(response)["code"] == "NAME_UNKNOWN"
            assert errors(response)["message"] == "this mirror does not serve quay.io"
            for configured in ("docker.io", "ghcr.io", "ghcr.example.org", "registry.test", "ghcr.test"):
                assert configured not in response.text
    assert access.registry.seen == []


@pytest.mark.anyio
async def test_every_request_is_checked_with_its_own_credentials(access, caplog):
    """The guard remembers verified credentials (keyed), not clients: on one client, a wrong
    password right after the right one is 401, another user on the same client is that user;
    a reload with a changed password or without the user ends what was remembered."""
    caplog.set_level(logging.INFO, "dockermirror.access")
    access.registry.push("library/busybox", "1")
    access.registry.push("myorg/app", "1")
    access.use(RULES)
    path = "/v2/library/busybox/manifests/1"
    async with access.client() as client:
        assert (await client.get(path, headers=basic("ci", "ci-secret"))).status_code == 200
        assert (await client.get(path, headers=basic("ci", "ci-secret!"))).status_code == 401
        assert (await client.get(path, headers=basic("ci", "ci-secre"))).status_code == 401
        assert (await client.get(path, headers=basic("mallory", "mallory-secret"))).status_code == 403
        assert (await client.get(path, headers=basic("mallory", "ci-secret"))).status_code == 401
        assert (await client.get(path, headers=basic("ci", "ci-secret"))).status_code == 200
        assert (await client.get(path)).status_code == 401
        access.use(RULES, users={"ci": "new-secret", "mallory": "mallory-secret"})
        assert (await client.get(path, headers=basic("ci", "ci-secret"))).status_code == 401
        assert (await client.get(path, headers=basic("ci", "new-secret"))).status_code == 200
        access.use(RULES, users={"mallory": "mallory-secret"})
        assert (await client.get(path, headers=basic("ci", "new-secret"))).status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "dockermirror.access" and '"GET ' in r.getMessage()]
    assert [line.split('" ')[1].split(" ")[0] for line in lines] == \
        ["200", "401", "401", "403", "401", "200", "401", "401", "200", "401"]
    assert [" identity=user:ci" in line for line in lines] == \
        [True, False, False, False, False, True, False, False, True, False]
    assert " identity=user:mallory" in lines[3]


def test_identities_name_themselves_as_rules_do():
    """What rules match an identity by (worked out once per identity)."""
    assert Identity.user("ci").names == {"*", "authenticated", "user:*", "user:ci"}
    assert Identity.certificate({"cn": "r", "subject": "CN=r,O=x"}).names == {"*", "authenticated", "cert:*", "cert:r"}
    assert ANONYMOUS.names == {"*", "anonymous"}
    assert str(Identity.user("ci")) == "user:ci" and Identity.user("ci") == Identity("user", "ci")
    # certificates that share a common name keep their own subjects (for the log), however often asked
    for _ in range(2):
        a = Identity.certificate({"cn": "r", "subject": "CN=r,O=a"})
        b = Identity.certificate({"cn": "r", "subject": "CN=r,O=b"})
        assert (a.subject, b.subject, str(a), str(b)) == ("CN=r,O=a", "CN=r,O=b", "cert:r", "cert:r")
    assert Identity.certificate({"subject": "O=x"}) == Identity("certificate", "O=x", "O=x")


# --- tls.client_auth: required: no certificate, a clear error at the HTTP layer (the handshake lets it in)

REQUIRED = "tls:\n  certificate: /nonexistent/server.crt\n  client_auth: required\n"
ALICE = {"subject": "CN=alice", "cn": "alice", "serial": "1f"}
NO_CERTIFICATE = ("a client certificate is required (tls.client_auth: required); ask the mirror's admin for one "
                  "(docker-mirror cert client NAME)")


def required_config(cache_dir: Path, extra: str = "", client_auth: str = "required") -> configuration.Config:
    head = HEAD.replace("tls:\n  enabled: false\n", REQUIRED.replace("required", client_auth))
    return configuration.loads(head.format(cache_dir=cache_dir) + extra)


def test_the_guard_admits_no_request_without_a_certificate_when_one_is_required():
    guard = Guard(Rules((), TABLE), certificate_required=True)
    assert guard.active        # with no rules and no htpasswd
    with pytest.raises(Exception) as caught:
        guard.admit({"type": "http"})
    error = caught.value
    assert (error.status, error.code, error.message, error.headers) == (401, "UNAUTHORIZED", NO_CERTIFICATE, {})
    assert error.refused == "no-client-certificate"
    guard.admit({"type": "http", "client_certificate": ALICE})
    Guard(Rules((), TABLE)).admit({"type": "http"})          # not required: nothing to say
    # the TLS layer says this connection owes one (its handshake ran under required), whatever
    # the guard's configuration (a reload the application could not apply)
    with pytest.raises(Exception) as owed:
        Guard(Rules((), TABLE)).admit({"type": "http", "client_certificate_required": True})
    assert owed.value.code == "UNAUTHORIZED"
    assert Guard.of(required_config(Path("/x"))).certificate_required
    assert not Guard.of(required_config(Path("/x"), client_auth="optional")).certificate_required


@pytest.mark.anyio
@pytest.mark.parametrize("users", [False, True])
async def test_required_refuses_every_request_without_a_certificate_before_anything_else(tmp_path, users):
    registry = FakeRegistry()
    image = registry.push("library/busybox", "1")
    auth = ""
    if users:       # a password cannot stand in for the certificate: no Basic challenge either
        (tmp_path / "htpasswd").write_text(f"ci:{bcrypt.hashpw(b'ci-secret', bcrypt.gensalt(4)).decode()}\n")
        auth = f"auth:\n  htpasswd: {tmp_path / 'htpasswd'}\n"
    app = DockerMirror(required_config(tmp_path / "cache", auth), clock=FakeClock(),
                       upstream_transport=registry.transport)
    async with app.running():
        mirror = Mirror(app, registry)
        requests = [("GET", "/v2/"), ("HEAD", "/v2/"), ("GET", "/v2/library/busybox/manifests/1"),
                    ("HEAD", "/v2/library/busybox/manifests/1"), ("GET", f"/v2/library/busybox/blobs/{image.layer}"),
                    ("GET", "/v2/library/busybox/tags/list"), ("GET", f"/v2/library/busybox/referrers/{image.digest}"),
                    ("GET", "/v2/ghcr.io/myorg/app/manifests/1"), ("GET", "/v2/_catalog"),
                    ("GET", "/v2/no/such/endpoint"), ("GET", "/v2/bad..name/manifests/1"), ("GET", "/"),
                    ("GET", "/v2"), ("GET", "/metrics"), ("PUT", "/v2/library/busybox/manifests/1"),
                    ("POST", "/v2/library/busybox/blobs/uploads/"),
                    ("DELETE", f"/v2/library/busybox/blobs/{image.layer}")]
        async with mirror.client() as client:
            for method, path in requests:
                headers = basic("ci", "ci-secret") if users else {}
                response = await client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path)
                assert "www-authenticate" not in response.headers, (method, path)
                assert response.headers["docker-distribution-api-version"] == "registry/2.0"
                if method != "HEAD":
                    assert errors(response) == {"code": "UNAUTHORIZED", "message": NO_CERTIFICATE}, (method, path)
        assert registry.seen == []
        assert [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()] == []
        assert app.cache.index.totals() == (0, 0) and app.cache.index.tag_count() == 0     # nothing cached
        # with a verified certificate: pulls as before
        async with mirror.client(certificate=ALICE) as client:
            assert (await client.get("/v2/")).status_code == 200
            assert (await client.get("/v2/library/busybox/manifests/1")).status_code == 200
            assert (await client.get(f"/v2/library/busybox/blobs/{image.layer}")).content == image.blobs[image.layer]


@pytest.mark.anyio
async def test_a_refusal_for_no_certificate_is_logged_once_a_minute_per_address(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, "dockermirror.access")
    now = [1000.0]
    app = DockerMirror(required_config(tmp_path / "cache"), clock=FakeClock(),
                       upstream_transport=FakeRegistry().transport)
    monkeypatch.setattr(app.refusals, "clock", lambda: now[0])
    async with app.running():
        mirror = Mirror(app, FakeRegistry())
        async with mirror.client("192.0.2.7") as client:
            for _ in range(5):
                await client.get("/v2/library/busybox/manifests/1")
        async with mirror.client("192.0.2.8") as client:
            await client.get("/v2/")
        now[0] += 61
        async with mirror.client("192.0.2.7") as client:
            await client.get("/v2/")
    records = [r for r in caplog.records if r.name == "dockermirror.access"]
    info = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert len(records) == 7 and len(info) == 3
    assert info[0].startswith('192.0.2.7 "GET /v2/library/busybox/manifests/1" 401 ')
    assert info[0].endswith(" cache=- upstream=- upstream_status=- identity=anonymous refused=no-client-certificate")
    assert info[1].startswith('192.0.2.8 "GET /v2/" 401 ') and "refused=no-client-certificate" in info[1]
    assert info[2].endswith(' refused=no-client-certificate note="4 more refused from this address since the '
                            'last such line (logged at debug)"')


@pytest.mark.anyio
async def test_refusals_are_logged_once_a_minute_per_ipv6_64_and_at_most_a_budget_a_minute_in_all(
        tmp_path, caplog, monkeypatch):
    """Many source addresses (a /64 has plenty; so has a botnet) cannot flood the log either: an
    IPv6 /64 counts as one address, and past BUDGET info lines a minute the rest go to debug,
    counted in the next info line."""
    from dockermirror.api.refusals import BUDGET

    caplog.set_level(logging.DEBUG, "dockermirror.access")
    now = [1000.0]
    app = DockerMirror(required_config(tmp_path / "cache"), clock=FakeClock(),
                       upstream_transport=FakeRegistry().transport)
    monkeypatch.setattr(app.refusals, "clock", lambda: now[0])

    def info() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "dockermirror.access" and r.levelno == logging.INFO]

    async with app.running():
        mirror = Mirror(app, FakeRegistry())
        for i in range(1, 41):          # one /64, and the same host IPv4-mapped
            address = f"2001:db8:1:2::{i:x}" if i % 2 else f"2001:db8:1:2:{i:x}::1"
            async with mirror.client(address) as client:
                assert (await client.get("/v2/")).status_code == 401
        for address in ("::ffff:192.0.2.9", "192.0.2.9"):
            async with mirror.client(address) as client:
                assert (await client.get("/v2/")).status_code == 401
        assert len(info()) == 2
        assert info()[0].startswith('2001:db8:1:2::1 "GET /v2/" 401 ') and info()[1].startswith("::ffff:192.0.2.9 ")
        for i in range(BUDGET + 20):    # as many addresses as the budget and more
            async with mirror.client(f"198.51.100.{i}") as client:
                assert (await client.get("/v2/")).status_code == 401
        assert len(info()) == BUDGET
        now[0] += 61
        async with mirror.client("2001:db8:1:2:ffff::7") as client:
            assert (await client.get("/v2/")).status_code == 401
    assert len(info()) == BUDGET + 1
    assert info()[-1].endswith(' refused=no-client-certificate note="39 more refused from 2001:db8:1:2::/64 since '
                               'the last such line (logged at debug); 22 more from other sources logged at debug '
                               f'only (over {BUDGET} such lines a minute)"')
    records = [r for r in caplog.records if r.name == "dockermirror.access"]
    assert len(records) == 40 + 2 + BUDGET + 20 + 1     # every refusal at debug all the same


@pytest.mark.anyio
async def test_a_reload_switches_client_auth_for_the_next_requests(tmp_path):
    registry = FakeRegistry()
    registry.push("library/busybox", "1")
    app = DockerMirror(required_config(tmp_path / "cache"), clock=FakeClock(), upstream_transport=registry.transport)
    async with app.running():
        mirror = Mirror(app, registry)
        async with mirror.client() as client:
            assert (await client.get("/v2/library/busybox/manifests/1")).status_code == 401
            app.reconfigure(required_config(tmp_path / "cache", client_auth="optional"))
            assert (await client.get("/v2/library/busybox/manifests/1")).status_code == 200
            assert not app.api.guard.active
            app.reconfigure(required_config(tmp_path / "cache"))
            assert (await client.get("/v2/library/busybox/manifests/1")).status_code == 401


def test_access_check_knows_a_certificate_is_required(tmp_path, capsys):
    path = tmp_path / "config.yml"

    def check(*args: str, rules: str = "") -> tuple[int, str]:
        path.write_text(HEAD.replace("tls:\n  enabled: false\n", REQUIRED).format(cache_dir=tmp_path) + rules)
        code = cli.main(["access", "check", *args, "--config", str(path)])
        return code, capsys.readouterr().out

    assert check("anonymous", "busybox") == (
        1, "deny: tls.client_auth: required: a client certificate is required (anonymous pulling "
           "docker.io/library/busybox)\n")
    assert check("user:ci", "busybox", rules="access:\n  - allow: [user:ci]\n")[0] == 1
    assert check("cert:alice", "busybox") == (
        0, "allow: no rules: anyone with a client certificate may pull (cert:alice pulling "
           "docker.io/library/busybox)\n")
    assert check("cert:alice", "busybox", rules="access:\n  - allow: [cert:bob]\n")[0] == 1


@pytest.mark.anyio
async def test_the_gate_closes_a_websocket_without_a_certificate_and_passes_the_rest_on():
    from dockermirror.api.gate import Gate

    called, sent = [], []

    async def app(scope, receive, send):
        called.append(scope["type"])

    async def send(message):
        sent.append(message)

    gate = Gate(app, lambda: Guard(Rules((), TABLE), certificate_required=True))
    await gate({"type": "websocket", "path": "/v2/"}, None, send)
    assert sent == [{"type": "websocket.close", "code": 1008}] and called == []
    await gate({"type": "lifespan"}, None, send)
    await gate({"type": "websocket", "path": "/v2/", "client_certificate": ALICE}, None, send)
    assert called == ["lifespan", "websocket"]
