"""The runs DB: the only part of cax that talks to MongoDB (or its embedded stand-in)."""

from cax.runsdb.connect import open_runsdb
from cax.runsdb.entries import (
    ERROR,
    PURGING,
    STATUSES,
    TRANSFERRED,
    TRANSFERRING,
    VERIFYING,
    EntryKey,
    find_entry,
    run_label,
    safe_component,
)
from cax.runsdb.runs import RunsDB

__all__ = [
    "ERROR", "PURGING", "STATUSES", "TRANSFERRED", "TRANSFERRING", "VERIFYING", "EntryKey",
    "RunsDB", "find_entry", "open_runsdb", "run_label", "safe_component",
]
