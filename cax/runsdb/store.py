"""The embedded runs DB: a pymongo-compatible store in one SQLite file, for sites and demos
without a MongoDB server.

Queries and updates are evaluated by mongomock, which implements MongoDB's query language
faithfully, so every query cax makes stays valid on a server.  But mongomock looks at every
document of a collection for every operation (an update by ``_id`` took 35 ms at 100,000 runs,
and its copy of 100,000 runs held over 500 MB), so it is never given the collection: each
operation is one SQLite transaction (``storefile``) that

* finds the candidate documents through an index of a few fields (``storeindex``,
  ``storeplan``; a superset of the matches, decoded from their BSON rows),
* evaluates the query on those alone (mongomock; its ``$expr`` compiled, ``storeexpr``), and
  the update (plain ``$set``/``$unset`` in place, ``storeeval.set_paths``; anything else by
  mongomock, in a scratch collection), and
* writes back only the documents that changed, one row each, and commits (fsynced).

Unique indexes declared with ``create_index(..., unique=True)`` are enforced in that same
transaction (``storeunique``): a write that would repeat a key raises MongoDB's duplicate key
error and writes nothing.

No document is kept in memory between operations, so a failed write leaves nothing applied
anywhere, and memory does not grow with the number of runs.  What a client remembers is the
answer (row ids) of its recent reads with the store's generation, brought up to date from the
rows written since by anyone (``_matches``).  Values pass through a BSON round trip on the way
in, as they would to a real server (naive datetimes become UTC, milliseconds are kept,
non-BSON values are rejected).

``find_one_and_update`` is implemented here, because mongomock's loses the query's
``$elemMatch`` and applies a positional ``$`` update to the first array element.

Only the subset of the pymongo Collection API that cax uses is provided.  ``find`` returns a
list, so callers pass ``sort``/``limit`` as arguments rather than chaining cursor methods.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bson
import mongomock
import mongomock.helpers
from bson import ObjectId
from bson.codec_options import CodecOptions
from pymongo import ReturnDocument, UpdateOne
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError
from pymongo.results import (
    BulkWriteResult,
    DeleteResult,
    InsertManyResult,
    InsertOneResult,
    UpdateResult,
)

from cax.runsdb.storeeval import (
    entry_count,
    inclusion,
    merge_counts,
    project,
    resolve_array_filters,
    set_paths,
    settled,
    sql_order,
)
from cax.runsdb.storeexpr import matcher
from cax.runsdb.storefile import StoreFile, id_key
from cax.runsdb.storeindex import (
    EVERYTHING,
    SORT_COLUMNS,
    Candidates,
)
from cax.runsdb.storeunique import make_spec

log = logging.getLogger(__name__)

CODEC: CodecOptions = CodecOptions(tz_aware=True)
Listener = Callable[[str], None]
DocumentsListener = Callable[[int], None]
#: Queries whose answers are remembered per client (see ``_matches``): how many, from how many
#: candidates on, and up to how many matches (more are decoded anyway: nothing to save).
MEMO_QUERIES = 32
MEMO_ABOVE = 200
MEMO_MATCHES = 20_000
#: ... or if finding its candidates took this long (a copy task's query at 100,000 runs,
#: answered by its negations: 130 ms of planning for no candidate).
MEMO_PLAN_S = 0.002
#: Candidates of a sorted, limited find that are decoded directly instead of met in index order.
FEW_CANDIDATES = 200


class StoreError(PyMongoError):
    """The embedded store's file failed (corrupt, full disk, locked too long)."""


def _bson_roundtrip(value: Any) -> Any:
    """Return ``value`` as a MongoDB server would store it."""
    if value is None:
        return None
    return bson.decode(bson.encode({"v": value}), codec_options=CODEC)["v"]


