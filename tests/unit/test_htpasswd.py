"""htpasswd (Basic auth): bcrypt entries only, each other kind refused with its file and line;
verified credentials remembered under a per-process key (a hit costs no bcrypt check, a
wrong password is never remembered, an unknown user costs a check too); ``parse_basic``;
``docker-mirror user add|del|list``; the file loaded at start and re-read on reload."""

from __future__ import annotations

import asyncio
import base64
import grp
import io
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import bcrypt
import pytest

from dockermirror import cli, config as configuration
from dockermirror.access import htpasswd as module
from dockermirror.access.htpasswd import Htpasswd, HtpasswdError, parse_basic
from dockermirror.app import DockerMirror
from tests.unit.conftest import UPSTREAM, config_text
from tests.unit.fakes import FakeClock

ALICE = bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(4)).decode()     # $2b$04$...
BOB = bcrypt.hashpw(b"bob-pw", bcrypt.gensalt(4)).decode()
SECRET_HASH = "$apr1$Zx9aQ3$0123456789abcdefghijkl"


def write(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(mode)
    return path


class Counting:
    """bcrypt.checkpw, counted (and the hashes it was given)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hashes: list[bytes] = []
        real = bcrypt.checkpw

        def checkpw(password: bytes, hashed: bytes) -> bool:
            self.hashes.append(hashed)
            return real(password, hashed)

        monkeypatch.setattr(module.bcrypt, "checkpw", checkpw)

    @property
    def calls(self) -> int:
        return len(self.hashes)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counting:
    return Counting(monkeypatch)


# --- the file


REFUSED = [
    pytest.param(f"alice:{ALICE}\nbob:{SECRET_HASH}\n", 2, "MD5 ($apr1$)", id="apr1"),
    pytest.param("# users\nbob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", 2, "SHA-1 ({SHA})", id="sha"),
    pytest.param("bob:$1$saltsalt$qjXMvbEw8oaL.CzflDugX/\n", 1, "crypt(3) $1$", id="crypt-md5"),
    pytest.param("\n\nbob:$6$rounds=5000$salt$abcdefghijklmnop\n", 3, "crypt(3) $6$", id="crypt-sha512"),
    pytest.param("bob:abJnggxhB/yWI\n", 1, "DES crypt", id="crypt-des"),
    pytest.param("bob:hunter2hunter2\n", 1, "plain text or an unknown scheme", id="plain"),
    pytest.param("bob:\n", 1, "plain text or an unknown scheme", id="empty-hash"),
    pytest.param(f"bob:{ALICE[:40]}\n", 1, "malformed bcrypt", id="bcrypt-cut"),
    pytest.param(f"bob:$2b$03${ALICE[7:]}\n", 1, "malformed bcrypt", id="bcrypt-cost-too-low"),
    pytest.param(f"bob:$2x${ALICE[4:]}\n", 1, "malformed bcrypt", id="bcrypt-2x"),
    pytest.param("# a comment\nhunter2\n", 2, "not an entry (USER:HASH)", id="no-colon"),
    pytest.param(f"bob smith:{ALICE}\n", 1, "cannot hold ':', spaces or control characters", id="user-space"),
    pytest.param(f"bo\x1bb:{ALICE}\n", 1, "cannot hold ':', spaces or control characters", id="user-control"),
    pytest.param(f":{ALICE}\n", 1, "the user name is empty", id="user-empty"),
    pytest.param(f"{'u' * 257}:{ALICE}\n", 1, "longer than 256", id="user-too-long"),
    pytest.param(f"alice:{ALICE}\n# x\nbob:{BOB}\nalice:{BOB}\n", 4, "user 'alice' is given twice (first on line 1)",
                 id="duplicate"),
]


@pytest.mark.parametrize("text, line, words", REFUSED)
def test_every_entry_but_bcrypt_is_refused_with_file_and_line(tmp_path: Path, text: str, line: int, words: str):
    path = write(tmp_path / "htpasswd", text)
    with pytest.raises(HtpasswdError) as caught:
        Htpasswd.load(path)
    error = caught.value
    assert (error.source, error.line) == (str(path), line)
    assert str(error).startswith(f"{path}:{line}: ")
    assert words in error.message
    bad = text.split("\n")[line - 1].partition(":")[2]
    if len(bad) > 3:
        assert bad not in str(error)          # neither the hash nor a password is echoed
    assert "hunter2" not in str(error)


def test_not_utf8_names_its_line(tmp_path: Path):
    path = write(tmp_path / "htpasswd", f"alice:{ALICE}\n".encode() + b"b\xffb:" + BOB.encode() + b"\n")
    with pytest.raises(HtpasswdError, match=rf"^{path}:2: not UTF-8 text$"):
        Htpasswd.load(path)


def test_a_file_anyone_can_write_is_refused(tmp_path: Path):
    path = write(tmp_path / "htpasswd", f"alice:{ALICE}\n", 0o606)
    with pytest.raises(HtpasswdError, match="every user can write this file"):
        Htpasswd.load(path)


def test_weak_costs_and_a_file_anyone_can_read_are_warned_about(tmp_path: Path):
    strong = bcrypt.hashpw(b"pw", bcrypt.gensalt(10)).decode()
    assert Htpasswd.load(write(tmp_path / "good", f"carol:{strong}\n", 0o640)).warnings == []
    path = write(tmp_path / "htpasswd", f"alice:{ALICE}\ncarol:{strong}\nbob:{BOB}\n", 0o644)
    users = Htpasswd.load(path)
    assert users.users == ["alice", "carol", "bob"]              # used all the same
    assert len(users.warnings) == 2
    assert users.warnings[0].startswith(f"{path}: bcrypt cost below 10 for alice, bob: ")
    assert users.warnings[1].startswith(f"{path}: every user can read it")


def test_a_missing_file_is_one_line(tmp_path: Path):
    with pytest.raises(HtpasswdError, match=rf"^{tmp_path}/nothing: cannot read the htpasswd file: No such file"):
        Htpasswd.load(tmp_path / "nothing")


def test_bcrypt_variants_comments_and_blank_lines_are_read(tmp_path: Path):
    carol = bcrypt.hashpw(b"carol-pw", bcrypt.gensalt(4)).decode()
    text = (f"# the users\n\nalice:$2y${ALICE[4:]}\r\n   # indented comment\n  \n"
            f"bob:$2a${BOB[4:]}\ncarol:{carol}")       # CRLF, no newline at the end
    users = Htpasswd.load(write(tmp_path / "htpasswd", text))
    assert users.users == ["alice", "bob", "carol"]
    assert users.verify("alice", "alice-pw") and users.verify("bob", "bob-pw") and users.verify("carol", "carol-pw")


# --- verify


def test_verify_right_wrong_and_unknown(tmp_path: Path, counted: Counting):
    users = Htpasswd.load(write(tmp_path / "htpasswd", f"alice:{ALICE}\nbob:{BOB}\n"))
    assert users.verify("alice", "alice-pw") is True
    assert users.verify("alice", "bob-pw") is False
    assert users.verify("bob", "alice-pw") is False
    assert users.verify("Alice", "alice-pw") is False
    assert users.verify("nobody", "alice-pw") is False
    assert users.verify("alice", "") is False


def test_an_unknown_user_costs_a_bcrypt_check_at_the_files_cost(counted: Counting):
    users = Htpasswd(module.parse(f"alice:{ALICE}\nbob:{BOB}\n"))
    assert users.verify("nobody", "x") is False
    assert counted.calls == 1
    assert counted.hashes[0].startswith(b"$2b$04$") and counted.hashes[0] not in (ALICE.encode(), BOB.encode())
    assert Htpasswd({}).verify("nobody", "x") is False            # an empty file: cost 12, still a check
    assert counted.calls == 2 and counted.hashes[1].startswith(b"$2b$12$")


def test_passwords_bcrypt_would_cut_or_refuse_never_match(counted: Counting):
    long = "p" * 72
    users = Htpasswd({"alice": bcrypt.hashpw(long.encode(), bcrypt.gensalt(4)).decode()})
    assert users.verify("alice", long) is True
    assert users.verify("alice", long + "more") is False           # bcrypt would compare the first 72 bytes
    assert users.verify("alice", long[:10] + "\x00" + long[11:]) is False
    assert counted.calls == 3                                     # and each costs a check all the same


# --- the cache of verified credentials


def test_a_remembered_credential_costs_no_bcrypt(counted: Counting):
    users = Htpasswd({"alice": ALICE})
    assert users.verify("alice", "alice-pw") and counted.calls == 1
    for _ in range(30):
        assert users.verify("alice", "alice-pw")
    assert counted.calls == 1
    assert users.verify("alice", "alice-pw2") is False and counted.calls == 2    # not the same credential


def test_a_wrong_password_is_never_remembered(counted: Counting):
    users = Htpasswd({"alice": ALICE})
    for n in range(1, 4):
        assert users.verify("alice", "wrong") is False
        assert counted.calls == n
    assert users.verify("nobody", "x") is False and users.verify("nobody", "x") is False
    assert counted.calls == 5


def test_remembered_for_the_ttl_only(counted: Counting):
    clock = FakeClock()
    users = Htpasswd({"alice": ALICE}, cache_ttl=300, clock=clock)
    assert users.verify("alice", "alice-pw") and counted.calls == 1
    clock.advance(299)
    assert users.verify("alice", "alice-pw") and counted.calls == 1
    clock.advance(1)
    assert users.verify("alice", "alice-pw") and counted.calls == 2
    never = Htpasswd({"alice": ALICE}, cache_ttl=0, clock=clock)
    assert never.verify("alice", "alice-pw") and never.verify("alice", "alice-pw") and counted.calls == 4


def test_the_cache_is_bounded_least_recently_used_first(counted: Counting):
    users = Htpasswd({"alice": ALICE, "bob": BOB}, cache_size=1)
    assert users.verify("alice", "alice-pw") and users.verify("bob", "bob-pw") and counted.calls == 2
    assert users.verify("bob", "bob-pw") and counted.calls == 2
    assert users.verify("alice", "alice-pw") and counted.calls == 3     # bob pushed alice out
    assert len(users._verified) == 1


def test_a_new_file_starts_a_new_cache(tmp_path: Path, counted: Counting):
    path = write(tmp_path / "htpasswd", f"alice:{ALICE}\n")
    first = Htpasswd.load(path)
    assert first.verify("alice", "alice-pw") and first.verify("alice", "alice-pw") and counted.calls == 1
    again = Htpasswd.load(write(path, f"alice:{BOB}\n"))                 # alice's password changed
    assert again.verify("alice", "alice-pw") is False and counted.calls == 2
    assert again.verify("alice", "bob-pw") is True


def test_the_cache_key_is_random_per_process():
    code = "from dockermirror.access.htpasswd import _cache_key; print(_cache_key('alice', 'alice-pw').hex())"
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           timeout=60).stdout for _ in range(2)}
    assert len(keys) == 2
    assert module._cache_key("alice", "alice-pw") != module._cache_key("alice", "alice-pw2")
    assert module._cache_key("ab", "c") != module._cache_key("a", "bc")       # user and password kept apart
    users = Htpasswd({"alice": ALICE})
    users.verify("alice", "alice-pw")
    assert all(b"alice" not in key for key in users._verified)


def test_the_cache_key_is_hmac_sha256_under_the_process_key_every_time():
    """The key is made from a pre-keyed HMAC (copied for each credential): the same credential
    gets the same digest however many were made before, and it is HMAC-SHA256 of the
    length-prefixed user and password under the process's key."""
    import hashlib
    import hmac

    first = module._cache_key("alice", "alice-pw")
    module._cache_key("bob", "bob-pw")
    assert module._cache_key("alice", "alice-pw") == first
    assert first == hmac.new(module._KEY, b"\x00\x00\x00\x05alice" + b"alice-pw", hashlib.sha256).digest()


@pytest.mark.anyio
async def test_check_runs_bcrypt_once_for_concurrent_requests_and_not_for_a_hit(counted: Counting):
    users = Htpasswd({"alice": ALICE})
    results = await asyncio.gather(*(users.check("alice", "alice-pw") for _ in range(8)))
    assert results == [True] * 8 and counted.calls == 1
    assert await users.check("alice", "alice-pw") and counted.calls == 1
    assert await asyncio.gather(users.check("alice", "x"), users.check("nobody", "x")) == [False, False]
    assert counted.calls == 3


@pytest.mark.anyio
async def test_a_flood_of_new_passwords_gets_busy_answers_not_an_endless_queue(monkeypatch):
    """At most MAX_CHECKING bcrypt checks wait at once: the next new credential is told to come
    back (the guard answers 503 with Retry-After) at once; a remembered one still answers, and
    once the checks are done new ones are checked again."""
    release = threading.Event()
    real = bcrypt.checkpw

    def slow(password: bytes, hashed: bytes) -> bool:
        release.wait(30)
        return real(password, hashed)

    monkeypatch.setattr(module, "MAX_CHECKING", 3)
    users = Htpasswd({"alice": ALICE})
    assert await users.check("alice", "alice-pw")             # remembered from now on
    monkeypatch.setattr(module.bcrypt, "checkpw", slow)
    waiting = [asyncio.ensure_future(users.check("alice", f"guess-{n}")) for n in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(module.CheckersBusy):
        await users.check("alice", "guess-3")
    assert await users.check("alice", "alice-pw")             # no bcrypt: not held up
    same = asyncio.ensure_future(users.check("alice", "guess-0"))   # joins the running check
    release.set()
    assert await asyncio.gather(*waiting, same) == [False] * 4
    assert await users.check("alice", "guess-4") is False      # room again


@pytest.mark.anyio
async def test_a_flood_cannot_lock_out_a_user_whose_remembered_credential_ran_out(monkeypatch):
    """While the checks are busy, a credential verified before with the same file still answers
    (up to STALE_TRUST after it was last verified); a credential never verified is told busy.
    Its remembered time used to end at cache_ttl: every request of a user pulling all along was
    then a 503 for as long as the flood lasted."""
    release = threading.Event()
    real = bcrypt.checkpw

    def slow(password: bytes, hashed: bytes) -> bool:
        release.wait(30)
        return real(password, hashed)

    clock = FakeClock()
    monkeypatch.setattr(module, "MAX_CHECKING", 2)
    users = Htpasswd({"alice": ALICE, "bob": BOB}, cache_ttl=60, clock=clock)
    assert await users.check("alice", "alice-pw") and await users.check("bob", "bob-pw")
    clock.advance(3600)                                        # past cache_ttl
    monkeypatch.setattr(module.bcrypt, "checkpw", slow)
    flood = [asyncio.ensure_future(users.check("mallory", f"guess-{n}")) for n in range(2)]
    await asyncio.sleep(0)
    assert await users.check("alice", "alice-pw")              # busy: the earlier check vouches
    with pytest.raises(module.CheckersBusy):
        await users.check("alice", "another-pw")               # never verified: no
    clock.advance(module.STALE_TRUST)
    with pytest.raises(module.CheckersBusy):
        await users.check("bob", "bob-pw")                     # verified over a day ago: no
    release.set()
    assert await asyncio.gather(*flood) == [False, False]
    monkeypatch.setattr(module.bcrypt, "checkpw", real)
    assert await users.check("bob", "bob-pw")                  # not busy: checked again


def test_a_wrong_password_takes_as_long_for_a_cheap_entry_as_for_an_unknown_user():
    """A file that mixes bcrypt costs (htpasswd -B writes 5, user add 12): an unknown user is
    checked at the highest cost, and a wrong password of a cheaper entry is made to take as
    long. It used to take its own cost: the one costly entry (the admin's) stood out."""
    admin = bcrypt.hashpw(b"admin-pw", bcrypt.gensalt(10)).decode()
    users = Htpasswd({"alice": ALICE, "admin": admin})
    timed = {}
    for user in ("nobody", "alice", "admin", "alice"):
        started = time.perf_counter()
        assert users.verify(user, "wrong") is False
        timed.setdefault(user, []).append(time.perf_counter() - started)
    slow = min(timed["admin"])
    assert min(timed["nobody"]) >= 0.5 * slow, timed            # checked at cost 10, not 4 (a 50th)
    assert min(timed["alice"]) >= 0.5 * slow, timed             # cost 4 alone: a 50th of cost 10
    assert users.verify("alice", "alice-pw")                  # a right password is not slowed


@pytest.mark.anyio
async def test_the_guard_answers_busy_checkers_with_503_and_retry_after(monkeypatch):
    from dockermirror.access.guard import Guard
    from dockermirror.access.rules import Rules
    from dockermirror.errors import Unavailable
    from dockermirror.routing import RegistryTable

    users = Htpasswd({"alice": ALICE})

    async def busy(user: str, password: str) -> bool:
        raise module.CheckersBusy()

    monkeypatch.setattr(users, "check", busy)
    guard = Guard(Rules((), RegistryTable([("docker.io", ())])), users)
    with pytest.raises(Unavailable) as caught:
        await guard.identify({}, basic(b"alice:whatever"))
    assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "1"}


# --- parse_basic


def basic(raw: bytes) -> str:
    return "Basic " + base64.b64encode(raw).decode()


@pytest.mark.parametrize("header, expected", [
    (basic(b"alice:alice-pw"), ("alice", "alice-pw")),
    ("basic " + base64.b64encode(b"alice:pw").decode(), ("alice", "pw")),
    ("BASIC   " + base64.b64encode(b"alice:pw").decode() + "  ", ("alice", "pw")),
    (basic(b"alice:p:w:"), ("alice", "p:w:")),
    (basic(b"alice:"), ("alice", "")),
    (basic("j\u00f6rg:p\u00e4ss".encode()), ("j\u00f6rg", "p\u00e4ss")),
    (None, None),
    ("", None),
    ("Basic", None),
    ("Basic ", None),
    ("Bearer " + base64.b64encode(b"alice:pw").decode(), None),
    ("Basicx " + base64.b64encode(b"alice:pw").decode(), None),
    ("Basic !!!!", None),
    ("Basic YWxpY2U6cHc", None),                      # padding missing
    ("Basic YWxp Y2U6cHc=", None),
    (basic(b"alice"), None),                          # no colon
    (basic(b":pw"), None),                            # no user
    (basic(b"al\xffce:pw"), None),                    # not UTF-8
    (basic(b"alice:p\x00w"), None),
    (basic(b"ali\nce:pw"), None),
    (basic(b"alice:" + b"p" * 7000), None),           # longer than any header we read
    (basic(b"alice:p\x7fw"), None),                   # DEL
    (basic(b"alice:p\x1fw"), None),
    (basic("alice:p\u0085w".encode()), ("alice", "p\u0085w")),  # a C1 character is no ASCII control
    ("Basic YWxpY2U6cHc=YWxp", None),                 # data after the padding
    ("Basic =YWxpY2U6cHc=", None),                    # padding first
    ("Basic YWxpY2U6c\nHc=", None),                   # a line break inside
    ("Basic YWxpY2U6cHc=\u00e9", None),               # not ASCII
    ("Basic YWxpY2U-cHc=", None),                     # the URL-safe alphabet is not Basic's
])
def test_parse_basic(header, expected):
    assert parse_basic(header) == expected


# --- docker-mirror user add | del | list


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *argv: str, stdin: str = "",
            tty: bool = False) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: tty)
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def group_of_new_files() -> tuple[int, int]:
    try:
        return grp.getgrnam("docker-mirror").gr_gid, 0o640
    except KeyError:
        return os.getegid(), 0o600


