"""The units CentOS 7 reads, checked against what CentOS 7 ships: every key against systemd 219's
parser table, every system call named in ``SystemCallFilter=`` against libseccomp 2.3.1's x86_64
table, and the other seccomp-related values against what systemd 219 parses. The drop-in read by
systemd >= 239 (EL8, EL9, Debian 12) keeps the calls EL7 cannot name, each known to libseccomp 2.5.2.
The tables are in tests/data, each with where it came from."""

from __future__ import annotations

import errno
import re
from pathlib import Path

from tests.support.units import entries

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
SPEC = REPO / "rpm" / "docker-mirror.spec"
DROPIN = REPO / "systemd" / "docker-mirror.service.d" / "50-hardening.conf"

# the calls of the new mount API and pidfd_getfd: no kernel of EL7 (3.10) has them and its
# libseccomp (2.3.1) does not know their names; every other target's does
MODERN_CALLS = {"fsconfig", "fsmount", "fsopen", "fspick", "mount_setattr", "move_mount", "open_tree",
                "pidfd_getfd"}


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def syscall_table(name: str) -> dict[str, int | None]:
    """name -> number on x86_64, None for a pseudo number (no such call on x86_64)."""
    table = {}
    for line in lines(DATA / name):
        call, number = line.split()
        table[call] = None if number == "PNR" else int(number)
    return table


def systemd_219() -> dict[str, set[str]]:
    facts = {}
    for line in lines(DATA / "systemd-219-rhel7.9-seccomp.txt"):
        name, _, words = line.partition(":")
        facts[name] = set(words.split())
    return facts


def installed_units(bundled_python: bool) -> set[str]:
    """The files under systemd/ that rpm/docker-mirror.spec installs in one flavour (EL7 is the
    bundled_python one), following its %if/%else/%endif on that flavour."""
    units, stack = set(), []
    for line in SPEC.read_text().splitlines():
        if line.startswith("%if"):
            m = re.fullmatch(r"%if %\{(with|without) bundled_python\}", line.strip())
            stack.append(None if m is None else (m.group(1) == "with") == bundled_python)
        elif line.startswith("%else"):
            stack[-1] = None if stack[-1] is None else not stack[-1]
        elif line.startswith("%endif"):
            stack.pop()
        elif all(cond is not False for cond in stack):
            units.update(re.findall(r"\bsystemd/(\S+)", line))
    return units


def el7_units() -> list[Path]:
    return [REPO / "systemd" / name for name in sorted(installed_units(bundled_python=True))]


def test_the_el7_rpm_installs_the_base_unit_and_the_socket_only():
    assert installed_units(bundled_python=True) == {"docker-mirror.service", "docker-mirror.socket"}
    assert installed_units(bundled_python=False) == {"docker-mirror.service", "docker-mirror.socket",
                                                     "docker-mirror.service.d/50-hardening.conf"}
    # Debian (systemd 252) gets the drop-in too
    assert "systemd/docker-mirror.service.d/50-hardening.conf" in (REPO / "debian/docker-mirror.install").read_text()


def test_every_key_is_known_to_systemd_219():
    known = set(lines(DATA / "systemd-219-rhel7.9-unit-keys.txt"))
    unknown = [f"{path.name}:{n}: [{section}] {key}=" for path in el7_units()
               for n, section, key, _ in entries(path) if f"{section}.{key}" not in known]
    assert not unknown, "\n".join(unknown)


def test_every_system_call_is_known_to_libseccomp_2_3_1():
    """systemd 219 resolves each name with libseccomp and logs every name that does not resolve
    to a call of this architecture as an error, at every daemon-reload."""
    table = syscall_table("libseccomp-2.3.1-x86_64-syscalls.txt")
    groups = systemd_219()["syscall-groups"]
    bad, named = [], 0
    for path in el7_units():
        for n, _, key, value in entries(path):
            if key != "SystemCallFilter":
                continue
            for word in value.removeprefix("~").split():
                named += 1
                if word.startswith("@"):
                    if word not in groups:
                        bad.append(f"{path.name}:{n}: {word} (no syscall groups in systemd 219)")
                elif word not in table:
                    bad.append(f"{path.name}:{n}: {word} (unknown to libseccomp 2.3.1)")
                elif table[word] is None:
                    bad.append(f"{path.name}:{n}: {word} (no such call on x86_64: libseccomp 2.3.1 gives a "
                               f"pseudo number, systemd 219 rejects it)")
    assert named > 0
    assert not bad, "\n".join(bad)


BOOLEANS = {"yes", "no", "true", "false", "on", "off", "1", "0"}


def parses_on_219(key: str, value: str, facts: dict[str, set[str]]) -> bool:
    """Whether systemd 219 parses this value of a seccomp or protection key without an error."""
    words = set(value.removeprefix("~").split())
    if key == "SystemCallArchitectures":
        return words <= facts["syscall-architectures"]
    if key == "SystemCallErrorNumber":
        return value.startswith("E") and hasattr(errno, value)
    if key == "RestrictAddressFamilies":
        return words <= facts["address-families"]
    if key == "ProtectSystem":
        return value in BOOLEANS | facts["protect-system"]
    if key == "ProtectHome":
        return value in BOOLEANS | facts["protect-home"]
    return True


def test_the_other_seccomp_values_parse_on_systemd_219():
    facts = systemd_219()
    bad = [f"{path.name}:{n}: {key}={value}" for path in el7_units() for n, _, key, value in entries(path)
           if not parses_on_219(key, value, facts)]
    assert not bad, "\n".join(bad)
    assert not parses_on_219("ProtectSystem", "strict", facts)     # 232: logged and ignored on 219


def test_the_dropin_for_newer_systemd_keeps_denying_the_calls_el7_cannot_name():
    """EL8/EL9/Debian read the drop-in after the base unit: its allow-list replaces the base's
    deny-list, and it names the new calls itself, each known to libseccomp 2.5.2 (EL8.10, EL9;
    Debian 12 has 2.5.4), so systemd 239 and later log nothing for them."""
    table = syscall_table("libseccomp-2.5.2-x86_64-syscalls.txt")
    base = {word for path in el7_units() for _, _, key, value in entries(path) if key == "SystemCallFilter"
            for word in value.removeprefix("~").split()}
    assert not MODERN_CALLS & base
    filters = [value for _, _, key, value in entries(DROPIN) if key == "SystemCallFilter"]
    assert filters[:2] == ["", "@system-service"]
    denied = {word for value in filters if value.startswith("~") for word in value[1:].split()}
    assert MODERN_CALLS <= denied
    assert sorted(word for word in denied if not word.startswith("@") and word not in table) == []
