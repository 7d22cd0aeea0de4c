#!/usr/bin/env python3
"""Check that ELF files need no glibc symbol newer than a floor (CentOS 7 has glibc 2.17).

    rpm/glibc-floor.py [--max 2.17] PATH...

PATH may be a directory (searched), a wheel or tarball (unpacked to a temp dir), or an
ELF file. Prints the highest GLIBC_x.y each ELF file needs; exits 1 if any needs more
than --max. Uses objdump from binutils.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

VERSION = re.compile(rb"GLIBC_(\d+)\.(\d+)")


def elf_files(root: Path):
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        with open(path, "rb") as f:
            if f.read(4) == b"\x7fELF":
                yield path


def needed(path: Path) -> tuple[int, int] | None:
    out = subprocess.run(["objdump", "-T", str(path)], capture_output=True).stdout
    versions = {(int(a), int(b)) for a, b in VERSION.findall(out)}
    return max(versions) if versions else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max", default="2.17")
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args()
    limit = tuple(int(x) for x in args.max.split("."))
    worst, bad, count = (0, 0), [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for number, path in enumerate(args.paths):
            targets = [path]
            if path.is_dir():
                targets = [p for p in path.iterdir() if p.suffix in (".whl",) or p.name.endswith(".tar.gz")] or [path]
            for target in targets:
                root = target
                if target.suffix == ".whl":
                    root = Path(tmp) / f"{number}-{target.name}"
                    zipfile.ZipFile(target).extractall(root)
                elif target.name.endswith(".tar.gz"):
                    root = Path(tmp) / f"{number}-{target.name}"
                    with tarfile.open(target) as tar:
                        tar.extractall(root, filter="data")
                for elf in elf_files(root) if root.is_dir() else [root]:
                    count += 1
                    version = needed(elf)
                    if version is None:
                        continue
                    worst = max(worst, version)
                    if version > limit:
                        bad.append(f"{target.name}: {elf.relative_to(root) if root.is_dir() else elf.name} "
                                   f"needs GLIBC_{version[0]}.{version[1]}")
    for line in bad:
        print(line)
    print(f"{count} ELF files, highest glibc symbol GLIBC_{worst[0]}.{worst[1]} (floor {args.max}): "
          f"{'FAIL' if bad else 'ok'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
