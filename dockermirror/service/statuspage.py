"""The status page (``GET /``) and the health check (``GET /healthz``) on the mirror's listener.

``/`` is one HTML page rendered here from :func:`dockermirror.service.readings.read` (cache use,
upstreams, transfers in flight), the index's lifetime counters and :class:`PullStats` (what this
process answered since it started): no script, no external asset, inline CSS only, so its
Content-Security-Policy can forbid everything else; the browser reloads it every 10 s (a meta
refresh). Every value that a client or an upstream chose (repository names, error text, an
identity) is HTML-escaped. The page shows what the mirror serves, so it asks what ``/v2/`` asks
(the access guard's identify and ping: a Basic challenge where ``/v2/`` would give one), is
403 DENIED to a viewer who may pull nothing (and whom no login can help), and names only
repositories the viewer may pull. ``status_page: false`` turns it off (404).

``/healthz`` is plain text for load balancers and monitors, answered without authentication and
naming no repository: ``ok`` while the process serves, then one line per problem. It is 200 even
then: a mirror whose upstream is down or whose cache cannot store still serves everything it has
cached, which is what clients need most when the upstream is down; taking it out of a load
balancer would turn a partial failure into a total one. The problems are for people and alerts.
"""

from __future__ import annotations

import html
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dockermirror import __version__
from dockermirror.access.guard import Guard
from dockermirror.access.rules import client_address
from dockermirror.api.responses import error_response
from dockermirror.api.routes import READ_METHODS, RegistryAPI, any_method_route
from dockermirror.errors import Denied, RegistryError, Unsupported
from dockermirror.humanize import age, printable, size
from dockermirror.cacheresults import CACHE_RESULTS, hit_ratio
from dockermirror.service.pullstats import Counted, PullStats
from dockermirror.service.readings import CacheReading, Readings, TransferReading, UpstreamReading, read

if TYPE_CHECKING:
    from dockermirror.app import DockerMirror

REFRESH_SECONDS = 10
TOP = 20            # most pulled repositories shown
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class StatusPage:
    """``/`` and ``/healthz`` of one application; ``stats`` is its request observer."""

    def __init__(self, app: DockerMirror) -> None:
        self.app = app
        self.stats = PullStats()

    def routes(self, api: RegistryAPI) -> list[Route]:
        return [any_method_route("/", api.endpoint(self.page)), any_method_route("/healthz", self.healthz)]

    async def page(self, request: Request) -> Response:
        """Behind the API's endpoint wrapper: read-only, identified, errors as the API's."""
        if not self.app.config.status_page:
            raise RegistryError("no status page here (status_page: false)", status=404, code="NOT_FOUND")
        guard: Guard = request.state.guard
        host = request.client.host if request.client else None
        if guard.active:
            identity = request.state.identity
            guard.ping(identity, host)      # what /v2/ asks of this client
            if not guard.rules.may_pull(identity, client_address(host)):
                # no login can help here (no htpasswd, or already logged in): the page is not theirs
                raise Denied(f"{identity} may pull nothing from this mirror, so the status page is not shown")
            viewer: str | None = str(identity)

            def keep(key: str, repository: str) -> bool:
                """May the viewer pull it (one rules lookup, as a pull's; at most a few ms for
                a whole table of repositories the viewer may not pull)."""
                return guard.decide(identity, host, key, repository).allowed
        else:
            viewer = None

            def keep(key: str, repository: str) -> bool:
                return True

        body = render(read(self.app), self.stats, lifetime(self.app), keep, viewer).encode()
        head = request.method == "HEAD"
        headers = {**PAGE_HEADERS, "Content-Length": str(len(body))}
        return Response(b"" if head else body, headers=headers, media_type="text/html; charset=utf-8")

    async def healthz(self, request: Request) -> Response:
        head = request.method == "HEAD"
        if request.method not in READ_METHODS:
            error = Unsupported("this registry is a read-only mirror: pushes and deletes are not supported",
                                headers={"Allow": "GET, HEAD"})
            request.state.note = f"{error.code}: {error.message}"
            return error_response(error, head=head)
        try:
            problems = health(read(self.app))
        except (OSError, sqlite3.Error) as exc:     # the cache's filesystem gone, say (no path shown)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            problems = [f"cache: its state cannot be read ({why})"]
        body = "".join(f"{printable(line, quote=False)}\n" for line in ["ok", *problems]).encode()
        request.state.quiet = not problems      # a probe every few seconds: its line at debug while all is well
        headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                   "Content-Length": str(len(body))}
        return Response(b"" if head else body, headers=headers, media_type="text/plain; charset=utf-8")


