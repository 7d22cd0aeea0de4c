"""bench/dockerpull.py's checks: a ``docker pull`` counts only when every layer was pulled and
the server under test logged a GET of every blob after the pull began (a fallback to anything
else fails the benchmark); the scenario's registration. No dockerd here: ``docker`` is a
stand-in script (the real row runs by ``bench/run.sh --only docker-pull``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import dockerpull
from bench.clients import BenchError
from bench.scenarios import SCENARIOS

CONFIG, LAYERS = "sha256:" + "c" * 64, ["sha256:" + str(i) * 64 for i in range(1, 4)]
BLOBS = [CONFIG, *LAYERS]


def mirror_line(digest: str, method: str = "GET") -> str:
    return (f'2026-12-03 01:00:00 INFO access: 127.0.0.1 "{method} /v2/library/layered/blobs/{digest}" 200 9 '
            "1.0ms cache=HIT upstream=docker.io upstream_status=-")


def distribution_line(digest: str) -> str:
    return (f'127.0.0.1 - - [03/Dec/2026:01:00:00 +0000] "GET /v2/library/layered/blobs/{digest} HTTP/1.1" '
            '200 9 "" "docker/20.10.24"')


class FakeServer:
    """A server whose log has ``lines``, and ``lines_during`` once the stand-in docker has run."""

    label = "docker-mirror"

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.lines_during: list[str] = []
        self.ran: Path | None = None

    def log_text(self) -> str:
        during = self.lines_during if self.ran and self.ran.exists() else []
        return "".join(line + "\n" for line in [*self.lines, *during])


@pytest.fixture
def fake_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``docker`` that prints ``layers`` "Pull complete" lines and exits ``status``; once it has run,
    ``server``'s log has ``log`` too (as the server's would after serving the pull)."""
    monkeypatch.setattr(dockerpull, "LOG_WAIT", 0.3)

    def make(layers: int, server: FakeServer, log: list[str], status: int = 0) -> SimpleNamespace:
        out = tmp_path / "out"
        out.write_text("latest: Pulling from library/layered\n"
                       + "".join(f"{i:012x}: Pull complete\n" for i in range(layers))
                       + "Status: Downloaded newer image for layered:latest\n")
        ran = tmp_path / "ran"
        script = tmp_path / "docker"
        script.write_text(f"#!/bin/sh\ntouch {ran}\ncat {out}\nexit {status}\n")
        script.chmod(0o755)
        monkeypatch.setattr(dockerpull, "DOCKER_CLI", str(script))
        server.lines_during = log
        server.ran = ran
        return SimpleNamespace(socket=tmp_path / "docker.sock", log_text=lambda: "dockerd's log")
    return make


@pytest.mark.parametrize("line", [mirror_line, distribution_line])
def test_a_pull_served_by_the_server_counts(fake_docker, line):
    server = FakeServer(["earlier line"])
    daemon = fake_docker(len(LAYERS), server, [line(d) for d in BLOBS])
    assert dockerpull._pull(daemon, server, "layered:latest", BLOBS, len(LAYERS)) >= 0


def test_a_pull_the_server_did_not_serve_fails(fake_docker):
    # the blobs were served before this pull (the log's earlier lines), not by it: dockerd got them elsewhere
    server = FakeServer([mirror_line(d) for d in BLOBS])
    daemon = fake_docker(len(LAYERS), server, [])
    with pytest.raises(BenchError, match="shows no GET of .*did not pull through it"):
        dockerpull._pull(daemon, server, "layered:latest", BLOBS, len(LAYERS))


def test_one_blob_missing_from_the_servers_log_fails(fake_docker):
    server = FakeServer([])
    daemon = fake_docker(len(LAYERS), server, [mirror_line(d) for d in BLOBS[:-1]] + [mirror_line(BLOBS[-1], "HEAD")])
    with pytest.raises(BenchError, match=f"shows no GET of {BLOBS[-1]}:"):
        dockerpull._pull(daemon, server, "layered:latest", BLOBS, len(LAYERS))


def test_layers_not_pulled_fail(fake_docker):
    server = FakeServer([])
    daemon = fake_docker(len(LAYERS) - 1, server, [mirror_line(d) for d in BLOBS])
    with pytest.raises(BenchError, match="2 layers pulled, expected 3"):
        dockerpull._pull(daemon, server, "layered:latest", BLOBS, len(LAYERS))


def test_a_failed_pull_fails_with_dockerds_log(fake_docker):
    server = FakeServer([])
    daemon = fake_docker(len(LAYERS), server, [mirror_line(d) for d in BLOBS], status=1)
    with pytest.raises(BenchError, match="(?s)exited 1.*dockerd's log"):
        dockerpull._pull(daemon, server, "layered:latest", BLOBS, len(LAYERS))


def test_registration(monkeypatch: pytest.MonkeyPatch):
    scenario = SCENARIOS["docker-pull"]
    assert scenario.cold and not scenario.tls and scenario.prime
    monkeypatch.setattr(dockerpull, "docker_pull", lambda setup, server: ("measured", setup, server))
    monkeypatch.setattr(dockerpull, "warm_up", lambda setup, server: ("warmed", setup, server))
    assert scenario.measure("setup", "server") == ("measured", "setup", "server")
    assert scenario.prime("setup", "server") == ("warmed", "setup", "server")
