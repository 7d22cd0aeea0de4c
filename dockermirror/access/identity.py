"""Who a request comes from: a verified client certificate, an htpasswd user, or nobody.

``str(identity)`` is how rules and log lines name it: ``anonymous``, ``user:alice``,
``cert:<common name>``. A certificate's full subject is kept for the log (two certificates
may share a common name; the subject tells them apart).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

ANONYMOUS_KIND, USER, CERTIFICATE = "anonymous", "user", "certificate"
PREFIX = {USER: "user", CERTIFICATE: "cert"}
ANYONE, AUTHENTICATED = "*", "authenticated"     # how rules name everyone, and every user or certificate


@dataclass(frozen=True)
class Identity:
    kind: str                       # anonymous, user or certificate
    name: str = ""                  # the user name, or the certificate's common name
    subject: str | None = None      # a certificate's RFC 4514 subject
    # worked out once (rules and the request log ask for them on every request)
    text: str = field(init=False, repr=False, compare=False)
    # every identity of a rule that names this one: "*", "anonymous" or "authenticated", "user:*", "user:NAME"
    names: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind == ANONYMOUS_KIND:
            text, names = ANONYMOUS_KIND, frozenset((ANYONE, ANONYMOUS_KIND))
        else:
            prefix = PREFIX[self.kind]
            text = f"{prefix}:{self.name}"
            names = frozenset((ANYONE, AUTHENTICATED, f"{prefix}:*", text))
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "names", names)

    def __str__(self) -> str:
        return self.text

    @property
    def authenticated(self) -> bool:
        return self.kind != ANONYMOUS_KIND

    @classmethod
    def user(cls, name: str) -> Identity:
        return cls(USER, name)

    @classmethod
    def certificate(cls, info: dict[str, Any]) -> Identity:
        """From the TLS layer's ``scope["client_certificate"]`` (subject, cn, serial). A
        certificate without a common name is named by its subject."""
        subject = str(info.get("subject") or "")
        return _certificate(cls, str(info.get("cn") or subject), subject or None)

    @classmethod
    def parse(cls, text: str) -> Identity:
        """``anonymous``, ``user:NAME`` or ``cert:CN`` (as ``docker-mirror access check`` takes it)."""
        if text == ANONYMOUS_KIND:
            return ANONYMOUS
        kind, sep, name = text.partition(":")
        if sep and name and kind in ("user", "cert"):
            return cls(USER if kind == "user" else CERTIFICATE, name)
        raise ValueError(f"invalid identity {text!r}: expected anonymous, user:NAME or cert:COMMON-NAME")


@functools.lru_cache(maxsize=1024)     # every request on a connection names its certificate again
def _certificate(cls: type[Identity], name: str, subject: str | None) -> Identity:
    return cls(CERTIFICATE, name, subject)


ANONYMOUS = Identity(ANONYMOUS_KIND)
