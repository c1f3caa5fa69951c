"""The embedded runs DB: a pymongo-compatible store kept in files, for sites and demos without a
MongoDB server.

Queries and updates are evaluated by mongomock, which implements MongoDB's query language
faithfully but keeps nothing on disk and is not thread-safe.  This module adds what it lacks:

* every operation holds a thread lock and an ``flock`` on the collection's lock file, so
  claims and conditional pushes are atomic between threads and between processes;
* before each operation the collection is reloaded if another process changed its file, and
  after each write it is saved as BSON under a temporary name, fsynced and renamed into place,
  so a crash never leaves a half-written file;
* values pass through a BSON round trip on the way in, as they would to a real server (naive
  datetimes become UTC, milliseconds are kept, non-BSON values are rejected);
* ``find_one_and_update`` is implemented here, because mongomock's loses the query's
  ``$elemMatch`` and applies a positional ``$`` update to the first array element.

Only the subset of the pymongo Collection API that cax uses is provided.  ``find`` returns a
list, so callers pass ``sort``/``limit`` as arguments rather than chaining cursor methods.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bson
import mongomock
from bson.codec_options import CodecOptions
from pymongo import ReturnDocument
from pymongo.results import UpdateResult

log = logging.getLogger(__name__)

CODEC = CodecOptions(tz_aware=True)
Listener = Callable[[str], None]


def _bson_roundtrip(value: Any) -> Any:
    """Return ``value`` as a MongoDB server would store it."""
    if value is None:
        return None
    return bson.decode(bson.encode({"v": value}), codec_options=CODEC)["v"]


class EmbeddedClient:
    """Stands in for ``pymongo.MongoClient``: ``client[db][collection]``.

    ``listener`` is called with the command name of every operation (one per round trip a
    real server would see for it), which is how cax counts runs-DB round trips.
    """

    def __init__(self, path: str | os.PathLike, listener: Listener | None = None,
                 read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        if read_only and not self.path.is_dir():
            raise FileNotFoundError(f"no runs DB at {self.path}")
        self.path.mkdir(parents=True, exist_ok=True)
        self.listener = listener
        self._mongo = mongomock.MongoClient(tz_aware=True)
        self._lock = threading.RLock()
        self._collections: dict[tuple[str, str], EmbeddedCollection] = {}

    def __getitem__(self, name: str) -> EmbeddedDatabase:
        return EmbeddedDatabase(self, name)

    def collection(self, db: str, name: str) -> EmbeddedCollection:
        with self._lock:
            key = (db, name)
            if key not in self._collections:
                self._collections[key] = EmbeddedCollection(self, db, name)
            return self._collections[key]

    def admin_ping(self) -> None:
        """Match ``client.admin.command('ping')``: succeeds if the directory is usable."""
        if not self.read_only and not os.access(self.path, os.W_OK):
            raise PermissionError(f"runs DB directory {self.path} is not writable")

    def server_time(self) -> dt.datetime:
        """Return the store's clock: the kernel time of the machine that holds its files.

        Read from the modification time the kernel stamps on a write, not from this process's
        ``time.time()``, so every client of the store judges leases by the same clock, however
        its own clock is set.
        """
        if self.read_only:  # writes nothing: a dry run's times are only logged
            return dt.datetime.now(dt.timezone.utc)
        clock = self.path / "clock"
        fd = os.open(clock, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"t")
            mtime_ns = os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)
        return dt.datetime.fromtimestamp(mtime_ns / 1e9, tz=dt.timezone.utc)

    def close(self) -> None:
        with self._lock:
            for coll in self._collections.values():
                coll.close()
            self._collections.clear()


class EmbeddedDatabase:
    def __init__(self, client: EmbeddedClient, name: str):
        self.client, self.name = client, name

    def __getitem__(self, name: str) -> EmbeddedCollection:
        return self.client.collection(self.name, name)


class EmbeddedCollection:
    """One collection, kept in ``<dir>/<db>.<name>.bson`` and locked by ``.lock`` beside it."""

    def __init__(self, client: EmbeddedClient, db: str, name: str):
        self.client = client
        self.name = name
        self.file = client.path / f"{db}.{name}.bson"
        self._mongo = client._mongo[db][name]
        lock = client.path / f"{db}.{name}.lock"
        # A read-only client creates nothing: without a lock file it locks the directory.
        if client.read_only and not lock.exists():
            lock = client.path
        self._lock_fd = os.open(lock, os.O_RDONLY if client.read_only else os.O_RDWR | os.O_CREAT,
                                0o644)
        self._seen: tuple[int, int, int] | None = None

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- locking, loading and saving ------------------------------------------------------

    @contextmanager
    def _op(self, command: str, write: bool) -> Iterator[None]:
        with self.client._lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            try:
                if self.client.listener:
                    self.client.listener(command)
                self._reload_if_changed()
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.file.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _reload_if_changed(self) -> None:
        stat = self._stat()
        if stat == self._seen:
            return
        docs = bson.decode_all(self.file.read_bytes(), CODEC) if stat else []
        self._mongo.delete_many({})
        if docs:
            self._mongo.insert_many(docs)
        self._seen = stat

    def _save(self) -> None:
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
        data = b"".join(bson.encode(doc) for doc in self._mongo.find({}))
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.file)
        dir_fd = os.open(self.file.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._seen = self._stat()

    # -- reads --------------------------------------------------------------------------

    def find(self, filter: dict | None = None, projection: Any = None, *, sort: Any = None,
             limit: int = 0, skip: int = 0) -> list[dict]:
        with self._op("find", write=False):
            cursor = self._mongo.find(_bson_roundtrip(filter or {}), projection)
            if sort:
                cursor = cursor.sort(sort)
            if skip:
                cursor = cursor.skip(skip)
            if limit:
                cursor = cursor.limit(limit)
            return list(cursor)

    def find_one(self, filter: dict | None = None, projection: Any = None, *,
                 sort: Any = None) -> dict | None:
        found = self.find(filter, projection, sort=sort, limit=1)
        return found[0] if found else None

    def count_documents(self, filter: dict) -> int:
        with self._op("aggregate", write=False):
            return self._mongo.count_documents(_bson_roundtrip(filter))

    def distinct(self, key: str, filter: dict | None = None) -> list:
        with self._op("distinct", write=False):
            return self._mongo.distinct(key, _bson_roundtrip(filter or {}))

    def aggregate(self, pipeline: list[dict]) -> list[dict]:
        with self._op("aggregate", write=False):
            return list(self._mongo.aggregate(_bson_roundtrip(pipeline)))

    # -- writes -------------------------------------------------------------------------

    def _write(self, command: str, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._op(command, write=True):
            result = getattr(self._mongo, method)(*(_bson_roundtrip(a) for a in args), **kwargs)
            changed = getattr(result, "modified_count", 0) or getattr(result, "upserted_id", None) \
                or getattr(result, "deleted_count", 0) or method.startswith(("insert", "create"))
            if changed:
                self._save()
            return result

    def insert_one(self, document: dict) -> Any:
        return self._write("insert", "insert_one", document)

    def insert_many(self, documents: list[dict]) -> Any:
        return self._write("insert", "insert_many", list(documents))

    def update_one(self, filter: dict, update: dict, upsert: bool = False) -> UpdateResult:
        return self._write("update", "update_one", filter, update, upsert=upsert)

    def update_many(self, filter: dict, update: dict) -> UpdateResult:
        return self._write("update", "update_many", filter, update)

    def replace_one(self, filter: dict, replacement: dict, upsert: bool = False) -> UpdateResult:
        return self._write("update", "replace_one", filter, replacement, upsert=upsert)

    def delete_one(self, filter: dict) -> Any:
        return self._write("delete", "delete_one", filter)

    def delete_many(self, filter: dict) -> Any:
        return self._write("delete", "delete_many", filter)

    def find_one_and_update(self, filter: dict, update: dict, projection: Any = None, *,
                            sort: Any = None,
                            return_document: bool = ReturnDocument.BEFORE) -> dict | None:
        """Atomically find the first match and update it, keeping the filter for ``$``."""
        filter, update = _bson_roundtrip(filter), _bson_roundtrip(update)
        with self._op("findAndModify", write=True):
            cursor = self._mongo.find(filter)
            if sort:
                cursor = cursor.sort(sort)
            before = next(iter(cursor.limit(1)), None)
            if before is None:
                return None
            result = self._mongo.update_one({**filter, "_id": before["_id"]}, update)
            if result.modified_count:
                self._save()
            if return_document == ReturnDocument.AFTER:
                return self._mongo.find_one({"_id": before["_id"]}, projection)
            return _project(before, projection)

    def create_index(self, keys: Any, **kwargs: Any) -> str:
        with self._op("createIndexes", write=False):
            return self._mongo.create_index(keys, **kwargs)

    def drop(self) -> None:
        with self._op("drop", write=True):
            self._mongo.delete_many({})
            self._save()


def _project(doc: dict, projection: Any) -> dict:
    """Apply a simple inclusion projection to a document already in memory."""
    if not projection:
        return doc
    keep = set(projection) | {"_id"}
    return {k: v for k, v in doc.items() if k in keep}
