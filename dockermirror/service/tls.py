"""Server TLS: check the certificate and key, and keep one SSLContext that a reload updates.

``load_cert_chain`` on the live context makes new connections use the new pair while
connections already established keep theirs.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import re
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID

from dockermirror import smallfile
from dockermirror.service.clienttrust import ClientTrust

EXPIRY_WARNING = datetime.timedelta(days=30)

log = logging.getLogger("dockermirror.tls")


class TLSError(Exception):
    """The certificate or key cannot be used; the message names the file and the problem."""


class PairMismatch(TLSError):
    """The key does not belong to the certificate: maybe only for a moment (``cert init`` renames
    the new key and certificate into place one after the other)."""


# how long a reader waits before it looks at a mismatched pair once more
PAIR_SETTLE = 0.1


class TrustLost(TLSError):
    """A reload would drop what protects the server now (the CRL in force is gone): the whole
    reload is refused, not only its TLS part (service/server.py)."""


@dataclass
class Checked:
    """A certificate and key that belong together, and what is worth a warning about them."""

    certificate: x509.Certificate
    warnings: list[str] = field(default_factory=list)


def _read(label: str, path: Path) -> bytes:
    try:
        return smallfile.read(path, smallfile.PEM_MAX)[0]    # not a FIFO, a device or a huge file
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
        raise PairMismatch(f"TLS key {key_path} does not belong to certificate {certificate_path}")
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


@dataclass(frozen=True)
class ClientAuth:
    """Whether clients must show a certificate, which CA signs them, which are revoked."""

    mode: str = "none"              # none | optional | required
    ca: Path | None = None          # the CA file client certificates must chain to
    crl: Path | None = None         # revoked certificates (PEM CRL), used when the file exists

    def describe(self, revoked: int | None) -> str:
        if self.mode == "none":
            return "client certificates: not asked for"
        if revoked is not None:
            crl = f"CRL {self.crl} ({revoked} revoked)"
        else:
            crl = "no CRL" + (f" at {self.crl} yet (docker-mirror cert revoke writes it)" if self.crl else "")
        return f"client certificates: {self.mode}, signed by {self.ca}; {crl}"


# what the server's alert says about a refused client certificate
_ALERTS = {40: "handshake failure (no client certificate?)", 42: "bad certificate", 43: "unsupported certificate",
           44: "certificate revoked", 45: "certificate expired", 46: "certificate not usable",
           48: "certificate not signed by the client CA (unknown CA)", 116: "no client certificate given"}
REFUSAL_LOG_INTERVAL = 60.0    # seconds: at most one info line per reason this often


class Refusals:
    """Handshakes the server refused, logged by reason: each at debug, and at info at most once a
    minute per reason with how many came since (a client retrying in a loop cannot flood the log).

    OpenSSL tells Python nothing about a failed server handshake; the alert the server sends
    the client says why, and the message callback sees it."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def __call__(self, connection: object, direction: str, version: object, content_type: object,
                 message_type: object, data: bytes) -> None:
        if content_type != 21 or direction != "write" or len(data) < 2 or data[0] != 2:
            return      # not a fatal alert the server sends
        self.refused(_ALERTS.get(data[1], f"TLS alert {data[1]}"))

    def refused(self, reason: str) -> None:
        now = time.monotonic()
        count = self.count.get(reason, 0) + 1
        log.debug("TLS handshake refused: %s", reason)
        if now - self.last.get(reason, -REFUSAL_LOG_INTERVAL) >= REFUSAL_LOG_INTERVAL:
            more = f" ({count} such refusals since the last line)" if count > 1 else ""
            log.info("TLS handshake refused a client: %s%s", reason, more)
            self.last[reason], count = now, 0
        self.count[reason] = count


