"""The embedded store's tables, its format and the upgrades between formats, and how a
document's body is stored (see ``storefile``)."""

from __future__ import annotations

import logging
import sqlite3
import zlib
from typing import Any

import bson
from bson.codec_options import CodecOptions
from pymongo.errors import DocumentTooLarge

from cax.runsdb.storeindex import index_values

log = logging.getLogger(__name__)

#: Documents are decoded with naive UTC datetimes: the form mongomock evaluates on.
CODEC: CodecOptions = CodecOptions()
#: 1: the first SQLite format; 2: ``docs.start`` (epoch ms) added, for sorted limited finds;
#: 3: ``entries.location`` added, and the tables of declared indexes and unique keys; the
#: index on ``docs.seq`` dropped (no query used it, and every write rewrote it); 4:
#: ``entries.verified`` (Scrub's "not verified since", an index range) and the index on
#: ``docs (coll, seq)`` back (a remembered answer is brought up to date from the rows written
#: since: ``changed_since``), the table of tag names (``tags.name``: cax web's filter) and
#: ``entries.disputed`` (whether a copy is disputed: the stuck views).
FORMAT = 4
PACK_ABOVE = 2048
#: MongoDB's largest document (maxBsonObjectSize): 16 MiB.
MAX_BSON_SIZE = 16 * 1024 * 1024

TABLES = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS docs (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    coll TEXT NOT NULL, key BLOB NOT NULL, seq INTEGER NOT NULL,
    number, name, irregular INTEGER NOT NULL DEFAULT 0,
    packed INTEGER NOT NULL DEFAULT 0, body BLOB NOT NULL, start INTEGER);
CREATE TABLE IF NOT EXISTS entries (
    doc INTEGER NOT NULL, coll TEXT NOT NULL, host, type, status, version, location,
    verified INTEGER, disputed INTEGER);
CREATE TABLE IF NOT EXISTS tags (doc INTEGER NOT NULL, coll TEXT NOT NULL, name);
CREATE TABLE IF NOT EXISTS indexes (
    coll TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL, is_unique INTEGER NOT NULL,
    PRIMARY KEY (coll, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS index_keys (
    coll TEXT NOT NULL, name TEXT NOT NULL, key BLOB NOT NULL, doc INTEGER NOT NULL,
    PRIMARY KEY (coll, name, key)) WITHOUT ROWID;
"""
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS docs_key ON docs (coll, key);
CREATE INDEX IF NOT EXISTS docs_seq ON docs (coll, seq);
CREATE INDEX IF NOT EXISTS docs_number ON docs (coll, number);
CREATE INDEX IF NOT EXISTS docs_name ON docs (coll, name);
CREATE INDEX IF NOT EXISTS docs_irregular ON docs (coll, irregular);
CREATE INDEX IF NOT EXISTS docs_start ON docs (coll, start, number);
CREATE INDEX IF NOT EXISTS entries_doc ON entries (doc);
CREATE INDEX IF NOT EXISTS entries_hts ON entries (coll, host, type, status);
DROP INDEX IF EXISTS entries_sh;
CREATE INDEX IF NOT EXISTS entries_shtv ON entries (coll, status, host, type, verified);
CREATE INDEX IF NOT EXISTS entries_location ON entries (coll, location);
CREATE INDEX IF NOT EXISTS index_keys_doc ON index_keys (doc);
CREATE INDEX IF NOT EXISTS tags_name ON tags (coll, name);
CREATE INDEX IF NOT EXISTS tags_doc ON tags (doc);
CREATE INDEX IF NOT EXISTS entries_disputed ON entries (coll) WHERE disputed IS NOT NULL;
"""
ENTRY_INSERT = ("INSERT INTO entries (doc, coll, host, type, status, version, location, "
                "verified, disputed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
TAG_INSERT = "INSERT INTO tags (doc, coll, name) VALUES (?, ?, ?)"


def columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {column for _, column, *_ in conn.execute(f"PRAGMA table_info({table})")}


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables inside the caller's transaction (``executescript`` would commit),
    bringing an older store's tables up to date first (see ``reindex``)."""
    tagged = bool(conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'tags'").fetchone())
    for statement in TABLES.split(";"):
        if statement.strip():
            conn.execute(statement)
    upgraded = not tagged and bool(conn.execute("SELECT 1 FROM docs LIMIT 1").fetchone())
    if "start" not in columns(conn, "docs"):  # format 1
        conn.execute("ALTER TABLE docs ADD COLUMN start INTEGER")
        upgraded = True
    if "location" not in columns(conn, "entries"):  # formats 1 and 2
        conn.execute("ALTER TABLE entries ADD COLUMN location")
        upgraded = True
    for column in ("verified", "disputed"):  # formats 1 to 3
        if column not in columns(conn, "entries"):
            conn.execute(f"ALTER TABLE entries ADD COLUMN {column} INTEGER")
            upgraded = True
    if upgraded:
        reindex(conn)
    for statement in INDEXES.split(";"):
        if statement.strip():
            conn.execute(statement)


def reindex(conn: sqlite3.Connection) -> None:
    """Recompute every document's index values from its body (once; seconds at 100,000
    runs): a new column is filled, and a document a new column makes irregular is marked."""
    conn.execute("DELETE FROM entries")
    conn.execute("DELETE FROM tags")
    rows = [row for (row,) in conn.execute("SELECT row FROM docs ORDER BY row")]
    for start in range(0, len(rows), 1000):  # in chunks: memory does not grow with the store
        chunk = rows[start:start + 1000]
        docs: list[tuple[Any, ...]] = []
        entries: list[tuple[Any, ...]] = []
        tags: list[tuple[Any, ...]] = []
        for row, coll, packed, body in conn.execute(
                f"SELECT row, coll, packed, body FROM docs WHERE row IN "
                f"({', '.join('?' * len(chunk))})", chunk).fetchall():
            values = index_values(bson.decode(unpack(packed, body), codec_options=CODEC))
            docs.append((values.number, values.name, int(values.irregular), values.start, row))
            entries.extend((row, coll, *entry) for entry in values.entries)
            tags.extend((row, coll, name) for name in values.tags)
        conn.executemany("UPDATE docs SET number = ?, name = ?, irregular = ?, start = ? "
                         "WHERE row = ?", docs)
        conn.executemany(ENTRY_INSERT, entries)
        conn.executemany(TAG_INSERT, tags)
    conn.execute("UPDATE meta SET value = ? WHERE name = 'format'", (FORMAT,))
    log.info("runs DB: upgraded the embedded store to format %d (%d documents)", FORMAT,
             len(rows))


def encode_body(doc: dict[str, Any], raw: bytes | None = None) -> tuple[int, bytes]:
    """A document's stored body (``raw``: its BSON, if the caller has it); one larger than a
    MongoDB server accepts is refused, as by pymongo (DocumentTooLarge), so nothing the
    embedded store holds could not be moved to one."""
    raw = bson.encode(doc) if raw is None else raw
    if len(raw) > MAX_BSON_SIZE:
        raise DocumentTooLarge(f"BSON document too large ({len(raw)} bytes) - the embedded "
                               f"runs DB supports BSON document sizes up to {MAX_BSON_SIZE} "
                               "bytes")
    if len(raw) > PACK_ABOVE:
        return 1, zlib.compress(raw, 1)
    return 0, raw


def unpack(packed: int, body: bytes) -> bytes:
    return zlib.decompress(body) if packed else body
