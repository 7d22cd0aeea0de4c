"""docker-mirror under a real systemd (booted with systemd-nspawn): enable --now, status,
journal priorities, journal fields and `docker-mirror report` over a cold and a warm pull,
reload with a new certificate, the watchdog, a clean stop, socket activation on a privileged
port. Plus the static checks of the unit files: systemd-analyze verify and security, and the
keys systemd 219 (CentOS 7) knows."""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Upstream
from tests.support.clients import skopeo_copy
from tests.support.nspawn import Container, wheelhouse
from tests.support.procs import free_port, wait_until
from tests.support.units import sections

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "docker-mirror.service"
DROPIN = REPO / "systemd" / "docker-mirror.service.d" / "50-hardening.conf"
SOCKET = REPO / "systemd" / "docker-mirror.socket"

# [Service] keys systemd 219 (RHEL/CentOS 7.9) parses, from its load-fragment table: the
# base unit may use nothing else.
EL7_SERVICE_KEYS = {
    "Type", "NotifyAccess", "ExecStart", "ExecReload", "ExecStop", "ExecStartPre", "Restart", "RestartSec",
    "StartLimitInterval", "StartLimitBurst", "TimeoutStartSec", "TimeoutStopSec", "WatchdogSec", "User", "Group",
    "UMask", "SyslogIdentifier", "LimitNOFILE", "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities",
    "PrivateTmp", "PrivateDevices", "PrivateNetwork", "ProtectHome", "ProtectSystem", "RestrictAddressFamilies",
    "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber", "Environment", "EnvironmentFile",
    "ReadWriteDirectories", "ReadOnlyDirectories", "InaccessibleDirectories", "DevicePolicy", "DeviceAllow",
    "RestartPreventExitStatus",     # tests/data/systemd-219-rhel7.9-unit-keys.txt has it too
}
EL7_UNIT_KEYS = {"Description", "Documentation", "After", "Wants", "Requires", "Before"}
EL7_SOCKET_KEYS = {"ListenStream", "BindIPv6Only", "Backlog", "NoDelay", "FreeBind", "Service"}


def test_base_unit_uses_only_what_systemd_219_knows():
    units = sections(UNIT)
    assert {k for k, _ in units["Service"]} <= EL7_SERVICE_KEYS
    assert {k for k, _ in units["Unit"]} <= EL7_UNIT_KEYS
    # 219 turns an allow-list of @groups into five syscalls (SIGSYS at start): only deny-lists here
    filters = [v for k, v in units["Service"] if k == "SystemCallFilter"]
    assert filters and all(v.startswith("~") and "@" not in v for v in filters)
    # the drop-in resets the base's deny-list before its allow-list
    dropin = [v for k, v in sections(DROPIN)["Service"] if k == "SystemCallFilter"]
    assert dropin[:2] == ["", "@system-service"]


def test_socket_unit_uses_only_what_systemd_219_knows():
    units = sections(SOCKET)
    assert {k for k, _ in units["Socket"]} <= EL7_SOCKET_KEYS
    assert {k for k, _ in units["Unit"]} <= EL7_UNIT_KEYS
    assert units["Install"] == [("WantedBy", "sockets.target")]


@pytest.fixture(scope="module")
def analyze_root(tmp_path_factory) -> Path:
    """A root directory in which systemd-analyze finds the unit's executables."""
    root = tmp_path_factory.mktemp("analyze")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").mkdir()
    shutil.copy("/bin/kill", root / "bin/kill")
    (root / "usr/bin/docker-mirror").write_text("#!/bin/sh\n")
    (root / "usr/bin/docker-mirror").chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    return root


@pytest.mark.parametrize("with_dropin, limit", [(False, 5.0), (True, 1.5)], ids=["el7-base", "with-hardening"])
def test_unit_verifies_and_scores(analyze_root: Path, tmp_path: Path, with_dropin: bool, limit: float):
    target = analyze_root / "etc/systemd/system"
    shutil.copy(UNIT, target)
    shutil.rmtree(target / "docker-mirror.service.d", ignore_errors=True)
    if with_dropin:
        (target / "docker-mirror.service.d").mkdir()
        shutil.copy(DROPIN, target / "docker-mirror.service.d")
    shutil.copy(SOCKET, target)
    verify = subprocess.run(["systemd-analyze", "verify", f"--root={analyze_root}", "docker-mirror.service",
                             "docker-mirror.socket"], capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == ""   # it exits 0 on unknown keys: no output
    units = tmp_path / "units"
    units.mkdir()
    shutil.copy(UNIT, units)
    if with_dropin:
        (units / "docker-mirror.service.d").mkdir()
        shutil.copy(DROPIN, units / "docker-mirror.service.d")
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(units / "docker-mirror.service")],
                         capture_output=True, text=True).stdout
    score = float(re.search(r"Overall exposure level for docker-mirror.service: ([\d.]+)", out).group(1))
    print(f"\nexposure {'with the drop-in' if with_dropin else 'EL7 base unit'}: {score}")
    assert score <= limit


