"""``docker-mirror client-setup``: the exact steps to point docker, containerd and podman here.

The steps are shell commands a client machine's admin can paste; with TLS they carry
the CA certificate inline, so they work on machines that cannot read this one's files.

One mirror serves several registries (``upstreams:``). Each client names the registry its
own way, and the steps use the way that keeps the registry explicit:

- containerd: a ``hosts.toml`` per registry, or one ``_default`` for every registry; it
  sends ``?ns=<registry>`` to the mirror;
- podman, skopeo, buildah, CRI-O: a ``[[registry]]`` block per registry whose mirror is the
  mirror with the registry as a path prefix (``mirror.example.org:5000/ghcr.io``);
- dockerd: ``registry-mirrors`` mirrors Docker Hub only, and names no registry, so it is
  offered only when Docker Hub is the mirror's default upstream.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from dockermirror.routing import DOCKER_HUB, registry_key
from dockermirror.service.clienttargets import DEFAULT, Target
from dockermirror.service.daemonjson import daemon_json_steps
from dockermirror.service.el7registries import el7_registries_conf

HUB_SERVER = "https://registry-1.docker.io"
# One copy of the CA for every hosts.toml (a file outside certs.d/: containerd reads
# only <registry>/ directories there)
CONTAINERD_CA = "/etc/containerd/docker-mirror-ca.crt"
REGISTRIES_CONF = "/etc/containers/registries.conf.d/50-docker-mirror.conf"
EL_ANCHOR = "/etc/pki/ca-trust/source/anchors/docker-mirror.crt"
DEBIAN_ANCHOR = "/usr/local/share/ca-certificates/docker-mirror.crt"


def _write_file(path: str, content: str) -> str:
    return f"mkdir -p {Path(path).parent}\ncat > {path} <<'EOF'\n{content.rstrip()}\nEOF"


def server_url(name: str, urls: Mapping[str, str] | None = None) -> str:
    """The URL of the registry ``name`` itself (what a client falls back to): the configured
    upstream URL of its key when known (a plain-HTTP registry, an alias without the port), else
    ``https://<name>``; Docker Hub's API address for docker.io."""
    key = registry_key(name)
    if key == DOCKER_HUB:
        return HUB_SERVER
    return (urls or {}).get(name) or f"https://{name}"


# A registry name as one component of a repository path (the reference grammar: no ':').
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")


def path_prefix(registries: Iterable[tuple[str, Iterable[str]]], key: str) -> str | None:
    """The name to put in front of a repository to reach upstream ``key`` through the mirror's
    path: its own name, or else an alias; None when every name has a port (a path cannot
    carry one)."""
    for registry, aliases in registries:
        if registry_key(registry) == key:
            for name in (key, *(registry_key(alias) for alias in aliases)):
                if _PATH_COMPONENT.fullmatch(name):
                    return name
    return None


def client_names(registries: Iterable[tuple[str, Iterable[str]]]) -> list[tuple[str, str]]:
    """(name a client uses, the upstream's key) for every upstream and alias, default first.

    Docker Hub's own other names are left out: clients call it docker.io whatever the
    image reference says."""
    names: list[tuple[str, str]] = []
    seen: set[str] = set()
    for registry, aliases in registries:
        key = registry_key(registry)
        for name in (key, *(registry_key(alias) for alias in aliases)):
            if name not in seen:
                seen.add(name)
                names.append((name, key))
    return names


