"""`make repo`: the signed yum and apt repositories, used the way a sysadmin would.

A throw-away GnuPG key (no passphrase, in a temporary GNUPGHOME, never the host's keyring)
signs the repositories built from the session's packages. Then:

* apt, in a booted Debian 12 container that sees the repository as a file: URI at the same
  path: the .sources file and the keyring as shipped, `apt-get update`, `apt-get install
  docker-mirror`, the service runs. A copy without InRelease/Release.gpg, the repository
  with another key in Signed-By, a copy whose Packages was changed and one whose .deb was
  changed are refused, with apt's own words.
* Debian's dnf, with an installroot and a configuration in a temporary directory: the
  .repo file as shipped (gpgcheck=1, repo_gpgcheck=1) reads the repository for EL7, EL8
  and EL9 and finds the right RPM; another key in gpgkey= or a changed repomd.xml is refused.
* rpm -K, with a temporary --dbpath: the RPMs carry a good signature of the key (EL7's also
  the header+payload one EL7's rpm checks); another key, or a changed header or payload, is not OK.

Each refusal is asserted with a message that only a signed repository can produce (a
signature that does not match, a key ID that is not trusted, a checksum the signed index
disagrees with), and each test first shows the untouched repository accepted, so none of
them would pass if `make repo` stopped signing.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.nspawn import Container
from tests.support.packaging import DIST, REPO, UPGRADE, VERSION, make
from tests.support.procs import free_port

RPMS = {"7": f"docker-mirror-{VERSION}-1.el7.x86_64.rpm", "8": f"docker-mirror-{VERSION}-1.el9.x86_64.rpm",
        "9": f"docker-mirror-{VERSION}-1.el9.x86_64.rpm"}
KEYRING = "/etc/apt/keyrings/docker-mirror.gpg"


@dataclass
class Key:
    home: Path
    fingerprint: str
    secret: Path        # the exported secret key: make repo's SIGNING_KEY
    public: Path        # armored public key
    binary: Path        # binary public key (an apt keyring)

    @property
    def short(self) -> str:
        return self.fingerprint[-8:].lower()


def gpg(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", *args], capture_output=True, check=True)


def stop_agents(under: Path) -> None:
    """End the gpg-agents that gpg, make repo or dnf's librepo started for GnuPG homes under ``under``:
    through gpgconf, then by PID any that is left (its --homedir names a directory under ``under``)."""
    homes = {p.parent for p in under.rglob("pubring.kbx")} | {p for p in under.rglob("pubring") if p.is_dir()}
    for home in homes | ({under} if (under / "pubring.kbx").exists() else set()):
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"gpg-agent") and b"--homedir" in argv and \
                argv.index(b"--homedir") + 1 < len(argv) and \
                Path(os.fsdecode(argv[argv.index(b"--homedir") + 1])).is_relative_to(under):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGTERM)


def make_key(directory: Path, name: str) -> Key:
    """An RSA key that only signs, as the README tells a maintainer to make one."""
    home = directory / "gnupg"
    home.mkdir(parents=True, mode=0o700)
    try:
        gpg(home, "--passphrase", "", "--quick-gen-key", f"{name} <{name}@example.invalid>", "rsa3072", "sign", "1d")
        colons = gpg(home, "--with-colons", "--list-secret-keys").stdout.decode()
        fingerprint = next(line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:"))
        key = Key(home, fingerprint, directory / "secret.asc", directory / "public.asc", directory / "public.gpg")
        key.secret.write_bytes(gpg(home, "--armor", "--export-secret-keys", fingerprint).stdout)
        key.public.write_bytes(gpg(home, "--armor", "--export", fingerprint).stdout)
        key.binary.write_bytes(gpg(home, "--export", fingerprint).stdout)
    finally:
        stop_agents(home)
    return key


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Key, Key]]:
    """The key that signs, and another one that does not."""
    directory = tmp_path_factory.mktemp("keys")
    try:
        yield make_key(directory / "signing", "signing"), make_key(directory / "other", "other")
    finally:
        stop_agents(directory)


@pytest.fixture(scope="module")
def repo(packages, keys) -> Path:
    """`make repo` with the signing key as a file, published (for these tests) as a file: URL."""
    out = DIST / "repo"
    make("repo", REPO_URL=f"file://{out}", SIGNING_KEY=str(keys[0].secret))
    return out


def linked_copy(source: Path, dest: Path) -> Path:
    """A copy of a repository tree made of hard links; files to change are replaced, never written to."""
    shutil.copytree(source, dest, copy_function=os.link)
    return dest


def replace(path: Path, content: bytes) -> None:
    path.unlink()
    path.write_bytes(content)


def flip(data: bytes, needle: bytes) -> bytes:
    """``data`` with one byte changed: the first letter of ``needle`` switched in case."""
    at = data.index(needle)
    return data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1:]


# --- the inputs and what lands where ---------------------------------------------------------

def test_make_repo_needs_a_signing_key_and_a_url(packages, tmp_path: Path):
    out = tmp_path / "out"
    for variables, message in (
            ({"REPO_URL": "file:///srv/repo"},
             "make repo: no signing key: set SIGNING_KEY=path/to/secret-key.asc, or GNUPGHOME=dir and "
             "SIGNING_KEY_ID=fingerprint"),
            ({"SIGNING_KEY": str(tmp_path / "none.asc")},
             "make repo: set REPO_URL to where"),
            ({"REPO_URL": "file:///srv/repo", "SIGNING_KEY": str(tmp_path / "none.asc")},
             f"make repo: SIGNING_KEY: cannot read {tmp_path / 'none.asc'}")):
        result = subprocess.run(["make", "-s", "-C", str(REPO), "repo", f"REPO_DIR={out}",
                                 *(f"{k}={v}" for k, v in variables.items())],
                                capture_output=True, text=True, env={**os.environ, "GNUPGHOME": str(tmp_path)})
        assert result.returncode == 2, result
        ours = [line for line in result.stderr.splitlines() if not line.startswith("make: ***")]
        assert len(ours) == 1 and ours[0].startswith(message), result.stderr
        assert not any(out.glob("*")), list(out.glob("*"))


def test_make_repo_from_a_gnupg_home(packages, keys, tmp_path: Path):
    """GNUPGHOME + SIGNING_KEY_ID: that home's key signs; the home is left as it was (no key imported)."""
    signing, _ = keys
    out = tmp_path / "out"
    before = sorted(p.name for p in signing.home.iterdir())
    try:
        make("repo", REPO_DIR=str(out), REPO_URL="https://packages.example.invalid/dm", GNUPGHOME=str(signing.home),
             SIGNING_KEY_ID=signing.fingerprint)
    finally:
        stop_agents(signing.home)
    verified = subprocess.run(["gpgv", "--homedir", str(tmp_path), "--keyring", str(out / "docker-mirror.gpg"),
                               str(out / "apt/dists/stable/InRelease")], capture_output=True, text=True)
    assert verified.returncode == 0 and f"using RSA key {signing.fingerprint}" in verified.stderr, verified.stderr
    assert sorted(p.name for p in signing.home.iterdir() if p.name != "random_seed") == \
        [name for name in before if name != "random_seed"]
    assert "baseurl=https://packages.example.invalid/dm/yum/el$releasever/$basearch/" in \
        (out / "docker-mirror.repo").read_text()