KEPT = (b"# docker-mirror users\r\n"
        b"alice:" + ALICE.encode() + b"\r\n"
        b"\n"
        b"   # bob left\n"
        b"carol:" + BOB.encode())                      # CRLF lines and no newline at the end


def test_user_add_keeps_every_other_byte_and_the_mode(tmp_path, monkeypatch, capsys):
    path = write(tmp_path / "htpasswd", KEPT, 0o640)
    code, out, err = run_cli(monkeypatch, capsys, "user", "add", "dave", "--file", str(path), "--cost", "10",
                             stdin="dave-pw\n")
    assert (code, err) == (0, "")
    assert out.startswith(f"added dave in {path};")
    data = path.read_bytes()
    assert data.startswith(KEPT + b"\ndave:$2b$10$") and data.endswith(b"\n") and data.count(b"\n") == 6
    assert os.stat(path).st_mode & 0o777 == 0o640
    users = Htpasswd.load(path)
    assert users.users == ["alice", "carol", "dave"]
    assert users.verify("dave", "dave-pw") and users.verify("alice", "alice-pw")
    assert [p.name for p in tmp_path.iterdir()] == ["htpasswd"]        # no temporary file left


def test_user_add_changes_a_password_in_place(tmp_path, monkeypatch, capsys):
    path = write(tmp_path / "htpasswd", KEPT)
    code, out, _ = run_cli(monkeypatch, capsys, "user", "add", "alice", "--file", str(path), "--password-stdin",
                           "--cost", "10", stdin="new-pw\r\n")
    assert code == 0 and out.startswith("changed the password of alice")
    lines, before = path.read_bytes().split(b"\n"), KEPT.split(b"\n")
    assert len(lines) == len(before) and lines[0] == before[0] and lines[2:] == before[2:]
    assert lines[1].startswith(b"alice:$2b$10$") and lines[1].endswith(b"\r")     # its CRLF kept
    users = Htpasswd.load(path)
    assert users.verify("alice", "new-pw") and not users.verify("alice", "alice-pw")


