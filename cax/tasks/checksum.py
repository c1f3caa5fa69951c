"""AddChecksum, CompareChecksums and Scrub: know that every ``transferred`` copy is right.

* AddChecksum checksums copies at this site that wait in ``verifying`` (the DAQ registers new
  raw data that way) and registers them ``transferred``, or verifies a checksum the entry
  already carries (the DAQ's, or a legacy sha512 dirhash) with its own algorithm.
* CompareChecksums compares each local copy with the reference copy of its type and version
  once per pair of checksums (``compared_checksum`` records the pair, and the query selects
  only copies whose pair changed, so an idle pass fetches no runs).
* Scrub (cax/tasks/scrub.py) re-reads old copies from disk, within a byte budget per pass.

A copy found bad leaves ``transferred`` at once (``repair.mark_bad_copy``); a copy whose data
is missing becomes ``error`` so the copy tasks fetch it again.  Work that reads data holds a
lease on the entry, so two daemons never read the same copy and no purge deletes it meanwhile.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cax.checksum import (
    Manifest,
    compute_checksum_like,
    dataset_checksum,
    diff_manifests,
    recorded_adler32,
    scan_dataset,
    scan_with_dirhash,
    verifiable_kind,
)
from cax.claimed import FINAL_STEP_LEFT, Keeper
from cax.errors import LeaseLostError, UnsafeNameError
from cax.paths import entry_location
from cax.runsdb import TRANSFERRED, VERIFYING, EntryKey, run_label
from cax.runsdb.runs import Claim
from cax.schema import DATA_TYPES
from cax.tasks.base import Task
from cax.tasks.repair import (
    FILES_SHOWN,
    PROBLEM_FIELDS,
    compare_token,
    find_reference,
    mark_bad_copy,
    record_unreadable,
    reference_sites,
)

log = logging.getLogger(__name__)

#: Failures reading a copy that mean "this copy is not good", not "this daemon has a bug".
UNREADABLE = (OSError, ValueError, UnsafeNameError)


kind_of = verifiable_kind


def describe_files(files: list[str] | None) -> str:
    """Say which files differ, for a log line."""
    if files is None:
        return "files unknown (no per-file checksums recorded)"
    if not files:
        return "the recorded per-file checksums do not show which files"
    more = " ..." if len(files) > FILES_SHOWN else ""
    return f"{len(files)} file(s): {', '.join(files[:FILES_SHOWN])}{more}"


class ChecksumTask(Task):
    """What the checksum tasks share: local entries, claims with a lease, writes."""

    def local_entries(self, run: dict[str, Any], status: str) -> list[dict[str, Any]]:
        return [e for e in list(run.get("data") or ()) if e.get("host") == self.site.name
                and e.get("status") == status and self.site.data_dir(e.get("type", ""))]

    def __init__(self, ctx: Any):
        super().__init__(ctx)
        self.held: dict[tuple[Any, EntryKey], Claim] = {}

    def claim(self, run: dict[str, Any], entry: dict[str, Any], status: str) -> Claim | None:
        """Lease ``entry`` while it is still in ``status`` with the checksum we saw."""
        conditions = {} if status == VERIFYING else {"checksum": entry.get("checksum")}
        key = EntryKey.of(entry)
        claim = self.db.claim(run["_id"], key, owner=self.ctx.owner,
                              lease_s=self.ctx.config.lease_seconds, statuses=[status],
                              conditions=conditions, count_attempt=False)
        if claim:
            self._granted = time.monotonic()
            self.held[(run["_id"], key)] = claim
        return claim

    def ours(self, run: dict[str, Any], entry: dict[str, Any]) -> Claim:
        return self.held[(run["_id"], EntryKey.of(entry))]

    def write(self, run: dict[str, Any], entry: dict[str, Any], fields: dict[str, Any],
              unset: tuple[str, ...] = ()) -> None:
        """Set fields of our claimed entry and release it (``transferred``: register it)."""
        claim = self.held.pop((run["_id"], EntryKey.of(entry)))
        if fields.get("status") == TRANSFERRED:
            done = self.db.register_verified(claim, {k: v for k, v in fields.items()
                                                     if k != "status"}, unset)
        else:
            done = self.db.release(claim, fields, unset)
        if not done:
            raise LeaseLostError(f"entry {claim.key} is no longer ours")

    def path(self, entry: dict[str, Any]) -> str:
        return entry_location(self.site, entry)

    def checksum(self, run: dict[str, Any], entry: dict[str, Any]) -> tuple | None:
        """Checksum our claimed local copy in the kind of its recorded checksum (adler32 if
        it has none or one cax cannot verify), holding the lease while it reads.

        Returns (checksum, manifest or None for legacy), or None when the data is missing or
        unreadable, which is then recorded on the entry.
        """
        recorded, claim = entry.get("checksum"), self.ours(run, entry)
        try:
            with Keeper(self.db, claim, self.ctx.config.lease_seconds, self._granted) as keeper:
                path = self.path(entry)
                if kind_of(recorded):
                    value, manifest = compute_checksum_like(path, recorded)
                elif self.ctx.config.legacy_checksums:  # mixed operation: what old daemons read
                    manifest, value = scan_with_dirhash(path)
                else:
                    manifest = scan_dataset(path)
                    value = dataset_checksum(manifest)
                keeper.check(FINAL_STEP_LEFT)
        except UNREADABLE as exc:
            record_unreadable(self.ctx, self.held.pop((run["_id"], claim.key)), exc)
            return None
        return value, manifest

    def mark_bad(self, run: dict[str, Any], entry: dict[str, Any], reference: dict[str, Any],
                 reason: str) -> None:
        claim = self.held.pop((run["_id"], EntryKey.of(entry)))
        mark_bad_copy(self.ctx, run, claim, entry, reference, reason)

    def good_fields(self, run: dict[str, Any], entry: dict[str, Any], checksum: str,
                    manifest: Manifest | None) -> dict[str, Any]:
        """Save the manifest (if known); return the fields of a verified copy."""
        now = self.ctx.now()
        fields: dict[str, Any] = {"status": TRANSFERRED, "checksum": checksum}
        if manifest is not None:
            self.db.save_manifest(run["_id"], EntryKey.of(entry), manifest,
                                  dataset_checksum(manifest), now)
            fields.update(size=sum(size for size, _ in manifest.values()),
                          file_count=len(manifest))
            if kind_of(checksum) == "sha512-dirhash":
                fields["adler32_checksum"] = dataset_checksum(manifest)
        return fields


class AddChecksum(ChecksumTask):
    """Checksum the ``verifying`` copies at this site and register them ``transferred``."""

    def query(self) -> dict[str, Any] | None:
        types = [t for t in DATA_TYPES if self.site.data_dir(t)]
        if not types:
            return None
        return {"data": {"$elemMatch": {"host": self.site.name, "status": VERIFYING,
                                        "type": {"$in": types}}}}

    def each_run(self, run: dict[str, Any]) -> None:
        for entry in self.local_entries(run, VERIFYING):
            if self.ctx.dry_run:
                log.info("dry run: would checksum %s", EntryKey.of(entry))
            elif self.claim(run, entry, VERIFYING):
                self.verify(run, entry)
            else:  # a copy job verifies it, or another daemon checksums it
                log.debug("%s is leased by another worker", EntryKey.of(entry))

    def verify(self, run: dict[str, Any], entry: dict[str, Any]) -> None:
        """Checksum our claimed entry; register it transferred, or error with the reason."""
        key, recorded = EntryKey.of(entry), entry.get("checksum")
        result = self.checksum(run, entry)
        if result is None:
            return
        value, manifest = result
        if manifest is None:  # verified against a legacy checksum; keep per-file ones too
            manifest = scan_dataset(self.path(entry))
        if recorded and value != recorded:
            log.error("%s: %s: checksum mismatch with the registered %s...; data kept",
                      run_label(run), key, str(recorded)[:20])
            claim = self.held.pop((run["_id"], key))
            self.db.record_failure(claim, "checksum mismatch with the registered checksum; data "
                                   "kept", kind="permanent", retry_at=None)
            return
        fields = self.good_fields(run, entry, value, manifest)
        self.write(run, entry, fields, unset=("compared_checksum", *PROBLEM_FIELDS))
        log.info("%s: %s: verifying -> transferred (%s, %d files)", run_label(run), key,
                 value[:20], fields["file_count"])


def _string(expr: Any) -> dict[str, Any]:
    """Aggregation: a checksum, or "" if it is null or missing.

    Every cax version wrote checksums as strings or null ("n/a" after a failed tape backup).
    """
    return {"$ifNull": [expr, ""]}


def _reference_expr(sites: list[str]) -> Any:
    """Aggregation: the first transferred entry like ``$$o`` at ``sites`` (in order), or null."""
    expr: Any = None
    for site in reversed(sites):
        same = {"$and": [{"$eq": ["$$r.host", site]}, {"$eq": ["$$r.type", "$$o.type"]},
                         {"$eq": ["$$r.status", TRANSFERRED]},
                         {"$or": [{"$eq": ["$$o.type", "raw"]},
                                  {"$eq": ["$$r.pax_version", "$$o.pax_version"]}]}]}
        found = {"$filter": {"input": "$data", "as": "r", "cond": same}}
        expr = {"$ifNull": [{"$arrayElemAt": [found, 0]}, expr]}
    return expr


def compare_query(here: str, refs: dict[str, list[str]]) -> dict[str, Any] | None:
    """Select runs where a transferred copy at ``here`` was not yet compared with its reference.

    ``refs`` maps each data type to its reference sites.  The same test as
    ``CompareChecksums.needs_compare``, evaluated by the server: an idle pass fetches nothing.
    """
    if not refs:
        return None
    per_type = []
    for data_type, sites in refs.items():
        token = {"$concat": [_string("$$o.checksum"), "|", _string("$$ref.checksum")]}
        test = {"$and": [{"$ne": [{"$ifNull": ["$$ref.host", here]}, here]},
                         {"$ne": [_string("$$ref.checksum"), ""]},
                         {"$ne": [{"$ifNull": ["$$o.compared_checksum", ""]}, token]}]}
        per_type.append({"$and": [{"$eq": ["$$o.type", data_type]},
                                  {"$let": {"vars": {"ref": _reference_expr(sites)},
                                            "in": test}}]})
    mine = {"$and": [{"$eq": ["$$o.host", here]}, {"$eq": ["$$o.status", TRANSFERRED]},
                     {"$or": per_type}]}
    pending = {"$filter": {"input": "$data", "as": "o", "cond": mine}}
    return {"$and": [
        {"data": {"$elemMatch": {"host": here, "status": TRANSFERRED,
                                 "type": {"$in": list(refs)}}}},
        {"$expr": {"$gt": [{"$size": pending}, 0]}}]}


def recorded_differ(entry: dict[str, Any], reference: dict[str, Any]) -> bool | None:
    """Whether the recorded checksums of a copy and its reference differ; None if only reading
    the copy can tell (no checksum of the same kind on both sides).

    Each checksum kind both sides record is compared: ``checksum`` when its kinds agree, and the
    adler32 that mixed operation records beside the original's sha512 (see recorded_adler32).
    """
    pairs = [(recorded_adler32(entry), recorded_adler32(reference))]
    if kind_of(entry.get("checksum")) == kind_of(reference.get("checksum")):
        pairs.append((entry.get("checksum"), reference.get("checksum")))
    pairs = [(a, b) for a, b in pairs if a and b]
    return any(a != b for a, b in pairs) if pairs else None


class CompareChecksums(ChecksumTask):
    """Compare each local copy with its reference copy, once per pair of checksums."""

    def query(self) -> dict[str, Any] | None:
        refs = {t: [s.name for s in reference_sites(self.ctx.config, t)] for t in DATA_TYPES
                if self.site.data_dir(t)}
        return compare_query(self.site.name, {t: s for t, s in refs.items() if s})

    def each_run(self, run: dict[str, Any]) -> None:
        for entry in self.local_entries(run, TRANSFERRED):
            reference = find_reference(self.ctx.config, run, EntryKey.of(entry))
            if self.needs_compare(entry, reference):
                self.compare(run, entry, reference)

    def needs_compare(self, entry: dict[str, Any], reference: dict[str, Any] | None) -> bool:
        return (reference is not None and reference.get("host") != self.site.name
                and isinstance(reference.get("checksum"), str) and reference["checksum"] != ""
                and entry.get("compared_checksum") != compare_token(entry.get("checksum"),
                                                                    reference["checksum"]))

    def compare(self, run: dict[str, Any], entry: dict[str, Any],
                reference: dict[str, Any]) -> None:
        ours, theirs = entry.get("checksum"), reference["checksum"]
        key = EntryKey.of(entry)
        if kind_of(theirs) is None:  # recorded as compared, so it is reported once, not per pass
            log.error("%s: the reference %s of %s has no valid checksum: %r", run_label(run),
                      reference["host"], key, theirs[:40])
        elif (differs := recorded_differ(entry, reference)) is None:
            self.compare_from_disk(run, entry, reference)
            return
        elif differs:
            self.mismatch(run, entry, reference, None, claimed=False)
            return
        else:
            log.debug("%s: %s matches the reference at %s", run_label(run), key,
                      reference["host"])
        self.db.record_compared(run["_id"], key, compare_token(ours, theirs))

    def compare_from_disk(self, run: dict[str, Any], entry: dict[str, Any],
                          reference: dict[str, Any]) -> None:
        """Checksums of different kinds: read our copy with the reference's algorithm."""
        key, theirs = EntryKey.of(entry), reference["checksum"]
        if self.ctx.dry_run:
            log.info("dry run: would checksum %s to compare it with %s", key, reference["host"])
            return
        if not self.claim(run, entry, TRANSFERRED):
            return
        claim = self.ours(run, entry)
        try:
            with Keeper(self.db, claim, self.ctx.config.lease_seconds, self._granted) as keeper:
                value, manifest = compute_checksum_like(self.path(entry), theirs)
                keeper.check(FINAL_STEP_LEFT)
        except UNREADABLE as exc:
            record_unreadable(self.ctx, self.held.pop((run["_id"], key)), exc)
            return
        if value != theirs:
            self.mismatch(run, entry, reference, manifest, claimed=True)
            return
        fields: dict[str, Any] = {"compared_checksum": compare_token(entry.get("checksum"),
                                                                     theirs)}
        if not entry.get("checksum"):  # a legacy copy registered without one
            fields = {**self.good_fields(run, entry, value, manifest),
                      "compared_checksum": compare_token(value, theirs)}
        self.write(run, entry, fields, unset=("checksum_failures",))

    def mismatch(self, run: dict[str, Any], entry: dict[str, Any], reference: dict[str, Any],
                 manifest: Manifest | None, claimed: bool) -> None:
        """Report which files differ; take the copy out of ``transferred``."""
        key, ref_key = EntryKey.of(entry), EntryKey.of(reference)
        ours = manifest or self.db.find_manifest(run["_id"], key)
        theirs = self.db.find_manifest(run["_id"], ref_key)
        files = diff_manifests(theirs, ours) if ours and theirs else None
        log.error("%s: %s differs from the reference at %s: %s", run_label(run), key,
                  reference["host"], describe_files(files))
        if self.ctx.dry_run:
            log.info("dry run: would mark %s for repair", key)
            return
        if claimed or self.claim(run, entry, TRANSFERRED):
            self.mark_bad(run, entry, reference,
                          f"checksum differs from the reference {reference['host']}")
