"""``docker-mirror client-setup``'s output, pasted as an admin would.

:func:`heredocs` reads the files the steps write (in-process, for the fast tier);
:func:`paste` runs the steps with ``sh -e`` with /etc moved under a scratch directory and
stand-ins for every command that would touch the machine (systemctl, docker,
update-ca-trust, update-ca-certificates, the clients; its PATH has nothing else but the
file tools of ALLOWED and the pythons asked for), and returns the files they wrote, by their real
paths. A python there is the real interpreter behind a stand-in that refuses any absolute path
among its arguments outside the scratch root (the steps' merge script writes only beside the file
it is given); ``/usr/libexec/platform-python`` (EL8/9) is one of those stand-ins too. /run and
/usr/local/share/ca-certificates (Debian's trust anchors) are moved under it too; a test
may put files there first (an existing registries.conf, /etc/sysconfig/docker).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_HEREDOC = re.compile(r"^cat > (\S+) <<'EOF'\n(.*?)^EOF$", re.MULTILINE | re.DOTALL)
# what the steps may run: stand-ins that record their arguments, and real file tools
STUBBED = ("systemctl", "docker", "update-ca-trust", "update-ca-certificates", "podman", "ctr", "skopeo", "nerdctl")
ALLOWED = ("mkdir", "cat", "grep", "sed", "tr", "cp", "mv")
# the interpreters a client may have, as the steps name them, each a stand-in running a real python
PYTHONS = {"python3": "python3", "/usr/libexec/platform-python": "platform-python", "python": "python"}
# the directories the steps may write in, each moved under the scratch root
MOVED = ("/etc/", "/run/", "/usr/local/share/ca-certificates/")


def heredocs(script: str) -> dict[str, str]:
    """Every ``cat > PATH <<'EOF'`` in ``script``: {PATH: content}; a path written twice is an error."""
    files: dict[str, str] = {}
    for path, content in _HEREDOC.findall(script):
        assert path not in files, f"{path} is written twice"
        files[path] = content
    return files


def paste(script: str, root: Path) -> tuple[dict[str, str], list[str]]:
    """Run ``script`` as pasted into a root shell, its /etc being ``root``/etc (and so for
    MOVED): the files under those directories after it ran ({/etc/...: content}, paths in the
    content mapped back) and the stand-in commands it ran, with their arguments."""
    result = run_pasted(script, root)
    return result.files, result.calls


@dataclass
class Pasted:
    files: dict[str, str]
    calls: list[str]
    stderr: str


def run_pasted(script: str, root: Path, outputs: dict[str, str] | None = None,
               pythons: dict[str, str] | None = None) -> Pasted:
    """:func:`paste`, with what the steps wrote to stderr; ``outputs``: more stand-ins, each
    printing that text (``containerd`` saying its version); ``pythons``: {name in PYTHONS: the real
    interpreter it runs} (by default python3, this machine's), the others absent."""
    if pythons is None:
        pythons = {"python3": os.path.realpath(sys.executable)}
    # the real file tools run: refuse steps that would write anywhere but the moved directories
    # (cp and mv write only to variables, each set to one of them)
    targets = re.findall(r"^\s*(?:mkdir -p|cat >)\s+(\S+)", script, re.MULTILINE)
    targets += re.findall(r"(?:^|\s)\w+=(/[^\s'\"]+)", script, re.MULTILINE)
    for path in targets:
        assert (path + "/").startswith(MOVED), f"the steps write outside {MOVED}: {path}"
    for command, destination in re.findall(r"(?:^|[;&|]\s*|then\s+|!\s+)(cp|mv)\s+(?:-p\s+)?\S+\s+([^\s;]+)", script,
                                           re.MULTILINE):
        assert re.fullmatch(r'"\$\w+(\.new)?"', destination), f"{command} to a path not checked: {destination}"
    bin_dir = root / "bin"                     # pasted again in the same root: the same stand-ins
    bin_dir.mkdir(parents=True, exist_ok=True)
    calls = root / "calls"
    calls.unlink(missing_ok=True)
    for name in STUBBED:
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n')
        stub.chmod(0o755)
    for name, text in (outputs or {}).items():
        stub = bin_dir / name
        stub.write_text(f"#!/bin/sh\necho \"{name} $*\" >> {calls}\ncat <<'OUT'\n{text}\nOUT\n")
        stub.chmod(0o755)
    for name in ALLOWED:
        if not (bin_dir / name).exists():
            (bin_dir / name).symlink_to(shutil.which(name))
    for name, stand_in in PYTHONS.items():
        (bin_dir / stand_in).unlink(missing_ok=True)
        if name in pythons:
            (bin_dir / stand_in).write_text(
                f'#!/bin/sh\nfor arg in "$@"; do\n  case "$arg" in /*) case "$arg" in {root}/*) ;; *)\n'
                f'    echo "stand-in {name}: $arg is outside {root}" >&2; exit 97;; esac;; esac\ndone\n'
                f'exec {pythons[name]} -E -s "$@"\n')
            (bin_dir / stand_in).chmod(0o755)
    script = script.replace("/usr/libexec/platform-python", str(bin_dir / "platform-python"))
    # each moved directory, named with or without its last slash
    moved = re.sub("(" + "|".join(re.escape(prefix.rstrip("/")) for prefix in MOVED) + r")(?=[/\s'\"]|$)",
                   lambda match: f"{root}{match.group(1)}", script, flags=re.MULTILINE)
    # PATH has nothing else: any other command in the steps fails them (and never runs here)
    result = subprocess.run(["/bin/sh", "-eu"], input=moved, capture_output=True,
                            text=True, env={"PATH": str(bin_dir), "HOME": str(root)}, timeout=60)
    assert result.returncode == 0, f"the pasted steps failed:\n{result.stderr}"
    files = {}
    for prefix in MOVED:
        for dirpath, _, filenames in os.walk(f"{root}{prefix}"):
            for filename in filenames:
                path = Path(dirpath, filename)
                text = path.read_text()
                for other in MOVED:
                    text = text.replace(f"{root}{other}", other)
                files["/" + str(path.relative_to(root))] = text
    stderr = result.stderr
    for prefix in MOVED:
        stderr = stderr.replace(f"{root}{prefix}", prefix)
    return Pasted(files, calls.read_text().splitlines() if calls.exists() else [], stderr)
