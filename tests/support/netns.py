"""A private network namespace, for processes that must meet on an address that is not loopback.

dockerd counts every registry on 127.0.0.0/8 as insecure, and for an insecure registry it
neither verifies the server nor reads ``certs.d/<host>/client.cert``: a test of its client
certificates needs the mirror on another address. :class:`NetNamespace` makes one without
touching the host's network: a holder process (``unshare --net``, then ``sleep``) owns a new
namespace whose only interface is its own ``lo``, brought up with 127.0.0.1 and ``address``
(default 198.18.0.1, from the benchmarking range, RFC 2544); other processes join it with
``nsenter --net``. It has no route out: nothing in it reaches the host's network or the
internet, and nothing outside reaches it (the test reads its processes' logs and talks to
dockerd over a unix socket, which is a file).

Nothing is created on the host (no /run/netns entry, interface, route or address): the
namespace ends when the last process in it does, and every one of them gets SIGTERM when
the test process dies (tests/support/procs.py's Daemon), so even a killed run leaves none.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.procs import Daemon, wait_until

ADDRESS = "198.18.0.1"

_HOLD = r"""
set -eu
ip link set lo up
ip addr add "$1/32" dev lo
echo "namespace ready"
exec sleep infinity
"""


class NetNamespace:
    """``start()`` it, wrap commands with ``argv()``, ``stop()`` it after its other processes."""

    def __init__(self, workdir: Path, address: str = ADDRESS) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.address = address
        self.holder = Daemon(["unshare", "--net", "--", "sh", "-c", _HOLD, "dm-netns", address],
                             workdir / "netns.log")
        self.path = ""

    def start(self) -> None:
        self.holder.start()
        wait_until(lambda: "namespace ready" in self.holder.log_text() or not self.holder.running(), 30,
                   what="the network namespace")
        if not self.holder.running():
            raise RuntimeError(f"no network namespace: {self.holder.log_text()[-2000:]}")
        path = f"/proc/{self.holder.pid}/ns/net"
        # never run anything meant for the namespace in the host's own
        if os.stat(path).st_ino == os.stat("/proc/self/ns/net").st_ino:
            self.holder.stop()
            raise RuntimeError("the holder process is in the host's network namespace")
        self.path = path

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run in the namespace (nsenter execs it: the PID stays the same)."""
        if not self.path or not self.holder.running():
            raise RuntimeError("the network namespace is not running")
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def stop(self) -> None:
        self.holder.stop()
