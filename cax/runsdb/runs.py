"""The runs DB as cax sees it: run documents, daemon heartbeats, and (from its parts) the
ledger of entry transitions and the per-file manifests.

Every query and update cax makes is a named method of ``RunsDB``; writes check what they
matched.  The class is built in layers, one module each: ``base.Store`` (collections, clock,
read-only switch, basic reads), ``manifests.Manifests``, ``ledger.Ledger`` (every change of a
``data[]`` entry, with the ledger's invariants), ``bulk.BulkLedger`` (some of those for many
entries in one round trip), and this module's run documents and heartbeats.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.errors import DuplicateKeyError, OperationFailure

from cax.clock import as_utc
from cax.runsdb.base import (
    NEWEST_FIRST,
    RUN_FIELDS,
    LocationTakenError,
    db_call,
    dup_key,
)
from cax.runsdb.bulk import BulkLedger
from cax.runsdb.entries import TRANSFERRED, check_dataset_name, place_key
from cax.runsdb.ledger import (
    FAILURE_FIELDS,
    FAILURE_KINDS,
    HISTORY_KEPT,
    LEASE_FIELDS,
    Claim,
    history_event,
)

log = logging.getLogger(__name__)

__all__ = ["FAILURE_FIELDS", "FAILURE_KINDS", "HISTORY_KEPT", "LEASE_FIELDS", "NEWEST_FIRST",
           "RUN_FIELDS", "Claim", "LocationTakenError", "RunsDB", "history_event"]

#: The unique index of the places the entries cax writes name (``places``: "host<TAB>path"),
#: over every run.  Not an index of ``data.host`` and ``data.location`` themselves: the
#: original cax writes entries located "n/a" (a tape upload under way, a failed one) in many
#: runs, and a unique multikey index would refuse its writes; and a run with an entry without
#: a location would collide with every other such run on a null key.  Its partial filter leaves
#: out runs that name no place (``places`` missing or empty).
PLACE_INDEX = "places_unique"


class RunsDB(BulkLedger):
    """The runs DB as cax sees it: run documents, daemon heartbeats, entries and manifests."""

    @db_call
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
            self.runs.create_index([("places", ASCENDING)], unique=True, name=PLACE_INDEX,
                                   partialFilterExpression={"places": {"$type": "string"}})
        except (DuplicateKeyError, OperationFailure) as exc:
            log.error("runs DB: the unique index of places cannot be created (%s); cax still "
                      "refuses a place another entry names before it writes, but not in the "
                      "same write", dup_key(exc) if isinstance(exc, DuplicateKeyError)
                      else str(exc)[:200])
        self.manifests.create_index([("run", ASCENDING), ("host", ASCENDING)])
        self.daemons.create_index([("site", ASCENDING)])

    # -- run documents --------------------------------------------------------------------

    @db_call
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

    @db_call
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

    @db_call
    def count_runs(self, query: dict[str, Any]) -> int:
        return self.runs.count_documents(query)

    @db_call
    def insert_runs(self, runs: Sequence[dict[str, Any]]) -> None:
        """Insert run documents (the DAQ's job; used by the demo and tests)."""
        if not self._skip("insert runs", len(runs)):
            self.runs.insert_many(list(runs))

    @db_call
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
        places = []
        for entry in doc.get("data") or ():
            location = entry.get("location") if isinstance(entry, dict) else None
            if isinstance(location, str):
                check_dataset_name(doc, location)
                self.check_place_free(entry.get("host"), location)
                places.append(place_key(entry.get("host"), location))
        if places:
            doc = {**doc, "places": places}
        same = {"$or": [{"number": doc["number"], "detector": detector},
                        {"name": doc["name"], "detector": detector}]}
        fields = {"number": 1, "name": 1, "detector": 1, "start": 1}
        if self._skip("register run", doc["number"], doc["name"]):
            return self.runs.find_one(same, fields)
        result = self.runs.update_one(same, {"$setOnInsert": doc}, upsert=True)
        if result.upserted_id is not None:
            return None
        return self.runs.find_one(same, fields) or {}

    @db_call
    def find_duplicate_run(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """The run ``register_run`` would refuse ``doc`` for, or None (writes nothing)."""
        detector = doc.get("detector")
        return self.runs.find_one({"$or": [{"number": doc["number"], "detector": detector},
                                           {"name": doc["name"], "detector": detector}]},
                                  {"number": 1, "name": 1, "detector": 1, "start": 1})

    @db_call
    def highest_run_number(self) -> int | None:
        """The highest run number in the runs DB (index on ``number``), or None if empty."""
        top = self.runs.find_one({"number": {"$type": "number"}}, {"number": 1},
                                 sort=[("number", DESCENDING)])
        return int(top["number"]) if top else None

    @db_call
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

    @db_call
    def set_run_fields(self, run_id: Any, fields: dict[str, Any]) -> bool:
        """Set top-level fields of a run (e.g. ``raw_size_byte``)."""
        if self._skip("set", run_id, fields):
            return True
        return self.runs.update_one({"_id": run_id}, {"$set": fields}).matched_count == 1

    @db_call
    def find_site_locations(self, host: str) -> list[dict[str, Any]]:
        """Return ``{location, status}`` of every entry at ``host``, fetching nothing else."""
        found = self.runs.find({"data.host": host},
                               {"_id": 0, "data.host": 1, "data.location": 1, "data.status": 1})
        return [{"location": e.get("location"), "status": e.get("status")}
                for run in found for e in run.get("data") or () if e.get("host") == host]

    # -- heartbeats -----------------------------------------------------------------------

    @db_call
    def write_heartbeat(self, daemon_id: str, doc: dict[str, Any]) -> None:
        """Record this daemon's state; one document per daemon process."""
        if not self._skip("heartbeat", daemon_id):
            self.daemons.replace_one({"_id": daemon_id}, {"_id": daemon_id, **doc}, upsert=True)

    @db_call
    def find_heartbeats(self, site: str | None = None) -> list[dict[str, Any]]:
        return list(self.daemons.find({"site": site} if site else {}))
