"""A configuration file's mistake that YAML or Python itself trips on (a control character, an
unknown tag, a number too large, a lone surrogate, nesting thousands deep) is the user's mistake
like any other: exit 2, one line naming file:line: key; never "bug:" and a traceback. Writing
the output to a full disk is a failure to do the job (exit 1, one line), not a bug."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.test_cli_mistakes import FREE, run

CASES = {
    # id: (file text, what the line starts with after "docker-mirror: FILE", words of the line)
    "nul": ('listen: "a\0b"\n', ":1: invalid YAML", "control character #x0000"),
    "nul-later": ('listen: 127.0.0.1:5000\ncache:\n  dir: /x\x01\n', ":3: invalid YAML", "#x0001"),
    "unknown-tag": ("listen: !ENV x\n", ":1: listen:", "!ENV"),
    "unknown-tag-rule": ("access:\n  - allow: [!ENV x]\n", ":2: access[0].allow[0]:", "!ENV"),
    "unknown-tag-secret": ("upstream:\n  username: u\n  password: !ENV PASS\n", ":3: upstream.password:", "!ENV"),
    "duration-inf": ("cache:\n  blob_ttl: .inf\n", ":2: cache.blob_ttl:", "too long"),
    "duration-nan": ("cache:\n  tag_ttl: .nan\n", ":2: cache.tag_ttl:", "not a duration"),
    "duration-huge-text": ("cache:\n  blob_ttl: 99999999999999d\n", ":2: cache.blob_ttl:", "too long"),
    "size-5000-digits": ("cache:\n  max_size: " + "9" * 5000 + "\n", ":2: cache.max_size:", "digits"),
    "size-4000-digits": ("cache:\n  max_size: " + "9" * 4000 + "\n", ":2: cache.max_size:", "too large"),
    "size-400-digits-gb": ("cache:\n  verify_rate: " + "9" * 400 + "GB\n", ":2: cache.verify_rate:", "too large"),
    "surrogate-ca-bundle": ('upstream:\n  ca_bundle: "\\ud800"\n', ":2: upstream.ca_bundle:", "surrogate"),
    "surrogate-password-file": ('upstream:\n  password_file: "\\udfff"\n', ":2: upstream.password_file:",
                                "surrogate"),
    "surrogate-htpasswd": ('auth:\n  htpasswd: "/etc/\\ud800"\n', ":2: auth.htpasswd:", "surrogate"),
    "nested-5000": ("listen: " + "[" * 5000 + "\n", ": invalid YAML", "nested too deeply"),
}


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("text, starts, words", CASES.values(), ids=CASES.keys())
def test_a_file_yaml_trips_on_is_one_line_exit_2(tmp_path: Path, command, text, starts, words):
    config = tmp_path / "config.yml"
    config.write_text(text if "listen:" in text else f"{text}listen: {FREE}\n", errors="surrogatepass")
    argv = [command, "--config", str(config)]
    if command == "serve" and "dir:" not in text:
        argv += ["--cache-dir", str(tmp_path / "cache")]
    result = run(*argv, cwd=tmp_path)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and "bug:" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"docker-mirror: {config}{starts}"), lines[0]
    assert words in lines[0]
    assert "; " in lines[0]
    assert not (tmp_path / "cache").exists()


def test_a_non_utf8_file_name_from_the_command_line_is_still_a_file_name(tmp_path: Path):
    """Not a lone surrogate of the file: bytes the shell passed (os.fsdecode gives \\udcff)."""
    import subprocess
    import sys

    cache = os.fsencode(tmp_path) + b"/cache-\xff"
    result = subprocess.run([os.fsencode(sys.executable), b"-m", b"dockermirror", b"cache", b"stats", b"--cache-dir",
                             cache], capture_output=True, cwd=tmp_path, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result
    assert b"no cache at" in result.stderr and b"surrogate" not in result.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("argv", [["check-config"], ["client-setup", "--for", "el7"]])
def test_output_to_a_full_disk_is_one_line_exit_1(tmp_path: Path, argv):
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "dockermirror", *argv], stdout=full, stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == ["docker-mirror: cannot write the output: No space left on device; "
                                          "write it to a file system with room (or to a terminal)"]
