"""A configuration mistake (exit status 2: one line in the journal) is not restarted: restarting
cannot fix it, and five restarts in a row bury the line and hit the start limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockermirror import cli
from tests.support.units import sections

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("unit", ["systemd/docker-mirror.service", "debian/docker-mirror.service"])  # (a link)
def test_a_configuration_mistake_is_not_restarted(unit):
    service = dict(sections(REPO / unit)["Service"])
    assert service["Restart"] == "on-failure"
    assert str(cli.EXIT_USAGE) in service["RestartPreventExitStatus"].split()
