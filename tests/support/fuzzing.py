"""A seeded fuzzer of malformed HTTP requests for a running mirror, and what to check afterwards.

Shared by the test suite (tests/test_fuzz.py: a bounded run, tests/unit/test_fuzz_app.py: the
request-level cases in-process) and the longer runs under bench/ (bench/fuzz.py, bench/soak.py).

:func:`generate` turns a seed into a list of :class:`Case` (same seed, same list: a failure
replays with ``python -m bench.fuzz --seed N --only K``). Every case is a complete byte string
sent on a raw socket, so nothing between the fuzzer and the server tidies it up. Each case says
how its HTTP framing is meant to be judged:

* VALID: well-formed HTTP/1.1 (however hostile its path, headers or query). The server must
  answer every request in it with a complete status line and headers, never 500, never a
  traceback; 5xx only where the case allows it (none do: 502/503/504 are excused afterwards,
  and only if the upstream itself answered 5xx during the run; see :func:`judge`).
* INVALID: the framing itself is broken (bad Content-Length, smuggling shapes, garbage). The
  server may answer 4xx (or the 501/505 the case allows) and close, or close without an
  answer; it must never answer 2xx/3xx (that would be a parser accepting a smuggling shape)
  nor 500.
* LENIENT: a grey zone (bare LF, obs-fold, unknown methods, raw non-ASCII bytes in the
  target) where parsers legitimately differ: any answer below 500, or a close, is fine.
* PARTIAL: the client gives up early (half a request, closes at once, closes mid-body);
  nothing is expected but the server's own health afterwards (descriptors, index).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import re
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.images import ALL_MANIFESTS

VALID, INVALID, LENIENT, PARTIAL = "VALID", "INVALID", "LENIENT", "PARTIAL"

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
BODY_CAP = 256 * 1024       # the reader stops (and closes) after this many body bytes


# --- what the fuzzer aims at: content the mirror has cached (so a stray valid request changes nothing)


@dataclass
class Image:
    repo: str
    tag: str
    digest: str                                        # what the tag resolves to (with every Accept)
    media_type: str
    manifests: list[str] = field(default_factory=list)  # the top one and, for an index, each platform's
    blobs: dict[str, int] = field(default_factory=dict)  # digest -> size (configs and layers)


@dataclass
class Targets:
    images: list[Image]

    def blobs(self) -> list[tuple[str, str, int]]:
        return [(image.repo, digest, size) for image in self.images for digest, size in image.blobs.items()]


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pull(client: httpx.Client, repo: str, tag: str) -> Image:
    """Pull an image (every platform of an index) through the mirror; check every digest."""
    accept = [("Accept", a) for a in ALL_MANIFESTS]
    top = client.get(f"/v2/{repo}/manifests/{tag}", headers=accept)
    assert top.status_code == 200, f"{repo}:{tag}: {top.status_code} {top.text[:300]}"
    digest = top.headers["docker-content-digest"]
    assert _sha256(top.content) == digest, f"{repo}:{tag}: manifest bytes do not match {digest}"
    document = json.loads(top.content)
    media_type = top.headers["content-type"].split(";")[0]
    image = Image(repo, tag, digest, media_type, [digest])
    manifests = [document]
    if "manifests" in document:
        manifests = []
        for child in document["manifests"]:
            got = client.get(f"/v2/{repo}/manifests/{child['digest']}", headers=accept)
            assert got.status_code == 200 and _sha256(got.content) == child["digest"], \
                f"{repo}@{child['digest']}: {got.status_code}"
            image.manifests.append(child["digest"])
            manifests.append(json.loads(got.content))
    for manifest in manifests:
        for descriptor in [manifest["config"], *manifest["layers"]]:
            blob = client.get(f"/v2/{repo}/blobs/{descriptor['digest']}")
            assert blob.status_code == 200, f"{repo} blob {descriptor['digest']}: {blob.status_code}"
            assert _sha256(blob.content) == descriptor["digest"], f"{repo} blob {descriptor['digest']}: bad bytes"
            image.blobs[descriptor["digest"]] = len(blob.content)
    return image


def warm(base_url: str, images: Iterable[tuple[str, str]]) -> Targets:
    """Pull every image through the mirror so that everything the fuzzer names is cached."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        return Targets([pull(client, repo, tag) for repo, tag in images])


def pull_again(base_url: str, targets: Targets) -> list[str]:
    """After the fuzzing: the same pulls must give the same digests and verified bytes."""
    problems = []
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for image in targets.images:
            try:
                again = pull(client, image.repo, image.tag)
            except (AssertionError, httpx.HTTPError, KeyError, ValueError) as exc:
                problems.append(f"pull of {image.repo}:{image.tag} failed: {exc}")
                continue
            if again.digest != image.digest:
                problems.append(f"{image.repo}:{image.tag} now resolves to {again.digest} ({again.media_type}), "
                                f"was {image.digest} ({image.media_type})")
            elif again.blobs != image.blobs:
                problems.append(f"{image.repo}:{image.tag}: blobs differ from the first pull")
    return problems


# --- cases


@dataclass
class Case:
    number: int
    kind: str                 # the generator that made it
    what: str                 # one line for humans
    raw: bytes                # the bytes sent (for "sequential": the requests, split by parts)
    framing: str = VALID
    methods: list[str] = field(default_factory=lambda: ["GET"])   # one per request in raw (HEAD has no body)
    mode: str = "send"        # send | sequential | close-at-once | abort-mid-body
    parts: list[bytes] = field(default_factory=list)              # for "sequential"
    allow: frozenset[int] = frozenset()   # 5xx statuses that are a correct answer here (501, 505)
    expect: frozenset[int] = frozenset()  # if set: the statuses the spec wants for this request
    # the request as fields, when it is one well-formed request (the in-process variant replays these)
    method: str = ""
    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    @property
    def responses(self) -> int:
        return len(self.methods)


