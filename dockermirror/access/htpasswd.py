"""htpasswd files with bcrypt entries, and HTTP Basic credentials checked against them.

Only bcrypt (``$2y$``, ``$2b$``, ``$2a$``, as ``htpasswd -B`` writes) is accepted: any other
entry (MD5 ``$apr1$``, ``{SHA}``, crypt, plain text) is refused with its file and line, never
echoing what it holds.

A bcrypt check costs about 0.2 s of CPU at cost 12, so a verified credential is remembered
for a short time: the cache holds HMAC-SHA256 digests of user and password under a key drawn
at random for each process (never the password itself), with a time to live and an LRU bound.
A wrong password is never remembered; an unknown user costs a bcrypt check at the file's highest
cost, and a wrong password of a user with a lower cost takes as long, so the time an answer takes
does not tell which users exist (a file mixes costs: ``htpasswd -B`` writes 5, ``user add`` 12).
While the checks are busy (a flood of wrong passwords), a credential verified before, with the
same file, answers without a new check for up to a day: a flood cannot lock out a user whose
remembered credential ran out.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt

from dockermirror import smallfile

CACHE_TTL = 300.0       # seconds a verified credential is remembered (auth.cache_ttl)
CACHE_SIZE = 10_000     # credentials remembered at most (least recently used go first)
STALE_TRUST = 86_400.0  # seconds a verified credential still answers while the checks are busy
MAX_PASSWORD = 72       # bytes: bcrypt reads no more (longer passwords are refused, not cut)
MAX_USER = 256          # characters in a user name
WEAK_COST = 10          # bcrypt costs below this are warned about (htpasswd -B uses 5)

# the per-process key of the credential cache: digests from another process are worthless
_KEY = secrets.token_bytes(32)
# HMAC-SHA256 under that key, keyed once: each credential's digest starts from a copy (every new
# HMAC, hmac.digest() too, looks SHA-256 up in OpenSSL again: half the cost of a remembered check)
_MAC = hmac.new(_KEY, digestmod=hashlib.sha256)

_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_USER = re.compile(r"[^\s:\x00-\x1f\x7f-\x9f]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# a bcrypt hash of nothing anyone knows, at cost 4; an unknown user is checked against it
# with the cost of the file's own entries
_DUMMY = bcrypt.hashpw(secrets.token_bytes(16).hex().encode(), bcrypt.gensalt(4)).decode()


class HtpasswdError(Exception):
    """A problem with an htpasswd file, located by file and line (the entry is never shown)."""

    def __init__(self, message: str, *, source: str = "", line: int | None = None) -> None:
        self.message, self.source, self.line = message, source, line
        where = source + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: {message}" if where else message)


def check_user(name: str) -> str | None:
    """Why ``name`` cannot be a user name, or None if it can."""
    if not name:
        return "the user name is empty"
    if len(name) > MAX_USER:
        return f"the user name is longer than {MAX_USER} characters"
    if not _USER.fullmatch(name):
        return "a user name cannot hold ':', spaces or control characters"
    if name.startswith("#"):
        return "a user name cannot start with '#' (that line would be a comment)"
    return None


def _kind(value: str) -> str:
    """What a refused hash is, in words (never the hash itself)."""
    if value.startswith("$apr1$"):
        return "an MD5 ($apr1$) hash"
    if value.startswith("{SHA}"):
        return "a SHA-1 ({SHA}) hash"
    if value.startswith(("$1$", "$5$", "$6$", "$y$", "$7$", "$sha1$", "$md5")):
        return f"a crypt(3) {value[: value.index('$', 1) + 1]} hash"
    if value.startswith("$2"):
        return "a malformed bcrypt hash"
    if len(value) == 13 and re.fullmatch(r"[./A-Za-z0-9]{13}", value):
        return "a DES crypt hash"
    return "not a bcrypt hash (plain text or an unknown scheme)"


def parse(text: str, source: str = "<string>") -> dict[str, str]:
    """``user -> bcrypt hash`` from the text of an htpasswd file; HtpasswdError on any other entry."""
    users: dict[str, tuple[str, int]] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, colon, value = line.partition(":")
        if not colon:
            raise HtpasswdError("not an entry (USER:HASH), a comment (#) or a blank line", source=source, line=number)
        problem = check_user(user)
        if problem:
            raise HtpasswdError(problem, source=source, line=number)
        value = value.rstrip()
        if not _BCRYPT.fullmatch(value):
            raise HtpasswdError(f"user {user!r}: {_kind(value)}; only bcrypt is accepted (make it with "
                                "docker-mirror user add, or htpasswd -B)", source=source, line=number)
        if user in users:
            raise HtpasswdError(f"user {user!r} is given twice (first on line {users[user][1]})",
                                source=source, line=number)
        users[user] = (value, number)
    return {user: value for user, (value, _) in users.items()}


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
# bcrypt checks queued or running in this process at most (a check takes about 0.2 s of a core):
# a flood of new wrong passwords gets "busy" answers at once instead of a queue that delays
# every legitimate first login without bound
MAX_CHECKING = 64
_checking = 0


class CheckersBusy(Exception):
    """Too many password checks are waiting: try again shortly (no check was made)."""


def _bcrypt_pool() -> ThreadPoolExecutor:
    """The threads bcrypt checks run in: one per core, apart from the workers that move bytes,
    so a burst of wrong passwords cannot take every worker thread."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="bcrypt")
        return _pool


