"""systemd unit files read as systemd reads them (for the tests that check our units)."""

from __future__ import annotations

from pathlib import Path


def entries(path: Path) -> list[tuple[int, str, str, str]]:
    """(line number, section, key, value) of each setting of a unit file."""
    out, section = [], ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((number, section, key.strip(), value.strip()))
    return out


def sections(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Section -> its (key, value) settings, in order."""
    out: dict[str, list[tuple[str, str]]] = {}
    for _, section, key, value in entries(path):
        out.setdefault(section, []).append((key, value))
    return out
