"""Shared fixtures and the run's ground rules.

Two tiers: ``tests/unit/`` is the fast tier (in-process, no root, no network, seconds);
everything else is the system tier (marked ``system``): a real upstream registry seeded
with test images, mirror processes, real clients and systemd containers, all on
127.0.0.1 and stopped at the end, even when a test fails. The fast tier runs first.

For the whole run: the environment is cleaned of what the host may have set (proxies,
systemd's notify and socket variables, locale); every process the tests start carries a
mark and is stopped at the end if it is still there; SIGTERM and SIGHUP stop the run the
way Ctrl-C does, so every fixture's clean-up runs; and the system files a test could
touch are compared before and after (see tests/support/hostguard.py).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support import hostguard, images, progress
from tests.support.certs import TestPKI, make_pki
from tests.support.clients import skopeo_push
from tests.support.faultproxy import FaultProxy
from tests.support.procs import Mirror, Registry
from tests.support.upstreams import Seeded, Site, ThreeUpstreams, Upstream, tls_site, token_site

# the session's package build (`packages`), shared by tests/test_packages.py and tests/test_repo.py
pytest_plugins = ("tests.support.packaging",)

FAST_TIER = Path(__file__).resolve().parent / "unit"
# Set by the host, never by a test: each changes how our processes or the clients behave.
HOST_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                  "NO_PROXY", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC",
                  "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID", "SSL_CERT_FILE", "SSL_CERT_DIR",
                  "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "DOCKER_HOST", "DOCKER_CONFIG", "CONTAINERS_CONF",
                  "CONTAINERS_REGISTRIES_CONF", "CONTAINERS_STORAGE_CONF", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR",
                  "XDG_CONFIG_HOME", "XDG_DATA_HOME", "DM_TESTS_RUN", "LANGUAGE", "LC_ALL", "LANG")


def pytest_configure(config: pytest.Config) -> None:
    # pytest's capture is suspended here: fd 1 is still the terminal (or CI's pipe)
    progress.install(os.dup(1))
    for name in HOST_VARIABLES:
        os.environ.pop(name, None)
    os.environ["LC_ALL"] = "C.UTF-8"
    os.environ[hostguard.MARK] = uuid.uuid4().hex
    os.umask(0o022)

    def interrupt(signum, frame):
        signal.signal(signum, signal.SIG_DFL)      # a second one ends the run at once
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything outside tests/unit is the system tier; the fast tier runs first."""
    for item in items:
        if not item.path.is_relative_to(FAST_TIER):
            item.add_marker(pytest.mark.system)
    items.sort(key=lambda item: 0 if item.path.is_relative_to(FAST_TIER) else 1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    with progress.step(f"running {item.nodeid}", announce=False):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Each phase's report on the test item (``item.report_call``...), for fixtures that add
    what explains a failure (the mirrors' logs) when they tear down."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session", autouse=True)
def machine_left_as_found(request: pytest.FixtureRequest):
    """With any system test in the run: fail it if system files changed or processes remain."""
    if not any(item.get_closest_marker("system") for item in request.session.items):
        yield
        return
    if os.geteuid() != 0:
        pytest.exit("the system tier needs root (tests/run.sh does it all); without root, run only the fast "
                    "tier: .venv/bin/pytest -m 'not system'", returncode=2)
    before = hostguard.snapshot()
    yield
    run_id = os.environ[hostguard.MARK]
    left = hostguard.leftovers(run_id, exclude={os.getpid()})
    hostguard.stop(left)
    changed = hostguard.changes(before, hostguard.snapshot())
    problems = [f"still running at the end (now stopped): PID {pid}: {cmd}" for pid, cmd in left.items()]
    problems += [f"system file {line}" for line in changed]
    if problems:
        pytest.fail("the run did not leave the machine as it found it:\n  " + "\n  ".join(problems), pytrace=False)


ALL_MANIFESTS = images.ALL_MANIFESTS
LOG_TAIL = 6000         # characters of a mirror's log shown when its test failed
BIG_BYTES = 100 * 1024 * 1024 + 12345


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Upstream:
    """Debian's docker-registry on a free loopback port, seeded with images built here."""
    work = tmp_path_factory.mktemp("upstream")
    registry = Registry(work)
    registry.start()
    up = Upstream(registry)
    try:
        with progress.step("seeding the test upstream registry (5 images, one of 100 MiB)"):
            img = work / "img"
            plan = {
                # name: (repo, tag, build kwargs, extra skopeo args)
                "hello": ("library/hello", "latest", {}, ()),
                "busybox": ("library/busybox", "latest", {"archs": ("amd64", "arm64")}, ()),
                "alpine": ("library/alpine", "3", {"archs": ("amd64", "arm64")}, ("--format", "v2s2")),
                "tool": ("acme/tool", "1.0", {}, ()),
                "big": ("library/big", "latest", {"random_bytes": BIG_BYTES}, ()),
            }
            for name, (repo, tag, kwargs, extra) in plan.items():
                image = images.build(img / name, name, tag=tag, seed=name, **kwargs)
                skopeo_push(img / name, tag, f"{registry.address}/{repo}:{tag}", *extra, all_images=True)
                up.seeded[name] = Seeded(repo, tag, image)
            skopeo_push(img / "tool", "1.0", f"{registry.address}/acme/tool:1", all_images=True)
            for seeded in up.seeded.values():
                response = up.head(seeded.repo, seeded.tag)
                response.raise_for_status()
                seeded.digest = response.headers["docker-content-digest"]
        yield up
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def upstream_sites(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream):
    """Three upstream registries for one mirror (tests/support/upstreams.py): ``docker.io`` (the
    session's ``upstream``), ``ghcr.test`` (bearer tokens, credentials) and ``registry.test:5443``
    (TLS from a private CA). Tests use ``three_upstreams``."""
    work = tmp_path_factory.mktemp("upstreams")
    started: list = []
    try:
        with progress.step("seeding two more upstream registries (token auth, private CA)"):
            pki = make_pki(work / "pki")
            ghcr = token_site(work / "ghcr", started)
            private = tls_site(work / "private", pki, started)
        yield ThreeUpstreams(Site("docker.io", upstream, upstream.url), ghcr, private, pki)
    finally:
        for daemon in reversed(started):
            daemon.stop()


@pytest.fixture
def three_upstreams(upstream_sites: ThreeUpstreams) -> ThreeUpstreams:
    """The three upstreams, the token registry's proxy without faults (and running) for this test:
    ``make_mirror(upstreams=three_upstreams.config())`` serves them all."""
    upstream_sites.reset()
    yield upstream_sites
    upstream_sites.reset()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """A CA and server certificate made by `docker-mirror cert init`, as an admin would."""
    directory = tmp_path_factory.mktemp("pki")
    pki = TestPKI(directory / "ca" / "ca.crt", directory / "server.crt", directory / "server.key",
                  directory / "certs.d")
    config = directory / "config.yml"
    config.write_text(f"tls:\n  certificate: {pki.certificate}\n  key: {pki.key}\n  ca: {pki.ca}\n")
    subprocess.run([sys.executable, "-m", "dockermirror", "cert", "init", "--config", str(config),
                    "--hostname", "localhost", "--ip", "127.0.0.1", "--ip", "::1"], check=True, capture_output=True)
    pki.cert_dir.mkdir()
    (pki.cert_dir / "ca.crt").write_bytes(pki.ca.read_bytes())  # only the CA: what --cert-dir wants
    return pki


@pytest.fixture
def make_mirror(tmp_path: Path, upstream: Upstream, request: pytest.FixtureRequest):
    """Start docker-mirror processes; every one is stopped after the test. When the test failed,
    the end of each one's log is printed (pytest shows it under "Captured stdout teardown")."""
    started: list[Mirror] = []
    count = 0

    def start(upstream_url: str | None = None, *, start: bool = True, upstreams: list[dict] | None = None,
              **sections) -> Mirror:
        """``upstreams``: an ``upstreams:`` list (e.g. ``three_upstreams.config()``) instead of
        the one upstream (``upstream_url``, or the session's)."""
        nonlocal count
        count += 1
        if upstreams is not None:
            config = {"upstreams": [dict(item) for item in upstreams]}
        else:
            config = {"upstream": {"url": upstream_url or upstream.url, "registry": "docker.io"}}
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        mirror = Mirror(tmp_path, config, name=f"mirror{count}")
        started.append(mirror)
        if start:
            mirror.start()
        return mirror

    yield start
    for mirror in started:
        mirror.stop()
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for mirror in started:
            print(f"--- the end of {mirror.log_path.name} ---\n{mirror.log_text()[-LOG_TAIL:]}")


@pytest.fixture
def mirror(make_mirror) -> Mirror:
    return make_mirror()


@pytest.fixture
def fault_proxy(upstream: Upstream):
    proxy = FaultProxy(upstream.registry.address).start()
    yield proxy
    proxy.stop()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
