"""``docker-mirror report``: what the mirror did, from its request entries in the journal.

Reads ``journalctl --unit=UNIT --output=json --since=...`` as a stream (one entry a line;
lines longer than :data:`LINE_MAX` and lines that are not a request entry are skipped, so
memory stays bounded whatever the journal holds) and tallies the ``DOCKER_MIRROR_*`` fields
that service/journal.py writes:

- hit ratio: HIT requests over the requests the cache answered (HIT, STALE, COALESCED, MISS,
  PASS), as ``cache stats``, the status page, the status line and the dashboard count it;
  requests without a cache result (``/v2/``, refusals, errors before the cache was asked) are
  not in it;
- bytes sent from the cache (HIT, STALE, COALESCED) against bytes sent that the upstreams had
  to send first (MISS, PASS);
- per upstream, pulls spent (manifest GETs the mirror answered by asking the upstream: MISS)
  and saved (manifest GETs answered from the cache): Docker Hub counts a pull per manifest GET;
- the most pulled repositories (manifest GETs), the slowest requests and repositories.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from dockermirror import humanize
from dockermirror.config import MAX_DURATION      # (100 years, as every duration of the configuration)
from dockermirror.cacheresults import FROM_CACHE, FROM_UPSTREAM, hit_ratio, is_pull

LINE_MAX = 1024 * 1024
KEYS_MAX = 10_000           # distinct upstreams / repositories tallied; the rest go to "(others)"
TOP = 10
HIT_RATIO = "HIT requests / requests the cache answered (HIT, STALE, COALESCED, MISS, PASS)"
_SINCE = re.compile(r"[A-Za-z0-9 :.+\-@/_,]{1,64}")
_UNIT = re.compile(r"[A-Za-z0-9:_.@\\-]{1,256}")
_DURATION = re.compile(r"(\d+(s|m|h|d|w))+")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# a number of any notation with a unit, signed (journalctl's relative time) or not (that long ago)
_NUMBER_DURATION = re.compile(r"([+-]?)((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)([smhdw])")
# seconds since the epoch (journalctl's @...), in any notation float() reads, so that nan/inf are refused
_EPOCH = re.compile(r"@([+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity))", re.IGNORECASE)


class ReportError(Exception):
    """One line saying why there is no report."""


def since_argument(text: str) -> str:
    """What ``--since`` passes to journalctl: ``1h``/``30m``/``1h30m`` mean that long ago;
    anything else journalctl parses (``today``, ``2026-12-01 10:00``, ``-2h``, ``@1764600000``).
    A duration (also ``1.5h``, ``-2h``) is at most 100 years; one that reaches before 1970 means
    from the epoch (journalctl takes no earlier time)."""
    if not _SINCE.fullmatch(text) or text.strip() != text:
        raise ValueError(f"invalid time {text!r} (use e.g. 1h, 30m, 2d, today or '2026-12-01 10:00')")
    if _DURATION.fullmatch(text):
        return _ago(text, sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([smhdw])", text)))
    if (number := _NUMBER_DURATION.fullmatch(text)) is not None:
        ago = _ago(text, float(number[2]) * _UNITS[number[3]])     # (bounded either way)
        return text if number[1] == "+" else ago
    if text.startswith("@"):
        return _epoch(text)
    return text


def _epoch(text: str) -> str:
    """journalctl's --since for ``@<seconds since the epoch>``: from 1970 to 100 years from now,
    passed on in plain digits (journalctl reads no exponent)."""
    if (number := _EPOCH.fullmatch(text)) is None:
        raise ValueError(f"invalid time {text!r} (use @ and the seconds since 1970, e.g. @1764600000)")
    seconds = float(number[1])
    if not math.isfinite(seconds) or not 0 <= seconds <= time.time() + MAX_DURATION:
        raise ValueError(f"{text!r} is out of range; give a time from @0 (1970) to at most 100 years from now")
    text = f"{seconds:.6f}".rstrip("0").rstrip(".")     # (journalctl refuses "@5.": a fraction under 1 µs)
    return f"@{'0' if text == '-0' else text}"


def _ago(text: str, seconds: float) -> str:
    """journalctl's --since for ``seconds`` ago; from the epoch on (it takes no earlier time)."""
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ValueError(f"{text!r} is too long; give at most 100 years (36500d)")
    return "@0" if seconds >= time.time() else f"-{round(seconds)}s"


