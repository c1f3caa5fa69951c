"""Reference copies, good copies, and the per-file repair of a copy whose checksum is wrong.

A copy is compared with the *reference* copy of its data type and version: the first site, in
config order, whose ``reference_for`` lists the type and that holds a ``transferred`` entry.
A copy found to differ (by CompareChecksums or Scrub) leaves ``transferred`` at once, so the
runs DB never claims a good copy that is bad:

* if a *good* copy (transferred and known to match the reference) exists at a site this site
  can fetch from, the entry becomes ``error`` with ``checksum_problem`` (the reference site)
  and ``expected_checksum``, due for repair.  RetryBadChecksumTransfer then moves the copy to
  its partial name, deletes and re-fetches only the files that differ, verifies every file,
  renames it back and registers it again;
* otherwise it is flagged and kept: ``error``, stuck (``attempts`` = ``max_attempts``), nothing
  deleted, because it may be the last copy of those bytes.  It is reported as stuck each pass.
"""

from __future__ import annotations

import datetime as dt
import logging
import posixpath
from pathlib import Path
from typing import Any

from cax.checksum import Manifest, checksum_kind, dataset_checksum, diff_manifests, legacy_dirhash
from cax.clock import as_utc
from cax.config import Config, Site
from cax.errors import CaxError, ChecksumMismatchError, LeaseLostError, UnsafeNameError
from cax.paths import checked_location, partial_path
from cax.progress import ProgressBoard
from cax.runsdb import ERROR, TRANSFERRED, TRANSFERRING, EntryKey, find_entry, run_label
from cax.schema import TRANSFER_METHODS
from cax.tasks.base import Context, Task
from cax.tasks.copyjob import CopyJob, CopyPlan, LeaseKeeper, retry_conditions, short_reason
from cax.transport.base import Transport
from cax.transport.pool import TransportPool

log = logging.getLogger(__name__)

#: Entry fields that mark a copy as differing from its reference and waiting for repair.
PROBLEM_FIELDS = ("checksum_problem", "expected_checksum")
#: Statuses of an entry a repair may claim (``transferring``: its repairer died).
REPAIRABLE = [ERROR, TRANSFERRING]
#: Suffix of a good file fetched beside the bad one it replaces.
FETCH_SUFFIX = ".cax-fetch"
#: File names a log line lists at most.
FILES_SHOWN = 20


def compare_token(ours: Any, reference: str) -> str:
    """Return what ``compared_checksum`` records: the pair of checksums that were compared."""
    return f"{ours if isinstance(ours, str) else ''}|{reference}"


def reference_sites(config: Config, data_type: str) -> list[Site]:
    """Return the sites holding reference copies of ``data_type``, in config order."""
    return [site for site in config.sites if data_type in site.reference_for]


def find_reference(config: Config, run: dict[str, Any], key: EntryKey) -> dict[str, Any] | None:
    """Return the reference entry for copies like ``key``, or None if no reference has one."""
    for site in reference_sites(config, key.type):
        entry = find_entry(run, EntryKey(site.name, key.type, key.version))
        if entry and entry.get("status") == TRANSFERRED:
            return entry
    return None


def is_good(entry: dict[str, Any], expected: str) -> bool:
    """Tell whether ``entry`` is a transferred copy known to have the checksum ``expected``."""
    checksum = entry.get("checksum")
    return entry.get("status") == TRANSFERRED and isinstance(checksum, str) and (
        checksum == expected or entry.get("compared_checksum") == compare_token(checksum,
                                                                                expected))


def good_copies(config: Config, run: dict[str, Any], key: EntryKey,
                expected: str | None) -> list[tuple[Site, dict[str, Any]]]:
    """Return the good copies of ``key``'s data that this site can fetch, best first.

    Fetchable: another site reached by a transfer method; ``download_options`` come first.
    """
    here = config.site
    if not expected:
        return []
    order = [config.get_site(name) for name in here.download_options] + list(config.sites)
    found, seen = [], {here.name}
    for site in order:
        if site.name in seen or site.method not in TRANSFER_METHODS:
            continue
        seen.add(site.name)
        entry = find_entry(run, EntryKey(site.name, key.type, key.version))
        if entry and is_good(entry, expected):
            found.append((site, entry))
    return found


