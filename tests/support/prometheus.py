"""Where the tests find Debian's prometheus and promtool: unpacked by tests/run.sh into the test
cache (``tests/apt-ensure.sh --unpack``; installing the package would start a prometheus.service
listening on every address of the machine), else on PATH."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

UNPACKED = Path(os.environ.get("DM_TEST_CACHE", "/var/cache/docker-mirror-tests")) / "prometheus" / "usr" / "bin"


def binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; the test fails, saying how to get it, if neither place has it."""
    found = shutil.which(name, path=f"{UNPACKED}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} is missing: tests/run.sh unpacks Debian's prometheus package into {UNPACKED.parent} "
                    f"(tests/apt-ensure.sh --unpack {UNPACKED.parent.parent} prometheus)")
    return found