def test_user_add_makes_a_new_file_with_cost_12_readable_by_the_service_only(tmp_path, monkeypatch, capsys):
    path = tmp_path / "htpasswd"
    code, _, _ = run_cli(monkeypatch, capsys, "user", "add", "alice", "--file", str(path), stdin="pw\n")
    assert code == 0
    assert path.read_bytes().startswith(b"alice:$2b$12$") and path.read_bytes().count(b"\n") == 1
    gid, mode = group_of_new_files()
    assert (os.stat(path).st_mode & 0o777, os.stat(path).st_gid) == (mode, gid)
    assert Htpasswd.load(path).verify("alice", "pw")


def test_user_add_asks_twice_on_a_terminal(tmp_path, monkeypatch, capsys):
    path = tmp_path / "htpasswd"
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    code, out, err = run_cli(monkeypatch, capsys, "user", "add", "alice", "--file", str(path), "--cost", "10",
                             tty=True)
    assert (code, out, err) == (2, "", "docker-mirror: password: the two passwords differ; give it again "
                                       "(user add alice)\n")
    assert not path.exists()
    answers = iter(["same", "same"])
    assert run_cli(monkeypatch, capsys, "user", "add", "alice", "--file", str(path), "--cost", "10", tty=True)[0] == 0
    assert Htpasswd.load(path).verify("alice", "same")