# --- /healthz

def health(readings: Readings) -> list[str]:
    """One line per problem; none: all is well. Repository names never appear here."""
    problems = []
    cache = readings.cache
    if cache is None:
        problems.append("cache: not open")
    else:
        if cache.degraded is not None:
            problems.append(f"cache: DEGRADED ({cache.degraded}): serving what is cached, "
                            "passing the rest through uncached")
        if cache.free_bytes < cache.min_free_bytes:
            problems.append(f"cache: filesystem full: {size(cache.free_bytes)} free, less than cache.min_free "
                            f"({size(cache.min_free_bytes)}): new content evicts older content or passes through "
                            "uncached")
    for upstream in readings.upstreams:
        if upstream.reachable is False:
            problems.append(f"upstream {upstream.key}: unreachable: serving what is cached")
    return problems


# --- /

def lifetime(app: DockerMirror) -> dict[str, int] | None:
    """Requests by cache result from the index's counters (kept across restarts, written every
    few seconds); None if the index cannot be read."""
    index = app.cache.index
    if index is None:
        return None
    try:
        counters = index.counters()
    except sqlite3.Error:
        return None
    return {result: counters.get(f"requests_{result.lower()}", 0) for result in CACHE_RESULTS}


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _percent(part: float, whole: float) -> float:
    return max(0.0, min(100.0, part / whole * 100)) if whole > 0 else 0.0


def _bar(parts: list[tuple[str, float]], label: str) -> str:
    spans = "".join(f'<span class="{kind}" style="width:{share:.2f}%"></span>' for kind, share in parts)
    return f'<div class="bar" role="img" aria-label="{_e(label)}">{spans}</div>'


def _section(title: str, body: str, *, wide: bool = False) -> str:
    attribute = ' class="wide"' if wide else ""
    return f"<section{attribute}><h2>{title}</h2>{body}</section>"


def _cache(cache: CacheReading | None) -> str:
    if cache is None:
        return _section("Cache", '<p class="alarm">The cache is not open.</p>')
    used, reserved = _percent(cache.used_bytes, cache.max_bytes), _percent(cache.reserved_bytes, cache.max_bytes)
    reserved = min(reserved, 100 - used)
    label = f"{used:.0f}% of the cache's maximum size used"
    alarm = ""
    if cache.degraded is not None:
        alarm = (f'<p class="alarm">DEGRADED: the cache cannot store ({_e(cache.degraded)}). It serves what is '
                 "cached and passes everything else through uncached; it tries a write every 10 s.</p>")
    if cache.free_bytes < cache.min_free_bytes:
        alarm += (f'<p class="alarm">The filesystem is full: {size(cache.free_bytes)} free, less than cache.min_free '
                  f"({size(cache.min_free_bytes)}).</p>")
    figures = (f'<p class="big"><b>{size(cache.used_bytes)}</b> used of <b>{size(cache.max_bytes)}</b> '
               f"max ({_percent(cache.used_bytes, cache.max_bytes):.1f}%)</p>"
               f"<dl><dt>entries</dt><dd>{cache.entries:,} (blobs and manifests)</dd>"
               f"<dt>reserved</dt><dd>{size(cache.reserved_bytes)} reserved by downloads in flight</dd>"
               f"<dt>filesystem</dt><dd>{size(cache.free_bytes)} free of {size(cache.filesystem_bytes)} "
               f"(cache.min_free keeps {size(cache.min_free_bytes)})</dd></dl>")
    return _section("Cache", alarm + _bar([("used", used), ("reserved", reserved)], label) + figures)


