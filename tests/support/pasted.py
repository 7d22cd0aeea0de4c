"""``docker-mirror client-setup``'s output, pasted as an admin would.

:func:`heredocs` reads the files the steps write (in-process, for the fast tier);
:func:`paste` runs the steps with ``sh -e`` with /etc moved under a scratch directory and
stand-ins for every command that would touch the machine (systemctl, docker,
update-ca-trust, the clients; its PATH has nothing else but mkdir and cat), and returns
the files they wrote, by their real /etc paths.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

_HEREDOC = re.compile(r"^cat > (\S+) <<'EOF'\n(.*?)^EOF$", re.MULTILINE | re.DOTALL)
# what the steps may run: stand-ins that record their arguments, and real file tools
STUBBED = ("systemctl", "docker", "update-ca-trust", "podman", "ctr", "skopeo", "nerdctl")
ALLOWED = ("mkdir", "cat")


def heredocs(script: str) -> dict[str, str]:
    """Every ``cat > PATH <<'EOF'`` in ``script``: {PATH: content}; a path written twice is an error."""
    files: dict[str, str] = {}
    for path, content in _HEREDOC.findall(script):
        assert path not in files, f"{path} is written twice"
        files[path] = content
    return files


def paste(script: str, root: Path) -> tuple[dict[str, str], list[str]]:
    """Run ``script`` as pasted into a root shell, its /etc being ``root``/etc: the files it
    wrote under /etc ({/etc/...: content}, paths in the content mapped back) and the
    stand-in commands it ran."""
    etc = f"{root}/etc/"
    # the real mkdir and cat run: refuse steps that would write anywhere but /etc (moved here)
    for target in re.findall(r"^(?:mkdir -p|cat >)\s+(\S+)", script, re.MULTILINE):
        assert target.startswith("/etc/"), f"the steps write outside /etc: {target}"
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    calls = root / "calls"
    for name in STUBBED:
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n')
        stub.chmod(0o755)
    for name in ALLOWED:
        (bin_dir / name).symlink_to(shutil.which(name))
    # PATH has nothing else: any other command in the steps fails them (and never runs here)
    result = subprocess.run(["/bin/sh", "-eu"], input=script.replace("/etc/", etc), capture_output=True,
                            text=True, env={"PATH": str(bin_dir), "HOME": str(root)}, timeout=60)
    assert result.returncode == 0, f"the pasted steps failed:\n{result.stderr}"
    files = {}
    for dirpath, _, filenames in os.walk(root / "etc"):
        for filename in filenames:
            path = Path(dirpath, filename)
            files["/etc/" + str(path.relative_to(root / "etc"))] = path.read_text().replace(etc, "/etc/")
    return files, calls.read_text().splitlines() if calls.exists() else []
