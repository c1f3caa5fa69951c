"""Every query and update cax makes to the runs DB, each a named function.

Writes check what they matched.  A new entry is added only if no entry with its identity
exists; a claim is one atomic ``find_one_and_update`` that sets a lease (owner, expiry) which
any daemon may take over once it has expired; later updates match the entry by its identity
and, while leased, by its owner, so a daemon that lost its lease cannot overwrite the work of
the one that took it over.

In read-only mode (``--dry-run``, ``--disable-database-update``) every write is logged and
answered as if it had succeeded, and nothing is sent.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import bson
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from cax.clock import as_utc
from cax.errors import RunsDBError, UnsafeNameError
from cax.runsdb.dbclock import DBClock, ServerTime
from cax.runsdb.entries import (
    ERROR,
    PURGING,
    TRANSFERRED,
    TRANSFERRING,
    VERIFYING,
    EntryKey,
    check_dataset_name,
    find_entry,
    run_label,
)
from cax.runsdb.judgement import good_entry
from cax.runsdb.origins import Proof, dataset_match

log = logging.getLogger(__name__)

DAEMONS_COLLECTION = "cax_daemons"
MANIFESTS_COLLECTION = "cax_manifests"
NEWEST_FIRST = [("start", DESCENDING), ("number", DESCENDING)]
#: The run fields tasks need; the DAQ's large sub-documents (reader, trigger, ...) stay behind.
RUN_FIELDS = {"number": 1, "name": 1, "detector": 1, "start": 1, "end": 1, "tags": 1, "data": 1,
              "origins": 1}
#: Events kept in an entry's ``history`` (claims taken over, failures, resets by a person).
HISTORY_KEPT = 20
#: Fields of a lease; dropped together when work ends.
LEASE_FIELDS = ("lease_owner", "lease_expires", "lease_token")
#: Fields describing a failure; dropped when the entry is registered good.
FAILURE_FIELDS = ("error", "error_kind", "next_attempt", "config_hash")
#: The pseudo-site under which a dataset's origin manifest is kept (no site name has an "@").
ORIGIN_MANIFEST_HOST = "@origin"
#: The unique index of (host, location) over every entry of every run.
PLACE_INDEX = "data_place_unique"
#: Kinds of failure: ``transient`` is retried with backoff up to ``max_attempts``;
#: ``permanent`` (retrying alone cannot fix it) and ``config`` (the configuration is wrong)
#: are retried once the configuration changed (its hash differs from ``config_hash``), or
#: when a person retries them (``cax retry``).
FAILURE_KINDS = ("transient", "permanent", "config")

T = TypeVar("T")


def _db_call(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn driver and disk errors into RunsDBError, which the task runner knows how to handle."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except DuplicateKeyError as exc:  # the unique (host, location) index
            raise LocationTakenError(f"runs DB refused {fn.__name__}: another entry already "
                                     f"names that place ({_dup_key(exc)})") from None
        except PyMongoError as exc:
            raise RunsDBError(f"runs DB: {fn.__name__}: {exc}") from exc
        except OSError as exc:
            raise RunsDBError(f"runs DB: {fn.__name__}: {exc}") from exc

    return wrapper


class LocationTakenError(UnsafeNameError):
    """A location is already named by another entry: one place holds one dataset."""


def _dup_key(exc: DuplicateKeyError) -> str:
    details = exc.details or {}
    key = details.get("keyValue") or details.get("keyvalue")
    return ", ".join(f"{k} {v!r}" for k, v in key.items()) if isinstance(key, dict) else \
        str(exc).split("dup key:", 1)[-1].strip()[:200]


def stored_name(path: str) -> str | bson.Binary:
    """A manifest's file name as BSON can hold it: the name itself when it is UTF-8, else its
    bytes (a name the filesystem allows is never refused: names are bytes on POSIX, and cax
    reads them decoded with surrogateescape)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return bson.Binary(path.encode("utf-8", "surrogateescape"))


def loaded_name(value: str | bytes) -> str:
    """The inverse of ``stored_name``."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _positional(fields: dict[str, Any]) -> dict[str, Any]:
    return {f"data.$.{name}": value for name, value in fields.items()}


def _index_of(run: dict[str, Any] | None, key: EntryKey) -> int | None:
    """Return the position of the entry ``key`` in ``run["data"]``, or None."""
    entry = find_entry(run, key) if run else None
    return None if entry is None else next(
        i for i, e in enumerate(run["data"]) if e is entry)


def _lease_free(now: dt.datetime) -> dict[str, Any]:
    """Condition inside ``$elemMatch``: no lease, or one that has expired."""
    return {"$not": {"$gt": now}}


@dataclass
class Claim:
    """A lease on one entry, held by ``owner`` for one attempt, named by ``token``.

    Every later write of the work (renew, register, failure, release) matches the entry by
    owner *and* token, so a daemon whose lease was taken over -- even by another thread of the
    same process -- can change nothing.  Scratch paths derive from the token, so two owners
    never write the same bytes.
    """

    run_id: Any
    key: EntryKey
    owner: str
    token: str
    attempts: int
    entry: dict[str, Any]
    #: The entry before this claim (None: this claim added it).
    previous: dict[str, Any] | None = None

    @property
    def takeover(self) -> bool:
        """Whether this claim took over work whose owner let its lease expire."""
        return bool(self.previous and self.previous.get("lease_owner")
                    and self.previous.get("status") in (TRANSFERRING, PURGING))


def good_elsewhere(run: dict[str, Any], key: EntryKey) -> bool:
    """Whether another site holds a good copy of ``key``'s dataset (one to repair from)."""
    return any(good_entry(run, EntryKey.of(e)) for e in run.get("data") or ()
               if isinstance(e, dict) and e.get("host") != key.host and e.get("type") == key.type
               and "host" in e and (key.version is None or e.get("pax_version") == key.version))