def _ratio_row(name: str, answers: dict[str, int] | None, source: str) -> str:
    if answers is None:
        return (f'<tr><th>{name}</th><td class="num big">-</td><td>the index cannot be read<br>'
                f'<span class="note">{source}</span></td></tr>')
    total = sum(answers.values())
    ratio = hit_ratio(answers)
    ratio = "-" if ratio is None else f"{ratio * 100:.1f}%"
    parts = " · ".join(f"{result} {answers[result]}" for result in CACHE_RESULTS)
    return (f'<tr><th>{name}</th><td class="num big">{ratio}</td><td>of {_count(total, "cache answer")} '
            f'({parts})<br><span class="note">{source}</span></td></tr>')


def _ratios(stats: PullStats, lifetime_answers: dict[str, int] | None) -> str:
    rows = (_ratio_row("since start", stats.answers, "counted by this process from the requests it answered")
            + _ratio_row("lifetime", lifetime_answers,
                         "the cache index's counters, kept across restarts (written every few seconds)"))
    note = ('<p class="note">Hit ratio: requests answered from the cache (HIT) among all answers of manifests, '
            "blobs and tags; COALESCED shared an upstream fetch another request started (a blob download, "
            "a manifest or referrers answer), STALE was a cached tag "
            "served because the upstream failed, PASS went through uncached.</p>")
    return _section("Hit ratio", f"<table>{rows}</table>{note}")


def _state(upstream: UpstreamReading) -> str:
    if upstream.reachable is None:
        return '<span class="idle">not contacted yet</span>'
    if upstream.reachable:
        return '<span class="good">reachable</span>'
    return '<span class="bad">UNREACHABLE</span>'


def _upstreams(upstreams: tuple[UpstreamReading, ...]) -> str:
    rows = []
    for u in upstreams:
        default = ' <span class="tag">default</span>' if u.default else ""
        if u.ratelimit_remaining is not None:
            limit = f" / {u.ratelimit_limit}" if u.ratelimit_limit is not None else ""
            pulls = f"{u.ratelimit_remaining}{limit}"
        else:
            pulls = "-"
        rows.append(f"<tr><td><b>{_e(u.key)}</b>{default}</td><td>{_e(u.url)}</td><td>{_state(u)}</td>"
                    f"<td>{_e(u.last_error) or '-'}</td><td class=\"num\">{_e(pulls)}</td></tr>")
    return _section("Upstreams", "<table><tr><th>registry</th><th>URL</th><th>state</th><th>last error</th>"
                    "<th>Docker Hub pulls left / limit</th></tr>" + "".join(rows) + "</table>", wide=True)


def _transfers(transfers: tuple[TransferReading, ...], keep: Callable[[str, str], bool]) -> str:
    rows = []
    hidden = 0
    for t in transfers:
        if t.upstream and t.repository:
            if not keep(t.upstream, t.repository):
                hidden += 1
                continue
            name = f"{t.upstream}/{t.repository}"
        else:
            name = "-"
        if t.size:
            share = _percent(t.received, t.size)
            progress = _bar([("used", share)], f"{share:.0f}% received") + \
                f"{size(t.received)} of {size(t.size)} ({share:.0f}%)"
        else:
            progress = f"{size(t.received)} (size not announced)"
        rows.append(f"<tr><td>{_e(name)}</td><td><code>{_e(t.digest[:19])}</code></td><td>{progress}</td>"
                    f'<td class="num">{t.followers}</td></tr>')
    if not rows:
        body = "<p>No downloads in flight.</p>"
    else:
        body = ("<table><tr><th>repository</th><th>digest</th><th>received</th><th>followers</th></tr>"
                + "".join(rows) + "</table>")
    note = f'<p class="note">{hidden} more of repositories you may not pull.</p>' if hidden else ""
    return _section("Downloads in flight", body + note, wide=True)


