"""Client certificates signed by the private CA (``cert client``) and their revocation (``cert revoke``).

    DIR/client.cert, DIR/client.key (0600), DIR/ca.crt    what one client gets: the layout of
                                                          dockerd's and podman's certs.d/<host>/
    /etc/pki/docker-mirror/clients/<serial>.crt           every client certificate issued (0700 dir):
                                                          what cert revoke NAME looks up
    tls.crl (/etc/pki/docker-mirror/crl.pem)              the CRL the server checks (0644), signed by the CA

A revocation takes effect when the server reloads (``systemctl reload docker-mirror``).
"""

from __future__ import annotations

import contextlib
import datetime
import re
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dockermirror import smallfile
from dockermirror.service.certs import (CertError, Paths, UsageError, _cert_pem, _key_pem, _now, _Staged, _write,
                                        check_days, load_ca, sign_leaf)

CLIENT_DAYS = 365
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


@contextlib.contextmanager
def _naming_the_file() -> Iterator[None]:
    """A file operation's OSError as a CertError that names the file."""
    try:
        yield
    except OSError as exc:
        raise CertError(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)) from None


def index_dir(paths: Paths) -> Path:
    return paths.ca.parent / "clients"


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise UsageError(f"NAME: invalid client name {name!r}: use 1 to 64 letters, digits and . _ @ + - "
                        "(starting with a letter or digit)")
    return name


def _ca(paths: Paths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca = load_ca(paths)
    if ca is None:
        raise CertError(f"no CA at {paths.ca}: create it first with docker-mirror cert init")
    return ca


def issue_client(paths: Paths, name: str, out: Path, days: int = CLIENT_DAYS) -> list[str]:
    """A key and a certificate for client ``name`` (CN=name, clientAuth), signed by the CA,
    written to ``out`` with a copy of the CA, and recorded for ``revoke``."""
    check_name(name)
    check_days(days, CLIENT_DAYS)
    ca_cert, ca_key = _ca(paths)
    now = _now()
    until = now + datetime.timedelta(days=days)
    if until > ca_cert.not_valid_after_utc:
        raise CertError(f"the CA {paths.ca} expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}: give fewer --days")
    cert, key = sign_leaf((ca_cert, ca_key), name, until, ExtendedKeyUsageOID.CLIENT_AUTH, key_agreement=False,
                          key_identifier=True)
    # every file staged first, then renamed into place together: the record of a certificate
    # whose files could not be written would be one no client has (and a revocation names it)
    staged = _Staged()
    with _naming_the_file():
        try:
            staged.mkdir(out, 0o700)        # (an error names the directory that cannot be made)
            staged.mkdir(index_dir(paths), 0o700)
            staged.write(out / "client.key", _key_pem(key), 0o600, dir_mode=0o700)
            staged.write(out / "client.cert", _cert_pem(cert), 0o644, dir_mode=0o700)
            staged.write(out / "ca.crt", paths.ca.read_bytes(), 0o644, dir_mode=0o700)
            staged.write(index_dir(paths) / f"{cert.serial_number:x}.crt", _cert_pem(cert), 0o644, dir_mode=0o700)
        except BaseException:
            staged.abort()
            raise
        staged.commit()
    return [f"issued client certificate CN={name} (serial {cert.serial_number:x}, valid until {until:%Y-%m-%d}) "
            f"to {out}/client.cert, key {out}/client.key (mode 0600), CA {out}/ca.crt",
            f"copy {out} to the client as /etc/docker/certs.d/<mirror host:port>/ (dockerd) or "
            "/etc/containers/certs.d/<mirror host:port>/ (podman, skopeo)"]


def issued(paths: Paths) -> list[x509.Certificate]:
    """Every client certificate ``cert client`` recorded."""
    index = index_dir(paths)
    found = []
    try:
        files = sorted(index.glob("*.crt"))
    except OSError as exc:
        raise CertError(f"cannot read {index}: {exc.strerror}") from None
    for path in files:
        try:
            found.append(x509.load_pem_x509_certificate(smallfile.read(path, smallfile.PEM_MAX)[0]))
        except OSError as exc:
            raise CertError(f"cannot read {path}: {exc.strerror}") from None
        except ValueError:
            raise CertError(f"{path} is not a PEM certificate") from None
    return found


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def load_crl(path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList | None:
    if not path.exists():
        return None
    try:
        crl = x509.load_pem_x509_crl(smallfile.read(path, smallfile.PEM_MAX)[0])
    except OSError as exc:
        raise CertError(f"cannot read the CRL {path}: {exc.strerror}") from None
    except ValueError:
        raise CertError(f"{path} is not a PEM CRL") from None
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise CertError(f"the CRL {path} is not signed by the CA {ca_cert.subject.rfc4514_string()}")
    return crl


def revoke(paths: Paths, name: str, crl_path: Path) -> list[str]:
    """Add every certificate issued to ``name`` to the CRL (signed by the CA, written atomically)."""
    check_name(name)
    ca_cert, ca_key = _ca(paths)
    mine = [cert for cert in issued(paths) if _common_name(cert) == name]
    if not mine:
        raise CertError(f"no client certificate named {name!r} was issued here (none in {index_dir(paths)})")
    old = load_crl(crl_path, ca_cert)
    entries = list(old) if old is not None else []
    known = {entry.serial_number for entry in entries}
    new = [cert for cert in mine if cert.serial_number not in known]
    if not new:
        return [f"{name}: every certificate ({', '.join(f'{c.serial_number:x}' for c in mine)}) is already "
                f"revoked in {crl_path}"]
    now = _now().replace(microsecond=0)
    if old is not None and old.last_update_utc >= now:
        # OpenSSL prefers the newest CRL: each one must be later than the last
        now = old.last_update_utc + datetime.timedelta(seconds=1)
    for cert in new:
        entries.append(x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(now)
                       .add_extension(x509.CRLReason(x509.ReasonFlags.cessation_of_operation), critical=False)
                       .build())
    number = 1
    if old is not None:
        try:
            number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        except x509.ExtensionNotFound:
            pass
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(now)
               .next_update(max(ca_cert.not_valid_after_utc, now + datetime.timedelta(days=1)))
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    with _naming_the_file():
        _write(crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return [f"revoked {name}: serial {', '.join(f'{c.serial_number:x}' for c in new)} added to {crl_path} "
            f"({len(entries)} revoked in all)",
            "the server refuses it once reloaded: systemctl reload docker-mirror"]
