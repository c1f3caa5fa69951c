"""The embedded store's file: one SQLite database, one row per document, one transaction per
operation.

Why SQLite: a write costs one row (and its few index rows), not the collection;
``BEGIN IMMEDIATE`` serialises writers between threads and processes; ``synchronous=FULL``
fsyncs the journal and the file at every commit, so an acknowledged write survives a power cut.

Why a rollback journal (``PERSIST``) and not WAL: WAL keeps its index in a ``-shm`` file that
every connection maps into memory, and a mapping whose file can no longer be written (made
immutable, or its disk gone) kills the process with SIGBUS at its next read -- a daemon dead
with no log line.  A rollback journal maps nothing: the same accident is an error on each
write ("disk I/O error", "readonly database"), which a daemon logs and backs off from, and the
store is whole when the files are writable again.  The price: a write commits in about 0.7 ms
instead of 0.13 ms, and a writer waits (up to BUSY_TIMEOUT_S) for reads in progress in other
processes to end; no read holds its transaction longer than one operation.  A store left in
WAL mode by an older cax is switched on the first open that has it alone.

Every row carries ``seq``, the store's generation at its last write (``meta.seq`` is bumped
once per writing transaction): change detection is by this counter, never by file stat.
Nothing is cached between operations, so there is nothing in memory that could differ from
the file after a failed write: a failed operation is a rolled-back transaction.

Bodies are BSON; bodies larger than ``PACK_ABOVE`` bytes (file manifests) are stored
zlib-compressed.  A store made by an older cax (``<db>.<collection>.bson`` files) is migrated
in one transaction on first open for writing; the old files are kept, renamed ``.migrated``.
A store of an older format is upgraded in place, in one transaction, on first open for
writing; opened read-only, it is read as it is (without what it lacks: sorting from the
index, the ``location`` column).

Unique indexes (``storeunique``) keep one row per distinct key of each document in
``index_keys``, whose primary key makes SQLite refuse a key held by another document inside
the writing transaction; the refusal is turned into MongoDB's duplicate key error, and the
transaction, with everything the operation wrote, is rolled back.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import sqlite3
import threading
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bson
from bson.codec_options import CodecOptions
from pymongo.errors import DocumentTooLarge

from cax.runsdb.storeindex import (
    ENTRY_COLUMNS,
    EVERYTHING,
    Candidates,
    index_values,
    sql_conditions,
)
from cax.runsdb.storeplan import Planner, Term
from cax.runsdb.storeunique import (
    ID_INDEX,
    UNDEFINED,
    IndexSpec,
    canonical,
    conflict,
    duplicate_key,
    key_values,
)

log = logging.getLogger(__name__)

#: Documents are decoded with naive UTC datetimes: the form mongomock evaluates on.
CODEC = CodecOptions()
FILE_NAME = "runsdb.sqlite"
CLOCK_NAME = "clock"
#: 1: the first SQLite format; 2: ``docs.start`` (epoch ms) added, for sorted limited finds;
#: 3: ``entries.location`` added, and the tables of declared indexes and unique keys; the
#: index on ``docs.seq`` dropped (no query used it, and every write rewrote it).
FORMAT = 3
PACK_ABOVE = 2048
#: MongoDB's largest document (maxBsonObjectSize): 16 MiB.
MAX_BSON_SIZE = 16 * 1024 * 1024
BUSY_TIMEOUT_S = 60.0
#: The persisted journal is truncated to this after a large transaction (a migration).
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024

TABLES = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS docs (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    coll TEXT NOT NULL, key BLOB NOT NULL, seq INTEGER NOT NULL,
    number, name, irregular INTEGER NOT NULL DEFAULT 0,
    packed INTEGER NOT NULL DEFAULT 0, body BLOB NOT NULL, start INTEGER);
CREATE TABLE IF NOT EXISTS entries (
    doc INTEGER NOT NULL, coll TEXT NOT NULL, host, type, status, version, location);
CREATE TABLE IF NOT EXISTS indexes (
    coll TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL, is_unique INTEGER NOT NULL,
    PRIMARY KEY (coll, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS index_keys (
    coll TEXT NOT NULL, name TEXT NOT NULL, key BLOB NOT NULL, doc INTEGER NOT NULL,
    PRIMARY KEY (coll, name, key)) WITHOUT ROWID;
"""
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS docs_key ON docs (coll, key);
DROP INDEX IF EXISTS docs_seq;
CREATE INDEX IF NOT EXISTS docs_number ON docs (coll, number);
CREATE INDEX IF NOT EXISTS docs_name ON docs (coll, name);
CREATE INDEX IF NOT EXISTS docs_irregular ON docs (coll, irregular);
CREATE INDEX IF NOT EXISTS docs_start ON docs (coll, start, number);
CREATE INDEX IF NOT EXISTS entries_doc ON entries (doc);
CREATE INDEX IF NOT EXISTS entries_hts ON entries (coll, host, type, status);
CREATE INDEX IF NOT EXISTS entries_sh ON entries (coll, status, host);
CREATE INDEX IF NOT EXISTS entries_location ON entries (coll, location);
CREATE INDEX IF NOT EXISTS index_keys_doc ON index_keys (doc);
"""
ENTRY_INSERT = ("INSERT INTO entries (doc, coll, host, type, status, version, location) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)")


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {column for _, column, *_ in conn.execute(f"PRAGMA table_info({table})")}


def _create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables inside the caller's transaction (``executescript`` would commit),
    bringing an older store's tables up to date first (see ``_reindex``)."""
    for statement in TABLES.split(";"):
        if statement.strip():
            conn.execute(statement)
    upgraded = False
    if "start" not in _columns(conn, "docs"):  # format 1
        conn.execute("ALTER TABLE docs ADD COLUMN start INTEGER")
        upgraded = True
    if "location" not in _columns(conn, "entries"):  # formats 1 and 2
        conn.execute("ALTER TABLE entries ADD COLUMN location")
        upgraded = True
    if upgraded:
        _reindex(conn)
    for statement in INDEXES.split(";"):
        if statement.strip():
            conn.execute(statement)