def test_repository_files(repo: Path, keys, packages, tmp_path: Path):
    signing, _ = keys
    url = f"file://{repo}"
    assert (repo / "docker-mirror.repo").read_text().splitlines()[2:] == [
        "[docker-mirror]",
        "name=docker-mirror for EL$releasever",
        f"baseurl={url}/yum/el$releasever/$basearch/",
        "enabled=1",
        "gpgcheck=1",
        "repo_gpgcheck=1",
        f"gpgkey={url}/RPM-GPG-KEY-docker-mirror",
    ]
    assert (repo / "docker-mirror.sources").read_text().splitlines()[1:] == [
        "Types: deb", f"URIs: {url}/apt", "Suites: stable", "Components: main", "Architectures: amd64",
        f"Signed-By: {KEYRING}"]
    # the published keys are the signing key's public half, and nothing secret is published or kept
    for name in ("RPM-GPG-KEY-docker-mirror", "docker-mirror.gpg"):
        shown = gpg(tmp_path, "--with-colons", "--show-keys", str(repo / name)).stdout.decode()
        assert [line.split(":")[9] for line in shown.splitlines() if line.startswith("fpr:")] == [signing.fingerprint]
    for path in repo.rglob("*"):
        assert not path.is_file() or b"PRIVATE KEY" not in path.read_bytes(), path
    assert not (REPO / "build/repo-gnupg").exists()
    # each EL version's directory holds its build; the .debs are in the pool
    for release, name in RPMS.items():
        assert sorted(p.name for p in (repo / f"yum/el{release}/x86_64").glob("*.rpm")) == [name]
    assert sorted(p.name for p in (repo / "apt/pool/main/d/docker-mirror").iterdir()) == \
        sorted([packages["deb"].name, packages["upgrade"].name])
    # the signatures of the metadata, checked with the published keyring alone
    release = repo / "apt/dists/stable/Release"
    repomds = sorted(repo.glob("yum/el*/x86_64/repodata/repomd.xml"))
    assert len(repomds) == 3
    for signed in ([release.with_name("InRelease")], [release.with_name("Release.gpg"), release],
                   *([path.with_suffix(".xml.asc"), path] for path in repomds)):
        verified = subprocess.run(["gpgv", "--homedir", str(tmp_path), "--keyring", str(repo / "docker-mirror.gpg"),
                                   *map(str, signed)], capture_output=True, text=True)
        assert verified.returncode == 0 and f"using RSA key {signing.fingerprint}" in verified.stderr, \
            (signed, verified.stderr)
    # the packages in dist/ stay unsigned: the repository signs copies
    assert subprocess.run(["rpm", "-K", "--dbpath", str(tmp_path / "rpmdb"), str(packages["rpm"])], capture_output=True,
                          text=True).stdout.strip().endswith(": digests OK")


