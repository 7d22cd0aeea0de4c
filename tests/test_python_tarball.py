"""The EL7 RPM's interpreter: `make python-tarball` (and the start of `make rpm-el7`) downloads the
pinned python-build-standalone tarball (PYTHON_URL, PYTHON_SHA256) and refuses one whose SHA-256
differs, leaving nothing a later make would trust. Here the "download" is a file:// URL of a small
tarball laid out like an install_only one, and BUILD/DIST point into the test's directory; the
real stand-in interpreter and a full RPM build are in tests/test_packages.py."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def install_only_tarball(path: Path, version: str = "3.12") -> str:
    """A tarball with the layout of an install_only build (python/lib/pythonX.Y/os.py); its SHA-256."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in ((f"python/lib/python{version}/os.py", b"# os\n"), ("python/bin/python3", b"#!/bin/sh\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), f"BUILD={tmp_path / 'build'}",
                           f"DIST={tmp_path / 'dist'}", *args], capture_output=True, text=True, timeout=300)


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_the_pinned_download_is_checked_and_kept(tmp_path: Path):
    source = tmp_path / "cpython-3.12.99+20990101-x86_64-unknown-linux-gnu-install_only.tar.gz"
    digest = install_only_tarball(source)
    url = f"file://{tmp_path}/cpython-3.12.99%2B20990101-x86_64-unknown-linux-gnu-install_only.tar.gz"
    result = make(tmp_path, "python-tarball", f"PYTHON_URL={url}", f"PYTHON_SHA256={digest}")
    assert result.returncode == 0, result.stderr
    kept = tmp_path / "build/python" / source.name                  # %2B in the URL: + in the file name
    assert kept.read_bytes() == source.read_bytes()
    assert files_under(tmp_path / "build") == [f"python/{source.name}"]      # no .part left over
    # checked again, not fetched again: the source may be gone
    source.unlink()
    again = make(tmp_path, "python-tarball", f"PYTHON_URL={url}", f"PYTHON_SHA256={digest.upper()}")
    assert again.returncode == 0, again.stderr
    assert "downloaded before" in again.stdout


def test_a_download_with_another_checksum_is_refused_and_not_kept(tmp_path: Path):
    source = tmp_path / "python.tar.gz"
    digest = install_only_tarball(source)
    wrong = "0" * 64
    result = make(tmp_path, "rpm-el7", f"PYTHON_URL=file://{source}", f"PYTHON_SHA256={wrong}")
    assert result.returncode == 2                                   # make's status for a failed recipe
    refusals = [line for line in result.stderr.splitlines() if "SHA-256" in line]
    assert refusals == [f"rpm/fetch-python.sh: {tmp_path}/build/python/python.tar.gz: SHA-256 is {digest}, "
                        f"expected {wrong} (PYTHON_SHA256); refusing the download from file://{source} (nothing kept)"]
    assert files_under(tmp_path / "build") == [] and files_under(tmp_path / "dist") == []   # no RPM, no file


def test_a_stale_copy_is_replaced_and_a_bad_one_never_stays(tmp_path: Path):
    """A file left in build/python/ that does not match the pin (damaged, or an older pin under the
    same name) is not trusted: downloaded again, or removed when the download does not match either."""
    source = tmp_path / "python.tar.gz"
    digest = install_only_tarball(source)
    kept = tmp_path / "build/python/python.tar.gz"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"truncated")
    result = make(tmp_path, "python-tarball", f"PYTHON_URL=file://{source}", f"PYTHON_SHA256={digest}")
    assert result.returncode == 0, result.stderr
    assert kept.read_bytes() == source.read_bytes()
    kept.write_bytes(b"truncated")
    refused = make(tmp_path, "python-tarball", f"PYTHON_URL=file://{source}", f"PYTHON_SHA256={'1' * 64}")
    assert refused.returncode == 2
    assert files_under(tmp_path / "build") == []
    missing = make(tmp_path, "python-tarball", f"PYTHON_URL=file://{tmp_path}/absent.tar.gz", f"PYTHON_SHA256={digest}")
    assert missing.returncode == 2 and "could not download" in missing.stderr
    assert files_under(tmp_path / "build") == []


def test_a_given_tarball_is_used_as_given_or_checked_against_an_explicit_checksum(tmp_path: Path):
    tarball = tmp_path / "local.tar.gz"
    digest = install_only_tarball(tarball)
    plain = make(tmp_path, "python-tarball", f"PYTHON_TARBALL={tarball}")
    assert plain.returncode == 0, plain.stderr
    assert f"SHA-256 {digest} (PYTHON_TARBALL, not checked" in plain.stdout      # recorded in the build log
    checked = make(tmp_path, "python-tarball", f"PYTHON_TARBALL={tarball}", f"PYTHON_SHA256={digest}")
    assert checked.returncode == 0, checked.stderr
    refused = make(tmp_path, "rpm-el7", f"PYTHON_TARBALL={tarball}", f"PYTHON_SHA256={'2' * 64}")
    assert refused.returncode == 2
    assert f"{tarball}: SHA-256 is {digest}, expected {'2' * 64} (PYTHON_SHA256); refusing it" in refused.stderr
    assert files_under(tmp_path / "build") == [] and files_under(tmp_path / "dist") == []
    assert tarball.exists()                                           # the builder's own file is left alone


def test_a_tarball_that_is_no_install_only_build_is_refused(tmp_path: Path):
    tarball = tmp_path / "other.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("README"), io.BytesIO(b""))
    result = make(tmp_path, "rpm-el7", f"PYTHON_TARBALL={tarball}")
    assert result.returncode == 2
    assert f"{tarball}: not a CPython install_only tarball (no python/lib/python3.X/os.py)" in result.stdout + result.stderr
    assert files_under(tmp_path / "dist") == []
