"""The cache index: one SQLite database (WAL mode) beside the blob files.

It records every stored digest (size, media type, created, last access, hits, pinned),
which repositories each digest was served for, the tag -> digest map with its freshness
(one row per tag and accept class: what the upstream answered clients that accept the same
manifest types), the referrers answers (subject digest and artifactType filter -> the digest
of the image index the upstream answered, stored as content), and traffic counters. A row
in ``content`` means the file is complete and verified.
Triggers keep ``totals`` (entries and bytes, of all content and of pinned content) exact,
so any process reads the cache's size in O(1); LRU eviction and expiry walk an index on
``last_access``, O(log n) each.

Reads use their own connection and never wait for the writer (WAL). Writes go
through one connection under a lock and are meant for a worker thread; accesses are
batched by the caller (:class:`AccessBatch`) so a cache hit costs no write of its own.
Several processes (the server and ``docker-mirror cache ...``) may use one index at once.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "docker-mirror-cache/1"
# Compatible changes within FORMAT, applied at open (meta 'schema'; absent means 1):
# 2: tags gain ``accept`` (their accept class) in their primary key.
# 3: the ``referrers`` table (created at open; an index of schema 2 read as it is has none).
# 4: ``totals`` gains ``pinned_entries`` and ``pinned_bytes`` (counted once at the upgrade, then
#    kept by triggers; an index of schema 3 read as it is gets them counted once at open).
SCHEMA_VERSION = 4
_LIST_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS content (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    media_type  TEXT,
    kind        TEXT NOT NULL,          -- 'blob' or 'manifest'
    created     REAL NOT NULL,
    last_access REAL NOT NULL,
    hits        INTEGER NOT NULL DEFAULT 0,
    pinned      INTEGER NOT NULL DEFAULT 0, -- served for a repository matching cache.pin
    stamp       TEXT    -- the file at commit or last verification: inode:mtime_ns:ctime_ns (NULL: unknown)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS content_lru ON content (pinned, last_access);
CREATE INDEX IF NOT EXISTS content_expiry ON content (kind, pinned, last_access);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 1), entries INTEGER NOT NULL, bytes INTEGER NOT NULL,
    pinned_entries INTEGER NOT NULL DEFAULT 0, pinned_bytes INTEGER NOT NULL DEFAULT 0);
INSERT OR IGNORE INTO totals (id, entries, bytes) VALUES (1, 0, 0);
CREATE TRIGGER IF NOT EXISTS content_added AFTER INSERT ON content BEGIN
    UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.size WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS content_removed AFTER DELETE ON content BEGIN
    UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.size WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS content_resized AFTER UPDATE OF size ON content BEGIN
    UPDATE totals SET bytes = bytes - OLD.size + NEW.size WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS pinned_added AFTER INSERT ON content WHEN NEW.pinned = 1 BEGIN
    UPDATE totals SET pinned_entries = pinned_entries + 1, pinned_bytes = pinned_bytes + NEW.size
    WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS pinned_removed AFTER DELETE ON content WHEN OLD.pinned = 1 BEGIN
    UPDATE totals SET pinned_entries = pinned_entries - 1, pinned_bytes = pinned_bytes - OLD.size
    WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS pinned_changed AFTER UPDATE OF pinned, size ON content
    WHEN OLD.pinned = 1 OR NEW.pinned = 1 BEGIN
    UPDATE totals SET pinned_entries = pinned_entries - (OLD.pinned = 1) + (NEW.pinned = 1),
        pinned_bytes = pinned_bytes - (OLD.pinned = 1) * OLD.size + (NEW.pinned = 1) * NEW.size
    WHERE id = 1; END;
CREATE TABLE IF NOT EXISTS refs (       -- digest served for upstream/repository
    upstream    TEXT NOT NULL,
    repository  TEXT NOT NULL,
    digest      TEXT NOT NULL,
    PRIMARY KEY (upstream, repository, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refs_by_digest ON refs (digest);
CREATE TABLE IF NOT EXISTS tags (
    upstream    TEXT NOT NULL,
    repository  TEXT NOT NULL,
    tag         TEXT NOT NULL,
    accept      TEXT NOT NULL DEFAULT '',  -- accept class ('' = as stored upstream), oci.accept_class
    digest      TEXT NOT NULL,
    media_type  TEXT,
    size        INTEGER NOT NULL,
    checked     REAL NOT NULL,          -- last time the upstream confirmed it
    last_access REAL NOT NULL,
    -- (the key's columns come first: SQLite 3.40's integrity_check misreads WITHOUT ROWID
    -- tables whose key has a column declared after others)
    PRIMARY KEY (upstream, repository, tag, accept)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_by_access ON tags (last_access);
CREATE TABLE IF NOT EXISTS referrers (  -- the upstream's referrers answer for a subject, like a tag
    upstream      TEXT NOT NULL,
    repository    TEXT NOT NULL,
    subject       TEXT NOT NULL,        -- the digest whose referrers these are
    artifact_type TEXT NOT NULL,        -- the artifactType filter asked for ('' = none)
    digest        TEXT NOT NULL,        -- of the answer (an image index, stored as content)
    size          INTEGER NOT NULL,
    filtered      INTEGER NOT NULL,     -- the upstream said it applied the filter
    checked       REAL NOT NULL,
    last_access   REAL NOT NULL,
    PRIMARY KEY (upstream, repository, subject, artifact_type)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS referrers_by_access ON referrers (last_access);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""

REMOVING = "removing:"    # meta key prefix of a removal mark (see Index.mark_removing)

_ENTRY = "digest, size, media_type, kind, created, last_access, hits, pinned, stamp"
_TAG = "upstream, repository, tag, digest, media_type, size, checked, last_access, accept"
_REFERRERS = "upstream, repository, subject, artifact_type, digest, size, filtered, checked, last_access"


class ForeignDatabase(Exception):
    """The file is not a docker-mirror cache index."""


@dataclass(frozen=True, slots=True)
class Entry:
    digest: str
    size: int
    media_type: str | None
    kind: str
    created: float
    last_access: float
    hits: int = 0
    pinned: bool = False
    stamp: str | None = None    # the file's inode:mtime_ns:ctime_ns when it was stored or last verified


@dataclass(frozen=True, slots=True)
class TagEntry:
    upstream: str
    repository: str
    tag: str
    digest: str
    media_type: str | None
    size: int
    checked: float
    last_access: float
    accept: str = ""        # the accept class this answer is for (oci.accept_class)


@dataclass(frozen=True, slots=True)
class ReferrersEntry:
    """The upstream's answer to ``GET /v2/<repository>/referrers/<subject>[?artifactType=]``."""

    upstream: str
    repository: str
    subject: str
    artifact_type: str      # '' for no filter
    digest: str             # of the answer, stored as content
    size: int
    filtered: bool          # the upstream applied the artifactType filter (OCI-Filters-Applied)
    checked: float
    last_access: float


