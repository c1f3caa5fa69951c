"""The judgement of one copy: good, due for a copy, due for a retry, due for repair.

Each test exists twice: as a Python predicate on an entry already fetched, and as the
``$elemMatch`` conditions a task puts in its runs-DB query, so that an idle pass fetches no run
documents.  They live together so that the two cannot drift apart, and so that copy, repair,
tape and purge ask one place instead of each other.

A copy is *good* when it is ``transferred``, not flagged, and its recorded checksum equals its
dataset's origin (``origins.judge``): never because of the site it is at.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cax.clock import as_utc
from cax.runsdb.entries import ERROR, TRANSFERRED, TRANSFERRING, EntryKey, find_entry
from cax.runsdb.origins import Judgement, judge

#: Statuses of an entry a repair may claim (``transferring``: its repairer died).
REPAIRABLE = (ERROR, TRANSFERRING)
#: Entry fields that mark a copy as differing from its origin and waiting for repair.
PROBLEM_FIELDS = ("checksum_problem", "expected_checksum")


def retry_due(now: dt.datetime) -> dict[str, Any]:
    """Condition on an entry whose retry is due: ``next_attempt`` passed, or never set (the
    original cax's errors).  An explicit null means no automatic retry: it waits for a person
    or for the configuration to change."""
    return {"$or": [{"next_attempt": {"$exists": False}}, {"next_attempt": {"$lte": now}}]}


def is_retry_due(entry: dict[str, Any], now: dt.datetime) -> bool:
    """The Python twin of ``retry_due``."""
    if "next_attempt" not in entry:
        return True
    due = entry["next_attempt"]
    return isinstance(due, dt.datetime) and as_utc(due) <= now


def retry_conditions(max_attempts: int, now: dt.datetime) -> dict[str, Any]:
    """Conditions on an ``error`` entry whose next attempt is due and not yet stuck."""
    return {"attempts": {"$not": {"$gte": max_attempts}}, **retry_due(now)}


def needs_copy_query(key: EntryKey, max_attempts: int, now: dt.datetime) -> list[dict]:
    """Query parts: the destination ``key`` has no entry, a due retry, or a dead lease (a bad
    copy excepted: it is repaired file by file, not copied again whole)."""
    return [
        {"data": {"$not": key.elem_match()}},
        {"data": key.elem_match(status=ERROR, checksum_problem={"$exists": False},
                                **retry_conditions(max_attempts, now))},
        {"data": key.elem_match(status=TRANSFERRING, checksum_problem={"$exists": False},
                                lease_expires={"$lt": now})},
    ]


def needs_copy(entry: dict[str, Any] | None, max_attempts: int, now: dt.datetime) -> bool:
    """The Python twin of ``needs_copy_query``."""
    if entry is None:
        return True
    if entry.get("checksum_problem"):
        return False
    status = entry.get("status")
    if status == ERROR:
        return int(entry.get("attempts") or 0) < max_attempts and is_retry_due(entry, now)
    expires = entry.get("lease_expires")
    return status == TRANSFERRING and expires is not None and as_utc(expires) < now


def repair_conditions(max_attempts: int, now: dt.datetime) -> dict[str, Any]:
    """Conditions on an entry due for repair: marked, lease free, and either an ``error``
    whose retry is due or a ``transferring`` whose repairer died (its lease expired; the
    claim counts that attempt and gives up when none are left)."""
    return {"status": {"$in": list(REPAIRABLE)}, "checksum_problem": {"$exists": True},
            "lease_expires": {"$not": {"$gt": now}}, **retry_due(now),
            "$nor": [{"status": ERROR, "attempts": {"$gte": max_attempts}}]}


def repair_due(entry: dict[str, Any], max_attempts: int, now: dt.datetime) -> bool:
    """The Python twin of ``repair_conditions``."""
    lease = entry.get("lease_expires")
    spent = entry.get("status") == ERROR and int(entry.get("attempts") or 0) >= max_attempts
    return (entry.get("status") in REPAIRABLE and bool(entry.get("checksum_problem"))
            and not spent and is_retry_due(entry, now)
            and (lease is None or as_utc(lease) <= now))


def is_good(judgement: Judgement, entry: dict[str, Any] | None) -> bool:
    """Whether ``entry`` is a verified copy whose bytes are its dataset's origin's."""
    if not entry:
        return False
    return entry.get("status") == TRANSFERRED and not entry.get("checksum_problem") \
        and not entry.get("disputed") and judgement.agrees(entry)


def good_entry(run: dict[str, Any], key: EntryKey) -> dict[str, Any] | None:
    """The entry ``key`` of ``run`` if it is a good copy (see ``is_good``), else None."""
    entry = find_entry(run, key)
    return entry if is_good(judge(run, key.type, key.version), entry) else None
