"""The OCI distribution vocabulary: digests, repository names, tags, media types.

Everything here is pure and small; the grammars are the distribution spec's.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# --- grammars (https://github.com/opencontainers/distribution-spec/blob/main/spec.md)
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_MEDIA_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
MAX_NAME_LENGTH = 255

# Algorithms we can verify, with the length of their lowercase hex encoding.
_ALGORITHMS = {"sha256": 64, "sha512": 128}

# --- media types
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1)
LIST_TYPES = (OCI_INDEX, DOCKER_LIST)
# A client that names all of these gets a tag's manifest as the registry stores it; one that
# does not may get something else (Docker Hub and distribution pick the linux/amd64 manifest
# of a list for a client that takes no list, or answer 404).
_UNNEGOTIATED = frozenset({OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST})
AS_STORED = ""      # the accept class of those clients
OCTET_STREAM = "application/octet-stream"

# Manifests larger than this are refused (distribution uses the same bound).
MAX_MANIFEST_SIZE = 4 * 1024 * 1024


class InvalidDigest(ValueError):
    """A string that is not a digest we can verify."""


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest such as ``sha256:<64 hex>``."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        if not _DIGEST_RE.fullmatch(text):
            raise InvalidDigest(f"invalid digest {text!r}")
        algorithm, _, encoded = text.partition(":")
        length = _ALGORITHMS.get(algorithm)
        if length is None:
            raise InvalidDigest(f"unsupported digest algorithm {algorithm!r}")
        if len(encoded) != length or not all(c in "0123456789abcdef" for c in encoded):
            raise InvalidDigest(f"invalid {algorithm} digest {text!r}")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and _NAME_RE.fullmatch(name) is not None


def valid_tag(tag: str) -> bool:
    return _TAG_RE.fullmatch(tag) is not None


def accepted_types(accept_values: list[str]) -> set[str]:
    """The media types named by every ``Accept`` header line (parameters dropped)."""
    types = set()
    for value in accept_values:
        for item in value.split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if media_type:
                types.add(media_type)
    return types


def acceptable(media_type: str | None, accept_values: list[str]) -> bool:
    """Would a client that sent these ``Accept`` lines take a manifest of this type?

    No ``Accept`` at all means "anything" (registries answer with what they have).
    """
    if not accept_values:
        return True
    types = accepted_types(accept_values)
    return "*/*" in types or (media_type or "").lower() in types



def names(media_type: str | None, accept_values: list[str]) -> bool:
    """Does a client that sent these ``Accept`` lines name this type itself (not ``*/*``, not by
    sending none)?"""
    return (media_type or "").lower() in accepted_types(accept_values)


def accept_class(accept_values: list[str]) -> str:
    """What a registry's content negotiation makes of these ``Accept`` lines, as a short key.

    ``AS_STORED`` for a client that names every current manifest type (it gets the tag's own
    manifest); otherwise the manifest types it names, sorted (``*/*`` when it names none), so
    that at most ``2 ** len(MANIFEST_TYPES)`` keys exist whatever clients send.
    """
    named = accepted_types(accept_values).intersection(MANIFEST_TYPES)
    if named >= _UNNEGOTIATED:
        return AS_STORED
    return ",".join(sorted(named)) or "*/*"


def valid_media_type(value: object) -> bool:
    """A ``type/subtype`` (RFC 6838 names, no parameters) that is safe to send in a header."""
    return isinstance(value, str) and _MEDIA_TYPE_RE.fullmatch(value) is not None
