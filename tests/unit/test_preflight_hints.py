"""Which hint preflight gives for a cache directory it cannot use. Under systemd (INVOCATION_ID
set) a read-only path is most likely the hardened unit's sandbox (ProtectSystem=strict), which
only a ReadWritePaths= drop-in opens; elsewhere, the filesystem is read-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockermirror.service import preflight


@pytest.fixture
def read_only(monkeypatch):
    monkeypatch.setattr(preflight, "_read_only", lambda path: True)


@pytest.mark.parametrize("new", [False, True])
def test_under_systemd_a_read_only_cache_dir_is_opened_with_a_drop_in(tmp_path: Path, monkeypatch, read_only, new):
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    root = tmp_path / "cache" if new else tmp_path
    problem = preflight.cache_dir_problem(root)
    assert "systemctl edit docker-mirror" in problem
    assert f"[Service] and ReadWritePaths={root}, then systemctl restart docker-mirror" in problem
    assert "choose a directory on a writable one" not in problem
    assert (f"create it first (mkdir -p {root} && chown " in problem) == new


@pytest.mark.parametrize("new", [False, True])
def test_outside_systemd_a_read_only_cache_dir_is_a_read_only_filesystem(tmp_path: Path, monkeypatch, read_only,
                                                                          new):
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    root = tmp_path / "cache" if new else tmp_path
    problem = preflight.cache_dir_problem(root)
    assert problem.endswith("is on a read-only filesystem; choose a directory on a writable one")
    assert "ReadWritePaths" not in problem


def test_an_existing_cache_on_a_read_only_filesystem_is_served_degraded(tmp_path: Path, monkeypatch, read_only):
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    (tmp_path / "index.sqlite").write_bytes(b"")
    assert preflight.cache_dir_problem(tmp_path) is None