def _connect(path: Path, *, readonly: bool = False, immutable: bool = False) -> sqlite3.Connection:
    if immutable:    # a read-only or full filesystem: no lock, no -wal or -shm file, nothing written
        target = f"file:{path}?mode=ro&immutable=1"
    else:
        target = f"file:{path}?mode=ro" if readonly else str(path)
    conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=10.0,
                           uri=readonly or immutable)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


RW, IMMUTABLE, MEMORY = "rw", "immutable", "memory"


class Index:
    """Typed access to the index database."""

    def __init__(self, path: Path, *, pins: Iterable[str] = (), create: bool = True, mode: str = RW) -> None:
        """``mode``: RW (normal); IMMUTABLE: read the file as it is and never write to it (the
        filesystem is read-only or full: every write raises); MEMORY: an empty index that lives
        in memory only (the file cannot be opened at all)."""
        self.path = Path(path)
        self.pins = tuple(pins)
        self.mode = mode
        self._cols = _ENTRY
        self._has_referrers = True      # False: an index of schema 2 read as it is (IMMUTABLE)
        self._pinned: tuple[int, int] | None = None     # counted at open: an index of schema < 4 read as it is
        if not create and not self.path.exists():
            raise ForeignDatabase(f"{self.path} does not exist")
        if mode == RW and not self.path.exists():
            for suffix in ("-wal", "-shm"):   # left by a deleted database: never replay them into a new one
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self._lock = threading.Lock()
        if mode == MEMORY:
            self._writer = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        else:
            self._writer = _connect(self.path, immutable=mode == IMMUTABLE)
        try:
            self._init_schema()
        except BaseException:
            self._writer.close()
            raise
        # one connection in memory (a second would be another database)
        self._reader = self._writer if mode == MEMORY else _connect(self.path, immutable=mode == IMMUTABLE)

    def identity(self) -> tuple[int, int] | None:
        """(device, inode) of the index file now at ``path``; None if there is none."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _init_schema(self) -> None:
        conn = self._writer
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.OperationalError:
            raise   # cannot be read now (read-only or full filesystem, I/O error): not a verdict on the file
        except sqlite3.DatabaseError as exc:
            raise ForeignDatabase(f"{self.path} is not an SQLite database ({exc})") from None
        if tables and "meta" not in tables:
            raise ForeignDatabase(f"{self.path} is an SQLite database of something else")
        if tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if row is None or row[0] != FORMAT:
                raise ForeignDatabase(f"{self.path} has index format {row[0] if row else None!r}, "
                                      f"expected {FORMAT!r}")
        if self.mode == IMMUTABLE:
            if not tables:
                raise ForeignDatabase(f"{self.path} is empty")
            if "stamp" not in {row[1] for row in conn.execute("PRAGMA table_info(content)")}:
                self._cols = _ENTRY.replace("stamp", "NULL")   # written by a version without it
            if self._schema_version(conn) < 2:
                # its tags are keyed the old way and it cannot be upgraded here: not used
                raise sqlite3.OperationalError(f"{self.path} is of an older schema and cannot be upgraded now")
            self._has_referrers = "referrers" in tables    # schema 2 has none: no referrers cached
            if "pinned_entries" not in {row[1] for row in conn.execute("PRAGMA table_info(totals)")}:
                self._pinned = _count_pinned(conn)     # the file never changes: counted once
            return
        if self.mode == RW:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = self._schema_version(conn)
                if version < 2:
                    self._tags_before_2(conn)
                self._totals_before_4(conn)
                for statement in _split(_SCHEMA):
                    conn.execute(statement)
                if version < 2:
                    self._tags_to_2(conn)
                if version < 4:     # the triggers keep them from now on
                    conn.execute("UPDATE totals SET pinned_entries = ?, pinned_bytes = ? WHERE id = 1",
                                 _count_pinned(conn))
                conn.execute(f"INSERT OR {'REPLACE' if version < SCHEMA_VERSION else 'IGNORE'} INTO meta"
                             " (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                if "stamp" not in {row[1] for row in conn.execute("PRAGMA table_info(content)")}:
                    conn.execute("ALTER TABLE content ADD COLUMN stamp TEXT")   # an index of an older version
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('format', ?)", (FORMAT,))
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('created', ?)", (str(time.time()),))
                known = conn.execute("SELECT value FROM meta WHERE key = 'pins'").fetchone()
                if known is None or json.loads(known[0]) != list(self.pins):
                    self._repin(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
            return SCHEMA_VERSION       # a new index
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        return int(row[0]) if row and row[0].isascii() and row[0].isdigit() else 1

    @staticmethod
    def _tags_before_2(conn: sqlite3.Connection) -> None:
        """Schema 1 keyed tags without the accept class: move them aside for _tags_to_2."""
        columns = {row[1] for row in conn.execute("PRAGMA table_info(tags)")}
        if columns and "accept" not in columns:
            conn.execute("DROP INDEX IF EXISTS tags_by_access")
            conn.execute("ALTER TABLE tags RENAME TO tags_v1")

    @staticmethod
    def _tags_to_2(conn: sqlite3.Connection) -> None:
        """Keep schema 1 tags as answers for every client ('' class). A list is what every
        client that takes lists gets; any other type may have been one platform's manifest
        picked for a client that takes no list, so it is revalidated before it is served
        fresh (it still answers while the upstream is down, as before)."""
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tags_v1'").fetchone():
            conn.execute(
                f"INSERT OR IGNORE INTO tags ({_TAG}) SELECT upstream, repository, tag, digest, media_type, size,"
                " CASE WHEN media_type IN (?, ?) THEN checked ELSE 0 END, last_access, '' FROM tags_v1",
                _LIST_TYPES)
            conn.execute("DROP TABLE tags_v1")

    @staticmethod
    def _totals_before_4(conn: sqlite3.Connection) -> None:
        """Schema 3 and before kept no pinned totals: add their columns (counted after the triggers exist)."""
        columns = {row[1] for row in conn.execute("PRAGMA table_info(totals)")}
        if columns and "pinned_entries" not in columns:
            conn.execute("ALTER TABLE totals ADD COLUMN pinned_entries INTEGER NOT NULL DEFAULT 0")
            conn.execute("ALTER TABLE totals ADD COLUMN pinned_bytes INTEGER NOT NULL DEFAULT 0")

    def recreate(self) -> bool:
        """The file was deleted under the open database: write the database out again at ``path``
        (SQLite's online backup) and use that file. Call it from the thread that reads (the
        reader is swapped too). False if another file appeared at ``path`` meanwhile: the copy
        is used where it was written, and ``path`` is left alone."""
        temp = self.path.with_name(self.path.name + ".restore")
        with self._lock:
            temp.unlink(missing_ok=True)
            copy = sqlite3.connect(temp, isolation_level=None)
            try:
                self._writer.backup(copy)
                copy.execute("PRAGMA journal_mode = WAL")
            finally:
                copy.close()   # the last connection: its -wal is checkpointed and deleted
            with open(temp, "rb") as f:
                os.fsync(f.fileno())
            # Close the deleted database first: its -wal and -shm files still have the names
            # the new file's would have, and closing the last connection removes them.
            self._reader.close()
            self._writer.close()
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            try:
                os.link(temp, self.path)        # never over a file someone else put there meanwhile
            except OSError:   # another file there now (or the name cannot be made): use the copy
                self.path = temp
                placed = False
            else:
                temp.unlink()
                placed = True
            self._writer = _connect(self.path)
            self._writer.execute("PRAGMA synchronous = NORMAL")
            self._reader = _connect(self.path)
            return placed

    def _repin(self, conn: sqlite3.Connection) -> None:
        """Recompute ``pinned`` for every entry (the pin list changed)."""
        conn.execute("UPDATE content SET pinned = 0 WHERE pinned = 1")
        for pattern in self.pins:
            conn.execute("UPDATE content SET pinned = 1 WHERE pinned = 0 AND digest IN "
                         "(SELECT digest FROM refs WHERE upstream || '/' || repository GLOB ?)", (pattern,))
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('pins', ?)", (json.dumps(list(self.pins)),))

    def set_pins(self, pins: Iterable[str]) -> None:
        self.pins = tuple(pins)
        with self._transaction() as conn:
            self._repin(conn)

    def is_pinned(self, upstream: str, repository: str) -> bool:
        """Whether ``upstream/repository`` matches a pin pattern (patterns name the registry too)."""
        name = f"{upstream}/{repository}"
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.pins)

    def close(self) -> None:
        with self._lock:
            self._writer.close()
        if self._reader is not self._writer:
            self._reader.close()

    # --- reads (cheap; the reader connection belongs to one thread at a time)

    def content(self, digest: str) -> Entry | None:
        row = self._reader.execute(f"SELECT {self._cols} FROM content WHERE digest = ?", (digest,)).fetchone()
        return _entry(row) if row else None

    def tag(self, upstream: str, repository: str, tag: str, accept: str | None = None) -> TagEntry | None:
        """The tag's row for an accept class; ``None``: any of its rows (the '' class first)."""
        if accept is None:
            row = self._reader.execute(
                f"SELECT {_TAG} FROM tags WHERE upstream = ? AND repository = ? AND tag = ? ORDER BY accept LIMIT 1",
                (upstream, repository, tag)).fetchone()
        else:
            row = self._reader.execute(
                f"SELECT {_TAG} FROM tags WHERE upstream = ? AND repository = ? AND tag = ? AND accept = ?",
                (upstream, repository, tag, accept)).fetchone()
        return TagEntry(*row) if row else None

    def tags_of(self, upstream: str, repository: str) -> list[str]:
        rows = self._reader.execute(
            "SELECT DISTINCT tag FROM tags WHERE upstream = ? AND repository = ? ORDER BY tag", (upstream, repository))
        return [row[0] for row in rows]

    def tag_count(self) -> int:
        return self._reader.execute(
            "SELECT count(*) FROM (SELECT DISTINCT upstream, repository, tag FROM tags)").fetchone()[0]

    def referrers(self, upstream: str, repository: str, subject: str, artifact_type: str) -> ReferrersEntry | None:
        if not self._has_referrers:
            return None
        row = self._reader.execute(
            f"SELECT {_REFERRERS} FROM referrers WHERE upstream = ? AND repository = ? AND subject = ?"
            " AND artifact_type = ?", (upstream, repository, subject, artifact_type)).fetchone()
        return ReferrersEntry(*row[:6], bool(row[6]), *row[7:]) if row else None

    def tags_pointing_to(self, digest: str) -> list[tuple[str, str, str]]:
        """(upstream, repository, tag) of every tag whose digest this is (for some accept class)."""
        return self._reader.execute("SELECT DISTINCT upstream, repository, tag FROM tags WHERE digest = ?",
                                    (digest,)).fetchall()

    def totals(self) -> tuple[int, int]:
        """(number of entries, bytes) of stored content, kept exact by triggers."""
        entries, size = self._reader.execute("SELECT entries, bytes FROM totals WHERE id = 1").fetchone()
        return entries, size

    def counters(self) -> dict[str, int]:
        return dict(self._reader.execute("SELECT name, value FROM counters"))

    def meta(self, key: str) -> str | None:
        row = self._reader.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def lru(self, limit: int, after: tuple[float, str] | None = None) -> list[Entry]:
        """Unpinned entries, least recently used first, starting after ``(last_access, digest)``."""
        if after is None:
            rows = self._reader.execute(
                f"SELECT {self._cols} FROM content WHERE pinned = 0 ORDER BY last_access, digest LIMIT ?", (limit,))
        else:
            rows = self._reader.execute(
                f"SELECT {self._cols} FROM content WHERE pinned = 0 AND (last_access, digest) > (?, ?)"
                " ORDER BY last_access, digest LIMIT ?", (*after, limit))
        return [_entry(row) for row in rows]

    def expired(self, kind: str, before: float, limit: int) -> list[Entry]:
        """Unpinned entries of a kind not accessed since ``before``, oldest first."""
        rows = self._reader.execute(
            f"SELECT {self._cols} FROM content WHERE kind = ? AND pinned = 0 AND last_access < ?"
            " ORDER BY last_access LIMIT ?", (kind, before, limit))
        return [_entry(row) for row in rows]

    def entries(self, batch: int = 1000) -> Iterator[Entry]:
        """Every entry, in digest order (for verify), read in batches."""
        last = ""
        while True:
            rows = self._reader.execute(
                f"SELECT {self._cols} FROM content WHERE digest > ? ORDER BY digest LIMIT ?", (last, batch)).fetchall()
            if not rows:
                return
            for row in rows:
                yield _entry(row)
            last = rows[-1][0]

    def entries_after(self, digest: str, limit: int) -> list[Entry]:
        """Up to ``limit`` entries after ``digest`` in digest order (a resumable walk)."""
        rows = self._reader.execute(
            f"SELECT {self._cols} FROM content WHERE digest > ? ORDER BY digest LIMIT ?", (digest, limit))
        return [_entry(row) for row in rows]

    def sizes(self) -> dict[str, int]:
        """digest -> size of every entry, in one query (for crash recovery)."""
        return dict(self._reader.execute("SELECT digest, size FROM content"))

    def repository_digests(self, upstream: str, repository: str) -> dict[str, bool]:
        """Digests served for a repository -> whether another repository uses them too."""
        rows = self._reader.execute(
            "SELECT r.digest, EXISTS (SELECT 1 FROM refs o WHERE o.digest = r.digest AND"
            " (o.upstream != r.upstream OR o.repository != r.repository))"
            " FROM refs r WHERE r.upstream = ? AND r.repository = ?", (upstream, repository))
        return {digest: bool(shared) for digest, shared in rows}

    def ref_upstreams(self, digest: str) -> set[str]:
        """The upstreams that have served ``digest`` for one of their repositories."""
        return {row[0] for row in self._reader.execute("SELECT DISTINCT upstream FROM refs WHERE digest = ?",
                                                        (digest,))}

    def has_ref(self, upstream: str, repository: str, digest: str) -> bool:
        """Whether ``digest`` was served for this upstream's repository."""
        return self._reader.execute("SELECT EXISTS (SELECT 1 FROM refs WHERE upstream = ? AND repository = ?"
                                    " AND digest = ?)", (upstream, repository, digest)).fetchone()[0] == 1

    def oldest_access(self) -> float | None:
        row = self._reader.execute("SELECT min(last_access) FROM content WHERE pinned = 0").fetchone()
        return row[0]

    def kinds(self) -> dict[str, tuple[int, int]]:
        """kind -> (entries, bytes); a full scan, for ``cache stats``."""
        rows = self._reader.execute("SELECT kind, count(*), coalesce(sum(size), 0) FROM content GROUP BY kind")
        return {kind: (count, size) for kind, count, size in rows}

    def upstream_usage(self) -> dict[str, tuple[int, int, int, int]]:
        """upstream -> (entries, bytes, shared entries, shared bytes) of the stored content its
        repositories use; shared: another upstream uses it too (stored once, so counted in each).
        A full scan, for ``cache stats``."""
        rows = self._reader.execute(
            "WITH used AS (SELECT DISTINCT upstream, digest FROM refs),"
            " users AS (SELECT digest, count(*) AS n FROM used GROUP BY digest)"
            " SELECT used.upstream, count(*), coalesce(sum(c.size), 0), coalesce(sum(users.n > 1), 0),"
            " coalesce(sum(CASE WHEN users.n > 1 THEN c.size ELSE 0 END), 0)"
            " FROM used JOIN content c USING (digest) JOIN users USING (digest) GROUP BY used.upstream")
        return {upstream: (entries, size, shared, shared_size) for upstream, entries, size, shared, shared_size in rows}

    def unattributed_totals(self) -> tuple[int, int]:
        """(entries, bytes) of stored content no repository uses (files adopted by verify)."""
        return self._reader.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM content WHERE digest NOT IN (SELECT digest FROM refs)"
        ).fetchone()

    def upstream_tag_counts(self) -> dict[str, int]:
        """upstream -> number of tags it has here."""
        return dict(self._reader.execute(
            "SELECT upstream, count(*) FROM (SELECT DISTINCT upstream, repository, tag FROM tags) GROUP BY upstream"))

    def knows_upstream(self, upstream: str) -> bool:
        """Whether any repository or tag of this upstream is recorded (configured or not any more)."""
        return self._reader.execute(
            "SELECT EXISTS (SELECT 1 FROM refs WHERE upstream = ?) OR EXISTS (SELECT 1 FROM tags WHERE upstream = ?)",
            (upstream, upstream)).fetchone()[0] == 1

    def pinned_totals(self) -> tuple[int, int]:
        """(number of entries, bytes) of pinned content, kept exact by triggers (O(1))."""
        if self._pinned is not None:
            return self._pinned
        entries, size = self._reader.execute(
            "SELECT pinned_entries, pinned_bytes FROM totals WHERE id = 1").fetchone()
        return entries, size

    # --- writes (blocking: call from a worker thread on the server)

    def _transaction(self):
        return _Transaction(self._writer, self._lock)

    _UPSERT = (f"INSERT INTO content ({_ENTRY}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET"
               " size = excluded.size, media_type = coalesce(excluded.media_type, media_type),"
               " kind = excluded.kind, last_access = max(last_access, excluded.last_access),"
               " pinned = max(pinned, excluded.pinned), stamp = excluded.stamp")

    def add_content(self, entry: Entry, upstream: str | None, repository: str | None) -> None:
        """Record stored content, and the repository it was fetched for (if known)."""
        pinned = int(entry.pinned or (upstream is not None and repository is not None
                                      and self.is_pinned(upstream, repository)))
        with self._transaction() as conn:
            conn.execute(self._UPSERT, (entry.digest, entry.size, entry.media_type, entry.kind, entry.created,
                                        entry.last_access, entry.hits, pinned, entry.stamp))
            if upstream is not None and repository is not None:
                conn.execute("INSERT OR IGNORE INTO refs (upstream, repository, digest) VALUES (?, ?, ?)",
                             (upstream, repository, entry.digest))

    def add_contents(self, entries: Iterable[Entry]) -> None:
        """Record stored content of no known repository, in one transaction (files re-adopted)."""
        rows = [(e.digest, e.size, e.media_type, e.kind, e.created, e.last_access, e.hits, int(e.pinned), e.stamp)
                for e in entries]
        if rows:
            with self._transaction() as conn:
                conn.executemany(self._UPSERT, rows)

    def remove_content(self, digests: Iterable[str]) -> int:
        """Forget entries (and which repositories used them, and any removal marks of theirs);
        returns bytes forgotten."""
        digests = list(digests)
        with self._transaction() as conn:
            before = conn.execute("SELECT bytes FROM totals WHERE id = 1").fetchone()[0]
            conn.executemany("DELETE FROM content WHERE digest = ?", [(d,) for d in digests])
            conn.executemany("DELETE FROM refs WHERE digest = ?", [(d,) for d in digests])
            conn.executemany("DELETE FROM meta WHERE key = ?", [(REMOVING + d,) for d in digests])
            return before - conn.execute("SELECT bytes FROM totals WHERE id = 1").fetchone()[0]

    # Removal marks: another process (``docker-mirror cache prune | rm | verify --repair``) deletes
    # files before their rows; it marks the rows first (meta keys ``removing:<digest>``, the time
    # as value; removed with the rows), so that a server which finds such a file gone meanwhile
    # takes it for a miss, not for a file lost from the cache. No schema change: older versions
    # never read these keys.

    def mark_removing(self, digests: Iterable[str], when: float) -> None:
        """Say that the files of ``digests`` are about to be deleted, their rows after them."""
        with self._transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                             [(REMOVING + d, repr(when)) for d in digests])

    def removal_mark(self, digest: str) -> float | None:
        """When a process marked ``digest`` as being removed; None if none did."""
        value = self.meta(REMOVING + digest)
        return None if value is None else _float(value)

    def drop_removal_marks(self, before: float) -> int:
        """Forget marks made before ``before`` (by a process that died before it removed the rows)."""
        with self._transaction() as conn:
            marks = conn.execute("SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?",
                                 (len(REMOVING), REMOVING)).fetchall()
            stale = [(key,) for key, value in marks if _float(value) < before]
            conn.executemany("DELETE FROM meta WHERE key = ?", stale)
            return len(stale)

    def set_stamp(self, digest: str, stamp: str | None) -> None:
        """Record the file as verified in its present state (or, with None, as to be re-hashed)."""
        with self._transaction() as conn:
            conn.execute("UPDATE content SET stamp = ? WHERE digest = ?", (stamp, digest))

    def put_tag(self, entry: TagEntry) -> None:
        with self._transaction() as conn:
            conn.execute(f"INSERT OR REPLACE INTO tags ({_TAG}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (entry.upstream, entry.repository, entry.tag, entry.digest, entry.media_type,
                          entry.size, entry.checked, entry.last_access, entry.accept))

    def delete_tag(self, upstream: str, repository: str, tag: str, accept: str | None = None) -> None:
        """Forget a tag's row for one accept class (``None``: every row of the tag)."""
        with self._transaction() as conn:
            if accept is None:
                conn.execute("DELETE FROM tags WHERE upstream = ? AND repository = ? AND tag = ?",
                             (upstream, repository, tag))
            else:
                conn.execute("DELETE FROM tags WHERE upstream = ? AND repository = ? AND tag = ? AND accept = ?",
                             (upstream, repository, tag, accept))

    def put_referrers(self, entry: ReferrersEntry) -> None:
        with self._transaction() as conn:
            conn.execute(f"INSERT OR REPLACE INTO referrers ({_REFERRERS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (entry.upstream, entry.repository, entry.subject, entry.artifact_type, entry.digest,
                          entry.size, int(entry.filtered), entry.checked, entry.last_access))

    def delete_referrers(self, upstream: str, repository: str, subject: str, artifact_type: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM referrers WHERE upstream = ? AND repository = ? AND subject = ?"
                         " AND artifact_type = ?", (upstream, repository, subject, artifact_type))

    def delete_repository(self, upstream: str, repository: str) -> None:
        """Forget a repository's tags, referrers and its claims on content (not the content)."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM tags WHERE upstream = ? AND repository = ?", (upstream, repository))
            conn.execute("DELETE FROM referrers WHERE upstream = ? AND repository = ?", (upstream, repository))
            conn.execute("DELETE FROM refs WHERE upstream = ? AND repository = ?", (upstream, repository))

    def delete_tags_before(self, before: float) -> int:
        """Forget tags and referrers answers not asked for since ``before``."""
        with self._transaction() as conn:
            tags = conn.execute("DELETE FROM tags WHERE last_access < ?", (before,)).rowcount
            return tags + conn.execute("DELETE FROM referrers WHERE last_access < ?", (before,)).rowcount

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def apply(self, batch: AccessBatch) -> None:
        """Write a batch of recorded accesses in one transaction."""
        pinned = [(d,) for (upstream, repository, d) in batch.refs if self.is_pinned(upstream, repository)]
        with self._transaction() as conn:
            conn.executemany(
                "UPDATE content SET last_access = max(last_access, ?), hits = hits + ? WHERE digest = ?",
                [(when, hits, digest) for digest, (when, hits) in batch.content.items()],
            )
            conn.executemany(
                "UPDATE tags SET last_access = max(last_access, ?) WHERE upstream = ? AND repository = ? AND tag = ?",
                [(when, *key) for key, when in batch.tags.items()],
            )
            conn.executemany(
                "UPDATE referrers SET last_access = max(last_access, ?) WHERE upstream = ? AND repository = ?"
                " AND subject = ? AND artifact_type = ?",
                [(when, *key) for key, when in batch.referrers.items()],
            )
            conn.executemany("INSERT OR IGNORE INTO refs (upstream, repository, digest) VALUES (?, ?, ?)",
                             list(batch.refs))
            conn.executemany("UPDATE content SET pinned = 1 WHERE digest = ? AND pinned = 0", pinned)
            conn.executemany(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                list(batch.counters.items()),
            )


def _count_pinned(conn: sqlite3.Connection) -> tuple[int, int]:
    """(entries, bytes) of pinned content, counted: a scan of the pinned rows (only when an index
    older than schema 4 is opened)."""
    entries, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM content WHERE pinned = 1").fetchone()
    return entries, size


class _Transaction:
    """``with`` block: one IMMEDIATE transaction on the writer connection, under its lock."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock) -> None:
        self.conn, self.lock = conn, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.conn

    def __exit__(self, kind, value, traceback) -> None:
        try:
            self.conn.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self.lock.release()