def unit_argument(text: str) -> str:
    if not _UNIT.fullmatch(text) or text.startswith("-"):
        raise ValueError(f"invalid unit name {text!r}")
    return text


def journal_lines(unit: str, since: str | None, journalctl: str = "journalctl") -> Iterator[bytes]:
    """journalctl's JSON lines, as they come; :class:`ReportError` when it cannot run or fails."""
    argv = [journalctl, f"--unit={unit}", "--output=json", "--no-pager", "--quiet"]
    if since:
        argv.append(f"--since={since}")
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        except FileNotFoundError:
            raise ReportError("journalctl not found: the report reads the systemd journal") from None
        except OSError as exc:
            raise ReportError(f"cannot run journalctl: {exc.strerror or exc}") from None
        count = 0
        try:
            assert proc.stdout is not None
            while line := proc.stdout.readline(LINE_MAX + 1):
                if not line.endswith(b"\n") and len(line) > LINE_MAX:
                    while (rest := proc.stdout.readline(LINE_MAX)) and not rest.endswith(b"\n"):
                        pass                        # the rest of an overlong line
                    continue
                count += 1
                yield line
        finally:
            if proc.poll() is None and proc.stdout is not None:
                proc.stdout.close()
            code = proc.wait()
        errors.seek(0)
        said = errors.read(4096).decode("utf-8", "replace")
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    if code != 0:
        raise ReportError(f"journalctl exited {code}: {humanize.printable(lines[0]) if lines else 'no reason given'}")
    if count == 0 and any("insufficient permissions" in line or "not seeing messages" in line for line in lines):
        raise ReportError("cannot read the system journal: run as root or as a member of the systemd-journal "
                          "(or adm) group")


def _text(entry: dict, name: str) -> str | None:
    value = entry.get(f"DOCKER_MIRROR_{name}")
    return value if isinstance(value, str) else None


def _number(text: str | None) -> float:
    try:
        value = float(text) if text is not None else 0.0
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value >= 0 else 0.0


@dataclass(slots=True)
class Request:
    """The fields of one request entry the report needs."""
    time: float                 # seconds since the epoch
    method: str
    kind: str
    status: int
    cache: str | None
    upstream: str | None
    repository: str | None
    reference: str | None
    sent: int
    ms: float

    @property
    def pull(self) -> bool:
        """A manifest GET that got its manifest: what Docker Hub counts as a pull."""
        return is_pull(self.kind, self.method, self.status)


def requests(lines: Iterable[bytes]) -> Iterator[Request]:
    """The request entries among journal JSON lines; every other line is skipped."""
    for line in lines:
        if b'"DOCKER_MIRROR_METHOD"' not in line:     # most entries: not worth parsing
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        method, status = _text(entry, "METHOD"), _text(entry, "STATUS")
        if method is None or status is None or not status.isdigit():
            continue
        realtime = entry.get("__REALTIME_TIMESTAMP")
        yield Request(
            time=int(realtime) / 1e6 if isinstance(realtime, str) and realtime.isdigit() else 0.0,
            method=method, kind=_text(entry, "KIND") or "other", status=int(status), cache=_text(entry, "CACHE"),
            upstream=_text(entry, "UPSTREAM"), repository=_text(entry, "REPOSITORY"),
            reference=_text(entry, "REFERENCE"), sent=int(_number(_text(entry, "BYTES"))),
            ms=_number(_text(entry, "DURATION_MS")))


@dataclass(slots=True)
class _Upstream:
    requests: int = 0
    pulls_spent: int = 0
    pulls_saved: int = 0
    bytes_from_cache: int = 0
    bytes_from_upstream: int = 0


@dataclass(slots=True)
class _Repository:
    requests: int = 0
    pulls: int = 0
    bytes: int = 0
    total_ms: float = 0.0
    max_ms: float = 0.0


