"""What waits for a person: the entries no daemon will move on by itself.

An entry is *stuck* when it is

* ``error`` and not retried automatically: its attempts are used up (``attempts`` >= the
  site's ``max_attempts``), no retry is scheduled (``next_attempt`` explicitly null), or its
  ``error_kind`` is ``permanent`` or ``config`` (a config error is retried once the site's
  configuration changes -- which is a person's job too);
* ``error`` raw data with nothing to retry from: no other copy of the run's raw data is
  verified or being checked, so no copy can fetch it again (a run registered at a wrong
  location: its first read found nothing there, and no attempt will ever count);
* ``transferring`` or ``purging`` under a lease that expired: the daemon holding it died or
  lost the runs DB, and the work waits for a daemon of that site to take it over;
* ``transferring`` without any lease for over a day: a transfer of the original cax that
  stalled (at a tape site, whose configuration runs no RetryStalledTransfer, nothing else
  would ever notice);
* marked ``disputed``: copies whose own recorded checksums verify disagree about what the
  dataset's bytes are, and only a person can say which is right.

Two indexed queries (``data.status``) find them over every site; the entries are then
filtered here with each site's own ``max_attempts``.  Seen from one site, the stuck entries
are its own and those at other sites that fail because of it: copies made from it (``source``)
and copies found to differ from its reference (``checksum_problem``).  Each comes with the
exact ``cax retry`` command that makes it retryable at the next pass.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cax.clock import as_utc, when
from cax.runsdb.entries import (
    ERROR,
    PURGING,
    TRANSFERRED,
    TRANSFERRING,
    VERIFYING,
    EntryKey,
)
from cax.runsdb.runs import RunsDB

#: Failure kinds that are never retried automatically.
WAITING_KINDS = ("permanent", "config")
#: The states of a copy another copy can be made from (or soon can: being checked).
SOURCE_STATES = (TRANSFERRED, VERIFYING)
#: Default ``max_attempts`` of a site the configuration does not know (the schema default).
DEFAULT_MAX_ATTEMPTS = 5
#: A lease-less ``transferring`` entry of the original older than this has stalled.
STALLED = dt.timedelta(hours=24)
#: Runs fetched by one stuck query at most (their count is reported when more match).
RUNS_LIMIT = 5000
_FIELDS = {"number": 1, "name": 1, "detector": 1, "start": 1, "data": 1}


@dataclass(frozen=True)
class StuckEntry:
    """One stuck entry: where it is, why it waits, whose it is and how to retry it."""

    run_id: Any
    number: Any
    name: Any
    key: EntryKey
    status: str | None  # None: a disputed entry the runs DB holds without one
    kind: str  # attempts | no-retry | permanent | config | no-source | dead-lease | disputed
    reason: str
    source: str | None = None
    reference: str | None = None
    attempts: int = 0
    lease_owner: str | None = None

    def concerns(self, site: str) -> bool:
        """Whether ``site`` is involved: the entry is there, or was copied or judged from it."""
        return site in (self.key.host, self.source, self.reference)

    def because_of(self, site: str) -> str | None:
        """Why an entry at another site concerns ``site``; None if it is ``site``'s own."""
        if self.key.host == site:
            return None
        if self.source == site:
            return f"copied from {site}"
        return f"differs from the reference at {site}"

    def command(self, prefix: str = "cax") -> str:
        """The ``cax retry`` command line that makes this entry retryable at the next pass."""
        which = f"--run {self.number}" if isinstance(self.number, int) else f"--name {self.name}"
        version = f" --version {self.key.version}" if self.key.version else ""
        return f"{prefix} retry {which} --site {self.key.host} --type {self.key.type}{version}"

    def as_dict(self, prefix: str = "cax") -> dict[str, Any]:
        return {"run": self.number, "name": self.name, "site": self.key.host,
                "type": self.key.type, "version": self.key.version, "status": self.status,
                "kind": self.kind, "reason": self.reason, "source": self.source,
                "reference": self.reference, "attempts": self.attempts,
                "lease_owner": self.lease_owner, "command": self.command(prefix)}


def error_reason(entry: dict[str, Any], max_attempts: int) -> tuple[str, str] | None:
    """Return (kind, reason) if the ``error`` entry is not retried automatically, else None."""
    error = entry.get("error") or "no reason recorded"
    attempts = int(entry.get("attempts") or 0)
    kind = entry.get("error_kind")
    if kind == "permanent":
        return "permanent", f"permanent error, not retried: {error}"
    if kind == "config":
        return "config", f"configuration error, waits for a config change: {error}"
    if attempts >= max_attempts:
        return "attempts", f"{attempts} attempt(s), none left (max_attempts {max_attempts}): " \
                           f"{error}"
    if "next_attempt" in entry and entry["next_attempt"] is None:
        return "no-retry", f"no retry scheduled: {error}"
    return None