@pytest.mark.parametrize("name, password, words", [
    ("bob smith", "pw", "cannot hold ':', spaces or control characters"),
    ("bo:b", "pw", "cannot hold ':'"),
    ("#bob", "pw", "cannot start with '#'"),
    ("bob", "", "the password is empty"),
    ("bob", "p" * 73, "longer than 72 bytes"),
    ("bob", "p\tw", "control character"),
])
def test_user_add_refuses_what_could_never_log_in(tmp_path, monkeypatch, capsys, name, password, words):
    path = write(tmp_path / "htpasswd", KEPT)
    code, out, err = run_cli(monkeypatch, capsys, "user", "add", name, "--file", str(path), "--cost", "10",
                             stdin=password + "\n")
    assert code == 2 and out == ""    # the user's mistake (README: exit status 2), the key named
    assert err.startswith("docker-mirror: NAME: " if name != "bob" else "docker-mirror: password: ")
    assert words in err and err.count("\n") == 1 and "; " in err
    assert path.read_bytes() == KEPT


def test_user_del_and_list(tmp_path, monkeypatch, capsys):
    path = write(tmp_path / "htpasswd", KEPT, 0o640)
    assert run_cli(monkeypatch, capsys, "user", "list", "--file", str(path)) == (0, "alice\ncarol\n", "")
    code, out, err = run_cli(monkeypatch, capsys, "user", "del", "alice", "--file", str(path))
    assert (code, err) == (0, "") and out.startswith(f"removed alice from {path}")
    assert path.read_bytes() == KEPT.replace(b"alice:" + ALICE.encode() + b"\r\n", b"")
    assert os.stat(path).st_mode & 0o777 == 0o640
    code, out, err = run_cli(monkeypatch, capsys, "user", "del", "alice", "--file", str(path))
    assert (code, out, err) == (1, "", f"docker-mirror: no user 'alice' in {path}\n")
    assert run_cli(monkeypatch, capsys, "user", "list", "--file", str(path)) == (0, "carol\n", "")