@dataclass
class Tally:
    requests: int = 0
    first: float | None = None
    last: float | None = None
    status_classes: Counter = field(default_factory=Counter)
    cache: Counter = field(default_factory=Counter)
    bytes_from_cache: int = 0
    bytes_from_upstream: int = 0
    bytes_other: int = 0
    upstreams: dict[str, _Upstream] = field(default_factory=dict)
    repositories: dict[tuple[str, str], _Repository] = field(default_factory=dict)
    slowest: list[tuple[float, int, Request]] = field(default_factory=list)

    def add(self, r: Request) -> None:
        self.requests += 1
        if r.time:
            self.first = r.time if self.first is None else min(self.first, r.time)
            self.last = r.time if self.last is None else max(self.last, r.time)
        self.status_classes[f"{r.status // 100}xx" if 100 <= r.status < 600 else "none"] += 1
        cache = r.cache if r.cache in FROM_CACHE + FROM_UPSTREAM else None
        self.cache[cache or "none"] += 1
        if cache in FROM_CACHE:
            self.bytes_from_cache += r.sent
        elif cache in FROM_UPSTREAM:
            self.bytes_from_upstream += r.sent
        else:
            self.bytes_other += r.sent
        heapq.heappush(self.slowest, (r.ms, self.requests, r))
        if len(self.slowest) > TOP:
            heapq.heappop(self.slowest)
        if r.upstream is None:
            return
        up = self._entry(self.upstreams, r.upstream, _Upstream)
        up.requests += 1
        if cache in FROM_CACHE:
            up.bytes_from_cache += r.sent
            up.pulls_saved += r.pull
        elif cache in FROM_UPSTREAM:
            up.bytes_from_upstream += r.sent
            up.pulls_spent += r.pull
        if r.repository is None or not 200 <= r.status < 400:
            return          # only names the upstream or the cache answered for: junk names fill no table
        repo = self._entry(self.repositories, (r.upstream, r.repository), _Repository)
        repo.requests += 1
        repo.pulls += r.pull
        repo.bytes += r.sent
        repo.total_ms += r.ms
        repo.max_ms = max(repo.max_ms, r.ms)

    @staticmethod
    def _entry(table: dict, key, make):
        found = table.get(key)
        if found is None:
            if len(table) >= KEYS_MAX:
                key = ("(others)", "(others)") if isinstance(key, tuple) else "(others)"
                found = table.get(key)
            if found is None:
                found = table[key] = make()
        return found

    @property
    def hit_ratio(self) -> float | None:
        return hit_ratio(self.cache)

    def summary(self, unit: str, since: str | None) -> dict:
        repos = self.repositories.items()
        return {
            "unit": unit, "since": since,
            "first": _iso(self.first), "last": _iso(self.last),
            "requests": self.requests,
            "status_classes": dict(sorted(self.status_classes.items())),
            "cache": {c: self.cache[c] for c in (*FROM_CACHE, *FROM_UPSTREAM, "none")},
            "hit_ratio": self.hit_ratio, "hit_ratio_is": HIT_RATIO,
            "bytes": {"from_cache": self.bytes_from_cache, "from_upstream": self.bytes_from_upstream,
                      "other": self.bytes_other},
            "upstreams": [{"upstream": key, "requests": u.requests, "pulls_spent": u.pulls_spent,
                           "pulls_saved": u.pulls_saved, "bytes_from_cache": u.bytes_from_cache,
                           "bytes_from_upstream": u.bytes_from_upstream}
                          for key, u in sorted(self.upstreams.items(), key=lambda i: (-i[1].requests, i[0]))],
            "most_pulled": [{"upstream": up, "repository": name, "pulls": r.pulls, "requests": r.requests,
                             "bytes": r.bytes}
                            for (up, name), r in sorted(repos, key=lambda i: (-i[1].pulls, -i[1].bytes, i[0]))
                            if r.pulls][:TOP],
            "slowest_repositories": [{"upstream": up, "repository": name, "max_ms": round(r.max_ms, 1),
                                      "mean_ms": round(r.total_ms / r.requests, 1), "requests": r.requests}
                                     for (up, name), r in sorted(repos, key=lambda i: (-i[1].max_ms, i[0]))][:TOP],
            "slowest_requests": [{"time": _iso(r.time), "method": r.method, "kind": r.kind, "upstream": r.upstream,
                                  "repository": r.repository, "reference": r.reference, "status": r.status,
                                  "cache": r.cache, "bytes": r.sent, "duration_ms": round(r.ms, 1)}
                                 for _, _, r in sorted(self.slowest, key=lambda i: (-i[0], i[1]))],
        }


