"""Registry authentication: ``WWW-Authenticate`` challenges, bearer tokens, Basic.

Tokens are cached per (realm, service, scope) until shortly before they expire, and
fetched once however many requests need the same token at the same moment.
Credentials are never logged, and are sent only to a token realm the upstream may name
(:mod:`.realms`): any other realm is refused (logged once, naming it) and the request fails.
Without credentials a realm anywhere is asked (nothing to leak), but never over plain HTTP
for an HTTPS upstream.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from dockermirror.meter import NULL_METER, Meter
from dockermirror.singleflight import SingleFlight
from dockermirror.upstream.bodies import BadEncoding, BodyTooLarge, read_capped, send, timed
from dockermirror.upstream.peers import KIND, PUBLIC, peer_address, reach, through_proxy
from dockermirror.upstream.realms import RealmRefused, check_realm, shown

log = logging.getLogger("dockermirror.upstream")

_PARAM_RE = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")   # what a token may hold: visible ASCII (RFC 6750's b64token and more)
EXPIRY_MARGIN = 10.0      # seconds before a token's expiry at which it is no longer used
DEFAULT_LIFETIME = 60.0   # the token spec's default when expires_in is absent
MAX_TOKEN_RESPONSE = 1024 * 1024   # most bytes of a token response read (decoded); real ones are a few KiB
MAX_TOKEN = 64 * 1024       # the longest token used (real ones: 0.2-4 KiB; registries refuse headers far shorter)
# Tokens are kept per repository (scope), and clients choose repositories: at most this many
# tokens, and bytes of them, are kept (expired ones go first, then the oldest).
MAX_TOKENS = 4096
MAX_TOKEN_BYTES = 16 * 1024 * 1024


class AuthError(Exception):
    """The token service refused or failed; ``status`` is its HTTP status, if it answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Challenge:
    scheme: str                  # "bearer" or "basic"
    params: dict[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge | None:
        scheme, _, rest = header.strip().partition(" ")
        if not scheme:
            return None
        params = {}
        for key, value in _PARAM_RE.findall(rest):
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[key.lower()] = value
        return cls(scheme.lower(), params)


class Authenticator:
    """Answers an upstream's challenges and remembers what it asked for."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        username: str | None,
        password: str | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        upstream: str,
        token_realms: tuple[str, ...] = (),
        meter: Meter = NULL_METER,
        key: str = "",
    ) -> None:
        """``upstream`` is the registry's base URL (whose challenges these are); ``token_realms``
        the other hosts (``host`` or ``host:port``) its configuration trusts with the credentials."""
        self._client = client
        self._upstream = upstream
        self._meter = meter             # hears of each token request, as upstream ``key``
        self._upstream_key = key
        self._token_realms = tuple(token_realms)
        self._refused: set[str] = set()             # realms already logged as refused
        self._basic = (
            "Basic " + base64.b64encode(f"{username}:{password or ''}".encode()).decode() if username else None
        )
        self._clock = clock
        self._bearer: Challenge | None = None       # realm/service learned from the last bearer challenge
        self._use_basic = False                      # the upstream asked for Basic
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}    # oldest first
        self._token_bytes = 0
        self._fetching = SingleFlight()   # one token request per key, however many ask
        # how far inside the network the upstream answered from (see .peers; None: not known):
        # a token service further inside is not read, unless ``private_realms``
        self.inside: int | None = None
        self.private_realms = False

    @property
    def has_credentials(self) -> bool:
        return self._basic is not None

    async def header_for(self, scope: str) -> str | None:
        """The Authorization value to send up front, if the upstream's scheme is known. If the
        realm learned before fails now, none: the request goes without, and the upstream's 401
        says what it wants today (it may have moved its realm, or not want a token for this
        repository at all); until a token is had again, nothing is sent up front."""
        if self._use_basic:
            return self._basic
        bearer = self._bearer
        if bearer is not None:
            try:
                return "Bearer " + await self._token(bearer, scope)
            except (AuthError, httpx.TransportError) as exc:
                if isinstance(exc, AuthError) and exc.status is not None and exc.status < 500:
                    raise   # it answered, and refused (this repository, these credentials): so be it
                log.debug("upstream %s: no token up front (%s); asking without one",
                          httpx.URL(self._upstream).host, exc)
                if self._bearer is bearer:
                    self._bearer = None
        return None

    async def answer(self, header: str, scope: str, sent: str | None = None) -> str | None:
        """The Authorization value answering a 401's challenge, or None if we cannot. ``sent``:
        the Authorization the 401 answered (a cached token it refused is fetched anew)."""
        challenge = Challenge.parse(header)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            if self._basic is None:
                return None
            self._use_basic = True
            return self._basic
        if challenge.scheme == "bearer" and "realm" in challenge.params:
            self._check(challenge.params["realm"])
            # The challenge's own scope wins: it is what this request needs.
            wanted = challenge.params.get("scope") or scope
            cached = self._tokens.get(self._key(challenge, wanted))
            if cached is not None and sent == "Bearer " + cached[0]:
                self._forget(challenge, wanted)     # refused: expired early, or revoked
            token = await self._token(challenge, wanted)
            self._bearer = challenge        # asked up front from now on: only a realm that gave a token
            return "Bearer " + token
        return None

    def _check(self, realm: str) -> None:
        """Refuse a realm the credentials may not go to (see :mod:`.realms`)."""
        try:
            check_realm(self._upstream, realm, credentials=self._basic is not None, listed=self._token_realms)
        except RealmRefused as exc:
            if exc.realm not in self._refused and len(self._refused) < 100:
                self._refused.add(exc.realm)
                log.warning("upstream %s: refused token realm %s: %s", httpx.URL(self._upstream).host,
                            exc.realm, exc)
            raise

    def _check_reach(self, response: httpx.Response, realm: str) -> None:
        """A token service further inside the network than the upstream is refused, unread:
        its answer would go to the upstream as the token (see .peers)."""
        address = peer_address(response)
        if self.private_realms or address is None or through_proxy(self._client, realm) is True:    # (the proxy decides)
            return
        ahead = reach(address)
        if ahead <= (PUBLIC if self.inside is None else self.inside):
            return
        shown_realm = shown(httpx.URL(realm))
        if shown_realm not in self._refused and len(self._refused) < 100:
            self._refused.add(shown_realm)
            log.warning("upstream %s: refused token realm %s: it is at a %s address (%s), further inside the network "
                        "than the upstream itself; not read (upstream.private_redirects: true allows it)",
                        httpx.URL(self._upstream).host, shown_realm, KIND[ahead], address)
        raise RealmRefused(f"the token realm {shown_realm} is at a {KIND[ahead]} address, further inside the network "
                           "than the upstream", shown_realm)

    def _key(self, challenge: Challenge, scope: str) -> tuple[str, str, str]:
        return challenge.params["realm"], challenge.params.get("service", ""), scope

    def _forget(self, challenge: Challenge, scope: str) -> None:
        self._drop(self._key(challenge, scope))

    def _drop(self, key: tuple[str, str, str]) -> None:
        dropped = self._tokens.pop(key, None)
        if dropped is not None:
            self._token_bytes -= len(dropped[0])

    def _remember(self, key: tuple[str, str, str], token: str, expiry: float) -> None:
        """Keep a token, within MAX_TOKENS and MAX_TOKEN_BYTES: expired ones go first, then the oldest."""
        self._drop(key)

        def full() -> bool:
            return len(self._tokens) >= MAX_TOKENS or self._token_bytes + len(token) > MAX_TOKEN_BYTES

        if full():
            now = self._clock()
            for old in [k for k, (_, until) in self._tokens.items() if until <= now]:
                self._drop(old)
            while self._tokens and full():
                self._drop(next(iter(self._tokens)))
        self._tokens[key] = (token, expiry)
        self._token_bytes += len(token)

    async def _token(self, challenge: Challenge, scope: str) -> str:
        key = self._key(challenge, scope)
        cached = self._tokens.get(key)
        if cached is not None and cached[1] > self._clock():
            return cached[0]

        async def fetch() -> str:
            token, lifetime = await self._fetch(*key)
            self._remember(key, token, self._clock() + max(lifetime - EXPIRY_MARGIN, 1.0))
            return token

        token, _ = await self._fetching.do(key, fetch)
        return token

    async def _fetch(self, realm: str, service: str, scope: str) -> tuple[str, float]:
        params = {k: v for k, v in (("service", service), ("scope", scope)) if v}
        headers = {"Authorization": self._basic} if self._basic else {}
        host = httpx.URL(realm).host
        window = self._client.timeout.read or 60.0
        # Streamed and capped: a token service's body (or its gzip "bomb") is never read whole.
        request = self._client.build_request("GET", realm, params=params, headers=headers)
        response = await timed(self._meter, self._upstream_key, "token", send(self._client, request, window))
        try:
            self._check_reach(response, realm)
            if response.status_code != 200:
                raise AuthError(f"token service {host} answered {response.status_code}", response.status_code)
            data = await read_capped(response, MAX_TOKEN_RESPONSE, window)
            self._meter.upstream_received(self._upstream_key, len(data))
        except BodyTooLarge:
            raise AuthError(f"token service {host} sent a response larger than "
                            f"{MAX_TOKEN_RESPONSE // 1024} KiB") from None
        except BadEncoding as exc:
            raise AuthError(f"token service {host}: {exc}") from None
        finally:
            await response.aclose()
        try:
            body = json.loads(data)
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or DEFAULT_LIFETIME)
        except (ValueError, AttributeError, TypeError, RecursionError):   # RecursionError: [[[[...
            raise AuthError(f"token service {host} sent no usable token") from None
        if not token or not isinstance(token, str):
            raise AuthError(f"token service {host} sent no token")
        if len(token) > MAX_TOKEN:
            raise AuthError(f"token service {host} sent a token longer than {MAX_TOKEN // 1024} KiB")
        if not _TOKEN_RE.fullmatch(token):      # it goes into a header: no space, no control character
            raise AuthError(f"token service {host} sent a token that cannot be sent in a header")
        return token, lifetime
