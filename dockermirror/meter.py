"""The core's hook for metrics: what happened, told once at the one place it happens.

The core (mirror, cache, upstream client) holds a :class:`Meter` and calls it; the base
class does nothing, so without metrics (``NULL_METER``) each event costs one method call.
``dockermirror.service.metrics`` subclasses it with Prometheus counters when
``metrics.listen`` is set. The core never imports prometheus_client or the service.

Every method is called on the event loop, never per chunk: paths that move bytes count
locally and report once per transfer (or once per answer). Arguments are the upstream's
key (``docker.io``, ``host:port``: never a URL, a repository or a credential), small
fixed words, and numbers.
"""

from __future__ import annotations

# what an upstream request was for (the ``kind`` of upstream_request)
UPSTREAM_KINDS = ("manifest", "blob", "tags", "referrers", "token", "other")
# how a tag past its TTL fared when asked again
REVALIDATION_RESULTS = ("unchanged", "changed", "stale", "failed")
# why content left the cache: least recently used (room), not used within its TTL, an operator's command
EVICTION_REASONS = ("lru", "ttl", "manual")
# where a digest did not match: the bytes an upstream sent, or a stored file
VERIFICATION_PLACES = ("download", "disk")


def upstream_kind(path: str) -> str:
    """The kind of a request below ``/v2/<repository>/``: ``manifests/latest`` -> manifest."""
    if path.startswith("manifests/"):
        return "manifest"
    if path.startswith("blobs/"):
        return "blob"
    if path.startswith("tags/"):
        return "tags"
    if path.startswith("referrers/"):
        return "referrers"
    return "other"


class Meter:
    """Events the core reports; every method is a no-op here."""

    def upstream_request(self, upstream: str, kind: str, status: int | None, first_byte_seconds: float) -> None:
        """A request sent upstream got an answer's headers (``status``), or none at all (None: refused,
        reset, timed out), ``first_byte_seconds`` after it was sent. Each hop counts (a 401 then the
        retry with a token, a redirect to blob storage)."""

    def upstream_received(self, upstream: str, nbytes: int) -> None:
        """Body bytes received from the upstream: once per answer read whole, once per blob download."""

    def transfer_done(self, upstream: str | None, seconds: float, ok: bool) -> None:
        """A blob download ended: ``ok`` if verified, ``seconds`` from its start."""

    def resumed(self, upstream: str) -> None:
        """A blob download that broke off was asked for again from where it stopped (Range)."""

    def verification_failed(self, where: str) -> None:
        """A digest did not match: ``download`` (the upstream's bytes) or ``disk`` (a stored file)."""

    def tag_revalidated(self, upstream: str, result: str) -> None:
        """A cached tag past its TTL: ``unchanged``, ``changed``, served ``stale`` (the upstream
        failed or is down), or ``failed`` (the upstream's answer went to the client: a 404...)."""

    def evicted(self, reason: str, entries: int, nbytes: int) -> None:
        """Entries removed from the cache by this process (``lru`` or ``ttl``)."""

    def pass_through(self, upstream: str | None) -> None:
        """A blob was streamed to its clients without being stored (too big, no room)."""


NULL_METER = Meter()