def instructions(host: str, *, tls: bool, ca_pem: str | None, ca_path: Path,
                 registries: Sequence[tuple[str, Iterable[str]]], urls: Mapping[str, str] | None = None,
                 client_auth: str = "none", target: Target = DEFAULT, picked: str = "") -> str:
    """Steps for a mirror reachable at ``host`` (HOST:PORT) that mirrors ``registries``:
    (registry, aliases) of each upstream, the default first; ``urls``: each name's (and
    alias's) upstream URL, where containerd falls back to; ``client_auth`` (tls.client_auth):
    where each client wants its certificate; ``target``: the client system (its versions decide
    the steps), ``picked``: a line saying how it was chosen."""
    url = f"{'https' if tls else 'http'}://{host}"
    names = client_names(registries)
    keys = list(dict.fromkeys(key for _, key in names))
    default = keys[0]
    # how each upstream is named in a path through the mirror ("" for the default: no prefix)
    prefixes = {key: path_prefix(registries, key) for key in keys}
    if prefixes[default] is None:
        prefixes[default] = ""
    listed = ", ".join(f"{key} (the default)" if key == default and len(keys) > 1 else key for key in keys)
    out = [f"# docker-mirror at {url}, mirroring {listed}",
           f"# for {target.label} (--for {target.name}): {target.clients}"]
    out += [f"# {line}" for line in picked.splitlines()] + [""]
    if tls and ca_pem is None:
        out += [f"# (the CA {ca_path} could not be read here: copy it to each client as shown below)", ""]
    ca_text = (ca_pem or f"<contents of {ca_path}>") if tls else None
    out += _dockerd(host, url, ca_text, keys, prefixes, target)
    out += _containerd(url, ca_text, names, urls)
    out += _containers(host, ca_text, names, prefixes, target)
    if ca_text is not None:
        out += _system_trust(ca_text, target)
    if tls and client_auth != "none":
        out += _client_certificates(host, client_auth)
    out += ["## check (by hand: pull an image you use)", ""]
    for key in (key for key in keys if prefixes[key] is not None):
        # fully qualified: a short name goes to the search list first (on EL7, registry.access.redhat.com)
        example = "docker.io/library/busybox" if key == DOCKER_HUB else f"{key}/<repository>"
        out.append(f"#   podman pull {example}")
    first = next(prefix for prefix in prefixes.values() if prefix is not None)
    out += ["#   or: docker pull busybox, ctr --hosts-dir /etc/containerd/certs.d images pull ..., "
            f"skopeo copy docker://{host}/{first + '/' if first else ''}<repository> ...", ""]
    return "\n".join(out)


def _mirrored(host: str, prefix: str) -> str:
    """The mirror's address with an upstream's path prefix."""
    return f"{host}/{prefix}" if prefix else host


def _unprefixable(keys: list[str], prefixes: dict[str, str | None]) -> list[str]:
    missing = [key for key in keys if prefixes[key] is None]
    if not missing:
        return []
    return [f"# {', '.join(missing)}: a registry name with a port cannot be a path prefix; give "
            f"{'it' if len(missing) == 1 else 'each'} an alias without one",
            "# (aliases: in upstreams:) and run client-setup again"]


def _dockerd(host: str, url: str, ca_text: str | None, keys: list[str],
             prefixes: dict[str, str | None], target: Target) -> list[str]:
    out = ["## docker (dockerd), as root on each client", ""]
    default = keys[0]
    mirrors_hub = default == DOCKER_HUB
    if not mirrors_hub:
        why = (["# it sends Docker Hub pulls to a mirror without naming the registry, and this mirror's default",
                f"# upstream is {default} (put docker.io first in upstreams: to change that)."]
               if DOCKER_HUB in keys else ["# this mirror does not serve docker.io."])
        out += ["# dockerd can only mirror Docker Hub (registry-mirrors), and not with this mirror:", *why, ""]
    others = [key for key in keys if key != DOCKER_HUB or not mirrors_hub]
    if others:
        out += [f"# dockerd does not mirror {'other registries' if mirrors_hub else 'them'}, but pulls through "
                "this mirror when named:",
                *(f"#   docker pull {_mirrored(host, prefixes[key])}/<repository>    ({key})"
                  for key in others if prefixes[key] is not None),
                *_unprefixable(others, prefixes), ""]
    daemon: dict[str, list[str]] = {}
    if mirrors_hub:
        daemon["registry-mirrors"] = [url]
    if ca_text is None:
        daemon["insecure-registries"] = [host]
    else:
        out += ["# trust the mirror's CA (dockerd reads certs.d/<host:port>/ca.crt; docker 1.13 too)",
                _write_file(f"/etc/docker/certs.d/{host}/ca.crt", ca_text), ""]
    if daemon:
        out += daemon_json_steps(daemon, _write_file)
        out += _sysconfig_check(sorted(daemon)) if target.docker_sysconfig else \
            ['if [ -n "$restart" ]; then systemctl restart docker; fi']
    else:
        out.append("systemctl restart docker")
    if mirrors_hub:
        out.append("docker info --format '{{.RegistryConfig.Mirrors}}'")     # docker 1.13 has --format too
    out.append("")
    return out


