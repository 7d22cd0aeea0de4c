"""The guard: who is asking (certificate, htpasswd credentials, or nobody) and may they pull this.

The application builds one Guard from the configuration (a new one on reload); the registry
API asks it for every request: :meth:`Guard.identify` first (wrong credentials: 401), then
:meth:`Guard.check` once the request is routed to an upstream repository, before the cache or
the upstream is touched (denied: 403 DENIED naming the rule, or 401 when credentials could
help), and :meth:`Guard.ping` for ``/v2/``.

With ``tls.client_auth: required``, :meth:`Guard.admit` comes before all of that, on every
request whatever its path (dockermirror/api/gate.py calls it before any routing): a
connection without a verified client certificate gets 401 UNAUTHORIZED saying so. The TLS
layer lets such a client finish its handshake (a handshake refused is only "EOF" to it).

Without rules, htpasswd or a required certificate the guard is inactive and the API does not call it.
Without rules but with htpasswd, every user may pull everything and anonymous clients
nothing (what configuring a password file asks for); with rules, the rules decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from dockermirror.access.htpasswd import CheckersBusy, parse_basic
from dockermirror.access.identity import ANONYMOUS, CERTIFICATE, USER, Identity
from dockermirror.access.rules import Decision, Rule, Rules, client_address
from dockermirror.errors import Denied, Unauthorized, Unavailable

REALM = "docker-mirror"
_EMPTY_LOGIN = "Og=="       # base64 of ":"
CHALLENGE = {"WWW-Authenticate": f'Basic realm="{REALM}"'}
# implied when htpasswd is configured and no rules are: users may pull everything
_USERS_ONLY = Rule(allow=True, identities=("authenticated",), index=-1)


class PasswordFile(Protocol):
    """The users of auth.htpasswd (dockermirror.access.htpasswd.Htpasswd)."""

    async def check(self, user: str, password: str) -> bool: ...


@dataclass
class Refusal:
    """Why credentials were refused, for the request log (never shown to the client)."""

    user: str


class CertificateRequired(Unauthorized):
    """tls.client_auth: required, and the connection has no verified client certificate. 401
    (credentials are missing) without a ``WWW-Authenticate`` challenge: no password can satisfy
    it, and a Basic challenge would make docker and podman ask for one, or retry with one."""

    refused = "no-client-certificate"       # for the request log: refused=...

    def __init__(self) -> None:
        super().__init__("a client certificate is required (tls.client_auth: required); ask the mirror's "
                         "admin for one (docker-mirror cert client NAME)")


class CertificateRefused(Unauthorized):
    """The connection's client certificate was verified in its handshake, but the trust in force
    now refuses it (a reload since revoked it, or no longer trusts its CA, or it expired):
    service/clientcert.py puts ``scope["client_certificate_refused"]`` instead of the certificate.
    401, whatever tls.client_auth is: a refused certificate never falls back to anonymous (a new
    connection with it would fail its handshake), and the gate closes the connection."""

    _MESSAGES = {
        "revoked": "the client certificate was revoked (docker-mirror cert revoke); ask the mirror's admin "
                   "for a new one (docker-mirror cert client NAME)",
        "untrusted": "the client certificate is no longer trusted: it is not signed by a client CA of this "
                     "mirror (tls.client_ca); ask the mirror's admin for a new one (docker-mirror cert client NAME)",
        "expired": "the client certificate expired; ask the mirror's admin for a new one "
                   "(docker-mirror cert client NAME)",
    }

    def __init__(self, refused: dict[str, Any]) -> None:
        reason = str(refused.get("reason"))
        super().__init__(self._MESSAGES.get(reason, "the client certificate is no longer accepted; ask the "
                                                    "mirror's admin for a new one (docker-mirror cert client NAME)"))
        self.refused = f"certificate-{reason if reason in self._MESSAGES else 'refused'}"   # refused=... in the log
        # for the log only (the client knows its certificate)
        self.note = f"client certificate {refused.get('subject', '')} (serial {refused.get('serial', '')}) {reason}"


class Guard:
    def __init__(self, rules: Rules, htpasswd: PasswordFile | None = None, *,
                 certificate_required: bool = False) -> None:
        """``rules``: the ``access:`` rules (maybe none); ``htpasswd``: the users, if configured;
        ``certificate_required``: tls.client_auth is ``required``."""
        self.htpasswd = htpasswd
        self.explicit = bool(rules)
        self.rules = Rules((_USERS_ONLY,), rules.table) if htpasswd is not None and not rules else rules
        self.certificate_required = certificate_required
        self.active = bool(rules) or htpasswd is not None or certificate_required
        # the Identity of each user verified since this guard was made: at most one per user of
        # the file (only a verified user gets in), and a reload makes a new guard
        self._users: dict[str, Identity] = {}

    @classmethod
    def of(cls, config: Any, htpasswd: PasswordFile | None = None) -> Guard:
        """The guard of a configuration's ``access:`` rules, with the users of its auth.htpasswd
        and its tls.client_auth."""
        return cls(Rules(tuple(config.access), config.registry_table()), htpasswd,
                   certificate_required=config.tls.client_auth == "required")

    # --- who

    def admit(self, scope: dict[str, Any]) -> None:
        """Raise :class:`CertificateRequired` for a request on a connection without a verified
        client certificate when one is required: by the configuration, or by the TLS layer for
        this connection (``scope["client_certificate_required"]``, service/clientcert.py: it
        holds even if a reload changed the TLS settings and not this guard); before anything
        else looks at the request. Raise :class:`CertificateRefused` for a request whose
        connection's certificate the trust in force refuses (``scope["client_certificate_refused"]``),
        whatever the configuration."""
        refused = scope.get("client_certificate_refused")
        if refused:
            raise CertificateRefused(refused if isinstance(refused, dict) else {"reason": str(refused)})
        if (self.certificate_required or scope.get("client_certificate_required") is True) \
                and not scope.get("client_certificate"):
            raise CertificateRequired()

    async def identify(self, scope: dict[str, Any], authorization: str | None) -> Identity:
        """The request's identity: a verified client certificate, else Basic credentials checked
        against the htpasswd file (wrong ones: 401 UNAUTHORIZED), else anonymous. Credentials
        are ignored without an htpasswd file, and when a certificate was presented. Without a
        certificate where one is required: 401 (see :meth:`admit`)."""
        certificate = scope.get("client_certificate")
        if certificate:
            return Identity.certificate(certificate)
        self.admit(scope)
        if self.htpasswd is None or not authorization:
            return ANONYMOUS
        credentials = parse_basic(authorization)
        if credentials is None:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() != "basic" or token.strip() == _EMPTY_LOGIN:
                # another scheme (a token meant for someone else), or an empty login (what
                # some clients without credentials answer a challenge with)
                return ANONYMOUS
            raise self._unauthorized("malformed Basic credentials", Refusal(""))
        user, password = credentials
        # a credential verified lately answers at once; bcrypt runs in a thread
        try:
            verified = await self.htpasswd.check(user, password)
        except CheckersBusy:
            raise Unavailable("too many password checks at once; try again in a moment",
                              headers={"Retry-After": "1"}) from None
        if verified:
            identity = self._users.get(user)
            if identity is None:
                identity = self._users[user] = Identity.user(user)
            return identity
        raise self._unauthorized("wrong user name or password", Refusal(user))

    def _unauthorized(self, message: str, refusal: Refusal) -> Unauthorized:
        error = Unauthorized(message, headers=dict(CHALLENGE))
        error.refusal = refusal     # type: ignore[attr-defined]
        return error

    # --- may they

    def decide(self, identity: Identity, host: str | None, key: str, repository: str) -> Decision:
        return self.rules.decide(identity, client_address(host), key, repository)

    def check(self, identity: Identity, host: str | None, key: str, repository: str) -> None:
        """Raise 403 DENIED (or 401 if logging in could help) unless ``identity`` may pull."""
        address = client_address(host)
        decision = self.rules.decide(identity, address, key, repository)
        if decision.allowed:
            return
        full = f"{key}/{repository}"
        if not identity.authenticated and self.htpasswd is not None \
                and self.rules.could_allow(USER, address, key, repository):
            raise Unauthorized(f"authentication required to pull {full}: log in to this mirror with your "
                               "user name and password", headers=dict(CHALLENGE), detail={"repository": full})
        rule = decision.rule
        if rule is not None and rule.index >= 0:
            message = f"{identity} may not pull {full}: denied by rule {rule.where()} of access:"
            detail: dict[str, Any] = {"repository": full, "rule": rule.index, "line": rule.line}
        else:
            message = f"{identity} may not pull {full}: no rule of access: allows it (default deny)"
            detail = {"repository": full, "rule": "default deny"}
        if not identity.authenticated and self.rules.could_allow(CERTIFICATE, address, key, repository):
            message += "; a client certificate may be allowed"
        raise Denied(message, detail=detail)

    def ping(self, identity: Identity, host: str | None) -> None:
        """``/v2/``: an anonymous client that may pull nothing from where it is gets the Basic
        challenge (with an htpasswd file), so that docker and podman send their credentials
        (they send them only once challenged); everyone else gets 200."""
        if identity.authenticated or self.htpasswd is None:
            return
        if not self.rules.anonymous_may_pull(client_address(host)):
            raise Unauthorized("authentication required: log in to this mirror with your user name and password",
                               headers=dict(CHALLENGE))
