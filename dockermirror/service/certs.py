"""A private CA and server certificates for the mirror (what cfssl did in four steps).

Files (EL conventions; all paths come from the tls: section of the configuration):

    /etc/pki/docker-mirror/ca.crt            the CA clients trust (0644)
    /etc/pki/docker-mirror/ca.key            its key (0600, root)
    /etc/pki/tls/certs/docker-mirror.crt     server certificate + CA (0644)
    /etc/pki/tls/private/docker-mirror.key   server key (0640, group docker-mirror)

Files are written to a temporary name and renamed, so a server reloading at the same
moment never reads half a file.
"""

from __future__ import annotations

import datetime
import grp
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dockermirror.service.tls import sans

SERVICE_GROUP = "docker-mirror"
CA_DAYS = 3650
SERVER_DAYS = 825


class CertError(Exception):
    """A certificate operation failed; the message names the file."""


@dataclass
class Paths:
    certificate: Path
    key: Path
    ca: Path

    @property
    def ca_key(self) -> Path:
        return self.ca.with_name("ca.key")


def default_names() -> tuple[list[str], list[str]]:
    """Names for a certificate nobody asked names for: this host's, and loopback."""
    names = [socket.getfqdn(), socket.gethostname(), "localhost"]
    return list(dict.fromkeys(n for n in names if n)), ["127.0.0.1", "::1"]


def _write(path: Path, data: bytes, mode: int, group: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.new")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        if group is not None:
            os.fchown(fd, -1, group)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def load_ca(paths: Paths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    if not paths.ca.exists() and not paths.ca_key.exists():
        return None
    try:
        cert = x509.load_pem_x509_certificate(paths.ca.read_bytes())
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except OSError as exc:
        raise CertError(f"cannot read the CA {exc.filename}: {exc.strerror}") from None
    except ValueError as exc:
        raise CertError(f"the CA in {paths.ca.parent} is not usable: {exc}") from None
    return cert, key  # type: ignore[return-value]


def create_ca(paths: Paths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"docker-mirror CA ({socket.getfqdn()})")])
    now = _now()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    paths.ca.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.ca.parent, 0o755)
    _write(paths.ca_key, _key_pem(key), 0o600)
    _write(paths.ca, _cert_pem(cert), 0o644)
    return cert, key


def sign_leaf(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], common_name: str,
              not_after: datetime.datetime, usage: x509.ObjectIdentifier, *, key_agreement: bool,
              extensions: tuple[tuple[x509.ExtensionType, bool], ...] = (), key_identifier: bool = False,
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new key and an end-entity certificate for it (CN=common_name, extended key usage
    ``usage``, plus ``extensions`` as (extension, critical), and its subject key identifier if
    asked), signed by the CA."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5)).not_valid_after(not_after)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    builder = (
        builder
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=key_agreement, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if key_identifier:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    cert = (
        builder
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def issue(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], names: list[str], ips: list[str],
          days: int = SERVER_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not names and not ips:
        raise CertError("a server certificate needs at least one --hostname or --ip")
    try:
        addresses = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError as exc:
        raise CertError(str(exc)) from None
    names_ext = x509.SubjectAlternativeName([*(x509.DNSName(n) for n in names),
                                             *(x509.IPAddress(a) for a in addresses)])
    return sign_leaf(ca, (names or ips)[0], _now() + datetime.timedelta(days=days), ExtendedKeyUsageOID.SERVER_AUTH,
                     key_agreement=True, extensions=((names_ext, False),))


def service_group() -> int | None:
    try:
        return grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        return None


def init(paths: Paths, names: list[str], ips: list[str], days: int = SERVER_DAYS) -> list[str]:
    """Create the CA if missing and a new server certificate signed by it; returns what was done."""
    done = []
    ca = load_ca(paths)
    if ca is None:
        ca = create_ca(paths)
        done.append(f"created CA {paths.ca} (key {paths.ca_key}, mode 0600)")
    cert, key = issue(ca, names, ips, days)
    group = service_group() if os.geteuid() == 0 else None
    _write(paths.key, _key_pem(key), 0o640 if group is not None else 0o600, group)
    _write(paths.certificate, _cert_pem(cert) + _cert_pem(ca[0]), 0o644)
    readable = f"group {SERVICE_GROUP}, mode 0640" if group is not None else "mode 0600: no docker-mirror group"
    done.append(f"issued {paths.certificate} for {', '.join(names + ips)} (serial {cert.serial_number:x}, "
                f"valid until {cert.not_valid_after_utc:%Y-%m-%d}); key {paths.key} ({readable})")
    return done


def describe(path: Path) -> list[str]:
    """Subject, SANs, issuer, serial and validity of the first certificate in a PEM file."""
    try:
        cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    except OSError as exc:
        raise CertError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise CertError(f"{path} is not a PEM certificate") from None
    left = cert.not_valid_after_utc - _now()
    state = f"expires in {left.days} days" if left.total_seconds() > 0 else "EXPIRED"
    return [
        f"file:     {path}",
        f"subject:  {cert.subject.rfc4514_string()}",
        f"names:    {', '.join(sans(cert)) or '(none)'}",
        f"issuer:   {cert.issuer.rfc4514_string()}",
        f"serial:   {cert.serial_number:x}",
        f"valid:    {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
        f"({state})",
    ]
