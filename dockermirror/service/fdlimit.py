"""The open-file limit at ``serve`` start: the soft limit raised to the hard one.

Every client connection is a file descriptor (up to three while a cached blob is sent: the socket,
the duplicate sendfile waits on, the blob file). The soft limit a process inherits is often 1024
(a shell, a container runtime) while the hard one is far higher: the soft limit is raised to the
hard one at start, as Go's runtime does for every program and nginx's ``worker_rlimit_nofile``
does. Under the systemd unit both are LimitNOFILE=65536 already. If the result is below
``server.max_connections`` plus RESERVE (one descriptor per connection, the least any connection
takes), one warning says so: new connections would fail with "Too many open files" before the 503
limit is reached. (While sending cached blobs a connection takes up to three: config.yml advises a
third of the limit; that is advice, not a start-up warning.)
"""

from __future__ import annotations

import resource

RESERVE = 256       # besides one per client connection: upstream connections (two pools, 96), the
                    # index, cache files being written, logs, listeners


def needed(max_connections: int) -> int:
    return max_connections + RESERVE


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
    return (f"open-file limit {soft} is below server.max_connections: {max_connections} + {RESERVE}; "
            f"connections beyond about {max(0, soft - RESERVE)} will fail with \"Too many open files\" "
            f"(before the 503 of max_connections): raise LimitNOFILE (systemd) or the hard limit (ulimit -Hn), "
            f"or lower server.max_connections")


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024 * 1024
