"""Server TLS: check the certificate and key, and keep one SSLContext that a reload updates.

``load_cert_chain`` on the live context makes new connections use the new pair while
connections already established keep theirs.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID

EXPIRY_WARNING = datetime.timedelta(days=30)


class TLSError(Exception):
    """The certificate or key cannot be used; the message names the file and the problem."""


@dataclass
class Checked:
    """A certificate and key that belong together, and what is worth a warning about them."""

    certificate: x509.Certificate
    warnings: list[str] = field(default_factory=list)


def _read(label: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSError(f"cannot read TLS {label} {path}: {exc.strerror}") from None


def sans(certificate: x509.Certificate) -> list[str]:
    try:
        ext = certificate.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return []
    return [*ext.get_values_for_type(x509.DNSName), *(str(ip) for ip in ext.get_values_for_type(x509.IPAddress))]


def covers(names: list[str], hostname: str) -> bool:
    """Does a certificate with these SANs cover this name (wildcards one label deep)?"""
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        address = None
    for name in names:
        if address is not None:
            if name == str(address):
                return True
            continue
        name, host = name.lower(), hostname.lower().rstrip(".")
        if name == host or (name.startswith("*.") and host.split(".", 1)[-1] == name[2:] and "." in host):
            return True
    return False


def check(certificate_path: Path, key_path: Path, hostname: str = "",
          now: datetime.datetime | None = None) -> Checked:
    """Raise TLSError for a pair that cannot serve; return warnings for one that should be looked at."""
    pem = _read("certificate", certificate_path)
    key_pem = _read("key", key_path)
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise TLSError(f"{certificate_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TLSError(f"{key_path} is not an unencrypted PEM private key ({exc})") from None
    leaf = chain[0]
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*public) != key.public_key().public_bytes(*public):
        raise TLSError(f"TLS key {key_path} does not belong to certificate {certificate_path}")
    now = now or datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc <= now:
        raise TLSError(f"TLS certificate {certificate_path} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
                       " (renew it, e.g. with: docker-mirror cert init --hostname ...)")
    if leaf.not_valid_before_utc > now:
        raise TLSError(f"TLS certificate {certificate_path} is not valid before "
                       f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    checked = Checked(leaf)
    if leaf.not_valid_after_utc - now < EXPIRY_WARNING:
        days = (leaf.not_valid_after_utc - now).days
        checked.warnings.append(f"TLS certificate {certificate_path} expires in {days} day(s), on "
                                f"{leaf.not_valid_after_utc:%Y-%m-%d}")
    names = sans(leaf)
    if hostname and not covers(names, hostname):
        checked.warnings.append(f"TLS certificate {certificate_path} is not valid for {hostname} "
                                f"(its names: {', '.join(names) or 'none'}); clients will refuse it under that name")
    return checked


class ServerTLS:
    """The server's SSLContext, checked at creation and on every reload."""

    def __init__(self, certificate: Path, key: Path, hostname: str = "") -> None:
        self.certificate, self.key, self.hostname = certificate, key, hostname
        self.checked = check(certificate, key, hostname)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(self.context)

    def _load(self, context: ssl.SSLContext) -> None:
        try:
            context.load_cert_chain(str(self.certificate), str(self.key))
        except ssl.SSLError as exc:
            raise TLSError(f"cannot use TLS certificate {self.certificate} with key {self.key}: "
                           f"{exc.reason or exc}") from None

    def reload(self, certificate: Path, key: Path, hostname: str = "") -> Checked:
        """Check a (new) pair, then switch the live context to it; on any error nothing changes."""
        checked = check(certificate, key, hostname)
        trial = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        previous = self.certificate, self.key
        self.certificate, self.key = certificate, key
        try:
            self._load(trial)
        except TLSError:
            self.certificate, self.key = previous
            raise
        self._load(self.context)
        self.hostname, self.checked = hostname, checked
        return checked