# --- under a real systemd


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    return wheelhouse(REPO, tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="module")
def booted(tmp_path_factory, wheels: Path, upstream: Upstream):
    """A booted container with docker-mirror installed as the service would be on a host."""
    work = tmp_path_factory.mktemp("nspawn")
    container = Container("dm-systemd", work, binds={wheels: "/wheels", REPO / "systemd": "/units",
                                                     REPO / "etc": "/shipped-etc"})
    container.boot()
    try:
        port = free_port()
        c = container
        c.run("useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
              "--shell", "/usr/sbin/nologin", "docker-mirror")
        c.run("python3", "-m", "venv", "/opt/docker-mirror")
        c.run("/opt/docker-mirror/bin/pip", "install", "--quiet", "--no-index", "--find-links", "/wheels",
              "docker-mirror")
        c.run("ln", "-s", "/opt/docker-mirror/bin/docker-mirror", "/usr/bin/docker-mirror")
        c.write("/etc/docker-mirror/config.yml",
                f"listen: 127.0.0.1:{port}\nhostname: mirror.internal\nupstream:\n  url: {upstream.url}\n")
        c.run("docker-mirror", "cert", "init", "--hostname", "localhost", "--ip", "127.0.0.1")
        c.run("cp", "/units/docker-mirror.service", "/etc/systemd/system/")
        c.run("cp", "-r", "/units/docker-mirror.service.d", "/etc/systemd/system/")
        c.write("/etc/systemd/system/docker-mirror.service.d/90-test.conf",
                "[Service]\n# quick for the test; the shipped unit says 30 s\nWatchdogSec=3\n")
        c.run("systemctl", "daemon-reload")
        c.run("cp", "/units/docker-mirror.socket", "/etc/systemd/system/")
        verify = c.run("systemd-analyze", "verify", "docker-mirror.service", "docker-mirror.socket", check=False)
        assert verify.stdout + verify.stderr == "", verify.stderr
        c.run("systemctl", "enable", "docker-mirror")
        started = time.monotonic()
        c.run("systemctl", "start", "docker-mirror")   # Type=notify: returns once READY=1 arrived
        container.ready_seconds = time.monotonic() - started
        container.address = f"127.0.0.1:{port}"
        yield container
    finally:
        container.stop()


def journal(container: Container, since_cursor: str | None = None) -> list[dict]:
    args = ["journalctl", "-u", "docker-mirror", "-o", "json", "--no-pager"]
    if since_cursor:
        args += ["--after-cursor", since_cursor]
    return [json.loads(line) for line in container.run(*args).stdout.splitlines() if line.strip()]


def test_enable_now_gives_an_active_tls_mirror(booted: Container, upstream: Upstream, tmp_path: Path):
    print(f"\nsystemctl start -> READY=1: {booted.ready_seconds:.2f} s")
    assert booted.run("systemctl", "is-active", "docker-mirror").stdout.strip() == "active"
    assert booted.run("systemctl", "is-enabled", "docker-mirror").stdout.strip() == "enabled"
    assert booted.show("docker-mirror", "User") == "docker-mirror"
    status = booted.run("systemctl", "status", "--no-pager", "docker-mirror", check=False).stdout
    assert f"Status: \"https://{booted.address} | cache " in status
    assert booted.show("docker-mirror", "StatusText").startswith(f"https://{booted.address} | cache ")
    cert_dir = tmp_path / "certs.d"
    cert_dir.mkdir()
    (cert_dir / "ca.crt").write_text(booted.read("/etc/pki/docker-mirror/ca.crt"))   # trust only its CA
    dest = skopeo_copy(f"{booted.address}/library/busybox:latest", tmp_path / "busybox", cert_dir=cert_dir)
    assert (dest / "manifest.json").exists()
    key_mode = booted.run("stat", "-c", "%U:%G %a", "/etc/pki/tls/private/docker-mirror.key").stdout.strip()
    assert key_mode == "root:docker-mirror 640"
    assert booted.run("stat", "-c", "%U %a", "/etc/pki/docker-mirror/private/ca.key").stdout.strip() == "root 600"
    assert booted.run("stat", "-c", "%U %a", "/etc/pki/docker-mirror/private").stdout.strip() == "root 700"