def _message_hook() -> bool:
    """Whether CPython's private TLS message callback (``SSLContext._msg_callback``, a property
    since 3.8) is there and takes a callable, on a Python this was checked with (< 3.15). If
    not, refused handshakes are not logged with their reason (one line at start says so); they
    are refused all the same. tests/unit/test_mtls.py fails if the hook stops working."""
    hook = getattr(ssl.SSLContext, "_msg_callback", None)
    if sys.version_info >= (3, 15) or not isinstance(hook, property) or hook.fset is None:
        return False
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context._msg_callback = lambda *args: None  # type: ignore[attr-defined]
        return callable(context._msg_callback)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return False


MESSAGE_HOOK = _message_hook()

# "required" asks for a certificate as "optional" does: a client without one completes the
# handshake and is refused at the HTTP layer (dockermirror/access/guard.py), with an error it
# prints. Refused in the handshake, it would see only "EOF" (asyncio's TLS sends no alert).
# A certificate that is presented is verified all the same (CA, CRL): a bad one fails here.
_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_OPTIONAL}


class _Context(ssl.SSLContext):
    """A server context that says whether it was built for ``client_auth: required``: a
    connection whose handshake ran with such a context and showed no certificate owes one
    (service/clientcert.py marks its requests; the HTTP layer refuses them whatever the
    application's configuration says, e.g. after a reload the application could not apply)."""

    certificate_required = False
    # the listening context's: the client CAs and revoked certificates in force, which every
    # request checks its connection's certificate against (service/clienttrust.py)
    client_trust: Any = None


