"""Which client certificates the server trusts now: the client CAs and the revoked certificates
of the last (re)load, against which every request re-checks its connection's certificate.

OpenSSL checks a client certificate once, in the handshake, and a keep-alive connection may
then ask for as long as it keeps asking; a revocation or another client CA loaded by a reload
would never reach it. And OpenSSL copies the CRL check flag into a connection when it accepts
it: one accepted while no CRL was in force and whose ClientHello came after the first CRL was
loaded is verified without the CRL. So service/tls.py builds a :class:`ClientTrust` on every
(re)load, and each request (service/clientcert.py) asks it about its connection's certificate,
which gets what a new connection with that certificate would get now:

* ``None``: trusted, the request carries the certificate;
* ``UNUSED``: client certificates are no longer asked for (``client_auth: none``): the request
  goes on as one without a certificate (anonymous), as a new connection's would;
* ``REVOKED``, ``UNTRUSTED`` (its issuer is not a client CA any more), ``EXPIRED``: refused, as a
  new connection's handshake would be (a refused certificate never falls back to anonymous).

A connection asks once per reload (its verdict is kept with the trust it came from); a request
then costs an identity comparison and a clock read. The certificate's issuer must be a CA of
``tls.client_ca`` itself (what ``cert client`` issues; put an intermediate CA in that file).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from dockermirror.service.clientcert import EXPIRED, REVOKED, UNTRUSTED, UNUSED

__all__ = ["EXPIRED", "REVOKED", "UNTRUSTED", "UNUSED", "ClientTrust", "Presented"]
_REMEMBERED = 4096      # certificates whose signer a trust remembers (a few clients reconnect often)


@dataclass(frozen=True, eq=False)
class Presented:
    """A verified client certificate, as requests check it (made once per certificate)."""

    info: tuple[tuple[str, str], ...]   # subject, cn, serial: what the request's scope gets
    der: bytes
    certificate: x509.Certificate
    issuer: bytes                       # the issuer's name, DER
    serial: int
    not_after: float                    # POSIX time

    @classmethod
    def of(cls, der: bytes) -> Presented | None:
        from cryptography.x509.oid import NameOID

        try:
            certificate = x509.load_der_x509_certificate(der)
        except ValueError:
            return None
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = names[0].value if names else ""
        info = (("subject", certificate.subject.rfc4514_string()),
                ("cn", cn if isinstance(cn, str) else cn.decode("utf-8", "replace")),
                ("serial", f"{certificate.serial_number:x}"))
        return cls(info, der, certificate, certificate.issuer.public_bytes(), certificate.serial_number,
                   certificate.not_valid_after_utc.timestamp())


class ClientTrust:
    """The client CAs and revoked (issuer, serial) pairs in force; immutable once made."""

    def __init__(self, mode: str, cas: Sequence[x509.Certificate] = (),
                 revoked: Iterable[tuple[bytes, int]] = ()) -> None:
        self.mode = mode
        self.cas: dict[bytes, list[x509.Certificate]] = {}
        for ca in cas:
            self.cas.setdefault(ca.subject.public_bytes(), []).append(ca)
        self.revoked = frozenset(revoked)
        self._signed: dict[bytes, bool] = {}

    @classmethod
    def of(cls, mode: str, cas: Sequence[x509.Certificate],
           crls: Iterable[x509.CertificateRevocationList] = ()) -> ClientTrust:
        return cls(mode, cas, ((crl.issuer.public_bytes(), entry.serial_number) for crl in crls for entry in crl))

    def refusal(self, presented: Presented) -> str | None:
        """Why a request on a connection with this certificate is refused now (or UNUSED); None: trusted."""
        if self.mode == "none":
            return UNUSED
        if (presented.issuer, presented.serial) in self.revoked:
            return REVOKED
        if not self._issued(presented):
            return UNTRUSTED
        return None

    def _issued(self, presented: Presented) -> bool:
        """Whether a client CA in force signed the certificate (checked once per certificate)."""
        known = self._signed.get(presented.der)
        if known is None:
            known = any(_signed_by(presented.certificate, ca) for ca in self.cas.get(presented.issuer, ()))
            if len(self._signed) >= _REMEMBERED:
                self._signed.clear()
            self._signed[presented.der] = known
        return known


def _signed_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False