# --- apt, under the booted systemd ---------------------------------------------------------

@pytest.fixture(scope="module")
def apt_variants(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Copies of the apt repository with one thing wrong each."""
    root = tmp_path_factory.mktemp("apt-variants")
    unsigned = linked_copy(repo / "apt", root / "unsigned")
    for name in ("InRelease", "Release.gpg"):
        (unsigned / "dists/stable" / name).unlink(missing_ok=True)
    # the index says another size for the package, as a swapped .deb would need: Packages and Packages.gz
    tampered = linked_copy(repo / "apt", root / "tampered")
    index = tampered / "dists/stable/main/binary-amd64/Packages"
    changed = index.read_bytes().replace(b"\nSize: ", b"\nSize: 1", 1)
    replace(index, changed)
    replace(index.with_suffix(".gz"), gzip.compress(changed, mtime=0))
    # the .deb itself changed by one byte, the signed index untouched
    deb = linked_copy(repo / "apt", root / "deb")
    newest = deb / f"pool/main/d/docker-mirror/docker-mirror_{UPGRADE}_amd64.deb"
    replace(newest, flip(newest.read_bytes(), b"debian-binary"))
    return {"unsigned": unsigned, "tampered": tampered, "deb": deb}


@pytest.fixture(scope="module")
def apt_host(repo: Path, apt_variants, keys, tmp_path_factory: pytest.TempPathFactory):
    """A booted Debian 12 container whose only apt source is what a test writes, with the repository's
    keyring installed as the README says and another key beside it."""
    work = tmp_path_factory.mktemp("apt-host")
    variants = next(iter(apt_variants.values())).parent
    container = Container("dm-repo", work, binds={repo: str(repo), variants: str(variants),
                                                  keys[1].binary.parent: "/other-key"})
    container.boot()
    try:
        address = f"127.0.0.1:{free_port()}"
        container.write("/etc/docker-mirror/config.yml", f"# preseeded by the test\nlisten: {address}\n"
                        "hostname: localhost\nupstream:\n  url: http://127.0.0.1:9\n")
        container.run("rm", "-f", "/etc/apt/sources.list")               # no Debian mirror: only ours
        container.run("install", "-D", "-m", "0644", str(repo / "docker-mirror.gpg"), KEYRING)
        container.run("install", "-D", "-m", "0644", "/other-key/public.gpg", "/etc/apt/keyrings/other.gpg")
        yield container, address
    finally:
        container.stop()


def apt_update(container: Container, sources: str) -> subprocess.CompletedProcess:
    """apt-get update with ``sources`` as the only source, from empty lists."""
    container.write("/etc/apt/sources.list.d/docker-mirror.sources", sources)
    container.run("find", "/var/lib/apt/lists", "-type", "f", "-delete")
    return container.run("apt-get", "update", check=False, timeout=300)


def sources(repo: Path, apt: Path | None = None, keyring: str = KEYRING) -> str:
    text = (repo / "docker-mirror.sources").read_text()
    if apt is not None:
        text = text.replace(f"URIs: file://{repo}/apt", f"URIs: file://{apt}")
    return text.replace(f"Signed-By: {KEYRING}", f"Signed-By: {keyring}")


def test_apt_installs_from_the_signed_repository(repo: Path, apt_host):
    container, address = apt_host
    updated = apt_update(container, sources(repo))
    assert updated.returncode == 0, updated.stdout + updated.stderr
    assert "W:" not in updated.stderr and "E:" not in updated.stderr, updated.stderr
    installed = container.run("apt-get", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confold",
                              "docker-mirror", timeout=600)
    assert f"file:{repo}/apt stable/main amd64 docker-mirror amd64 {UPGRADE}" in installed.stdout  # the newest
    assert container.run("dpkg-query", "-W", "-f", "${Version}", "docker-mirror").stdout == UPGRADE
    assert container.run("systemctl", "is-active", "docker-mirror", check=False).stdout.strip() == "active"
    assert container.show("docker-mirror", "StatusText").startswith(f"https://{address} | cache ")


def test_apt_refuses_an_unsigned_copy(repo: Path, apt_host, apt_variants):
    container, _ = apt_host
    assert apt_update(container, sources(repo)).returncode == 0                  # the signed original
    refused = apt_update(container, sources(repo, apt_variants["unsigned"]))
    assert refused.returncode == 100
    assert f"E: The repository 'file:{apt_variants['unsigned']} stable Release' is not signed." in refused.stderr


def test_apt_refuses_the_repository_under_another_key(repo: Path, apt_host, keys):
    container, _ = apt_host
    refused = apt_update(container, sources(repo, keyring="/etc/apt/keyrings/other.gpg"))
    assert refused.returncode == 100
    # the signature is there and names the signing key, which this keyring does not hold
    assert f"NO_PUBKEY {keys[0].fingerprint[-16:]}" in refused.stderr, refused.stderr
    assert f"E: The repository 'file:{repo}/apt stable InRelease' is not signed." in refused.stderr


def test_apt_refuses_a_changed_index(repo: Path, apt_host, apt_variants):
    container, _ = apt_host
    refused = apt_update(container, sources(repo, apt_variants["tampered"]))
    assert refused.returncode == 100
    assert "Hash Sum mismatch" in refused.stderr or "File has unexpected size" in refused.stderr, refused.stderr


def test_apt_refuses_a_changed_package(repo: Path, apt_host, apt_variants):
    container, _ = apt_host
    assert apt_update(container, sources(repo, apt_variants["deb"])).returncode == 0   # the index is intact
    container.run("apt-get", "remove", "-y", "-q", "docker-mirror", check=False, timeout=600)
    container.run("apt-get", "clean")
    refused = container.run("apt-get", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confold",
                            "docker-mirror", check=False, timeout=600)
    assert refused.returncode == 100
    assert "Hash Sum mismatch" in refused.stderr, refused.stderr


# --- dnf and rpm on the yum repository -------------------------------------------------------

# What `dnf install` does with gpgcheck=1 before it installs a package (which needs the package's
# dependencies, absent from an empty installroot): download it, check its signature against the
# keys of the installroot's rpm database, import the repository's gpgkey= if that is missing, check again.
PACKAGE_GPGCHECK = """
import os
import sys
import dnf
conf, root, releasever, reposdir, destdir = sys.argv[1:]
base = dnf.Base()
base.conf.read(conf)
base.conf.installroot, base.conf.releasever = root, releasever
base.conf.reposdir, base.conf.destdir = [reposdir], destdir
for option in ("cachedir", "logdir", "persistdir"):        # what the dnf command does with --installroot
    base.conf.prepend_installroot(option)
    os.makedirs(getattr(base.conf, option), exist_ok=True)
base.read_all_repos()
base.fill_sack(load_system_repo=False)
pkg = base.sack.query().available().filter(name="docker-mirror").run()[0]
base.download_packages([pkg])
code, message = base.package_signature_check(pkg)
print("first check:", code, message)
if code == 1:
    base.package_import_key(pkg, askcb=lambda *args: True)
    code, message = base.package_signature_check(pkg)
print("check:", code, message, pkg.localPkg())
"""


def dnf(work: Path, repo_file: str, releasever: str, *args: str, python: bool = False) -> subprocess.CompletedProcess:
    """Debian's dnf on ``repo_file`` alone: installroot, configuration and repos.d in ``work``
    (``python``: PACKAGE_GPGCHECK through dnf's Python API instead of the dnf command)."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "repos.d").mkdir(parents=True)
    (work / "root").mkdir()
    (work / "repos.d/docker-mirror.repo").write_text(repo_file)
    (work / "dnf.conf").write_text(f"[main]\ngpgcheck=1\nreposdir={work / 'repos.d'}\n")
    if python:
        argv = ["/usr/bin/python3", "-c", PACKAGE_GPGCHECK, str(work / "dnf.conf"), str(work / "root"), releasever,
                str(work / "repos.d"), str(work / "download")]
    else:
        argv = ["dnf", "-y", "--config", str(work / "dnf.conf"), f"--setopt=reposdir={work / 'repos.d'}",
                "--installroot", str(work / "root"), "--releasever", releasever, *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)
    finally:
        stop_agents(work)


@pytest.mark.parametrize("releasever", ["7", "8", "9"])
def test_dnf_reads_the_signed_yum_repository(repo: Path, keys, tmp_path: Path, releasever: str):
    signing, _ = keys
    repo_file = (repo / "docker-mirror.repo").read_text()
    made = dnf(tmp_path / "dnf", repo_file, releasever, "makecache")
    assert made.returncode == 0, made.stdout + made.stderr
    assert "Metadata cache created." in made.stdout
    assert f"Importing GPG key 0x{signing.short.upper()}" in made.stdout + made.stderr   # for repomd.xml.asc
    found = dnf(tmp_path / "dnf", repo_file, releasever, "repoquery", "--location", "docker-mirror")
    assert found.returncode == 0, found.stdout + found.stderr
    assert found.stdout.split() == [f"file://{repo}/yum/el{releasever}/x86_64/{RPMS[releasever]}"]
    # gpgcheck=1: the package's signature, with the key imported from gpgkey= into the installroot's rpmdb
    checked = dnf(tmp_path / "dnf", repo_file, releasever, python=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "first check: 1 " in checked.stdout                        # signed by a key not yet trusted
    assert f"check: 0  {repo}/yum/el{releasever}/x86_64/{RPMS[releasever]}" in checked.stdout.splitlines()
    assert f"Importing GPG key 0x{signing.short.upper()}" in checked.stderr + checked.stdout


def test_dnf_refuses_the_repository_under_another_key(repo: Path, keys, tmp_path: Path):
    _, other = keys
    repo_file = (repo / "docker-mirror.repo").read_text()
    assert dnf(tmp_path / "dnf", repo_file, "9", "makecache").returncode == 0
    wrong = repo_file.replace(f"gpgkey=file://{repo}/RPM-GPG-KEY-docker-mirror", f"gpgkey=file://{other.public}")
    refused = dnf(tmp_path / "dnf", wrong, "9", "makecache")
    assert refused.returncode == 1
    assert "repomd.xml GPG signature verification error: Bad GPG signature" in refused.stderr, refused.stderr


def test_dnf_refuses_a_changed_repomd(repo: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    linked_copy(repo / "yum", copy / "yum")
    shutil.copy(repo / "RPM-GPG-KEY-docker-mirror", copy)
    repomd = copy / "yum/el9/x86_64/repodata/repomd.xml"
    replace(repomd, repomd.read_bytes().replace(b"<revision>", b"<revision>1", 1))
    repo_file = (repo / "docker-mirror.repo").read_text().replace(f"file://{repo}/", f"file://{copy}/")
    assert dnf(tmp_path / "dnf", repo_file.replace("/el$releasever/", "/el8/"), "9", "makecache").returncode == 0
    refused = dnf(tmp_path / "dnf", repo_file, "9", "makecache")
    assert refused.returncode == 1
    assert "repomd.xml GPG signature verification error: Bad GPG signature" in refused.stderr, refused.stderr


def rpm_k(dbpath: Path, key: Path, rpm: Path) -> subprocess.CompletedProcess:
    """rpm -Kv against a throw-away rpm database that trusts ``key`` only (Debian's rpm keeps its
    database in ~/.rpmdb: never that one)."""
    if not dbpath.exists():
        dbpath.mkdir(parents=True)
        subprocess.run(["rpm", "--dbpath", str(dbpath), "--import", str(key)], check=True, capture_output=True)
    return subprocess.run(["rpm", "--dbpath", str(dbpath), "-Kv", str(rpm)], capture_output=True, text=True)


def test_rpm_signatures(repo: Path, keys, tmp_path: Path):
    signing, other = keys
    for release in ("7", "9"):
        rpm = repo / f"yum/el{release}/x86_64/{RPMS[release]}"
        checked = rpm_k(tmp_path / "db", signing.public, rpm)
        assert checked.returncode == 0, checked.stdout
        lines = [line.strip() for line in checked.stdout.splitlines()[1:]]
        assert f"Header V4 RSA/SHA256 Signature, key ID {signing.short}: OK" in lines
        if release == "7":                          # the header+payload signature EL7's rpm 4.11 checks
            assert f"V4 RSA/SHA256 Signature, key ID {signing.short}: OK" in lines
        assert all(line.endswith(": OK") for line in lines), lines
        # a database that trusts another key only
        untrusted = rpm_k(tmp_path / "other-db", other.public, rpm)
        assert untrusted.returncode == 1
        assert f"Header V4 RSA/SHA256 Signature, key ID {signing.short}: NOKEY" in untrusted.stdout


def test_rpm_refuses_a_changed_package(repo: Path, keys, tmp_path: Path):
    signing, _ = keys
    for release in ("7", "9"):
        rpm = (repo / f"yum/el{release}/x86_64/{RPMS[release]}").read_bytes()
        header = tmp_path / f"header-el{release}.rpm"                  # the Summary, in the signed header
        header.write_bytes(flip(rpm, b"Pull-through"))
        checked = rpm_k(tmp_path / "db", signing.public, header)
        assert checked.returncode == 1
        assert f"Header V4 RSA/SHA256 Signature, key ID {signing.short}: BAD" in checked.stdout, checked.stdout
    # EL7's rpm reads no payload digest: the header+payload signature is what catches a changed payload
    rpm = (repo / f"yum/el7/x86_64/{RPMS['7']}").read_bytes()
    payload = tmp_path / "payload-el7.rpm"
    payload.write_bytes(rpm[:-1000] + bytes([rpm[-1000] ^ 0xFF]) + rpm[-999:])
    checked = rpm_k(tmp_path / "db", signing.public, payload)
    assert checked.returncode == 1
    assert f"    V4 RSA/SHA256 Signature, key ID {signing.short}: BAD" in checked.stdout, checked.stdout
