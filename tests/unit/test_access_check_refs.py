"""`access check` takes a reference as pasted from `docker pull`: the tag or digest is dropped
(the rules match the repository; a tag does not change who may pull it), a registry's :PORT stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_cli_mistakes import run

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize("reference, status, said", [
    ("centos:7", 0, "allow: access[0] (line 6) of {config} decides for anonymous pulling docker.io/library/centos"),
    (f"docker.io/centos@{DIGEST}", 0, "allow: access[0] (line 6) of {config} decides for anonymous pulling "
                                      "docker.io/library/centos"),
    (f"library/centos:7@{DIGEST}", 0, "allow: access[0] (line 6) of {config} decides for anonymous pulling "
                                      "docker.io/library/centos"),
    ("busybox:1.36", 1, "deny: default deny: no rule of access: matches anonymous pulling docker.io/library/busybox"),
    ("127.0.0.1:5000/team/app:1", 0, "allow: access[1] (line 8) of {config} decides for anonymous pulling "
                                     "127.0.0.1:5000/team/app"),
])
def test_a_pasted_reference_is_checked_as_its_repository(tmp_path: Path, reference, status, said):
    config = tmp_path / "config.yml"
    config.write_text("upstreams:\n  - registry: docker.io\n  - registry: 127.0.0.1:5000\n"
                      "    url: http://127.0.0.1:5000\n"
                      "access:\n  - allow: [anonymous]\n    repositories: [library/centos]\n"
                      "  - allow: [anonymous]\n    repositories: [127.0.0.1:5000/team/*]\n")
    result = run("access", "check", "anonymous", reference, "--config", str(config), cwd=tmp_path)
    assert result.returncode == status, result
    assert result.stdout.splitlines() == [said.format(config=config)]
