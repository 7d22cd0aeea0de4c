"""``client-setup --for el7|el8|el9|debian`` (issue 17): the steps fit each target's client
versions, the local system is told from /etc/os-release, and CentOS 7's steps, pasted with
tests/support/pasted.py (stand-ins, a scratch /etc), turn EL7's v1 registries.conf into a v2
file that podman 1.6 reads (containers/image v5.0.0 keys only), keeping a copy of the old one."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from dockermirror import cli
from dockermirror.service import clienttargets
from dockermirror.service.clientsetup import instructions
from dockermirror.service.clienttargets import TARGETS, detect, parse_os_release
from tests.support.pasted import heredocs, run_pasted

HOST = "mirror.example.org:5000"
CA = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----"
TWO = [("docker.io", ()), ("ghcr.io", ())]
DROPIN = "/etc/containers/registries.conf.d/50-docker-mirror.conf"
CONF = "/etc/containers/registries.conf"
BACKUP = "/etc/containers/registries.conf.before-docker-mirror"
BLOCKS = "/etc/containers/docker-mirror.registries.conf"
EL_ANCHOR = "/etc/pki/ca-trust/source/anchors/docker-mirror.crt"
DEBIAN_ANCHOR = "/usr/local/share/ca-certificates/docker-mirror.crt"
# CentOS 7's /etc/containers/registries.conf as shipped (v1; its comments shortened)
EL7_V1 = """\
# This is a system-wide configuration file used to
# keep track of registries for various container backends.
# It adheres to TOML format and does not support recursive
# lists of registries.

[registries.search]
registries = ['registry.access.redhat.com', 'docker.io', 'registry.fedoraproject.org', 'quay.io', 'registry.centos.org']

# If you need to access insecure registries, add the registry's fully-qualified name.
# An insecure registry is one that does not have a valid SSL certificate or only does HTTP.
[registries.insecure]
registries = []


