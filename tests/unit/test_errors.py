"""How upstream answers become the errors a client sees, and how errors are rendered."""

from __future__ import annotations

import json

import httpx
import pytest

from dockermirror.api.responses import error_response
from dockermirror.errors import (
    BlobUnknown,
    Denied,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from dockermirror.upstream.client import error_for


def body(*errors: tuple[str, str]) -> bytes:
    return json.dumps({"errors": [{"code": c, "message": m} for c, m in errors]}).encode()


@pytest.mark.parametrize("status, payload, unknown, expected, code", [
    (404, b"", ManifestUnknown, ManifestUnknown, "MANIFEST_UNKNOWN"),
    (404, b"", BlobUnknown, BlobUnknown, "BLOB_UNKNOWN"),
    (404, body(("NAME_UNKNOWN", "repository name not known")), ManifestUnknown, NameUnknown, "NAME_UNKNOWN"),
    (401, b"", ManifestUnknown, Unauthorized, "UNAUTHORIZED"),
    (403, body(("DENIED", "requested access to the resource is denied")), ManifestUnknown, Denied, "DENIED"),
    (429, body(("TOOMANYREQUESTS", "pull rate limit")), ManifestUnknown, TooManyRequests, "TOOMANYREQUESTS"),
    (500, b"<html>oops</html>", ManifestUnknown, Unavailable, "UNAVAILABLE"),
    (503, b"", ManifestUnknown, Unavailable, "UNAVAILABLE"),
    (400, body(("MANIFEST_INVALID", "bad")), ManifestUnknown, RegistryError, "MANIFEST_INVALID"),
    (418, b"not json at all", ManifestUnknown, RegistryError, "UNKNOWN"),
])
def test_error_for(status, payload, unknown, expected, code):
    error = error_for(status, httpx.Headers(), payload, unknown=unknown)
    assert type(error) is expected
    assert error.code == code
    assert error.upstream_status == status
    if expected is RegistryError:
        assert error.status == status


def test_upstream_messages_are_kept_but_bounded():
    error = error_for(403, httpx.Headers(), body(("DENIED", "x" * 1000), ("DENIED", "second")))
    assert error.message.startswith("the upstream denied access: xxx")
    assert len(error.message) < 400


def test_rate_limit_passes_retry_after_on():
    error = error_for(429, httpx.Headers({"Retry-After": "30"}), b"")
    assert error.headers == {"Retry-After": "30"}


@pytest.mark.parametrize("payload", [b"[1, 2]", b'{"errors": "no"}', b'{"errors": [1, null, "x"]}', b"\xff\xfe"])
def test_malformed_upstream_error_bodies_do_not_break_the_mapping(payload):
    assert error_for(404, httpx.Headers(), payload).code == "MANIFEST_UNKNOWN"


def test_error_response_is_the_spec_format():
    error = NameUnknown("no such repository", detail={"name": "x/y"})
    response = error_response(error)
    assert response.status_code == 404
    assert json.loads(response.body) == {"errors": [{"code": "NAME_UNKNOWN", "message": "no such repository",
                                                     "detail": {"name": "x/y"}}]}
    assert response.headers["content-type"] == "application/json"


def test_error_response_to_head_has_headers_but_no_body():
    response = error_response(TooManyRequests("slow down", headers={"Retry-After": "5"}), head=True)
    assert response.body == b""
    assert response.status_code == 429 and response.headers["retry-after"] == "5"
    assert int(response.headers["content-length"]) > 0