def _new_context() -> _Context:
    # trusts nothing until the client CA is loaded: never the system's CAs (a public CA must not
    # be able to sign a client certificate for the mirror)
    context = _Context(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION     # a client certificate is checked once, in the handshake
    return context


def read_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file; TLSError if there is none or one does not parse."""
    data = _read("CRL", path)
    marker = b"-----BEGIN X509 CRL-----"
    blocks = [marker + block for block in data.split(marker)[1:]]
    if not blocks:
        raise TLSError(f"{path} holds no PEM CRL")
    try:
        return [x509.load_pem_x509_crl(block) for block in blocks]
    except ValueError:
        raise TLSError(f"{path} holds a CRL that does not parse") from None


def check_crls(path: Path, ca_path: Path, now: datetime.datetime | None = None) -> int:
    """Raise TLSError for a CRL file the server cannot use with this CA file (not signed by it, out of
    date: OpenSSL would then refuse every client); return how many certificates it revokes."""
    return sum(len(crl) for crl in usable_crls(path, read_cas(ca_path), now, ca_path))


def read_cas(ca_path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read("client CA", ca_path))
    except ValueError:
        raise TLSError(f"{ca_path} is not a PEM certificate") from None


_PRIVATE_KEY = re.compile(rb"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----")


def ca_pem(path: Path) -> str | None:
    """The certificates of the CA file clients are told to trust (tls.ca), as PEM, and nothing
    else of it; None if it cannot be read. TLSError for a file that holds a private key (it
    would be pasted to every client) or no certificate."""
    try:
        data = smallfile.read(path, smallfile.PEM_MAX)[0]
    except OSError:
        return None
    if (key := _PRIVATE_KEY.search(data)) is not None:
        raise TLSError(f"{path} holds a private key ({key[1].decode()}): give the CA certificate clients "
                       "trust, never a key")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSError(f"{path} holds no PEM certificate: give the CA certificate clients trust") from None
    return "".join(cert.public_bytes(serialization.Encoding.PEM).decode() for cert in certificates)


def usable_crls(path: Path, cas: list[x509.Certificate], now: datetime.datetime | None = None,
                ca_path: Path | str = "the client CA file") -> list[x509.CertificateRevocationList]:
    """The CRLs of a file, each checked as :func:`check_crls` says."""
    crls = read_crls(path)
    now = now or datetime.datetime.now(datetime.UTC)
    for crl in crls:
        issuers = [ca for ca in cas if ca.subject == crl.issuer]
        if not any(_signed_by(crl, ca) for ca in issuers):
            raise TLSError(f"the CRL in {path} (issuer {crl.issuer.rfc4514_string()}) is not signed by a CA in "
                           f"{ca_path}")
        if crl.next_update_utc is not None and crl.next_update_utc <= now:
            raise TLSError(f"the CRL in {path} is out of date since {crl.next_update_utc:%Y-%m-%d %H:%M} UTC "
                           "(every client would be refused): write a new one with docker-mirror cert revoke")
        if crl.last_update_utc > now + datetime.timedelta(minutes=5):
            raise TLSError(f"the CRL in {path} is not valid before {crl.last_update_utc:%Y-%m-%d %H:%M} UTC")
    return crls


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _settled(read: Callable[[], Any]) -> Any:
    """``read()``; if the key did not belong to the certificate, once more a moment later:
    ``cert init`` renames the new key into place just before the new certificate, and a start
    or reload landing between the two reads a new key with the old certificate."""
    try:
        return read()
    except PairMismatch:
        time.sleep(PAIR_SETTLE)
        return read()


class ServerTLS:
    """The server's TLS contexts, checked at creation and on every reload.

    ``context`` is the one the server listens with: it holds what OpenSSL copies into a
    connection when it accepts it (the verify mode, the CRL check flag). During each
    handshake (the server-name callback, which runs for every ClientHello) the connection
    is switched to ``current``, a context built afresh on each reload with the certificate,
    the client CA and the CRL: what it verifies against is exactly the files of the last
    reload (a store cannot forget a CA, so it is never reused).

    ``trust`` (also the listening context's ``client_trust``) is what the same files say, for
    the requests of connections already open (service/clienttrust.py): each one re-checks its
    certificate against it, so a revocation or another client CA reaches them too, and so does
    a CRL loaded between a connection's accept and its ClientHello (OpenSSL would not check it).

    Once a CRL has been in force in this process, a reload whose CRL file cannot be read is
    refused (:class:`TrustLost`): a CRL moved away or a path mistyped would otherwise let every
    certificate it revokes in again. At start a missing CRL means none (none revoked yet).
    """

    def __init__(self, certificate: Path, key: Path, hostname: str = "",
                 client: ClientAuth = ClientAuth()) -> None:
        self.certificate, self.key, self.hostname, self.client = certificate, key, hostname, client
        self.refusals = Refusals()
        self.crl_in_force = False       # a CRL was in force at some point in this process

        def start() -> tuple[Checked, tuple[ssl.SSLContext, int | None, ClientTrust], _Context]:
            checked, built, context = check(certificate, key, hostname), self._build(certificate, key, client), \
                _new_context()
            self._load(context, certificate, key)
            return checked, built, context

        self.checked, (self.current, self.revoked, self.trust), self.context = _settled(start)
        self._apply(client, self.current, self.revoked, self.trust)
        self.context.sni_callback = self._choose

    def _choose(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        connection.context = self.current

    @staticmethod
    def _load(context: ssl.SSLContext, certificate: Path, key: Path) -> None:
        try:
            context.load_cert_chain(str(certificate), str(key))
        except ssl.SSLError as exc:
            problem = PairMismatch if exc.reason == "KEY_VALUES_MISMATCH" else TLSError
            raise problem(f"cannot use TLS certificate {certificate} with key {key}: "
                          f"{exc.reason or exc}") from None

    def _build(self, certificate: Path, key: Path,
               client: ClientAuth) -> tuple[ssl.SSLContext, int | None, ClientTrust]:
        """A context for these files, how many certificates its CRL revokes (None: no CRL), and
        the trust the requests of open connections are checked against."""
        context = _new_context()
        self._load(context, certificate, key)
        context.verify_mode = _MODES[client.mode]
        context.certificate_required = client.mode == "required"
        if client.mode == "none":
            return context, None, ClientTrust("none")
        if MESSAGE_HOOK:
            # a private hook (CPython's test suite uses it): the only place a refusal's reason shows
            context._msg_callback = self.refusals  # type: ignore[attr-defined]
        else:
            log.info("this Python has no usable TLS message callback: refused client handshakes are not "
                     "logged with their reason (they are refused all the same)")
        assert client.ca is not None
        try:
            smallfile.read(client.ca, smallfile.PEM_MAX)    # a regular file (cafile= blocks on a FIFO)
            context.load_verify_locations(cafile=str(client.ca))
        except OSError as exc:
            raise TLSError(f"cannot read the client CA (tls.client_ca) {client.ca}: {exc.strerror or exc}"
                           + (" (create it with docker-mirror cert init, or set tls.client_ca)"
                              if isinstance(exc, FileNotFoundError) else "")) from None
        except ssl.SSLError:
            raise TLSError(f"the client CA (tls.client_ca) {client.ca} holds no PEM certificate") from None
        cas = read_cas(client.ca)
        if client.crl is None or not self._crl_there(client.crl):
            return context, None, ClientTrust(client.mode, cas)
        crls = usable_crls(client.crl, cas, ca_path=client.ca)
        try:
            context.load_verify_locations(cafile=str(client.crl))
        except (OSError, ssl.SSLError) as exc:
            raise TLSError(f"cannot load the CRL (tls.crl) {client.crl}: {exc}") from None
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return context, sum(len(crl) for crl in crls), ClientTrust.of(client.mode, cas, crls)

    def _crl_there(self, path: Path) -> bool:
        """Whether the CRL file exists; missing once a CRL was in force: TrustLost."""
        try:
            path.stat()
            return True
        except (FileNotFoundError, NotADirectoryError) as exc:
            if self.crl_in_force:
                raise TrustLost(f"the CRL (tls.crl) {path} is gone ({exc.strerror}), and a CRL was in force: "
                                "without it every certificate it revoked would get in again. Put it back "
                                "(docker-mirror cert revoke writes it), or restart the server to run "
                                "without one") from None
            return False
        except OSError as exc:
            raise TLSError(f"cannot read the CRL (tls.crl) {path}: {exc.strerror or exc}") from None

    def _apply(self, client: ClientAuth, current: ssl.SSLContext, revoked: int | None, trust: ClientTrust) -> None:
        """Switch new connections to ``current``, and the requests of open ones to ``trust``. The
        CRL check is turned on only once a context with the CRL is in place, and off before one
        without it is."""
        crl_check = revoked is not None
        if not crl_check:
            self.context.verify_flags &= ~ssl.VERIFY_CRL_CHECK_LEAF
        self.current, self.revoked, self.client, self.trust = current, revoked, client, trust
        self.context.client_trust = trust
        self.crl_in_force = self.crl_in_force or crl_check
        self.context.verify_mode = _MODES[client.mode]
        # no session resumption while certificates are checked: a resumed session skips the check,
        # so a certificate revoked since (or a client CA no longer trusted) would still get in.
        # TLS 1.2 resumes by session ID from a cache Python cannot turn off: TLS 1.3 only, then
        # (every client with client certificates speaks it), and no session tickets.
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3 if client.mode != "none" else ssl.TLSVersion.TLSv1_2
        self.context.num_tickets = 0 if client.mode != "none" else 2
        if client.mode != "none":
            self.context.options |= ssl.OP_NO_TICKET
        else:
            self.context.options &= ~ssl.OP_NO_TICKET
        if crl_check:
            self.context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF

    @property
    def client_summary(self) -> str:
        return self.client.describe(self.revoked)

    def reload(self, certificate: Path, key: Path, hostname: str = "",
               client: ClientAuth | None = None) -> Checked:
        """Check the (new) files, then switch new connections to them; on any error nothing changes."""
        client = client or self.client

        def read() -> tuple[Checked, tuple[ssl.SSLContext, int | None, ClientTrust]]:
            checked, built = check(certificate, key, hostname), self._build(certificate, key, client)
            self._load(self.context, certificate, key)      # last: only a pair that passed the rest
            return checked, built

        checked, (current, revoked, trust) = _settled(read)
        self._apply(client, current, revoked, trust)
        self.certificate, self.key = certificate, key
        self.hostname, self.checked = hostname, checked
        return checked