# the dockerd flag of each daemon.json key this file writes
_FLAGS = {"registry-mirrors": "--registry-mirror", "insecure-registries": "--insecure-registry"}


def _sysconfig_check(keys: list[str]) -> list[str]:
    """EL7's docker package: docker.service passes $OPTIONS (and $ADD_REGISTRY, $INSECURE_REGISTRY,
    $REGISTRIES) from /etc/sysconfig/docker and /run/containers/registries.conf; a flag there for a
    key daemon.json sets too makes dockerd refuse to start."""
    flags = "|".join(_FLAGS[key].removeprefix("--") for key in keys)
    return ["# EL7's docker package (docker 1.13, extras) also takes flags from /etc/sysconfig/docker (OPTIONS=,",
            "# INSECURE_REGISTRY=) and /run/containers/registries.conf (made from /etc/containers/registries.conf by",
            "# registries.service). A flag for a setting daemon.json has too makes dockerd refuse to start",
            '# ("the following directives are specified both as a flag and in the configuration file"):',
            "# restart docker only when there is none (docker-ce reads neither file)",
            'if [ -z "$restart" ]; then',
            "  :    # daemon.json was left as it was (said why above)",
            f"elif grep -Eqs '^[^#]*--({flags})' /etc/sysconfig/docker /run/containers/registries.conf; then",
            f"  echo 'docker-mirror: --({flags}) is set in /etc/sysconfig/docker or /etc/containers/registries.conf:"
            f" move its values into daemon.json ({', '.join(keys)}) and remove it there, then systemctl restart"
            " docker' >&2",
            "else",
            "  systemctl restart docker",
            "fi"]


def _hosts_toml(url: str, ca_text: str | None, server: str | None) -> str:
    lines = [f'server = "{server}"', ""] if server else []
    lines += [f'[host."{url}"]', '  capabilities = ["pull", "resolve"]']
    if ca_text is not None:
        lines.append(f'  ca = "{CONTAINERD_CA}"')
    return "\n".join(lines)


def _containerd(url: str, ca_text: str | None, names: list[tuple[str, str]],
                urls: Mapping[str, str] | None) -> list[str]:
    out = ["## containerd (Kubernetes nodes, nerdctl, ctr --hosts-dir)", "",
           "# containerd must read hosts.toml files: in /etc/containerd/config.toml set, under",
           '#   [plugins."io.containerd.grpc.v1.cri".registry]     (containerd 1.x) or',
           '#   [plugins."io.containerd.cri.v1.images".registry]   (containerd 2.x):',
           '#     config_path = "/etc/containerd/certs.d"',
           "# (nerdctl reads /etc/containerd/certs.d itself; ctr needs --hosts-dir /etc/containerd/certs.d)"]
    if ca_text is not None:
        out.append(_write_file(CONTAINERD_CA, ca_text))
    out += ["", "# each registry this mirror serves: the mirror first (containerd names the registry with "
                "?ns=), then the registry itself"]
    for name, _ in names:
        out.append(_write_file(f"/etc/containerd/certs.d/{name}/hosts.toml",
                               _hosts_toml(url, ca_text, server_url(name, urls))))
    out += ["", "# or, instead of (or as well as) the files above, one file for every registry: containerd asks",
            "# the mirror first with ?ns=<registry>; the mirror answers 404 for a registry it does not serve,",
            "# and containerd then falls back to that registry itself",
            _write_file("/etc/containerd/certs.d/_default/hosts.toml", _hosts_toml(url, ca_text, None)),
            "systemctl restart containerd", ""]
    return out + _old_containerd(url, ca_text, names[0][0])


