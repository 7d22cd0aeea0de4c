"""A reload names the settings that need a restart by comparing the file with what the running
server uses, not with the file of the previous reload."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dockermirror import config as configuration
from dockermirror.service import restart
from dockermirror.service.server import Service
from tests.unit.conftest import config_text

pytestmark = pytest.mark.anyio


def test_pending_compares_with_the_running_values():
    running = restart.settings(configuration.loads("listen: 127.0.0.1:5000\ntls: {enabled: false}\n"), tls=False)
    moved = restart.settings(configuration.loads("listen: 127.0.0.1:6000\ntls: {enabled: false}\n"))
    assert restart.pending(running, moved) == ["listen (running 127.0.0.1:5000, configured 127.0.0.1:6000)"]
    assert restart.pending(running, running) == []
    everything = restart.settings(configuration.loads(
        "listen: 127.0.0.1:6000\ncache: {dir: /elsewhere}\nmetrics: {listen: 127.0.0.1:9000}\n"
        "log: {journal_fields: false}\ntls: {enabled: false}\n"))
    assert [note.split(" ")[0] for note in restart.pending(running, everything)] == [
        "listen", "metrics.listen", "cache.dir", "log.journal_fields"]
    # socket activation: systemd owns the address, listen is not the server's to apply
    activated = restart.settings(configuration.loads("listen: 127.0.0.1:5000\n"), tls=False, socket_activated=True)
    assert restart.pending(activated, moved) == []


async def test_a_pending_restart_is_named_on_every_reload_until_the_file_is_reverted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    started = config_text(cache)
    files = [started]
    service = Service(configuration.loads(started, source="/etc/docker-mirror/config.yml"),
                      reload_config=lambda: configuration.loads(files[-1], source="/etc/docker-mirror/config.yml"))
    caplog.set_level(logging.INFO, logger="dockermirror")

    async def reload() -> list[logging.LogRecord]:
        caplog.clear()
        await service.reload()
        return [r for r in caplog.records if r.getMessage().startswith("reloaded ")]

    try:
        files.append(started.replace("127.0.0.1:5000", "127.0.0.1:6000").replace(f"dir: {cache}",
                                                                                   f"dir: {tmp_path}/other"))
        for _ in range(2):      # the second reload still says so: the server still runs on 5000
            [record] = await reload()
            assert record.levelno == logging.WARNING
            assert record.getMessage() == (
                "reloaded /etc/docker-mirror/config.yml; restart to apply: "
                "listen (running 127.0.0.1:5000, configured 127.0.0.1:6000), "
                f"cache.dir (running {cache}, configured {tmp_path}/other)")
            assert "restart to apply: listen, cache.dir" in service.status()
        files.append(started)   # changed back: nothing to restart for
        [record] = await reload()
        assert record.levelno == logging.INFO
        assert record.getMessage() == ("reloaded /etc/docker-mirror/config.yml; no restart needed any more: "
                                       "the file is back to what the server runs with")
        assert "restart to apply" not in service.status()
        [record] = await reload()
        assert (record.levelno, record.getMessage()) == (logging.INFO, "reloaded /etc/docker-mirror/config.yml")
    finally:
        await service.app.cache.close()
    assert not (tmp_path / "other").exists()
