"""The pull side of the OCI distribution API, over the mirror policy.

Every request is validated (method, name, reference, digest, and every header and
query parameter that is read, forwarded or echoed) before the mirror, the cache or
the upstream is touched; failures are answered in the spec's JSON error format, with
a 4xx status for anything the client chose. The mirror is read-only: other methods
get 405 UNSUPPORTED. No response header carries a control character: a value we could
not send is refused before the response starts.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from dockermirror.access.guard import Guard
from dockermirror.access.identity import Identity
from dockermirror.access.rules import Rules
from dockermirror.api.links import next_page_link
from dockermirror.api.ranges import ByteRange, RangeNotSatisfiable, parse_range
from dockermirror.api.responses import StreamResponse, error_response, sendable
from dockermirror.errors import (
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RegistryError,
    TagInvalid,
    Unsupported,
)
from dockermirror.humanize import printable
from dockermirror.mirror import Blob, Mirror, Repo
from dockermirror.oci import OCI_INDEX, OCTET_STREAM, Digest, InvalidDigest, valid_media_type, valid_tag

log = logging.getLogger("dockermirror.api")

READ_METHODS = ("GET", "HEAD")

# DOTALL: a name with a newline is an invalid name (400), not an unknown endpoint
_UPLOADS = re.compile(r"(?P<name>.+)/blobs/uploads(?:/.*)?", re.DOTALL)
_MANIFEST = re.compile(r"(?P<name>.+)/manifests/(?P<reference>[^/]+)", re.DOTALL)
_BLOB = re.compile(r"(?P<name>.+)/blobs/(?P<digest>[^/]+)", re.DOTALL)
_TAGS = re.compile(r"(?P<name>.+)/tags/list", re.DOTALL)
_REFERRERS = re.compile(r"(?P<name>.+)/referrers/(?P<digest>[^/]+)", re.DOTALL)

# ?ns= (containerd): a registry host, optionally with a port; an IPv6 address in brackets
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAMESPACE = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?", re.ASCII)
# tags/list?n=: ASCII digits (str.isdigit() also takes "²"); larger pages are asked as MAX_PAGE
_PAGE_SIZE = re.compile(r"[0-9]{1,10}", re.ASCII)
MAX_PAGE = 10_000
# longest Accept line forwarded (clients send a few hundred bytes)
MAX_ACCEPT = 4096


class BadUpstreamHeader(RegistryError):
    """A header value from the upstream (or the cache) that cannot be sent to a client."""

    status = 502


def api_routes(api: RegistryAPI) -> list[Route]:
    return [any_method_route("/v2/", api.endpoint(api.version_check)),
            any_method_route("/v2/{path:path}", api.endpoint(api.dispatch))]


def any_method_route(path: str, endpoint: Callable[[Request], Awaitable[ASGIApp]]) -> Route:
    """A route for every method (the endpoint's read-only check answers 405 in the spec's JSON,
    where Starlette would answer a method it was not told about in plain text) that matches the
    whole path, newlines included: Starlette's patterns end in ``$`` (which matches before a final
    newline) and their ``.`` stops at a newline, so ``.../manifests/1.0%0A`` would be served as
    ``1.0``, and a name with a newline would get a plain-text 404 instead of an OCI error."""
    route = Route(path, endpoint)
    route.methods = None
    assert route.path_regex.pattern.endswith("$")
    route.path_regex = re.compile(route.path_regex.pattern[:-1] + r"\Z", re.DOTALL)
    return route


def _namespace(request: Request) -> str | None:
    """The ``ns`` query parameter, if any, once it is known to be a registry host name."""
    namespace = request.query_params.get("ns")
    if namespace is not None and (len(namespace) > 255 or not _NAMESPACE.fullmatch(namespace)):
        raise NameInvalid(f"invalid namespace {namespace!r}: expected a registry host name",
                          detail={"ns": namespace})
    return namespace


def _accept(request: Request) -> list[str]:
    """The ``Accept`` lines, forwarded upstream: so they must be plain ASCII, and are sent
    without the spaces around them (a field value may not begin or end with one) and without
    the empty ones."""
    values = request.headers.getlist("accept")
    for value in values:
        if not sendable(value) or len(value) > MAX_ACCEPT:
            raise Unsupported(f"invalid Accept header {_clip(value)!r}: media types are ASCII, at most "
                              f"{MAX_ACCEPT} bytes a line", status=400, detail={"accept": _clip(value)})
    return [stripped for value in values if (stripped := value.strip(" \t"))]


def _clip(text: str, limit: int = 200) -> str:
    """Client input quoted in an error: at most ``limit`` characters of it."""
    return text if len(text) <= limit else text[:limit] + "..."


def _header_list(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """Response headers, checked before the response exists. Client values were checked as they
    were read, so a value that cannot be sent came from the upstream (or the cache): 502."""
    encoded = []
    for name, value in headers.items():
        if not sendable(value):
            raise BadUpstreamHeader(f"the upstream's {name} cannot be forwarded: {value!r}")
        encoded.append((name.lower().encode(), value.encode("ascii")))
    return encoded


def _artifact_type(request: Request) -> str | None:
    """The referrers filter ``artifactType``, if any: one media type (it is forwarded)."""
    values = request.query_params.getlist("artifactType")
    if not values:
        return None
    if len(values) > 1 or not valid_media_type(values[0]):
        shown = _clip(", ".join(values))
        raise Unsupported(f"invalid artifactType {shown!r}: expected one media type", status=400,
                          detail={"artifactType": shown})
    return values[0]


def _peer(request: Request) -> str | None:
    """The TCP peer's address as the server gave it (``request.client`` builds an object for it)."""
    client = request.scope.get("client")
    return client[0] if client else None


