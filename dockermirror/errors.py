"""Registry errors with the distribution spec's codes.

The core raises these; the HTTP layer renders them as
``{"errors": [{"code": ..., "message": ..., "detail": ...}]}``.
"""

from __future__ import annotations

from typing import Any


class RegistryError(Exception):
    """An error a client should see, with its HTTP status and spec code."""

    status = 500
    code = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        detail: Any = None,
        status: int | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        upstream_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = headers or {}
        # what the upstream answered, for the request log
        self.upstream_status = upstream_status

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return {"errors": [error]}


class NameInvalid(RegistryError):
    status, code = 400, "NAME_INVALID"


class TagInvalid(RegistryError):
    status, code = 400, "TAG_INVALID"


class DigestInvalid(RegistryError):
    status, code = 400, "DIGEST_INVALID"


class ManifestInvalid(RegistryError):
    status, code = 400, "MANIFEST_INVALID"


class NameUnknown(RegistryError):
    status, code = 404, "NAME_UNKNOWN"


class ManifestUnknown(RegistryError):
    status, code = 404, "MANIFEST_UNKNOWN"


class BlobUnknown(RegistryError):
    status, code = 404, "BLOB_UNKNOWN"


class Unauthorized(RegistryError):
    status, code = 401, "UNAUTHORIZED"


class Denied(RegistryError):
    status, code = 403, "DENIED"


class Unsupported(RegistryError):
    status, code = 405, "UNSUPPORTED"


class TooManyRequests(RegistryError):
    status, code = 429, "TOOMANYREQUESTS"


class Unavailable(RegistryError):
    """The upstream cannot be reached and the cache does not hold the answer."""

    status, code = 503, "UNAVAILABLE"


class LoopDetected(RegistryError):
    """A request came back to the mirror that sent it (dockermirror/via.py): 508 Loop Detected,
    with UNAVAILABLE as its code (the spec has none for it). Not an upstream outage: nothing is
    marked down, nothing is retried or served stale for it; it is passed on as it is."""

    status, code = 508, "UNAVAILABLE"


class BadUpstreamContent(RegistryError):
    """The upstream sent bytes that do not match the digest asked for."""

    status, code = 502, "DIGEST_INVALID"
