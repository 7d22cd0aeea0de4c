"""The client certificate of a TLS connection, as the application sees it.

When the server asked for a client certificate (``tls.client_auth: optional`` or
``required``) and the client presented one that the handshake verified, every request on
that connection carries it in its ASGI scope::

    scope["client_certificate"] = {"subject": "CN=ci-runner,O=...", "cn": "ci-runner", "serial": "1f3a..."}

(absent when there is none). The subject is RFC 4514, the serial lowercase hex. A
certificate reaches this module only after OpenSSL verified it against ``tls.client_ca``
(and the CRL): an unverified one fails the handshake, so no connection is ever made.

With ``required``, a client that shows no certificate completes the handshake all the same (so
that it can be told why it is refused); every request on its connection then carries
``scope["client_certificate_required"] = True``, and the HTTP layer answers 401
(dockermirror/access/guard.py, ``Guard.admit``).
"""

from __future__ import annotations

import asyncio
import ssl
from functools import lru_cache
from typing import Any

SCOPE_KEY = "client_certificate"
OWED_KEY = "client_certificate_required"     # read by dockermirror/access/guard.py


def of_transport(transport: asyncio.BaseTransport) -> dict[str, str] | None:
    """The verified client certificate of a connection, or None (plain TCP, none asked or given)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    try:
        if ssl_object.context.verify_mode == ssl.CERT_NONE:
            return None      # not asked for: nothing the handshake verified
        der = ssl_object.getpeercert(binary_form=True)
    except (ValueError, AttributeError, ssl.SSLError):
        return None
    if not der:
        return None
    return dict(describe(der))


def owed(transport: asyncio.BaseTransport) -> bool:
    """Whether the connection's handshake ran under ``client_auth: required`` (the context of
    that reload says so: call this before :func:`after_handshake` hands it back)."""
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object is not None and getattr(ssl_object.context, "certificate_required", False) is True


def after_handshake(transport: asyncio.BaseTransport) -> dict[str, str] | None:
    """The connection's verified client certificate (see :func:`of_transport`); and the
    connection is handed back to the context the server listens with. During the handshake it
    used the one of the last reload (service/tls.py), whose message callback (it logs why a
    handshake is refused) would otherwise run for every record sent: about 40% of the
    encryption throughput. The listening context trusts no CA, so a renegotiation (refused
    anyway) could not bring in another certificate."""
    certificate = of_transport(transport)
    ssl_object = transport.get_extra_info("ssl_object")
    listening = transport.get_extra_info("sslcontext")
    if ssl_object is not None and isinstance(listening, ssl.SSLContext) and ssl_object.context is not listening:
        try:
            ssl_object.context = listening
        except (AttributeError, TypeError, ValueError):
            pass
    return certificate


@lru_cache(maxsize=256)
def describe(der: bytes) -> tuple[tuple[str, str], ...]:
    """Subject, common name and serial of a DER certificate (the same few clients reconnect:
    cached, so a connection costs no parse)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        return ()
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = names[0].value if names else ""
    return (("subject", certificate.subject.rfc4514_string()),
            ("cn", cn if isinstance(cn, str) else cn.decode("utf-8", "replace")),
            ("serial", f"{certificate.serial_number:x}"))


def attach(scope: dict[str, Any], certificate: dict[str, str] | None, owed: bool = False) -> None:
    """Put a connection's certificate in one request's scope (a copy: the app may not change
    what the next request on the connection sees); or, if it owes one, say so."""
    if certificate:
        scope[SCOPE_KEY] = dict(certificate)
    elif owed:
        scope[OWED_KEY] = True