def test_user_list_escapes_control_characters(tmp_path, monkeypatch, capsys):
    """A name written into the file by hand: its escape sequence is shown, not sent to the terminal."""
    path = write(tmp_path / "htpasswd", f"alice:{ALICE}\nev\x1b[2Jil:{ALICE}\n")
    code, out, _ = run_cli(monkeypatch, capsys, "user", "list", "--file", str(path))
    assert out == "alice\nev\\x1b[2Jil\n"
    assert "\x1b" not in out


def test_user_commands_on_a_refused_file_say_so(tmp_path, monkeypatch, capsys):
    path = write(tmp_path / "htpasswd", f"alice:{ALICE}\nbob:{SECRET_HASH}\n")
    code, out, err = run_cli(monkeypatch, capsys, "user", "list", "--file", str(path))
    assert (code, out) == (1, "alice\nbob\n") and f"{path}:2: user 'bob': an MD5" in err
    code, _, err = run_cli(monkeypatch, capsys, "user", "del", "bob", "--file", str(path))   # the way out
    assert (code, err) == (0, "")
    assert Htpasswd.load(path).users == ["alice"]


def test_user_commands_take_the_file_from_the_configuration(tmp_path, monkeypatch, capsys):
    path = tmp_path / "users"
    config = write(tmp_path / "config.yml", f"auth:\n  htpasswd: {path}\n")
    assert run_cli(monkeypatch, capsys, "user", "add", "alice", "--config", str(config), "--cost", "10",
                   stdin="pw\n")[0] == 0
    assert run_cli(monkeypatch, capsys, "user", "list", "--config", str(config)) == (0, "alice\n", "")
    empty = write(tmp_path / "empty.yml", "")
    code, out, err = run_cli(monkeypatch, capsys, "user", "list", "--config", str(empty))
    assert (code, out) == (2, "") and "set auth.htpasswd in the configuration, or give --file" in err
    code, _, err = run_cli(monkeypatch, capsys, "user", "list", "--file", str(tmp_path / "none"))
    assert (code, err) == (1, f"docker-mirror: no htpasswd file at {tmp_path / 'none'}\n")


