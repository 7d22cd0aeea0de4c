"""How much the cache may hold: limits resolved against the filesystem it lives on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DAY = 86400.0


@dataclass(frozen=True)
class Limits:
    """The cache policy. Sizes are bytes (int) or a share of the filesystem (float, 0..1)."""

    max_size: int | float = 0.8
    min_free: int | float = 0.05
    low_watermark: float = 0.9      # eviction frees down to this share of max_size
    blob_ttl: float = 7 * DAY       # 0: never expire
    manifest_ttl: float = 7 * DAY
    pins: tuple[str, ...] = ()      # registry/repository patterns (RegistryTable.pattern) never evicted or expired
    verify_rate: int = 0            # bytes/s the background re-verification of stored files reads (0: off)
    direct_writes: bool = True      # downloads are written with O_DIRECT where the filesystem can (see direct.py)


@dataclass(frozen=True)
class Filesystem:
    total: int
    available: int   # for an unprivileged writer


def filesystem(path: Path) -> Filesystem:
    st = os.statvfs(path)
    return Filesystem(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)


def resolve(amount: int | float, total: int) -> int:
    return int(amount * total) if isinstance(amount, float) else amount


def shortfall(*, used: int, reserved: int, wanted: int, capacity: int, low_watermark: float,
              disk_available: int, min_free: int) -> int | None:
    """Bytes to evict before ``wanted`` more may be stored; None if it can never fit.

    When eviction is needed at all, it frees enough to get down to the low watermark,
    so that it does not run again on the next request.
    """
    if wanted > capacity:
        return None
    over_cap = used + reserved + wanted - capacity
    over_disk = wanted - (disk_available - min_free)
    if over_cap <= 0 and over_disk <= 0:
        return 0
    slack = capacity - int(capacity * low_watermark)
    return max(over_cap, over_disk, 0) + slack
