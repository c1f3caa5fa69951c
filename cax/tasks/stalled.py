"""RetryStalledTransfer: unblock what the original cax left stuck, clean up, report the rest.

* Entries written by the original cax (no lease fields) that have been ``transferring`` for
  more than a day become ``error`` (due now) so the copy tasks redo them: at this site, and at
  the sites without a daemon (tape, grid) that this site pushes to, which the original left
  blocked forever.  Ages are UTC throughout: the original compared a local-time mtime with
  ``utcnow()``, so in Chicago live transfers looked six hours older than they were.
* Hidden ``*.cax-partial`` leftovers under this site's data directories are removed once no
  transfer can resume into them: their entry is ``transferred``, gone, or stuck in ``error``.
* ``error`` entries that will not be retried any more are listed in one WARNING per pass.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import posixpath
from typing import Any

from cax.clock import UTC, as_utc
from cax.errors import UnsafeNameError
from cax.paths import PARTIAL_SUFFIX, checked_location
from cax.runsdb import ERROR, TRANSFERRED, TRANSFERRING, EntryKey, run_label
from cax.tasks.base import Task
from cax.transport import siteops

log = logging.getLogger(__name__)

STALL_AFTER = dt.timedelta(hours=24)
STUCK_SHOWN = 50
_NO_LEASE = {"lease_owner": {"$exists": False}, "lease_expires": {"$exists": False}}
_STUCK_FIELDS = {"number": 1, "name": 1, "data.host": 1, "data.type": 1, "data.pax_version": 1,
                 "data.status": 1, "data.attempts": 1, "data.error": 1}


def creation_time(entry: dict[str, Any]) -> dt.datetime | None:
    """Return an entry's creation time in UTC; legacy entries may hold a one-element list."""
    value = entry.get("creation_time")
    if isinstance(value, list):
        value = min((v for v in value if isinstance(v, dt.datetime)), default=None)
    return as_utc(value) if isinstance(value, dt.datetime) else None


def mtime_utc(path: str) -> dt.datetime | None:
    """Return the modification time of ``path`` as an aware UTC datetime (None if missing)."""
    try:
        return dt.datetime.fromtimestamp(os.stat(path).st_mtime, tz=UTC)
    except FileNotFoundError:
        return None