def _reindex(conn: sqlite3.Connection) -> None:
    """Recompute every document's index values from its body (once; seconds at 100,000
    runs): a new column is filled, and a document a new column makes irregular is marked."""
    conn.execute("DELETE FROM entries")
    rows = [row for (row,) in conn.execute("SELECT row FROM docs ORDER BY row")]
    for start in range(0, len(rows), 1000):  # in chunks: memory does not grow with the store
        chunk = rows[start:start + 1000]
        docs, entries = [], []
        for row, coll, packed, body in conn.execute(
                f"SELECT row, coll, packed, body FROM docs WHERE row IN "
                f"({', '.join('?' * len(chunk))})", chunk).fetchall():
            values = index_values(bson.decode(unpack(packed, body), codec_options=CODEC))
            docs.append((values.number, values.name, int(values.irregular), values.start, row))
            entries.extend((row, coll, *entry) for entry in values.entries)
        conn.executemany("UPDATE docs SET number = ?, name = ?, irregular = ?, start = ? "
                         "WHERE row = ?", docs)
        conn.executemany(ENTRY_INSERT, entries)
    conn.execute("UPDATE meta SET value = ? WHERE name = 'format'", (FORMAT,))
    log.info("runs DB: upgraded the embedded store to format %d (%d documents)", FORMAT,
             len(rows))


def id_key(value: Any) -> bytes:
    """The stored key of an ``_id``: its BSON encoding, so ObjectId("..") and ".." differ."""
    return bson.encode({"": value})


def encode_body(doc: dict[str, Any]) -> tuple[int, bytes]:
    """A document's stored body; one larger than a MongoDB server accepts is refused, as by
    pymongo (DocumentTooLarge), so nothing the embedded store holds could not be moved to one."""
    raw = bson.encode(doc)
    if len(raw) > MAX_BSON_SIZE:
        raise DocumentTooLarge(f"BSON document too large ({len(raw)} bytes) - the embedded "
                               f"runs DB supports BSON document sizes up to {MAX_BSON_SIZE} "
                               "bytes")
    if len(raw) > PACK_ABOVE:
        return 1, zlib.compress(raw, 1)
    return 0, raw


def unpack(packed: int, body: bytes) -> bytes:
    return zlib.decompress(body) if packed else body


