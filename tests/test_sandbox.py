"""The sandbox every client runs in: Docker Hub pinned to loopback for that process only,
and nothing written to the host's files, even when the process is killed mid-way.

Each test compares the host's /etc/hosts byte for byte (and its inode and mtime) before and
after, so any scheme that edits the real file, and fails to restore it, fails here.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.support.clients import client_env, client_sandbox
from tests.support.sandbox import Sandbox

HOSTS = Path("/etc/hosts")


def state(path: Path) -> tuple:
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns, st.st_mode


def sandbox_mounts() -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if "dm-sandbox" in line]


def test_hub_names_resolve_to_loopback_inside_and_the_host_is_untouched(tmp_path: Path):
    before = state(HOSTS)
    containers_existed = Path("/var/lib/containers").exists()
    marker = Path("/var/lib/containers/dm-sandbox-test")
    result = Sandbox(tmp_path).run(["sh", "-c", "getent ahostsv4 registry-1.docker.io | head -1; "
                                    "echo '10.0.0.1 extra' >> /etc/hosts; touch /etc/dm-sandbox-test; "
                                    f"mkdir -p {marker}; cat /etc/hosts"],
                                   capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[0] == "127.0.0.1"
    assert "10.0.0.1 extra" in result.stdout                  # the process could write its /etc/hosts
    assert state(HOSTS) == before                              # the host's is the same file, unchanged
    assert not Path("/etc/dm-sandbox-test").exists()
    assert not marker.exists()
    assert Path("/var/lib/containers").exists() == containers_existed
    assert sandbox_mounts() == []


def test_a_killed_client_leaves_nothing_behind(tmp_path: Path):
    before = state(HOSTS)
    proc = subprocess.Popen(Sandbox(tmp_path).argv(["sh", "-c", "echo '10.0.0.1 extra' >> /etc/hosts; "
                                                    "echo ready; exec sleep 300"]),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)                  # no clean-up code gets to run
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert state(HOSTS) == before
    assert sandbox_mounts() == []


def test_a_real_client_falling_back_to_docker_hub_stays_on_loopback(tmp_path: Path):
    sandbox = client_sandbox(tmp_path)
    result = sandbox.run(["skopeo", "inspect", "--retry-times", "0", "docker://docker.io/library/busybox:latest"],
                         capture_output=True, text=True, timeout=120, env=client_env(sandbox.dir))
    assert result.returncode != 0
    assert "127.0.0.1:443" in result.stderr and "connection refused" in result.stderr, result.stderr


def test_the_clients_configuration_is_the_tests_not_the_hosts(tmp_path: Path):
    sandbox = client_sandbox(tmp_path, {"containers/registries.conf": "# the test's\n"})
    result = sandbox.run(["sh", "-c", "cat /etc/containers/registries.conf; cat /etc/containers/policy.json; "
                          "ls /etc/containers/registries.conf.d /etc/docker/certs.d 2>&1 || true"],
                         capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("# the test's\n")
    assert '"insecureAcceptAnything"' in result.stdout
    assert result.stdout.count("No such file or directory") == 2