def test_journal_has_request_lines_at_the_right_priority(booted: Container, upstream: Upstream):
    subprocess.run(["curl", "-sk", f"https://{booted.address}/v2/library/hello/blobs/sha256:" + "0" * 64],
                   capture_output=True)
    entries = wait_until(lambda: [e for e in journal(booted) if "/blobs/sha256:0000" in e.get("MESSAGE", "")],
                         10, what="the request in the journal")
    assert entries[0]["PRIORITY"] == "6" and entries[0]["MESSAGE"].startswith("access: 127.0.0.1 \"GET /v2/")
    assert entries[0]["SYSLOG_IDENTIFIER"] == "docker-mirror"
    warnings = [e for e in journal(booted) if e.get("PRIORITY") == "4"]
    assert any("is not valid for mirror.internal" in e["MESSAGE"] for e in warnings)  # hostname not in the SANs
    assert not any(e["MESSAGE"].startswith("<") for e in journal(booted))


@pytest.fixture(scope="module")
def tool_pulls(booted: Container, upstream: Upstream, tmp_path_factory) -> dict:
    """acme/tool:1.0 pulled twice through the service (cold, then warm), nothing else meanwhile:
    the requests a cold pull makes (kind, reference) and the bytes each answer had."""
    work = tmp_path_factory.mktemp("tool-pulls")
    cert_dir = work / "certs.d"
    cert_dir.mkdir()
    (cert_dir / "ca.crt").write_text(booted.read("/etc/pki/docker-mirror/ca.crt"))
    if booted.run("systemctl", "is-active", "docker-mirror", check=False).stdout.strip() != "active":
        booted.run("systemctl", "start", "docker-mirror")
    since = f"@{time.time():.6f}"
    time.sleep(0.01)
    source = f"{booted.address}/acme/tool:1.0"
    cold = skopeo_copy(source, work / "cold", cert_dir=cert_dir)
    warm = skopeo_copy(source, work / "warm", cert_dir=cert_dir)
    blobs = {f"sha256:{p.name}": p.stat().st_size for p in cold.iterdir() if len(p.name) == 64}
    assert blobs and {p.name for p in warm.iterdir()} == {p.name for p in cold.iterdir()}
    expected = {("manifest", "1.0"): (cold / "manifest.json").stat().st_size,
                **{("blob", digest): size for digest, size in blobs.items()}}
    return {"since": since, "expected": expected, "manifest_digest": upstream.seeded["tool"].digest}


def test_journal_fields_select_the_cold_pulls(booted: Container, tool_pulls: dict):
    """journalctl -u docker-mirror DOCKER_MIRROR_CACHE=MISS: exactly the cold pull's requests, with their fields."""
    def misses() -> list[dict]:
        out = booted.run("journalctl", "-u", "docker-mirror", "DOCKER_MIRROR_CACHE=MISS", "-o", "json", "--no-pager",
                         f"--since={tool_pulls['since']}").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    expected = tool_pulls["expected"]
    wait_until(lambda: len(misses()) >= len(expected), 10, what="the cold pull's entries in the journal")
    entries = misses()
    got = {(e["DOCKER_MIRROR_KIND"], e["DOCKER_MIRROR_REFERENCE"]): int(e["DOCKER_MIRROR_BYTES"]) for e in entries}
    assert len(entries) == len(expected) and got == expected
    for e in entries:
        assert e["_TRANSPORT"] == "journal" and e["PRIORITY"] == "6" and e["SYSLOG_IDENTIFIER"] == "docker-mirror"
        assert e["SYSLOG_FACILITY"] == "3"          # daemon: as the stderr lines had it
        assert e["DOCKER_MIRROR_COMPONENT"] == "access" and e["DOCKER_MIRROR_CACHE"] == "MISS"
        assert e["DOCKER_MIRROR_REPOSITORY"] == "acme/tool" and e["DOCKER_MIRROR_UPSTREAM"] == "docker.io"
        assert e["DOCKER_MIRROR_METHOD"] == "GET" and e["DOCKER_MIRROR_STATUS"] == "200"
        assert e["DOCKER_MIRROR_UPSTREAM_STATUS"] == "200" and e["DOCKER_MIRROR_CLIENT"] == "127.0.0.1"
        assert float(e["DOCKER_MIRROR_DURATION_MS"]) >= 0 and e["DOCKER_MIRROR_COMPLETE"] == "1"
        reference = e["DOCKER_MIRROR_REFERENCE"]
        digest = tool_pulls["manifest_digest"] if reference == "1.0" else reference
        assert e["DOCKER_MIRROR_DIGEST"] == digest
        path = f"manifests/{reference}" if reference == "1.0" else f"blobs/{reference}"
        assert e["MESSAGE"].startswith(f'access: 127.0.0.1 "GET /v2/acme/tool/{path}" 200 ')
    # the warm pull's entries are there too, as HITs; other records name their component
    hits = [json.loads(line) for line in booted.run(
        "journalctl", "-u", "docker-mirror", "DOCKER_MIRROR_CACHE=HIT", "DOCKER_MIRROR_REPOSITORY=acme/tool",
        "-o", "json", "--no-pager", f"--since={tool_pulls['since']}").stdout.splitlines()]
    assert {(e["DOCKER_MIRROR_KIND"], e["DOCKER_MIRROR_REFERENCE"]) for e in hits} == set(expected)
    components = {e.get("DOCKER_MIRROR_COMPONENT") for e in journal(booted)}
    assert {"access", "dockermirror"} <= components, components


