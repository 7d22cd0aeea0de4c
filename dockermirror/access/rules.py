"""The ``access:`` rules: which identities, from which networks, may pull which repositories.

A rule is ``allow: [IDENTITY...]`` or ``deny: [IDENTITY...]``, with optional ``from:``
(source networks: the TCP peer's address, never a forwarded header) and optional
``repositories:`` (patterns; absent means every repository). Identities:

  anonymous        a client that presented neither a certificate nor credentials
  user:NAME        an htpasswd user;  user:*  any htpasswd user
  cert:CN          a client certificate with this common name;  cert:*  any certificate
  authenticated    any user or certificate
  *                anyone, anonymous included

Repository patterns name the registry as ``cache.pin`` does (:meth:`RegistryTable.pattern`):
``ghcr.io/myorg/*`` is on ghcr.io, ``library/centos`` and ``centos`` on the default upstream;
``*`` is every repository of every upstream and ``REGISTRY/*`` every repository of that one.
``*`` and ``?`` match any characters, ``/`` included.

The first rule that matches decides; once any rule exists, a request no rule matches is
denied. Pure: no I/O; the configuration builds the rules, the guard asks them.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dockermirror.access.identity import ANONYMOUS_KIND, ANYONE, AUTHENTICATED, CERTIFICATE, USER, Identity
from dockermirror.routing import RegistryTable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_PREFIXES = {"user": USER, "cert": CERTIFICATE}
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_PATTERN = re.compile(r"[a-z0-9._/*?\[\]:-]+")


def parse_identity(text: object) -> str:
    """An identity of a rule, checked; returned as written."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected an identity (anonymous, authenticated, *, user:NAME, cert:CN), got {text!r}")
    if text in (ANYONE, AUTHENTICATED, ANONYMOUS_KIND):
        return text
    prefix, sep, name = text.partition(":")
    if not sep or prefix not in _PREFIXES or not name or not name.isprintable():
        raise ValueError(f"invalid identity {text!r}: use anonymous, authenticated, *, user:NAME, user:*, "
                         "cert:COMMON-NAME or cert:*")
    return text


def parse_network(text: object) -> Network:
    """``10.0.0.0/8``, ``2001:db8::/32``, or one address. Host bits set are refused: a typo
    there would silently widen or move the network."""
    if not isinstance(text, str):
        raise ValueError(f"expected a network such as 10.0.0.0/8 or 2001:db8::/32, got {text!r}")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"invalid network {text!r}: {exc}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_V4_MAPPED):
        raise ValueError(f"network {text!r} is IPv4-mapped: write the IPv4 network (clients connecting "
                         "over IPv6 with such addresses are matched as IPv4)")
    return network


def parse_repository_pattern(text: object) -> str:
    if not isinstance(text, str) or not _PATTERN.fullmatch(text) or "//" in text or text.startswith("/"):
        raise ValueError(f"invalid repository pattern {text!r} (lowercase name, may use * and ?, e.g. "
                         "docker.io/library/*, ghcr.io/myorg/*, or * for every repository)")
    return text


@functools.lru_cache(maxsize=4096)      # clients come back: parsing an address costs microseconds
def client_address(host: str | None) -> Address | None:
    """The TCP peer as an address (an IPv4-mapped IPv6 address as the IPv4 one); None if it is
    no IP address (a Unix socket)."""
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Rule:
    """One rule as configured (``index``: its place in ``access:``, ``line``: in the file)."""

    allow: bool
    identities: tuple[str, ...]
    networks: tuple[Network, ...] | None = None      # None: from anywhere
    repositories: tuple[str, ...] = ("*",)
    index: int = 0
    line: int | None = None

    @property
    def action(self) -> str:
        return "allow" if self.allow else "deny"

    def where(self) -> str:
        """``access[2] (line 14)``: how messages name the rule."""
        return f"access[{self.index}]" + (f" (line {self.line})" if self.line is not None else "")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: Rule | None        # None: no rule matched (default deny), or there are no rules

    def describe(self) -> str:
        if self.rule is not None:
            return f"{self.rule.action} by {self.rule.where()}"
        return "denied: no rule matches (default deny)" if not self.allowed else "allowed: no rules"


_NO_RULES, _DEFAULT_DENY = Decision(True, None), Decision(False, None)


@dataclass(frozen=True)
class _Repos:
    """A rule's repository patterns, each as (registry key or None for any, glob or None for any)."""

    patterns: tuple[tuple[str | None, re.Pattern[str] | None, str], ...]

    def match(self, key: str, full: str) -> bool:
        for registry, glob, _ in self.patterns:
            if registry is None or (registry == key and (glob is None or glob.match(full))):
                return True
        return False

    def covers(self, other: _Repos) -> bool:
        return all(any(_pattern_covers(mine, theirs) for mine in self.patterns) for theirs in other.patterns)

    @property
    def everything(self) -> bool:
        return any(registry is None for registry, _, _ in self.patterns)