def history_event(now: dt.datetime, event: str, by: str, detail: str | None = None
                  ) -> dict[str, Any]:
    """Return one ``history`` record: what happened to an entry, when, by whom."""
    record = {"time": now, "event": event, "by": by}
    if detail:
        record["detail"] = detail[:300]
    return record


class RunsDB:
    """The runs DB as cax sees it: run documents, daemon heartbeats and file manifests."""

    def __init__(self, db: Any, runs_collection: str = "runs_new", *, read_only: bool = False,
                 server_time: ServerTime | None = None):
        self.runs = db[runs_collection]
        self.daemons = db[DAEMONS_COLLECTION]
        self.manifests = db[MANIFESTS_COLLECTION]
        self.read_only = read_only
        self.round_trips = 0
        self.documents_returned = 0
        self.client: Any = None
        self.clock = DBClock(server_time)

    @_db_call
    def now(self) -> dt.datetime:
        """The runs DB's clock: every lease, retry time and age is computed with it."""
        return self.clock.now()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def count_round_trip(self, command: str) -> None:
        """Listener for the client: called once per command sent to the server."""
        self.round_trips += 1

    def count_documents_returned(self, count: int) -> None:
        """Listener for the client: documents in each reply (an idle pass should get none)."""
        self.documents_returned += count

    def _skip(self, what: str, *details: Any) -> bool:
        if self.read_only:
            log.info("not written (database updates disabled): %s %s", what,
                     " ".join(str(d) for d in details))
        return self.read_only

    @_db_call
    def ensure_indexes(self) -> None:
        """Create the indexes the task queries need (idempotent)."""
        if self.read_only:
            return
        for keys in (
            [("number", ASCENDING)], [("name", ASCENDING), ("detector", ASCENDING)],
            [("start", DESCENDING)], [("tags.name", ASCENDING)],
            [("data.host", ASCENDING), ("data.type", ASCENDING), ("data.status", ASCENDING)],
            [("data.status", ASCENDING)],  # cax status --stuck, over every site
            # cax web's throughput: copies registered in the last days (find_registered_since)
            [("data.transfer_end", DESCENDING)], [("data.creation_time", DESCENDING)],
        ):
            self.runs.create_index(keys)
        try:  # invariant (a): one place, one entry, over all runs
            self.runs.create_index([("data.host", ASCENDING), ("data.location", ASCENDING)],
                                   unique=True, name=PLACE_INDEX)
        except (DuplicateKeyError, OperationFailure) as exc:
            log.error("runs DB: the unique index of data places cannot be created, because two "
                      "entries already name one place (%s); cax still refuses new ones, but "
                      "this must be mended by a person (cax run remove)", _dup_key(exc)
                      if isinstance(exc, DuplicateKeyError) else str(exc)[:200])
        self.manifests.create_index([("run", ASCENDING), ("host", ASCENDING)])
        self.daemons.create_index([("site", ASCENDING)])

    # -- run documents --------------------------------------------------------------------

    @_db_call
    def find_runs(self, query: dict[str, Any], *, projection: dict[str, int] | None = None,
                  limit: int = 0) -> list[dict[str, Any]]:
        """Return the runs matching ``query``, newest first, with the fields tasks need."""
        return list(self.runs.find(query, projection or RUN_FIELDS, sort=NEWEST_FIRST,
                                   limit=limit))

    @_db_call
    def find_runs_older(self, query: dict[str, Any], older_than: tuple[Any, Any] | None, *,
                        projection: dict[str, int], limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` runs matching ``query`` that sort after ``older_than``.

        ``older_than`` is the (start, number) of the last run of the page before (None: the
        first page): a keyset page, so a page deep in the runs DB is one sorted, limited find
        like the first, never a skip over every newer run.  Runs without a start sort last,
        as the server sorts them.  Two runs with the same start *and* number (two detectors
        started in the same millisecond) may be split across a page boundary and one left out.
        """
        if older_than is not None:
            start, number = older_than
            if start is None:
                after: dict[str, Any] = {"start": None, "number": {"$lt": number}}
            else:
                after = {"$or": [{"start": {"$lt": start}},
                                 {"start": start, "number": {"$lt": number}},
                                 {"start": None}]}
            query = {"$and": [query, after]} if query else after
        return self.find_runs(query, projection=projection, limit=limit)

    @_db_call
    def find_registered_since(self, since: dt.datetime) -> list[dict[str, Any]]:
        """Every ``transferred`` copy registered at or after ``since``: host, type, size, time.

        A copy's registration time is its ``transfer_end`` (copies, processing output, tape),
        else its ``creation_time`` (data registered where it was written, e.g. the DAQ's).
        Not ``verified_time``: Scrub moves that forward whenever it re-reads a copy.

        Cost: on a MongoDB server, the indexes on ``data.transfer_end`` and
        ``data.creation_time`` (``ensure_indexes``) bound it to the runs with a copy in the
        window.  The embedded store holds no times in its index, so it evaluates every run
        the first time; it remembers the runs a query did not match, so the same query
        (pass the same ``since``, e.g. a midnight) later decodes only the window's runs and
        those written since: at 100,000 runs about 5 s the first time, then 0.6 s with
        4,300 runs in the window (``bench/web.py``: a run every 10 minutes).
        """
        window = {"$gte": since}
        # No condition on the status here: every copy is transferred, so on the embedded store
        # it would only make the index list every run; it is checked below.
        query = {"$or": [{"data": {"$elemMatch": {"transfer_end": window}}},
                         {"data": {"$elemMatch": {"transfer_end": None,
                                                  "creation_time": window}}}]}
        projection = {"_id": 0, "data.host": 1, "data.type": 1, "data.status": 1,
                      "data.size": 1, "data.transfer_end": 1, "data.creation_time": 1}
        found = []
        for run in self.runs.find(query, projection):
            for e in run.get("data") or ():
                if not isinstance(e, dict) or e.get("status") != TRANSFERRED:
                    continue
                when = e.get("transfer_end") if e.get("transfer_end") is not None \
                    else e.get("creation_time")
                if isinstance(when, dt.datetime) and as_utc(when) >= as_utc(since):
                    found.append({"host": e.get("host"), "type": e.get("type"),
                                  "size": e.get("size"), "time": when})
        return found

    @_db_call
    def find_run(self, run_id: Any) -> dict[str, Any] | None:
        return self.runs.find_one({"_id": run_id}, RUN_FIELDS)

    @_db_call
    def count_runs(self, query: dict[str, Any]) -> int:
        return self.runs.count_documents(query)

    @_db_call
    def insert_runs(self, runs: Sequence[dict[str, Any]]) -> None:
        """Insert run documents (the DAQ's job; used by the demo and tests)."""
        if not self._skip("insert runs", len(runs)):
            self.runs.insert_many(list(runs))

    @_db_call
    def register_run(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """Insert a new run document as the DAQ would, unless it would be a duplicate.

        A duplicate has the same ``number`` or the same ``name`` within its ``detector`` (run
        numbers are not unique across detectors: the muon veto counts its own).  The check
        and the insert are one upsert, so two registrations of one run cannot both succeed
        on the embedded store.  Returns None when inserted, else the run already there
        (and writes nothing).

        Each entry's location must name the run's dataset and no other entry of any run may
        name it (LocationTakenError, UnsafeNameError): checked first for a clear message, and
        by the unique index of places in the insert itself.
        """
        detector = doc.get("detector")
        for entry in doc.get("data") or ():
            location = entry.get("location") if isinstance(entry, dict) else None
            if isinstance(location, str):
                check_dataset_name(doc, location)
                self.check_place_free(entry.get("host"), location)
        same = {"$or": [{"number": doc["number"], "detector": detector},
                        {"name": doc["name"], "detector": detector}]}
        fields = {"number": 1, "name": 1, "detector": 1, "start": 1}
        if self._skip("register run", doc["number"], doc["name"]):
            return self.runs.find_one(same, fields)
        result = self.runs.update_one(same, {"$setOnInsert": doc}, upsert=True)
        if result.upserted_id is not None:
            return None
        return self.runs.find_one(same, fields) or {}

    @_db_call
    def find_duplicate_run(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """The run ``register_run`` would refuse ``doc`` for, or None (writes nothing)."""
        detector = doc.get("detector")
        return self.runs.find_one({"$or": [{"number": doc["number"], "detector": detector},
                                           {"name": doc["name"], "detector": detector}]},
                                  {"number": 1, "name": 1, "detector": 1, "start": 1})

    @_db_call
    def check_place_free(self, host: Any, location: str, run_id: Any = None,
                         key: EntryKey | None = None) -> None:
        """Raise LocationTakenError if an entry of any run (but entry ``key`` of ``run_id``)
        names ``location`` at ``host`` -- with or without the final slash the original kept."""
        for run in self.find_runs_with_location(host, location.rstrip("/")):
            for entry in run.get("data") or ():
                if entry.get("host") != host or not isinstance(entry.get("location"), str) \
                        or entry["location"].rstrip("/") != location.rstrip("/"):
                    continue
                if run["_id"] == run_id and key is not None and EntryKey.of(entry) == key:
                    continue
                raise LocationTakenError(
                    f"{location} at {host} is already the location of {run_label(run)}'s "
                    f"{entry.get('type')} entry ({entry.get('status')}); one place holds one "
                    "dataset")

    @_db_call
    def highest_run_number(self) -> int | None:
        """The highest run number in the runs DB (index on ``number``), or None if empty."""
        top = self.runs.find_one({"number": {"$type": "number"}}, {"number": 1},
                                 sort=[("number", DESCENDING)])
        return int(top["number"]) if top else None

    @_db_call
    def count_copies(self, query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Return ``{host, type, status, count}`` of every entry in the runs matching ``query``.

        One aggregation: the server counts, nothing but the counts comes back.
        """
        pipeline: list[dict[str, Any]] = [{"$match": query}] if query else []
        pipeline += [{"$project": {"_id": 0, "data.host": 1, "data.type": 1, "data.status": 1}},
                     {"$unwind": "$data"},
                     {"$group": {"_id": {"host": "$data.host", "type": "$data.type",
                                         "status": "$data.status"}, "count": {"$sum": 1}}}]
        return [{**row["_id"], "count": row["count"]} for row in self.runs.aggregate(pipeline)]

    @_db_call
    def set_run_fields(self, run_id: Any, fields: dict[str, Any]) -> bool:
        """Set top-level fields of a run (e.g. ``raw_size_byte``)."""
        if self._skip("set", run_id, fields):
            return True
        return self.runs.update_one({"_id": run_id}, {"$set": fields}).matched_count == 1

    # -- data entries ---------------------------------------------------------------------

    @_db_call
    def add_entry(self, run_id: Any, entry: dict[str, Any]) -> bool:
        """Add ``entry`` to the run unless an entry with its identity exists; say if added."""
        key = EntryKey.of(entry)
        query = {"_id": run_id, "data": {"$not": key.elem_match()}}
        if self._skip("add entry", run_id, key):
            return self.runs.count_documents(query) == 1
        return self.runs.update_one(query, {"$push": {"data": entry}}).modified_count == 1

    @_db_call
    def claim_purge(self, run_id: Any, key: EntryKey, *, keep: Sequence[tuple[EntryKey, dict]],
                    owner: str, lease_s: float,
                    where: Sequence[dict[str, Any]] = ()) -> Claim | None:
        """Atomically turn our verified copy into ``purging`` (leased) while ``keep`` holds
        and nobody reads it.

        ``keep`` names the other copies the purge decision counted, each with extra conditions
        (e.g. its checksum); every one must still be ``transferred`` in the same write, so two
        sites purging each other's "other copy" at the same instant cannot both win.  No entry
        of the run may be at work (``transferring`` under a live lease) ``reading`` our copy:
        a push, pull, repair, processing job or tape backup still reading it.  Returns the
        claim, or None if anything changed.
        """
        now = self.now()
        reader = {f"reading.{name}": value for name, value in key.match().items()}
        requires = [(other, {"status": TRANSFERRED, **extra}) for other, extra in keep]
        token = secrets.token_hex(4)
        values = {"status": PURGING, "lease_owner": owner, "lease_token": token,
                  "lease_expires": now + dt.timedelta(seconds=lease_s), "modified_time": now}
        if self._skip("claim purge", run_id, key, owner):
            return None
        before = self._update_entry_at(
            run_id, key, {"status": TRANSFERRED, "lease_expires": _lease_free(now)},
            {"$set": values}, requires,
            excludes=[{"status": TRANSFERRING, **reader, "lease_expires": {"$gt": now}}],
            where=where)
        if before is None:
            return None
        return Claim(run_id, key, owner, token, int(before.get("attempts") or 0),
                     {**copy.deepcopy(before), **values}, before)

    @_db_call
    def record_size(self, run_id: Any, key: EntryKey, size: int, file_count: int) -> bool:
        """Set ``size`` and ``file_count`` of a copy that is still ``transferred``."""
        query = {"_id": run_id, "data": key.elem_match(status=TRANSFERRED)}
        if self._skip("size", run_id, key, size, file_count):
            return True
        update = {"$set": _positional({"size": size, "file_count": file_count})}
        return self.runs.update_one(query, update).matched_count == 1

    @_db_call
    def set_run_fields_once(self, run_id: Any, fields: dict[str, Any]) -> bool:
        """Set top-level fields of a run that has none of them yet (e.g. ``raw_size_byte``)."""
        query = {"_id": run_id, **{name: {"$exists": False} for name in fields}}
        if self._skip("set once", run_id, fields):
            return True
        return self.runs.update_one(query, {"$set": fields}).modified_count == 1

    @_db_call
    def find_runs_with_location(self, host: str, location: str,
                                number: int | None = None) -> list[dict[str, Any]]:
        """Return the runs (with ``number`` if given) with an entry at ``host`` at ``location``."""
        places = [location, location + "/"]  # the original cax sometimes kept a final slash
        query: dict[str, Any] = {"data": {"$elemMatch": {"host": host,
                                                         "location": {"$in": places}}}}
        if number is not None:
            query["number"] = number
        return self.find_runs(query)

    @_db_call
    def find_site_locations(self, host: str) -> list[dict[str, Any]]:
        """Return ``{location, status}`` of every entry at ``host``, fetching nothing else."""
        found = self.runs.find({"data.host": host},
                               {"_id": 0, "data.host": 1, "data.location": 1, "data.status": 1})
        return [{"location": e.get("location"), "status": e.get("status")}
                for run in found for e in run.get("data") or () if e.get("host") == host]

    # -- claimed work: the transitions of an entry under a lease -----------------------------

    def _update_entry_at(self, run_id: Any, key: EntryKey, conditions: dict[str, Any],
                         update: dict[str, dict[str, Any]],
                         requires: Sequence[tuple[EntryKey, dict[str, Any]]] = (),
                         excludes: Sequence[dict[str, Any]] = (),
                         where: Sequence[dict[str, Any]] = (),
                         run_update: dict[str, dict[str, Any]] | None = None
                         ) -> dict[str, Any] | None:
        """Atomically apply ``update`` (paths relative to the entry) to the entry ``key`` if it
        meets ``conditions``, every ``requires`` entry meets its own, no entry of the run
        matches any of ``excludes`` and the run meets every ``where`` (conditions on other
        fields, e.g. its ``origins``); ``run_update`` (paths relative to the run) goes into the
        same write.  Return the entry as it was before, or None.

        Without ``requires``/``excludes``/``where`` the entry is addressed by the positional
        ``$``.  With them it is addressed by its index, re-checked by identity in the same
        filter, because ``$`` is ambiguous when a query has conditions on several arrays.
        """
        by_index = bool(requires or excludes or where)
        for _ in range(3):  # the index moves only if an earlier entry was pulled meanwhile
            if by_index:
                run = self.runs.find_one({"_id": run_id}, {"data": 1})
                index = _index_of(run, key)
                if index is None:
                    return None
                at = f"data.{index}"
                # the entry at the index has our identity, and (identities being unique in a
                # run) it is the one meeting ``conditions``, which may hold operators ($or)
                mine = {f"{at}.{name}": value for name, value in key.match().items()}
                query = {"_id": run_id, "$and": [mine, {"data": key.elem_match(**conditions)}] + [
                    {"data": other.elem_match(**extra)} for other, extra in requires] + [
                    {"data": {"$not": {"$elemMatch": cond}}} for cond in excludes] + list(where)}
            else:
                at = "data.$"
                query = {"_id": run_id, "data": key.elem_match(**conditions)}
            body = {op: {f"{at}.{name}": value for name, value in fields.items()}
                    for op, fields in update.items() if fields}
            for op, fields in (run_update or {}).items():
                body.setdefault(op, {}).update(fields)
            before = self.runs.find_one_and_update(query, body, {"data": 1},
                                                   return_document=ReturnDocument.BEFORE)
            if before is not None:
                return find_entry(before, key)
            if not by_index:
                return None
            again = self.runs.find_one({"_id": run_id}, {"data": 1})
            if _index_of(again, key) == index:
                return None
        return None

    @_db_call
    def claim(self, run_id: Any, key: EntryKey, *, owner: str, lease_s: float,
              statuses: Iterable[str] = (), conditions: dict[str, Any] | None = None,
              fields: dict[str, Any] | None = None, new_entry: dict[str, Any] | None = None,
              requires: Sequence[tuple[EntryKey, dict[str, Any]]] = (),
              where: Sequence[dict[str, Any]] = (), run: dict[str, Any] | None = None,
              count_attempt: bool = True) -> Claim | None:
        """Lease the entry ``key`` for one attempt of work; None if another daemon has it.

        With ``new_entry`` the entry is added (with ``fields`` and the lease) when the run has
        none with its identity.  Otherwise, or if one exists, it is taken when its status is in
        ``statuses``, its lease (if any) has expired by the runs DB's clock and it meets
        ``conditions``; ``count_attempt`` counts the claim in ``attempts`` (a takeover of an
        expired lease is an attempt too).  Every ``requires`` entry must meet its conditions,
        and the run every ``where`` condition, in the same atomic write (e.g. the source copy
        is still ``transferred``).

        A claim that sets a ``location`` must name ``run`` (its name and detector): the place
        must name the run's dataset (invariant (b), UnsafeNameError), and no other entry of any
        run may name it (invariant (a): the unique index of places refuses it in the write,
        LocationTakenError).
        """
        now = self.now()
        token = secrets.token_hex(4)
        lease = {"lease_owner": owner, "lease_expires": now + dt.timedelta(seconds=lease_s),
                 "lease_token": token, "modified_time": now}
        fields = dict(fields or {})
        location = fields.get("location", (new_entry or {}).get("location"))
        if location is not None:
            if run is None:
                raise ValueError("a claim that sets a location must name its run")
            check_dataset_name(run, location)
        required = [{"data": other.elem_match(**extra)} for other, extra in requires]
        required += list(where)
        if new_entry is not None:
            entry = {**key.match(), "creation_time": now, "attempts": 1, **new_entry, **fields,
                     **lease}
            query = {"_id": run_id, "$and": [{"data": {"$not": key.elem_match()}}, *required]}
            if self._skip("add entry", run_id, key):
                added = self.runs.count_documents(query) == 1
            else:
                added = self.runs.update_one(query, {"$push": {"data": entry}}).modified_count == 1
            if added:
                return Claim(run_id, key, owner, token, 1, entry, None)
        statuses = list(statuses)
        if not statuses:
            return None
        match = {"status": {"$in": statuses}, "lease_expires": _lease_free(now),
                 **(conditions or {})}
        if self._skip("claim", run_id, key, owner):
            found = self.runs.find_one({"_id": run_id, "$and": [
                {"data": key.elem_match(**match)}, *required]}, {"data": 1})
            before = find_entry(found, key) if found else None
        else:
            update: dict[str, dict[str, Any]] = {"$set": {**fields, **lease}}
            if count_attempt:
                update["$inc"] = {"attempts": 1}
            if {TRANSFERRING, PURGING} & set(statuses):  # only an expired lease lets us in
                # first: the embedded engine applies operators in order, and $set changes
                # fields the filter matched on
                update = {"$push": {"history": {
                    "$each": [history_event(now, "takeover", owner, "the previous lease expired")],
                    "$slice": -HISTORY_KEPT}}, **update}
            before = self._update_entry_at(run_id, key, match, update, requires, where=where)
        if before is None:
            return None
        attempts = int(before.get("attempts") or 0) + (1 if count_attempt else 0)
        entry = {**copy.deepcopy(before), **fields, **lease, "attempts": attempts}
        return Claim(run_id, key, owner, token, attempts, entry, before)

    def _ours(self, claim: Claim) -> dict[str, Any]:
        return {"lease_owner": claim.owner, "lease_token": claim.token}

    @_db_call
    def renew(self, claim: Claim, lease_s: float) -> bool:
        """Extend the lease; False means it was taken over and the work must stop."""
        if self._skip("renew lease", claim.run_id, claim.key):
            return True
        now = self.now()
        result = self.runs.update_one(
            {"_id": claim.run_id, "data": claim.key.elem_match(**self._ours(claim))},
            {"$set": _positional({"lease_expires": now + dt.timedelta(seconds=lease_s),
                                  "modified_time": now})})
        return result.matched_count == 1

    def _finish(self, claim: Claim, what: str, fields: dict[str, Any], unset: Iterable[str],
                event: dict[str, Any] | None = None, where: Sequence[dict[str, Any]] = (),
                run_update: dict[str, dict[str, Any]] | None = None) -> bool:
        """One write that ends (or changes) claimed work, only while the claim is ours (and
        the run meets ``where``; ``run_update`` changes run fields in the same write)."""
        if self._skip(what, claim.run_id, claim.key, fields):
            return True
        update: dict[str, Any] = {"$set": dict(fields)}
        if event:
            update["$push"] = {"history": {"$each": [event], "$slice": -HISTORY_KEPT}}
        to_unset = [name for name in unset if name not in fields]
        if to_unset:  # last: the embedded engine applies operators in order, and the filter
            # that located the entry names fields this unsets
            update["$unset"] = {name: "" for name in to_unset}
        before = self._update_entry_at(claim.run_id, claim.key, self._ours(claim), update,
                                       where=where, run_update=run_update)
        return before is not None

    @_db_call
    def renew_leases(self, key: EntryKey, owner: str, lease_s: float) -> int:
        """Extend, in one write, every lease ``owner`` holds on an entry ``key`` (processing:
        the entries of all its queued and running jobs); return how many were renewed."""
        if self._skip("renew leases", key, owner):
            return 0
        now = self.now()
        result = self.runs.update_many(
            {"data": key.elem_match(lease_owner=owner)},
            {"$set": _positional({"lease_expires": now + dt.timedelta(seconds=lease_s),
                                  "modified_time": now})})
        return result.modified_count

    @_db_call
    def update_claimed(self, claim: Claim, fields: dict[str, Any]) -> bool:
        """Set fields of an entry we hold (e.g. a batch job id), keeping the lease."""
        return self._finish(claim, "update", {**fields, "modified_time": self.now()}, ())

    @_db_call
    def register_verified(self, claim: Claim, fields: dict[str, Any],
                          unset: Iterable[str] = (), *, proof: Proof) -> bool:
        """Mark the work's result good (``transferred``) -- only if the claim is still ours and
        ``proof`` still holds in the same write (invariant (c) of the ledger).

        The caller has verified every checksum; ``fields`` carry them (checksum, size, ...) and
        ``evidence`` (how it was verified, see ``origins``).  A producer's registration
        (``proof.establishes``) records the dataset's origin in this same write, once.
        False means the claim was lost, or the origin changed, and nothing was written.
        """
        now = self.now()
        fields = {"status": TRANSFERRED, "verified_time": now, "modified_time": now, **fields}
        dataset = dataset_match(claim.key.type, claim.key.version)
        run_update = None
        if proof.establishes is not None:
            where = [{"origins": {"$not": {"$elemMatch": dataset}}}]
            run_update = {"$push": {"origins": proof.establishes}}
        elif proof.matches is not None:
            where = [{"origins": {"$elemMatch": {**dataset,
                                                 "checksum": proof.matches["checksum"]}}}]
        else:
            where = [{"origins": {"$not": {"$elemMatch": dataset}}}]
        return self._finish(claim, "register", fields,
                            [*LEASE_FIELDS, *FAILURE_FIELDS, *unset], where=where,
                            run_update=run_update)

    @_db_call
    def record_failure(self, claim: Claim, reason: str, *, kind: str,
                       retry_at: dt.datetime | None, config_hash: str | None = None,
                       fields: dict[str, Any] | None = None, unset: Iterable[str] = ()) -> bool:
        """Mark the attempt failed (``error``) and drop the lease, only if still ours.

        ``retry_at`` None means no automatic retry: the entry waits for a person, or (kind
        ``config``) for the configuration to change.
        """
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}")
        now = self.now()
        values = {"status": ERROR, "error": reason, "error_kind": kind, "next_attempt": retry_at,
                  "modified_time": now, **(fields or {})}
        if config_hash:
            values["config_hash"] = config_hash
        return self._finish(claim, "failure", values, [*LEASE_FIELDS, *unset],
                            history_event(now, "failed", claim.owner, reason))

    @_db_call
    def release(self, claim: Claim, fields: dict[str, Any] | None = None,
                unset: Iterable[str] = ()) -> bool:
        """Drop the lease (keeping the status), only if still ours."""
        return self._finish(claim, "release", {"modified_time": self.now(), **(fields or {})},
                            [*LEASE_FIELDS, *unset])

    @_db_call
    def relocate(self, claim: Claim, run: dict[str, Any], location: str) -> bool:
        """Record the new location of a copy we hold (``cax-mv``) and release it.

        The new place must name the run's dataset and be named by no other entry (invariants
        (a) and (b); the unique index of places re-checks the second in the write).
        """
        check_dataset_name(run, location)
        self.check_place_free(claim.key.host, location, claim.run_id, claim.key)
        return self._finish(claim, "relocate", {"location": location,
                                                "modified_time": self.now()}, LEASE_FIELDS)

    @_db_call
    def remove_entry(self, run_id: Any, key: EntryKey, *, by: str) -> dict[str, Any] | None:
        """Unregister the entry ``key`` of a run without touching its data (``cax run remove``).

        Refused (None) while a live lease holds it.  If the entry was its dataset's producer
        (the origin is recorded at its site) and no other copy agrees with that origin, the
        origin goes with it: a mistaken registration must not stay the truth.  Returns the
        removed entry.
        """
        now = self.now()
        run = self.runs.find_one({"_id": run_id}, {"data": 1, "origins": 1, "number": 1,
                                                   "name": 1})
        entry = find_entry(run, key) if run else None
        if entry is None:
            return None
        if self._skip("remove entry", run_id, key, by):
            return entry
        cond = {**key.match(), "lease_expires": _lease_free(now)}
        done = self.runs.update_one({"_id": run_id, "data": key.elem_match(
            lease_expires=_lease_free(now))}, {"$pull": {"data": cond}}).modified_count == 1
        if not done:
            return None
        self.remove_manifest(run_id, key)
        dataset = dataset_match(key.type, key.version)
        alike = {**dataset, "status": TRANSFERRED}
        self.runs.update_one(
            {"_id": run_id, "origins": {"$elemMatch": {**dataset, "host": key.host}},
             "data": {"$not": {"$elemMatch": alike}}},
            {"$pull": {"origins": dataset}})
        log.info("%s: %s unregistered by %s (data left in place)", run_label(run), key, by)
        return entry

    @_db_call
    def remove_claimed(self, claim: Claim, status: str) -> bool:
        """Remove the entry we hold in ``status`` (a finished purge)."""
        if self._skip("remove entry", claim.run_id, claim.key):
            return True
        cond = {**claim.key.match(), **self._ours(claim), "status": status}
        return self.runs.update_one({"_id": claim.run_id},
                                    {"$pull": {"data": cond}}).modified_count == 1

    @_db_call
    def flag_bad_copy(self, claim: Claim, *, reference: str, expected: str | None, reason: str,
                      failures: int, retry_at: dt.datetime | None) -> bool:
        """Take a copy found to differ from its dataset's origin out of ``transferred``.

        ``retry_at``: when a repair is due (now, if a good copy exists; later, if the dataset's
        origin is not settled yet); None: no good copy exists, so the copy is flagged and kept
        (nothing deleted: it may be the last copy of those bytes) and waits for a person.
        """
        now = self.now()
        fields = {"status": ERROR, "checksum_problem": reference, "expected_checksum": expected,
                  "checksum_failures": failures, "error": reason, "modified_time": now,
                  "error_kind": "transient" if retry_at else "permanent",
                  "attempts": 0, "next_attempt": retry_at}
        return self._finish(claim, "flag bad copy", fields, [*LEASE_FIELDS, "compared_checksum"],
                            history_event(now, "bad copy", claim.owner, reason))

    @_db_call
    def record_permissions(self, run_id: Any, key: EntryKey, digest: str) -> bool:
        """Record which permission settings were applied to a copy (SetPermission)."""
        if self._skip("permissions", run_id, key, digest):
            return True
        return self.runs.update_one({"_id": run_id, "data": key.elem_match()},
                                    {"$set": {"data.$.permissions_applied": digest}}
                                    ).matched_count == 1

    @_db_call
    def record_compared(self, run_id: Any, key: EntryKey, token: str, compared_with: list[str],
                        *, disputed: str | None = None) -> bool:
        """Record that a copy was judged against its dataset's origin in the state ``token``
        and ``compared_with`` name (its checksum and its origin's, the other copies'), so it
        needs no lease: a stale write cannot hide a change.  ``disputed`` marks the copy as
        part of a dispute; None clears the mark."""
        if self._skip("compared", run_id, key, token):
            return True
        values = {"data.$.compared_checksum": token, "data.$.compared_with": compared_with}
        if disputed:
            values["data.$.disputed"] = disputed
        unset = {"data.$.checksum_failures": "", **({} if disputed else {"data.$.disputed": ""})}
        return self.runs.update_one({"_id": run_id, "data": key.elem_match()},
                                    {"$set": values, "$unset": unset}).matched_count == 1

    @_db_call
    def reset_entry(self, run_id: Any, key: EntryKey, *, by: str,
                    now: dt.datetime | None = None) -> bool:
        """Make a stuck entry retryable at the next pass (``cax retry``); deletes nothing.

        * ``error`` (attempts used up, a permanent or configuration error, a bad copy flagged
          and kept): attempts and failure kind are cleared and the retry is due now -- a copy
          is copied (or repaired) again, a processed entry gets a new job; raw data the DAQ put
          at this site (no ``source``, not a bad copy) goes back to ``verifying``, so AddChecksum
          checks it again against its recorded checksum and its dataset's origin;
        * ``transferring`` whose lease expired (its daemon died), or a lease-less one of the
          original cax: becomes a due ``error``, so the tasks take it up again;
        * ``purging`` whose lease expired: the lease is dropped, so the purge is finished.

        An entry under a live lease is not touched.  Who and when go into ``history``.
        Returns whether the entry was reset.
        """
        now = now or self.now()
        run = self.runs.find_one({"_id": run_id}, {"data": 1, "origins": 1})
        entry = find_entry(run, key) if run else None
        if entry is None:
            return False
        status = entry.get("status")
        event = history_event(now, "retry", by, f"was {status}")
        unset: list[str] = list(LEASE_FIELDS)
        if status == ERROR:
            cond: dict[str, Any] = {"status": ERROR, "lease_expires": _lease_free(now)}
            fields: dict[str, Any] = {"attempts": 0, "next_attempt": now,
                                      "checksum_failures": 0, "modified_time": now}
            if entry.get("type") == "raw" and "source" not in entry \
                    and not (entry.get("checksum_problem") and good_elsewhere(run, key)):
                fields["status"] = VERIFYING  # nothing to repair from: read what is there
                del fields["next_attempt"]
                unset += ["next_attempt", "checksum_problem", "expected_checksum"]
            unset += ["error_kind", "config_hash"]
        elif status in (TRANSFERRING, PURGING) and entry.get("lease_expires") is not None:
            cond = {"status": status, "lease_expires": {"$lt": now}}
            fields = {"modified_time": now}
            if status == TRANSFERRING:
                owner = entry.get("lease_owner") or "a daemon"
                fields.update(status=ERROR, attempts=0, next_attempt=now, error_kind="transient",
                              error=f"lease of {owner} expired; reset by {by}")
        elif status == TRANSFERRING and "lease_owner" not in entry:  # the original's, stalled
            cond = {"status": status, "lease_owner": {"$exists": False},
                    "lease_expires": {"$exists": False}}
            fields = {"modified_time": now, "status": ERROR, "attempts": 0, "next_attempt": now,
                      "error_kind": "transient",
                      "error": f"a stalled transfer of the original cax; reset by {by}"}
        else:
            return False
        # Addressed by index, re-checked by identity and state in the filter: the positional
        # ``$`` would have to match an entry whose status this same update changes.
        at = f"data.{_index_of(run, key)}"
        query = {"_id": run_id, **{f"{at}.{k}": v for k, v in {**key.match(), **cond}.items()}}
        update = {"$set": {f"{at}.{k}": v for k, v in fields.items()},
                  "$unset": {f"{at}.{k}": "" for k in unset if k not in fields},
                  "$push": {f"{at}.history": {"$each": [event], "$slice": -HISTORY_KEPT}}}
        if self._skip("reset", run_id, key, by):
            return self.runs.count_documents(query) == 1
        return self.runs.update_one(query, update).matched_count == 1

    # -- heartbeats -----------------------------------------------------------------------

    @_db_call
    def write_heartbeat(self, daemon_id: str, doc: dict[str, Any]) -> None:
        """Record this daemon's state; one document per daemon process."""
        if not self._skip("heartbeat", daemon_id):
            self.daemons.replace_one({"_id": daemon_id}, {"_id": daemon_id, **doc}, upsert=True)

    @_db_call
    def find_heartbeats(self, site: str | None = None) -> list[dict[str, Any]]:
        return list(self.daemons.find({"site": site} if site else {}))

    # -- per-file manifests ---------------------------------------------------------------

    @staticmethod
    def _manifest_id(run_id: Any, key: EntryKey) -> str:
        return f"{run_id}/{key.host}/{key.type}/{key.version or ''}"

    @_db_call
    def save_manifest(self, run_id: Any, key: EntryKey, files: dict[str, tuple[int, str]],
                      checksum: str, now: dt.datetime) -> None:
        """Keep the per-file checksums of one copy outside the (small) run document."""
        if self._skip("manifest", run_id, key):
            return
        doc = {"run": run_id, "host": key.host, "type": key.type, "pax_version": key.version,
               "checksum": checksum, "time": now,
               "files": [[stored_name(path), size, adler]
                         for path, (size, adler) in sorted(files.items())]}
        self.manifests.replace_one({"_id": self._manifest_id(run_id, key)},
                                   {"_id": self._manifest_id(run_id, key), **doc}, upsert=True)

    @_db_call
    def find_manifest(self, run_id: Any, key: EntryKey) -> dict[str, tuple[int, str]] | None:
        """Return the per-file checksums recorded for one copy, or None."""
        doc = self.manifests.find_one({"_id": self._manifest_id(run_id, key)})
        if not doc:
            return None
        return {loaded_name(path): (size, adler) for path, size, adler in doc["files"]}

    @staticmethod
    def _origin_key(key: EntryKey) -> EntryKey:
        return EntryKey(ORIGIN_MANIFEST_HOST, key.type, key.version)

    @_db_call
    def save_origin_manifest(self, run_id: Any, key: EntryKey, files: dict[str, tuple[int, str]],
                             checksum: str, now: dt.datetime) -> None:
        """Keep the producer's per-file checksums of a dataset (its origin's manifest), before
        the write that records the origin; a leftover of a producer whose registration failed
        is replaced by the next one, and only a manifest whose checksum is the recorded
        origin's is ever used (``find_origin_manifest``)."""
        self.save_manifest(run_id, self._origin_key(key), files, checksum, now)

    @_db_call
    def find_origin_manifest(self, run_id: Any, key: EntryKey, origin: dict[str, Any] | None,
                             *, pending: bool = False) -> dict[str, tuple[int, str]] | None:
        """The per-file checksums of the dataset's origin, if recorded and still its own; with
        ``pending``, the last producer's whatever the origin (for its adoption)."""
        if not origin and not pending:
            return None
        doc = self.manifests.find_one({"_id": self._manifest_id(run_id, self._origin_key(key))})
        if not doc or not pending and doc.get("checksum") != origin.get("checksum"):
            return None
        return {loaded_name(path): (size, adler) for path, size, adler in doc["files"]}

    @_db_call
    def remove_manifest(self, run_id: Any, key: EntryKey) -> None:
        if not self._skip("remove manifest", run_id, key):
            self.manifests.delete_one({"_id": self._manifest_id(run_id, key)})