def test_report_gives_the_hit_ratio_of_the_pulls(booted: Container, tool_pulls: dict):
    n = len(tool_pulls["expected"])
    since = tool_pulls["since"]
    report = json.loads(booted.run("docker-mirror", "report", "--since", since, "--json").stdout)
    assert report["cache"] | {"none": 0} == {"HIT": n, "STALE": 0, "COALESCED": 0, "MISS": n, "PASS": 0, "none": 0}
    assert report["hit_ratio"] == 0.5
    [up] = report["upstreams"]
    assert (up["upstream"], up["pulls_spent"], up["pulls_saved"]) == ("docker.io", 1, 1)
    assert up["bytes_from_cache"] == up["bytes_from_upstream"] == sum(tool_pulls["expected"].values())
    assert report["most_pulled"][0] | {"bytes": 0} == {"upstream": "docker.io", "repository": "acme/tool",
                                                       "pulls": 2, "requests": 2 * n, "bytes": 0}
    text = booted.run("docker-mirror", "report", "--since", since).stdout
    print(f"\n{text}")
    assert f"hit ratio: 50.0% ({n} of {2 * n} requests the cache answered were HITs; " in text


def test_records_up_to_the_exit_belong_to_the_unit(booted: Container):
    """A datagram's unit is looked up from its sender: the last records of a stopping process
    (sent natively) must still be the unit's, as they were on the stderr stream."""
    pid = booted.show("docker-mirror", "MainPID")
    booted.run("systemctl", "restart", "docker-mirror")

    def cursors(*match: str) -> list[str]:
        out = booted.run("journalctl", *match, f"_PID={pid}", "-o", "json", "--no-pager").stdout
        return [json.loads(line)["__CURSOR"] for line in out.splitlines() if line.strip()]

    everything = cursors("SYSLOG_IDENTIFIER=docker-mirror")
    assert everything and cursors("-u", "docker-mirror") == everything
    [last] = [json.loads(line) for line in booted.run("journalctl", "-u", "docker-mirror", f"_PID={pid}", "-n", "1",
                                                      "-o", "json", "--no-pager").stdout.splitlines()]
    print(f"\nlast record before the restart: {last['MESSAGE']}")
    assert last["_TRANSPORT"] == "journal" and last["DOCKER_MIRROR_COMPONENT"]


def serial(address: str, ca: str) -> str:
    chain = subprocess.run(["openssl", "s_client", "-connect", address, "-CAfile", ca], input="",
                           capture_output=True, text=True, timeout=30).stdout
    return subprocess.run(["openssl", "x509", "-noout", "-serial"], input=chain, capture_output=True,
                          text=True).stdout.strip()