def _digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except InvalidDigest as exc:
        raise DigestInvalid(str(exc), detail={"digest": text}) from None


class RegistryAPI:
    def __init__(self, mirror: Mirror, guard: Guard | None = None) -> None:
        self.mirror = mirror
        # who may pull what; replaced by a reload (a request keeps the one it started with)
        self.guard = guard if guard is not None else Guard(Rules((), mirror.upstreams.table))

    def endpoint(self, handler: Callable[[Request], Awaitable[ASGIApp]]) -> Callable[[Request], Awaitable[ASGIApp]]:
        """Wrap a handler: read-only check, registry errors as JSON, no traceback to clients."""

        async def run(request: Request) -> ASGIApp:
            head = request.method == "HEAD"
            try:
                if request.method not in READ_METHODS:
                    raise Unsupported("this registry is a read-only mirror: pushes and deletes are not supported",
                                      headers={"Allow": "GET, HEAD"})
                guard = request.state.guard = self.guard
                if guard.active:
                    request.state.identity = await guard.identify(request.scope, request.headers.get("authorization"))
                elif certificate := request.scope.get("client_certificate"):
                    request.state.identity = Identity.certificate(certificate)  # for the log
                return await handler(request)
            except RegistryError as exc:
                if exc.upstream_status is not None:
                    request.state.upstream_status = exc.upstream_status
                if (refused := getattr(exc, "refused", None)) is not None:    # e.g. no client certificate
                    request.state.refused = refused
                refusal = getattr(exc, "refusal", None)
                request.state.note = f"{exc.code}: {exc.message}" + (
                    f" (user {refusal.user!r})" if refusal is not None and refusal.user else "")
                return error_response(exc, head=head)
            except Exception as exc:
                trace = " | ".join(line.strip() for line in traceback.format_exception(exc) if line.strip())
                log.error("internal error on %s %s: %s", printable(request.method), printable(request.url.path),
                          printable(trace, quote=False))
                request.state.note = f"internal error: {type(exc).__name__}"
                return error_response(RegistryError("internal error, see the mirror's log"), head=head)

        return run

    async def version_check(self, request: Request) -> Response:
        guard: Guard = request.state.guard
        if guard.active:
            guard.ping(request.state.identity, _peer(request))
        return JSONResponse({})

    async def dispatch(self, request: Request) -> ASGIApp:
        path = request.path_params["path"]
        namespace = _namespace(request)
        if _UPLOADS.fullmatch(path):
            raise Unsupported("this registry is a read-only mirror: uploads are not supported")
        state = request.state
        if match := _MANIFEST.fullmatch(path):
            state.kind, state.reference = "manifest", match["reference"]
            repo = self._resolve(request, match["name"], namespace)
            return await self.manifest(request, repo, match["reference"])
        if match := _BLOB.fullmatch(path):
            state.kind, state.reference = "blob", match["digest"]
            digest = _digest(match["digest"])
            repo = self._resolve(request, match["name"], namespace)
            return await self.blob(request, repo, digest)
        if match := _TAGS.fullmatch(path):
            state.kind = "tags"
            repo = self._resolve(request, match["name"], namespace)
            return await self.tags(request, repo, match["name"])
        if match := _REFERRERS.fullmatch(path):
            state.kind, state.reference = "referrers", match["digest"]
            digest = _digest(match["digest"])
            artifact_type = _artifact_type(request)
            repo = self._resolve(request, match["name"], namespace)
            return await self.referrers(request, repo, digest, artifact_type)
        if path.endswith("/_catalog") or path == "_catalog":
            raise Unsupported("this mirror does not list repositories")
        raise NameUnknown("no such registry endpoint", detail={"path": "/v2/" + path})

    def _resolve(self, request: Request, name: str, namespace: str | None) -> Repo:
        repo = self.mirror.resolve(name, namespace)
        request.state.upstream = repo.upstream.key      # for the request log and the counters
        request.state.repository = repo.name
        guard: Guard = request.state.guard
        if guard.active:    # before anything touches the cache or the upstream
            guard.check(request.state.identity, _peer(request), repo.upstream.key, repo.name)
        return repo

    async def manifest(self, request: Request, repo: Repo, reference: str) -> Response:
        if ":" in reference:
            reference = str(_digest(reference))
        elif not valid_tag(reference):
            # neither a tag nor a digest: no such manifest can exist (OCI conformance wants 404)
            raise ManifestUnknown(f"no manifest can be named {reference!r}: it is neither a tag nor a digest",
                                  detail={"reference": reference})
        accept = _accept(request)
        result = await self.mirror.manifest(repo, reference, accept, head=request.method == "HEAD")
        self._note(request, result.cache, result.upstream_status, result.digest)
        headers = _header_list({
            "Content-Type": result.media_type,
            "Docker-Content-Digest": result.digest,
            "ETag": f'"{result.digest}"',
            "Content-Length": str(result.size),
            **self._namespace_header(request),
        })
        response = Response(result.body or b"")
        response.raw_headers = headers
        return response

    async def blob(self, request: Request, repo: Repo, digest: Digest) -> ASGIApp:
        head = request.method == "HEAD"
        result = await self.mirror.blob(repo, digest, head=head)
        # From here the body (an open cache file and its lease, or a reader of a transfer) is
        # ours: it goes to the StreamResponse, which closes it, or it is closed here.
        try:
            return self._blob_response(request, result, head=head)
        except BaseException:
            if result.body is not None:
                result.body.close()
            raise

    def _blob_response(self, request: Request, result: Blob, *, head: bool) -> ASGIApp:
        self._note(request, result.cache, result.upstream_status, result.digest)
        headers = _header_list({
            "Content-Type": result.media_type or OCTET_STREAM,
            "Docker-Content-Digest": result.digest,
            "ETag": f'"{result.digest}"',
            "Cache-Control": "max-age=31536000, immutable",
            **self._namespace_header(request),
        })
        size = result.size
        if size is not None:
            headers.append((b"accept-ranges", b"bytes"))
        if head or result.body is None:
            if size is not None:
                headers.append((b"content-length", str(size).encode()))
            if result.body is not None:
                result.body.close()
            response = Response(b"")
            response.raw_headers = headers
            return response
        byte_range: ByteRange | None = None
        if size is not None and self._range_applies(request, result):
            try:
                byte_range = parse_range(request.headers.get("range"), size)
            except RangeNotSatisfiable:
                raise RegistryError(f"range not satisfiable for a blob of {size} bytes", status=416,
                                    code="RANGE_INVALID", headers={"Content-Range": f"bytes */{size}"}) from None
        if byte_range is not None:
            headers += [(b"content-range", byte_range.content_range(size).encode()),
                        (b"content-length", str(byte_range.length).encode())]
            return StreamResponse(result.body, status=206, headers=headers,
                                  start=byte_range.start, end=byte_range.end)
        if size is not None:
            headers.append((b"content-length", str(size).encode()))
        return StreamResponse(result.body, status=200, headers=headers)

    @staticmethod
    def _range_applies(request: Request, result: Blob) -> bool:
        """``If-Range`` with another validator means: send it all."""
        if_range = request.headers.get("if-range")
        return if_range is None or if_range.strip('"') == result.digest

    async def tags(self, request: Request, repo: Repo, name: str) -> Response:
        params = []
        n = request.query_params.get("n")
        if n is not None:
            if not _PAGE_SIZE.fullmatch(n):
                raise RegistryError(f"invalid n={n!r}: expected a number", status=400,
                                    code="PAGINATION_NUMBER_INVALID", detail={"n": n})
            params.append(("n", str(min(int(n), MAX_PAGE))))
        last = request.query_params.get("last")
        if last:  # the tag the previous page ended with
            if not valid_tag(last):
                raise TagInvalid(f"invalid last={last!r}: expected a tag", detail={"last": last})
            params.append(("last", last))
        reply, cache = await self.mirror.tags(repo, params)
        if isinstance(reply, dict):
            self._note(request, cache, None)
            return JSONResponse(reply, headers=self._namespace_header(request))
        self._note(request, cache, reply.status)
        headers = {"Content-Type": reply.headers.get("content-type", "application/json")}
        if "link" in reply.headers:
            link = reply.headers["link"]
            # the next page by the client's own name for the repository (one that cannot be
            # sent at all is refused below, as any upstream header is)
            link = next_page_link(link, name, _namespace(request)) if sendable(link) else link
            if link is not None:
                headers["Link"] = link
        headers.update(self._namespace_header(request))
        response = Response(reply.body)
        response.raw_headers = [*_header_list(headers), (b"content-length", str(len(reply.body)).encode())]
        return response

    async def referrers(self, request: Request, repo: Repo, subject: Digest, artifact_type: str | None) -> Response:
        result = await self.mirror.referrers(repo, subject, artifact_type, head=request.method == "HEAD")
        self._note(request, result.cache, result.upstream_status)
        headers = _header_list({
            "Content-Type": OCI_INDEX,
            "Content-Length": str(result.size),
            **({"OCI-Filters-Applied": "artifactType"} if result.filtered else {}),
            **self._namespace_header(request),
        })
        response = Response(result.body or b"")
        response.raw_headers = headers
        return response

    @staticmethod
    def _note(request: Request, cache: str, upstream_status: int | None, digest: str | None = None) -> None:
        """For the request log: how the cache answered, the upstream's status, the digest served."""
        request.state.cache = cache
        if digest is not None:
            request.state.digest = digest
        if upstream_status is not None:
            request.state.upstream_status = upstream_status

    @staticmethod
    def _namespace_header(request: Request) -> dict[str, str]:
        """The spec's answer to ``?ns=``: say which namespace scoped the request (checked by
        dispatch before anything else)."""
        namespace = _namespace(request)
        return {"OCI-Namespace": namespace} if namespace else {}