def no_source_reason(run: dict[str, Any], entry: dict[str, Any]) -> tuple[str, str] | None:
    """Return (kind, reason) if the raw ``error`` entry has no copy left to be fetched from."""
    if entry.get("type") != "raw":
        return None  # processed data are made again by processing
    for other in run.get("data") or ():
        if isinstance(other, dict) and other is not entry and other.get("type") == "raw" \
                and other.get("status") in SOURCE_STATES:
            return None
    error = entry.get("error") or "no reason recorded"
    return "no-source", f"no verified copy of these raw data elsewhere to fetch them from: " \
                        f"{error}"


def lease_reason(entry: dict[str, Any], now: dt.datetime,
                 daemon_states: Mapping[str, str]) -> str | None:
    """Return why a ``transferring``/``purging`` entry waits, if its lease expired (or, a
    transfer of the original's, it has none and stalled)."""
    expires = entry.get("lease_expires")
    if expires is None and "lease_owner" not in entry and entry.get("status") == TRANSFERRING:
        created = entry.get("creation_time")
        created = min((c for c in created if isinstance(c, dt.datetime)), default=None) \
            if isinstance(created, list) else created
        if not isinstance(created, dt.datetime) or as_utc(created) < now - STALLED:
            return f"transferring without a lease since {when(created)}: a transfer of the " \
                   "original cax that stalled"
        return None
    if not isinstance(expires, dt.datetime) or as_utc(expires) >= now:
        return None
    owner = entry.get("lease_owner") or "an unknown daemon"
    state = daemon_states.get(owner, "without heartbeat")
    return f"{entry.get('status')} under a lease of {owner} ({state}) that expired " \
           f"{when(expires)}"


def find_stuck(db: RunsDB, now: dt.datetime, *, max_attempts: Mapping[str, int] | None = None,
               daemon_states: Mapping[str, str] | None = None, site: str | None = None,
               selector: dict[str, Any] | None = None) -> list[StuckEntry]:
    """Return every stuck entry (concerning ``site`` when given), newest runs first.

    ``max_attempts`` maps site names to their limit; ``daemon_states`` maps lease owners
    (daemon ids) to alive/late/dead for the reasons.  ``selector`` narrows the runs.
    """
    limits = dict(max_attempts or {})
    states = daemon_states or {}
    lowest = min([*limits.values(), DEFAULT_MAX_ATTEMPTS])
    errors = {"$or": [
        {"data": {"$elemMatch": {"status": ERROR, "$or": [
            {"attempts": {"$gte": lowest}}, {"next_attempt": {"$exists": True, "$eq": None}},
            {"error_kind": {"$in": list(WAITING_KINDS)}}]}}},
        {"data": {"$elemMatch": {"status": ERROR, "type": "raw"}}},  # no source left?
        {"data": {"$elemMatch": {"disputed": {"$exists": True}}}}]}
    leases = {"$or": [
        {"data": {"$elemMatch": {"status": {"$in": [TRANSFERRING, PURGING]},
                                 "lease_expires": {"$lt": now}}}},
        {"data": {"$elemMatch": {  # the original's, without any lease, stalled
            "status": TRANSFERRING, "lease_expires": {"$exists": False},
            "lease_owner": {"$exists": False},
            "$or": [{"creation_time": {"$exists": False}},
                    {"creation_time": {"$lt": now - STALLED}}]}}}]}
    found: list[StuckEntry] = []
    seen: set[tuple[Any, EntryKey]] = set()
    for query in (errors, leases):
        full = {"$and": [query, selector]} if selector else query
        for run in db.find_runs(full, projection=_FIELDS, limit=RUNS_LIMIT):
            for entry in _stuck_in(run, now, limits, states):
                if (entry.run_id, entry.key) in seen:
                    continue
                seen.add((entry.run_id, entry.key))
                if site is None or entry.concerns(site):
                    found.append(entry)
    return found


def _stuck_in(run: dict[str, Any], now: dt.datetime, limits: Mapping[str, int],
              states: Mapping[str, str]) -> Iterable[StuckEntry]:
    for entry in run.get("data") or ():
        if not isinstance(entry, dict) or "host" not in entry or "type" not in entry:
            continue
        status = entry.get("status")
        judged: tuple[str, str] | None
        if entry.get("disputed"):
            judged = ("disputed", f"disputed: {entry['disputed']}; keep the right copy and "
                      "unregister the other with `cax run remove` (its data stay in place)")
        elif status == ERROR:
            judged = error_reason(entry, limits.get(entry["host"], DEFAULT_MAX_ATTEMPTS)) \
                or no_source_reason(run, entry)
        elif status in (TRANSFERRING, PURGING):
            reason = lease_reason(entry, now, states)
            judged = ("dead-lease", reason) if reason else None
        else:
            judged = None
        if judged is None:
            continue
        yield StuckEntry(
            run_id=run["_id"], number=run.get("number"), name=run.get("name"),
            key=EntryKey.of(entry), status=status, kind=judged[0], reason=judged[1],
            source=entry.get("source"), reference=entry.get("checksum_problem"),
            attempts=int(entry.get("attempts") or 0), lease_owner=entry.get("lease_owner"))