class Htpasswd:
    """The users of one htpasswd file, and the credentials verified lately."""

    def __init__(self, users: dict[str, str], *, source: str = "<string>", digest: str = "",
                 cache_ttl: float = CACHE_TTL, cache_size: int = CACHE_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source, self.digest = source, digest
        self.cache_ttl, self.cache_size, self._clock = cache_ttl, cache_size, clock
        self._users = {user: value.encode() for user, value in users.items()}
        # an unknown user is checked at the highest cost; a wrong password at a lower one is made
        # to take as long as the last check at that cost took
        self._cost = max((int(value[4:6]) for value in users.values()), default=12)
        self._dummy = f"$2b${self._cost:02d}${_DUMMY[7:]}".encode()
        self._slowest = 0.0         # seconds the last check at self._cost took
        # credential -> when it was last verified (kept up to STALE_TRUST for busy times)
        self._verified: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._checking: dict[bytes, asyncio.Future[bool]] = {}
        # what the server logs when it loads the file (it still uses it)
        self.warnings: list[str] = []
        weak = [user for user, value in users.items() if int(value[4:6]) < WEAK_COST]
        if weak:
            self.warnings.append(f"{source}: bcrypt cost below {WEAK_COST} for {', '.join(weak[:5])}"
                                 f"{f' and {len(weak) - 5} more' if len(weak) > 5 else ''}: quick to guess "
                                 "if the file leaks (docker-mirror user add uses 12; htpasswd -B -C 12)")

    @classmethod
    def load(cls, path: Path | str, *, cache_ttl: float = CACHE_TTL, cache_size: int = CACHE_SIZE,
             clock: Callable[[], float] = time.monotonic) -> Htpasswd:
        path = Path(path)
        try:
            data, st = smallfile.read(path, smallfile.HTPASSWD_MAX)    # not a FIFO, a device or a huge file
            mode = st.st_mode
        except OSError as exc:
            raise HtpasswdError(f"cannot read the htpasswd file: {exc.strerror}", source=str(path)) from None
        if mode & 0o002:
            raise HtpasswdError("every user can write this file (and so add a user): chmod o-w, "
                                "e.g. 640 root:docker-mirror", source=str(path))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise HtpasswdError("not UTF-8 text", source=str(path), line=line) from None
        users = cls(parse(text, str(path)), source=str(path), digest=hashlib.sha256(data).hexdigest(),
                    cache_ttl=cache_ttl, cache_size=cache_size, clock=clock)
        if mode & 0o004:
            users.warnings.append(f"{path}: every user can read it (and try to guess its passwords): "
                                  "chmod 640, owned root:docker-mirror")
        return users

    @property
    def users(self) -> list[str]:
        return list(self._users)

    def __contains__(self, user: str) -> bool:
        return user in self._users

    def __len__(self) -> int:
        return len(self._users)

    # --- checking

    def verify(self, user: str, password: str) -> bool:
        """Whether ``password`` is ``user``'s. Blocks for a bcrypt check unless the credential
        was verified lately: call it in a worker thread (or await :meth:`check`)."""
        key = _cache_key(user, password)
        if self._remembered(key):
            return True
        return self._verify(user, password, key)

    async def check(self, user: str, password: str) -> bool:
        """:meth:`verify` for the event loop: a remembered credential answers at once, else the
        bcrypt check runs in a thread (one for concurrent requests with the same credential)."""
        key = _cache_key(user, password)
        if self._remembered(key):
            return True
        running = self._checking.get(key)
        if running is None:
            global _checking
            if _checking >= MAX_CHECKING:
                if self._remembered(key, busy=True):    # verified before, with this very file
                    return True
                raise CheckersBusy()
            _checking += 1
            loop = asyncio.get_running_loop()
            running = asyncio.ensure_future(loop.run_in_executor(_bcrypt_pool(), self._verify, user, password, key))
            self._checking[key] = running

            def done(_: object) -> None:
                global _checking
                _checking -= 1
                self._checking.pop(key, None)

            running.add_done_callback(done)
        return await asyncio.shield(running)

    def _verify(self, user: str, password: str, key: bytes) -> bool:
        stored = self._users.get(user)
        try:
            secret = password.encode("utf-8")
        except UnicodeEncodeError:
            secret = b"\x00"
        if len(secret) > MAX_PASSWORD or b"\x00" in secret:
            # bcrypt would cut it (or refuse it): never a match, at the same cost
            stored, secret = None, b""
        hashed = stored if stored is not None else self._dummy
        started = time.perf_counter()
        ok = bcrypt.checkpw(secret, hashed) and stored is not None
        took = time.perf_counter() - started
        if ok:
            self._remember(key)
        elif int(hashed[4:6]) >= self._cost:
            self._slowest = took
        elif self._slowest > took:      # a wrong password of a cheaper entry: as slow as the rest
            time.sleep(min(self._slowest - took, 10.0))
        return ok

    # --- the cache of verified credentials

    def _remembered(self, key: bytes, *, busy: bool = False) -> bool:
        """Whether ``key`` was verified less than cache_ttl ago (with ``busy``: STALE_TRUST ago)."""
        with self._lock:
            verified = self._verified.get(key)
            if verified is None:
                return False
            age = self._clock() - verified
            if age >= max(self.cache_ttl, STALE_TRUST):
                del self._verified[key]
                return False
            if age >= self.cache_ttl and not busy:
                return False
            self._verified.move_to_end(key)
            return True

    def _remember(self, key: bytes) -> None:
        if self.cache_ttl <= 0 or self.cache_size <= 0:
            return
        with self._lock:
            self._verified[key] = self._clock()
            self._verified.move_to_end(key)
            while len(self._verified) > self.cache_size:
                self._verified.popitem(last=False)

    def forget(self) -> None:
        """Drop every remembered credential."""
        with self._lock:
            self._verified.clear()


def _cache_key(user: str, password: str) -> bytes:
    """HMAC-SHA256 of user and password under the process's key (length-prefixed: unambiguous)."""
    u = user.encode("utf-8", "surrogatepass")
    p = password.encode("utf-8", "surrogatepass")
    mac = _MAC.copy()
    mac.update(len(u).to_bytes(4, "big") + u + p)
    return mac.digest()


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic ...`` value; None for any other scheme
    or anything malformed (bad base64, not UTF-8, no ':', control characters, an empty user)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "basic" or not token or len(token) > 8192:
        return None
    try:
        # strict: only the base64 alphabet, padding only at the end (as b64decode(validate=True))
        decoded = binascii.a2b_base64(token, strict_mode=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(":")
    if not colon or not user or _CONTROL.search(decoded):
        return None
    return user, password