def _float(value: str) -> float:
    """A removal mark's time; one not written by Index.mark_removing counts as long past."""
    try:
        return float(value)
    except ValueError:
        return 0.0


def _entry(row: tuple) -> Entry:
    return Entry(*row[:7], bool(row[7]), row[8])


def _split(script: str) -> list[str]:
    """The statements of the schema (triggers contain ';' inside BEGIN ... END)."""
    statements, current = [], []
    for line in script.splitlines():
        line = line.split("--", 1)[0].rstrip()
        if not line:
            continue
        current.append(line)
        text = "\n".join(current)
        if text.endswith(";") and sqlite3.complete_statement(text):
            statements.append(text)
            current = []
    return statements


@dataclass
class AccessBatch:
    """Accesses recorded in memory between two flushes to the index."""

    content: dict[str, tuple[float, int]] = field(default_factory=dict)   # digest -> (last access, hits)
    tags: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (upstream, repo, tag) -> when (all classes)
    refs: set[tuple[str, str, str]] = field(default_factory=set)           # (upstream, repo, digest)
    ref_upstreams: dict[str, set[str]] = field(default_factory=dict)       # digest -> upstreams in refs
    counters: dict[str, int] = field(default_factory=dict)
    # (upstream, repo, subject, artifact type) -> when
    referrers: dict[tuple[str, str, str, str], float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.content or self.tags or self.refs or self.counters or self.referrers)

    def touch(self, digest: str, when: float, upstream: str, repository: str) -> None:
        _, hits = self.content.get(digest, (0.0, 0))
        self.content[digest] = (when, hits + 1)
        self.refs.add((upstream, repository, digest))
        self.ref_upstreams.setdefault(digest, set()).add(upstream)

    def touch_tag(self, upstream: str, repository: str, tag: str, when: float) -> None:
        self.tags[(upstream, repository, tag)] = when

    def touch_referrers(self, upstream: str, repository: str, subject: str, artifact_type: str, when: float) -> None:
        self.referrers[(upstream, repository, subject, artifact_type)] = when

    def count(self, name: str, value: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + value