def _pattern_covers(mine: tuple, theirs: tuple) -> bool:
    """Whether every repository ``theirs`` matches, ``mine`` matches too (conservatively: False
    when unsure)."""
    registry, glob, text = mine
    their_registry, their_glob, their_text = theirs
    if registry is None:
        return True
    if their_registry != registry:
        return False
    if glob is None:
        return True
    if their_glob is None:
        return False
    if text == their_text:
        return True
    # with only * as wildcards in mine, matching their pattern as text means containing it
    if "?" not in text and "[" not in text:
        return fnmatch.fnmatchcase(their_text, text)
    return not any(c in their_text for c in "*?[") and fnmatch.fnmatchcase(their_text, text)


def compile_patterns(patterns: Iterable[str], table: RegistryTable) -> _Repos:
    """Raises UnknownRegistry for a pattern naming a registry that is not configured."""
    compiled = []
    for pattern in patterns:
        if pattern == "*":
            compiled.append((None, None, pattern))
            continue
        first, _, rest = pattern.partition("/")
        if rest == "*" and table.lookup(first) is not None:
            compiled.append((table.lookup(first), None, pattern))
            continue
        full = table.pattern(pattern)
        compiled.append((full.partition("/")[0], re.compile(fnmatch.translate(full)), full))
    return _Repos(tuple(compiled))


def _names(identities: Iterable[str], identity: Identity) -> bool:
    """Whether a rule's identities name ``identity`` (``*``, its kind's wildcard, itself...)."""
    return not identity.names.isdisjoint(identities)


def _names_any_of(identities: Sequence[str], kind: str) -> str:
    """How a rule's identities name clients of ``kind``: "all", "some" or ""."""
    prefix = "user" if kind == USER else "cert"
    if any(p in (ANYONE, AUTHENTICATED, f"{prefix}:*") for p in identities):
        return "all"
    return "some" if any(p.startswith(prefix + ":") for p in identities) else ""


def _identities_cover(mine: Sequence[str], theirs: Sequence[str]) -> bool:
    def covered(pattern: str) -> bool:
        if pattern in mine or ANYONE in mine:
            return True
        if pattern == ANONYMOUS_KIND or pattern == ANYONE:
            return False
        if AUTHENTICATED in mine:
            return True
        return pattern != AUTHENTICATED and f"{pattern.partition(':')[0]}:*" in mine

    return all(covered(pattern) for pattern in theirs)


def _networks_cover(mine: tuple[Network, ...] | None, theirs: tuple[Network, ...] | None) -> bool:
    if mine is None:
        return True
    if theirs is None:
        return False
    return all(any(n.version == t.version and t.subnet_of(n) for n in mine) for t in theirs)  # type: ignore[arg-type]


def _from(networks: tuple[Network, ...] | None, address: Address | None) -> bool:
    if networks is None:
        return True
    return address is not None and any(address in network for network in networks)


