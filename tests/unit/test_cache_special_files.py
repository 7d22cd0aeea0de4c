"""Something else than a readable regular file in the place of a cached file (a FIFO, a
directory, a file the service user cannot read, ``blobs/`` itself a file): the server never
waits on it nor fails a request for it (it drops the entry, the request is a miss), and
``docker-mirror cache verify`` reports it, ``--repair`` removes it (never through a link)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from pathlib import Path

import pytest

from dockermirror import cache as cache_module
from dockermirror.cache import maintenance
from dockermirror.cache.store import NotRegularFile, open_regular
from tests.unit.test_cache_disk import LAYER, pulled, row
from tests.unit.test_cachectl_upstreams import cache, command  # noqa: F401 (the fixture)

ROOT = os.geteuid() == 0


@contextlib.contextmanager
def unblocking(fifo: Path, after: float = 3.0):
    """Fail, not hang, if something opened ``fifo`` for reading and waits for a writer: after
    ``after`` s a writer opens it (which lets the reader go on), and the test sees ``hung``."""
    done, hung = threading.Event(), []

    def watch() -> None:
        if done.wait(after):
            return
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)   # ENXIO: nobody is reading
        except OSError:
            return
        hung.append(True)
        os.close(fd)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield hung
    finally:
        done.set()
        thread.join()


def warnings_about(caplog, digest: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and digest in r.getMessage()]


def test_open_regular_refuses_what_is_not_a_regular_file_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_bytes(b"x")
    os.symlink(tmp_path / "file", tmp_path / "link")
    with unblocking(tmp_path / "fifo") as hung:
        with pytest.raises(NotRegularFile, match="a FIFO, not a regular file"):
            open_regular(tmp_path / "fifo")
    assert not hung
    with pytest.raises(NotRegularFile, match="a directory"):
        open_regular(tmp_path / "dir")
    with pytest.raises(OSError):
        open_regular(tmp_path / "link", follow_symlinks=False)
    fd, st = open_regular(tmp_path / "link")
    os.close(fd)
    assert st.st_size == 1


# --- the server

def replace(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
        (path / "inside").write_bytes(b"x")


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["fifo", "directory"])
async def test_a_fifo_or_directory_in_place_of_a_cached_blob_is_a_miss(mirror, caplog, kind):
    image = await pulled(mirror)
    path = mirror.blob_file(image.layer)
    replace(path, kind)
    caplog.set_level(logging.WARNING, "dockermirror")
    with unblocking(path) as hung:
        response = await mirror.client.get(f"/v2/acme/tool/blobs/{image.layer}")
    assert not hung, "the server opened the FIFO and waited for a writer"
    assert response.status_code == 200 and response.content == LAYER
    assert len(mirror.registry.requests("GET", f"/blobs/{image.layer}")) == 2     # fetched again
    await mirror.app.cache.transfers.wait_all(5)
    assert path.is_file() and path.read_bytes() == LAYER                          # cached again
    warned = warnings_about(caplog, image.layer)
    assert len(warned) == 1, warned
    assert ("a FIFO" if kind == "fifo" else "a directory") in warned[0] and "fetches it again" in warned[0]
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text
    again = await mirror.client.get(f"/v2/acme/tool/blobs/{image.layer}")
    assert again.content == LAYER and len(mirror.registry.requests("GET", f"/blobs/{image.layer}")) == 2
    assert not list((mirror.cache_dir / "tmp").iterdir())                         # nothing left behind


@pytest.mark.anyio
async def test_a_fifo_in_place_of_a_cached_manifest_is_a_miss(mirror):
    image = await pulled(mirror)
    path = mirror.blob_file(image.digest)
    replace(path, "fifo")
    with unblocking(path) as hung:
        response = await mirror.client.get(f"/v2/acme/tool/manifests/{image.digest}",
                                           headers=[("Accept", image.media_type)])
    assert not hung
    assert response.status_code == 200 and response.content == image.manifest


async def _unreadable_blob_is_a_miss(mirror, caplog, image, path) -> None:
    caplog.set_level(logging.WARNING, "dockermirror")
    response = await mirror.client.get(f"/v2/acme/tool/blobs/{image.layer}")
    assert response.status_code == 200 and response.content == LAYER
    assert len(mirror.registry.requests("GET", f"/blobs/{image.layer}")) == 2
    await mirror.app.cache.transfers.wait_all(5)
    warned = warnings_about(caplog, image.layer)
    assert len(warned) == 1 and "Permission denied" in warned[0], warned
    assert "Traceback" not in caplog.text


@pytest.mark.anyio
@pytest.mark.skipif(ROOT, reason="root reads a file of mode 000 (the simulated case below runs as root)")
async def test_a_cached_blob_the_server_cannot_read_is_a_miss(mirror, caplog):
    image = await pulled(mirror)
    path = mirror.blob_file(image.layer)
    path.chmod(0)
    await _unreadable_blob_is_a_miss(mirror, caplog, image, path)
    assert path.read_bytes() == LAYER     # the unreadable file was removed, the new one is readable


@pytest.mark.anyio
async def test_a_cached_blob_the_server_cannot_read_is_a_miss_simulated(mirror, caplog, monkeypatch):
    image = await pulled(mirror)
    path = mirror.blob_file(image.layer)
    real = open_regular
    refused = []

    def refusing(p, **kw):
        if Path(p) == path and not refused:
            refused.append(p)
            raise PermissionError(13, "Permission denied", str(p))
        return real(p, **kw)

    monkeypatch.setattr(cache_module, "open_regular", refusing, raising=False)
    await _unreadable_blob_is_a_miss(mirror, caplog, image, path)
    assert refused and row(mirror, image.layer) is not None and path.read_bytes() == LAYER


@pytest.mark.anyio
async def test_background_verification_drops_a_fifo_without_waiting(mirror, caplog):
    image = await pulled(mirror)
    path = mirror.blob_file(image.layer)
    replace(path, "fifo")
    cache = mirror.app.cache
    cache.limits = dataclasses.replace(cache.limits, verify_rate=1 << 30)
    caplog.set_level(logging.WARNING, "dockermirror")
    with unblocking(path) as hung:
        files, _, corrupt = await cache.verify_round()
    assert not hung
    assert corrupt == 1 and row(mirror, image.layer) is None and not os.path.lexists(path)
    assert len(warnings_about(caplog, image.layer)) == 1


# --- docker-mirror cache verify [--repair]

def blob_path(cache, digest: str) -> Path:
    algorithm, hexdigest = digest.split(":")
    return cache.root / "blobs" / algorithm / hexdigest[:2] / hexdigest


@pytest.mark.parametrize("kind", ["fifo", "directory", "link to a directory outside", "link to a FIFO outside"])
def test_verify_reports_and_repair_removes_what_is_not_a_regular_file(cache, capsys, tmp_path, kind):  # noqa: F811
    good, bad = cache.add(b"good" * 100), cache.add(b"bad" * 100)
    path = blob_path(cache, bad)
    path.unlink()
    outside = tmp_path / "outside"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
        (path / "inside").write_bytes(b"x")
    elif kind == "link to a directory outside":
        outside.mkdir()
        (outside / "precious").write_bytes(b"keep me")
        os.symlink(outside, path)
    else:
        os.mkfifo(outside)
        os.symlink(outside, path)
    with unblocking(path) as hung:
        code, out, err = command(cache, capsys, "verify")
    assert not hung, "verify opened the FIFO and waited for a writer"
    assert code == 1 and "Traceback" not in err, err
    what = "a FIFO" if "fifo" in kind.lower() else "a directory"
    assert f"{bad}: cannot be read ({what}, not a regular file)" in out
    assert "1 corrupt" in out and good not in out
    assert os.path.lexists(path) and cache.rows() == {good, bad}
    with unblocking(path) as hung:
        code, out, err = command(cache, capsys, "verify", "--repair")
    assert not hung
    assert code == 1 and "1 removed" in out and "Traceback" not in err, err
    assert not os.path.lexists(path) and cache.rows() == {good}
    assert not list(cache.store.tmp.iterdir())
    if kind == "link to a directory outside":
        assert (outside / "precious").read_bytes() == b"keep me"     # never followed
    elif kind == "link to a FIFO outside":
        assert outside.is_fifo()
    code, out, err = command(cache, capsys, "verify")
    assert code == 0 and "0 missing, 0 corrupt" in out


@pytest.mark.skipif(ROOT, reason="root reads a file of mode 000")
def test_verify_reports_and_repair_removes_an_unreadable_file(cache, capsys):  # noqa: F811
    good, bad = cache.add(b"good" * 100), cache.add(b"bad" * 100)
    blob_path(cache, bad).chmod(0)
    code, out, err = command(cache, capsys, "verify")
    assert code == 1 and f"{bad}: cannot be read (Permission denied)" in out and "Traceback" not in err
    code, out, err = command(cache, capsys, "verify", "--repair")
    assert code == 1 and "1 removed" in out and cache.rows() == {good}
    assert not blob_path(cache, bad).exists()


def test_verify_reports_an_unreadable_file_simulated(cache, capsys, monkeypatch):  # noqa: F811
    good, bad = cache.add(b"good" * 100), cache.add(b"bad" * 100)
    real = open_regular

    def refusing(p, **kw):
        if Path(p) == blob_path(cache, bad):
            raise PermissionError(13, "Permission denied", str(p))
        return real(p, **kw)

    monkeypatch.setattr(maintenance, "open_regular", refusing, raising=False)
    code, out, err = command(cache, capsys, "verify")
    assert code == 1 and f"{bad}: cannot be read (Permission denied)" in out and "Traceback" not in err
    code, out, err = command(cache, capsys, "verify", "--repair")
    assert code == 1 and "1 removed" in out and cache.rows() == {good}
    assert not blob_path(cache, bad).exists()


def test_verify_with_blobs_replaced_by_a_file(cache, capsys):  # noqa: F811
    first, second = cache.add(b"one" * 100), cache.add(b"two" * 100)
    blobs = cache.root / "blobs"
    for p in sorted(blobs.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    blobs.rmdir()
    blobs.write_bytes(b"not a directory")
    code, out, err = command(cache, capsys, "verify")
    assert code == 1 and "Traceback" not in err, err
    assert f"{first}: missing" in out and f"{second}: missing" in out
    assert "blobs: not a directory" in out and blobs.is_file()
    code, out, err = command(cache, capsys, "verify", "--repair")
    assert code == 1 and "Traceback" not in err, err
    assert blobs.is_dir() and cache.rows() == set()
    code, out, err = command(cache, capsys, "verify")
    assert code == 0, out


def test_verify_shows_a_stray_name_with_control_characters_escaped(cache, capsys):  # noqa: F811
    cache.add(b"good" * 100)
    prefix = cache.root / "blobs" / "sha256" / "ab"
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "ab\x1b[2J\rgone").write_bytes(b"junk")
    code, out, err = command(cache, capsys, "verify")
    assert "\x1b" not in out and "\r" not in out
    assert "blobs/sha256/ab/ab\\x1b[2J\\x0dgone: file without an index entry" in out
    code, out, err = command(cache, capsys, "verify", "--repair")
    assert "\x1b" not in out and not list(prefix.iterdir())


# --- a directory of the tree (blobs/<algorithm>/<prefix>/) that cannot be walked

from dockermirror.cache import store as store_module  # noqa: E402


def prefix_of(cache, digest: str) -> Path:
    return blob_path(cache, digest).parent


def odd_prefix(cache, name: str) -> Path:
    """A name under blobs/sha256/ no stored file uses."""
    return cache.root / "blobs" / "sha256" / name


@pytest.mark.parametrize("kind", ["file", "fifo", "dangling link", "link to a directory outside"])
def test_verify_reports_and_repair_unlinks_a_non_directory_in_a_prefix_place(cache, capsys, tmp_path, kind):  # noqa: F811
    good = cache.add(b"good" * 100)
    place = odd_prefix(cache, "zz\x1b[2J")
    outside = tmp_path / "outside"
    if kind == "file":
        place.write_bytes(b"x")
    elif kind == "fifo":
        os.mkfifo(place)
    elif kind == "dangling link":
        os.symlink(tmp_path / "nowhere", place)
    else:
        outside.mkdir()
        (outside / "precious").write_bytes(b"keep me")
        os.symlink(outside, place)
    with unblocking(place) if kind == "fifo" else contextlib.nullcontext([]) as hung:
        code, out, err = command(cache, capsys, "verify")
    assert not hung
    assert code == 1 and "Traceback" not in err, err
    lines = [line for line in out.splitlines() if line.startswith("blobs/sha256/zz")]
    assert len(lines) == 1 and "\x1b" not in out, out
    assert lines[0].startswith("blobs/sha256/zz\\x1b[2J: ") and "not a directory" in lines[0]
    assert "(--repair removes it)" in lines[0] and os.path.lexists(place)
    code, out, err = command(cache, capsys, "verify", "--repair")
    assert code == 1 and "Traceback" not in err and "1 removed" in out, (out, err)
    assert not os.path.lexists(place) and cache.rows() == {good}
    if kind == "link to a directory outside":
        assert (outside / "precious").read_bytes() == b"keep me"     # never followed
    code, out, err = command(cache, capsys, "verify")
    assert code == 0 and "0 missing, 0 corrupt" in out, out


def _check_unreadable_prefix(cache, capsys, bad: str, good: str) -> None:
    prefix = prefix_of(cache, bad)
    code, out, err = command(cache, capsys, "verify")
    assert code == 1 and "Traceback" not in err, err
    rel = f"blobs/sha256/{prefix.name}"
    lines = [line for line in out.splitlines() if line.startswith(rel + ":")]
    assert lines == [f"{rel}: directory that cannot be read (Permission denied): the files in it are not checked"], out
    code, out, err = command(cache, capsys, "verify", "--repair")
    assert code == 1 and "Traceback" not in err, err
    assert "not removed" in out and "0 removed" in out, out
    assert blob_path(cache, bad).exists() and cache.rows() == {good, bad}    # not proven bad: kept


def two_files_apart(cache) -> tuple[str, str]:
    first = cache.add(b"good" * 100)
    n = 0
    while True:
        other = cache.add(b"bad%d" % n)
        if other.split(":")[1][:2] != first.split(":")[1][:2]:
            return first, other
        n += 1


def test_verify_reports_an_unreadable_prefix_directory_and_repair_leaves_it(cache, capsys):  # noqa: F811
    good, bad = two_files_apart(cache)
    prefix_of(cache, bad).chmod(0)
    try:
        try:
            os.listdir(prefix_of(cache, bad))
        except PermissionError:
            pass
        else:
            pytest.skip("this user reads a directory of mode 000 (root): see the simulated twin")
        _check_unreadable_prefix(cache, capsys, bad, good)
    finally:
        prefix_of(cache, bad).chmod(0o755)


def test_verify_reports_an_unreadable_prefix_directory_simulated(cache, capsys, monkeypatch):  # noqa: F811
    good, bad = two_files_apart(cache)
    prefix = prefix_of(cache, bad)
    real_dir, real_open = store_module._open_dir, open_regular

    def refusing_dir(p, **kw):
        if Path(p) == prefix:
            raise PermissionError(13, "Permission denied", str(p))
        return real_dir(p, **kw)

    def refusing(p, **kw):
        if Path(p).parent == prefix:
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, **kw)

    monkeypatch.setattr(store_module, "_open_dir", refusing_dir)
    monkeypatch.setattr(maintenance, "open_regular", refusing)
    _check_unreadable_prefix(cache, capsys, bad, good)


def test_walk_goes_on_past_a_prefix_directory_replaced_or_gone_meanwhile(cache):  # noqa: F811
    digests = set()
    n = 0
    while len({d.split(":")[1][:2] for d in digests}) < 3:
        digests.add(cache.add(b"x%d" % n))
        n += 1
    unusable: list[tuple[Path, OSError]] = []
    walk = cache.store.walk(on_unusable=lambda path, exc: unusable.append((path, exc)))
    first = next(walk)
    prefixes = sorted(p for p in (cache.root / "blobs" / "sha256").iterdir() if p != first[1].parent)
    gone, replaced = prefixes[0], prefixes[1]
    for p in (gone, replaced):
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    replaced.write_bytes(b"now a file")
    rest = list(walk)
    assert all(path.parent not in (gone, replaced) for _, path, _ in rest)
    assert [(path, type(exc)) for path, exc in unusable] == [(replaced, NotADirectoryError)]


def test_reconcile_names_each_directory_it_cannot_walk_once_and_goes_on(cache, monkeypatch):  # noqa: F811
    good, bad = two_files_apart(cache)
    prefix = prefix_of(cache, bad)
    real_dir = store_module._open_dir

    def refusing_dir(p, **kw):
        if Path(p) == prefix:
            raise PermissionError(13, "Permission denied", str(p))
        return real_dir(p, **kw)

    monkeypatch.setattr(store_module, "_open_dir", refusing_dir)
    cache.index.remove_content([good, bad])            # the index lost its rows: the start adopts
    stray = odd_prefix(cache, "zz")
    os.mkfifo(stray)
    problems: list[tuple[str, str]] = []
    report = maintenance.reconcile(cache.store, cache.index, lambda: 5.0,
                                   on_unusable=lambda where, problem: problems.append((where, problem)))
    assert report.adopted == [good] and cache.rows() == {good}
    assert sorted(where for where, _ in problems) == sorted([str(prefix), str(stray)])
    assert stray.is_fifo() and blob_path(cache, bad).exists()
    assert cache.store.has_files()
