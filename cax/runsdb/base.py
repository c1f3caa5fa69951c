"""What every part of the runs DB shares: its collections, its clock, the read-only switch, the
basic reads, and the translation of driver errors into the errors cax handles.

``RunsDB`` (``runs``) is composed of this base, the ledger of entry transitions (``ledger``)
and the per-file manifests (``manifests``), each a module of its own.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from bson.errors import InvalidDocument
from pymongo import DESCENDING
from pymongo.errors import DuplicateKeyError, PyMongoError

from cax.errors import RunsDBError, UnsafeNameError
from cax.runsdb.dbclock import DBClock, ServerTime

log = logging.getLogger(__name__)

DAEMONS_COLLECTION = "cax_daemons"
MANIFESTS_COLLECTION = "cax_manifests"
NEWEST_FIRST = [("start", DESCENDING), ("number", DESCENDING)]
#: The run fields tasks need; the DAQ's large sub-documents (reader, trigger, ...) stay behind.
RUN_FIELDS = {"number": 1, "name": 1, "detector": 1, "start": 1, "end": 1, "tags": 1, "data": 1,
              "origins": 1, "raw_size_byte": 1}

T = TypeVar("T")


class LocationTakenError(UnsafeNameError):
    """A location is already named by another entry: one place holds one dataset."""


def dup_key(exc: DuplicateKeyError) -> str:
    """The key a DuplicateKeyError names, for a one-line message."""
    details = exc.details or {}
    key = details.get("keyValue") or details.get("keyvalue")
    return ", ".join(f"{k} {v!r}" for k, v in key.items()) if isinstance(key, dict) else \
        str(exc).split("dup key:", 1)[-1].strip()[:200]


def db_call(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn driver and disk errors into RunsDBError, which the task runner knows how to handle,
    and the unique index of places refusing a write into one clear LocationTakenError."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except DuplicateKeyError as exc:  # the unique (host, location) index
            raise LocationTakenError(f"runs DB refused {fn.__name__}: another entry already "
                                     f"names that place ({dup_key(exc)})") from None
        except (PyMongoError, InvalidDocument) as exc:  # DocumentTooLarge is the second
            raise RunsDBError(f"runs DB: {fn.__name__}: {exc}") from exc
        except OSError as exc:
            raise RunsDBError(f"runs DB: {fn.__name__}: {exc}") from exc

    return wrapper


class Store:
    """The runs DB's collections, clock and counters, and the reads everything builds on.

    In read-only mode (``--dry-run``, ``--disable-database-update``) every write is logged and
    answered as if it had succeeded (``_skip``), and nothing is sent.
    """

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

    @db_call
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

    @db_call
    def find_runs(self, query: dict[str, Any], *, projection: dict[str, int] | None = None,
                  limit: int = 0) -> list[dict[str, Any]]:
        """Return the runs matching ``query``, newest first, with the fields tasks need."""
        return list(self.runs.find(query, projection or RUN_FIELDS, sort=NEWEST_FIRST,
                                   limit=limit))

    @db_call
    def find_run(self, run_id: Any) -> dict[str, Any] | None:
        return self.runs.find_one({"_id": run_id}, RUN_FIELDS)
