"""A private CA and server certificates for the mirror (what cfssl did in four steps).

Files (EL conventions; all paths come from the tls: section of the configuration):

    /etc/pki/docker-mirror/ca.crt             the CA clients trust (0644)
    /etc/pki/docker-mirror/private/ca.key     its key (0600, in a 0700 directory, root)
    /etc/pki/tls/certs/docker-mirror.crt      server certificate + CA (0644)
    /etc/pki/tls/private/docker-mirror.key    server key (0640, group docker-mirror)

The CA key lives in private/ so that a copy of the CA directory used as a client's
certs.d/<host>/ or --cert-dir holds no *.key (podman, skopeo and dockerd take a *.key there
for half of a client key pair and refuse the directory). A CA key of an older install beside
ca.crt (ca.key) is still read; ``cert init`` moves it to private/.

``init`` is all or nothing: every file is first written to a temporary name of its own beside
its target, and only when all of them are written are they renamed into place; a failure
before that removes the temporary files and any directory it made. A server reloading at
the same moment never reads half a file.

Two runs at the same time (the package script and an admin) take turns: each holds a lock on
the CA's directory (flock on the directory itself: no lock file) from reading the CA until its
files are in place, so the second one signs with the CA the first one made.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import grp
import ipaddress
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dockermirror import smallfile
from dockermirror.service.tls import sans

if TYPE_CHECKING:
    from dockermirror.config import Config

SERVICE_GROUP = "docker-mirror"
CA_DAYS = 3650
SERVER_DAYS = 825
LOOPBACK = ["127.0.0.1", "::1"]
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class CertError(Exception):
    """A certificate operation failed; the message names the file."""


class UsageError(CertError):
    """A flag or configuration key has a value no certificate can be made with (exit status 2)."""


@dataclass
class Paths:
    certificate: Path
    key: Path
    ca: Path

    @property
    def ca_key(self) -> Path:
        """Where the CA key belongs: private/ca.key beside the CA."""
        return self.ca.parent / "private" / "ca.key"

    @property
    def legacy_ca_key(self) -> Path:
        """Where installs before private/ kept it: ca.key beside the CA."""
        return self.ca.with_name("ca.key")

    @property
    def ca_key_in_use(self) -> Path:
        """The CA key that is read: private/ca.key, or else an older install's ca.key."""
        if not self.ca_key.exists() and self.legacy_ca_key.exists():
            return self.legacy_ca_key
        return self.ca_key

    @classmethod
    def under(cls, directory: Path) -> Paths:
        """``cert init --dir DIR``: the CA in DIR (its key in DIR/private), the server pair in DIR/server."""
        directory = directory.absolute()
        return cls(directory / "server" / "docker-mirror.crt", directory / "server" / "docker-mirror.key",
                   directory / "ca.crt")

    def config_lines(self) -> list[str]:
        """The tls: section that makes the server use these files."""
        return ["tls:", f"  certificate: {self.certificate}", f"  key: {self.key}", f"  ca: {self.ca}"]


@dataclass(frozen=True)
class MirrorName:
    """The name clients use to reach the mirror, and where it came from."""
    name: str
    configured: bool     # from the top-level hostname: key; False: this host's FQDN
    note: str            # one line saying which, for the command's output


    unknown: str = ""    # name == "": why (this host has no name clients can use), for an error line


_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "localhost4", "localhost4.localdomain4", "localhost6",
                   "localhost6.localdomain6", "ip6-localhost", "ip6-loopback"}


def usable_name(name: str) -> bool:
    """Whether another machine can reach this one by ``name``: a DNS name or an address, not
    localhost or a loopback address (getfqdn() says localhost when /etc/hosts lists
    ``127.0.0.1 localhost`` first)."""
    name = name.rstrip(".").lower()
    if _is_ip(name):
        address = ipaddress.ip_address(name)
        return not (address.is_loopback or address.is_unspecified)
    if name in _LOOPBACK_NAMES or name.startswith("localhost.") or "*" in name:
        return False
    try:
        check_dns_name(name, "name")
    except UsageError:
        return False
    return True


def mirror_name(config: Config) -> MirrorName:
    """The configured ``hostname:``, or else this host's FQDN, or else its host name (and a note
    saying which); name "" when none of them is a name clients can use."""
    if config.hostname:
        return MirrorName(config.hostname, True, f"name: {config.hostname} (hostname: in {config.source})")
    fqdn = socket.getfqdn()
    if usable_name(fqdn):
        return MirrorName(fqdn, False, f"name: {fqdn} (this host's FQDN: hostname: is not set in {config.source}; "
                                       "set it to the name clients use)")
    short = socket.gethostname()
    if usable_name(short):
        return MirrorName(short, False, f"name: {short} (this host's name: its FQDN {fqdn!r} is no name clients "
                                        f"can use, and hostname: is not set in {config.source}; set it to the name "
                                        "clients use)")
    why = f"this host has no name clients can use (its FQDN is {fqdn!r}, its host name {short!r})"
    return MirrorName("", False, f"name: unknown (this host's FQDN is {fqdn!r}, its host name {short!r}); set "
                                 f"hostname: in {config.source} to the name clients use", why)


