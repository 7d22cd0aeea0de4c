"""Which upstream a request goes to: ?ns=, a registry path prefix, or the default (dockermirror.routing)."""

from __future__ import annotations

import pytest

from dockermirror.routing import RegistryTable, Route, UnknownRegistry, host_with_port

TABLE = RegistryTable([("docker.io", ()), ("ghcr.io", ("ghcr.example.org",)), ("registry.example.org:5000", ())])


@pytest.mark.parametrize("name, ns, expected", [
    # dockerd's registry-mirrors: the default upstream, with Docker Hub's library/
    ("busybox", None, Route("docker.io", "library/busybox", False)),
    ("acme/tool", None, Route("docker.io", "acme/tool", False)),
    # containerd's ?ns=, by name, alias or Docker Hub's other names; any case
    ("org/app", "ghcr.io", Route("ghcr.io", "org/app", False)),
    ("org/app", "GHCR.example.org", Route("ghcr.io", "org/app", False)),
    ("busybox", "index.docker.io", Route("docker.io", "library/busybox", False)),
    ("team/app", "registry.example.org:5000", Route("registry.example.org:5000", "team/app", False)),
    # a path prefix (podman's prefixed location, containerd's override_path, docker pull mirror/ghcr.io/...)
    ("ghcr.io/org/app", None, Route("ghcr.io", "org/app", True)),
    ("ghcr.example.org/org/app", None, Route("ghcr.io", "org/app", True)),
    ("docker.io/busybox", None, Route("docker.io", "library/busybox", True)),
    ("registry.example.org:5000/team/app", None, Route("registry.example.org:5000", "team/app", True)),
    # both: the same entry as either alone
    ("ghcr.io/org/app", "ghcr.io", Route("ghcr.io", "org/app", True)),
])
def test_routes(name, ns, expected):
    assert TABLE.route(name, ns) == expected


@pytest.mark.parametrize("name, ns", [
    ("org/app", "evil.example.com"),          # ns names no configured upstream
    ("org/app", "127.0.0.1:22"),
    ("evil.example.com/org/app", None),       # a host-like prefix that is not configured
    ("localhost/org/app", None),
    ("127.0.0.1:9/x", None),
    ("ghcr.io", None),                         # a registry and no repository
    ("quay.io", None),
])
def test_unknown_registries_are_refused(name, ns):
    with pytest.raises(UnknownRegistry):
        TABLE.route(name, ns)


def test_pin_patterns_name_their_registry():
    assert TABLE.pattern("centos") == "docker.io/library/centos"
    assert TABLE.pattern("myorg/*") == "docker.io/myorg/*"
    assert TABLE.pattern("ghcr.example.org/myorg/*") == "ghcr.io/myorg/*"
    with pytest.raises(UnknownRegistry):
        TABLE.pattern("quay.io/org/*")


@pytest.mark.parametrize("component, expected", [
    ("registry.example.org:5000", True), ("127.0.0.1:5000", True), ("localhost:5000", True),
    ("ghcr.io", False), ("library", False), ("host:", False), (":5000", False), ("host:123456", False),
    ("a/b:1", False), ("-host:1", False),
])
def test_host_with_port(component, expected):
    assert host_with_port(component) is expected


def test_one_upstream_that_is_not_docker_hub_keeps_its_dotted_namespaces():
    """GitLab groups and Harbor projects may have dots: with one such upstream (the single
    upstream: section of before) they are its repositories; a port or localhost still is not."""
    gitlab = RegistryTable([("gitlab.example.com", ())], dotted_namespaces=True)
    assert gitlab.route("my.group/app") == Route("gitlab.example.com", "my.group/app", False)
    assert gitlab.route("my.app") == Route("gitlab.example.com", "my.app", False)
    assert gitlab.route("gitlab.example.com/my.group/app") == Route("gitlab.example.com", "my.group/app", True)
    assert gitlab.pattern("my.group/*") == "gitlab.example.com/my.group/*"
    for name in ("127.0.0.1:9/x", "localhost/x", "gitlab.example.com"):
        with pytest.raises(UnknownRegistry):
            gitlab.route(name)
    # Docker Hub has no such names; with several upstreams a dotted first component names one
    for table in (RegistryTable([("docker.io", ())], dotted_namespaces=True),
                  RegistryTable([("gitlab.example.com", ()), ("ghcr.io", ())], dotted_namespaces=True),
                  RegistryTable([("gitlab.example.com", ())])):     # an upstreams: list of one
        with pytest.raises(UnknownRegistry):
            table.route("my.group/app")


def test_a_pin_pattern_that_is_only_a_registry_is_refused():
    with pytest.raises(UnknownRegistry, match="names a registry"):
        TABLE.pattern("ghcr.io")
    assert TABLE.pattern("registry.example.org:5000/team/*") == "registry.example.org:5000/team/*"
