"""``docker-mirror client-setup``: the exact steps to point docker, containerd and podman here.

The steps are shell commands a client machine's admin can paste; with TLS they carry
the CA certificate inline, so they work on machines that cannot read this one's files.
"""

from __future__ import annotations

from pathlib import Path

HUB_SERVER = "https://registry-1.docker.io"


def _write_file(path: str, content: str) -> str:
    return f"mkdir -p {Path(path).parent}\ncat > {path} <<'EOF'\n{content.rstrip()}\nEOF"


def instructions(host: str, *, tls: bool, ca_pem: str | None, ca_path: Path, registry: str) -> str:
    """Steps for a mirror reachable at ``host`` (HOST:PORT) that mirrors ``registry``."""
    scheme = "https" if tls else "http"
    url = f"{scheme}://{host}"
    server = HUB_SERVER if registry == "docker.io" else f"https://{registry}"
    out = [f"# docker-mirror at {url}, mirroring {registry}", ""]
    if tls and ca_pem is None:
        out += [f"# (the CA {ca_path} could not be read here: copy it to each client as shown below)", ""]
    ca_text = ca_pem or f"<contents of {ca_path}>"

    out += ["## docker (dockerd), as root on each client", ""]
    if registry != "docker.io":
        out += [f"# dockerd can only mirror Docker Hub; it cannot use this mirror of {registry}.", ""]
    else:
        if tls:
            out += ["# trust the mirror's CA (Debian/Ubuntu: certs.d; on EL see update-ca-trust below)",
                    _write_file(f"/etc/docker/certs.d/{host}/ca.crt", ca_text), ""]
            daemon = f'{{"registry-mirrors": ["{url}"]}}'
        else:
            daemon = f'{{"registry-mirrors": ["{url}"], "insecure-registries": ["{host}"]}}'
        out += ["# merge into /etc/docker/daemon.json if it already exists",
                _write_file("/etc/docker/daemon.json", daemon), "systemctl restart docker",
                "docker info --format '{{.RegistryConfig.Mirrors}}'", ""]
        if tls:
            out += ["# EL (RHEL, CentOS, Rocky, Alma): or trust the CA system-wide",
                    _write_file("/etc/pki/ca-trust/source/anchors/docker-mirror.crt", ca_text),
                    "update-ca-trust extract && systemctl restart docker", ""]

    out += ["## containerd (Kubernetes nodes, nerdctl, ctr --hosts-dir)", "",
            '# containerd must read hosts.toml files: in /etc/containerd/config.toml set',
            '#   [plugins."io.containerd.grpc.v1.cri".registry]',
            '#     config_path = "/etc/containerd/certs.d"']
    hosts = [f'server = "{server}"', "", f'[host."{url}"]', '  capabilities = ["pull", "resolve"]']
    if tls:
        out.append(_write_file(f"/etc/containerd/certs.d/{registry}/ca.crt", ca_text))
        hosts.append(f'  ca = "/etc/containerd/certs.d/{registry}/ca.crt"')
    out += [_write_file(f"/etc/containerd/certs.d/{registry}/hosts.toml", "\n".join(hosts)),
            "systemctl restart containerd", ""]

    out += ["## podman, skopeo, buildah, CRI-O", ""]
    mirror = [f'[[registry]]\nprefix = "{registry}"\nlocation = "{registry}"', "",
              f'[[registry.mirror]]\nlocation = "{host}"' + ("" if tls else "\ninsecure = true")]
    if tls:
        out.append(_write_file(f"/etc/containers/certs.d/{host}/ca.crt", ca_text))
    out += [_write_file("/etc/containers/registries.conf.d/50-docker-mirror.conf", "\n".join(mirror)), ""]
    example = "busybox" if registry == "docker.io" else f"{registry}/<repository>"
    out += ["## check", "", f"podman pull {example}   # or: docker pull busybox, ctr images pull ...", ""]
    return "\n".join(out)
