"""The packages, built once per session with the Makefile, for every test that needs them.

``packages`` (session scope, registered in tests/conftest.py) runs ``make wheelhouse deb rpm``,
a rebuild of the .deb with a higher version (``upgrade``) and ``make rpm-el7`` with the
stand-in interpreter, and returns the four files in dist/. tests/test_packages.py and
tests/test_repo.py both use it, so a run builds them once.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.support import progress
from tests.support.nspawn import CACHE

REPO = Path(__file__).resolve().parent.parent.parent
DIST = REPO / "dist"
VERSION = next(line.split('"')[1] for line in (REPO / "dockermirror/__init__.py").read_text().splitlines()
               if line.startswith("__version__"))
UPGRADE = f"{VERSION}+upgrade1"
STANDIN = CACHE / "python-standin-3.11-x86_64.tar.gz"


def make(*targets: str, **variables: str) -> float:
    started = time.monotonic()
    command = " ".join(["make", *targets, *(f"{k}={v}" for k, v in variables.items())])
    with progress.step(command):
        result = subprocess.run(["make", "-C", str(REPO), *targets, *(f"{k}={v}" for k, v in variables.items())],
                                capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, \
        f"make {' '.join(targets)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return time.monotonic() - started


@pytest.fixture(scope="session")
def packages() -> dict[str, Path]:
    """Build the three packages (and an upgrade of the .deb) with the Makefile."""
    times = {"wheelhouse": make("wheelhouse"), "deb": make("deb"), "rpm": make("rpm"),
             "deb upgrade": make("deb", DEB_VERSION=UPGRADE)}
    if not STANDIN.exists():
        STANDIN.parent.mkdir(parents=True, exist_ok=True)
        with progress.step(f"compiling the stand-in CPython for the EL7 RPM into {STANDIN} (once; about 25 MB "
                           "of Debian source, 3-6 minutes on 2 cores)"):
            subprocess.run([str(REPO / "rpm/standin-python.sh"), str(STANDIN)], check=True, capture_output=True,
                           timeout=3600)
    times["rpm-el7"] = make("rpm-el7", PYTHON_TARBALL=str(STANDIN), ALLOW_NEWER_GLIBC_PYTHON="1")
    built = {"deb": DIST / f"docker-mirror_{VERSION}_amd64.deb",
             "upgrade": DIST / f"docker-mirror_{UPGRADE}_amd64.deb",
             "rpm": DIST / f"docker-mirror-{VERSION}-1.el9.x86_64.rpm",
             "rpm-el7": DIST / f"docker-mirror-{VERSION}-1.el7.x86_64.rpm"}
    print("\nbuild times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print("sizes: " + ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in built.values()))
    return built
