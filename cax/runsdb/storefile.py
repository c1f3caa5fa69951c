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
No document is cached between operations, so there is nothing in memory that could differ
from the file after a failed write: a failed operation is a rolled-back transaction.  What is
remembered (row ids of large index lookups, ``remembered``) carries the generation it was read
at and is brought up to date from the rows written since; a rollback forgets all of it, as a
lookup made inside the transaction may describe a generation that was never committed.

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
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bson

from cax.runsdb.storeindex import (
    ENTRY_COLUMNS,
    EVERYTHING,
    RANGE_COLUMNS,
    Candidates,
    Remembered,
    SqlIndexReader,
    id_key,
    index_values,
    store_generation,
    written_since,
)
from cax.runsdb.storeplan import Planner, id_values
from cax.runsdb.storeschema import (
    CODEC,
    ENTRY_INSERT,
    FORMAT,
    TAG_INSERT,
    columns,
    create_schema,
    encode_body,
    unpack,
)
from cax.runsdb.storeunique import (
    ID_INDEX,
    IndexSpec,
    conflict,
    decode_key,
    duplicate_key,
    unique_rows,
)

log = logging.getLogger(__name__)

FILE_NAME = "runsdb.sqlite"
CLOCK_NAME = "clock"
BUSY_TIMEOUT_S = 60.0
#: The persisted journal is truncated to this after a large transaction (a migration).
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024


