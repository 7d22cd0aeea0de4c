"""The client certificate of a TLS connection, as the application sees it.

When the server asked for a client certificate (``tls.client_auth: optional`` or
``required``) and the client presented one that the handshake verified, every request on
that connection carries it in its ASGI scope::

    scope["client_certificate"] = {"subject": "CN=ci-runner,O=...", "cn": "ci-runner", "serial": "1f3a..."}

(absent when there is none). The subject is RFC 4514, the serial lowercase hex. A
certificate reaches this module only after OpenSSL verified it against ``tls.client_ca``
(and the CRL): an unverified one fails the handshake, so no connection is ever made.

Every request re-checks its connection's certificate against the trust in force now
(service/clienttrust.py: the client CAs and the CRL of the last reload), as a new connection
with it would be checked: a certificate revoked since, no longer issued by a client CA, or
expired since, is not put in the scope; the request carries instead
``scope["client_certificate_refused"] = {"reason": "revoked" | "untrusted" | "expired",
"subject": ..., "serial": ...}`` and the HTTP layer refuses it (401, and the connection is
closed: dockermirror/access/guard.py, ``Guard.admit``), whatever ``client_auth`` is: a refused
certificate never falls back to anonymous. After a reload to ``client_auth: none`` the
certificate is simply not used (the request is anonymous, as a new connection's would be).

With ``required``, a client that shows no certificate completes the handshake all the same (so
that it can be told why it is refused); every request on its connection then carries
``scope["client_certificate_required"] = True``, and the HTTP layer answers 401
(dockermirror/access/guard.py, ``Guard.admit``).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # cryptography is imported only with TLS (about 14 MB)
    from dockermirror.service.clienttrust import ClientTrust, Presented

SCOPE_KEY = "client_certificate"
OWED_KEY = "client_certificate_required"     # read by dockermirror/access/guard.py
REFUSED_KEY = "client_certificate_refused"   # read by dockermirror/access/guard.py
# what the trust in force says of a connection's certificate (service/clienttrust.py)
UNUSED, REVOKED, UNTRUSTED, EXPIRED = "unused", "revoked", "untrusted", "expired"


def _verified_der(transport: asyncio.BaseTransport) -> bytes | None:
    """The DER of the client certificate the handshake verified, or None."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    try:
        if ssl_object.context.verify_mode == ssl.CERT_NONE:
            return None      # not asked for: nothing the handshake verified
        der = ssl_object.getpeercert(binary_form=True)
    except (ValueError, AttributeError, ssl.SSLError):
        return None
    return der or None


def of_transport(transport: asyncio.BaseTransport) -> dict[str, str] | None:
    """The verified client certificate of a connection, or None (plain TCP, none asked or given)."""
    der = _verified_der(transport)
    return dict(describe(der)) if der else None


def owed(transport: asyncio.BaseTransport) -> bool:
    """Whether the connection's handshake ran under ``client_auth: required`` (the context of
    that reload says so: call this before :func:`after_handshake` hands it back)."""
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object is not None and getattr(ssl_object.context, "certificate_required", False) is True


def _hand_back(transport: asyncio.BaseTransport) -> None:
    """Hand the connection back to the context the server listens with. During the handshake
    it used the one of the last reload (service/tls.py), whose message callback (it logs why a
    handshake is refused) would otherwise run for every record sent: about 40% of the
    encryption throughput. The listening context trusts no CA, so a renegotiation (refused
    anyway) could not bring in another certificate."""
    ssl_object = transport.get_extra_info("ssl_object")
    listening = transport.get_extra_info("sslcontext")
    if ssl_object is not None and isinstance(listening, ssl.SSLContext) and ssl_object.context is not listening:
        try:
            ssl_object.context = listening
        except (AttributeError, TypeError, ValueError):
            pass


def after_handshake(transport: asyncio.BaseTransport) -> dict[str, str] | None:
    """The connection's verified client certificate (see :func:`of_transport`); and the
    connection is handed back to the context the server listens with."""
    certificate = of_transport(transport)
    _hand_back(transport)
    return certificate


@lru_cache(maxsize=256)
def presented(der: bytes) -> Presented | None:
    """A DER certificate, parsed once (the same few clients reconnect: a connection costs no parse)."""
    from dockermirror.service.clienttrust import Presented

    return Presented.of(der)


def describe(der: bytes) -> tuple[tuple[str, str], ...]:
    """Subject, common name and serial of a DER certificate (cached)."""
    certificate = presented(der)
    return certificate.info if certificate is not None else ()


class ConnectionCertificate:
    """One connection's client certificate, put in each of its requests' scope after a check
    against the trust in force (``client_trust`` of the listening context, which service/tls.py
    replaces on every reload). The verdict is kept with the trust it came from: a request costs
    an identity comparison and a clock read (for a certificate that expires while in use)."""

    __slots__ = ("owed", "presented", "_listening", "_trust", "_verdict")

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        # verified in the handshake, which is over by now
        self.owed = owed(transport)
        der = _verified_der(transport)
        _hand_back(transport)
        self.presented = presented(der) if der else None
        self._listening = transport.get_extra_info("sslcontext")
        self._trust: ClientTrust | None = None
        self._verdict: str | None = None

    def verdict(self) -> str | None:
        """What the trust in force says of the certificate (None: trusted, or no trust to ask)."""
        certificate = self.presented
        assert certificate is not None
        trust = getattr(self._listening, "client_trust", None)
        if trust is not self._trust:
            self._trust = trust
            self._verdict = trust.refusal(certificate) if trust is not None else None
        if self._verdict is None and time.time() >= certificate.not_after:
            return EXPIRED
        return self._verdict

    def attach(self, scope: dict[str, Any]) -> None:
        certificate = self.presented
        if certificate is None:
            attach(scope, None, self.owed)
            return
        verdict = self.verdict()
        if verdict is None:
            attach(scope, dict(certificate.info))
        elif verdict == UNUSED:
            attach(scope, None)
        else:
            attach(scope, None, refused={"reason": verdict, **dict(certificate.info)})


def attach(scope: dict[str, Any], certificate: dict[str, str] | None, owed: bool = False,
           refused: dict[str, str] | None = None) -> None:
    """Put a connection's certificate in one request's scope (a copy: the app may not change
    what the next request on the connection sees); or, if it owes one, say so; or, if the
    certificate is refused now, why."""
    if refused:
        scope[REFUSED_KEY] = dict(refused)
    elif certificate:
        scope[SCOPE_KEY] = dict(certificate)
    elif owed:
        scope[OWED_KEY] = True
