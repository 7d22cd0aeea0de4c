"""dockerd's ``/etc/docker/daemon.json`` in ``client-setup``'s steps: written when missing, merged into when not.

A client's daemon.json often holds ``storage-driver``, ``data-root`` or ``log-driver``; replacing
it would restart dockerd with another storage driver, and every image and container would seem
gone. So the steps write the file only when it is missing, empty or ``{}``; otherwise a small
script adds the mirror's entries to the lists there (a copy of the file first, made once, then the
new file written in full beside it and renamed over), keeping every other key and their order. A
file that is not a JSON object is left alone, with one line on stderr saying what to add, and
docker is not restarted. The script runs on the interpreter every target has: python3 (Debian,
often EL8/9), ``/usr/libexec/platform-python`` (EL8/9: 3.6), ``python`` (EL7: 2.7); it is written
for Python 2.7 and 3.x. Pasted again, it finds its entries there and changes nothing.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping, Sequence

PATH = "/etc/docker/daemon.json"
BACKUP = f"{PATH}.before-docker-mirror"
# the first of these that runs (EL8/9's platform-python is not on PATH)
PYTHONS = ("python3", "/usr/libexec/platform-python", "python")

# argv: the file, then KEY=VALUE for each entry to be in the list KEY (registry-mirrors: first,
# as dockerd tries its mirrors in order; any other: last). Exit 0: the file has them (changed or
# not); 1: left as it was, said why on stderr.
MERGE = r"""
import io, json, os, shutil, sys, tempfile
from collections import OrderedDict
path, entries = os.path.realpath(sys.argv[1]), [arg.split("=", 1) for arg in sys.argv[2:]]
wanted = ", ".join('"%s": ["%s"]' % (key, value) for key, value in entries)
def refuse(why):
    sys.stderr.write("docker-mirror: %s %s: left as it was; add %s to it, then systemctl restart docker\n"
                     % (sys.argv[1], why, wanted))
    sys.exit(1)
try:
    conf = json.loads(io.open(path, "rb").read().decode("utf-8"), object_pairs_hook=OrderedDict)
except (IOError, OSError, ValueError) as error:
    refuse("is not valid JSON (%s)" % error)
if not isinstance(conf, dict):
    refuse("is not a JSON object")
changed = False
for key, value in entries:
    values = conf.setdefault(key, [])
    if not isinstance(values, list):
        refuse("has %s, but not as a list" % key)
    if value.rstrip("/") not in [(u"%s" % item).rstrip("/") for item in values]:
        values.insert(0 if key == "registry-mirrors" else len(values), value)
        changed = True
if changed:
    text = json.dumps(conf, indent=2, separators=(",", ": ")) + "\n"
    backup = sys.argv[1] + ".before-docker-mirror"
    fd, new = tempfile.mkstemp(prefix=".daemon.json.", dir=os.path.dirname(path))
    try:
        if not os.path.exists(backup):
            shutil.copy2(path, backup)
        with os.fdopen(fd, "wb") as out:
            out.write(text.encode("ascii"))
            out.flush()
            os.fsync(out.fileno())
        status = os.stat(path)
        os.chmod(new, status.st_mode & 0o7777)
        os.chown(new, status.st_uid, status.st_gid)
        os.rename(new, path)
    except (IOError, OSError) as error:
        os.unlink(new)
        refuse("could not be written again (%s)" % error)
"""


def daemon_json_steps(daemon: Mapping[str, Sequence[str]], write_file: Callable[[str, str], str]) -> list[str]:
    """The steps that put ``daemon`` (key: values) into daemon.json; they set ``restart=''`` when
    docker must not be restarted (the file was left alone)."""
    entries = " ".join(shlex.quote(f"{key}={value}") for key, values in daemon.items() for value in values)
    wanted = ", ".join(f'"{key}": {json.dumps(list(values))}' for key, values in daemon.items())
    return [
        f"# {PATH}: written when missing or empty; else the entries are merged into it (other keys kept,",
        f"# a copy first in {BACKUP}); a file that is not JSON is left alone and docker not restarted",
        f"dj={PATH} restart=yes now=''",
        "if [ -f \"$dj\" ]; then now=$(tr -d ' \\t\\r\\n' < \"$dj\"); fi",
        "if [ -z \"$now\" ] || [ \"$now\" = '{}' ]; then",
        write_file(PATH, json.dumps(dict(daemon))),
        "else",
        "  py=''",
        f"  for p in {' '.join(PYTHONS)}; do",
        "    if command -v \"$p\" >/dev/null; then py=$p; break; fi",
        "  done",
        "  if [ -z \"$py\" ]; then",
        "    echo " + shlex.quote(f"docker-mirror: no python here to merge into {PATH}: add {wanted} to it by "
                             "hand, then systemctl restart docker") + " >&2",
        "    restart=''",
        f"  elif ! \"$py\" - \"$dj\" {entries} <<'PY'",
        MERGE.strip(),
        "PY",
        "  then",
        "    restart=''",
        "  elif command -v restorecon >/dev/null; then restorecon \"$dj\"    # its SELinux label",
        "  fi",
        "fi",
    ]