def _iso(seconds: float | None) -> str | None:
    if not seconds:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(seconds))


def _p(text: object) -> str:
    return humanize.printable(str(text if text is not None else "-"), quote=False)


def _target(r: dict) -> str:
    if r["repository"] is None:
        return "-"
    reference = r["reference"]
    where = "" if reference is None else ("@" if ":" in reference else ":") + _p(reference)
    return f"{_p(r['upstream'])}/{_p(r['repository'])}{where}"


def text(s: dict) -> str:
    """The summary for people."""
    out = [f"docker-mirror report: unit {_p(s['unit'])}, since {_p(s['since'] or 'the start of the journal')} "
           f"({s['first']} to {s['last']})",
           f"requests: {s['requests']} (" + ", ".join(f"{k} {v}" for k, v in s["status_classes"].items()) + ")"]
    cache = s["cache"]
    answerable = sum(cache[c] for c in (*FROM_CACHE, *FROM_UPSTREAM))
    ratio = "-" if s["hit_ratio"] is None else f"{s['hit_ratio'] * 100:.1f}%"
    out.append(f"hit ratio: {ratio} ({cache['HIT']} of {answerable} requests the cache answered were HITs; "
               + ", ".join(f"{c} {cache[c]}" for c in (*FROM_CACHE, *FROM_UPSTREAM)) + ")")
    out.append(f"bytes sent: {humanize.size(s['bytes']['from_cache'])} from the cache, "
               f"{humanize.size(s['bytes']['from_upstream'])} fetched from upstreams (MISS, PASS), "
               f"{humanize.size(s['bytes']['other'])} other")
    if s["upstreams"]:
        out += ["", f"{'upstream':<32} {'requests':>9} {'pulls spent':>12} {'pulls saved':>12} "
                    f"{'from cache':>11} {'from upstream':>14}"]
        out += [f"{_p(u['upstream']):<32} {u['requests']:>9} {u['pulls_spent']:>12} {u['pulls_saved']:>12} "
                f"{humanize.size(u['bytes_from_cache']):>11} {humanize.size(u['bytes_from_upstream']):>14}"
                for u in s["upstreams"]]
        out.append("(pulls: manifest GETs; spent: asked the upstream; saved: answered from the cache)")
    if s["most_pulled"]:
        out += ["", "most pulled repositories (manifest GETs):"]
        out += [f"  {r['pulls']:>6} pulls {r['requests']:>7} requests {humanize.size(r['bytes']):>11}  "
                f"{_p(r['upstream'])}/{_p(r['repository'])}" for r in s["most_pulled"]]
    if s["slowest_repositories"]:
        out += ["", "slowest repositories (longest request, mean):"]
        out += [f"  {r['max_ms']:>10.1f} ms {r['mean_ms']:>10.1f} ms  {_p(r['upstream'])}/{_p(r['repository'])}"
                for r in s["slowest_repositories"]]
    if s["slowest_requests"]:
        out += ["", "slowest requests:"]
        out += [f"  {r['duration_ms']:>10.1f} ms  {_p(r['method'])} {_p(r['kind'])} {r['status']} "
                f"{_p(r['cache'])} {humanize.size(r['bytes'])}  {_target(r)}  {r['time']}"
                for r in s["slowest_requests"]]
    return "\n".join(out) + "\n"


def run(unit: str, since: str | None, as_json: bool, out: IO[str], journalctl: str = "journalctl") -> int:
    """Print the report (``since`` as the user gave it); :class:`ReportError` when the journal
    cannot be read."""
    tally = Tally()
    for request in requests(journal_lines(unit_argument(unit), since and since_argument(since), journalctl)):
        tally.add(request)
    summary = tally.summary(unit, since)
    if as_json:
        json.dump(summary, out, indent=2)
        out.write("\n")
    elif tally.requests == 0:
        out.write(f"no request entries in the journal of {_p(unit)} since {_p(since or 'its start')} (they need "
                  "log.journal_fields: true, the default, and the mirror running under systemd)\n")
    else:
        out.write(text(summary))
    return 0