def check_dns_name(name: str, what: str) -> str:
    """A DNS name for a certificate (a leading *. allowed), or UsageError naming ``what``."""
    if _is_ip(name):
        raise UsageError(f"{what}: {name} is an IP address; give it with --ip {name}")
    labels = name.rstrip(".").split(".")
    if labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise UsageError(f"{what}: {name!r} is not a DNS name (letters, digits and -, in labels separated "
                         "by dots); give the name clients use")
    return name.rstrip(".").lower()


def check_ips(ips: list[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        addresses = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError:
        bad = next(ip for ip in ips if not _is_ip(ip))
        raise UsageError(f"--ip: {bad!r} is not an IP address; give one such as 10.1.2.3 or fd00::5") from None
    for ip, address in zip(ips, addresses, strict=True):
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise UsageError(f"--ip: {ip!r} is a scoped address (%{address.scope_id}): a certificate cannot hold "
                             "the scope; give the address without it")
    return addresses


MAX_DAYS = 36500


def check_days(days: int, default: int) -> int:
    """--days: 1 to MAX_DAYS (a date beyond that is no certificate's business), or UsageError."""
    if days < 1:
        raise UsageError(f"--days: {days} is not a number of days; give 1 to {MAX_DAYS} (default {default})")
    if days > MAX_DAYS:
        raise UsageError(f"--days: {days} is more than {MAX_DAYS} days; give 1 to {MAX_DAYS} (default {default})")
    return days


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def default_names(config: Config) -> tuple[list[str], list[str], MirrorName]:
    """Names for a certificate nobody gave names for: the mirror's name (the configured
    hostname:, else this host's FQDN and short name), localhost and the loopback addresses.
    A configured hostname: that is an IP address goes with the addresses."""
    picked = mirror_name(config)
    if picked.configured:
        if _is_ip(picked.name):
            return ["localhost"], [str(ipaddress.ip_address(picked.name)), *LOOPBACK], picked
        check_dns_name(picked.name, f"{config.source}: hostname")
        candidates = [picked.name, "localhost"]
    else:
        candidates = [picked.name, socket.gethostname(), "localhost"]
    names = []
    for name in candidates:
        try:
            names.append(check_dns_name(name, "name"))
        except UsageError:
            continue    # a host name no certificate can hold (e.g. with _): leave it out
    return list(dict.fromkeys(names)), list(LOOPBACK), picked


class _Staged:
    """Files written beside their targets under temporary names, renamed into place together."""

    def __init__(self) -> None:
        self.files: list[tuple[Path, Path]] = []      # (temporary, target)
        self.made_dirs: list[Path] = []
        self.remove: list[Path] = []                 # renamed away when everything else is in place

    def mkdir(self, path: Path, mode: int) -> None:
        missing = []
        for parent in (path, *path.parents):
            if parent.exists():
                break
            missing.append(parent)
        for directory in reversed(missing):
            try:
                directory.mkdir(mode=mode if directory == path else 0o755)
            except FileExistsError:
                continue
            self.made_dirs.append(directory)
            os.chmod(directory, mode if directory == path else 0o755)

    def write(self, path: Path, data: bytes, mode: int, group: int | None = None, dir_mode: int = 0o755) -> None:
        """Write ``path``'s temporary file; an OSError names ``path`` (the file that could not be made)."""
        try:
            self.mkdir(path.parent, dir_mode)
            # a name of its own (O_EXCL): another run writing the same file never shares it
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
            temp = Path(name)
            self.files.append((temp, path))
            try:
                os.fchmod(fd, mode)
                if group is not None:
                    os.fchown(fd, -1, group)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from None

    def abort(self) -> None:
        for temp, _ in self.files:
            try:
                temp.unlink()
            except OSError:
                pass
        for directory in reversed(self.made_dirs):
            try:
                directory.rmdir()
            except OSError:
                pass

    def commit(self) -> None:
        """Rename every file into place; if a rename fails, put back what was there."""
        done: list[tuple[Path, Path | None]] = []     # (target, a link to the file it replaced, or None)
        try:
            for temp, path in self.files:
                backup = None
                if path.exists():
                    backup = path.with_name(f".{path.name}.old")
                    backup.unlink(missing_ok=True)
                    os.link(path, backup)
                try:
                    os.replace(temp, path)
                except OSError as exc:
                    if backup is not None:
                        backup.unlink(missing_ok=True)      # the file it would back up is still in place
                    raise OSError(exc.errno, exc.strerror, str(path)) from None     # the target's name
                done.append((path, backup))
        except OSError:
            for path, backup in reversed(done):
                try:
                    if backup is not None:
                        os.replace(backup, path)
                    else:
                        path.unlink()
                except OSError:
                    pass
            self.abort()
            raise
        for _, backup in done:
            if backup is not None:
                backup.unlink(missing_ok=True)
        for path in self.remove:
            path.unlink(missing_ok=True)
        for path in {p.parent for _, p in self.files}:
            _sync_dir(path)


def _sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_held: set[Path] = set()     # CA directories this process holds the lock of


@contextlib.contextmanager
def ca_lock(paths: Paths) -> Iterator[None]:
    """Hold the CA directory's lock (made if missing; removed again at the end if it is still
    empty). Re-entrant within a process. A directory removed by a run that failed while this one
    waited is made and locked afresh."""
    directory = paths.ca.parent.absolute()
    if directory in _held:
        yield
        return
    while True:
        made = _Staged()
        try:
            made.mkdir(directory, 0o755)
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            made.abort()
            raise CertError(f"{exc.filename or directory}: {exc.strerror}: nothing was changed") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            made.abort()
            raise CertError(f"{directory}: cannot lock it: {exc.strerror}: nothing was changed") from None
        try:
            now = os.stat(directory)
            locked = os.fstat(fd)
            if (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    _held.add(directory)
    try:
        yield
    finally:
        _held.discard(directory)
        made.abort()        # the directories it made, if nothing was put in them
        os.close(fd)


def _write(path: Path, data: bytes, mode: int, group: int | None = None) -> None:
    """One file, atomically (a temporary name, then renamed)."""
    staged = _Staged()
    try:
        staged.write(path, data, mode, group)
    except BaseException:
        staged.abort()
        raise
    staged.commit()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def load_ca(paths: Paths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA and its key (private/ca.key, or an older install's ca.key), or None if there is neither."""
    key_path = paths.ca_key_in_use
    if not paths.ca.exists() and not key_path.exists():
        return None
    try:
        cert = x509.load_pem_x509_certificate(smallfile.read(paths.ca, smallfile.PEM_MAX)[0])
        key = serialization.load_pem_private_key(smallfile.read(key_path, smallfile.PEM_MAX)[0], password=None)
    except OSError as exc:
        raise CertError(f"cannot read the CA {exc.filename}: {exc.strerror}") from None
    except ValueError as exc:
        raise CertError(f"the CA in {paths.ca.parent} is not usable: {exc}") from None
    return cert, key  # type: ignore[return-value]


def new_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed CA (in memory)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"docker-mirror CA ({socket.getfqdn()})"[:64])])
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
        raise UsageError("--hostname: a server certificate needs at least one --hostname or --ip")
    names = [check_dns_name(name, "--hostname") for name in names]
    addresses = check_ips(ips)
    check_days(days, SERVER_DAYS)
    until = _now() + datetime.timedelta(days=days)
    if until > ca[0].not_valid_after_utc:
        raise UsageError(f"--days: the CA expires on {ca[0].not_valid_after_utc:%Y-%m-%d}, before {days} days; "
                         "give fewer --days")
    names_ext = x509.SubjectAlternativeName([*(x509.DNSName(n) for n in names),
                                             *(x509.IPAddress(a) for a in addresses)])
    return sign_leaf(ca, (names or ips)[0][:64], until, ExtendedKeyUsageOID.SERVER_AUTH,
                     key_agreement=True, extensions=((names_ext, False),))


def service_group() -> int | None:
    try:
        return grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        return None


def init(paths: Paths, names: list[str], ips: list[str], days: int = SERVER_DAYS) -> list[str]:
    """Create the CA if missing and a new server certificate signed by it; returns what was done.
    All or nothing: when anything fails, no file has changed (and no CA was left behind).
    Holds the CA's lock throughout (:func:`ca_lock`)."""
    with ca_lock(paths):
        return _init(paths, names, ips, days)


def _init(paths: Paths, names: list[str], ips: list[str], days: int) -> list[str]:
    done = []
    ca = load_ca(paths)
    created = ca is None
    if ca is None:
        ca = new_ca()
    cert, key = issue(ca, names, ips, days)      # checks the names before anything is written
    group = service_group() if os.geteuid() == 0 else None
    writes = [paths.key, paths.certificate]
    if created or paths.ca_key_in_use == paths.legacy_ca_key:
        writes.append(paths.ca_key)
    if created:
        writes.append(paths.ca)
    for path in writes:     # a link to a file managed elsewhere: neither replaced nor written through
        if path.is_symlink():
            raise CertError(f"{path} is a symbolic link (to {os.readlink(path)}): cert init does not replace it; "
                            "remove the link, or point tls: at other paths: nothing was changed")
    staged = _Staged()
    try:
        if created or paths.ca_key_in_use == paths.legacy_ca_key:
            staged.write(paths.ca_key, _key_pem(ca[1]), 0o600, dir_mode=0o700)
        if created:
            staged.write(paths.ca, _cert_pem(ca[0]), 0o644)
        staged.write(paths.key, _key_pem(key), 0o640 if group is not None else 0o600, group)
        staged.write(paths.certificate, _cert_pem(cert) + _cert_pem(ca[0]), 0o644)
    except OSError as exc:
        staged.abort()
        raise CertError(f"{exc.filename}: {exc.strerror}: nothing was changed") from None
    except BaseException:
        staged.abort()
        raise
    moved = not created and paths.ca_key_in_use == paths.legacy_ca_key
    if moved:
        staged.remove.append(paths.legacy_ca_key)
    try:
        staged.commit()
    except OSError as exc:
        raise CertError(f"{exc.filename}: {exc.strerror}: nothing was changed") from None
    if created:
        done.append(f"created a private CA: {paths.ca} (its key {paths.ca_key}, mode 0600)")
    if moved:
        done.append(f"moved the CA key {paths.legacy_ca_key} to {paths.ca_key} (mode 0600), so that a copy "
                    f"of {paths.ca.parent} as a client's certs.d directory holds no *.key")
    readable = f"group {SERVICE_GROUP}, mode 0640" if group is not None else "mode 0600: no docker-mirror group"
    done.append(f"issued {paths.certificate} for {', '.join(names + ips)} (serial {cert.serial_number:x}, "
                f"valid until {cert.not_valid_after_utc:%Y-%m-%d}); key {paths.key} ({readable})")
    return done


def _first_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file; a CertError naming the file if there is none."""
    try:
        cert = x509.load_pem_x509_certificates(smallfile.read(path, smallfile.PEM_MAX)[0])[0]
    except OSError as exc:
        raise CertError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise CertError(f"{path} is not a PEM certificate") from None
    return cert


def names_of(path: Path) -> tuple[list[str], datetime.datetime]:
    """The names a certificate file covers and when it expires."""
    cert = _first_certificate(path)
    return sans(cert), cert.not_valid_after_utc


def trust_note(paths: Paths) -> str:
    if paths.ca.exists():
        return f"clients trust the CA {paths.ca}"
    return f"clients must trust the CA that signed it (there is no {paths.ca})"


def serving_note(enabled: str, source: str, paths: Paths, elsewhere: bool) -> str:
    """How the service speaks, now that there is a certificate (as TLSConfig.active decides)."""
    if elsewhere:
        return ("the service does not use these files until the tls: section of the configuration names them "
                f"(certificate: {paths.certificate}, key: {paths.key}, ca: {paths.ca})")
    if enabled == "off":
        return (f"but tls.enabled is false in {source}: the service speaks plain HTTP; set it to auto to use "
                "this certificate, then systemctl restart docker-mirror")
    return (f"the service speaks HTTPS with it (tls.enabled: {'auto' if enabled == 'auto' else 'true'}); "
            "if it is running over plain HTTP now: systemctl restart docker-mirror")


def no_certificate_note(enabled: str, source: str, paths: Paths) -> str:
    """How the service speaks without a new certificate (as TLSConfig.active and the server decide)."""
    if enabled == "off":
        return f"the service speaks plain HTTP (tls.enabled is false in {source})"
    if paths.certificate.exists():
        return (f"the service will not start: it has the certificate {paths.certificate} but cannot use it "
                f"without its key {paths.key}")
    if enabled == "on":
        return f"the service will not start (tls.enabled is true in {source}, and there is no {paths.certificate})"
    return f"the service speaks plain HTTP (tls.enabled: auto, and there is no {paths.certificate})"


def legacy_key_note(paths: Paths) -> str:
    return (f"the CA key is at {paths.legacy_ca_key}, where older versions kept it: it still works; "
            f"move it so that a copy of {paths.ca.parent} as a client's certs.d directory holds no *.key: "
            f"install -d -m 0700 {paths.ca_key.parent} && mv {paths.legacy_ca_key} {paths.ca_key} "
            "(docker-mirror cert init moves it too)")


def describe(path: Path) -> list[str]:
    """Subject, SANs, issuer, serial and validity of the first certificate in a PEM file."""
    cert = _first_certificate(path)
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