def mark_bad_copy(ctx: Context, run: dict[str, Any], entry: dict[str, Any],
                  reference: dict[str, Any], reason: str) -> None:
    """Take our claimed copy out of ``transferred``: due for repair, or flagged and kept.

    ``reference`` is the entry whose checksum the copy must have (its own, for a copy that
    changed on disk with no other reference).  A copy that went bad more than ``max_attempts``
    times is flagged too, so that a bad source cannot make it loop forever.
    """
    key, now, site = EntryKey.of(entry), ctx.now(), ctx.site
    expected, where = reference["checksum"], reference["host"]
    failures = int(entry.get("checksum_failures") or 0) + 1
    fields: dict[str, Any] = {"status": ERROR, "checksum_problem": where,
                              "expected_checksum": expected, "checksum_failures": failures,
                              "modified_time": now}
    if failures > site.max_attempts:
        fields.update(error=f"{reason}, again after {failures - 1} repairs; left for a human",
                      attempts=site.max_attempts, next_attempt=None)
    elif good_copies(ctx.config, run, key, expected):
        fields.update(error=reason, attempts=0, next_attempt=now)
    else:
        fields.update(error=f"checksum differs from the reference {where}; no good copy to "
                            "repair from", attempts=site.max_attempts, next_attempt=None)
    if not ctx.runsdb.update_entry(run["_id"], key, fields, owner=ctx.owner, release=True,
                                   unset=("compared_checksum",)):
        raise LeaseLostError(f"entry {key} is no longer ours")
    what = "due for repair" if fields["next_attempt"] else "flagged and kept, not retried"
    log.error("%s: %s: %s; %s", run_label(run), key, fields["error"], what)


def record_unreadable(ctx: Context, run_id: Any, key: EntryKey, exc: Exception) -> None:
    """Mark our claimed copy ``error`` because its data is missing or unreadable.

    ``next_attempt`` is now, so the copy tasks fetch it again (within ``max_attempts``).
    """
    if isinstance(exc, FileNotFoundError):
        reason = f"data missing: {exc.filename or exc}"
    elif isinstance(exc, OSError):
        reason = f"data unreadable: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    else:
        reason = short_reason(exc)
    now = ctx.now()
    fields = {"status": ERROR, "error": reason, "next_attempt": now, "modified_time": now}
    if not ctx.runsdb.update_entry(run_id, key, fields, owner=ctx.owner, release=True,
                                   unset=("compared_checksum",)):
        raise LeaseLostError(f"entry {key} is no longer ours")
    log.error("%s: %s", key, reason)


def check_relpath(rel: str) -> str:
    """Return a manifest path if it stays inside its dataset; raise UnsafeNameError otherwise."""
    if rel != "." and (rel.startswith("/") or posixpath.normpath(rel) != rel
                       or rel.split("/", 1)[0] == ".."):
        raise UnsafeNameError(f"refusing file name {rel!r} from a manifest")
    return rel


def repair_conditions(site: Site, now: dt.datetime) -> dict[str, Any]:
    """Conditions on an entry due for repair: marked, not stuck, retry due, lease free.

    ``transferring`` is included for a repair whose daemon died (its lease expired).
    """
    return {"status": {"$in": REPAIRABLE}, "checksum_problem": {"$exists": True},
            "lease_expires": {"$not": {"$gt": now}}, **retry_conditions(site, now)}


def repair_due(entry: dict[str, Any], site: Site, now: dt.datetime) -> bool:
    """The Python twin of ``repair_conditions``."""
    due, lease = entry.get("next_attempt"), entry.get("lease_expires")
    return (entry.get("status") in REPAIRABLE and bool(entry.get("checksum_problem"))
            and int(entry.get("attempts") or 0) < site.max_attempts
            and (due is None or as_utc(due) <= now) and (lease is None or as_utc(lease) <= now))


def unstage(local: Transport, final: str) -> None:
    """Put a copy that will not be repaired back under its own name: never delete its data."""
    temp = partial_path(final)
    try:
        if local.exists(temp) and not local.exists(final):
            local.rename(temp, final)
    except (CaxError, OSError) as exc:
        log.error("cannot move %s back to %s: %s", temp, final, exc)


