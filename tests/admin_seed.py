"""A runs DB seeded with copies in every state, for the status, retry and metrics tests.

Sites ``daq`` and ``lab`` of the ``two_sites`` fixture (max_attempts 5).  Besides entries as
this cax writes them, run 10 is a document as the original cax wrote it: naive datetimes, a
sha512 checksum, an ``error`` without attempts (retried automatically, so not stuck), a
``transferring`` without lease (RetryStalledTransfer's business) and an entry at a site the
configuration does not know.
"""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

from cax.clock import utcnow
from tests.conftest import make_run

CHECKSUM = "adler32:" + "ab" * 32
LEGACY = "0f" * 64
ALIVE, LATE, DEAD = "daq@vm:100:1", "lab@vm:200:1", "lab@old:300:1"

#: Entries at lab that are stuck, by run number, and the kind each is.
STUCK_AT_LAB = {5: "attempts", 6: "permanent", 7: "config", 8: "dead-lease"}
#: Entries at daq that are stuck.
STUCK_AT_DAQ = {9: "dead-lease", 11: "attempts"}


#: Numbers the places of copies made by ``copy``: one place, one entry, in every runs DB.
PLACES = itertools.count()


def copy(host: str, status: str, **fields: Any) -> dict[str, Any]:
    entry = {"host": host, "type": "raw", "status": status,
             "location": f"/data/{host}/raw/run-{next(PLACES)}", "checksum": None,
             "creation_time": dt.datetime(2017, 1, 2, tzinfo=dt.timezone.utc)}
    if status == "transferred":
        entry.update(checksum=CHECKSUM, size=3_000_000, file_count=3)
    entry.update(fields)
    return entry


def seeded_runs(now: dt.datetime, raw_dir: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The run documents (locations under ``raw_dir[host]`` when given)."""
    ahead, ago = now + dt.timedelta(hours=1), now - dt.timedelta(hours=1)
    daq = copy("daq", "transferred")
    runs = [
        make_run(1, data=[daq, copy("lab", "transferred", source="daq")]),
        make_run(2, data=[copy("daq", "verifying")]),
        make_run(3, data=[daq, copy("lab", "transferring", source="daq", lease_owner=ALIVE,
                                    lease_expires=ahead, attempts=1)]),
        make_run(4, data=[daq, copy("lab", "error", source="daq", attempts=2,
                                    next_attempt=ahead, error="ssh: connection refused")]),
        make_run(5, data=[daq, copy("lab", "error", source="daq", attempts=5,
                                    next_attempt=None, error="rsync: No space left")]),
        make_run(6, data=[daq, copy("lab", "error", source="daq", attempts=1,
                                    next_attempt=None, error_kind="permanent",
                                    error="Permission denied")]),
        make_run(7, data=[daq, copy("lab", "error", source="daq", attempts=1,
                                    next_attempt=None, error_kind="config",
                                    error="no dir_raw")]),
        make_run(8, data=[daq, copy("lab", "transferring", source="daq", lease_owner=DEAD,
                                    lease_expires=ago, attempts=1)]),
        make_run(9, data=[copy("daq", "purging", lease_owner=ALIVE, lease_expires=ago,
                               checksum=CHECKSUM)]),
        make_run(10, start=dt.datetime(2017, 1, 1, 10, 0), data=[
            {"host": "daq", "type": "raw", "status": "transferred", "checksum": LEGACY,
             "location": "/data/daq/raw/170101_1000",
             "creation_time": [dt.datetime(2017, 1, 1, 11)]},
            {"host": "lab", "type": "raw", "status": "error",
             "location": "/data/lab/raw/170101_1000", "checksum": None,
             "creation_time": dt.datetime(2017, 1, 1, 12)},
            {"host": "midway-login1", "type": "raw", "status": "transferring",
             "location": "/project/raw/170101_1000", "checksum": None,
             "creation_time": dt.datetime(2017, 1, 1, 12)}],
            reader={"self_trigger": True}, trigger={"events_built": 1000}),
        make_run(11, data=[copy("daq", "error", attempts=5, next_attempt=None,
                                error="checksum mismatch")]),
    ]
    for run in runs:  # each run's data at a place of its own (one place, one entry)
        run["data"] = [dict(e) for e in run["data"]]
        for e in run["data"]:
            if raw_dir and e["host"] in raw_dir:
                e["location"] = f"{raw_dir[e['host']]}/{run['name']}"
            elif "/raw/run-" in e["location"]:
                e["location"] = e["location"].rsplit("/", 1)[0] + "/" + run["name"]
    return runs


def heartbeats(now: dt.datetime) -> dict[str, dict[str, Any]]:
    """Heartbeats of an alive, a late and a dead daemon (60 s pauses)."""
    def beat(site: str, host: str, pid: int, age_s: float) -> dict[str, Any]:
        updated = now - dt.timedelta(seconds=age_s)
        return {"site": site, "host": host, "pid": pid, "version": "6.0.0", "updated": updated,
                "pass": 7, "pass_start": updated - dt.timedelta(seconds=2),
                "pass_end": updated, "counts": {}, "last_error": None, "sleep_seconds": 60}

    return {ALIVE: beat("daq", "vm", 100, 10), LATE: beat("lab", "vm", 200, 300),
            DEAD: {**beat("lab", "old", 300, 2 * 86400), "last_error": "run 3: ssh: timeout"}}


def seed(runsdb: Any, now: dt.datetime | None = None) -> dt.datetime:
    """Fill ``runsdb`` with the runs and heartbeats above; return the time used."""
    now = now or utcnow()
    runsdb.insert_runs(seeded_runs(now))
    for daemon_id, doc in heartbeats(now).items():
        runsdb.write_heartbeat(daemon_id, doc)
    return now


def set_entry(runsdb: Any, run_id: Any, key: Any, fields: dict[str, Any]) -> None:
    """Put an entry into a given state directly (a test's stand-in for a crashed daemon)."""
    result = runsdb.runs.update_one({"_id": run_id, "data": key.elem_match()},
                                    {"$set": {f"data.$.{k}": v for k, v in fields.items()}})
    assert result.matched_count == 1
