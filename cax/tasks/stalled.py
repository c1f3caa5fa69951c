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
from cax.paths import entry_location, parse_scratch
from cax.runsdb import ERROR, PURGING, TRANSFERRING, EntryKey, run_label
from cax.tasks.base import Task
from cax.transport import siteops

log = logging.getLogger(__name__)

STALL_AFTER = dt.timedelta(hours=24)
STUCK_SHOWN = 50
_NO_LEASE = {"lease_owner": {"$exists": False}, "lease_expires": {"$exists": False}}
_STUCK_FIELDS = {"number": 1, "name": 1, "data.host": 1, "data.type": 1, "data.pax_version": 1,
                 "data.status": 1, "data.attempts": 1, "data.error": 1, "data.source": 1,
                 "data.next_attempt": 1, "data.lease_owner": 1, "data.lease_expires": 1}


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
    """Reset stalled legacy transfers and config errors, remove dead scratch data, report the
    stuck."""

    def hosts(self) -> list[str]:
        """This site and the daemon-less sites it pushes to: the entries it looks after."""
        pushed = [self.ctx.config.get_site(name) for name in self.site.upload_options]
        return [self.site.name] + [s.name for s in pushed if not s.runs_daemon]

    def cutoff(self) -> dt.datetime:
        return self.ctx.now() - STALL_AFTER

    def query(self) -> dict[str, Any] | None:
        legacy = {"host": {"$in": self.hosts()}, "status": TRANSFERRING, **_NO_LEASE}
        return {"$or": [
            {"data": {"$elemMatch": {**legacy, "creation_time": {"$lt": self.cutoff()}}}},
            {"data": {"$elemMatch": {**legacy, "creation_time": {"$exists": False}}}},
        ] + [{"data": {"$elemMatch": {**place, "status": ERROR,
                                      "error_kind": {"$in": ["config", "permanent"]},
                                      "config_hash": {"$exists": True,
                                                      "$ne": self.ctx.config_hash}}}}
             for place in ({"host": {"$in": self.hosts()}}, {"source": self.site.name})]}

    def each_run(self, run: dict[str, Any]) -> None:
        for entry in list(run.get("data") or ()):
            if self.stalled(entry):
                self.reset(run, entry)
            elif self.config_changed(entry):
                self.retry_config_error(run, entry)

    def stalled(self, entry: dict[str, Any]) -> bool:
        """Tell whether a lease-less ``transferring`` entry has not moved for a day.

        One without a creation time is judged by its data alone (missing data: stalled).
        """
        if entry.get("host") not in self.hosts() or entry.get("status") != TRANSFERRING \
                or "lease_owner" in entry or "lease_expires" in entry:
            return False
        latest = creation_time(entry)
        if entry["host"] == self.site.name:  # data still being written means it is alive
            try:
                changed = mtime_utc(entry_location(self.site, entry))
            except UnsafeNameError:
                changed = None
            latest = max(t for t in (latest, changed) if t) if latest or changed else None
        return latest is None or latest < self.cutoff()

    def reset(self, run: dict[str, Any], entry: dict[str, Any]) -> None:
        key = EntryKey.of(entry)
        if self.ctx.dry_run:
            log.info("dry run: would reset stalled %s to error", key)
            return
        claim = self.db.claim(run["_id"], key, owner=self.ctx.owner, statuses=[TRANSFERRING],
                              lease_s=self.ctx.config.lease_seconds, conditions=dict(_NO_LEASE),
                              count_attempt=False)
        if claim:
            self.db.record_failure(claim, "stalled: transferring for over 24 h (original cax)",
                                   kind="transient", retry_at=self.ctx.now(),
                                   fields={"attempts": 0, **self.resumable(entry)})
            log.info("%s: %s: stalled transfer -> error, to be redone", run_label(run), key)

    def resumable(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The original copied straight to the final path: keep those bytes for a method that
        resumes (the next copy hard-links them into its scratch, see CopyJob)."""
        if entry.get("host") != self.site.name:
            return {}
        try:
            path = entry_location(self.site, entry)
        except UnsafeNameError:
            return {}
        return {"partial": path} if os.path.exists(path) else {}

    def config_changed(self, entry: dict[str, Any]) -> bool:
        mine = entry.get("host") in self.hosts() or entry.get("source") == self.site.name
        return (mine and entry.get("status") == ERROR
                and entry.get("error_kind") in ("config", "permanent")
                and entry.get("config_hash") not in (None, self.ctx.config_hash))

    def retry_config_error(self, run: dict[str, Any], entry: dict[str, Any]) -> None:
        """An error retrying alone cannot fix: retried once, when the configuration changed."""
        key = EntryKey.of(entry)
        if self.ctx.dry_run:
            log.info("dry run: would retry %s (the configuration changed)", key)
        elif self.db.reset_entry(run["_id"], key, by=f"{self.ctx.owner} (configuration changed)"):
            log.info("%s: %s: the configuration changed; retrying after: %s", run_label(run),
                     key, entry.get("error"))

    def finish(self) -> None:
        self.remove_scratch()
        self.report_stuck()

    # -- scratch leftovers --------------------------------------------------------------------

    def scratch_dirs(self) -> list[str]:
        dirs = [posixpath.normpath(d) for d in (self.site.dir_raw, self.site.dir_processed) if d]
        if self.site.dir_processed and os.path.isdir(self.site.dir_processed):
            dirs += [posixpath.normpath(e.path) for e in os.scandir(self.site.dir_processed)
                     if e.name.startswith("pax_") and e.is_dir(follow_symlinks=False)]
        return dirs

    def scratches(self) -> list[tuple[str, str, str | None]]:
        """Return (scratch path, final path, token) of every scratch in this site's data dirs."""
        found = []
        for directory in self.scratch_dirs():
            if not os.path.isdir(directory):
                continue
            for item in os.scandir(directory):
                parsed = parse_scratch(item.name)
                if parsed:
                    found.append((posixpath.join(directory, item.name),
                                  posixpath.join(directory, parsed[0]), parsed[1]))
        return found

    def in_use(self, entry: dict[str, Any] | None, path: str, token: str | None) -> bool:
        """Whether an entry works in, or will resume from, this scratch.

        In use: the entry's lease token names it (live or expired: the next owner may resume
        from it), or a failed attempt left it as ``partial`` for a retry that is still due.
        """
        if entry is None:
            return False
        if token and entry.get("lease_token") == token:
            return True
        if entry.get("partial") and posixpath.normpath(entry["partial"]) == path:
            stuck = int(entry.get("attempts") or 0) >= self.site.max_attempts
            return entry.get("status") in (ERROR, TRANSFERRING) and not (
                entry.get("status") == ERROR and (stuck or entry.get("next_attempt") is None)
                and not entry.get("checksum_problem"))
        return False

    def remove_scratch(self) -> None:
        found = self.scratches()
        if not found:
            return
        places = sorted({p for _, final, _ in found for p in (final, final + "/")})
        query = {"data": {"$elemMatch": {"host": self.site.name, "location": {"$in": places}}}}
        entries: dict[str, list[dict[str, Any]]] = {}
        for run in self.db.find_runs(self.selected(query)):
            for e in run.get("data") or ():
                if e.get("host") == self.site.name and e.get("location") in places:
                    entries.setdefault(posixpath.normpath(e["location"]), []).append(e)
        for scratch, final, token in found:
            owners = entries.get(final, [])
            if (not owners and self.ctx.selector) or any(self.in_use(e, scratch, token)
                                                         for e in owners):
                continue  # with --run/--name, other runs are not ours to judge
            state = owners[0].get("status") if owners else "no entry"
            if self.ctx.dry_run:
                log.info("dry run: would remove scratch data %s (%s)", scratch, state)
                continue
            try:
                siteops.remove(scratch)
            except OSError as exc:
                log.error("cannot remove scratch data %s: %s", scratch, exc)
                continue
            log.info("removed scratch data %s (%s)", scratch, state)

    # -- stuck work ----------------------------------------------------------------------------

    def report_stuck(self) -> None:
        """Log, in one WARNING, every entry that no task will retry: at the sites this daemon
        looks after, and at other sites when the copy comes from here (their admin cannot fix
        this site's problem)."""
        hosts, now = self.hosts(), self.ctx.now()
        dead = now - dt.timedelta(seconds=2 * self.ctx.config.lease_seconds)
        where: list[dict[str, Any]] = [{"host": {"$in": hosts}}, {"source": self.site.name}]
        query = {"$or": [
            {"data": {"$elemMatch": {**place, "status": ERROR, **condition}}}
            for place in where for condition in (
                {"attempts": {"$gte": self.site.max_attempts}},
                {"next_attempt": {"$exists": True, "$eq": None}})] + [
            {"data": {"$elemMatch": {**place, "status": {"$in": [TRANSFERRING, PURGING]},
                                     "lease_expires": {"$lt": dead}}}} for place in where]}
        runs = self.db.find_runs(self.selected(query), projection=_STUCK_FIELDS,
                                 limit=STUCK_SHOWN + 1)
        lines = [f"{run_label(run)} {EntryKey.of(e)}: {self.why_stuck(e)}"
                 for run in runs[:STUCK_SHOWN] for e in run.get("data") or ()
                 if self.is_stuck(e, hosts, dead)]
        if lines:
            more = " (and more runs)" if len(runs) > STUCK_SHOWN else ""
            log.warning("%d stuck entr%s, not retried automatically%s (`cax status --stuck`; "
                        "`cax retry` retries them):\n  %s", len(lines),
                        "y" if len(lines) == 1 else "ies", more, "\n  ".join(lines))

    def is_stuck(self, e: dict[str, Any], hosts: list[str], dead: dt.datetime) -> bool:
        if e.get("host") not in hosts and e.get("source") != self.site.name:
            return False
        if e.get("status") == ERROR:
            return (int(e.get("attempts") or 0) >= self.site.max_attempts
                    or ("next_attempt" in e and e.get("next_attempt") is None))
        expires = e.get("lease_expires")
        return (e.get("status") in (TRANSFERRING, PURGING) and isinstance(expires, dt.datetime)
                and as_utc(expires) < dead)

    @staticmethod
    def why_stuck(e: dict[str, Any]) -> str:
        if e.get("status") == ERROR:
            return e.get("error") or "no reason recorded"
        return (f"{e.get('status')} under a lease of {e.get('lease_owner')} that expired at "
                f"{as_utc(e['lease_expires']):%Y-%m-%d %H:%M:%S} UTC; nobody took it over")

    def selected(self, query: dict[str, Any]) -> dict[str, Any]:
        return {"$and": [query, self.ctx.selector]} if self.ctx.selector else query