@dataclass(frozen=True)
class Rules:
    """The configured rules, compiled against the registry table."""

    rules: tuple[Rule, ...]
    table: RegistryTable
    _repos: tuple[_Repos, ...] = field(init=False, repr=False, compare=False)
    # per rule, what decide() needs: its identities as a set, networks, patterns and its Decision
    _compiled: tuple[tuple[frozenset[str], tuple[Network, ...] | None, _Repos, Decision], ...] = \
        field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        repos = tuple(compile_patterns(r.repositories, self.table) for r in self.rules)
        object.__setattr__(self, "_repos", repos)
        object.__setattr__(self, "_compiled", tuple(
            (frozenset(rule.identities), rule.networks, patterns, Decision(rule.allow, rule))
            for rule, patterns in zip(self.rules, repos, strict=True)))

    def __bool__(self) -> bool:
        return bool(self.rules)

    @property
    def per_repository(self) -> bool:
        """Some rule names repositories: who may pull depends on the repository, not only on who asks."""
        return any(rule.repositories != ("*",) for rule in self.rules)

    def decide(self, identity: Identity, address: Address | None, key: str, repository: str) -> Decision:
        """The first rule that matches decides; none: denied (there are rules) or allowed (none)."""
        if not self.rules:
            return _NO_RULES
        full = f"{key}/{repository}"
        names = identity.names
        for identities, networks, repos, decision in self._compiled:
            if not names.isdisjoint(identities) and _from(networks, address) and repos.match(key, full):
                return decision
        return _DEFAULT_DENY

    def could_allow(self, kind: str, address: Address | None, key: str, repository: str) -> bool:
        """Whether some client of ``kind`` (user or certificate) from ``address`` may pull the
        repository: an anonymous client refused is told to authenticate only if that could help."""
        full = f"{key}/{repository}"
        for rule, repos in zip(self.rules, self._repos):
            named = _names_any_of(rule.identities, kind)
            if not named or not _from(rule.networks, address) or not repos.match(key, full):
                continue
            if rule.allow:
                return True
            if named == "all":
                return False
        return False

    def anonymous_may_pull(self, address: Address | None) -> bool:
        """Whether an anonymous client from ``address`` may pull anything at all."""
        from dockermirror.access.identity import ANONYMOUS

        return self.may_pull(ANONYMOUS, address)

    def may_pull(self, identity: Identity, address: Address | None) -> bool:
        """Whether ``identity`` from ``address`` may pull anything at all."""
        for rule, repos in zip(self.rules, self._repos):
            if not _names(rule.identities, identity) or not _from(rule.networks, address):
                continue
            if rule.allow:
                return True
            if repos.everything:
                return False
        return not self.rules

    def shadowed(self) -> list[tuple[Rule, tuple[Rule, ...]]]:
        """(rule, earlier rules) for each rule that can never decide: the earlier rules together
        match every request it matches (one of them, when one is enough). Sound, not complete:
        a rule reported never decides; see :meth:`_covered_together` for what is looked at."""
        found: list[tuple[Rule, tuple[Rule, ...]]] = []
        for j, (rule, repos) in enumerate(zip(self.rules, self._repos, strict=True)):
            earlier = list(zip(self.rules[:j], self._repos[:j], strict=True))
            single = next((e for e, e_repos in earlier
                           if _identities_cover(e.identities, rule.identities)
                           and _networks_cover(e.networks, rule.networks) and e_repos.covers(repos)), None)
            if single is not None:
                found.append((rule, (single,)))
                continue
            together = self._covered_together(rule, repos, earlier)
            if together:
                found.append((rule, tuple(sorted(together, key=lambda r: r.index))))
        return found

    def _covered_together(self, rule: Rule, repos: _Repos, earlier: list[tuple[Rule, _Repos]]) -> set[Rule]:
        """The earlier rules that together match every request ``rule`` matches; empty if that
        is not shown. The rule is cut into pieces: each identity it names (``*`` as anonymous,
        user:* and cert:*; ``authenticated`` as user:* and cert:*), each repository pattern
        (``*`` as REGISTRY/* for each configured registry), each network. A piece is covered
        when the earlier rules that name its identity and have a pattern covering its pattern
        (each by itself, as for one rule) together cover its network: their networks' union
        (``from`` anywhere, which includes clients without an IP address, only by a rule
        without ``from``). Not found: an identity or a pattern covered only by several earlier
        ones together (``library/a*`` and ``library/[!a]*`` for ``library/*``; user:a and user:b
        never cover user:*)."""
        used: set[Rule] = set()
        patterns = [piece for pattern in repos.patterns for piece in self._registry_patterns(pattern)]
        for identity in _identity_pieces(rule.identities):
            for pattern in patterns:
                candidates = [e for e, e_repos in earlier if _identities_cover(e.identities, (identity,))
                              and any(_pattern_covers(mine, pattern) for mine in e_repos.patterns)]
                for network in rule.networks if rule.networks is not None else (None,):
                    covering = _networks_union_cover(network, candidates)
                    if covering is None:
                        return set()
                    used.update(covering)
        return used

    def _registry_patterns(self, pattern: tuple) -> list[tuple]:
        """``*`` (every repository of every upstream) as ``REGISTRY/*`` for each configured one:
        a request is always routed to one of them."""
        if pattern[0] is not None:
            return [pattern]
        return [(key, None, f"{key}/*") for key in self.table.keys]


def _identity_pieces(identities: Sequence[str]) -> list[str]:
    pieces: list[str] = []
    for identity in identities:
        if identity == ANYONE:
            pieces += [ANONYMOUS_KIND, "user:*", "cert:*"]
        elif identity == AUTHENTICATED:
            pieces += ["user:*", "cert:*"]
        else:
            pieces.append(identity)
    return pieces


def _networks_union_cover(network: Network | None, candidates: list[Rule]) -> list[Rule] | None:
    """Rules among ``candidates`` whose networks together hold ``network`` (None: from anywhere,
    held only by a rule without ``from``); None if they do not."""
    for candidate in candidates:
        if candidate.networks is None:
            return [candidate]
    if network is None:
        return None
    remaining: list[Network] = [network]
    used: list[Rule] = []
    for candidate in candidates:
        for theirs in candidate.networks or ():
            if theirs.version != network.version:
                continue
            left: list[Network] = []
            for piece in remaining:
                if piece.subnet_of(theirs):     # type: ignore[arg-type]
                    pass
                elif theirs.subnet_of(piece):   # type: ignore[arg-type]
                    left.extend(piece.address_exclude(theirs))  # type: ignore[arg-type]
                else:
                    left.append(piece)          # apart
                    continue
                if candidate not in used:
                    used.append(candidate)
            remaining = left
            if not remaining:
                return used
    return None