class RepairJob(CopyJob):
    """Replace only the bad files of our copy from a good copy, then verify every file.

    A CopyJob whose destination is the existing local entry: the claim, the lease, the failure
    record (attempts, backoff) and the source manifest are CopyJob's.
    """

    done_message = "repaired and verified"

    def __init__(self, ctx: Context, plan: CopyPlan, transports: TransportPool,
                 board: ProgressBoard, entry: dict[str, Any]):
        super().__init__(ctx, plan, transports, board)
        self.dest_path = checked_location(ctx.site, plan.data_type, entry.get("location"))
        self.reference = entry.get("checksum_problem")
        self.expected = entry.get("expected_checksum")

    def claim(self) -> bool:
        """Lease our entry while it is due for repair; False if another daemon has it."""
        plan, now = self.plan, self.ctx.now()
        fields = {"status": TRANSFERRING, "source": plan.source.name,
                  "method": plan.source.method, "transfer_start": now}
        conditions = {"checksum_problem": {"$exists": True},
                      **retry_conditions(self.ctx.site, now)}
        got = self.db.claim_entry(plan.run_id, plan.dest_key, statuses=REPAIRABLE,
                                  owner=self.ctx.owner, now=now,
                                  lease_s=self.ctx.config.lease_seconds, fields=fields,
                                  conditions=conditions, count_attempt=True)
        self.attempts = got.get("attempts", 1) if got else 0
        return bool(got)

    def _copy_verify_register(self, keeper: LeaseKeeper) -> None:
        remote = self.transports.get(self.plan.source)
        local = self.transports.local(self.ctx.site)
        expected = self._expected_manifest(remote, local)
        temp = partial_path(self.dest_path)
        self._stage(local, temp)
        bad = diff_manifests(expected, local.manifest(temp))
        log.info("%s: re-fetching %d of %d file(s) from %s (attempt %d): %s", self.plan.label,
                 len(bad), len(expected), self.plan.source.name, self.attempts,
                 ", ".join(bad[:FILES_SHOWN]) + (" ..." if len(bad) > FILES_SHOWN else ""))
        for rel in bad:
            self._refetch(remote, local, temp, rel, rel in expected)
            keeper.check()
        actual = local.manifest(temp)
        still = diff_manifests(expected, actual)
        if still:
            raise ChecksumMismatchError(f"{self.plan.describe()}: {len(still)} file(s) still "
                                        f"differ after repair: {', '.join(still[:5])}", still)
        self._check_expected(temp, actual)
        keeper.check()
        local.rename(temp, self.dest_path)
        self._register(actual)

    def _stage(self, local: Transport, temp: str) -> None:
        """Move the copy to its partial name (an earlier attempt may have done it already)."""
        if local.exists(self.dest_path):
            if local.exists(temp):
                local.remove(temp)
            local.rename(self.dest_path, temp)
        elif not local.exists(temp):
            raise FileNotFoundError(2, "copy to repair is gone", self.dest_path)

    def _refetch(self, remote: Transport, local: Transport, temp: str, rel: str,
                 wanted: bool) -> None:
        """Replace one bad file of the partial copy by the good one (or delete an extra one).

        The good file arrives under a hidden name first, so a failed fetch leaves the bad file
        in place; the next attempt finds the leftover as an extra file and deletes it.
        """
        check_relpath(rel)
        target = temp if rel == "." else posixpath.join(temp, rel)
        if wanted:
            head, tail = posixpath.split(target)
            fetched = posixpath.join(head, f".{tail}{FETCH_SUFFIX}")
            source = self.source_path if rel == "." else posixpath.join(self.source_path, rel)
            remote.get(source, Path(fetched))
            local.remove(target)
            local.rename(fetched, target)
        else:
            local.remove(target)

    def _record_failure(self, exc: BaseException) -> None:
        """As CopyJob; a repair that will not be retried puts the data back in place first."""
        retryable = getattr(exc, "retryable", True) and not isinstance(exc, ValueError)
        if not retryable or self.attempts >= self.ctx.site.max_attempts:
            unstage(self.transports.local(self.ctx.site), self.dest_path)
        super()._record_failure(exc)

    def _check_expected(self, temp: str, actual: Manifest) -> None:
        """Verify the whole repaired copy against the checksum it must have."""
        if not self.expected:
            return
        if checksum_kind(self.expected) == "sha512-dirhash":
            good = legacy_dirhash(temp) == self.expected
        else:
            good = dataset_checksum(actual) == self.expected
        if not good:
            raise ChecksumMismatchError(f"{self.plan.describe()}: the repaired copy does not "
                                        f"match the reference {self.reference}")

    def _registration_extras(self, checksum: str) -> tuple[dict[str, Any], list[str]]:
        """Record the comparison the repair settled, so CompareChecksums need not redo it."""
        if self.expected and self.reference != self.ctx.site.name:
            return {"compared_checksum": compare_token(checksum, self.expected)}, []
        return {}, ["compared_checksum"]


