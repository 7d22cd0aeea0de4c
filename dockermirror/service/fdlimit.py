"""The open-file limit at ``serve`` start: the soft limit raised to the hard one.

Every client connection is a file descriptor (up to three while a cached blob is sent: the socket,
the duplicate sendfile waits on, the blob file). The soft limit a process inherits is often 1024
(a shell, a container runtime) while the hard one is far higher: the soft limit is raised to the
hard one at start, as Go's runtime does for every program and nginx's ``worker_rlimit_nofile``
does. Under the systemd unit both are LimitNOFILE=65536 already. If the result is still below what
``server.max_connections`` may need, one warning says so (new connections then fail with "Too many
open files" before the 503 limit is reached).
"""

from __future__ import annotations

import resource

PER_CONNECTION = 3      # descriptors one client connection may hold
RESERVE = 256           # the rest: upstream connections (two pools, 96), the index, logs, listeners


def needed(max_connections: int) -> int:
    return PER_CONNECTION * max_connections + RESERVE


def raise_soft_limit(max_connections: int) -> str:
    """Raise RLIMIT_NOFILE's soft limit to its hard one; "" or the one line saying the result is
    below what ``max_connections`` needs (0: no limit on connections, nothing to compare)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:      # Linux refuses more than fs.nr_open
        target = _nr_open()
    if target != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft >= target):
        target = soft
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if not max_connections or soft == resource.RLIM_INFINITY or soft >= needed(max_connections):
        return ""
    return (f"open-file limit {soft} is below what server.max_connections: {max_connections} may need "
            f"({needed(max_connections)}: {PER_CONNECTION} per connection + {RESERVE}); connections beyond "
            f"about {max(0, (soft - RESERVE) // PER_CONNECTION)} will fail with \"Too many open files\": raise "
            f"LimitNOFILE (systemd) or the hard limit (ulimit -Hn), or lower server.max_connections")


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024 * 1024
