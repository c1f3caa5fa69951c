"""``cax retry``: make stuck entries retryable at the next pass, recording who and when.

It never deletes data and never touches an entry under a live lease: each entry goes through
``RunsDB.reset_entry``, the one runs-DB transition for it (what that does for each kind of
stuck entry is documented there).  The entries are chosen by run (``--run``/``--name``) and
narrowed by site, data type and version, or are every stuck entry (``--all-stuck``, of one
site with ``--site``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from cax.config import Config
from cax.errors import ConfigError
from cax.runsdb import ERROR, PURGING, TRANSFERRING, EntryKey, RunsDB, safe_component
from cax.runsdb.stuck import StuckEntry


@dataclass(frozen=True)
class Target:
    """One entry chosen for a retry."""

    run_id: Any
    number: Any
    name: Any
    key: EntryKey
    status: str | None

    def label(self) -> str:
        return f"run {self.number} ({self.name}) {self.key}"


@dataclass
class RetryResult:
    """Entries made retryable, and those left alone with the reason."""

    reset: list[Target] = field(default_factory=list)
    left: list[tuple[Target, str]] = field(default_factory=list)


def targets_of_runs(db: RunsDB, *, number: int | None, name: str | None, site: str | None,
                    data_type: str | None, version: str | None) -> list[Target]:
    """The entries of the chosen run(s) that match the site, type and version given."""
    if number is None and name is None:
        raise ConfigError("retry: give --run, --name or --all-stuck")
    query: dict[str, Any] = {"number": number} if number is not None \
        else {"name": safe_component(name)}
    runs = db.find_runs(query)
    if not runs:
        raise ConfigError(f"retry: no run {number if number is not None else name!r} in the "
                          "runs DB")
    found = []
    for run in runs:
        for entry in run.get("data") or ():
            if not isinstance(entry, dict) or "host" not in entry or "type" not in entry:
                continue
            key = EntryKey.of(entry)
            if (site and key.host != site) or (data_type and key.type != data_type) or (
                    version and key.version != version):
                continue
            found.append(Target(run["_id"], run.get("number"), run.get("name"), key,
                                str(entry.get("status"))))
    return found


def targets_of_stuck(stuck: list[StuckEntry], *, site: str | None, data_type: str | None,
                     version: str | None) -> list[Target]:
    """The stuck entries (from ``cax.runsdb.stuck``) at ``site``, of the type/version given."""
    return [Target(e.run_id, e.number, e.name, e.key, e.status) for e in stuck
            if (not site or e.key.host == site) and (not data_type or e.key.type == data_type)
            and (not version or e.key.version == version)]


def retry(db: RunsDB, targets: list[Target], *, by: str, now: dt.datetime,
          stuck_keys: set[tuple[Any, EntryKey]] | None = None,
          dry_run: bool = False) -> RetryResult:
    """Reset each target (or, with ``dry_run``, only say which would be reset).

    ``stuck_keys`` (run id, key) are the entries known to be stuck; an ``error`` entry not
    among them is reset too (its retry is merely brought forward), other statuses are left.
    """
    result = RetryResult()
    for target in targets:
        stuck = stuck_keys is not None and (target.run_id, target.key) in stuck_keys
        if target.status not in (ERROR, TRANSFERRING, PURGING) or (
                target.status != ERROR and not stuck):
            result.left.append((target, f"{target.status}, not stuck"))
            continue
        if dry_run or db.reset_entry(target.run_id, target.key, by=by, now=now):
            result.reset.append(target)
        else:
            result.left.append((target, "changed meanwhile or under a live lease; not reset"))
    return result


def config_sites(config: Config) -> set[str]:
    return {site.name for site in config.sites}
