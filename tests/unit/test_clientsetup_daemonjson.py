"""client-setup's steps and an existing /etc/docker/daemon.json, pasted (tests/support/pasted.py:
a scratch /etc, stand-ins for systemctl and docker, a real python behind a stand-in): the file is
merged into, never replaced; a file that is not JSON is left alone and docker not restarted;
pasting again changes nothing. The merge script runs on each target's interpreter: python3,
EL8/9's platform-python (3.6) and EL7's python (2.7), where this machine has them (pyenv)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.pasted import heredocs, run_pasted
from tests.unit.test_clientsetup_targets import HOST, steps

DAEMON = "/etc/docker/daemon.json"
BACKUP = "/etc/docker/daemon.json.before-docker-mirror"
# a client's own settings: a different storage driver would hide every image and container
OWN = ('{\n    "storage-driver": "devicemapper",\n    "data-root": "/srv/docker",\n'
       '    "log-driver": "journald",\n    "log-opts": {"tag": "caf\\u00e9 {{.Name}}"}\n}\n')
OWN_KEYS = ["storage-driver", "data-root", "log-driver", "log-opts"]
PYENV = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"


def interpreter(name: str) -> str | None:
    found = sorted(PYENV.glob(f"{name}.*/bin/python{name}"))
    return str(found[-1]) if found else None


# (the name the steps find, the interpreter behind it): Debian's python3, EL8/9's platform-python, EL7's python
PYTHONS = {"python3": ("python3", None), "el8": ("/usr/libexec/platform-python", "3.6"), "el7": ("python", "2.7")}


def pythons(python: str) -> dict[str, str] | None:
    """run_pasted's pythons: the one the steps find, run by that interpreter (None: this machine's python3)."""
    found, version = PYTHONS[python]
    if version is None:
        return None
    real = interpreter(version)
    if real is None:
        pytest.skip(f"no python {version} here")
    return {found: real}


def paste(tmp_path: Path, daemon: str | None, *, target: str = "debian", tls: bool = False, python: str = "python3",
          name: str = "pasted"):
    root = tmp_path / name
    if daemon is not None:
        (root / "etc/docker").mkdir(parents=True, exist_ok=True)
        (root / "etc/docker/daemon.json").write_text(daemon)
    return run_pasted(steps(target, tls=tls), root, pythons=pythons(python))


@pytest.mark.parametrize("python", list(PYTHONS))
@pytest.mark.parametrize("target", ["debian", "el7"])
def test_existing_settings_are_kept_and_the_entries_merged(tmp_path, target, python):
    result = paste(tmp_path, OWN, target=target, python=python)
    merged = json.loads(result.files[DAEMON])
    assert list(merged) == [*OWN_KEYS, "registry-mirrors", "insecure-registries"]      # the order kept
    assert {key: merged[key] for key in OWN_KEYS} == json.loads(OWN)
    assert merged["registry-mirrors"] == [f"http://{HOST}"] and merged["insecure-registries"] == [HOST]
    assert result.files[BACKUP] == OWN                                  # the file before, as it was
    assert "systemctl restart docker" in result.calls and result.stderr == ""
    assert not [path for path in result.files if path.startswith("/etc/docker/.daemon.json")]    # no temp file left

    # pasted again: nothing changes (no second entry, the copy is still the first file)
    root = tmp_path / "pasted"
    again = run_pasted(steps(target, tls=False), root, pythons=pythons(python))
    assert again.files[DAEMON] == result.files[DAEMON] and again.files[BACKUP] == OWN
    assert "systemctl restart docker" in again.calls and again.stderr == ""


def test_entries_already_there_are_not_added_twice(tmp_path):
    own = json.dumps({"registry-mirrors": ["https://old-mirror.example"], "insecure-registries": [f"{HOST}"],
                      "debug": True})
    result = paste(tmp_path, own)
    merged = json.loads(result.files[DAEMON])
    # dockerd tries its mirrors in order: this one first, the other kept after it
    assert merged == {"registry-mirrors": [f"http://{HOST}", "https://old-mirror.example"],
                      "insecure-registries": [HOST], "debug": True}
    # with a trailing slash, as dockerd itself writes a mirror: the same mirror, nothing to add
    own = json.dumps({"registry-mirrors": [f"http://{HOST}/"], "insecure-registries": [HOST]})
    result = paste(tmp_path, own, name="slash")
    assert result.files[DAEMON] == own and BACKUP not in result.files
    assert "systemctl restart docker" in result.calls


@pytest.mark.parametrize("text", ['{"storage-driver": "overlay2",}\n', "[]\n", '{"registry-mirrors": "x"}'])
@pytest.mark.parametrize("target", ["debian", "el7"])
def test_a_file_that_is_not_json_is_left_alone_and_docker_not_restarted(tmp_path, target, text):
    result = paste(tmp_path, text, target=target, tls=True)
    assert result.files[DAEMON] == text and BACKUP not in result.files
    assert not any(call.startswith("systemctl restart docker") for call in result.calls)
    line, = result.stderr.splitlines()
    assert line.startswith(f"docker-mirror: {DAEMON} ")
    assert line.endswith(f': left as it was; add "registry-mirrors": ["https://{HOST}"] to it, '
                         "then systemctl restart docker")


def test_no_python_to_merge_with(tmp_path):
    result = run_pasted(steps("el7", tls=False), _with(tmp_path, OWN), pythons={})
    assert result.files[DAEMON] == OWN and BACKUP not in result.files
    assert "systemctl restart docker" not in result.calls
    assert result.stderr == (f"docker-mirror: no python here to merge into {DAEMON}: add \"registry-mirrors\": "
                             f"[\"http://{HOST}\"], \"insecure-registries\": [\"{HOST}\"] to it by hand, then "
                             "systemctl restart docker\n")


@pytest.mark.parametrize("before", [None, "", "\n", "{}\n", " { }\n"])
def test_missing_or_empty_file_is_written(tmp_path, before):
    result = paste(tmp_path, before, tls=True)
    written = heredocs(steps("debian", tls=True))[DAEMON]
    assert result.files[DAEMON] == written
    assert json.loads(written) == {"registry-mirrors": [f"https://{HOST}"]}
    assert BACKUP not in result.files and "systemctl restart docker" in result.calls


def _with(tmp_path: Path, daemon: str) -> Path:
    root = tmp_path / "pasted"
    (root / "etc/docker").mkdir(parents=True)
    (root / "etc/docker/daemon.json").write_text(daemon)
    return root


def test_the_python_stand_in_runs_only_on_the_scratch_root(tmp_path):
    """pasted.py's python runs the real interpreter, but never with a path outside the scratch root."""
    script = "mkdir -p /etc\npython3 -c 'import sys; open(sys.argv[1], \"w\").write(\"x\")' {}\n"
    result = run_pasted(script.format("/etc/written-here"), tmp_path / "in")
    assert result.files == {"/etc/written-here": "x"}
    outside = tmp_path / "outside"
    with pytest.raises(AssertionError, match=f"stand-in python3: {outside} is outside"):
        run_pasted(script.format(outside), tmp_path / "out")
    assert not outside.exists()
