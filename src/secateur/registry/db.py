"""The registry's SQLite database: the schema, its migrations, and transactions that never say
"database is locked".

One file, ``registry.db``, in WAL mode (readers never wait for the writer, the writer never waits
for readers), foreign keys on, ``synchronous=FULL`` (a committed write survives a power cut, not
only a killed process). The schema's version is SQLite's ``user_version``; :data:`MIGRATIONS`
holds, for each version, the statements that take a database from the version before to it, and
:func:`connect` applies the missing ones in order, each in its own write transaction (a second
process opening the same old database at the same time finds the work done and skips it).

Every write is one ``BEGIN IMMEDIATE`` transaction (:func:`write`): the write lock is taken at the
start, so two writers never deadlock upgrading a read to a write. SQLite's own ``busy_timeout``
waits for the lock; when it still answers ``SQLITE_BUSY`` (or "locked": WAL recovery, a
checkpoint), the whole transaction is rolled back and run again after an exponential, jittered
backoff, up to :data:`PATIENCE` seconds, after which one line says that the registry is busy and
who to look for. Stdlib ``sqlite3`` only; nothing is pickled (rows hold text, numbers and JSON).
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..errors import SecateurError

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_NAME = "registry.db"
BUSY_TIMEOUT_MS = 5_000  # SQLite's own wait for the write lock, per attempt
PATIENCE = 120.0  # seconds of retrying before a busy registry is reported
SCHEMA_VERSION = 2


class RegistryError(SecateurError):
    """An unknown family, alias, variant or ref, or a registry that cannot be used; one line."""


class RegistryBusy(RegistryError):
    """Another process held the write lock for longer than :data:`PATIENCE` seconds."""


MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE families (
             id INTEGER PRIMARY KEY,
             name TEXT NOT NULL UNIQUE,
             created TEXT NOT NULL)""",
        """CREATE TABLE runs (
             id TEXT PRIMARY KEY,                       -- r-<12 hex>
             pipeline TEXT NOT NULL,
             status TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'interrupted')),
             started TEXT NOT NULL,
             finished TEXT,
             timings TEXT NOT NULL DEFAULT '{}',        -- JSON: stage -> seconds
             verdicts TEXT NOT NULL DEFAULT '[]',       -- JSON: the gate verdicts
             info TEXT NOT NULL DEFAULT '{}')""",
        """CREATE TABLE variants (
             id TEXT PRIMARY KEY,                       -- v-<12 hex>
             family_id INTEGER NOT NULL REFERENCES families(id) ON DELETE RESTRICT,
             name TEXT NOT NULL,
             status TEXT NOT NULL CHECK (status IN ('admitted', 'rejected')),
             card TEXT,                                 -- JSON: the compression card (NULL: none)
             info TEXT NOT NULL DEFAULT '{}',           -- JSON: what is known without a card, evidence
             weights_sha256 TEXT NOT NULL,
             bytes INTEGER NOT NULL,
             parameters INTEGER,
             model_type TEXT,
             store_key TEXT NOT NULL,                   -- objects/<store_key>
             run_id TEXT REFERENCES runs(id) ON DELETE SET NULL,
             created TEXT NOT NULL,
             UNIQUE (family_id, name))""",
        "CREATE INDEX variants_weights ON variants(weights_sha256)",
        "CREATE INDEX variants_store ON variants(store_key)",
        """CREATE TABLE edges (
             id INTEGER PRIMARY KEY,
             child_id TEXT NOT NULL REFERENCES variants(id) ON DELETE CASCADE,
             parent_id TEXT REFERENCES variants(id) ON DELETE SET NULL,  -- NULL: a base outside the registry
             parent_sha256 TEXT,                        -- the parent's weights hash, as the card recorded it
             parent_name TEXT,
             steps TEXT NOT NULL DEFAULT '[]',          -- JSON: the card's history between parent and child
             UNIQUE (child_id))""",
        "CREATE INDEX edges_parent ON edges(parent_id)",
        "CREATE INDEX edges_parent_sha ON edges(parent_sha256)",
        """CREATE TABLE evaluations (
             id INTEGER PRIMARY KEY,
             variant_id TEXT NOT NULL REFERENCES variants(id) ON DELETE CASCADE,
             task TEXT NOT NULL,
             metric TEXT NOT NULL,
             protocol TEXT,
             value REAL,
             extra TEXT NOT NULL DEFAULT '{}',
             settings TEXT NOT NULL DEFAULT '{}',       -- JSON: every setting that made the number
             data_fingerprint TEXT,
             machine TEXT,                              -- JSON: the machine it ran on
             run_id TEXT REFERENCES runs(id) ON DELETE SET NULL,
             at TEXT NOT NULL)""",
        "CREATE INDEX evaluations_variant ON evaluations(variant_id)",
        """CREATE TABLE aliases (
             family_id INTEGER NOT NULL REFERENCES families(id) ON DELETE CASCADE,
             name TEXT NOT NULL,
             variant_id TEXT NOT NULL REFERENCES variants(id) ON DELETE RESTRICT,
             updated TEXT NOT NULL,
             PRIMARY KEY (family_id, name))""",
        """CREATE TABLE alias_history (
             id INTEGER PRIMARY KEY,
             family_id INTEGER NOT NULL REFERENCES families(id) ON DELETE CASCADE,
             alias TEXT NOT NULL,
             action TEXT NOT NULL CHECK (action IN ('set', 'rollback', 'drop')),
             variant_id TEXT REFERENCES variants(id) ON DELETE SET NULL,   -- the target after the move
             previous_id TEXT REFERENCES variants(id) ON DELETE SET NULL,  -- the target before it
             undone INTEGER NOT NULL DEFAULT 0,         -- a 'set' a rollback took back
             at TEXT NOT NULL)""",
        "CREATE INDEX alias_history_alias ON alias_history(family_id, alias)",
    ],
    2: [  # the search room: every candidate a search priced, measured or not
        """CREATE TABLE search_points (
             id INTEGER PRIMARY KEY,
             run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
             family_id INTEGER NOT NULL REFERENCES families(id) ON DELETE CASCADE,
             candidate TEXT NOT NULL,                   -- digest of its choices
             label TEXT NOT NULL,
             choices TEXT NOT NULL,                     -- JSON: one choice per axis
             proxies TEXT NOT NULL DEFAULT '{}',        -- JSON: predicted loss increase, latency, bytes
             measured TEXT,                             -- JSON: quality, speed-up, bytes (NULL: not measured)
             confirmed TEXT,                            -- JSON: the front's re-timing (NULL: none)
             front INTEGER NOT NULL DEFAULT 0,
             variant_id TEXT REFERENCES variants(id) ON DELETE SET NULL,
             UNIQUE (run_id, candidate))""",
        "CREATE INDEX search_points_family ON search_points(family_id)",
    ],
}


