"""Scrub: re-read old copies from disk, so that bit rot is found before anyone needs the data.

Local ``transferred`` copies last verified more than ``scrub_after_days`` ago (or never, for
entries of the original cax) are re-checksummed, oldest first, at most
``scrub_bytes_per_pass`` bytes per pass (0: off).  A copy that changed goes the way of any bad
copy (``repair.mark_bad_copy``): compared with the reference copy if there is one, else with
its own recorded checksums; repaired file by file from a good copy, or flagged and kept.

Small copies are claimed and released in groups (``GROUP_COPIES``, ``GROUP_BYTES``), one
runs-DB write per group each way: the first pass after importing the original's runs DB
scrubs 10,000 copies of 100 kB at 100,000 runs, and two writes per copy were most of its
time.  A group is small enough to be read well inside its leases; a larger copy is claimed
alone and its lease kept alive while it is read, as every copy's was.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from typing import Any

from cax.checksum import (
    Manifest,
    diff_manifests,
)
from cax.clock import UTC, as_utc
from cax.errors import CaxError
from cax.runsdb import TRANSFERRED, EntryKey, run_label
from cax.runsdb.ledger import Claim
from cax.runsdb.origins import DISK, SELF, judge, rank
from cax.schema import DATA_TYPES
from cax.tasks.checksum import UNREADABLE, ChecksumTask, describe_files, kind_of
from cax.transport import siteops

log = logging.getLogger(__name__)

#: At most this many copies, of at most this many bytes together, are claimed at once.
GROUP_COPIES = 64
GROUP_BYTES = 64 * 2**20
Due = tuple[dict[str, Any], dict[str, Any], int]


def groups(chosen: list[Due]) -> Iterator[list[Due]]:
    """``chosen`` in order, cut into groups of GROUP_COPIES and GROUP_BYTES at most."""
    group: list[Due] = []
    size = 0
    for due in chosen:
        if group and (len(group) >= GROUP_COPIES or size + due[2] > GROUP_BYTES):
            yield group
            group, size = [], 0
        group.append(due)
        size += due[2]
    if group:
        yield group


class Scrub(ChecksumTask):
    """Re-checksum old local copies from disk, oldest first, within a byte budget per pass."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.due: list[tuple[dt.datetime, dict[str, Any], dict[str, Any]]] = []
        self.releasing: list[tuple[Claim, dict[str, Any]]] = []

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
        chosen: list[Due] = []
        for _, run, entry in sorted(self.due, key=lambda item: item[0]):
            size = self.size(entry)
            if size > budget:
                log.warning("%s: %s (%d bytes) is larger than scrub_bytes_per_pass; not "
                            "scrubbed", run_label(run), EntryKey.of(entry), size)
            elif size <= left:
                left -= size
                chosen.append((run, entry, size))
        for group in groups(chosen):
            self.scrub_group(group)

    def scrub_group(self, group: list[Due]) -> None:
        """Claim the copies of ``group``, scrub those we got, release them in one write."""
        if self.ctx.dry_run:
            for _, entry, _ in group:
                log.info("dry run: would re-checksum %s", EntryKey.of(entry))
            return
        if len(group) == 1:
            run, entry, _ = group[0]
            claimed = [(run, entry)] if self.claim(run, entry, TRANSFERRED) else []
        else:
            asked = time.monotonic()
            claims = self.db.claim_each(
                [(run["_id"], EntryKey.of(entry), {"checksum": entry.get("checksum")})
                 for run, entry, _ in group], owner=self.ctx.owner,
                lease_s=self.ctx.config.lease_seconds, statuses=[TRANSFERRED])
            claimed = []
            for (run, entry, _), claim in zip(group, claims, strict=True):
                if claim is not None:
                    self.hold(claim, asked)
                    claimed.append((run, entry))
        try:
            for run, entry in claimed:
                try:
                    self.scrub(run, entry)
                except CaxError as exc:
                    log.error("%s: scrubbing %s: %s", run_label(run), EntryKey.of(entry), exc)
        finally:
            self.flush()

    def release(self, run: dict[str, Any], entry: dict[str, Any], fields: dict[str, Any],
                unset: tuple[str, ...] = ()) -> None:
        """Released with the rest of its group (``flush``)."""
        if unset:
            super().release(run, entry, fields, unset)
        else:
            self.releasing.append((self.take(run, entry), fields))

    def flush(self) -> None:
        releasing, self.releasing = self.releasing, []
        released = self.db.release_each(releasing)
        if released < len(releasing):
            log.error("%d of %d scrubbed copies were no longer ours when released (their "
                      "leases were taken over): their scrub is not recorded, and they are "
                      "scrubbed again", len(releasing) - released, len(releasing))

    def size(self, entry: dict[str, Any]) -> int:
        """Return the recorded size of a copy, or measure it (legacy entries have none)."""
        if isinstance(entry.get("size"), int) and entry["size"] > 0:
            return entry["size"]
        try:
            return int(siteops.stat_tree(self.path(entry))["size"])
        except UNREADABLE:
            return 0  # scrub finds out and records what is wrong with it

    def scrub(self, run: dict[str, Any], entry: dict[str, Any]) -> None:
        """Scrub our claimed copy."""
        key, recorded = EntryKey.of(entry), entry.get("checksum")
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
