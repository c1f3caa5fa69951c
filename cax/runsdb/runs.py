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
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import PyMongoError

from cax.errors import RunsDBError
from cax.runsdb.entries import PURGING, TRANSFERRED, EntryKey, find_entry

log = logging.getLogger(__name__)

DAEMONS_COLLECTION = "cax_daemons"
MANIFESTS_COLLECTION = "cax_manifests"
NEWEST_FIRST = [("start", DESCENDING), ("number", DESCENDING)]
#: The run fields tasks need; the DAQ's large sub-documents (reader, trigger, ...) stay behind.
RUN_FIELDS = {"number": 1, "name": 1, "detector": 1, "start": 1, "end": 1, "tags": 1, "data": 1}

T = TypeVar("T")


def _db_call(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn driver and disk errors into RunsDBError, which the task runner knows how to handle."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except PyMongoError as exc:
            raise RunsDBError(f"runs DB: {fn.__name__}: {exc}") from exc
        except OSError as exc:
            raise RunsDBError(f"runs DB: {fn.__name__}: {exc}") from exc

    return wrapper


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


class RunsDB:
    """The runs DB as cax sees it: run documents, daemon heartbeats and file manifests."""

    def __init__(self, db: Any, runs_collection: str = "runs_new", *, read_only: bool = False):
        self.runs = db[runs_collection]
        self.daemons = db[DAEMONS_COLLECTION]
        self.manifests = db[MANIFESTS_COLLECTION]
        self.read_only = read_only
        self.round_trips = 0
        self.client: Any = None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def count_round_trip(self, command: str) -> None:
        """Listener for the client: called once per command sent to the server."""
        self.round_trips += 1

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
        ):
            self.runs.create_index(keys)
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
    def claim_entry(self, run_id: Any, key: EntryKey, *, statuses: Iterable[str], owner: str,
                    now: dt.datetime, lease_s: float, fields: dict[str, Any] | None = None,
                    conditions: dict[str, Any] | None = None,
                    count_attempt: bool = False) -> dict[str, Any] | None:
        """Atomically lease the entry if its status is in ``statuses`` and it is not leased.

        Returns the claimed entry, or None if another daemon holds it or it changed state.
        ``conditions`` adds further conditions on the entry (e.g. a retry time that passed).
        """
        match = key.elem_match(**{"status": {"$in": list(statuses)},
                              "lease_expires": _lease_free(now), **(conditions or {})})
        query = {"_id": run_id, "data": match}
        lease = {"lease_owner": owner, "lease_expires": now + dt.timedelta(seconds=lease_s),
                 "modified_time": now}
        update: dict[str, Any] = {"$set": _positional({**lease, **(fields or {})})}
        if count_attempt:
            update["$inc"] = {"data.$.attempts": 1}
        if self._skip("claim", run_id, key, owner):
            run = self.runs.find_one(query, {"data": 1})
            entry = find_entry(run, key) if run else None
            return {**copy.deepcopy(entry), **lease, **(fields or {})} if entry else None
        run = self.runs.find_one_and_update(query, update, {"data": 1},
                                            return_document=ReturnDocument.AFTER)
        return find_entry(run, key) if run else None

    @_db_call
    def renew_lease(self, run_id: Any, key: EntryKey, owner: str, now: dt.datetime,
                    lease_s: float) -> bool:
        """Extend our lease; False means it was taken over and the work must stop."""
        if self._skip("renew lease", run_id, key):
            return True
        result = self.runs.update_one(
            {"_id": run_id, "data": key.elem_match(lease_owner=owner)},
            {"$set": _positional({"lease_expires": now + dt.timedelta(seconds=lease_s),
                                  "modified_time": now})})
        return result.matched_count == 1

    @_db_call
    def update_entry(self, run_id: Any, key: EntryKey, fields: dict[str, Any], *,
                     owner: str | None = None, release: bool = False,
                     unset: Iterable[str] = ()) -> bool:
        """Set fields of one entry, matched by identity (and by lease owner if ``owner``).

        ``release`` drops the lease in the same write.  Returns whether the entry matched.
        """
        query = {"_id": run_id, "data": key.elem_match(**({"lease_owner": owner} if owner else {}))}
        to_unset = list(unset) + (["lease_owner", "lease_expires"] if release else [])
        update: dict[str, Any] = {"$set": _positional(fields)}
        if to_unset:
            update["$unset"] = {f"data.$.{name}": "" for name in to_unset}
        if self._skip("update", run_id, key, fields):
            return True
        return self.runs.update_one(query, update).matched_count == 1

    @_db_call
    def remove_entry(self, run_id: Any, key: EntryKey, *, owner: str | None = None,
                     status: str | None = None) -> bool:
        """Remove one entry, only if still owned by ``owner`` / in ``status`` when given."""
        cond = key.match()
        if owner:
            cond["lease_owner"] = owner
        if status:
            cond["status"] = status
        if self._skip("remove entry", run_id, key):
            return True
        return self.runs.update_one({"_id": run_id}, {"$pull": {"data": cond}}).modified_count == 1

    @_db_call
    def claim_purge(self, run_id: Any, key: EntryKey, *, keep: Sequence[tuple[EntryKey, dict]],
                    owner: str, now: dt.datetime, lease_s: float) -> dict[str, Any] | None:
        """Atomically turn our verified copy into ``purging`` (leased) while ``keep`` holds.

        ``keep`` names the other copies the purge decision counted, each with extra conditions
        (e.g. its checksum); every one must still be ``transferred`` in the same write, so two
        sites purging each other's "other copy" at the same instant cannot both win.  The entry
        is addressed by its index, re-checked by identity in the filter: a positional ``$``
        would be ambiguous with several ``$elemMatch`` on ``data``.  Returns the claimed entry,
        or None if anything changed.
        """
        for _ in range(3):  # the index moves only if an earlier entry was pulled meanwhile
            run = self.runs.find_one({"_id": run_id}, {"data": 1})
            index = _index_of(run, key)
            if index is None:
                return None
            at = f"data.{index}"
            mine = {f"{at}.{name}": value for name, value in key.match().items()}
            mine.update({f"{at}.status": TRANSFERRED, f"{at}.lease_expires": _lease_free(now)})
            query = {"_id": run_id, "$and": [mine] + [
                {"data": other.elem_match(status=TRANSFERRED, **extra)} for other, extra in keep]}
            lease = {"status": PURGING, "lease_owner": owner, "modified_time": now,
                     "lease_expires": now + dt.timedelta(seconds=lease_s)}
            if self._skip("claim purge", run_id, key, owner):
                found = self.runs.find_one(query, {"data": 1})
                return {**copy.deepcopy(found["data"][index]), **lease} if found else None
            found = self.runs.find_one_and_update(
                query, {"$set": {f"{at}.{name}": value for name, value in lease.items()}},
                {"data": 1}, return_document=ReturnDocument.AFTER)
            if found:
                return found["data"][index]
            again = self.runs.find_one({"_id": run_id}, {"data": 1})
            if _index_of(again, key) == index:
                return None
        return None

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
               "files": [[path, size, adler] for path, (size, adler) in sorted(files.items())]}
        self.manifests.replace_one({"_id": self._manifest_id(run_id, key)},
                                   {"_id": self._manifest_id(run_id, key), **doc}, upsert=True)

    @_db_call
    def find_manifest(self, run_id: Any, key: EntryKey) -> dict[str, tuple[int, str]] | None:
        """Return the per-file checksums recorded for one copy, or None."""
        doc = self.manifests.find_one({"_id": self._manifest_id(run_id, key)})
        if not doc:
            return None
        return {path: (size, adler) for path, size, adler in doc["files"]}

    @_db_call
    def remove_manifest(self, run_id: Any, key: EntryKey) -> None:
        if not self._skip("remove manifest", run_id, key):
            self.manifests.delete_one({"_id": self._manifest_id(run_id, key)})
