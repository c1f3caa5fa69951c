"""The vocabulary of ``data[]`` entries: statuses, identity, and safe names.

A run document keeps the original cax shape: ``number``, ``name``, ``detector``, ``start``,
``tags`` and ``data``, a list with one entry per copy of a dataset at a site.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cax.errors import UnsafeNameError

#: Status of an entry: work on it is under way (copy, processing); it holds a lease.
TRANSFERRING = "transferring"
#: The data is in place and awaits its checksum at the site that holds it.
VERIFYING = "verifying"
#: The copy is complete and its checksum was verified and recorded: the only good state.
TRANSFERRED = "transferred"
#: The last attempt failed; ``error`` says why, ``attempts`` how often, ``next_attempt`` when.
ERROR = "error"
#: The copy is being deleted; it no longer counts as a copy.
PURGING = "purging"

STATUSES = (TRANSFERRING, VERIFYING, TRANSFERRED, ERROR, PURGING)

#: Names of runs and datasets become path components; anything else is refused.
SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class EntryKey:
    """Identity of a copy: site, data type and (for processed data) processor version.

    Updates match an entry by this identity, never by a snapshot of all its fields, so that a
    concurrent change to another field cannot make them silently match nothing.
    """

    host: str
    type: str
    version: str | None = None

    @classmethod
    def of(cls, entry: dict[str, Any]) -> EntryKey:
        version = entry.get("pax_version") if entry.get("type") != "raw" else None
        return cls(entry["host"], entry["type"], version)

    def match(self) -> dict[str, Any]:
        """Return the conditions that select this entry inside ``$elemMatch``."""
        cond: dict[str, Any] = {"host": self.host, "type": self.type}
        if self.version is not None:
            cond["pax_version"] = self.version
        return cond

    def elem_match(self, **conditions: Any) -> dict[str, Any]:
        """Return ``{"$elemMatch": ...}`` selecting this entry, with further ``conditions``."""
        return {"$elemMatch": {**self.match(), **conditions}}

    def __str__(self) -> str:
        return f"{self.type}{'@' + self.version if self.version else ''} at {self.host}"


def find_entry(run: dict[str, Any], key: EntryKey) -> dict[str, Any] | None:
    """Return the entry of ``run`` with identity ``key``, or None."""
    for entry in run.get("data") or ():
        if entry.get("host") == key.host and entry.get("type") == key.type and (
                key.version is None or entry.get("pax_version") == key.version):
            return entry
    return None


def dataset_stem(run: dict[str, Any]) -> str:
    """The name every dataset of ``run`` has at every site, before any extension: the run's
    name, plus ``_MV`` for the muon veto (as the original cax named them)."""
    name = safe_component(run.get("name"), "run name")
    return name + ("_MV" if run.get("detector") == "muon_veto" else "")


def check_dataset_name(run: dict[str, Any], location: str) -> str:
    """Return the last component of ``location`` if it names ``run``'s dataset (its stem, or
    the stem with an extension such as ``.root``); raise UnsafeNameError otherwise.

    Invariant (b) of the ledger: a location names its own run's data, so no entry can point at
    another run's bytes.
    """
    stem = dataset_stem(run)
    base = location.rstrip("/").rsplit("/", 1)[-1] if isinstance(location, str) else ""
    if base == stem or (base.startswith(stem + ".") and SAFE_COMPONENT.match(base)):
        return base
    raise UnsafeNameError(f"location {str(location)[:200]!r} does not belong to "
                          f"{run_label(run)}: its dataset must be named {stem}")


def place_key(host: Any, location: str) -> str:
    """One place, as the run document's ``places`` list and its unique index hold it: the host
    and the location, without the final slash the original sometimes kept."""
    return f"{host}\t{location.rstrip('/')}"


def run_label(run: dict[str, Any]) -> str:
    """Return how logs name a run: its number and name."""
    return f"run {run.get('number', '?')} ({run.get('name', '?')})"


def safe_component(value: Any, what: str = "run name") -> str:
    """Return ``value`` if it can be used as one path component; raise UnsafeNameError.

    Run names come from the runs DB; a name like ``../..`` must never reach a path.
    """
    if not isinstance(value, str) or not SAFE_COMPONENT.match(value) or value in (".", ".."):
        raise UnsafeNameError(f"refusing unsafe {what} {value!r}")
    return value


def entry_filter(key: EntryKey) -> list[dict[str, Any]]:
    """``arrayFilters`` naming the entry ``key`` as ``e`` (its identity is unique in a run)."""
    return [{f"e.{name}": value for name, value in key.match().items()}]


def at_entry(update: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``update`` with its paths (relative to the entry) under ``data.$[e]``."""
    return {op: {f"data.$[e].{name}": value for name, value in fields.items()}
            for op, fields in update.items() if fields}