class EmbeddedClient:
    """Stands in for ``pymongo.MongoClient``: ``client[db][collection]``.

    ``listener`` is called with the command name of every operation (one per round trip a
    real server would see for it), ``documents_listener`` with the number of documents each
    returns: that is how cax counts runs-DB round trips and what a pass fetched.
    """

    def __init__(self, path: str | os.PathLike, listener: Listener | None = None,
                 read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self.listener = listener
        self.documents_listener: DocumentsListener | None = None
        try:
            self.file = StoreFile(self.path, read_only)
        except sqlite3.Error as exc:
            raise StoreError(f"embedded runs DB at {self.path}: {exc}") from exc
        self._scratch: Any = mongomock.MongoClient(tz_aware=True)
        self._memo: OrderedDict[tuple[str, bytes], tuple[int, frozenset[int]]] = OrderedDict()

    def __getitem__(self, name: str) -> EmbeddedDatabase:
        return EmbeddedDatabase(self, name)

    def collection(self, db: str, name: str) -> EmbeddedCollection:
        return EmbeddedCollection(self, db, name)

    def admin_ping(self) -> None:
        """Match ``client.admin.command('ping')``: succeeds if the store is usable."""
        self.file.check_present()
        if not self.read_only and not os.access(self.path, os.W_OK):
            raise PermissionError(f"runs DB directory {self.path} is not writable")

    def server_time(self) -> dt.datetime:
        """The store's clock: the kernel time of the machine holding it (aware, UTC)."""
        self.file.check_present()
        if self.read_only:  # writes nothing: a dry run's times are only logged
            return dt.datetime.now(dt.timezone.utc)
        return self.file.server_time()

    def generation(self) -> int:
        """The store's change counter: bumped by every write of any client."""
        with self.file.transaction():
            return self.file.generation()

    def close(self) -> None:
        self.file.close()


class EmbeddedDatabase:
    def __init__(self, client: EmbeddedClient, name: str):
        self.client, self.name = client, name

    def __getitem__(self, name: str) -> EmbeddedCollection:
        return self.client.collection(self.name, name)


class EmbeddedCollection:
    """One collection: the rows of ``docs`` whose ``coll`` is ``<db>.<name>``."""

    def __init__(self, client: EmbeddedClient, db: str, name: str):
        self.client = client
        self.name = name
        self.coll = f"{db}.{name}"
        self.file = client.file

    # -- one operation ------------------------------------------------------------------

    @contextmanager
    def _op(self, command: str, write: bool) -> Iterator[None]:
        if self.client.listener:
            self.client.listener(command)
        if write and self.client.read_only:
            raise StoreError(f"runs DB {self.client.path} is open read-only")
        self.file.check_present()
        try:
            with self.file.transaction(write=write):
                yield
        except sqlite3.IntegrityError as exc:
            raise DuplicateKeyError(str(exc)) from exc
        except sqlite3.Error as exc:
            raise StoreError(f"embedded runs DB {self.client.path}: {exc}") from exc

    def _returned(self, count: int) -> None:
        if self.client.documents_listener:
            self.client.documents_listener(count)

    def _matching(self, filter: dict) -> list[tuple[int, bytes, dict]]:
        """(row, BSON, document) of every document matching ``filter``, in natural order."""
        return [(row, body, doc) for row, _, body, doc in self._matches(filter)]

    def _matches(self, filter: dict, memo: bool = False
                 ) -> Iterator[tuple[int, int, bytes, dict]]:
        """Yield (row, seq, BSON, document) of every match, in natural order, one at a time
        (a find of 100,000 runs holds each decoded run only until its caller took it).

        With ``memo`` (reads), a query the index leaves many candidates for (or that took long
        to plan) is remembered with its matches and the store's generation: the next time it
        runs, the candidates are those matches and the documents written since
        (``changed_since``, an index range), whoever wrote them.  This keeps an idle pass cheap
        for queries the index cannot judge (CompareChecksums' ``$expr``, AddSize's missing
        fields): at 100,000 runs it decodes what changed, not every run.  A query is the same
        only if its bytes are (a condition on the current time makes each pass's query new),
        and one that names ``$$NOW`` is never remembered.
        """
        applies = matcher(mongomock.helpers.patch_datetime_awareness_in_document(filter))
        key = None
        if memo and self.file.seq_indexed:
            key = (self.coll, bson.encode({"q": filter}))
            if b"$$NOW" in key[1]:
                key = None
        generation = self.file.generation() if key else 0
        known = self.client._memo.get(key) if key else None
        if known:  # the earlier matches and what changed since: no planning at all
            since, matched = known
            found = Candidates(matched | self.file.changed_since(self.coll, since), False)
        else:
            start = time.perf_counter()
            found = self.file.candidates(self.coll, filter, generation if key else None)
            if not found.complement and len(found.rows) <= MEMO_ABOVE \
                    and time.perf_counter() - start < MEMO_PLAN_S:
                key = None  # few candidates, quickly found: nothing to save
        matches = set()
        for row, seq, body, doc in self.file.load(self.coll, found):
            if applies(doc):
                matches.add(row)
                yield row, seq, body, doc
        if key and len(matches) <= MEMO_MATCHES:  # reached only when every match was taken
            self.client._memo[key] = (generation, frozenset(matches))
            self.client._memo.move_to_end(key)
            while len(self.client._memo) > MEMO_QUERIES:
                self.client._memo.popitem(last=False)

    def _scratch(self, docs: list[dict]) -> Any:
        """A mongomock collection holding just ``docs`` (not copied), for evaluation."""
        scratch = self.client._scratch["scratch"]["scratch"]
        scratch._store._documents.clear()
        for doc in docs:
            scratch._store._documents[doc["_id"]] = doc
        return scratch

    def _write_back(self, before: list[tuple[int, bytes, dict]], scratch: Any) -> int:
        """Store the documents of ``scratch`` whose bytes differ from ``before`` (mongomock
        counts 2.0 set to 2 as no change; MongoDB stores the int), insert new ones; a write
        that changed no byte bumps no generation.  Returns how many documents changed."""
        rows = {id_key(doc["_id"]): (row, body) for row, body, doc in before}
        changed, added = [], []
        for doc in scratch._store._documents.values():
            key = id_key(doc["_id"])
            if key in rows:
                row, body = rows.pop(key)
                raw = bson.encode(doc)
                if raw != body:
                    changed.append((row, doc, raw))
            else:
                added.append(doc)
        if not (changed or added or rows):
            return 0
        seq = self.file.next_seq()
        for row, doc, raw in changed:
            self.file.replace(self.coll, row, doc, seq=seq, raw=raw)
        if added:
            self.file.put_many(self.coll, added, seq=seq)
        self.file.delete(row for row, _ in rows.values())
        return len(changed)

    # -- reads --------------------------------------------------------------------------

    def _index_order(self, sort: Any) -> list[tuple[str, int]] | None:
        """``sort`` as index columns, if the index can order by it."""
        if not self.file.sortable or not isinstance(sort, list) or not sort:
            return None
        order = [(key, direction) for key, direction in sort
                 if key in SORT_COLUMNS and direction in (1, -1)]
        return order if len(order) == len(sort) else None

    def _first_in_order(self, filter: dict, order: list[tuple[str, int]], limit: int
                        ) -> list[dict]:
        """A superset of the first ``limit`` matches in ``order``, decoding few documents.

        The regular documents come in index order; after ``limit`` matches, only those tied
        with the last are taken (the server's choice among ties is its own).  Irregular
        documents, ordered by rules the index does not hold, are all evaluated.  The caller
        sorts and limits the result as mongomock would.
        """
        found = self.file.candidates(self.coll, filter)
        applies = matcher(mongomock.helpers.patch_datetime_awareness_in_document(filter))
        if not found.complement and len(found.rows) <= FEW_CANDIDATES + limit:
            # a few candidates (a run by name or number): decoding them beats walking the
            # whole index in order to meet them
            return [doc for _, _, _, doc in self.file.load(self.coll, found)
                    if applies(doc)]
        docs: list[dict] = []
        last = None
        for key, _, _, doc in self.file.ordered(self.coll, order, found):
            if len(docs) >= limit and key != last:
                break
            if applies(doc):
                docs.append(doc)
                last = key
        odd = {r for r in self.file.irregular_rows(self.coll)
               if (r in found.rows) != found.complement}
        docs += [doc for _, _, _, doc in self.file.load(self.coll,
                                                         Candidates(frozenset(odd), False))
                 if applies(doc)]
        return docs

    def find(self, filter: dict | None = None, projection: Any = None, *, sort: Any = None,
             limit: int = 0, skip: int = 0) -> list[dict]:
        filter = _bson_roundtrip(filter or {})
        with self._op("find", write=False):
            order = self._index_order(sort)
            fields = inclusion(projection)
            if order and limit and not skip:
                docs = self._first_in_order(filter, order, limit)
            elif fields is not None and not skip and (order or not sort) \
                    and not (sort and self.file.irregular_rows(self.coll)):
                found = self._streamed(filter, fields, order, limit)
                self._returned(len(found))
                return found
            else:
                docs = [doc for _, _, _, doc in self._matches(filter, memo=True)]
            scratch = self._scratch(docs)
            cursor = scratch.find({}, projection)
            if sort:
                cursor = cursor.sort(sort)
            if skip:
                cursor = cursor.skip(skip)
            if limit:
                cursor = cursor.limit(limit)
            found = list(cursor)
        self._returned(len(found))
        return found

    def _streamed(self, filter: dict, fields: tuple[set[str], bool],
                  order: list[tuple[str, int]] | None, limit: int) -> list[dict]:
        """The matches, each projected as it is decoded, ordered by the index's columns.

        A find of every run (a pass's first query after 100,000 runs were imported) then
        holds one copy of the runs, not three (decoded, mongomock's projected copy, sorted).
        Only for plain inclusion projections and regular documents, whose sort columns
        SQLite orders as MongoDB does (null, then numbers, then strings).
        """
        keep, with_id = fields
        found = [(row, settled({k: v for k, v in doc.items()
                                 if k in keep or (with_id and k == "_id")}))
                 for row, _, _, doc in self._matches(filter, memo=True)]
        if order:
            keys = self.file.sort_keys(self.coll, [row for row, _ in found],
                                       [column for column, _ in order])
            for i, (_, direction) in reversed(list(enumerate(order))):  # stable: last key first
                found.sort(key=lambda item, i=i: sql_order(keys[item[0]][i]),  # type: ignore[misc]
                           reverse=direction < 0)
        docs = [doc for _, doc in found]
        return docs[:limit] if limit else docs

    def find_one(self, filter: dict | None = None, projection: Any = None, *,
                 sort: Any = None) -> dict | None:
        found = self.find(filter, projection, sort=sort, limit=1)
        return found[0] if found else None

    def count_documents(self, filter: dict) -> int:
        filter = _bson_roundtrip(filter)
        with self._op("aggregate", write=False):
            return sum(1 for _ in self._matches(filter, memo=True))

    def distinct(self, key: str, filter: dict | None = None) -> list:
        filter = _bson_roundtrip(filter or {})
        with self._op("distinct", write=False):
            return self._scratch([d for _, _, d in self._matching(filter)]).distinct(key)

    def aggregate(self, pipeline: list[dict]) -> list[dict]:
        pipeline = _bson_roundtrip(pipeline)
        first = pipeline[0].get("$match") if pipeline else None
        with self._op("aggregate", write=False):
            grouped = entry_count(pipeline, self.file.entry_columns)
            if grouped:
                found = self._count_entries(pipeline, *grouped)
            else:
                docs = self._matching(first if isinstance(first, dict) else {})
                found = list(self._scratch([d for _, _, d in docs]).aggregate(pipeline))
        self._returned(len(found))
        return found

    def _count_entries(self, pipeline: list[dict], names: dict[str, str], total: str
                       ) -> list[dict]:
        """Answer an entry count (see ``entry_count``) from the index.

        The documents the index cannot answer for (an entry with a grouped field unset, an
        irregular document) go through mongomock with the same pipeline, and the two
        results are added up.
        """
        columns = list(names.values())
        counts, left_out = self.file.count_entries(self.coll, columns)
        result: dict[tuple, int] = {}
        for *values, n in counts:
            result[tuple(values)] = result.get(tuple(values), 0) + n
        found = [{"_id": dict(zip(names, key, strict=True)), total: n}
                 for key, n in result.items()]
        if left_out:
            docs = [d for _, _, _, d in self.file.load(self.coll,
                                                        Candidates(frozenset(left_out), False))]
            found += merge_counts(found, self._scratch(docs).aggregate(pipeline), total)
        return found

    # -- writes -------------------------------------------------------------------------

    def insert_one(self, document: dict) -> InsertOneResult:
        document.setdefault("_id", ObjectId())
        with self._op("insert", write=True):  # stored as BSON: the round trip of its values
            self.file.put_many(self.coll, [document], seq=self.file.next_seq())
        return InsertOneResult(document["_id"], True)

    def insert_many(self, documents: Iterable[dict]) -> InsertManyResult:
        """Insert all in one transaction, streaming: 100,000 runs take seconds, not hours."""
        ids: list[Any] = []

        def prepared() -> Iterator[dict]:
            for document in documents:
                document.setdefault("_id", ObjectId())
                ids.append(document["_id"])
                yield document  # stored as BSON: the round trip of its values

        with self._op("insert", write=True):
            self.file.put_many(self.coll, prepared(), seq=self.file.next_seq())
        return InsertManyResult(ids, True)

    def _update(self, command: str, method: str, filter: dict, update: dict, many: bool,
                array_filters: list[dict] | None = None, **kwargs: Any) -> Any:
        with self._op(command, write=True):
            return self._apply(method, filter, update, many, array_filters, **kwargs)

    def _apply(self, method: str, filter: dict, update: dict, many: bool,
               array_filters: list[dict] | None = None, **kwargs: Any) -> Any:
        """One update inside the caller's writing transaction."""
        filter, update = _bson_roundtrip(filter), _bson_roundtrip(update)
        matched = self._matching(filter)
        if not many:
            matched = matched[:1]
        if array_filters is not None or (method == "update_one" and not kwargs.get("upsert")):
            return self._update_each(matched, filter, update, array_filters)
        scratch = self._scratch([doc for _, _, doc in matched])
        result = getattr(scratch, method)(filter, update, **kwargs)
        self._write_back(matched, scratch)
        return result

    def bulk_write(self, requests: Iterable[Any], ordered: bool = True) -> BulkWriteResult:
        """Apply pymongo ``UpdateOne`` requests in one transaction (one commit, one fsync: 500
        records of AddSize's first pass after an import cost one write, not 500).

        Stricter than a server where they differ: if one request fails, none is applied (a
        server keeps those before it, or all the others unordered), so a caller retries the
        whole batch -- its writes must be idempotent, as cax's are.  A request of another kind,
        or an option the store would have to ignore (upsert, collation, hint, sort), is
        refused before anything is written.
        """
        requests = list(requests)
        for request in requests:
            if type(request) is not UpdateOne or request._upsert or request._collation \
                    or request._hint or request._sort:
                raise OperationFailure(f"the embedded runs DB's bulk_write takes UpdateOne "
                                       f"without upsert, collation, hint or sort: {request!r}")
        matched = modified = 0
        with self._op("update", write=True):
            for request in requests:
                result = self._apply("update_one", request._filter, request._doc, False,
                                     request._array_filters)
                matched += result.matched_count
                modified += result.modified_count
        return BulkWriteResult({"nInserted": 0, "nUpserted": 0, "nMatched": matched,
                                "nModified": modified, "nRemoved": 0, "upserted": []}, True)

    def _update_each(self, matched: list[tuple[int, bytes, dict]], filter: dict, update: dict,
                     array_filters: list[dict] | None) -> UpdateResult:
        """Apply an update to each matched document on its own, its ``$[identifier]`` paths
        resolved to the indices of the elements its ``array_filters`` select (mongomock has
        none); ``set_paths`` applies it where it can, mongomock elsewhere."""
        modified = 0
        for one in matched:
            resolved = update if array_filters is None else \
                resolve_array_filters(one[2], update, _bson_roundtrip(array_filters))
            scratch = self._scratch([one[2]])
            if set_paths(one[2], resolved):
                modified += self._write_back([one], scratch)
                continue
            # the filter as given: a positional ``$`` is resolved by it
            modified += scratch.update_one(
                filter if array_filters is None else {"_id": one[2]["_id"]},
                resolved).modified_count
            self._write_back([one], scratch)
        return UpdateResult({"n": len(matched), "nModified": modified}, True)

    def update_one(self, filter: dict, update: dict, upsert: bool = False,
                   array_filters: list[dict] | None = None) -> UpdateResult:
        if array_filters is not None and upsert:
            raise OperationFailure("the embedded runs DB does not upsert with arrayFilters")
        return self._update("update", "update_one", filter, update, False,
                            array_filters=array_filters, upsert=upsert)

    def update_many(self, filter: dict, update: dict,
                    array_filters: list[dict] | None = None) -> UpdateResult:
        return self._update("update", "update_many", filter, update, True,
                            array_filters=array_filters)

    def replace_one(self, filter: dict, replacement: dict, upsert: bool = False) -> UpdateResult:
        return self._update("update", "replace_one", filter, replacement, False, upsert=upsert)

    def _delete(self, filter: dict, many: bool) -> DeleteResult:
        filter = _bson_roundtrip(filter)
        with self._op("delete", write=True):
            matched = self._matching(filter)
            if not many:
                matched = matched[:1]
            if matched:
                self.file.next_seq()
                self.file.delete(row for row, _, _ in matched)
        return DeleteResult({"n": len(matched)}, True)

    def delete_one(self, filter: dict) -> DeleteResult:
        return self._delete(filter, many=False)

    def delete_many(self, filter: dict) -> DeleteResult:
        return self._delete(filter, many=True)

    def find_one_and_update(self, filter: dict, update: dict, projection: Any = None, *,
                            sort: Any = None,
                            return_document: bool = ReturnDocument.BEFORE,
                            array_filters: list[dict] | None = None) -> dict | None:
        """Atomically find the first match and update it, keeping the filter for ``$``."""
        filter, update = _bson_roundtrip(filter), _bson_roundtrip(update)
        with self._op("findAndModify", write=True):
            matched = self._matching(filter)
            if sort:
                order = self._scratch([doc for _, _, doc in matched]).find({}, {"_id": 1})
                first = next(iter(order.sort(sort).limit(1)), None)
                matched = [m for m in matched if first and m[2]["_id"] == first["_id"]]
            matched = matched[:1]
            if not matched:
                return None
            before = bson.decode(bson.encode(matched[0][2]), codec_options=CODEC)
            scratch = self._scratch([matched[0][2]])
            if array_filters is not None:
                filter = {"_id": before["_id"]}
                update = resolve_array_filters(matched[0][2], update,
                                               _bson_roundtrip(array_filters))
            if not set_paths(matched[0][2], update):
                scratch.update_one(filter, update)
            self._write_back(matched, scratch)
            found = scratch.find_one({"_id": before["_id"]}, projection) \
                if return_document == ReturnDocument.AFTER else project(before, projection)
        self._returned(1)
        return found

    def create_index(self, keys: Any, *, unique: bool = False, name: str | None = None,
                     **kwargs: Any) -> str:
        """Declare an index; return its name, as pymongo does.

        Queries are served by the store's own index whatever is declared (``storeindex``),
        so a plain index is only recorded, for MongoDB's conflicts between declarations.  A
        unique one is enforced on every later write (``storeunique``); creating it over
        documents that already share a key fails with DuplicateKeyError, declaring nothing.
        A read-only store records nothing (a unique index there: StoreError).
        """
        spec = make_spec(keys, name, unique, kwargs)
        if self.client.read_only and not unique:
            with self._op("createIndexes", write=False):
                return spec.name
        with self._op("createIndexes", write=True):
            self.file.create_index(self.coll, spec)
        return spec.name

    def index_information(self) -> dict[str, dict[str, Any]]:
        """The declared indexes, as pymongo's ``index_information`` (``_id_`` first)."""
        with self._op("listIndexes", write=False):
            specs = self.file.indexes(self.coll)
        info: dict[str, dict[str, Any]] = {"_id_": {"key": [("_id", 1)]}}
        for spec in specs:
            info[spec.name] = {"key": list(spec.keys),
                               **({"unique": True} if spec.unique else {})}
        return info

    def drop(self) -> None:
        """Remove every document and every declared index, as MongoDB's drop does."""
        with self._op("drop", write=True):
            self.file.next_seq()
            self.file.delete(row for row, _, _, _ in self.file.load(self.coll, EVERYTHING))
            self.file.drop_indexes(self.coll)