class RetryBadChecksumTransfer(Task):
    """Repair local copies that differ from their reference, file by file, from a good copy."""

    def query(self) -> dict[str, Any] | None:
        conditions = repair_conditions(self.site, self.ctx.now())
        return {"data": {"$elemMatch": {"host": self.site.name, **conditions}}}

    def each_run(self, run: dict[str, Any]) -> None:
        now = self.ctx.now()
        for entry in list(run.get("data") or ()):
            if entry.get("host") == self.site.name and repair_due(entry, self.site, now):
                self.repair(run, entry)

    def repair(self, run: dict[str, Any], entry: dict[str, Any]) -> None:
        key = EntryKey.of(entry)
        sources = good_copies(self.ctx.config, run, key, entry.get("expected_checksum"))
        if self.ctx.dry_run:
            what = f"repair from {sources[0][0].name}" if sources else "flag as unrepairable"
            log.info("dry run: would %s %s", what, key)
            return
        if not sources:
            self.flag(run, entry)
            return
        site, source_entry = sources[0]
        plan = CopyPlan(run["_id"], run_label(run), key.type, key.version, site, source_entry,
                        self.site, push=False)
        if self.ctx.transports is None:
            self.ctx.transports = TransportPool(self.site.stall_timeout)
        if self.ctx.board is None:
            self.ctx.board = ProgressBoard(self.ctx.console)
        self.start(RepairJob(self.ctx, plan, self.ctx.transports, self.ctx.board, entry))

    def start(self, job: RepairJob) -> None:
        """Claim and run the repair: in a background worker if there is one, else here."""
        background = self.ctx.background
        name = f"{job.plan.run_id}/{job.plan.dest_key}"
        if background is not None:
            if background.busy(name):
                return
            if background.full:
                if not self.ctx.once:
                    return  # every slot is copying; the repair stays due for the next pass
                background.wait_for_slot()
        if not job.claim():
            log.debug("%s: claimed by another daemon", job.plan.describe())
            return
        if background is None:
            job.run()
        else:
            background.submit(name, job.run)

    def flag(self, run: dict[str, Any], entry: dict[str, Any]) -> None:
        """No good copy can be fetched (any more): keep the data, stop retrying, report it."""
        key, now = EntryKey.of(entry), self.ctx.now()
        if not self.db.claim_entry(run["_id"], key, statuses=REPAIRABLE, owner=self.ctx.owner,
                                   now=now, lease_s=self.ctx.config.lease_seconds,
                                   conditions={"checksum_problem": {"$exists": True}}):
            return
        if self.ctx.transports is None:
            self.ctx.transports = TransportPool(self.site.stall_timeout)
        unstage(self.ctx.transports.local(self.site),
                checked_location(self.site, key.type, entry.get("location")))
        reference = entry.get("checksum_problem")
        fields = {"status": ERROR, "error": f"checksum differs from the reference {reference}; "
                  "no good copy to repair from", "attempts": self.site.max_attempts,
                  "next_attempt": None, "modified_time": now}
        self.db.update_entry(run["_id"], key, fields, owner=self.ctx.owner, release=True)
        log.error("%s: %s: %s; flagged and kept", run_label(run), key, fields["error"])