class RetryStalledTransfer(Task):
    """Reset stalled legacy transfers, remove dead partial copies, report stuck errors."""

    def hosts(self) -> list[str]:
        """This site and the daemon-less sites it pushes to: the entries it looks after."""
        pushed = [self.ctx.config.get_site(name) for name in self.site.upload_options]
        return [self.site.name] + [s.name for s in pushed if not s.runs_daemon]

    def cutoff(self) -> dt.datetime:
        return self.ctx.now() - STALL_AFTER

    def query(self) -> dict[str, Any] | None:
        return {"data": {"$elemMatch": {"host": {"$in": self.hosts()}, "status": TRANSFERRING,
                                        **_NO_LEASE,
                                        "creation_time": {"$lt": self.cutoff()}}}}

    def each_run(self, run: dict[str, Any]) -> None:
        for entry in list(run.get("data") or ()):
            if self.stalled(entry):
                self.reset(run, entry)

    def stalled(self, entry: dict[str, Any]) -> bool:
        """Tell whether a lease-less ``transferring`` entry has not moved for a day."""
        created = creation_time(entry)
        if entry.get("host") not in self.hosts() or entry.get("status") != TRANSFERRING \
                or "lease_owner" in entry or "lease_expires" in entry or created is None:
            return False
        latest = created
        if entry["host"] == self.site.name:  # data still being written means it is alive
            try:
                path = checked_location(self.site, entry.get("type", ""), entry.get("location"))
                latest = max(latest, mtime_utc(path) or latest)
            except UnsafeNameError:
                pass
        return latest < self.cutoff()

    def reset(self, run: dict[str, Any], entry: dict[str, Any]) -> None:
        key, now = EntryKey.of(entry), self.ctx.now()
        if self.ctx.dry_run:
            log.info("dry run: would reset stalled %s to error", key)
            return
        if not self.db.claim_entry(run["_id"], key, statuses=[TRANSFERRING], owner=self.ctx.owner,
                                   now=now, lease_s=self.ctx.config.lease_seconds,
                                   conditions=dict(_NO_LEASE)):
            return
        fields = {"status": ERROR, "error": "stalled: transferring for over 24 h (original cax)",
                  "attempts": 0, "next_attempt": now, "modified_time": now}
        self.db.update_entry(run["_id"], key, fields, owner=self.ctx.owner, release=True)
        log.info("%s: %s: stalled transfer -> error, to be redone", run_label(run), key)

    def finish(self) -> None:
        self.remove_partials()
        self.report_stuck()

    # -- partial leftovers --------------------------------------------------------------------

    def partials(self) -> list[tuple[str, str]]:
        """Return (partial path, final path) of every partial copy in this site's data dirs."""
        dirs = [d for d in (self.site.dir_raw, self.site.dir_processed) if d]
        if self.site.dir_processed and os.path.isdir(self.site.dir_processed):
            dirs += [e.path for e in os.scandir(self.site.dir_processed)
                     if e.name.startswith("pax_") and e.is_dir(follow_symlinks=False)]
        found = []
        for directory in dirs:
            if not os.path.isdir(directory):
                continue
            for item in os.scandir(directory):
                if item.name.startswith(".") and item.name.endswith(PARTIAL_SUFFIX):
                    final = item.name[1:-len(PARTIAL_SUFFIX)]
                    found.append((item.path, posixpath.join(directory, final)))
        return found

    def removable(self, entry: dict[str, Any] | None) -> bool:
        """No transfer will resume into the partial copy of this entry."""
        if entry is None or entry.get("status") == TRANSFERRED:
            return True
        stuck = int(entry.get("attempts") or 0) >= self.site.max_attempts
        return entry.get("status") == ERROR and stuck

    def remove_partials(self) -> None:
        found = self.partials()
        if not found:
            return
        places = [p for _, final in found for p in (final, final + "/")]
        query = {"data": {"$elemMatch": {"host": self.site.name, "location": {"$in": places}}}}
        entries = {e["location"].rstrip("/"): e
                   for run in self.db.find_runs(self.selected(query))
                   for e in run.get("data") or ()
                   if e.get("host") == self.site.name and e.get("location") in places}
        for partial, final in found:
            entry = entries.get(final)
            if (entry is None and self.ctx.selector) or not self.removable(entry):
                continue  # other runs are not ours to judge with --run/--name
            state = entry.get("status") if entry else "no entry"
            if self.ctx.dry_run:
                log.info("dry run: would remove partial copy %s (%s)", partial, state)
                continue
            try:
                siteops.remove(partial)
            except OSError as exc:
                log.error("cannot remove partial copy %s: %s", partial, exc)
                continue
            log.info("removed partial copy %s (%s)", partial, state)

    # -- stuck errors ---------------------------------------------------------------------------

    def report_stuck(self) -> None:
        """Log every entry in ``error`` that no task will retry, in one WARNING."""
        hosts = self.hosts()
        query = {"data": {"$elemMatch": {"host": {"$in": hosts}, "status": ERROR,
                                         "attempts": {"$gte": self.site.max_attempts}}}}
        runs = self.db.find_runs(self.selected(query), projection=_STUCK_FIELDS,
                                 limit=STUCK_SHOWN + 1)
        lines = [f"{run_label(run)} {EntryKey.of(e)}: {e.get('error') or 'no reason recorded'}"
                 for run in runs[:STUCK_SHOWN] for e in run.get("data") or ()
                 if e.get("host") in hosts and e.get("status") == ERROR
                 and int(e.get("attempts") or 0) >= self.site.max_attempts]
        if lines:
            more = " (and more runs)" if len(runs) > STUCK_SHOWN else ""
            log.warning("%d stuck entr%s, not retried automatically%s:\n  %s", len(lines),
                        "y" if len(lines) == 1 else "ies", more, "\n  ".join(lines))

    def selected(self, query: dict[str, Any]) -> dict[str, Any]:
        return {"$and": [query, self.ctx.selector]} if self.ctx.selector else query