class StoreFile:
    """The SQLite file of one embedded store, shared by the threads of one client."""

    def __init__(self, directory: Path, read_only: bool):
        self.directory = directory
        self.path = directory / FILE_NAME
        self.read_only = read_only
        self.lock = threading.RLock()
        self.has_indexes = True  # a migration at opening writes into a store just created
        if read_only:
            if not directory.is_dir():
                raise FileNotFoundError(f"no runs DB at {directory}")
            self.conn = self._open_read_only()
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self.conn = self._connect(str(self.path), uri=False)
            self._set_up()
        self.identity = self._identity()
        # An older store opened read-only cannot be upgraded: what it lacks is not used.
        #: False for a format-1 store opened read-only: sorts are not answered from the index.
        self.sortable = "start" in _columns(self.conn, "docs")
        #: The entry fields the index holds (a format-1 or 2 store opened read-only: no location).
        located = "location" in _columns(self.conn, "entries")
        self.entry_columns = {field: column for field, column in ENTRY_COLUMNS.items()
                              if located or column != "location"}
        self.has_indexes = "indexes" in {name for (name,) in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}

    # -- opening ------------------------------------------------------------------------

    @staticmethod
    def _connect(target: str, uri: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(target, uri=uri, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        return conn

    def _open_read_only(self) -> sqlite3.Connection:
        """Open without creating anything; a store not yet migrated is read into memory."""
        if self.path.exists():
            conn = self._connect(f"file:{self.path}?mode=ro", uri=True)
            conn.execute("PRAGMA query_only = 1")
            return conn
        conn = self._connect(":memory:", uri=False)
        with self.transaction(conn, write=True):
            _create_schema(conn)
            self._migrate(conn)
        return conn

    def _set_up(self) -> None:
        try:
            self.conn.execute("PRAGMA journal_mode = PERSIST")
        except sqlite3.OperationalError:  # an older cax has the WAL store open
            log.warning("runs DB %s: left in WAL mode while another process has it open; "
                        "the first open that has it alone switches it", self.path)
        self.conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        self.conn.execute("PRAGMA synchronous = FULL")
        with self.transaction(write=True):
            _create_schema(self.conn)
            found = self.conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
            if found is None:
                migrated = self._migrate(self.conn)
                self.conn.execute("INSERT INTO meta VALUES ('format', ?), ('seq', 0)", (FORMAT,))
            else:
                migrated = []
        for old in migrated:  # after the commit: the old files are a backup now
            try:
                old.rename(old.with_name(old.name + ".migrated"))
            except FileNotFoundError:
                pass

    def _migrate(self, conn: sqlite3.Connection) -> list[Path]:
        """Copy the collections of an older cax's BSON files into ``conn``; return the files."""
        files = sorted(self.directory.glob("*.*.bson"))
        for file in files:
            db, _, coll = file.name[:-len(".bson")].partition(".")
            docs = bson.decode_all(file.read_bytes(), CODEC)
            self.put_many(f"{db}.{coll}", docs, seq=0, conn=conn)
            log.info("runs DB: migrated %d document(s) of %s.%s from %s", len(docs), db, coll,
                     file)
        return files

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self.read_only:
                return None
            raise
        return (st.st_dev, st.st_ino)

    def check_present(self) -> None:
        """Raise OSError if the store's file vanished or was replaced since it was opened.

        SQLite keeps working on an open file that was deleted or whose disk was unmounted
        lazily; without this check such a store would read as empty or lose its writes.
        """
        if self.identity is None:  # read-only, not yet migrated: read into memory at open
            if not self.directory.is_dir():
                raise FileNotFoundError(f"embedded runs DB {self.directory} has vanished")
            return
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise type(exc)(exc.errno, f"embedded runs DB unavailable: {exc.strerror}",
                            str(self.path)) from None
        if (st.st_dev, st.st_ino) != self.identity:
            raise FileNotFoundError(f"embedded runs DB {self.path} was replaced while open")

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    # -- transactions ---------------------------------------------------------------------

    @contextmanager
    def transaction(self, conn: sqlite3.Connection | None = None,
                    write: bool = False) -> Iterator[sqlite3.Connection]:
        """One operation: BEGIN IMMEDIATE for a write (writers queue on the busy timeout),
        a plain BEGIN for a read (a consistent snapshot); rolled back on any exception."""
        conn = conn or self.conn
        with self.lock:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back itself (an I/O error)
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def next_seq(self) -> int:
        """Bump the store's generation; call once inside each writing transaction."""
        row = self.conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'seq' "
                                "RETURNING value").fetchone()
        return int(row[0])

    def generation(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()
        return int(row[0]) if row else 0

    # -- rows -----------------------------------------------------------------------------

    def candidates(self, coll: str, query: dict[str, Any]) -> Candidates:
        """A superset of the documents of ``coll`` matching ``query`` (see ``storeplan``)."""
        found = Planner(_IndexReader(self.conn, coll), self.entry_columns,
                        start_column=self.sortable).plan(query)
        if found.everything:
            return EVERYTHING
        irregular = self.irregular_rows(coll)
        if found.complement:
            return Candidates(found.rows - irregular, True)
        return Candidates(found.rows | irregular, False)

    def load(self, coll: str, found: Candidates) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
        """Yield (row, seq, BSON, document) of the candidates, in insertion order."""
        if not found.complement:
            if not found.rows:
                return
            rows = sorted(found.rows)
            for start in range(0, len(rows), 500):
                chunk = rows[start:start + 500]
                cursor = self.conn.execute(
                    f"SELECT row, seq, packed, body FROM docs WHERE row IN "
                    f"({', '.join('?' * len(chunk))}) ORDER BY row", chunk)
                for row, seq, packed, body in cursor:
                    raw = unpack(packed, body)
                    yield row, seq, raw, bson.decode(raw, codec_options=CODEC)
            return
        cursor = self.conn.execute(
            "SELECT row, seq, packed, body FROM docs WHERE coll = ? ORDER BY row", (coll,))
        for row, seq, packed, body in cursor:
            if row not in found.rows:
                raw = unpack(packed, body)
                yield row, seq, raw, bson.decode(raw, codec_options=CODEC)

    def ordered(self, coll: str, order: list[tuple[str, int]], found: Candidates
                ) -> Iterator[tuple[tuple[Any, ...], int, bytes, dict[str, Any]]]:
        """Yield (sort key, row, BSON, document) of the regular candidates in ``order``.

        ``order`` is a list of (column of ``SORT_COLUMNS``, 1 or -1).  SQLite orders NULL,
        then numbers, then text, as MongoDB orders null (and missing), numbers, strings;
        regular documents hold nothing else in these columns.  Irregular documents are not
        yielded: the caller evaluates them apart.  Bodies are read in chunks, so a caller
        that stops early has decoded only what it used.
        """
        columns = ", ".join(column for column, _ in order)
        by = ", ".join(f"{column} {'DESC' if direction < 0 else 'ASC'}"
                       for column, direction in order)
        cursor = self.conn.execute(
            f"SELECT row, {columns} FROM docs WHERE coll = ? AND irregular = 0 "
            f"ORDER BY {by}, row", (coll,))
        while chunk := cursor.fetchmany(200):
            keys = {row: tuple(key) for row, *key in chunk
                    if (row in found.rows) != found.complement}
            if not keys:
                continue
            bodies = {row: (packed, body) for row, packed, body in self.conn.execute(
                f"SELECT row, packed, body FROM docs WHERE row IN "
                f"({', '.join('?' * len(keys))})", list(keys))}
            for row, key in keys.items():
                if row in bodies:
                    raw = unpack(*bodies[row])
                    yield key, row, raw, bson.decode(raw, codec_options=CODEC)

    def sort_keys(self, coll: str, rows: list[int], columns: list[str]
                  ) -> dict[int, tuple[Any, ...]]:
        """The values of ``columns`` (of ``SORT_COLUMNS``) of each of ``rows``."""
        keys: dict[int, tuple[Any, ...]] = {}
        selected = ", ".join(columns)
        for start in range(0, len(rows), 500):
            chunk = rows[start:start + 500]
            keys.update((row, tuple(values)) for row, *values in self.conn.execute(
                f"SELECT row, {selected} FROM docs WHERE row IN "
                f"({', '.join('?' * len(chunk))})", chunk))
        return keys

    def irregular_rows(self, coll: str) -> set[int]:
        return {r for (r,) in self.conn.execute(
            "SELECT row FROM docs WHERE coll = ? AND irregular = 1", (coll,))}

    def count_entries(self, coll: str, columns: list[str]) -> tuple[list[tuple], set[int]]:
        """Count the entries of ``coll`` grouped by index ``columns``, from the index alone.

        Returns the counts (``(*values, count)``) of the entries whose grouped values are all
        set, and the rows of the documents left out because an entry has one unset (the
        index cannot tell a missing field from a null) or the document is irregular: the
        caller evaluates those few documents itself.
        """
        unset = " OR ".join(f"{column} IS NULL" for column in columns)
        left_out = {r for (r,) in self.conn.execute(
            f"SELECT DISTINCT doc FROM entries WHERE coll = ? AND ({unset})", (coll,))}
        group = ", ".join(columns)
        counts = self.conn.execute(
            f"SELECT {group}, count(*) FROM entries WHERE coll = ? AND doc NOT IN "
            f"(SELECT doc FROM entries WHERE coll = ? AND ({unset})) GROUP BY {group}",
            (coll, coll)).fetchall()
        return counts, left_out | self.irregular_rows(coll)

    def seqs(self, coll: str, found: Candidates) -> dict[int, int]:
        """The generation of each candidate's last write, without reading any body."""
        if found.complement or len(found.rows) > 5000:
            every = dict(self.conn.execute("SELECT row, seq FROM docs WHERE coll = ?", (coll,)))
            if found.complement:
                return {r: s for r, s in every.items() if r not in found.rows}
            return {r: every[r] for r in found.rows if r in every}
        rows, result = sorted(found.rows), {}
        for start in range(0, len(rows), 500):
            chunk = rows[start:start + 500]
            result.update(self.conn.execute(
                f"SELECT row, seq FROM docs WHERE row IN ({', '.join('?' * len(chunk))})", chunk))
        return result

    def put_many(self, coll: str, docs: Iterable[dict[str, Any]], *, seq: int,
                 conn: sqlite3.Connection | None = None) -> None:
        """Insert new documents in batches (DuplicateKeyError if an ``_id`` or a unique key
        is taken; the caller's transaction then writes nothing).

        Row ids are assigned here, above any ever used (AUTOINCREMENT never reuses one), so
        documents and their index rows go in with one ``executemany`` per batch.
        """
        conn = conn or self.conn
        last = conn.execute("SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'docs'),"
                            " 0), COALESCE((SELECT max(row) FROM docs), 0)").fetchone()
        row = max(last)
        uniques = self.unique_indexes(coll, conn)
        batch: list[tuple] = []
        entries: list[tuple] = []
        keys: list[tuple] = []
        for doc in docs:
            row += 1
            values = index_values(doc)
            packed, body = encode_body(doc)
            batch.append((row, coll, id_key(doc["_id"]), seq, values.number, values.name,
                          int(values.irregular), packed, body, values.start))
            entries.extend((row, coll, *entry) for entry in values.entries)
            keys.extend(_unique_rows(coll, row, doc, uniques))
            if len(batch) >= 1000:
                self._insert(conn, coll, batch, entries, keys, uniques)
        self._insert(conn, coll, batch, entries, keys, uniques)

    def _insert(self, conn: sqlite3.Connection, coll: str, batch: list[tuple],
                entries: list[tuple], keys: list[tuple], uniques: list[IndexSpec]) -> None:
        try:
            conn.executemany("INSERT INTO docs (row, coll, key, seq, number, name, irregular, "
                             "packed, body, start) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
        except sqlite3.IntegrityError:
            for row, _, key, *_ in batch:  # inserted in order up to the one refused
                (holder,) = conn.execute("SELECT row FROM docs WHERE coll = ? AND key = ?",
                                         (coll, key)).fetchone() or (row,)
                if holder != row:
                    raise duplicate_key(coll, ID_INDEX, (bson.decode(key)[""],)) from None
            raise
        conn.executemany(ENTRY_INSERT, entries)
        self._insert_keys(conn, coll, keys, uniques)
        batch.clear()
        entries.clear()
        keys.clear()

    @staticmethod
    def _insert_keys(conn: sqlite3.Connection, coll: str, keys: list[tuple],
                     uniques: list[IndexSpec]) -> None:
        """Insert unique keys (coll, name, key, doc); DuplicateKeyError naming the first
        key another document holds."""
        if not keys:
            return
        try:
            conn.executemany("INSERT INTO index_keys (coll, name, key, doc) VALUES (?, ?, ?, ?)",
                             keys)
        except sqlite3.IntegrityError:
            specs = {spec.name: spec for spec in uniques}
            for _, name, key, doc in keys:
                (holder,) = conn.execute(
                    "SELECT doc FROM index_keys WHERE coll = ? AND name = ? AND key = ?",
                    (coll, name, key)).fetchone() or (doc,)
                if holder != doc:
                    raise duplicate_key(coll, specs[name],
                                        tuple(_decode_key(key))) from None
            raise

    def replace(self, coll: str, row: int, doc: dict[str, Any], *, seq: int) -> None:
        """Write a changed document; its index rows only where they changed (a lease's
        renewal changes no indexed value: it writes one row and no index)."""
        values = index_values(doc)
        packed, body = encode_body(doc)
        indexed = {"key": id_key(doc["_id"]), "number": values.number, "name": values.name,
                   "irregular": int(values.irregular), "start": values.start}
        stored = self.conn.execute("SELECT key, number, name, irregular, start FROM docs "
                                   "WHERE row = ?", (row,)).fetchone()
        # SQLite rewrites the index entries of every column SET, changed or not: only the
        # indexed columns that changed are set (a renewal then rewrites no index page)
        changed = {column: value for (column, value), old in zip(indexed.items(), stored or (),
                                                                  strict=False)
                   if repr(value) != repr(old)} if stored else indexed
        assigned = "".join(f", {column} = ?" for column in changed)
        self.conn.execute(f"UPDATE docs SET seq = ?, packed = ?, body = ?{assigned} WHERE row = ?",
                          (seq, packed, body, *changed.values(), row))
        columns = ", ".join(self.entry_columns.values())
        stored = self.conn.execute(f"SELECT {columns} FROM entries WHERE doc = ?",
                                   (row,)).fetchall()
        if sorted(map(repr, stored)) != sorted(repr(tuple(e)) for e in values.entries):
            self.conn.execute("DELETE FROM entries WHERE doc = ?", (row,))
            self.conn.executemany(ENTRY_INSERT, [(row, coll, *e) for e in values.entries])
        uniques = self.unique_indexes(coll)
        if uniques:
            keys = _unique_rows(coll, row, doc, uniques)
            held = self.conn.execute("SELECT coll, name, key, doc FROM index_keys WHERE doc = ?",
                                     (row,)).fetchall()
            if sorted(held) != sorted(keys):
                self.conn.execute("DELETE FROM index_keys WHERE doc = ?", (row,))
                self._insert_keys(self.conn, coll, keys, uniques)

    def delete(self, rows: Iterable[int]) -> None:
        for row in rows:
            self.conn.execute("DELETE FROM docs WHERE row = ?", (row,))
            self.conn.execute("DELETE FROM entries WHERE doc = ?", (row,))
            if self.has_indexes:
                self.conn.execute("DELETE FROM index_keys WHERE doc = ?", (row,))

    # -- declared indexes -----------------------------------------------------------------

    def indexes(self, coll: str, conn: sqlite3.Connection | None = None, *,
                unique_only: bool = False) -> list[IndexSpec]:
        """The indexes declared on ``coll`` (by ``create_index``), in name order."""
        if not self.has_indexes:
            return []
        only = " AND is_unique = 1" if unique_only else ""
        return [IndexSpec.from_json(name, spec) for name, spec in (conn or self.conn).execute(
            f"SELECT name, spec FROM indexes WHERE coll = ?{only} ORDER BY name", (coll,))]

    def unique_indexes(self, coll: str, conn: sqlite3.Connection | None = None
                       ) -> list[IndexSpec]:
        """The unique indexes of ``coll``: looked up at every write (no cache to go stale)."""
        return self.indexes(coll, conn, unique_only=True)

    def create_index(self, coll: str, spec: IndexSpec) -> None:
        """Declare ``spec``; a unique one gets the keys of every document first, and fails
        (DuplicateKeyError) if two documents share one, declaring nothing (the caller's
        transaction is rolled back).  Declaring an existing index again changes nothing."""
        for existing in self.indexes(coll):
            problem = conflict(existing, spec)
            if problem:
                raise problem
            if existing == spec:
                return
        self.conn.execute("INSERT INTO indexes (coll, name, spec, is_unique) VALUES (?, ?, ?, ?)",
                          (coll, spec.name, spec.to_json(), int(spec.unique)))
        if not spec.unique:
            return
        keys: list[tuple] = []
        for row, _, _, doc in self.load(coll, EVERYTHING):
            keys.extend(_unique_rows(coll, row, doc, [spec]))
            if len(keys) >= 5000:
                self._insert_keys(self.conn, coll, keys, [spec])
                keys.clear()
        self._insert_keys(self.conn, coll, keys, [spec])
        log.info("runs DB: unique index %s of %s created", spec.name, coll)

    def drop_indexes(self, coll: str) -> None:
        """Forget every index declared on ``coll`` and its keys (the collection is dropped)."""
        if self.has_indexes:
            self.conn.execute("DELETE FROM indexes WHERE coll = ?", (coll,))
            self.conn.execute("DELETE FROM index_keys WHERE coll = ?", (coll,))

    # -- the clock ------------------------------------------------------------------------

    def server_time(self) -> dt.datetime:
        """The kernel time of the machine holding the store: the mtime of a byte just written.

        Not ``time.time()``: that is the local process's clock (and a faked one under
        libfaketime); the file system stamps the write with the kernel's clock of the machine
        that holds the file (the file server's, for a network file system).
        """
        fd = os.open(self.directory / CLOCK_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"\n")
            mtime_ns = os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)
        return dt.datetime.fromtimestamp(mtime_ns / 1e9, tz=dt.timezone.utc)


def _unique_rows(coll: str, row: int, doc: dict[str, Any], uniques: list[IndexSpec]
                 ) -> list[tuple[str, str, bytes, int]]:
    """The ``index_keys`` rows of one document: its distinct keys in each unique index."""
    return [(coll, spec.name, canonical(values), row)
            for spec in uniques if spec.indexes(doc) for values in key_values(doc, spec.keys)]


def _decode_key(key: bytes) -> list[Any]:
    """The values of a stored key, for an error message (numbers as the index holds them)."""
    return [UNDEFINED if v == UNDEFINED else math.nan if v == {"$nan": True} else v
            for v in bson.decode(key)["k"]]


class _IndexReader:
    """The planner's view of one collection's index rows (see ``storeplan.IndexReader``)."""

    def __init__(self, conn: sqlite3.Connection, coll: str):
        self.conn = conn
        self.coll = coll

    @staticmethod
    def _where(term: Term) -> tuple[str, str, str, list[Any]]:
        """(table, its document id column, conditions, parameters) of ``term``."""
        columns = {("key" if column == "_id" else column):
                   ([id_key(v) for v in values] if column == "_id" else values)
                   for column, values in term.columns}
        where, params = sql_conditions(columns)
        if term.table == "doc":
            return "docs", "row", where, params
        return "entries", "doc", where, params

    def rows(self, term: Term) -> set[int]:
        table, ident, where, params = self._where(term)
        return {r for (r,) in self.conn.execute(
            f"SELECT {ident} FROM {table} WHERE coll = ? AND {where}", [self.coll, *params])}

    def count(self, term: Term, cap: int) -> int:
        table, _, where, params = self._where(term)
        (n,) = self.conn.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE coll = ? AND {where} LIMIT ?)",
            [self.coll, *params, cap]).fetchone()
        return int(n)

    def probe(self, term: Term, rows: Iterable[int]) -> set[int]:
        table, ident, where, params = self._where(term)
        rows, found = sorted(rows), set()
        for start in range(0, len(rows), 500):
            chunk = rows[start:start + 500]
            found.update(r for (r,) in self.conn.execute(
                f"SELECT {ident} FROM {table} WHERE {ident} IN ({', '.join('?' * len(chunk))}) "
                f"AND {where}", [*chunk, *params]))
        return found