def _top(stats: PullStats, keep: Callable[[str, str], bool], viewer: str | None) -> str:
    top: list[Counted[tuple[str, str]]] = stats.pulls.top(TOP, lambda key: keep(*key))
    rows = []
    for rank, counted in enumerate(top, 1):
        upstream, repository = counted.key
        low = counted.count - counted.error
        count = f"{counted.count}" if not counted.error else f"{low} to {counted.count}"
        rows.append(f'<tr><td class="num">{rank}</td><td>{_e(upstream)}/{_e(repository)}</td>'
                    f'<td class="num">{count}</td></tr>')
    body = ("<table><tr><th>#</th><th>repository</th><th>manifest GETs</th></tr>" + "".join(rows) + "</table>"
            if rows else "<p>No pulls since start.</p>")
    scope = (f" Shown as {_e(viewer)}: only repositories you may pull." if viewer is not None else "")
    note = (f'<p class="note">Manifest GETs answered 2xx (what Docker Hub counts as pulls). The tally keeps the '
            f"{stats.pulls.capacity} most pulled repositories; a count shown as a range (at least, at most) "
            f"may include pulls of repositories it displaced.{scope}</p>")
    return _section("Most pulled since start", body + note, wide=True)


_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c3c8d4;font-size:13px}
main{max-width:1160px;margin:0 auto;padding:12px 24px;display:grid;grid-template-columns:1fr 1fr;gap:16px}
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:12px 16px}
section.wide{grid-column:1/-1}h2{margin:0 0 8px;font-size:17px}
.bar{display:flex;height:18px;background:#e4e7ec;border-radius:4px;overflow:hidden;margin:6px 0;min-width:120px}
.bar .used{background:#2f6fdb}.bar .reserved{background:#9bb9ef}
.big{font-size:18px;margin:6px 0}dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0}
dt{color:#5b6475}dd{margin:0}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px 4px 0;border-bottom:1px solid #eceef2;vertical-align:top;word-break:break-word}
th{color:#5b6475;font-weight:600;white-space:nowrap}.num{text-align:right;white-space:nowrap}
.note{color:#5b6475;font-size:13px}
.alarm{background:#b3261e;color:#fff;font-weight:700;padding:8px 10px;border-radius:4px;font-size:16px}
.good{color:#17803d;font-weight:600}.bad{color:#b3261e;font-weight:700}.idle{color:#5b6475}
.good,.bad{white-space:nowrap}
.tag{background:#e4e7ec;border-radius:3px;padding:0 5px;font-size:12px}code{font-size:13px}
footer{max-width:1160px;margin:0 auto;padding:4px 24px 16px;color:#5b6475;font-size:13px}
"""


def render(readings: Readings, stats: PullStats, lifetime_answers: dict[str, int] | None,
           keep: Callable[[str, str], bool], viewer: str | None) -> str:
    """The whole page; ``keep(upstream, repository)``: may the viewer see that repository."""
    taken = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(readings.taken))
    up = f" · up {age(readings.taken - readings.started)}" if readings.started is not None else ""
    degraded = readings.cache is not None and readings.cache.degraded is not None
    title = "docker-mirror: cache DEGRADED" if degraded else "docker-mirror status"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>docker-mirror</h1><p>{taken}{up} · version {_e(__version__)} · "
        f"this page reloads every {REFRESH_SECONDS} s</p></header><main>"
        + _cache(readings.cache) + _ratios(stats, lifetime_answers)
        + _upstreams(readings.upstreams) + _transfers(readings.transfers, keep) + _top(stats, keep, viewer)
        + "</main><footer>Health check for load balancers: <code>/healthz</code>.</footer></body></html>"
    )
