"""Scrub: re-read old copies from disk, so that bit rot is found before anyone needs the data.

Local ``transferred`` copies last verified more than ``scrub_after_days`` ago (or never, for
entries of the original cax) are re-checksummed, oldest first, at most
``scrub_bytes_per_pass`` bytes per pass (0: off).  A copy that changed goes the way of any bad
copy (``repair.mark_bad_copy``): compared with the reference copy if there is one, else with
its own recorded checksums; repaired file by file from a good copy, or flagged and kept.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from cax.checksum import (
    Manifest,
    diff_manifests,
)
from cax.clock import UTC, as_utc
from cax.errors import CaxError
from cax.runsdb import TRANSFERRED, EntryKey, run_label
from cax.runsdb.origins import DISK, SELF, judge, rank
from cax.schema import DATA_TYPES
from cax.tasks.checksum import UNREADABLE, ChecksumTask, describe_files, kind_of
from cax.transport import siteops

log = logging.getLogger(__name__)


class Scrub(ChecksumTask):
    """Re-checksum old local copies from disk, oldest first, within a byte budget per pass."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.due: list[tuple[dt.datetime, dict[str, Any], dict[str, Any]]] = []

    def cutoff(self) -> dt.datetime:
        return self.ctx.now() - dt.timedelta(days=self.site.scrub_after_days)

    def query(self) -> dict[str, Any] | None:
        if not self.site.scrub_bytes_per_pass:
            return None
        types = [t for t in DATA_TYPES if self.site.data_dir(t)]
        return {"data": {"$elemMatch": {"host": self.site.name, "status": TRANSFERRED,
                                        "type": {"$in": types},
                                        "verified_time": {"$not": {"$gte": self.cutoff()}}}}}

    def each_run(self, run: dict[str, Any]) -> None:
        """Collect the copies due; ``finish`` scrubs the oldest of all runs first."""
        cutoff, oldest = self.cutoff(), dt.datetime.min.replace(tzinfo=UTC)
        for entry in self.local_entries(run, TRANSFERRED):
            verified = entry.get("verified_time")
            verified = as_utc(verified) if isinstance(verified, dt.datetime) else oldest
            if verified < cutoff:
                self.due.append((verified, run, entry))

    def finish(self) -> None:
        budget = left = self.site.scrub_bytes_per_pass
        for _, run, entry in sorted(self.due, key=lambda item: item[0]):
            size = self.size(entry)
            if size > budget:
                log.warning("%s: %s (%d bytes) is larger than scrub_bytes_per_pass; not "
                            "scrubbed", run_label(run), EntryKey.of(entry), size)
            elif size <= left:
                left -= size
                try:
                    self.scrub(run, entry)
                except CaxError as exc:
                    log.error("%s: scrubbing %s: %s", run_label(run), EntryKey.of(entry), exc)

    def size(self, entry: dict[str, Any]) -> int:
        """Return the recorded size of a copy, or measure it (legacy entries have none)."""
        if isinstance(entry.get("size"), int) and entry["size"] > 0:
            return entry["size"]
        try:
            return int(siteops.stat_tree(self.path(entry))["size"])
        except UNREADABLE:
            return 0  # scrub finds out and records what is wrong with it

    def scrub(self, run: dict[str, Any], entry: dict[str, Any]) -> None:
        key, recorded = EntryKey.of(entry), entry.get("checksum")
        if self.ctx.dry_run:
            log.info("dry run: would re-checksum %s", key)
            return
        if not self.claim(run, entry, TRANSFERRED):
            return
        reading = self.read(run, entry, kind_of(recorded))
        if reading is None:
            return
        now = self.ctx.now()
        if not recorded:  # a legacy copy registered without a checksum: what is there now
            fields = self.good_fields(run, entry, reading, DISK)
            self.release(run, entry, {**fields, "verified_time": now})
        elif not kind_of(recorded):
            log.error("%s: %s has a checksum cax cannot verify (%r); left as it is",
                      run_label(run), key, str(recorded)[:40])
            self.release(run, entry, {"verified_time": now})
        elif reading.value(kind_of(recorded)) == recorded:
            fields = {"verified_time": now}
            if rank(entry) == 1:  # the original's checksum, now verified by cax
                fields["evidence"] = SELF
            self.release(run, entry, fields)
            log.info("%s: %s re-verified from disk", run_label(run), key)
        else:
            self.changed(run, entry, reading.manifest)

    def changed(self, run: dict[str, Any], entry: dict[str, Any],
                manifest: Manifest | None) -> None:
        """Our copy no longer matches its own checksum: report and send it to repair."""
        key = EntryKey.of(entry)
        recorded = self.db.find_manifest(run["_id"], key)
        files = diff_manifests(recorded, manifest) if recorded and manifest else None
        log.error("%s: %s changed on disk since it was verified: %s", run_label(run), key,
                  describe_files(files))
        self.mark_bad(run, entry, judge(run, key.type, key.version),
                      f"data changed on disk since verified ({describe_files(files)})")
