"""The mirror policy: serve from the cache, or fetch once and let everyone follow.

* Manifests and blobs by digest are immutable: once cached they are served with no
  upstream call at all, whether the upstream is up or not.
* A tag maps to a digest for ``cache.tag_ttl``; after that it is revalidated with a
  HEAD (which Docker Hub does not count as a pull), and the manifest is fetched only
  if the digest changed. The mapping is kept per accept class (``oci.accept_class``):
  what the upstream answered a client is served only to clients that accept the same
  manifest types, or to any client that takes its type when it is the tag's own
  manifest (a list, or the answer to a client that names every manifest type). So a
  client that takes no list (and gets one platform's manifest, or a 404) never changes
  what a client that takes lists gets, and a 404 forgets only its own class's row.
  If the upstream is unreachable or answers 5xx/429, the cached mapping is served
  stale; for a while after the upstream could not be reached, cached tags are served
  stale without trying it first.
* A referrers answer (OCI 1.1: the image index of the artifacts whose ``subject`` is a digest,
  optionally filtered by ``artifactType``) is treated like a tag: kept per upstream, repository,
  subject and filter for the upstream's tag TTL, then asked for again with a GET (the API
  defines no HEAD and no digest of the answer to compare), served stale while the upstream
  is unreachable or answers 5xx/429. A 404 (an upstream without the API) is passed on and
  forgets the answer, so that clients fall back to the ``sha256-<hex>`` tag scheme.
* A blob that is not cached is fetched by one transfer; concurrent requests for it
  follow that transfer (COALESCED). A blob the cache has no room for passes through
  uncached (PASS). Likewise concurrent requests for the same manifest, tag revalidation or
  referrers share one upstream request: the one that asked is MISS, the others COALESCED
  (a manifest served from the cache stays a HIT, a stale one STALE).
* Content is shared by digest across repositories and upstreams, but a cached (or in-flight)
  digest is served for an upstream's repository without asking only if it was served for
  that repository before (the index's refs), or if every upstream that holds it is anonymous
  (no credentials: its content is public anyway). Otherwise the upstream is first asked with
  a HEAD, with its own credentials, whether that repository has it: only a 200 serves it (and
  is recorded, so it is asked once); its 404/401 goes to the client, and an upstream that
  cannot answer fails the request (503). So a private upstream's content never reaches a
  client through another repository, or another upstream, just because its digest is known.

The result of every call says how it was served (HIT, MISS, STALE, COALESCED) and
what the upstream answered, for the request log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from dockermirror import humanize
from dockermirror.cache import Cache, CachedFile, Entry, Follower, ReferrersEntry, TagEntry
from dockermirror.errors import (
    BadUpstreamContent,
    BlobUnknown,
    LoopDetected,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RegistryError,
    Unavailable,
)
from dockermirror.meter import NULL_METER, Meter
from dockermirror.routing import RegistryTable, UnknownRegistry, host_with_port, upstream_repository
from dockermirror.singleflight import SingleFlight
from dockermirror.oci import (
    AS_STORED,
    LIST_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
    InvalidDigest,
    accept_class,
    acceptable,
    names,
    valid_media_type,
    valid_name,
)
from dockermirror.upstream.bodies import BadLength, content_length
from dockermirror.upstream.client import BlobStream, Reply, UpstreamClient, UpstreamUnreachable, error_for

log = logging.getLogger("dockermirror.mirror")

T = TypeVar("T")

from dockermirror.cacheresults import COALESCED, HIT, MISS, PASS, STALE  # noqa: E402  (re-exported)
# seconds a request waits for another upstream's failed download of the same digest to be gone
OTHERS_FAILED_WAIT = 10
LATE_RETRY_AFTER = 10   # seconds a client is asked to wait when too many late pass-through fetches run


@dataclass(frozen=True)
class Upstream:
    """An upstream registry: the name clients know it by, and the client that reaches it."""

    key: str
    client: UpstreamClient
    aliases: tuple[str, ...] = ()
    tag_ttl: float | None = None    # None: the mirror's
    private: bool = False           # credentials are configured: what it serves may not be public

    def repository(self, name: str) -> str:
        return upstream_repository(self.key, name)


class Upstreams:
    """The configured upstreams by key, the default first, and the table that routes to them."""

    def __init__(self, upstreams: Iterable[Upstream], *, dotted_namespaces: bool = False) -> None:
        self.by_key: dict[str, Upstream] = {}
        for upstream in upstreams:
            self.by_key.setdefault(upstream.key, upstream)
        self.table = RegistryTable(((u.key, u.aliases) for u in self.by_key.values()),
                                   dotted_namespaces=dotted_namespaces)

    @property
    def default(self) -> Upstream:
        return self.by_key[self.table.default]

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self.by_key.values())

    def __len__(self) -> int:
        return len(self.by_key)

    def get(self, key: str) -> Upstream | None:
        return self.by_key.get(key)


@dataclass(frozen=True)
class Repo:
    upstream: Upstream
    name: str

    def __str__(self) -> str:
        return f"{self.upstream.key}/{self.name}"


@dataclass
class Manifest:
    digest: str
    media_type: str
    size: int
    body: bytes | None          # None for HEAD
    cache: str
    upstream_status: int | None = None


@dataclass
class Blob:
    digest: str
    size: int | None            # None when the upstream did not announce a length
    media_type: str | None
    body: CachedFile | Follower | None   # None for HEAD
    cache: str
    upstream_status: int | None = None


@dataclass
class Referrers:
    digest: str                 # of the answer (not a manifest's: nothing to check it against)
    size: int
    body: bytes | None          # None for HEAD
    filtered: bool              # the upstream applied the artifactType filter
    cache: str
    upstream_status: int | None = None


Answered = TypeVar("Answered", Manifest, Referrers)


class Mirror:
    """Serves registry requests from the cache and the upstreams."""

    def __init__(self, upstreams: Upstreams | Upstream, cache: Cache, *, tag_ttl: float,
                 clock: Callable[[], float] = time.time, meter: Meter = NULL_METER) -> None:
        self.upstreams = upstreams if isinstance(upstreams, Upstreams) else Upstreams([upstreams])
        self.cache = cache
        self.meter = meter
        self.tag_ttl = tag_ttl
        self.clock = clock
        # content an anonymous upstream holds is served for any repository of it without asking
        # (it is public there); off when access rules differ by repository, which a digest would
        # otherwise get around: then a repository gets cached content only once its upstream says it has it
        self.share_public = True
        self._flights = SingleFlight()

    @property
    def upstream(self) -> Upstream:
        """The default upstream."""
        return self.upstreams.default

    # --- routing

    def resolve(self, name: str, namespace: str | None = None) -> Repo:
        """The upstream repository for a request path name and containerd's ``?ns=``
        (see :mod:`dockermirror.routing`): an unknown registry is 404 NAME_UNKNOWN, at once."""
        first, _, rest = name.partition("/")
        if not (valid_name(name) or (rest and host_with_port(first) and valid_name(rest))):
            raise NameInvalid(f"invalid repository name {name!r}", detail={"name": name})
        upstreams = self.upstreams      # one table for the whole lookup, whatever a reload does
        try:
            route = upstreams.table.route(name, namespace)
        except UnknownRegistry as exc:
            detail = {"ns": namespace} if namespace is not None else {"registry": exc.registry}
            raise NameUnknown(exc.public, detail=detail) from None
        return Repo(upstreams.by_key[route.registry], route.repository)

    def tag_ttl_of(self, upstream: Upstream) -> float:
        return self.tag_ttl if upstream.tag_ttl is None else upstream.tag_ttl

    # --- manifests

    async def manifest(self, repo: Repo, reference: str, accept: list[str], *, head: bool) -> Manifest:
        if ":" in reference:
            return await self._manifest_by_digest(repo, Digest.parse(reference), accept, head=head)
        return await self._manifest_by_tag(repo, reference, accept, head=head)

    async def _manifest_by_digest(self, repo: Repo, digest: Digest, accept: list[str], *, head: bool) -> Manifest:
        entry = self.cache.entry(digest)
        if entry is not None and entry.kind == "manifest":
            checked = await self._vouch(repo, digest, manifest=True)
            served = await self._from_cache(repo, entry, head=head, cache=HIT, upstream_status=checked)
            if served is not None:
                return served
        if head:
            reply = await self._ask(repo.upstream.client.manifest(repo.name, str(digest), accept, head=True))
            if reply.status != 200:
                raise error_for(reply.status, reply.headers, reply.body)
            size, media_type = _manifest_length(reply), _content_type(reply)
            if size is not None and valid_media_type(media_type):
                return Manifest(str(digest), media_type, size, None, MISS, reply.status)
            # The HEAD does not say what it is: fetch (and cache) it to answer.
        fetched, led = await self._flights.do(self._manifest_flight(repo, digest),
                                              lambda: self._fetch_manifest(repo, digest, accept))
        fetched = _as_shared(fetched, led)
        return dataclasses.replace(fetched, body=None) if head else fetched

    async def _manifest_by_tag(self, repo: Repo, tag: str, accept: list[str], *, head: bool) -> Manifest:
        key = repo.upstream.key
        row = self._tag_row(repo, tag, accept)
        if row is not None and self.clock() - row.checked < self.tag_ttl_of(repo.upstream):
            self.cache.touch_tag(key, repo.name, tag)
            return await self._serve_tag(repo, row, accept, head=head, cache=HIT, upstream_status=None)
        if row is not None and repo.upstream.client.recently_down:
            error = UpstreamUnreachable(f"not retried for a while after: {repo.upstream.client.last_error}")
            return await self._stale_revalidation(repo, tag, row, accept, error, head=head)
        flight = ("tag", key, repo.name, tag, tuple(accept))
        try:
            (fresh, fetched), led = await self._flights.do(flight, lambda: self._revalidate_counted(repo, tag,
                                                                                              accept, row))
        except (Unavailable, UpstreamUnreachable) as exc:
            return await self._stale(repo, tag, row, accept, exc, head=head)
        except RegistryError as exc:
            if exc.code == "TOOMANYREQUESTS" and row is not None:
                return await self._stale(repo, tag, row, accept, exc, head=head)
            raise
        self.cache.touch_tag(key, repo.name, tag)
        # What the revalidation got from the upstream is MISS for the request that asked, COALESCED
        # for those that shared its answer; a manifest it found cached is a HIT for all of them,
        # unless the revalidation had to GET it (a pull).
        asked = MISS if led else COALESCED
        return await self._serve_tag(repo, fresh, accept, head=head, cache=asked if fetched else HIT,
                                     upstream_status=200, asked=asked)

    def _tag_row(self, repo: Repo, tag: str, accept: list[str]) -> TagEntry | None:
        """The known mapping that answers this client, if any: the upstream's answer to clients
        of its accept class, else the tag's own manifest if this client names its type. (Not
        for a client that names none, sending no Accept or ``*/*``: registries answer those
        with what they choose, e.g. a list's linux/amd64 manifest, or 404 for an OCI index.)"""
        own = accept_class(accept)
        for answers in dict.fromkeys((own, AS_STORED)):
            row = self.cache.tag(repo.upstream.key, repo.name, tag, answers)
            if row is not None and (acceptable(row.media_type, accept) if answers == own
                                    else names(row.media_type, accept)):
                return row
        return None  # this client cannot take what we have: ask the upstream

    async def _serve_tag(self, repo: Repo, row: TagEntry, accept: list[str], *, head: bool, cache: str,
                         upstream_status: int | None, asked: str = MISS) -> Manifest:
        """Answer for a tag whose digest is known: from the cache, or by fetching that digest.
        ``cache`` labels an answer from the cache; ``asked`` one from a revalidation's mapping alone."""
        digest = Digest.parse(row.digest)
        entry = self.cache.entry(digest)
        if entry is not None and entry.kind == "manifest":
            served = await self._from_cache(repo, entry, head=head, cache=cache, upstream_status=upstream_status)
            if served is not None:
                return served
        if head:  # the mapping alone answers a HEAD
            label = asked if cache == HIT and upstream_status is not None else cache
            return Manifest(row.digest, _or_default(row.media_type), row.size, None, label, upstream_status)
        if cache == STALE:
            raise Unavailable(f"the upstream is unreachable and manifest {row.digest} is not cached")
        fetched, led = await self._flights.do(self._manifest_flight(repo, digest),
                                              lambda: self._fetch_manifest(repo, digest, accept))
        return _as_shared(fetched, led)

    @staticmethod
    def _manifest_flight(repo: Repo, digest: Digest) -> tuple[str, ...]:
        """The single-flight key of a manifest fetch: per upstream (another upstream's failure is
        not this one's answer); an anonymous upstream's is shared by its repositories (what it
        fetches is public), a private upstream's is its repository's own, joined by no other."""
        if repo.upstream.private:
            return ("manifest", repo.upstream.key, repo.name, str(digest))
        return ("manifest", repo.upstream.key, str(digest))

    async def _revalidate_counted(self, repo: Repo, tag: str, accept: list[str],
                                  row: TagEntry | None) -> tuple[TagEntry, bool]:
        """:meth:`_revalidate`, counted once for every client that shares it (a known tag's:
        unchanged, changed; stale when the upstream failed and the cached mapping is served
        instead; failed when the upstream refused)."""
        key = repo.upstream.key
        try:
            fresh, fetched = await self._revalidate(repo, tag, accept)
        except (Unavailable, UpstreamUnreachable):
            if row is not None:
                self.meter.tag_revalidated(key, "stale")
            raise
        except RegistryError as exc:
            if row is not None:
                self.meter.tag_revalidated(key, "stale" if exc.code == "TOOMANYREQUESTS" else "failed")
            raise
        if row is not None:
            self.meter.tag_revalidated(key, "unchanged" if fresh.digest == row.digest else "changed")
        return fresh, fetched

    async def _revalidate(self, repo: Repo, tag: str, accept: list[str]) -> tuple[TagEntry, bool]:
        """Ask the upstream what the tag points at now for this client (HEAD), and record it
        for the clients it answers; and whether the manifest had to be fetched (GET) to know."""
        key = repo.upstream.key
        asked = accept_class(accept)
        reply = await repo.upstream.client.manifest(repo.name, tag, accept, head=True)
        if reply.status == 404:
            # Gone for the clients that accept what this one does. Others keep their mapping:
            # distribution answers 404 for an OCI index to a client that takes no index.
            await self.cache.delete_tag(key, repo.name, tag, asked)
        if reply.status != 200:
            raise error_for(reply.status, reply.headers, reply.body)
        known = self._head_answer(reply)
        fetched = known is None
        if known is None:
            # No usable digest, type or length from a HEAD: fetch the manifest by tag and hash it ourselves.
            manifest = await self._fetch_manifest(repo, None, accept, reference=tag)
            known = manifest.digest, manifest.media_type, manifest.size
        digest, media_type, size = known
        # A list is the tag as stored, for every client that takes lists. Anything else is the
        # tag as stored only if this client named every manifest type (asked == AS_STORED);
        # otherwise it may be one platform's manifest picked for it: it answers its class only.
        answers = AS_STORED if media_type.lower() in LIST_TYPES else asked
        now = self.clock()
        row = TagEntry(key, repo.name, tag, digest, media_type, size, now, now, answers)
        await self.cache.put_tag(row)
        return row, fetched

    def _head_answer(self, reply: Reply) -> tuple[str, str, int] | None:
        """(digest, media type, size) from a manifest HEAD, or None if it does not tell them."""
        try:
            digest = Digest.parse(reply.headers.get("docker-content-digest", ""))
        except InvalidDigest:
            return None
        media_type, size = _content_type(reply), _manifest_length(reply)
        if size is None or not valid_media_type(media_type):
            entry = self.cache.entry(digest)    # a manifest we hold tells them
            if entry is None or entry.kind != "manifest":
                return None
            media_type, size = _or_default(entry.media_type), entry.size
        return str(digest), media_type, size

    async def _stale_revalidation(self, repo: Repo, tag: str, row: TagEntry | None, accept: list[str],
                                  error: Exception, *, head: bool) -> Manifest:
        """:meth:`_stale` without asking the upstream (it was down moments ago), counting a known
        tag's revalidation as served stale, or failed."""
        if row is None:
            return await self._stale(repo, tag, row, accept, error, head=head)
        try:
            served = await self._stale(repo, tag, row, accept, error, head=head)
        except BaseException:
            self.meter.tag_revalidated(repo.upstream.key, "failed")
            raise
        self.meter.tag_revalidated(repo.upstream.key, "stale")
        return served

    async def _stale(self, repo: Repo, tag: str, row: TagEntry | None, accept: list[str],
                     error: Exception, *, head: bool) -> Manifest:
        """The upstream failed: serve the last known mapping, if there is one."""
        if isinstance(error, UpstreamUnreachable):
            error = Unavailable(f"the upstream is unreachable: {error}")
        if row is None:
            raise error
        try:
            served = await self._serve_tag(repo, row, accept, head=head, cache=STALE,
                                           upstream_status=getattr(error, "upstream_status", None))
        except Unavailable:
            raise error from None
        log.info("upstream failed for %s:%s (%s); serving the cached tag (digest %s, checked %s)",
                 repo, tag, error, row.digest, humanize.age(self.clock() - row.checked) + " ago")
        return served

    async def _from_cache(self, repo: Repo, entry: Entry, *, head: bool, cache: str,
                          upstream_status: int | None) -> Manifest | None:
        body = None
        if not head:
            body = await self.cache.read_small(entry)
            if body is None:
                return None
        self.cache.touch(entry.digest, repo.upstream.key, repo.name)
        return Manifest(entry.digest, _or_default(entry.media_type), entry.size, body, cache, upstream_status)

    async def _fetch_manifest(self, repo: Repo, digest: Digest | None, accept: list[str], *,
                              reference: str | None = None) -> Manifest:
        """GET a manifest, check it against its digest, store it."""
        reply = await self._ask(repo.upstream.client.manifest(repo.name, reference or str(digest), accept,
                                                              head=False))
        if reply.status != 200:
            raise error_for(reply.status, reply.headers, reply.body)
        algorithm = digest.algorithm if digest else "sha256"
        actual = Digest.of(reply.body, algorithm)
        expected = digest or _claimed_digest(reply, algorithm)
        if expected is not None and actual != expected:
            raise BadUpstreamContent(f"upstream manifest does not match its digest {expected} (got {actual})",
                                     upstream_status=reply.status)
        document = _json_object(reply.body)
        if document is None:
            raise ManifestInvalid(f"the upstream's manifest {actual} is not a JSON object", status=502,
                                  upstream_status=reply.status)
        if digest is None and not _is_manifest(reply, document):
            # a tag's answer, e.g. redirected to some internal service's JSON: neither served nor
            # stored (an answer by digest is the content asked for, whatever it holds)
            raise ManifestInvalid(f"the upstream's answer {actual} is not a manifest (no schemaVersion and"
                                  " manifest type or fields)", status=502, upstream_status=reply.status)
        media_type = _media_type(reply, document)
        await self.cache.put_manifest(actual, reply.body, media_type, repo.upstream.key, repo.name)
        return Manifest(str(actual), media_type, len(reply.body), reply.body, MISS, reply.status)

    # --- blobs

    async def blob(self, repo: Repo, digest: Digest, *, head: bool, retry: bool = True,
                   again: bool = True) -> Blob:
        """``retry``: another upstream's failed download may be asked of this one; ``again``: a
        transfer that ended while this request waited for it may be looked up afresh."""
        checked: int | None = None      # the upstream's answer when it was asked whether repo has it
        entry = self.cache.entry(digest)
        if entry is not None:
            checked = await self._vouch(repo, digest, manifest=False)
            file = None if head else await self.cache.open_file(entry)
            if head or file is not None:
                self.cache.touch(entry.digest, repo.upstream.key, repo.name)
                return Blob(entry.digest, entry.size, entry.media_type, file, HIT, checked)
        transfer = self.cache.transfer(digest)
        if transfer is not None:
            if checked is None:
                checked = await self._vouch(repo, digest, manifest=False, origin=transfer.origin)
            try:
                await transfer.started
            except Exception:
                if transfer.origin is None or transfer.origin[0] == repo.upstream.key or not retry:
                    raise
                # Another upstream could not start this digest's download (it is down, or does
                # not have it): that is no answer from this request's upstream. Ask it.
                await asyncio.wait_for(transfer.closed.wait(), OTHERS_FAILED_WAIT)
                return await self.blob(repo, digest, head=head, retry=False, again=again)
            if transfer.closed.is_set() and again:
                # it ended while this request waited (for the upstream's answer above): its file
                # is cached now, or gone (evicted meanwhile): look again rather than follow it
                blob = await self.blob(repo, digest, head=head, retry=retry, again=False)
                if blob.upstream_status is None:
                    blob.upstream_status = checked      # what the upstream answered above
                return blob
            self.cache.touch(str(digest), repo.upstream.key, repo.name)
            follower = None if head else transfer.follow()
            if head or follower is not None:
                return Blob(str(digest), transfer.size, None, follower, COALESCED, checked)
            # A transfer passing through memory no longer holds the first bytes (there was no room
            # on disk even outside the cache): this reader gets its own, within a bound.
            if self.cache.transfers.late_fetches_left <= 0:
                raise Unavailable(f"blob {digest} is passing through and its start is gone; try again later",
                                  headers={"Retry-After": str(LATE_RETRY_AFTER)})
            return await self._new_transfer(repo, digest, shared=False)
        if head:
            reply = await self._ask(repo.upstream.client.head_blob(repo.name, str(digest)))
            if reply.status != 200:
                raise error_for(reply.status, reply.headers, reply.body, unknown=BlobUnknown)
            try:    # passed on to the client: a length that is there must be one plain number
                size = content_length(reply.headers, strict=True)
            except BadLength as exc:
                raise RegistryError(f"the upstream's answer to HEAD of blob {digest} is unusable: {exc}",
                                    status=502, upstream_status=reply.status) from None
            return Blob(str(digest), size, None, None, MISS, reply.status)
        return await self._new_transfer(repo, digest, shared=True)

    async def _new_transfer(self, repo: Repo, digest: Digest, *, shared: bool) -> Blob:
        async def open_source() -> BlobStream:
            return await self._ask(repo.upstream.client.open_blob(repo.name, str(digest)))

        transfer = self.cache.start_transfer(digest, open_source, upstream=repo.upstream.key,
                                             repository=repo.name, shared=shared)
        await transfer.started
        follower = transfer.follow()
        assert follower is not None  # nothing was dropped before its first reader
        return Blob(str(digest), transfer.size, None, follower, MISS if transfer.caching else PASS, 200)

    # --- tags

    async def tags(self, repo: Repo, params: list[tuple[str, str]]) -> tuple[Reply | dict[str, Any], str]:
        """The upstream's tag list, or (upstream down) the tags this cache knows."""
        try:
            reply = await self._ask(repo.upstream.client.tags(repo.name, params))
            if reply.status == 200:
                if not _is_tag_list(reply.body):   # e.g. a redirect to some internal service's answer
                    raise RegistryError("the upstream's answer is not a tag list", status=502,
                                        upstream_status=reply.status)
                return reply, MISS
            error: RegistryError = error_for(reply.status, reply.headers, reply.body, unknown=NameUnknown)
        except Unavailable as exc:
            error = exc
        if (error.status >= 500 or error.status == 429) and not isinstance(error, LoopDetected):
            known = self.cache.tags_of(repo.upstream.key, repo.name)
            if known:
                log.info("upstream failed for the tag list of %s (%s); listing the %d cached tag(s)",
                         repo, error, len(known))
                return {"name": repo.name, "tags": known}, STALE
        raise error

    # --- referrers

    async def referrers(self, repo: Repo, subject: Digest, artifact_type: str | None, *, head: bool) -> Referrers:
        """The upstream's referrers of ``subject`` (an OCI image index), from the cache while fresh."""
        key = (repo.upstream.key, repo.name, str(subject), artifact_type or "")
        row = self.cache.referrers(*key)
        if row is not None and self.clock() - row.checked < self.tag_ttl_of(repo.upstream):
            served = await self._cached_referrers(row, head=head, cache=HIT)
            if served is not None:
                self.cache.touch_referrers(*key)
                return served
            # its stored answer is gone (evicted): ask again
        elif row is not None and repo.upstream.client.recently_down:
            error = UpstreamUnreachable(f"not retried for a while after: {repo.upstream.client.last_error}")
            return await self._stale_referrers(repo, row, error, head=head)
        try:
            fresh, led = await self._flights.do(("referrers", *key),
                                                lambda: self._fetch_referrers(repo, subject, artifact_type))
        except (Unavailable, UpstreamUnreachable) as exc:
            return await self._stale_referrers(repo, row, exc, head=head)
        except RegistryError as exc:
            if exc.code == "TOOMANYREQUESTS" and row is not None:
                return await self._stale_referrers(repo, row, exc, head=head)
            raise
        fresh = _as_shared(fresh, led)
        return dataclasses.replace(fresh, body=None) if head else fresh

    async def _fetch_referrers(self, repo: Repo, subject: Digest, artifact_type: str | None) -> Referrers:
        """GET the referrers from the upstream, check that they are an image index, store them."""
        key = (repo.upstream.key, repo.name, str(subject), artifact_type or "")
        reply = await repo.upstream.client.referrers(repo.name, str(subject), artifact_type)
        if reply.status == 404:
            # no referrers API (or no such repository): what was cached no longer answers
            if self.cache.referrers(*key) is not None:
                await self.cache.delete_referrers(*key)
            error = error_for(404, reply.headers, reply.body)
            raise type(error)(f"the upstream answered 404 for the referrers of {subject} ({error.message}); "
                              "a registry without the referrers API is asked for the sha256-<hex> tag instead",
                              detail={"subject": str(subject), "upstream_status": 404}, upstream_status=404)
        if reply.status != 200:
            raise error_for(reply.status, reply.headers, reply.body)
        document = _json_object(reply.body)
        manifests = document.get("manifests") if document is not None else None
        if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
            raise ManifestInvalid(f"the upstream's referrers of {subject} are not an image index", status=502,
                                  upstream_status=reply.status)
        if "link" in reply.headers:
            # the next page's query would not be forwarded (and a cached first page would answer it):
            # clients get the first page, which is all that registries send today
            log.info("the upstream paginates the referrers of %s@%s; serving only the first page", repo, subject)
        filtered = artifact_type is not None and "artifacttype" in _filters_applied(reply)
        digest = Digest.of(reply.body)
        stored = self.cache.entry(digest) is not None or await self.cache.put_manifest(
            digest, reply.body, OCI_INDEX, repo.upstream.key, repo.name)
        if stored:
            now = self.clock()
            await self.cache.put_referrers(ReferrersEntry(*key, str(digest), len(reply.body), filtered, now, now))
        return Referrers(str(digest), len(reply.body), reply.body, filtered, MISS, reply.status)

    async def _cached_referrers(self, row: ReferrersEntry, *, head: bool, cache: str,
                                upstream_status: int | None = None) -> Referrers | None:
        """A stored answer; None if its content is gone."""
        entry = self.cache.entry(Digest.parse(row.digest))
        if entry is None:
            return None
        body = None
        if not head:
            body = await self.cache.read_small(entry)
            if body is None:
                return None
        self.cache.touch(entry.digest, row.upstream, row.repository)
        return Referrers(row.digest, entry.size, body, row.filtered, cache, upstream_status)

    async def _stale_referrers(self, repo: Repo, row: ReferrersEntry | None, error: Exception, *,
                               head: bool) -> Referrers:
        """The upstream failed: serve the last answer, if there is one (never after a 404)."""
        if isinstance(error, UpstreamUnreachable):
            error = Unavailable(f"the upstream is unreachable: {error}")
        served = None
        if row is not None:
            served = await self._cached_referrers(row, head=head, cache=STALE,
                                                  upstream_status=getattr(error, "upstream_status", None))
        if served is None:
            raise error
        self.cache.touch_referrers(row.upstream, row.repository, row.subject, row.artifact_type)
        log.info("upstream failed for the referrers of %s@%s%s (%s); serving the cached answer (checked %s)",
                 repo, row.subject, f" (artifactType {row.artifact_type})" if row.artifact_type else "", error,
                 humanize.age(self.clock() - row.checked) + " ago")
        return served

    # --- content shared across repositories

    def _may_share(self, repo: Repo, digest: str, origin: tuple[str, str] | None = None) -> bool:
        """Whether cached (or in-flight, for ``origin``) content may be served for ``repo`` without
        asking its upstream: it was served for this very repository, or every upstream that holds
        it is a configured anonymous one (unless :attr:`share_public` is off: then the repository's
        own upstream is asked). Content of no known repository is asked for."""
        if self.share_public:
            holders = self.cache.ref_upstreams(digest)
            if origin is not None:
                holders.add(origin[0])
            upstreams = self.upstreams
            if holders and all((u := upstreams.get(key)) is not None and not u.private for key in holders):
                return True
        if origin == (repo.upstream.key, repo.name):
            return True
        return self.cache.has_ref(digest, repo.upstream.key, repo.name)

    async def _vouch(self, repo: Repo, digest: Digest, *, manifest: bool,
                     origin: tuple[str, str] | None = None) -> int | None:
        """None if the content may be served for ``repo`` as it is (see :meth:`_may_share`); else
        ask the upstream (HEAD, its credentials) whether ``repo`` has it: 200 is recorded and
        returned, anything else is the client's error; no answer is 503 (never served unasked)."""
        if self._may_share(repo, str(digest), origin):
            return None
        key = repo.upstream.key
        status, _ = await self._flights.do(("vouch", key, repo.name, str(digest)),
                                           lambda: self._ask_upstream_has(repo, digest, manifest=manifest))
        return status

    async def _ask_upstream_has(self, repo: Repo, digest: Digest, *, manifest: bool) -> int:
        client = repo.upstream.client
        if manifest:
            reply = await self._ask(client.manifest(repo.name, str(digest), list(MANIFEST_TYPES), head=True))
        else:
            reply = await self._ask(client.head_blob(repo.name, str(digest)))
        if reply.status != 200:
            error = error_for(reply.status, reply.headers, reply.body,
                              unknown=ManifestUnknown if manifest else BlobUnknown)
            log.info("%s@%s is cached for another repository; %s answered %d for this one: not served",
                     repo, digest, repo.upstream.key, reply.status)
            raise error
        self.cache.touch(str(digest), repo.upstream.key, repo.name)
        return reply.status

    # --- stats from the request layer

    def record(self, cache: str | None, nbytes: int, upstream: str | None = None) -> None:
        """Count a finished request by how it was served, in all and for its upstream
        (``upstream/<key>/requests_hit``...), in the index's lifetime counters."""
        if cache:
            kind = cache.lower()
            self.cache.count(f"requests_{kind}")
            self.cache.count(f"bytes_served_{kind}", nbytes)
            if upstream:
                self.cache.count(f"upstream/{upstream}/requests_{kind}")
                self.cache.count(f"upstream/{upstream}/bytes_served_{kind}", nbytes)

    # --- helpers

    @staticmethod
    async def _ask(call: Awaitable[T]) -> T:
        """Await an upstream call; no HTTP answer at all becomes 503 UNAVAILABLE."""
        try:
            return await call
        except UpstreamUnreachable as exc:
            raise Unavailable(f"the upstream is unreachable: {exc}") from None


# Everything below reads an untrusted upstream answer: whatever it holds, the result is a
# value that is safe to store and to send in a header, or None.

def _content_type(reply: Reply) -> str:
    return reply.headers.get("content-type", "").split(";", 1)[0].strip()


def _media_type(reply: Reply, document: dict[str, Any]) -> str:
    """A manifest's type: the Content-Type if it names a manifest type, else the manifest's own
    ``mediaType``, else any valid Content-Type, else OCI's."""
    content_type = _content_type(reply)
    if content_type in MANIFEST_TYPES:
        return content_type
    declared = document.get("mediaType")
    if valid_media_type(declared):
        return declared
    return _or_default(content_type)


def _filters_applied(reply: Reply) -> set[str]:
    """The filters the upstream says it applied (``OCI-Filters-Applied: artifactType``), lower case."""
    values = reply.headers.get_list("oci-filters-applied", split_commas=True)
    return {value.strip().lower() for value in values}


def _or_default(media_type: str | None) -> str:
    return media_type if valid_media_type(media_type) else OCI_MANIFEST


_MANIFEST_FIELDS = ("layers", "manifests", "config", "fsLayers", "blobs", "subject")


# artifact manifests, which have no schemaVersion (OCI 1.1's draft, ORAS's)
_ARTIFACT_TYPES = ("application/vnd.oci.artifact.manifest.v1+json", "application/vnd.cncf.oras.artifact.manifest.v1+json")


def _is_manifest(reply: Reply, document: dict[str, Any]) -> bool:
    """Whether a JSON object is an image manifest or index (of any version the registries serve):
    an artifact manifest's type, or a schemaVersion of 1 or 2 and a manifest type (its
    Content-Type or its own ``mediaType``) or a manifest's fields."""
    types = (_content_type(reply), document.get("mediaType"))
    if any(t in _ARTIFACT_TYPES for t in types):
        return True
    version = document.get("schemaVersion")
    if type(version) is not int or version not in (1, 2):
        return False
    return any(t in MANIFEST_TYPES for t in types) or any(name in document for name in _MANIFEST_FIELDS)


TAG_LIST_PARSED = 1024 * 1024   # a larger tag list is only looked at (parsing 15 MiB held the loop 0.4 s)
_JSON_OBJECT_START = re.compile(rb"\s*\{")


def _is_tag_list(body: bytes) -> bool:
    """Whether an answer is a tag list: a JSON object whose ``tags`` is a list of strings (or
    null); one over TAG_LIST_PARSED bytes, something that begins as a JSON object and has a
    ``"tags"`` (keys come in any order: GCR's begin with ``child`` and ``manifest``)."""
    if len(body) > TAG_LIST_PARSED:
        return _JSON_OBJECT_START.match(body) is not None and b'"tags"' in body
    document = _json_object(body)
    if document is None or "tags" not in document:
        return False
    tags = document["tags"]
    return tags is None or (isinstance(tags, list) and all(isinstance(tag, str) for tag in tags))


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):     # not JSON, not UTF-8, nested too deep
        return None
    return document if isinstance(document, dict) else None


def _claimed_digest(reply: Reply, algorithm: str) -> Digest | None:
    """The upstream's Docker-Content-Digest if it is a valid digest of this algorithm (the
    bytes are hashed here anyway; a malformed claim is ignored, a wrong one refused)."""
    try:
        claimed = Digest.parse(reply.headers.get("docker-content-digest", ""))
    except InvalidDigest:
        return None
    return claimed if claimed.algorithm == algorithm else None


def _length(reply: Reply) -> int | None:
    """The Content-Length if it is a plain decimal number (not ``+1``, ``²``, 5000 digits)."""
    return content_length(reply.headers)


def _as_shared(result: Answered, led: bool) -> Answered:
    """A single flight's result as each caller reports it: what the upstream sent for another
    caller's request is COALESCED (only the caller that asked it is MISS)."""
    if led or result.cache != MISS:
        return result
    return dataclasses.replace(result, cache=COALESCED)


def _manifest_length(reply: Reply) -> int | None:
    size = _length(reply)
    return size if size is not None and 0 < size <= MAX_MANIFEST_SIZE else None
