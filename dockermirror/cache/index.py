"""The cache index: one SQLite database (WAL mode) beside the blob files.

It records every stored digest (size, media type, created, last access, hits), which
repositories each digest was served for, the tag -> digest map with its freshness,
and traffic counters. A row in ``content`` means the file is complete and verified.

Reads use their own connection and never wait for the writer (WAL). Writes go
through one connection under a lock and are meant for a worker thread; accesses are
batched by the caller (:class:`AccessBatch`) so a cache hit costs no write of its own.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "docker-mirror-cache/1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS content (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    media_type  TEXT,
    kind        TEXT NOT NULL,          -- 'blob' or 'manifest'
    created     REAL NOT NULL,
    last_access REAL NOT NULL,
    hits        INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS content_by_access ON content (last_access);
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
    digest      TEXT NOT NULL,
    media_type  TEXT,
    size        INTEGER NOT NULL,
    checked     REAL NOT NULL,          -- last time the upstream confirmed it
    last_access REAL NOT NULL,
    PRIMARY KEY (upstream, repository, tag)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""


class ForeignDatabase(Exception):
    """The file is an SQLite database, but not a docker-mirror cache index."""


@dataclass(frozen=True, slots=True)
class Entry:
    digest: str
    size: int
    media_type: str | None
    kind: str
    created: float
    last_access: float
    hits: int = 0


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


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


class Index:
    """Typed access to the index database."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._writer = _connect(self.path)
        try:
            self._init_schema()
        except BaseException:
            self._writer.close()
            raise
        self._reader = _connect(self.path)

    def _init_schema(self) -> None:
        conn = self._writer
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            raise ForeignDatabase(f"{self.path} is not an SQLite database ({exc})") from None
        if tables and "meta" not in tables:
            raise ForeignDatabase(f"{self.path} is an SQLite database of something else")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta (key, value) VALUES ('format', ?)", (FORMAT,))
            conn.execute("INSERT INTO meta (key, value) VALUES ('created', ?)", (str(time.time()),))
        elif row[0] != FORMAT:
            raise ForeignDatabase(f"{self.path} has index format {row[0]!r}, expected {FORMAT!r}")

    def close(self) -> None:
        with self._lock:
            self._writer.close()
        self._reader.close()

    # --- reads (cheap, any thread)

    def content(self, digest: str) -> Entry | None:
        row = self._reader.execute(
            "SELECT digest, size, media_type, kind, created, last_access, hits FROM content WHERE digest = ?",
            (digest,),
        ).fetchone()
        return Entry(*row) if row else None

    def tag(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        row = self._reader.execute(
            "SELECT upstream, repository, tag, digest, media_type, size, checked, last_access"
            " FROM tags WHERE upstream = ? AND repository = ? AND tag = ?",
            (upstream, repository, tag),
        ).fetchone()
        return TagEntry(*row) if row else None

    def tags_of(self, upstream: str, repository: str) -> list[str]:
        rows = self._reader.execute("SELECT tag FROM tags WHERE upstream = ? AND repository = ? ORDER BY tag",
                                    (upstream, repository))
        return [row[0] for row in rows]

    def counters(self) -> dict[str, int]:
        return dict(self._reader.execute("SELECT name, value FROM counters"))

    def totals(self) -> tuple[int, int]:
        """(number of entries, bytes) of stored content."""
        count, size = self._reader.execute("SELECT count(*), coalesce(sum(size), 0) FROM content").fetchone()
        return count, size

    # --- writes (blocking: call from a worker thread on the server)

    def add_content(self, entry: Entry, upstream: str, repository: str) -> None:
        with self._lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT OR REPLACE INTO content (digest, size, media_type, kind, created, last_access, hits)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (entry.digest, entry.size, entry.media_type, entry.kind, entry.created,
                     entry.last_access, entry.hits),
                )
                conn.execute("INSERT OR IGNORE INTO refs (upstream, repository, digest) VALUES (?, ?, ?)",
                             (upstream, repository, entry.digest))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def remove_content(self, digest: str) -> None:
        with self._lock:
            self._writer.execute("DELETE FROM content WHERE digest = ?", (digest,))

    def put_tag(self, entry: TagEntry) -> None:
        with self._lock:
            self._writer.execute(
                "INSERT OR REPLACE INTO tags (upstream, repository, tag, digest, media_type, size, checked,"
                " last_access) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.upstream, entry.repository, entry.tag, entry.digest, entry.media_type, entry.size,
                 entry.checked, entry.last_access),
            )

    def delete_tag(self, upstream: str, repository: str, tag: str) -> None:
        with self._lock:
            self._writer.execute("DELETE FROM tags WHERE upstream = ? AND repository = ? AND tag = ?",
                                 (upstream, repository, tag))

    def apply(self, batch: AccessBatch) -> None:
        """Write a batch of recorded accesses in one transaction."""
        with self._lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "UPDATE content SET last_access = max(last_access, ?), hits = hits + ? WHERE digest = ?",
                    [(when, hits, digest) for digest, (when, hits) in batch.content.items()],
                )
                conn.executemany(
                    "UPDATE tags SET last_access = max(last_access, ?)"
                    " WHERE upstream = ? AND repository = ? AND tag = ?",
                    [(when, *key) for key, when in batch.tags.items()],
                )
                conn.executemany("INSERT OR IGNORE INTO refs (upstream, repository, digest) VALUES (?, ?, ?)",
                                 list(batch.refs))
                conn.executemany(
                    "INSERT INTO counters (name, value) VALUES (?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                    list(batch.counters.items()),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise


@dataclass
class AccessBatch:
    """Accesses recorded in memory between two flushes to the index."""

    content: dict[str, tuple[float, int]] = field(default_factory=dict)   # digest -> (last access, hits)
    tags: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (upstream, repo, tag) -> when
    refs: set[tuple[str, str, str]] = field(default_factory=set)           # (upstream, repo, digest)
    counters: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.content or self.tags or self.refs or self.counters)

    def touch(self, digest: str, when: float, upstream: str, repository: str) -> None:
        _, hits = self.content.get(digest, (0.0, 0))
        self.content[digest] = (when, hits + 1)
        self.refs.add((upstream, repository, digest))

    def touch_tag(self, upstream: str, repository: str, tag: str, when: float) -> None:
        self.tags[(upstream, repository, tag)] = when

    def count(self, name: str, value: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + value
