"""The pinned totals (entries and bytes of content served for a cache.pin repository): kept in
the index's ``totals`` row by triggers since schema 4, counted once when an older index is
upgraded, and read without touching the content table."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dockermirror.cache.index import IMMUTABLE, AccessBatch, Entry, Index

PINS = ("docker.io/library/*",)


def _digest(n: int) -> str:
    return f"sha256:{n:064x}"


def _counted(path: Path) -> tuple[int, int]:
    """The pinned totals as a scan of the content table finds them."""
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT count(*), coalesce(sum(size), 0) FROM content WHERE pinned = 1").fetchone()
    finally:
        db.close()


def _schema_3_index(path: Path) -> None:
    """An index as the previous version left it: schema 3, a ``totals`` row of entries and bytes
    only and no triggers for pinned content; two pinned entries and one not pinned."""
    Index(path, pins=PINS).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    for name in ("pinned_added", "pinned_removed", "pinned_changed"):
        db.execute(f"DROP TRIGGER IF EXISTS {name}")
    for column in ({row[1] for row in db.execute("PRAGMA table_info(totals)")} & {"pinned_entries", "pinned_bytes"}):
        db.execute(f"ALTER TABLE totals DROP COLUMN {column}")
    db.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    for n, size, repository, pinned in ((1, 100, "library/alpine", 1), (2, 200, "library/debian", 1),
                                        (3, 400, "acme/tool", 0)):
        db.execute("INSERT INTO content (digest, size, kind, created, last_access, pinned)"
                   " VALUES (?, ?, 'blob', 1, 1, ?)", (_digest(n), size, pinned))
        db.execute("INSERT INTO refs VALUES ('docker.io', ?, ?)", (repository, _digest(n)))
    db.execute("COMMIT")
    assert [row[1] for row in db.execute("PRAGMA table_info(totals)")] == ["id", "entries", "bytes"]
    db.close()


def test_a_schema_3_index_gets_its_pinned_totals_at_the_upgrade_and_keeps_them_exact(tmp_path):
    path = tmp_path / "index.sqlite"
    _schema_3_index(path)
    index = Index(path, pins=PINS)
    try:
        assert index.meta("schema") == "4"
        assert index.pinned_totals() == (2, 300) == _counted(path)
        assert index.totals() == (3, 700)

        # pinned when stored for a pinned repository; a later copy of the same digest is not counted twice
        index.add_content(Entry(_digest(4), 1000, None, "blob", 2.0, 2.0), "docker.io", "library/redis")
        index.add_content(Entry(_digest(4), 1000, None, "blob", 3.0, 3.0), "docker.io", "library/redis")
        assert index.pinned_totals() == (3, 1300) == _counted(path)
        # stored for no pinned repository: not pinned
        index.add_content(Entry(_digest(5), 50, None, "blob", 2.0, 2.0), "docker.io", "acme/tool")
        assert index.pinned_totals() == (3, 1300) == _counted(path)

        # content not pinned becomes pinned when a pinned repository uses it
        batch = AccessBatch()
        batch.touch(_digest(3), 4.0, "docker.io", "library/alpine")
        index.apply(batch)
        assert index.pinned_totals() == (4, 1700) == _counted(path)

        # replaced: the same digest stored again with another size (re-adopted from its file)
        index.add_contents([Entry(_digest(1), 150, None, "blob", 5.0, 5.0)])
        assert index.pinned_totals() == (4, 1750) == _counted(path)

        # unpinned by a new pin list, pinned again by the old one
        index.set_pins(["docker.io/library/debian"])
        assert index.pinned_totals() == (1, 200) == _counted(path)
        index.set_pins(PINS)
        assert index.pinned_totals() == (4, 1750) == _counted(path)

        # evicted (removed), pinned or not
        index.remove_content([_digest(2), _digest(5)])
        assert index.pinned_totals() == (3, 1550) == _counted(path)
        assert index.totals() == (3, 1550)
    finally:
        index.close()

    again = Index(path, pins=PINS)     # opening it again changes nothing
    try:
        assert again.meta("schema") == "4"
        assert again.pinned_totals() == (3, 1550) == _counted(path)
        again.remove_content([_digest(1), _digest(3), _digest(4)])
        assert again.pinned_totals() == (0, 0) == _counted(path)
    finally:
        again.close()


def test_a_new_index_keeps_its_pinned_totals(tmp_path):
    path = tmp_path / "index.sqlite"
    index = Index(path, pins=PINS)
    try:
        assert index.pinned_totals() == (0, 0)
        index.add_content(Entry(_digest(1), 10, None, "blob", 1.0, 1.0), "docker.io", "library/alpine")
        index.add_content(Entry(_digest(2), 20, None, "blob", 1.0, 1.0), "ghcr.io", "acme/tool")
        assert index.pinned_totals() == (1, 10) == _counted(path)
        index.set_pins(["*"])
        assert index.pinned_totals() == (2, 30) == _counted(path)
    finally:
        index.close()


def test_a_schema_3_index_read_as_it_is_has_its_pinned_totals(tmp_path):
    """A read-only or full filesystem: not upgraded, the pinned totals are counted once at open."""
    path = tmp_path / "index.sqlite"
    _schema_3_index(path)
    index = Index(path, pins=PINS, mode=IMMUTABLE)
    try:
        assert index.pinned_totals() == (2, 300)
        assert index.totals() == (3, 700)
    finally:
        index.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("3",)
        assert [row[1] for row in db.execute("PRAGMA table_info(totals)")] == ["id", "entries", "bytes"]
    finally:
        db.close()


def test_reading_the_pinned_totals_does_not_scan_the_pinned_entries(tmp_path):
    """Counted in SQLite's virtual machine steps (not time): as many for 2000 pinned entries as for 1."""
    index = Index(tmp_path / "index.sqlite", pins=PINS)
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    def cost() -> int:
        nonlocal steps
        steps = 0
        index._reader.set_progress_handler(step, 1)
        try:
            index.pinned_totals()
        finally:
            index._reader.set_progress_handler(None, 1)
        return steps

    try:
        index.add_content(Entry(_digest(0), 10, None, "blob", 1.0, 1.0), "docker.io", "library/alpine")
        cost()      # the first read also loads the schema
        few = cost()
        index.add_contents(Entry(_digest(n), 10, None, "blob", 1.0, 1.0, pinned=True) for n in range(1, 2000))
        assert index.pinned_totals() == (2000, 20000)
        assert cost() == few
    finally:
        index.close()