def test_reload_serves_a_new_certificate(booted: Container, tmp_path: Path):
    ca = tmp_path / "ca.crt"
    ca.write_text(booted.read("/etc/pki/docker-mirror/ca.crt"))
    before = serial(booted.address, str(ca))
    pid = booted.show("docker-mirror", "MainPID")
    booted.run("docker-mirror", "cert", "init", "--hostname", "localhost", "--ip", "127.0.0.1")
    booted.run("systemctl", "reload", "docker-mirror")
    after = serial(booted.address, str(ca))
    assert before.startswith("serial=") and after.startswith("serial=") and after != before
    assert booted.show("docker-mirror", "MainPID") == pid          # same process
    assert booted.run("systemctl", "is-active", "docker-mirror").stdout.strip() == "active"
    assert any("TLS certificate" in e["MESSAGE"] and "loaded" in e["MESSAGE"] for e in journal(booted))


def test_watchdog_restarts_a_hung_daemon(booted: Container):
    pid = booted.show("docker-mirror", "MainPID")
    restarts = int(booted.show("docker-mirror", "NRestarts"))
    booted.run("kill", "-STOP", pid)
    wait_until(lambda: booted.show("docker-mirror", "MainPID") not in ("0", pid)
               and booted.run("systemctl", "is-active", "docker-mirror", check=False).stdout.strip() == "active",
               30, interval=0.5, what="a restart by the watchdog")
    assert int(booted.show("docker-mirror", "NRestarts")) == restarts + 1
    assert any("Watchdog timeout" in e.get("MESSAGE", "") for e in
               [json.loads(line) for line in booted.run("journalctl", "-o", "json", "--no-pager").stdout.splitlines()])


def test_stop_is_clean(booted: Container):
    booted.run("systemctl", "stop", "docker-mirror")
    assert booted.run("systemctl", "is-active", "docker-mirror", check=False).stdout.strip() == "inactive"
    assert booted.show("docker-mirror", "Result") == "success"
    messages = [e["MESSAGE"] for e in journal(booted)]
    assert any("Shutting down" in m for m in messages)
    running = booted.run("/opt/docker-mirror/bin/python", "-c",
                         "import sqlite3; print(sqlite3.connect('/var/cache/docker-mirror/index.sqlite')"
                         ".execute(\"select value from meta where key='running'\").fetchone()[0])").stdout.strip()
    assert running == "0"



def privileged_port() -> int:
    """A port below 1024 that is free on loopback (the container shares the host's network)."""
    for port in range(444, 1024):
        try:
            socket.create_server(("127.0.0.1", port)).close()
            return port
        except OSError:
            continue
    raise RuntimeError("no free port below 1024 on 127.0.0.1")


def test_socket_activation_serves_a_privileged_port_without_privileges(booted: Container, tmp_path: Path):
    """systemd binds a port below 1024 and starts the unprivileged service on the first connection."""
    port = privileged_port()
    booted.run("systemctl", "stop", "docker-mirror")
    booted.write("/etc/systemd/system/docker-mirror.socket.d/50-port.conf",
                 f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    booted.run("systemctl", "daemon-reload")
    booted.run("systemctl", "enable", "--now", "docker-mirror.socket")
    try:
        assert booted.run("systemctl", "is-active", "docker-mirror", check=False).stdout.strip() == "inactive"
        ca = tmp_path / "ca.crt"
        ca.write_text(booted.read("/etc/pki/docker-mirror/ca.crt"))
        # the first connection starts the service (Type=notify: it answers once READY)
        answer = httpx.get(f"https://127.0.0.1:{port}/v2/", verify=ssl.create_default_context(cafile=ca),
                           timeout=60)
        assert answer.status_code == 200
        assert answer.headers["docker-distribution-api-version"] == "registry/2.0"
        assert booted.run("systemctl", "is-active", "docker-mirror").stdout.strip() == "active"
        pid = booted.show("docker-mirror", "MainPID")
        assert booted.run("ps", "-o", "user=", "-p", pid).stdout.strip() == "docker-mirror"
        capabilities = booted.run("grep", "CapEff", f"/proc/{pid}/status").stdout.split()
        assert capabilities == ["CapEff:", "0000000000000000"]       # no CAP_NET_BIND_SERVICE needed
        messages = [e["MESSAGE"] for e in journal(booted)]
        assert any(f"listening on the socket(s) systemd passed (127.0.0.1:{port})" in m for m in messages)
        assert booted.show("docker-mirror", "StatusText").startswith(f"https://127.0.0.1:{port} | cache ")
    finally:
        booted.run("systemctl", "disable", "--now", "docker-mirror.socket", check=False)
        booted.run("systemctl", "stop", "docker-mirror", check=False)
        booted.run("rm", "-rf", "/etc/systemd/system/docker-mirror.socket.d", check=False)
        booted.run("systemctl", "daemon-reload", check=False)
