"""Which refusals get an info line: requests the gate refuses (no client certificate, a
certificate refused since its connection opened: dockermirror/api/gate.py) and malformed
requests from connections without a certificate where one is required
(dockermirror/service/zerocopy.py). One limiter for all of them, so that a client retrying in
a loop, or many at once, cannot flood the log:

* from one source, the first refusal gets an info line, then at most one a minute (with how
  many came since); a source is an IPv4 address, or an IPv6 /64 (one host often has a whole
  /64 to pick source addresses from);
* overall, at most BUDGET info lines a minute; past it, refusals are logged at debug only and
  counted, and the next info line says how many.

Every refusal is logged at debug all the same.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

LOG_INTERVAL = 60.0     # seconds: at most one info line per source this often
MAX_ADDRESSES = 4096    # sources remembered (the oldest forgotten first)
BUDGET = 30             # info lines a LOG_INTERVAL for all sources together


def source(address: str) -> tuple[str, str]:
    """The key refusals are counted by, and how a note names it: an IPv4 address (also when
    mapped into IPv6), an IPv6 /64, anything else as it is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address, "this address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped), "this address"
        network = ipaddress.IPv6Network((int(ip) >> 64 << 64, 64))
        return str(network), str(network)
    return str(ip), "this address"


@dataclass(frozen=True)
class Verdict:
    loud: bool          # an info line (else debug)
    quiet: int          # refused from this source since its last info line
    unlogged: int       # refused from anywhere at debug only (over the budget) since the last info line
    where: str          # "this address", or an IPv6 /64

    def note(self) -> str:
        """What the info line adds about the refusals it stands for ('' when none)."""
        if not self.loud:
            return ""
        parts = []
        if self.quiet:
            parts.append(f"{self.quiet} more refused from {self.where} since the last such line (logged at debug)")
        if self.unlogged:
            parts.append(f"{self.unlogged} more from other sources logged at debug only (over {BUDGET} such "
                         f"lines a minute)")
        return "; ".join(parts)


class RefusalLog:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.seen: OrderedDict[str, tuple[float, int]] = OrderedDict()   # source: (last info line, quiet since)
        self.window = -LOG_INTERVAL     # when the current minute of the budget began
        self.lines = 0                  # info lines in it
        self.unlogged = 0               # refusals over the budget since the last info line

    def loud(self, address: str) -> Verdict:
        """Whether this refusal gets an info line, and what that line should say it stands for."""
        now = self.clock()
        key, where = source(address)
        last, quiet = self.seen.pop(key, (None, 0))
        if last is not None and now - last < LOG_INTERVAL:
            self.seen[key] = (last, quiet + 1)
            return Verdict(False, quiet + 1, 0, where)
        if now - self.window >= LOG_INTERVAL:
            self.window, self.lines = now, 0
        if self.lines >= BUDGET:
            self.unlogged += 1
            if last is not None:
                self.seen[key] = (last, quiet)
            return Verdict(False, quiet, self.unlogged, where)
        self.lines += 1
        self.seen[key] = (now, 0)
        while len(self.seen) > MAX_ADDRESSES:
            self.seen.popitem(last=False)
        unlogged, self.unlogged = self.unlogged, 0
        return Verdict(True, quiet, unlogged, where)