def render(method: str, target: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes = b"",
           version: bytes = b"HTTP/1.1", host: bool = True) -> bytes:
    lines = [method.encode("latin-1") + b" " + target + b" " + version]
    if host:
        lines.append(b"Host: 127.0.0.1")
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Generator:
    """Makes cases from a seed. Every choice goes through ``self.rng``."""

    def __init__(self, seed: int, targets: Targets, *, huge: int = 1024 * 1024) -> None:
        self.rng = random.Random(seed)
        self.targets = targets
        self.huge = huge            # the largest single header / target it sends, in bytes
        self.kinds: list[tuple[str, Callable[[], Case], int]] = [
            ("path", self.path, 14), ("reference", self.reference, 10), ("method", self.method, 6),
            ("accept", self.accept, 8), ("range", self.range_, 14), ("headers", self.headers_, 10),
            ("query", self.query, 12), ("framing", self.framing, 12), ("pipeline", self.pipeline, 5),
            ("session", self.session, 4), ("early-close", self.early_close, 5),
        ]

    # --- helpers

    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def image(self) -> Image:
        return self.pick(self.targets.images)

    def blob(self) -> tuple[str, str, int]:
        return self.pick(self.targets.blobs())

    def random_digest(self) -> str:
        return "sha256:" + self.rng.randbytes(32).hex()

    def valid_target(self) -> tuple[str, bytes]:
        """(method, target) of a request the mirror can answer from its cache."""
        image = self.image()
        choice = self.rng.randrange(5)
        if choice == 0:
            return "GET", f"/v2/{image.repo}/manifests/{image.tag}".encode()
        if choice == 1:
            return self.pick(["GET", "HEAD"]), f"/v2/{image.repo}/manifests/{self.pick(image.manifests)}".encode()
        if choice == 2:
            repo, digest, _ = self.blob()
            return self.pick(["GET", "HEAD"]), f"/v2/{repo}/blobs/{digest}".encode()
        if choice == 3:
            return "GET", f"/v2/{image.repo}/tags/list".encode()
        return "GET", b"/v2/"

    def case(self, kind: str, what: str, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
             **kwargs) -> Case:
        if not any(name.lower() == b"accept" for name, _ in headers) and b"/manifests/" in target:
            headers = [(b"Accept", ", ".join(ALL_MANIFESTS).encode()), *headers]
        body = kwargs.pop("body", b"")
        raw = render(method, target, headers, body, host=kwargs.pop("host", True))
        return Case(0, kind, what, raw, methods=[method], method=method, target=target, headers=headers, **kwargs)

    def make(self, count: int) -> list[Case]:
        weights = [w for _, _, w in self.kinds]
        cases = []
        for number in range(count):
            _, make, _ = self.rng.choices(self.kinds, weights)[0]
            case = make()
            case.number = number
            cases.append(case)
        return cases

    # --- paths

    def path(self) -> Case:
        image = self.image()
        repo, tag = image.repo, image.tag
        digest = self.pick(image.manifests)
        hexpart = digest.split(":")[1]
        n = self.rng.choice([130, 300, 2000, 5000, min(self.huge, 60000)])
        shapes: list[tuple[bytes, str]] = [
            (b"/v2/../../../../etc/passwd", VALID),
            (f"/v2/{repo}/blobs/../../../../etc/shadow".encode(), VALID),
            (f"/v2/{repo}/manifests/..%2f..%2f..%2f..%2fetc%2fpasswd".encode(), VALID),
            (b"/v2/%2e%2e/%2e%2e/%2e%2e/etc/passwd", VALID),
            (f"/v2/{repo}/blobs/sha256:..%2f..%2f..%2findex.sqlite".encode(), VALID),
            (f"/v2/{repo}/blobs/sha256%3a{hexpart}".encode(), VALID),
            (f"/v2/{repo}%2fmanifests%2f{tag}".encode(), VALID),
            (f"/v2/{repo}/manifests/{tag}%00".encode(), VALID),
            (f"/v2/{repo}/manifests/{tag}%0d%0aX-Injected:%201".encode(), VALID),
            (f"/v2/{repo}/manifests/%1b[31mred%1b[0m".encode(), VALID),
            (f"/v2/{repo}%00/manifests/{tag}".encode(), VALID),
            (f"/v2/{repo}%0d%0a/manifests/{tag}".encode(), VALID),
            (f"/v2//{repo}/manifests/{tag}".encode(), VALID),
            (f"/v2/./{repo}/manifests/{tag}".encode(), VALID),
            (f"/v2/{repo}/manifests/".encode(), VALID),
            (f"/v2/{repo}/manifests".encode(), VALID),
            (f"/v2/{repo}/blobs/".encode(), VALID),
            (f"/v2/{repo}/tags/list/".encode(), VALID),
            (f"/v2/{repo}/tags/list/extra".encode(), VALID),
            (f"/v2/{repo}/blobs/uploads/".encode(), VALID),
            (f"/v2/{repo}/blobs/uploads/1234?digest={digest}".encode(), VALID),
            (b"/v2/_catalog", VALID), (b"/v2/_catalog?n=1&last=a", VALID),
            (b"/v2", VALID), (b"/", VALID), (b"/v1/_ping", VALID), (b"//v2/", VALID), (b"/v2/%", VALID),
            (f"/v2/{repo}/manifests/{tag}/".encode(), VALID),
            (f"/v2/{repo}/manifests/{tag};x=1".encode(), VALID),
            (f"/v2/{repo}/manifests/{tag}#fragment".encode(), LENIENT),
            (b"/v2/%ZZ/manifests/latest", VALID), (b"/v2/%u002e%u002e/", VALID),
            (f"/v2/{repo}/manifests/{digest}%20".encode(), VALID),
            (b"/v2/" + b"a/" * n + b"manifests/latest", VALID),
            (b"/v2/" + b"a" * n + b"/blobs/" + digest.encode(), VALID),
            (b"/v2/" + b"%2e" * n + b"/tags/list", VALID),
            ("/v2/libräry/hello/manifests/latest".encode(), LENIENT),   # raw UTF-8 in the target
            (b"/v2/library/h\xffllo/manifests/latest", LENIENT),        # raw invalid UTF-8
            (b"/v2/libr%C3%A4ry/hello/manifests/latest", VALID),
            (b"/v2/%C0%AE%C0%AE/%C0%AE%C0%AE/etc/passwd", VALID),          # overlong UTF-8 dots
            (b"/v2/%FF%FE/manifests/latest", VALID),
            (b"/v2/library/%E2%80%AEolleh/manifests/latest", VALID),      # right-to-left override
            (b"/v2/library%EF%BC%8Fhello/manifests/latest", VALID),       # fullwidth solidus
            (b"/v2/%C4%B0/manifests/latest", VALID),                      # lower() makes it longer
            (b"/v2/library/hello/manifests/%F0%9F%90%B3", VALID),
            (f"/v2/{repo}/manifests/\x1b[31m{tag}".encode(), LENIENT),    # raw control characters
            (f"/v2/{repo}/manifests/{tag}\x7f".encode(), LENIENT),
            (f"/v2/{repo}/manifests/{tag}\x00".encode(), LENIENT),
            (f"/v2/{repo}/manifests/a\tb".encode(), LENIENT),
            (b"http://127.0.0.1/v2/", VALID),                             # absolute form
            (f"http://evil.example/v2/{repo}/manifests/{tag}".encode(), LENIENT),
            (b"*", LENIENT),
        ]
        target, framing = self.pick(shapes)
        method = "OPTIONS" if target == b"*" else self.pick(["GET", "GET", "HEAD"])
        return self.case("path", f"{method} {_show(target)}", method, target, [], framing=framing)

    # --- references: tags and digests

    def reference(self) -> Case:
        image = self.image()
        repo = image.repo
        hexpart = self.random_digest().split(":")[1]
        bad_digests = [
            "sha256:" + hexpart[:63], "sha256:" + hexpart + "0", "sha256:" + hexpart.upper(),
            "sha256:" + "g" * 64, "sha512:" + hexpart, "sha512:" + hexpart * 2, "md5:" + hexpart[:32],
            "sha256+x:" + hexpart, "sha256:", ":" + hexpart, "sha256::" + hexpart, "SHA256:" + hexpart,
            "sha256:" + "a" * 5000, "sha256:%00" + hexpart[3:], "sha256:" + hexpart[:60] + "%0a%0d",
            "sha256:" + hexpart[:63] + "%C3%A9", "sha256:" + hexpart + "/", "sha256:-" + hexpart[1:],
            self.random_digest(),                                    # well-formed, unknown
        ]
        bad_tags = ["-bad", "." + "a", "a" * 129, "a" * 5000, "latest%00", "lat%0Aest", "%C3%A9t%C3%A9",
                    "a:b", "a%3Ab", ".INVALID_MANIFEST_NAME", "_", "__", "..", "...", "latest%20", "%20",
                    "no-such-tag", "LATEST", "a" * 128]
        choice = self.rng.randrange(3)
        if choice == 0:
            reference = self.pick(bad_digests)
            target = f"/v2/{repo}/blobs/{reference}"
        elif choice == 1:
            reference = self.pick(bad_digests)
            target = f"/v2/{repo}/manifests/{reference}"
        else:
            reference = self.pick(bad_tags)
            target = f"/v2/{repo}/manifests/{reference}"
        method = self.pick(["GET", "HEAD"])
        expect = frozenset({404}) if reference == ".INVALID_MANIFEST_NAME" else frozenset()
        return self.case("reference", f"{method} {_show(target.encode())}", method, target.encode(), [],
                         expect=expect)

    # --- methods

    def method(self) -> Case:
        _, target = self.valid_target()
        if self.rng.random() < 0.2:
            target = f"/v2/{self.image().repo}/blobs/uploads/".encode()
        known = ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
        odd = ["TRACE", "PROPFIND", "MKCOL", "BREW", "get", "Get", "GE", "X" * 100, "X" * 10000, "CONNECT",
               "PURGE", "LINK", "SEARCH"]
        if self.rng.random() < 0.5:
            method, framing = self.pick(known), VALID
        else:
            method, framing = self.pick(odd), LENIENT
        body = self.rng.randbytes(self.rng.choice([0, 10, 5000]))
        headers = [(b"Content-Length", str(len(body)).encode()), (b"Content-Type", b"application/octet-stream")]
        expect = frozenset({405}) if framing == VALID and method != "OPTIONS" else frozenset()
        return self.case("method", f"{method[:20]} {_show(target)} with {len(body)} body bytes", method, target,
                         headers, body=body, framing=framing, expect=expect)

    # --- Accept

    def accept(self) -> Case:
        image = self.image()
        method = self.pick(["GET", "HEAD"])
        target = self.pick([f"/v2/{image.repo}/manifests/{image.tag}",
                            f"/v2/{image.repo}/manifests/{self.pick(image.manifests)}"]).encode()
        values = [
            b"application/vnd.oci.image.index.v1+json; q=\xfc",                   # latin-1
            "application/vnd.oci.image.index.v1+json; charset=ü".encode(),         # UTF-8
            b"\xff\xfe\xfd", b"\x80", "application/vnd.docker.distribution.manifest.v2+json😀".encode(),
            b"application/json, " * (self.rng.choice([5000, self.huge // 18])),
            b"*/*", b"", b",,,;;;", b"application/json;q=0", b"text/html",
            b"application/vnd.docker.distribution.manifest.v2+json",               # single-platform only
            b"application/vnd.oci.image.manifest.v1+json",
            b"APPLICATION/VND.OCI.IMAGE.INDEX.V1+JSON",
            b"application/vnd.oci.image.index.v1+json;" + b"a=b;" * 2000,
        ]
        if self.rng.random() < 0.15:
            headers = [(b"Accept", self.pick([b"application/json", b"*/*", b"x/y"])) for _ in range(2000)]
            what = "2000 Accept lines"
        else:
            value = self.pick(values)
            headers = [(b"Accept", value)]
            what = f"Accept: {_show(value)}"
        return self.case("accept", f"{method} {_show(target)} {what}", method, target, headers)

    # --- Range and If-Range

    def range_(self) -> Case:
        repo, digest, size = self.blob()
        method = self.pick(["GET", "GET", "GET", "HEAD"])
        digits = self.rng.choice([20, 4300, 4301, 5000, 20000])
        big = str(self.rng.randrange(1, 10)) + "".join(str(self.rng.randrange(10)) for _ in range(digits - 1))
        ranges = [
            "bytes=0-0", "bytes=-0", "bytes=0-", "bytes=-1", "bytes=1-0", f"bytes={size}-", f"bytes={size - 1}-",
            f"bytes=0-{size * 2}", f"bytes={big}-", f"bytes=0-{big}", f"bytes=-{big}", f"bytes={big}-{big}",
            "bytes=0-1,2-3", "bytes=0-1, -5", ",".join(["bytes=0-1"] + ["0-1"] * 1000), "bytes=--1",
            "bytes=0--1", "bytes= 1 - 2 ", "bytes=\xb2-", "bytes=\uff11-\uff12", "bytes=\u0663-", "BYTES=0-1",
            "bytes 0-1", "items=0-1", "bytes=0-1\x00", "", "bytes=", "bytes=-", "bytes=a-b", "bytes=0x10-",
            "bytes=1e3-", "bytes=+1-2", "bytes=0-1;q=1",
        ]
        value = self.pick(ranges)
        headers = [(b"Range", _encode(value))]
        if self.rng.random() < 0.2:
            headers.append((b"Range", b"bytes=5-9"))
        if self.rng.random() < 0.35:
            if_range = self.pick([f'"{digest}"', f'W/"{digest}"', '"bogus"', digest,
                                  "Wed, 21 Oct 2015 07:28:00 GMT", "\xe9t\xe9", "x" * 10000, "", f'"{big}"'])
            headers.append((b"If-Range", _encode(if_range)))
        target = f"/v2/{repo}/blobs/{digest}".encode()
        return self.case("range", f"{method} {_show(target)} " + "; ".join(
            f"{n.decode()}: {_show(v)}" for n, v in headers), method, target, headers)

    # --- other hostile headers

    def headers_(self) -> Case:
        method, target = self.valid_target()
        host = True
        choices: list[tuple[list[tuple[bytes, bytes]], str]] = [
            ([(b"Host", b"127.0.0.1")], VALID),                                      # a second Host
            ([(b"X-Forwarded-For", b"1.2.3.4\x7f")], LENIENT),
            ([(b"Authorization", b"Basic !!!")], VALID),
            ([(b"Authorization", b"Bearer " + b"a" * min(self.huge, 100000))], VALID),
            ([(b"Cookie", b"a=" + b"b" * min(self.huge, 200000))], VALID),
            ([(b"Connection", b"close")], VALID),
            ([(b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"websocket"),
              (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="), (b"Sec-WebSocket-Version", b"13")], LENIENT),
            ([(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c"),
              (b"HTTP2-Settings", b"AAMAAABkAAQAAP__")], LENIENT),
            ([(b"Expect", b"100-continue")], VALID),
            ([(b"Expect", b"garbage")], VALID),
            ([(b"TE", b"trailers")], VALID),
            ([(b"Accept-Encoding", b"gzip, br, zstd, \xff")], VALID),
            ([(b"Content-Type", b"\x01\x02")], LENIENT),
            ([(b"X-Header-%d" % i, b"v") for i in range(self.rng.choice([100, 3000]))], VALID),
            ([(b"X-Big", b"v" * self.huge)], VALID),
            ([(b"X-Folded", b"a"), (b" continued", b"b")], LENIENT),                  # obs-fold
            ([(b"Bad Header", b"x")], LENIENT),
            ([(b"X-Null", b"a\x00b")], LENIENT),
            ([(b"", b"empty name")], LENIENT),
            ([(b"X-Utf8", "ünïcödé ✓".encode())], VALID),
            ([(b"Via", b"1.1 evil"), (b"Forwarded", b"for=\"[::1]\";host=evil")], VALID),
        ]
        headers, framing = self.pick(choices)
        if self.rng.random() < 0.15:
            host = False
            if self.rng.random() < 0.5:
                headers = [(b"Host", self.pick([b"\xff", b"a" * 10000, b"[::1", b"evil.example", b""]))] + headers
        what = f"{method} {_show(target)} " + ("no Host; " if not host else "") + "; ".join(
            f"{_show(n, 20)}: {_show(v, 30)}" for n, v in headers[:3]) + (f" (+{len(headers) - 3})"
                                                                         if len(headers) > 3 else "")
        return self.case("headers", what, method, target, headers, framing=framing, host=host)

    # --- query strings

    def query(self) -> Case:
        image = self.image()
        repo = image.repo
        nss = ["docker.io%0A", "docker.io%0D%0A", "docker.io%0d%0aX-Evil:%201", "%00", "docker.io%00", "%E2%80%AE",
               "%C4%B0", "DOCKER.IO", "docker.io.", "quay.io", "", "%FF", "docker.io%09", "%1b[2J",
               "docker.io&ns=quay.io", "x" * min(self.huge, 100000), "%C3%A9", "docker.io%20", "index.docker.io",
               "doc%E2%84%AAer.io",                  # a Kelvin sign: lower() makes it docker.io
               "%E2%80%83docker.io",                 # an em space: strip() removes it
               "docker.io%C2%A0"]
        ns = "ns=" + self.pick(nss)
        ns_only = self.rng.random() < 0.5
        ns_targets = [f"/v2/{repo}/manifests/{image.tag}", f"/v2/{repo}/manifests/{self.pick(image.manifests)}",
                      f"/v2/{repo}/blobs/{self.pick(list(image.blobs))}", f"/v2/{repo}/tags/list"]
        if ns_only:
            target = f"{self.pick(ns_targets)}?{ns}"
        else:
            ns_values = ["n=%C2%B2", "n=%D9%A3", "n=-1", "n=0", "n=99999999999999999999", "n=" + "9" * 5000,
                         "n=1e3", "n=", "n=%00", "n=1&n=2", "n=%EF%BC%91", "last=%00", "last=%0A", "last=%0D%0A",
                         "last=%FF", "last=" + "z" * 5000, "last=%C3%A9", "last=", "n=1&last=%00", "%", "%zz=1",
                         "&&&=", "ns", "a=b;c=d", "n=2&last=" + image.tag]
            query = self.pick(ns_values)
            if self.rng.random() < 0.3:
                query += "&" + ns
            target = f"/v2/{repo}/tags/list?{query}"
        method = "GET" if "/tags/list" in target or "/blobs/" in target else self.pick(["GET", "HEAD"])
        return self.case("query", f"{method} {_show(target.encode())}", method, target.encode(), [])

    # --- framing: Content-Length, chunked, versions, line endings, garbage

    def framing(self) -> Case:
        method, target = self.valid_target()
        if method == "HEAD":
            method = "GET"
        head = method.encode() + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        m = [method]
        shapes: list[tuple[bytes, str, list[str], frozenset[int], str]] = [
            # (raw, framing, methods, allowed 5xx, description)
            (head + b"Content-Length: -1\r\n\r\n", INVALID, m, frozenset(), "Content-Length: -1"),
            (head + b"Content-Length: abc\r\n\r\n", INVALID, m, frozenset(), "Content-Length: abc"),
            (head + b"Content-Length: 1e3\r\n\r\n", INVALID, m, frozenset(), "Content-Length: 1e3"),
            (head + b"Content-Length: 99999999999999999999999\r\n\r\n", INVALID, m, frozenset(),
             "Content-Length: 23 digits"),
            (head + b"Content-Length: 5\r\n\r\nhello", VALID, m, frozenset(), "GET with a 5-byte body"),
            (head + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", INVALID, m, frozenset(),
             "two different Content-Length"),
            (head + b"Content-Length: 5, 5\r\n\r\nhello", LENIENT, m, frozenset(), "Content-Length: 5, 5"),
            (head + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n"
             b"Host: x\r\n\r\n", INVALID, m, frozenset({501}), "CL.TE smuggling"),
            (head + b"Transfer-Encoding: chunked\r\nContent-Length: 50\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n"
             b"Host: x\r\n\r\n", INVALID, m, frozenset({501}), "TE.CL smuggling"),
            (head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", VALID, m, frozenset(),
             "GET with a chunked body"),
            (head + b"Transfer-Encoding: chunked\r\n\r\n5;" + b"x" * 5000 + b"\r\nhello\r\n0\r\n\r\n", LENIENT, m,
             frozenset(), "chunk extension of 5000 bytes"),
            (head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", INVALID, m, frozenset(),
             "bad chunk size"),
            (head + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 5000 + b"\r\nhello\r\n0\r\n\r\n", INVALID, m,
             frozenset(), "chunk size of 5000 hex digits"),
            (head + b"Transfer-Encoding: chunked, gzip\r\n\r\n", INVALID, m, frozenset({501}),
             "Transfer-Encoding: chunked, gzip"),
            (head + b"Transfer-Encoding: xchunked\r\n\r\n", INVALID, m, frozenset({501}),
             "Transfer-Encoding: xchunked"),
            (head + b"Transfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", INVALID, m, frozenset({501}),
             "space before the colon"),
            (head + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n", INVALID, m,
             frozenset({501}), "two Transfer-Encoding"),
            (method.encode() + b" " + target + b" HTTP/1.0\r\n\r\n", VALID, m, frozenset(), "HTTP/1.0, no Host"),
            (method.encode() + b" " + target + b" HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", VALID, m, frozenset(),
             "HTTP/1.0 keep-alive"),
            (method.encode() + b" " + target + b"\r\n\r\n", LENIENT, m, frozenset(), "HTTP/0.9 request line"),
            (method.encode() + b" " + target + b" HTTP/2.0\r\nHost: x\r\n\r\n", LENIENT, m, frozenset({505}),
             "HTTP/2.0 in an HTTP/1 request line"),
            (method.encode() + b" " + target + b" HTTP/9.9\r\nHost: x\r\n\r\n", INVALID, m, frozenset({505}),
             "HTTP/9.9"),
            (method.encode() + b" " + target + b" HTTP/1.2\r\nHost: x\r\n\r\n", LENIENT, m, frozenset({505}),
             "HTTP/1.2"),
            (method.encode() + b" " + target + b" http/1.1\r\nHost: x\r\n\r\n", INVALID, m, frozenset({505}),
             "lowercase version"),
            (method.encode() + b" " + target + b" HTTP/1.1 extra\r\nHost: x\r\n\r\n", INVALID, m, frozenset(),
             "extra token after the version"),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", INVALID, m, frozenset({505}), "HTTP/2 preface"),
            (head.replace(b"\r\n", b"\n") + b"\n", LENIENT, m, frozenset(), "bare LF line endings"),
            (b"\r\n\r\n" + head + b"\r\n", LENIENT, m, frozenset(), "empty lines before the request"),
            (method.encode() + b"  " + target + b"  HTTP/1.1\r\nHost: x\r\n\r\n", LENIENT, m, frozenset(),
             "double spaces in the request line"),
            (method.encode() + b"\t" + target + b"\tHTTP/1.1\r\nHost: x\r\n\r\n", LENIENT, m, frozenset(),
             "tabs in the request line"),
            (self.rng.randbytes(1024), INVALID, m, frozenset({501, 505}), "1 KiB of random bytes"),
            (bytes.fromhex("16030100a5010000a10303") + self.rng.randbytes(160), INVALID, m, frozenset({501, 505}),
             "a TLS ClientHello on the plain port"),
            (b"GET /v2/\x00 HTTP/1.1\r\nHost: x\r\n\r\n", INVALID, m, frozenset(), "NUL in the request line"),
            (head + b"X: " + b"\x00" * 10 + b"\r\n\r\n", LENIENT, m, frozenset(), "NUL bytes in a header value"),
        ]
        raw, framing, methods, allow, what = self.pick(shapes)
        return Case(0, "framing", f"{_show(raw[:60])}... ({what})", raw, framing=framing, methods=methods,
                    allow=allow)

    # --- several requests on one connection

    def _small_request(self) -> tuple[str, bytes]:
        """A request whose answer is small (so a pipeline is not stuck behind a big body)."""
        image = self.image()
        method, target = self.pick([
            ("GET", b"/v2/"), ("HEAD", f"/v2/{image.repo}/manifests/{image.tag}".encode()),
            ("GET", f"/v2/{image.repo}/manifests/{self.pick(image.manifests)}".encode()),
            ("GET", f"/v2/{image.repo}/manifests/-bad".encode()), ("GET", b"/v2/nope/blobs/sha256:00"),
            ("HEAD", f"/v2/{self.blob()[0]}/blobs/{self.blob()[1]}".encode()),
            ("GET", f"/v2/{image.repo}/blobs/{self.blob()[1]}".encode()),
            ("DELETE", f"/v2/{image.repo}/manifests/{image.tag}".encode()),
        ])
        headers = [(b"Accept", ", ".join(ALL_MANIFESTS).encode())]
        if method == "GET" and b"/blobs/" in target:
            headers.append((b"Range", b"bytes=0-99"))
        return method, render(method, target, headers)

    def pipeline(self) -> Case:
        requests = [self._small_request() for _ in range(self.rng.randrange(2, 9))]
        methods = [method for method, _ in requests]
        raw = b"".join(data for _, data in requests)
        if self.rng.random() < 0.3:   # a broken one at the end: the earlier ones are still answered
            # RFC 9112 wants the earlier ones answered first; uvicorn answers 400 at once and closes
            # (nginx answers them all): lenient, as no container client pipelines
            return Case(0, "pipeline-garbage", f"{len(requests)} pipelined requests, then garbage",
                        raw + b"GARBAGE \x00\x01\r\n\r\n", framing=LENIENT, methods=methods)
        return Case(0, "pipeline", f"{len(requests)} pipelined requests: " + ", ".join(methods), raw,
                    framing=VALID, methods=methods)

    def session(self) -> Case:
        """Fuzzed requests one after the other on one kept-alive connection."""
        makers = [self.path, self.reference, self.accept, self.range_, self.query]
        cases = [self.pick(makers)() for _ in range(self.rng.randrange(2, 6))]
        cases = [c for c in cases if c.framing == VALID]
        if not cases:
            return self.session()
        return Case(0, "session", " | ".join(c.what[:60] for c in cases), b"", framing=VALID,
                    methods=[c.methods[0] for c in cases], mode="sequential", parts=[c.raw for c in cases],
                    expect=frozenset())

    # --- the client gives up

    def early_close(self) -> Case:
        method, target = self.valid_target()
        full = render(method, target, [(b"Accept", ", ".join(ALL_MANIFESTS).encode())])
        repo, digest, _ = max(self.targets.blobs(), key=lambda b: b[2])
        blob = render("GET", f"/v2/{repo}/blobs/{digest}".encode(), [])
        unknown = render("GET", f"/v2/{repo}/blobs/{self.random_digest()}".encode(), [])
        shapes = [
            (full[: self.rng.randrange(1, 12)], "close-at-once", "half a request line, then close"),
            (full[:-2], "close-at-once", "headers without the final CRLF, then close"),
            (full, "close-at-once", "a whole request, then close before reading"),
            (unknown, "close-at-once", "an uncached digest (upstream asked), then close at once"),
            (blob, "abort-mid-body", "the biggest cached blob, close after the first bytes of the body"),
            (render("GET", f"/v2/{repo}/blobs/{digest}?ns=docker.io".encode(), [(b"Range", b"bytes=1-")]),
             "abort-mid-body", "a range of the biggest cached blob, close mid-body"),
            (b"", "close-at-once", "connect, send nothing, close"),
        ]
        raw, mode, what = self.pick(shapes)
        return Case(0, "early-close", what, raw, framing=PARTIAL, mode=mode)


def generate(seed: int, count: int, targets: Targets, *, huge: int = 1024 * 1024) -> list[Case]:
    return Generator(seed, targets, huge=huge).make(count)


def _encode(text: str) -> bytes:
    """A header value as it goes on the wire: latin-1 where it fits, else UTF-8 bytes."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


def _show(data: bytes | str, limit: int = 100) -> str:
    text = repr(data if isinstance(data, bytes) else data.encode())[2:-1]
    return text if len(text) <= limit else f"{text[:limit]}...({len(data)} bytes)"


# --- sending


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes                # up to BODY_CAP bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass
class Outcome:
    answers: list[Answer] = field(default_factory=list)
    ended: str = "ok"          # ok | closed | reset | timeout | client-closed | refused
    seconds: float = 0.0

    @property
    def statuses(self) -> list[int]:
        return [a.status for a in self.answers]


class _Reader:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.buffer, self.deadline = sock, b"", deadline

    def _more(self) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buffer += data
        return True

    def until(self, marker: bytes, limit: int = 1 << 20) -> bytes | None:
        while marker not in self.buffer:
            if len(self.buffer) > limit or not self._more():
                return None
        data, _, self.buffer = self.buffer.partition(marker)
        return data

    def exactly(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            if not self._more():
                return None
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def answer(self, method: str, abort_body: bool = False) -> Answer | None:
        """One response; None if the connection closed before its headers were complete."""
        while True:
            head = self.until(b"\r\n\r\n")
            if head is None:
                return None
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise ValueError(f"not an HTTP status line: {lines[0]!r}")
            status = int(parts[1])
            headers = [tuple(s.strip() for s in line.split(":", 1)) for line in lines[1:] if ":" in line]
            if status == 100:
                continue
            answer = Answer(status, headers, b"")  # type: ignore[arg-type]
            break
        if abort_body or method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return answer
        if (answer.header("transfer-encoding") or "").lower() == "chunked":
            body = b""
            while True:
                size_line = self.until(b"\r\n")
                if size_line is None:
                    break
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    self.until(b"\r\n")
                    break
                chunk = self.exactly(size + 2)
                if chunk is None:
                    break
                body += chunk[:-2]
                if len(body) > BODY_CAP:
                    raise _TooBig(answer)
            answer.body = body
            return answer
        length = answer.header("content-length")
        if length is not None and length.isdigit():
            if int(length) > BODY_CAP:
                answer.body = self.exactly(min(len(self.buffer), BODY_CAP)) or b""
                raise _TooBig(answer)
            answer.body = self.exactly(int(length)) or b""
            return answer
        while self._more() and len(self.buffer) <= BODY_CAP:   # no length: the body ends with the connection
            pass
        answer.body, self.buffer = self.buffer, b""
        return answer


class _TooBig(Exception):
    def __init__(self, answer: Answer) -> None:
        self.answer = answer


def send(case: Case, host: str, port: int, timeout: float = 30.0) -> Outcome:
    """Send one case on a new connection and read what comes back (bounded by ``timeout``)."""
    outcome = Outcome()
    started = time.monotonic()
    deadline = started + timeout
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError:
        outcome.ended = "refused"
        return outcome
    try:
        reader = _Reader(sock, deadline)
        if case.mode == "close-at-once":
            if case.raw:
                sock.sendall(case.raw)
            outcome.ended = "client-closed"
            return outcome
        if case.mode == "abort-mid-body":
            sock.sendall(case.raw)
            answer = reader.answer("GET", abort_body=True)
            if answer is not None:
                outcome.answers.append(answer)
                with contextlib.suppress(OSError):
                    sock.settimeout(1.0)
                    sock.recv(1024)                          # the first bytes of the body, then close
            outcome.ended = "client-closed"
            return outcome
        chunks = case.parts if case.mode == "sequential" else [case.raw]
        methods = list(case.methods)
        for number, chunk in enumerate(chunks):
            try:
                sock.sendall(chunk)
            except OSError:
                if number == 0 and not outcome.answers:
                    raise
                outcome.ended = "closed"
                return outcome
            wanted = methods if case.mode == "send" else [methods[number]]
            for method in wanted:
                try:
                    answer = reader.answer(method)
                except _TooBig as big:
                    outcome.answers.append(big.answer)
                    outcome.ended = "client-closed"
                    return outcome
                if answer is None:
                    outcome.ended = "closed"
                    return outcome
                outcome.answers.append(answer)
                if (answer.header("connection") or "").lower() == "close":
                    outcome.ended = "ok" if len(outcome.answers) == len(methods) else "closed-as-announced"
                    return outcome
        return outcome
    except TimeoutError:
        outcome.ended = "timeout"
        return outcome
    except ConnectionResetError:
        outcome.ended = "reset"
        return outcome
    except (BrokenPipeError, ConnectionAbortedError):
        outcome.ended = "closed"
        return outcome
    except ValueError as exc:
        outcome.ended = f"garbled answer: {exc}"
        return outcome
    finally:
        outcome.seconds = time.monotonic() - started
        with contextlib.suppress(OSError):
            sock.close()


@dataclass
class Finding:
    case: Case
    outcome: Outcome
    problem: str

    def __str__(self) -> str:
        statuses = ",".join(map(str, self.outcome.statuses)) or "-"
        body = self.outcome.answers[0].body[:160] if self.outcome.answers else b""
        return (f"case {self.case.number} [{self.case.kind}/{self.case.framing}] {self.case.what}\n"
                f"    -> {self.problem} (statuses {statuses}, connection {self.outcome.ended}, "
                f"{self.outcome.seconds:.2f}s){' body ' + _show(body, 160) if body else ''}")


UPSTREAM_5XX = frozenset({502, 503, 504})


def judge(case: Case, outcome: Outcome) -> list[str]:
    """What is wrong with this answer to this case (see the module docstring for the rules)."""
    problems = []
    if outcome.ended == "refused":
        return ["the server refused the connection (is it still running?)"]
    for answer in outcome.answers:
        if b"Traceback" in answer.body or b'File "/' in answer.body:
            problems.append("a traceback in the response body")
        if answer.status >= 500 and answer.status not in case.allow:
            label = "upstream-5xx" if answer.status in UPSTREAM_5XX else "5xx"
            problems.append(f"{label}: answered {answer.status}")
    if case.framing == VALID:
        if outcome.ended == "timeout":
            problems.append(f"no answer within {outcome.seconds:.0f}s (hung)")
        elif not outcome.answers:
            problems.append(f"connection {outcome.ended} without an HTTP answer")
        elif len(outcome.answers) < case.responses and outcome.ended not in ("client-closed",
                                                                             "closed-as-announced"):
            problems.append(f"only {len(outcome.answers)} of {case.responses} requests answered, then "
                            f"connection {outcome.ended}")
        if case.expect and outcome.answers and outcome.answers[0].status not in case.expect:
            problems.append(f"the spec wants {'/'.join(map(str, sorted(case.expect)))}, "
                            f"answered {outcome.answers[0].status}")
    elif case.framing == INVALID:
        for answer in outcome.answers:
            if answer.status < 400:
                problems.append(f"accepted invalid framing: answered {answer.status}")
        if len(outcome.answers) > 1:
            problems.append(f"{len(outcome.answers)} answers to one invalid request (smuggled?)")
    return problems


@dataclass
class Run:
    cases: list[Case]
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            for status in outcome.statuses or [outcome.ended]:
                counts[str(status)] = counts.get(str(status), 0) + 1
        return dict(sorted(counts.items()))


def run(cases: list[Case], host: str, port: int, *, workers: int = 4, timeout: float = 30.0,
        progress: Callable[[int], None] | None = None) -> Run:
    """Send every case (``workers`` connections at a time) and judge each answer."""
    result = Run(cases)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fuzz") as pool:
        futures = {pool.submit(send, case, host, port, timeout): case for case in cases}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            case = futures[future]
            outcome = future.result()
            result.outcomes[case.number] = outcome
            result.findings += [Finding(case, outcome, problem) for problem in judge(case, outcome)]
            if progress is not None:
                progress(done)
    result.findings.sort(key=lambda f: f.case.number)
    result.seconds = time.monotonic() - started
    return result


# --- the server's health, before and after


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (bytes), threads and open descriptors of a process."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            values["rss"] = int(value.split()[0]) * 1024
        elif key == "Threads":
            values["threads"] = int(value)
    values["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return values


def _tcp_inodes(pid: int) -> dict[str, tuple[int, int, str]]:
    """socket inode -> (local port, remote port, state) for the process's network namespace."""
    states = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}
    found = {}
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                found[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16),
                                states.get(state, state))
    return found


def fd_census(pid: int, cache_dir: Path, port: int) -> dict[str, int | list[str]]:
    """The process's open descriptors by kind: cache content files (blobs/, tmp/), the index,
    client connections (on the mirror's port), other TCP sockets (the upstream pool), the rest;
    plus the cache files by name."""
    cache = str(cache_dir.resolve())
    sockets = _tcp_inodes(pid)
    census: dict[str, int | list[str]] = {"total": 0, "cache_files": 0, "index": 0, "clients": 0,
                                          "listening": 0, "upstream": 0, "other": 0, "open_cache_files": []}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        census["total"] += 1  # type: ignore[operator]
        if target.startswith(cache + "/blobs/") or target.startswith(cache + "/tmp/"):
            census["cache_files"] += 1  # type: ignore[operator]
            census["open_cache_files"].append(target.removeprefix(cache + "/"))  # type: ignore[union-attr]
        elif target.startswith(cache + "/"):
            census["index"] += 1  # type: ignore[operator]
        elif target.startswith("socket:["):
            info = sockets.get(target[8:-1])
            if info is None:
                census["other"] += 1  # type: ignore[operator]
            elif info[2] == "LISTEN":
                census["listening"] += 1  # type: ignore[operator]
            elif info[0] == port:
                census["clients"] += 1  # type: ignore[operator]
            else:
                census["upstream"] += 1  # type: ignore[operator]
        else:
            census["other"] += 1  # type: ignore[operator]
    return census


def settled_census(pid: int, cache_dir: Path, port: int, baseline: dict, timeout: float = 20.0) -> dict:
    """The census once client connections and cache files are back to the baseline, or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        census = fd_census(pid, cache_dir, port)
        if (census["clients"] <= baseline["clients"] and census["cache_files"] <= baseline["cache_files"]
                and census["other"] <= baseline["other"]) or time.monotonic() > deadline:
            return census
        time.sleep(0.2)


def census_problems(before: dict, after: dict, upstream_pool: int = 64) -> list[str]:
    problems = []
    if after["cache_files"] > before["cache_files"]:
        names = sorted(set(after["open_cache_files"]) - set(before["open_cache_files"]))
        problems.append(f"{after['cache_files'] - before['cache_files']} cache file descriptor(s) still open "
                        f"(leaked): {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    if after["clients"] > before["clients"]:
        problems.append(f"{after['clients'] - before['clients']} client connection(s) still open on the server "
                        "after every client closed")
    if after["other"] > before["other"]:
        problems.append(f"{after['other'] - before['other']} other descriptor(s) more than before")
    if after["upstream"] > max(before["upstream"], upstream_pool):
        problems.append(f"{after['upstream']} upstream sockets, more than the pool holds")
    if after["index"] != before["index"]:
        problems.append(f"index descriptors {before['index']} -> {after['index']}")
    return problems


def index_fingerprint(cache_dir: Path) -> dict[str, list[tuple]]:
    """What the index says is stored and what the tags point at (access times, freshness and counters
    left out: serving from the cache legitimately changes those)."""
    db = sqlite3.connect(f"file:{cache_dir / 'index.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return {
            "content": sorted(db.execute("SELECT digest, size, kind, media_type FROM content")),
            "tags": sorted(db.execute("SELECT upstream, repository, tag, digest, media_type, size FROM tags")),
        }
    finally:
        db.close()


def files_fingerprint(cache_dir: Path) -> dict[str, int]:
    found = {}
    for sub in ("blobs", "tmp"):
        for path in (cache_dir / sub).rglob("*"):
            with contextlib.suppress(FileNotFoundError):
                if path.is_file():
                    found[str(path.relative_to(cache_dir))] = path.stat().st_size
    return found


def fingerprint_changes(before: dict[str, list[tuple]], after: dict[str, list[tuple]],
                        added: list[str] | None = None) -> list[str]:
    """What was in the index before and is gone or different now. Rows only added go to ``added``
    (a fix may legitimately keep more, e.g. one tag row per kind of manifest; ``cache verify`` checks
    that what was added is sound)."""
    changes = []
    for table in before:
        gone = set(before[table]) - set(after[table])
        new = set(after[table]) - set(before[table])
        if table == "tags":
            for row in sorted(gone):
                now = [r for r in after[table] if r[:3] == row[:3]]
                name = f"tag {row[0]}/{row[1]}:{row[2]}"
                if not now:
                    changes.append(f"{name} deleted (was {row[3]}, {row[4]})")
                else:
                    changes.append(f"{name} changed from {row[3]} ({row[4]}) to "
                                   + ", ".join(f"{r[3]} ({r[4]})" for r in now))
            new = {row for row in new if not any(r[:3] == row[:3] for r in gone)}
        else:
            changes += [f"{table}: removed {row}" for row in sorted(gone)]
        if added is not None:
            added += [f"{table}: added {row}" for row in sorted(new)]
    return changes


def files_changes(before: dict[str, int], after: dict[str, int], added: list[str] | None = None) -> list[str]:
    """Cache files removed or resized; files only added go to ``added``."""
    changes = [f"file {name} removed" for name in sorted(set(before) - set(after))]
    for name in sorted(set(after) - set(before)):
        if name.startswith("tmp/"):
            changes.append(f"temporary file {name} left behind ({after[name]} bytes)")
        elif added is not None:
            added.append(f"file {name} added ({after[name]} bytes)")
    changes += [f"file {name} resized {before[name]} -> {after[name]}" for name in sorted(set(before) & set(after))
                if before[name] != after[name]]
    return changes


CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


def log_problems(log: bytes) -> dict[str, list[str]]:
    """Lines of the mirror's log worth a look: internal errors, ASGI exceptions, raw control characters."""
    found: dict[str, list[str]] = {"internal error": [], "exception": [], "control characters": [], "warning": []}
    for line in log.split(b"\n"):
        text = line.decode("utf-8", "replace")
        if b"internal error" in line:
            found["internal error"].append(text[:300])
        elif b"Exception in ASGI" in line or b"Traceback" in line:
            found["exception"].append(text[:300])
        elif b" WARNING " in line or b" ERROR " in line:
            found["warning"].append(text[:300])
        if CONTROL.search(line):
            found["control characters"].append(repr(line[:200]))
    return found


def upstream_5xx(registry_log: str, since: int = 0) -> list[str]:
    """Requests the upstream registry answered with 5xx (its access log, after line ``since``)."""
    found = []
    for line in registry_log.splitlines()[since:]:
        match = re.search(r'"(GET|HEAD) (\S+) HTTP/[\d.]+" (5\d\d) ', line)
        if match:
            found.append(f"{match.group(1)} {match.group(2)} -> {match.group(3)}")
    return found


def exceptions_in_log(log: bytes) -> list[str]:
    """The exception of each traceback in the mirror's log (its logging puts a traceback on one line,
    joined by " | "; the exception is the last part)."""
    found = []
    for line in log.decode("utf-8", "replace").splitlines():
        if "Traceback (most recent call last)" in line and "internal error on" not in line:
            found.append(line.rsplit(" | ", 1)[-1][:200])
    return found


# --- one whole fuzzing session against a running mirror process


@dataclass
class Report:
    seed: int
    run: Run
    count: int = 0                # cases generated (before --only / --kinds picked some)
    checks: dict[str, list[str]] = field(default_factory=dict)   # check -> what failed (empty: it held)
    notes: list[str] = field(default_factory=list)               # worth knowing, not failures

    def fail(self, check: str, message: str) -> None:
        self.checks.setdefault(check, []).append(message)

    @property
    def failures(self) -> list[str]:
        return [f"{check}: {message}" for check, messages in self.checks.items() for message in messages]

    def text(self, limit: int = 60) -> str:
        lines = [f"fuzz seed {self.seed}: {len(self.run.cases)} cases in {self.run.seconds:.1f}s; answers "
                 + ", ".join(f"{k} x{v}" for k, v in self.run.statuses().items())]
        by_problem: dict[str, list[Finding]] = {}
        for finding in self.run.findings:
            key = re.sub(r"\d+(\.\d+)?s\)", "", finding.problem)
            by_problem.setdefault(f"[{finding.case.kind}] {key}", []).append(finding)
        if by_problem:
            lines.append(f"{len(self.run.findings)} problem answers, by kind:")
            for key, findings in sorted(by_problem.items(), key=lambda kv: -len(kv[1])):
                lines.append(f"  {len(findings):5d} x {key}")
            lines.append("first examples of each:")
            shown = 0
            for key, findings in sorted(by_problem.items(), key=lambda kv: -len(kv[1])):
                for finding in findings[:2]:
                    if shown < limit:
                        lines.append("  " + str(finding).replace("\n", "\n  "))
                        shown += 1
        for check, messages in self.checks.items():
            if check in ("5xx", "unanswered", "invalid framing accepted", "spec"):
                lines.append(f"FAILED {check}: {len(messages)} case(s) (see above)")
            else:
                lines += [f"FAILED {check}: {message}" for message in messages]
        lines += [f"note: {note}" for note in self.notes]
        lines.append(f"replay one case: python -m bench.fuzz --seed {self.seed} --requests "
                     f"{self.count or len(self.run.cases)} --only NUMBER")
        return "\n".join(lines)


def fuzz_mirror(mirror, registry, targets: Targets, *, seed: int, count: int, workers: int = 4,
                huge: int = 1024 * 1024, only: set[int] | None = None, timeout: float = 30.0,
                progress: Callable[[int], None] | None = None, kinds: set[str] | None = None) -> Report:
    """Fuzz a running mirror process (tests.support.procs.Mirror) whose upstream is ``registry``
    (tests.support.procs.Registry) and whose cache holds ``targets``; check its health afterwards."""
    import subprocess
    import sys

    cases = generate(seed, count, targets, huge=huge)
    if only:
        cases = [case for case in cases if case.number in only]
    if kinds:
        cases = [case for case in cases if case.kind in kinds]
    time.sleep(1.5)                       # the access batch of the warm-up reaches the index
    census_before = fd_census(mirror.pid, mirror.cache_dir, mirror.port)
    index_before, files_before = index_fingerprint(mirror.cache_dir), files_fingerprint(mirror.cache_dir)
    status_before = proc_status(mirror.pid)
    log_offset = len(mirror.log_path.read_bytes())
    registry_mark = len(registry.log_text().splitlines())

    result = run(cases, "127.0.0.1", mirror.port, workers=workers, timeout=timeout, progress=progress)
    report = Report(seed, result, count)
    if not mirror.running():
        report.fail("process", f"the mirror process died (exit status {mirror.proc.returncode})")
        return report

    upstream_failures = upstream_5xx(registry.log_text(), registry_mark)
    excused = 0
    for finding in list(result.findings):
        if finding.problem.startswith("upstream-5xx") and upstream_failures:
            result.findings.remove(finding)
            excused += 1
    if excused:
        report.notes.append(f"{excused} answers 502/503/504 excused: the upstream answered 5xx "
                            f"{len(upstream_failures)} time(s): {upstream_failures[:3]}")
    for finding in result.findings:
        problem = finding.problem
        check = ("5xx" if "5xx" in problem or "traceback" in problem else
                 "invalid framing accepted" if "invalid" in problem or "smuggled" in problem else
                 "spec" if "spec wants" in problem else "unanswered")
        report.fail(check, f"case {finding.case.number}: {finding.case.what[:150]} -> {problem}")

    census_after = settled_census(mirror.pid, mirror.cache_dir, mirror.port, census_before)
    status_after = proc_status(mirror.pid)
    report.notes.append(f"descriptors {census_before['total']} -> {census_after['total']} (cache files "
                        f"{census_before['cache_files']} -> {census_after['cache_files']}, client sockets "
                        f"{census_before['clients']} -> {census_after['clients']}, upstream sockets "
                        f"{census_before['upstream']} -> {census_after['upstream']}); threads "
                        f"{status_before['threads']} -> {status_after['threads']}; RSS "
                        f"{status_before['rss'] >> 20} -> {status_after['rss'] >> 20} MiB")
    for problem in census_problems(census_before, census_after):
        report.fail("descriptors", problem)

    time.sleep(1.5)                       # accesses flushed, transfers of stray requests committed
    added: list[str] = []
    index_changes = fingerprint_changes(index_before, index_fingerprint(mirror.cache_dir), added)
    if index_changes:
        report.fail("index", "; ".join(index_changes[:10]))
    if added:
        report.notes.append(f"{len(added)} index rows added (allowed): {'; '.join(added[:5])}")
    files_added: list[str] = []
    file_changes = files_changes(files_before, files_fingerprint(mirror.cache_dir), files_added)
    if file_changes:
        report.fail("cache files", "; ".join(file_changes[:10]))
    if files_added:
        report.notes.append(f"{len(files_added)} cache files added (allowed): {'; '.join(files_added[:5])}")

    verify = subprocess.run([sys.executable, "-m", "dockermirror", "cache", "verify", "--config",
                             str(mirror.config_path)], capture_output=True, text=True, timeout=300)
    if verify.returncode != 0:
        report.fail("cache verify", f"exit status {verify.returncode}: "
                                    f"{(verify.stdout + verify.stderr).strip()[-500:]}")

    for problem in pull_again(mirror.url, targets):
        report.fail("pull", problem)

    log = mirror.log_path.read_bytes()[log_offset:]
    problems = log_problems(log)
    if problems["internal error"]:
        report.fail("log: internal errors", f"{len(problems['internal error'])} 'internal error' lines in the "
                                            f"mirror's log, e.g. {problems['internal error'][0]}")
    # (a pipeline that ends in garbage: uvicorn answers 400 at once and closes the transport under
    # the requests still being answered; their writes used to raise "the handler is closed")
    exceptions = exceptions_in_log(log)
    if exceptions:
        counted = {e: exceptions.count(e) for e in sorted(set(exceptions))}
        report.fail("log: exceptions", f"{len(exceptions)} tracebacks in the mirror's log outside the API's error "
                                       f"handler (uvicorn's 'Exception in ASGI application'): {counted}")
    if problems["control characters"]:
        report.fail("log: control characters", f"{len(problems['control characters'])} log lines with raw control "
                                               f"characters (a forged log line is possible), e.g. "
                                               f"{problems['control characters'][0]}")
    if not mirror.running():
        report.fail("process", "the mirror process died during the checks")
    return report
