"""metrics.listen is checked before anything starts, as listen is: the registry's own port (or
one overlapping it) is refused when the configuration is read, one in use by another process
before the start; and a port taken after the check (a race) is the same one line, exit 2, not
uvicorn's undocumented exit 3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_cli_mistakes import free_address, listening, run


@pytest.mark.parametrize("metrics", ["{listen}", "0.0.0.0:{port}", "[::]:{port}"])
def test_the_registry_port_is_refused_when_the_file_is_read(tmp_path: Path, metrics):
    listen = free_address()
    port = listen.rpartition(":")[2]
    config = tmp_path / "config.yml"
    config.write_text(f"listen: {listen}\nmetrics:\n  listen: '{metrics.format(listen=listen, port=port)}'\n")
    for command in ("check-config", "serve"):
        result = run(command, "--config", str(config), "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path) \
            if command == "serve" else run(command, "--config", str(config), cwd=tmp_path)
        assert result.returncode == 2, result
        lines = result.stderr.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"docker-mirror: {config}:2: metrics.listen: "), lines[0]
        assert "is the registry's own port" in lines[0] and "give the metrics a port of their own" in lines[0]
    assert not (tmp_path / "cache").exists()


def test_a_listen_flag_on_the_metrics_port_is_refused(tmp_path: Path):
    metrics = free_address()
    config = tmp_path / "config.yml"
    config.write_text(f"metrics:\n  listen: {metrics}\n")
    result = run("serve", "--config", str(config), "--listen", f"0.0.0.0:{metrics.rpartition(':')[2]}",
                 "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stderr.splitlines()[-1].startswith(f"docker-mirror: {config}: metrics.listen: {metrics} is the "
                                                     "registry's own port"), result.stderr
    assert not (tmp_path / "cache").exists()


def test_a_metrics_port_in_use_is_one_line_naming_the_key(tmp_path: Path):
    config = tmp_path / "config.yml"
    with listening() as busy:
        address = "%s:%d" % busy.getsockname()
        config.write_text(f"listen: {free_address()}\nmetrics:\n  listen: {address}\n")
        result = run("serve", "--config", str(config), "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode == 2, result
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"docker-mirror: {config}: metrics.listen: cannot listen on {address}: "), last
    assert "another process listens there" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists()


def test_a_port_taken_after_the_check_is_the_documented_line_not_exit_3(tmp_path: Path):
    """The race: the preflight check found the port free, uvicorn's bind then fails."""
    with listening() as busy:
        address = "%s:%d" % busy.getsockname()
        code = ("import sys\n"
                "from dockermirror.service import preflight\n"
                "real, calls = preflight.listen_problem, []\n"
                "def racing(*a):\n"
                "    calls.append(a)\n"
                "    return None if len(calls) == 1 else real(*a)\n"
                "preflight.listen_problem = racing\n"
                "from dockermirror import cli\n"
                f"sys.exit(cli.main(['serve', '--listen', '{address}', '--cache-dir', sys.argv[1]]))\n")
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], capture_output=True, env=env,
                                text=True, cwd=tmp_path, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"docker-mirror: --listen: cannot listen on {address}: "), last
    assert "another process listens there" in last