def _old_containerd(url: str, ca_text: str | None, default: str) -> list[str]:
    """containerd before 1.5 reads no hosts.toml: say so when the client runs one, and what its
    CRI config.toml takes instead (documented in containerd/cri's docs/registry.md, release/1.4)."""
    host = url.split("://", 1)[1]
    tls = ([f'#   [plugins."io.containerd.grpc.v1.cri".registry.configs."{host}".tls]',
            f'#     ca_file = "{CONTAINERD_CA}"'] if ca_text is not None else [])
    return ["# containerd before 1.5 (e.g. containerd.io 1.4 and older, Debian 11's 1.4) reads no hosts.toml:",
            'case "$(containerd --version 2>/dev/null)" in',
            '  *" v1."[0-4]"."*|*" 1."[0-4]"."*) echo "docker-mirror: this containerd is older than 1.5 and reads no '
            'hosts.toml: upgrade it, or use the config.toml mirrors shown in these steps" >&2 ;;',
            "esac",
            "# there, the CRI plugin's mirrors in /etc/containerd/config.toml (version = 2) serve only what it names;",
            f"# it sends no ?ns=, so the mirror answers with its default upstream ({default}) only:",
            f'#   [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{default}"]',
            f'#     endpoint = ["{url}"]', *tls, ""]


def _containers(host: str, ca_text: str | None, names: list[tuple[str, str]],
                prefixes: dict[str, str | None], target: Target) -> list[str]:
    out = ["## podman, skopeo, buildah, CRI-O", "",
           "# each registry this mirror serves gets the mirror as its mirror, with the registry as a path",
           f"# prefix ({host}/<registry>): the mirror routes by it; other registries are left alone"]
    out += _unprefixable(list(dict.fromkeys(key for _, key in names)), prefixes)
    if ca_text is not None:
        out.append(_write_file(f"/etc/containers/certs.d/{host}/ca.crt", ca_text))
    blocks = []
    mirrored = []
    for name, key in names:
        prefix = prefixes[key]
        if prefix is None:
            continue
        mirrored.append(name)
        blocks.append(f'[[registry]]\nprefix = "{name}"\nlocation = "{name}"\n\n'
                      f'[[registry.mirror]]\nlocation = "{_mirrored(host, prefix)}"'
                      + ("" if ca_text is not None else "\ninsecure = true"))
    if target.registries_dropins:
        out += [_write_file(REGISTRIES_CONF, "\n\n".join(blocks)), ""]
    else:
        out += el7_registries_conf("\n\n".join(blocks), mirrored, _write_file, ca_text is None) + [""]
    return out


def _system_trust(ca_text: str, target: Target) -> list[str]:
    """The CA in the system's trust store (curl, git, anything using the system bundle; docker
    and podman read certs.d above, containerd its hosts.toml's ca)."""
    if target.el:
        return ["## or trust the mirror's CA system-wide (EL: update-ca-trust)", "",
                _write_file(EL_ANCHOR, ca_text),
                "update-ca-trust extract    # then restart what should use it", ""]
    return ["## or trust the mirror's CA system-wide (Debian, Ubuntu: update-ca-certificates; the name must end "
            "in .crt)",
            "",
            _write_file(DEBIAN_ANCHOR, ca_text),
            "update-ca-certificates    # then restart what should use it", ""]


CONTAINERD_CLIENT = "/etc/containerd/docker-mirror-client"


def _client_certificates(host: str, client_auth: str) -> list[str]:
    """Where each client keeps the pair ``docker-mirror cert client`` makes (tls.client_auth)."""
    need = "must show" if client_auth == "required" else "may show"
    return [f"## client certificates (tls.client_auth: {client_auth}: each client {need} one)", "",
            "# on the mirror, one pair per client machine (its name is the certificate's CN):",
            "#   docker-mirror cert client NAME --out DIR     (writes DIR/client.cert, client.key, ca.crt)",
            "# then copy DIR's files to the client:",
            f"#   dockerd:              /etc/docker/certs.d/{host}/client.cert and client.key",
            f"#   podman, skopeo, CRI-O: /etc/containers/certs.d/{host}/client.cert and client.key",
            f"#   containerd:           {CONTAINERD_CLIENT}.cert and .key, and in each hosts.toml above, under",
            "#                         the mirror's [host...] section:",
            f'#     client = [["{CONTAINERD_CLIENT}.cert", "{CONTAINERD_CLIENT}.key"]]',
            "# keep client.key readable by root only (chmod 600); revoke a pair with docker-mirror cert revoke NAME",
            "# and systemctl reload docker-mirror", ""]
