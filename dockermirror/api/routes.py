"""The pull side of the OCI distribution API, over the mirror policy.

Every request is validated (method, name, reference, digest) before the mirror,
the cache or the upstream is touched; failures are answered in the spec's JSON
error format. The mirror is read-only: other methods get 405 UNSUPPORTED.
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

from dockermirror.api.ranges import ByteRange, RangeNotSatisfiable, parse_range
from dockermirror.api.responses import StreamResponse, error_response
from dockermirror.errors import (
    DigestInvalid,
    NameUnknown,
    RegistryError,
    TagInvalid,
    Unsupported,
)
from dockermirror.mirror import Blob, Mirror, Repo
from dockermirror.oci import OCTET_STREAM, Digest, InvalidDigest, valid_tag

log = logging.getLogger("dockermirror.api")

READ_METHODS = ("GET", "HEAD")
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

_UPLOADS = re.compile(r"(?P<name>.+)/blobs/uploads(?:/.*)?")
_MANIFEST = re.compile(r"(?P<name>.+)/manifests/(?P<reference>[^/]+)")
_BLOB = re.compile(r"(?P<name>.+)/blobs/(?P<digest>[^/]+)")
_TAGS = re.compile(r"(?P<name>.+)/tags/list")


def routes(mirror: Mirror) -> list[Route]:
    api = RegistryAPI(mirror)
    return [
        Route("/v2/", api.endpoint(api.version_check), methods=ALL_METHODS),
        Route("/v2/{path:path}", api.endpoint(api.dispatch), methods=ALL_METHODS),
    ]


def _digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except InvalidDigest as exc:
        raise DigestInvalid(str(exc), detail={"digest": text}) from None


class RegistryAPI:
    def __init__(self, mirror: Mirror) -> None:
        self.mirror = mirror

    def endpoint(self, handler: Callable[[Request], Awaitable[ASGIApp]]) -> Callable[[Request], Awaitable[ASGIApp]]:
        """Wrap a handler: read-only check, registry errors as JSON, no traceback to clients."""

        async def run(request: Request) -> ASGIApp:
            head = request.method == "HEAD"
            try:
                if request.method not in READ_METHODS:
                    raise Unsupported("this registry is a read-only mirror: pushes and deletes are not supported",
                                      headers={"Allow": "GET, HEAD"})
                return await handler(request)
            except RegistryError as exc:
                if exc.upstream_status is not None:
                    request.state.upstream = exc.upstream_status
                request.state.note = f"{exc.code}: {exc.message}"
                return error_response(exc, head=head)
            except Exception as exc:
                trace = " | ".join(line.strip() for line in traceback.format_exception(exc) if line.strip())
                log.error("internal error on %s %s: %s", request.method, request.url.path, trace)
                request.state.note = f"internal error: {type(exc).__name__}"
                return error_response(RegistryError("internal error, see the mirror's log"), head=head)

        return run

    async def version_check(self, request: Request) -> Response:
        return JSONResponse({})

    async def dispatch(self, request: Request) -> ASGIApp:
        path = request.path_params["path"]
        namespace = request.query_params.get("ns")
        if _UPLOADS.fullmatch(path):
            raise Unsupported("this registry is a read-only mirror: uploads are not supported")
        if match := _MANIFEST.fullmatch(path):
            repo = self.mirror.resolve(match["name"], namespace)
            return await self.manifest(request, repo, match["reference"])
        if match := _BLOB.fullmatch(path):
            digest = _digest(match["digest"])
            repo = self.mirror.resolve(match["name"], namespace)
            return await self.blob(request, repo, digest)
        if match := _TAGS.fullmatch(path):
            repo = self.mirror.resolve(match["name"], namespace)
            return await self.tags(request, repo)
        if path.endswith("/_catalog") or path == "_catalog":
            raise Unsupported("this mirror does not list repositories")
        raise NameUnknown("no such registry endpoint", detail={"path": "/v2/" + path})

    async def manifest(self, request: Request, repo: Repo, reference: str) -> Response:
        if ":" in reference:
            reference = str(_digest(reference))
        elif not valid_tag(reference):
            raise TagInvalid(f"invalid tag {reference!r}", detail={"tag": reference})
        accept = request.headers.getlist("accept")
        result = await self.mirror.manifest(repo, reference, accept, head=request.method == "HEAD")
        self._note(request, result.cache, result.upstream_status)
        headers = {
            "Docker-Content-Digest": result.digest,
            "ETag": f'"{result.digest}"',
            "Content-Length": str(result.size),
            **self._namespace_header(request),
        }
        return Response(result.body or b"", headers=headers, media_type=result.media_type)

    async def blob(self, request: Request, repo: Repo, digest: Digest) -> ASGIApp:
        head = request.method == "HEAD"
        result = await self.mirror.blob(repo, digest, head=head)
        self._note(request, result.cache, result.upstream_status)
        headers = [
            (b"content-type", (result.media_type or OCTET_STREAM).encode()),
            (b"docker-content-digest", result.digest.encode()),
            (b"etag", f'"{result.digest}"'.encode()),
            (b"cache-control", b"max-age=31536000, immutable"),
        ] + [(k.lower().encode(), v.encode()) for k, v in self._namespace_header(request).items()]
        size = result.size
        if size is not None:
            headers.append((b"accept-ranges", b"bytes"))
        if head or result.body is None:
            if size is not None:
                headers.append((b"content-length", str(size).encode()))
            return Response(b"", headers={k.decode(): v.decode() for k, v in headers})
        byte_range: ByteRange | None = None
        if size is not None and self._range_applies(request, result):
            try:
                byte_range = parse_range(request.headers.get("range"), size)
            except RangeNotSatisfiable:
                result.body.close()
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

    async def tags(self, request: Request, repo: Repo) -> Response:
        params = [(k, v) for k, v in request.query_params.multi_items() if k in ("n", "last")]
        for key, value in params:
            if key == "n" and not value.isdigit():
                raise RegistryError(f"invalid n={value!r}: expected a number", status=400,
                                    code="PAGINATION_NUMBER_INVALID")
        reply, cache = await self.mirror.tags(repo, params)
        if isinstance(reply, dict):
            self._note(request, cache, None)
            return JSONResponse(reply, headers=self._namespace_header(request))
        self._note(request, cache, reply.status)
        headers = {"Link": reply.headers["link"]} if "link" in reply.headers else {}
        headers.update(self._namespace_header(request))
        return Response(reply.body, headers=headers,
                        media_type=reply.headers.get("content-type", "application/json"))

    @staticmethod
    def _note(request: Request, cache: str, upstream_status: int | None) -> None:
        request.state.cache = cache
        if upstream_status is not None:
            request.state.upstream = upstream_status

    @staticmethod
    def _namespace_header(request: Request) -> dict[str, str]:
        """The spec's answer to ``?ns=``: say which namespace scoped the request."""
        namespace = request.query_params.get("ns")
        return {"OCI-Namespace": namespace} if namespace else {}