# If you need to block pull access from a registry, uncomment the section below
# and add the registries fully-qualified name.
#
# Docker only
[registries.block]
registries = []
"""
EL7_SEARCH = ["registry.access.redhat.com", "docker.io", "registry.fedoraproject.org", "quay.io",
              "registry.centos.org"]
# every key containers/image v5.0.0 (podman 1.6.4's, vendored at that tag) reads in a v2 file:
# pkg/sysregistriesv2/system_registries_v2.go, V2RegistriesConf, Registry and Endpoint
V5_0_TOP = {"registry", "unqualified-search-registries"}
V5_0_REGISTRY = {"prefix", "location", "insecure", "blocked", "mirror-by-digest-only", "mirror"}
V5_0_MIRROR = {"location", "insecure"}


def steps(target: str, *, tls: bool = True, registries=TWO) -> str:
    return instructions(HOST, tls=tls, ca_pem=CA if tls else None, ca_path=Path("/etc/pki/docker-mirror/ca.crt"),
                        registries=registries, target=TARGETS[target])


def assert_podman_1_6_reads(text: str) -> list[dict]:
    """``text`` is a v2 registries.conf of only the keys containers/image v5.0.0 knows; its entries."""
    parsed = tomllib.loads(text)
    assert set(parsed) <= V5_0_TOP, set(parsed) - V5_0_TOP
    for entry in parsed.get("registry", []):
        assert set(entry) <= V5_0_REGISTRY, set(entry) - V5_0_REGISTRY
        for mirror in entry.get("mirror", []):
            assert set(mirror) <= V5_0_MIRROR, set(mirror) - V5_0_MIRROR
    return parsed.get("registry", [])


# --- detection from /etc/os-release

OS_RELEASES = {
    'NAME="CentOS Linux"\nVERSION="7 (Core)"\nID="centos"\nID_LIKE="rhel fedora"\nVERSION_ID="7"\n': "el7",
    'NAME="Red Hat Enterprise Linux Server"\nID="rhel"\nID_LIKE="fedora"\nVERSION_ID="7.9"\n': "el7",
    'NAME="Oracle Linux Server"\nID="ol"\nID_LIKE="fedora"\nVERSION_ID="7.9"\n': "el7",
    'NAME="Red Hat Enterprise Linux"\nID="rhel"\nID_LIKE="fedora"\nVERSION_ID="8.9"\n': "el8",
    'NAME="CentOS Stream"\nID="centos"\nID_LIKE="rhel fedora"\nVERSION_ID="8"\n': "el8",
    'NAME="Rocky Linux"\nID="rocky"\nID_LIKE="rhel centos fedora"\nVERSION_ID="9.3"\n': "el9",
    'NAME="AlmaLinux"\nID="almalinux"\nID_LIKE="rhel centos fedora"\nVERSION_ID="9.4"\n': "el9",
    'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n': "debian",
    'NAME="Ubuntu"\nID=ubuntu\nID_LIKE=debian\nVERSION_ID="24.04"\n': "debian",
    'NAME="Linux Mint"\nID=linuxmint\nID_LIKE="ubuntu debian"\nVERSION_ID="21.3"\n': "debian",
    'NAME="Fedora Linux"\nID=fedora\nVERSION_ID=40\n': None,
    'NAME="Amazon Linux"\nID="amzn"\nID_LIKE="centos rhel fedora"\nVERSION_ID="2"\n': None,
    'NAME="CentOS"\nID="centos"\nID_LIKE="rhel fedora"\nVERSION_ID="6"\n': None,
    "": None,
}


@pytest.mark.parametrize("text,expected", list(OS_RELEASES.items()))
def test_detect_from_os_release(text, expected):
    found = detect(parse_os_release(text))
    assert (found.name if found else None) == expected


def run_cli(tmp_path: Path, capsys, *argv: str) -> tuple[int, str, str]:
    config = tmp_path / "config.yml"
    config.write_text("tls:\n  enabled: false\nupstreams:\n  - {registry: docker.io, url: 'http://127.0.0.1:1'}\n")
    code = cli.main(["client-setup", "--config", str(config), "--host", HOST, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_detects_the_local_system(tmp_path, capsys, monkeypatch):
    os_release = tmp_path / "os-release"
    monkeypatch.setattr(clienttargets, "OS_RELEASE", os_release)
    os_release.write_text('NAME="CentOS Linux"\nID="centos"\nID_LIKE="rhel fedora"\nVERSION_ID="7"\n')
    code, out, _ = run_cli(tmp_path, capsys)
    assert code == 0
    assert f"# detected from {os_release} (ID=centos VERSION_ID=7)" in out
    assert "(--for el7)" in out and DROPIN not in heredocs(out) and BLOCKS in heredocs(out)

    os_release.write_text('ID=fedora\nVERSION_ID=40\n')           # none of them: Debian's steps, and a hint
    code, out, _ = run_cli(tmp_path, capsys)
    assert code == 0 and "(--for debian)" in out and DROPIN in heredocs(out)
    assert "is none of el7, el8, el9, debian: these are the Debian/modern steps" in out
    assert "run client-setup --for el7|el8|el9|debian" in out

    os_release.unlink()                                          # unreadable: the same
    code, out, _ = run_cli(tmp_path, capsys)
    assert code == 0 and "(--for debian)" in out and "none of el7" in out

    code, out, _ = run_cli(tmp_path, capsys, "--for", "el9")       # --for wins over detection
    assert code == 0 and "# picked with --for el9" in out and "(--for el9)" in out


def test_cli_refuses_an_unknown_target(tmp_path, capsys):
    code, out, err = run_cli(tmp_path, capsys, "--for", "el6")
    assert code == 2 and out == ""
    assert err == "docker-mirror: --for: unknown client system 'el6'; choose one of el7, el8, el9, debian\n"


# --- what each target prints

@pytest.mark.parametrize("target", ["el8", "el9", "debian"])
def test_modern_targets_use_a_drop_in(target):
    out = steps(target)
    files = heredocs(out)
    blocks = tomllib.loads(files[DROPIN])["registry"]
    assert [b["prefix"] for b in blocks] == ["docker.io", "ghcr.io"]
    assert CONF not in files and BACKUP not in out and BLOCKS not in files
    assert "/etc/sysconfig/docker" not in out
    assert "systemctl restart docker" in out and "docker info --format" in out
    if target == "debian":
        assert files[DEBIAN_ANCHOR] == CA + "\n" and EL_ANCHOR not in files
        assert "\nupdate-ca-certificates" in out and "update-ca-trust" not in out
    else:
        assert files[EL_ANCHOR] == CA + "\n" and DEBIAN_ANCHOR not in files
        assert "\nupdate-ca-trust extract" in out and "update-ca-certificates" not in out


@pytest.mark.parametrize("tls", [False, True])
def test_el7_prints_what_its_clients_read(tls):
    out = steps("el7", tls=tls)
    files = heredocs(out)
    assert DROPIN not in files                       # podman 1.6 would ignore it
    entries = assert_podman_1_6_reads(files[BLOCKS])
    assert [(e["prefix"], e["location"]) for e in entries] == [("docker.io", "docker.io"), ("ghcr.io", "ghcr.io")]
    insecure = {} if tls else {"insecure": True}
    assert [e["mirror"] for e in entries] == [[{"location": f"{HOST}/docker.io", **insecure}],
                                              [{"location": f"{HOST}/ghcr.io", **insecure}]]
    # EL7's docker package: flags in /etc/sysconfig/docker are checked before the restart
    assert "/etc/sysconfig/docker" in out
    assert "specified both as a flag and in the configuration file" in out
    if tls:
        assert files[EL_ANCHOR] == CA + "\n" and "\nupdate-ca-trust extract" in out
    else:
        assert EL_ANCHOR not in files


# --- EL7's steps, pasted

def paste_el7(tmp_path: Path, etc: dict[str, str], *, tls: bool = True, registries=TWO, name: str = "pasted"):
    root = tmp_path / name
    for path, content in etc.items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text(content)
    return run_pasted(steps("el7", tls=tls, registries=registries), root)


def test_el7_pasted_converts_the_v1_file_and_keeps_it(tmp_path):
    result = paste_el7(tmp_path, {CONF: EL7_V1})
    files = result.files
    assert files[BACKUP] == EL7_V1                             # the file before, as it was
    conf = files[CONF]
    assert conf.startswith("# written by docker-mirror client-setup")
    assert "[registries." not in conf                          # no v1 table left: not mixed
    parsed = tomllib.loads(conf)
    assert parsed["unqualified-search-registries"] == EL7_SEARCH
    entries = assert_podman_1_6_reads(conf)
    assert [e["prefix"] for e in entries] == ["docker.io", "ghcr.io"]
    assert entries[0]["mirror"] == [{"location": f"{HOST}/docker.io"}]
    assert DROPIN not in files
    assert files[EL_ANCHOR] == CA + "\n"
    assert "update-ca-trust extract" in result.calls and "systemctl restart docker" in result.calls
    # EL7's docker package loses the v1 search list it took as flags: the line that keeps it
    assert result.stderr.splitlines()[1:] == [
        "ADD_REGISTRY='" + " ".join(f"--add-registry {name}" for name in EL7_SEARCH) + "'"]

    # pasted again (a new upstream, say): the copy stays the v1 original, the file is written again from it
    again = paste_el7(tmp_path, {CONF: EL7_V1}, name="twice")
    root = tmp_path / "twice"
    second = run_pasted(steps("el7", registries=[*TWO, ("quay.io", ())]), root)
    assert second.files[BACKUP] == EL7_V1
    assert tomllib.loads(second.files[CONF])["unqualified-search-registries"] == EL7_SEARCH
    assert [e["prefix"] for e in tomllib.loads(second.files[CONF])["registry"]] == ["docker.io", "ghcr.io", "quay.io"]
    assert again.files[CONF] != second.files[CONF]
    # the file it replaced (written for other registries) is kept, and said so
    assert second.files[CONF + ".docker-mirror-prev"] == again.files[CONF]
    assert f"{CONF} differs from what these steps write" in second.stderr


def test_el7_pasted_converts_insecure_and_blocked_registries(tmp_path):
    v1 = EL7_V1.replace("[registries.insecure]\nregistries = []",
                        "[registries.insecure]\nregistries = [\n  'registry.internal:5000',   # the old one\n"
                        "  \"10.0.0.5:5000\",\n]")
    v1 = v1.replace("[registries.block]\nregistries = []", "[registries.block]\nregistries = ['evil.example']")
    conf = paste_el7(tmp_path, {CONF: v1}, tls=False).files[CONF]
    entries = assert_podman_1_6_reads(conf)
    assert entries[:3] == [{"location": "registry.internal:5000", "insecure": True},
                           {"location": "10.0.0.5:5000", "insecure": True},
                           {"location": "evil.example", "blocked": True}]
    assert entries[3]["mirror"] == [{"location": f"{HOST}/docker.io", "insecure": True}]


def test_el7_pasted_leaves_files_it_cannot_convert_safely(tmp_path):
    # a registry the mirror serves is blocked in the v1 file: one registry, conflicting settings
    blocked = EL7_V1.replace("[registries.block]\nregistries = []", "[registries.block]\nregistries = ['docker.io']")
    result = paste_el7(tmp_path, {CONF: blocked}, name="blocked")
    assert result.files[CONF] == blocked
    assert "lists docker.io as insecure or blocked, and the mirror serves it" in result.stderr
    # a v2 file the steps did not write: left alone, the entries to add are in their own file
    v2 = 'unqualified-search-registries = ["docker.io"]\n\n[[registry]]\nlocation = "quay.io"\n'
    result = paste_el7(tmp_path, {CONF: v2}, name="v2")
    assert result.files[CONF] == v2 and BACKUP not in result.files
    assert "is in the v2 format already: add the entries of " + BLOCKS in result.stderr
    assert_podman_1_6_reads(result.files[BLOCKS])
    # no file at all (skopeo without podman): the mirror entries only
    result = paste_el7(tmp_path, {}, name="none")
    assert BACKUP not in result.files
    assert "unqualified-search-registries" not in tomllib.loads(result.files[CONF])


@pytest.mark.parametrize("options,restarted", [
    ("OPTIONS='--selinux-enabled --log-driver=journald --registry-mirror=https://old.example'\n", False),
    ("OPTIONS='--selinux-enabled'\nINSECURE_REGISTRY='--insecure-registry old.example:5000'\n", False),
    ("OPTIONS='--selinux-enabled'\n# INSECURE_REGISTRY='--insecure-registry'\n", True),
])
def test_el7_docker_not_restarted_into_a_flag_conflict(tmp_path, options, restarted):
    """Plain HTTP: daemon.json sets registry-mirrors and insecure-registries."""
    result = paste_el7(tmp_path, {"/etc/sysconfig/docker": options}, tls=False)
    assert ("systemctl restart docker" in result.calls) == restarted
    assert ("move its values into daemon.json" in result.stderr) == (not restarted)
    assert result.files["/etc/sysconfig/docker"] == options         # never edited


def test_el7_docker_flags_from_registries_service(tmp_path):
    """/run/containers/registries.conf (registries.service's output from a v1 file) with an insecure registry."""
    made = 'REGISTRIES=" --add-registry docker.io --insecure-registry registry.internal:5000"\n'
    result = paste_el7(tmp_path, {"/run/containers/registries.conf": made}, tls=False)
    assert "systemctl restart docker" not in result.calls
    # with TLS daemon.json sets no insecure-registries: no conflict
    result = paste_el7(tmp_path, {"/run/containers/registries.conf": made}, name="tls")
    assert "systemctl restart docker" in result.calls


@pytest.mark.parametrize("version,old", [
    ("containerd github.com/containerd/containerd v1.4.13 7b11cfaabd73bb80907dd23182b9347b4245eb5d", True),
    ("containerd containerd.io 1.4.3 269548fa27e0089a8b8278fc4fc781d7f65a939b", True),
    ("containerd containerd.io 1.6.33 d2d58213f83a351ca8f528a95fbd145f5654e957", False),
    ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3", False),
])
def test_containerd_before_1_5_is_detected(tmp_path, version, old):
    result = run_pasted(steps("el7"), tmp_path / "pasted", outputs={"containerd": version})
    assert ("older than 1.5 and reads no hosts.toml" in result.stderr) == old
    out = steps("el7")
    assert '#   [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]' in out
    assert f'#     endpoint = ["https://{HOST}"]' in out


def test_debian_pasted_trusts_the_ca(tmp_path):
    result = run_pasted(steps("debian"), tmp_path / "pasted")
    assert result.files[DEBIAN_ANCHOR] == CA + "\n"
    assert "update-ca-certificates " in result.calls and not any("update-ca-trust" in c for c in result.calls)
    assert DROPIN in result.files and CONF not in result.files