# --- configuration, start and reload


def test_auth_settings_and_their_defaults(tmp_path):
    assert configuration.Config().auth == configuration.AuthConfig(htpasswd=None, cache_ttl=300.0)
    config = configuration.loads("auth:\n  htpasswd: /etc/docker-mirror/htpasswd\n  cache_ttl: 90s\n")
    assert (config.auth.htpasswd, config.auth.cache_ttl) == (Path("/etc/docker-mirror/htpasswd"), 90.0)
    with pytest.raises(configuration.ConfigError, match=r"^x:3: auth.cache_ttl: invalid duration"):
        configuration.loads("auth:\n  htpasswd: /h\n  cache_ttl: soon\n", source="x")


def test_check_config_and_serve_refuse_a_bad_file_with_its_line(tmp_path, capsys):
    users = write(tmp_path / "htpasswd", f"alice:{ALICE}\n\nbob:{SECRET_HASH}\n")
    path = write(tmp_path / "config.yml", config_text(tmp_path / "cache", f"auth:\n  htpasswd: {users}\n"))
    assert cli.main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"docker-mirror: auth.htpasswd: {users}:3: user 'bob'")
    assert SECRET_HASH not in err and err.count("\n") == 1
    serve = subprocess.run([sys.executable, "-m", "dockermirror", "serve", "--config", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert serve.returncode == 1
    assert f"docker-mirror: auth.htpasswd: {users}:3: user 'bob': an MD5 ($apr1$) hash" in serve.stderr
    assert "Traceback" not in serve.stderr and SECRET_HASH not in serve.stderr
    write(users, f"alice:{ALICE}\n")
    assert cli.main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().out.startswith("# auth.htpasswd: 1 user(s)\n")


def test_reload_rereads_the_file_and_keeps_the_old_users_when_it_is_bad(tmp_path, caplog, counted):
    users = write(tmp_path / "htpasswd", f"alice:{ALICE}\n")
    text = config_text(tmp_path / "cache", f"auth:\n  htpasswd: {users}\n")
    app = DockerMirror(configuration.loads(text))
    first = app.htpasswd
    assert first is not None and first.verify("alice", "alice-pw") and counted.calls == 1

    app.reconfigure(configuration.loads(text))                     # unchanged: the same users, still remembered
    assert app.htpasswd is first

    write(users, f"alice:{ALICE}\nbob:{SECRET_HASH}\n")
    with pytest.raises(HtpasswdError, match=rf"^{users}:2: user 'bob'") as refused:
        app.reconfigure(configuration.loads(text))
    assert SECRET_HASH not in str(refused.value)
    assert app.htpasswd is first and app.api.guard.htpasswd is first   # refused: the old users stay

    write(users, f"alice:{ALICE}\nbob:{BOB}\n")
    app.reconfigure(configuration.loads(text))
    assert app.htpasswd is not first and app.htpasswd.users == ["alice", "bob"]
    assert app.htpasswd.verify("bob", "bob-pw") and app.htpasswd.verify("alice", "alice-pw")
    assert counted.calls == 3                                      # a new file: a new cache

    app.reconfigure(configuration.loads(config_text(tmp_path / "cache")))
    assert app.htpasswd is None                                    # auth.htpasswd removed


@pytest.mark.parametrize("bad", ["md5", "missing", "writable"])
def test_a_reload_with_a_refused_file_changes_nothing(tmp_path, bad):
    """Adding auth.htpasswd to lock an open mirror down, with a file the start would refuse: the
    reload is refused whole (it used to apply the rest, the guard staying open to anonymous pulls
    while the configuration said htpasswd), and the other changes of that reload wait too."""
    users = tmp_path / "htpasswd"
    if bad == "md5":
        write(users, f"alice:{SECRET_HASH}\n")
    elif bad == "writable":
        write(users, f"alice:{ALICE}\n")
        users.chmod(0o666)
    app = DockerMirror(configuration.loads(config_text(tmp_path / "cache")))
    before = (app.config, app.api.guard, app.mirror.upstreams, app.mirror.tag_ttl)
    assert not app.api.guard.active
    new = configuration.loads(config_text(tmp_path / "cache", f"auth:\n  htpasswd: {users}\n")
                              .replace(UPSTREAM, "http://elsewhere.test"))
    assert new.default_upstream.url != app.config.default_upstream.url
    with pytest.raises(HtpasswdError, match=f"^{users}"):
        app.reconfigure(new)
    assert (app.config, app.api.guard, app.mirror.upstreams, app.mirror.tag_ttl) == before
    assert app.htpasswd is None


def test_no_htpasswd_configured_means_none(tmp_path):
    assert DockerMirror(configuration.loads(config_text(tmp_path / "cache"))).htpasswd is None


def test_a_bad_file_at_start_is_an_error(tmp_path):
    users = write(tmp_path / "htpasswd", f"alice:{SECRET_HASH}\n")
    text = config_text(tmp_path / "cache", f"auth:\n  htpasswd: {users}\n  cache_ttl: 1m\n")
    with pytest.raises(HtpasswdError, match=rf"^{users}:1: "):
        DockerMirror(configuration.loads(text))
    write(users, f"alice:{ALICE}\n")
    assert DockerMirror(configuration.loads(text)).htpasswd.cache_ttl == 60.0


# --- user add/del replace the file by a rename: never a symbolic link or a special file


def test_user_add_and_del_refuse_a_symbolic_link_and_change_nothing(tmp_path, monkeypatch, capsys):
    real = write(tmp_path / "real", f"alice:{ALICE}\n", 0o600)
    link = tmp_path / "htpasswd"
    link.symlink_to("real")
    for argv in (["add", "eve", "--cost", "10"], ["del", "alice"]):
        code, out, err = run_cli(monkeypatch, capsys, "user", *argv, "--file", str(link), stdin="pw\n")
        assert (code, out) == (2, "")
        assert err == f"docker-mirror: --file: {link} is a symbolic link; give the file itself ({real})\n"
        assert link.is_symlink() and os.readlink(link) == "real"
        assert real.read_text() == f"alice:{ALICE}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["htpasswd", "real"]
    # the same file named by auth.htpasswd: the key and the configuration say where
    config = write(tmp_path / "config.yml", f"auth:\n  htpasswd: {link}\n")
    code, _, err = run_cli(monkeypatch, capsys, "user", "add", "eve", "--config", str(config), stdin="pw\n")
    assert (code, err) == (2, f"docker-mirror: {config}: auth.htpasswd: {link} is a symbolic link; give the file "
                              f"itself ({real})\n")
    assert link.is_symlink() and real.read_text() == f"alice:{ALICE}\n"


def test_user_add_and_del_refuse_a_fifo_and_change_nothing(tmp_path, monkeypatch, capsys):
    fifo = tmp_path / "htpasswd"
    os.mkfifo(fifo)

    def feed() -> None:     # (without the check, the command would read this and replace the FIFO)
        try:
            with open(fifo, "wb") as f:
                f.write(f"alice:{ALICE}\n".encode())
        except BrokenPipeError:     # opened only to let this return
            pass

    for argv in (["add", "eve", "--cost", "10"], ["del", "alice"]):
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        code, out, err = run_cli(monkeypatch, capsys, "user", *argv, "--file", str(fifo), stdin="pw\n")
        if feeder.is_alive():     # nobody opened it: let the feeder's open return
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        feeder.join(10)
        assert (code, out, err) == (2, "", f"docker-mirror: --file: {fifo} is not a regular file (a FIFO)\n")
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["htpasswd"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device needs root")
def test_user_add_refuses_a_device_node(tmp_path, monkeypatch, capsys):
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    code, out, err = run_cli(monkeypatch, capsys, "user", "add", "eve", "--file", str(null), "--cost", "10",
                             stdin="pw\n")
    assert (code, out, err) == (2, "", f"docker-mirror: --file: {null} is not a regular file (a character device)\n")
    assert stat.S_ISCHR(os.lstat(null).st_mode) and [p.name for p in tmp_path.iterdir()] == ["null"]