class StoreFile:
    """The SQLite file of one embedded store, shared by the threads of one client."""

    def __init__(self, directory: Path, read_only: bool):
        self.directory = directory
        self.path = directory / FILE_NAME
        self.read_only = read_only
        self.lock = threading.RLock()
        #: The unique indexes read in the current transaction (``unique_indexes``).
        self._uniques: dict[str, list[IndexSpec]] = {}
        #: The large index lookups remembered (``SqlIndexReader``), under ``lock``.
        self.remembered: Remembered = OrderedDict()
        # a migration at opening writes into a store just created
        self.has_indexes = self.has_tags = True
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
        self.sortable = "start" in columns(self.conn, "docs")
        #: The entry fields the index holds (a format-1 or 2 store opened read-only: no location).
        held = columns(self.conn, "entries")
        self.entry_columns = {field: column for field, column in ENTRY_COLUMNS.items()
                              if column in held}
        #: The entry fields the planner may use: those and the range columns it has.
        self.plan_columns = {**self.entry_columns, **{
            field: column for field, column in RANGE_COLUMNS.items() if column in held}}
        #: Whether ``docs (coll, seq)`` is indexed (format 4): remembered answers need it.
        self.seq_indexed = bool(self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'docs_seq'").fetchone())
        tables = {name for (name,) in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.has_indexes = "indexes" in tables
        #: Whether tag names are indexed (format 4; an older store opened read-only: no).
        self.has_tags = "tags" in tables

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
            create_schema(conn)
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
            create_schema(self.conn)
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
            self._uniques = {}
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back itself (an I/O error)
                    conn.execute("ROLLBACK")
                # a lookup remembered inside it may hold rows of a generation never committed
                self.remembered.clear()
                raise
            finally:
                self._uniques = {}
            conn.execute("COMMIT")

    def next_seq(self) -> int:
        """Bump the store's generation; call once inside each writing transaction."""
        row = self.conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'seq' "
                                "RETURNING value").fetchone()
        return int(row[0])

    def generation(self) -> int:
        return store_generation(self.conn)

    # -- rows -----------------------------------------------------------------------------

    def candidates(self, coll: str, query: dict[str, Any], generation: int | None = None
                   ) -> Candidates:
        """A superset of the documents of ``coll`` matching ``query`` (see ``storeplan``).

        A query naming one ``_id`` is answered from that row alone: every document's key is
        indexed, so no other condition needs planning (a bulk write of AddSize's is 500 such).
        ``generation``: the store's, if the caller has read it in this transaction already.
        """
        ident = id_values(query["_id"]) if "_id" in query else None
        if ident is not None and len(ident) == 1:
            found = self.conn.execute("SELECT row FROM docs WHERE coll = ? AND key = ?",
                                      (coll, id_key(ident[0]))).fetchone()
            return Candidates(frozenset(found or ()), False)
        reader = SqlIndexReader(self.conn, coll, self.remembered if self.seq_indexed else None,
                                generation)
        found = Planner(reader, self.plan_columns,
                        start_column=self.sortable, tag_column=self.has_tags).plan(query)
        if found.everything:
            return EVERYTHING
        irregular = self.irregular_rows(coll)
        if found.complement:
            return Candidates(found.rows - irregular, True)
        return Candidates(found.rows | irregular, False)

    def load(self, coll: str, found: Candidates
             ) -> Iterator[tuple[int, int, bytes, dict[str, Any]]]:
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

    def changed_since(self, coll: str, generation: int) -> set[int]:
        return written_since(self.conn, coll, generation)

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
        tags: list[tuple] = []
        keys: list[tuple] = []
        for doc in docs:
            row += 1
            values = index_values(doc)
            packed, body = encode_body(doc)
            batch.append((row, coll, id_key(doc["_id"]), seq, values.number, values.name,
                          int(values.irregular), packed, body, values.start))
            entries.extend((row, coll, *entry) for entry in values.entries)
            tags.extend((row, coll, name) for name in values.tags)
            keys.extend(unique_rows(coll, row, doc, uniques))
            if len(batch) >= 1000:
                self._insert(conn, coll, batch, entries, tags, keys, uniques)
        self._insert(conn, coll, batch, entries, tags, keys, uniques)

    def _insert(self, conn: sqlite3.Connection, coll: str, batch: list[tuple],
                entries: list[tuple], tags: list[tuple], keys: list[tuple],
                uniques: list[IndexSpec]) -> None:
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
        conn.executemany(TAG_INSERT, tags)
        self._insert_keys(conn, coll, keys, uniques)
        batch.clear()
        entries.clear()
        tags.clear()
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
                                        tuple(decode_key(key))) from None
            raise

    def replace(self, coll: str, row: int, doc: dict[str, Any], *, seq: int,
                raw: bytes | None = None) -> None:
        """Write a changed document (``raw``: its BSON, if the caller has it); its index rows
        only where they changed (a lease's renewal changes no indexed value: it writes one row
        and no index)."""
        values = index_values(doc)
        packed, body = encode_body(doc, raw)
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
        columns = ", ".join([*ENTRY_COLUMNS.values(), *RANGE_COLUMNS.values()])
        stored = self.conn.execute(f"SELECT {columns} FROM entries WHERE doc = ?",
                                   (row,)).fetchall()
        if sorted(map(repr, stored)) != sorted(repr(tuple(e)) for e in values.entries):
            self.conn.execute("DELETE FROM entries WHERE doc = ?", (row,))
            self.conn.executemany(ENTRY_INSERT, [(row, coll, *e) for e in values.entries])
        held_tags = [name for (name,) in self.conn.execute("SELECT name FROM tags WHERE doc = ?",
                                                           (row,))]
        if sorted(map(repr, held_tags)) != sorted(map(repr, values.tags)):
            self.conn.execute("DELETE FROM tags WHERE doc = ?", (row,))
            self.conn.executemany(TAG_INSERT, [(row, coll, name) for name in values.tags])
        uniques = self.unique_indexes(coll)
        if uniques:
            keys = unique_rows(coll, row, doc, uniques)
            held = self.conn.execute("SELECT coll, name, key, doc FROM index_keys WHERE doc = ?",
                                     (row,)).fetchall()
            if sorted(held) != sorted(keys):
                self.conn.execute("DELETE FROM index_keys WHERE doc = ?", (row,))
                self._insert_keys(self.conn, coll, keys, uniques)

    def delete(self, rows: Iterable[int]) -> None:
        for row in rows:
            self.conn.execute("DELETE FROM docs WHERE row = ?", (row,))
            self.conn.execute("DELETE FROM entries WHERE doc = ?", (row,))
            if self.has_tags:
                self.conn.execute("DELETE FROM tags WHERE doc = ?", (row,))
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
        """The unique indexes of ``coll``: looked up once per writing transaction (no cache
        outlives it to go stale)."""
        if conn is not None and conn is not self.conn:
            return self.indexes(coll, conn, unique_only=True)
        if coll not in self._uniques:
            self._uniques[coll] = self.indexes(coll, unique_only=True)
        return self._uniques[coll]

    def create_index(self, coll: str, spec: IndexSpec) -> None:
        """Declare ``spec``; a unique one gets the keys of every document first, and fails
        (DuplicateKeyError) if two documents share one, declaring nothing (the caller's
        transaction is rolled back).  Declaring an existing index again changes nothing."""
        self._uniques.pop(coll, None)
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
            keys.extend(unique_rows(coll, row, doc, [spec]))
            if len(keys) >= 5000:
                self._insert_keys(self.conn, coll, keys, [spec])
                keys.clear()
        self._insert_keys(self.conn, coll, keys, [spec])
        log.info("runs DB: unique index %s of %s created", spec.name, coll)

    def drop_indexes(self, coll: str) -> None:
        """Forget every index declared on ``coll`` and its keys (the collection is dropped)."""
        self._uniques.pop(coll, None)
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