def _is_busy(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class Database:
    """One connection to ``registry.db`` with retrying transactions; safe to share between threads
    (a lock serialises them) but not between processes (each process opens its own)."""

    def __init__(self, path: Path):
        self.path = path
        self.retries = 0  # how many times a transaction was run again after SQLITE_BUSY
        self._lock = threading.RLock()
        self._conn = self._retry(lambda: self._open(), what="open")
        self._migrate()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RegistryError(f"registry {self.path}: SQLite refused WAL mode (got {mode!r}); keep "
                                    "SECATEUR_HOME on a local file system")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- transactions -------------------------------------------------------------------------

    def _retry(self, attempt: Callable[[], T], what: str) -> T:
        deadline = time.monotonic() + PATIENCE
        delay = 0.002
        while True:
            try:
                return attempt()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if time.monotonic() > deadline:
                    raise RegistryBusy(f"registry {self.path} stayed busy for {PATIENCE:.0f} s ({what}): another "
                                       "process holds its write lock; try again when it has finished") from None
                self.retries += 1
                log.debug("registry busy (%s); retrying in %.3f s", what, delay)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)

    def write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body(conn)`` in one ``BEGIN IMMEDIATE`` transaction, committed when it returns and
        rolled back when it raises; run again from the start when SQLite answers busy. ``body``
        must do nothing outside the database that it cannot do twice."""

        def attempt() -> T:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(self._conn)
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            return result

        with self._lock:
            return self._retry(attempt, "write")

    def read(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body(conn)`` in one read transaction: a consistent snapshot while writers go on."""

        def attempt() -> T:
            self._conn.execute("BEGIN")
            try:
                return body(self._conn)
            finally:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")

        with self._lock:
            return self._retry(attempt, "read")

    # --- schema -------------------------------------------------------------------------------

    def version(self) -> int:
        return self.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.version()
        if current > SCHEMA_VERSION:
            raise RegistryError(f"registry {self.path} has schema version {current}, newer than this secateur "
                                f"reads ({SCHEMA_VERSION}); upgrade secateur")
        for target in range(current + 1, SCHEMA_VERSION + 1):
            def step(conn: sqlite3.Connection, target: int = target) -> None:
                if conn.execute("PRAGMA user_version").fetchone()[0] >= target:
                    return  # another process migrated it while we waited for the lock
                for statement in MIGRATIONS[target]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")

            self.write(step)
            log.info("registry %s: schema migrated to version %d", self.path, target)

    def integrity(self) -> str:
        """``PRAGMA integrity_check``: ``"ok"`` or the problems SQLite found, joined."""
        rows = self.read(lambda c: c.execute("PRAGMA integrity_check").fetchall())
        return "; ".join(str(r[0]) for r in rows)


__all__ = ["Database", "RegistryError", "RegistryBusy", "MIGRATIONS", "SCHEMA_VERSION", "DB_NAME"]
