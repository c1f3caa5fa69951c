"""Reference copies, good copies, and the per-file repair of a copy whose checksum is wrong.

A copy is compared with the *reference* copy of its data type and version: the first site, in
the order of ``Config.reference_sites`` (explicit ``reference_for`` by ``reference_priority``,
else the documented defaults), that holds a ``transferred`` entry.
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

from cax.checksum import Manifest, dataset_checksum, diff_manifests, legacy_dirhash
from cax.claimed import Keeper, schedule, short_reason
from cax.clock import as_utc
from cax.config import Config, Site
from cax.errors import CaxError, ChecksumMismatchError, LeaseLostError, UnsafeNameError
from cax.paths import entry_location, scratch_path
from cax.progress import ProgressBoard
from cax.runsdb import ERROR, TRANSFERRED, TRANSFERRING, EntryKey, find_entry, run_label
from cax.runsdb.runs import Claim
from cax.schema import TRANSFER_METHODS
from cax.tasks.base import Context, Task
from cax.tasks.copyjob import (
    CopyJob,
    CopyPlan,
    _kind,
    is_retry_due,
    make_plan,
    retry_conditions,
    retry_due,
)
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
    """Return the sites holding reference copies of ``data_type``, best first (see Config)."""
    return config.reference_sites(data_type)


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


def pushers_with_good_copy(config: Config, run: dict[str, Any], key: EntryKey,
                           expected: str | None) -> list[Site]:
    """Sites that push to ``key``'s site and hold a good copy: they repair it by pushing."""
    if not expected:
        return []
    return [site for site in config.sites if key.host in site.upload_options
            and site.method in TRANSFER_METHODS and site.name != key.host
            and (entry := find_entry(run, EntryKey(site.name, key.type, key.version)))
            and is_good(entry, expected)]


def mark_bad_copy(ctx: Context, run: dict[str, Any], claim: Claim, entry: dict[str, Any],
                  reference: dict[str, Any], reason: str) -> None:
    """Take our claimed copy out of ``transferred``: due for repair, or flagged and kept.

    ``reference`` is the entry whose checksum the copy must have (its own, for a copy that
    changed on disk with no other reference).  A copy that went bad more than ``max_attempts``
    times is flagged too, so that a bad source cannot make it loop forever.
    """
    key, site = EntryKey.of(entry), ctx.site
    expected, where = reference["checksum"], reference["host"]
    failures = int(entry.get("checksum_failures") or 0) + 1
    repair = failures <= site.max_attempts and bool(good_copies(ctx.config, run, key, expected)
                                                    or pushers_with_good_copy(ctx.config, run,
                                                                              key, expected))
    if failures > site.max_attempts:
        reason = f"{reason}, again after {failures - 1} repairs; left for a human"
    elif not repair:
        reason = f"checksum differs from the reference {where}; no good copy to repair from"
    if not ctx.runsdb.flag_bad_copy(claim, reference=where, expected=expected, reason=reason,
                                    failures=failures, repair=repair):
        raise LeaseLostError(f"entry {key} is no longer ours")
    what = "due for repair" if repair else "flagged and kept, not retried"
    log.error("%s: %s: %s; %s", run_label(run), key, reason, what)


def record_unreadable(ctx: Context, claim: Claim, exc: Exception) -> None:
    """Mark our claimed copy ``error`` because its data is missing or unreadable.

    The retry is due now, so the copy tasks fetch it again (within ``max_attempts``).
    """
    if isinstance(exc, FileNotFoundError):
        reason = f"data missing: {exc.filename or exc}"
    elif isinstance(exc, OSError):
        reason = f"data unreadable: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    else:
        reason = short_reason(exc)
    if not ctx.runsdb.record_failure(claim, reason, kind="transient", retry_at=ctx.now(),
                                     unset=("compared_checksum",)):
        raise LeaseLostError(f"entry {claim.key} is no longer ours")
    log.error("%s: %s", claim.key, reason)


def check_relpath(rel: str) -> str:
    """Return a manifest path if it stays inside its dataset; raise UnsafeNameError otherwise."""
    if rel != "." and (rel.startswith("/") or posixpath.normpath(rel) != rel
                       or rel.split("/", 1)[0] == ".."):
        raise UnsafeNameError(f"refusing file name {rel!r} from a manifest")
    return rel


def repair_conditions(site: Site, now: dt.datetime) -> dict[str, Any]:
    """Conditions on an entry due for repair: marked, lease free, and either an ``error``
    whose retry is due or a ``transferring`` whose repairer died (its lease expired; the
    claim counts that attempt and gives up when none are left)."""
    return {"status": {"$in": REPAIRABLE}, "checksum_problem": {"$exists": True},
            "lease_expires": {"$not": {"$gt": now}}, **retry_due(now),
            "$nor": [{"status": ERROR, "attempts": {"$gte": site.max_attempts}}]}


def repair_due(entry: dict[str, Any], site: Site, now: dt.datetime) -> bool:
    """The Python twin of ``repair_conditions``."""
    lease = entry.get("lease_expires")
    spent = entry.get("status") == ERROR and int(entry.get("attempts") or 0) >= site.max_attempts
    return (entry.get("status") in REPAIRABLE and bool(entry.get("checksum_problem"))
            and not spent and is_retry_due(entry, now)
            and (lease is None or as_utc(lease) <= now))


def staged_copy(entry: dict[str, Any], final: str) -> list[str]:
    """Where an earlier repair attempt may have staged the copy: its scratch names."""
    names = [entry.get("partial"), entry.get("lease_token") and scratch_path(final,
                                                                            entry["lease_token"])]
    return [n for n in names if n and posixpath.dirname(n) == posixpath.dirname(final)]


def unstage(ops: Transport, final: str, staged: list[str]) -> None:
    """Put a copy that will not be repaired back under its own name: never delete its data."""
    try:
        for temp in staged:
            if ops.exists(temp) and not ops.exists(final):
                ops.rename(temp, final)
                return
    except (CaxError, OSError) as exc:
        log.error("cannot move the staged copy back to %s: %s", final, exc)


class RepairJob(CopyJob):
    """Replace only the bad files of a copy from a good copy, then verify every file.

    A CopyJob whose destination is an existing entry marked bad: this site's own (pulling the
    good files) or, for a pushed copy, a peer's (pushing them).  The copy is moved to the
    claim's scratch name while it is repaired, and moved back after every file verified.
    """

    done_message = "repaired and verified"

    def __init__(self, ctx: Context, plan: CopyPlan, transports: TransportPool,
                 board: ProgressBoard, entry: dict[str, Any]):
        super().__init__(ctx, plan, transports, board)
        self.dest_path = entry_location(plan.dest, entry)
        self.reference = entry.get("checksum_problem")
        self.expected = entry.get("expected_checksum")
        self.label = f"{plan.label} repair of {plan.dest_key} from {plan.source.name}"

    def take(self) -> Claim | None:
        """Lease the entry while it is due for repair (or its repairer died)."""
        now, fields = self.ctx.now(), {**self.claim_fields(), "location": self.dest_path}
        common = {"checksum_problem": {"$exists": True}}
        kw = dict(owner=self.ctx.owner, lease_s=self.lease_s, fields=fields,
                  requires=self.source_still_good())
        return (self.db.claim(self.run_id, self.key, statuses=[ERROR],
                              conditions={**common, **retry_conditions(self.ctx.site, now)}, **kw)
                or self.db.claim(self.run_id, self.key, statuses=[TRANSFERRING],
                                 conditions={**common, "lease_expires": {"$lt": now}}, **kw))

    def work(self, keeper: Keeper) -> None:
        plan = self.plan
        transport, dest_ops, expected = self.prepare(keeper)
        self._stage(dest_ops)
        bad = diff_manifests(expected, dest_ops.manifest(self.scratch))
        log.info("%s: re-fetching %d of %d file(s) (attempt %d of %d): %s", self.label,
                 len(bad), len(expected), self.attempts, self.max_attempts,
                 ", ".join(bad[:FILES_SHOWN]) + (" ..." if len(bad) > FILES_SHOWN else ""))
        for rel in bad:
            self._refetch(transport, dest_ops, rel, rel in expected)
            keeper.check()
        actual = dest_ops.manifest(self.scratch)
        still = diff_manifests(expected, actual)
        if still:
            raise ChecksumMismatchError(f"{plan.describe()}: {len(still)} file(s) still "
                                        f"differ after repair: {', '.join(still[:5])}", still)
        self._check_expected(self.scratch, actual, dest_ops)
        keeper.check(0.15)
        dest_ops.rename(self.scratch, self.dest_path)
        self.scratch = None
        self._register(actual)

    def _stage(self, ops: Transport) -> None:
        """Move the copy to our scratch name (an earlier attempt may have staged it)."""
        assert self.scratch is not None
        if ops.exists(self.dest_path):
            ops.rename(self.dest_path, self.scratch)
            return
        for old in staged_copy(self.claim.previous or {}, self.dest_path):
            if ops.exists(old):
                ops.rename(old, self.scratch)
                return
        raise FileNotFoundError(2, "copy to repair is gone", self.dest_path)

    def _refetch(self, transport: Transport, ops: Transport, rel: str, wanted: bool) -> None:
        """Replace one bad file of the staged copy by the good one (or delete an extra one).

        The good file arrives under a hidden name first, so a failed fetch leaves the bad file
        in place; the next attempt finds the leftover as an extra file and deletes it.
        """
        check_relpath(rel)
        assert self.scratch is not None
        target = self.scratch if rel == "." else posixpath.join(self.scratch, rel)
        if not wanted:
            ops.remove(target)
            return
        head, tail = posixpath.split(target)
        fetched = posixpath.join(head, f".{tail}{FETCH_SUFFIX}")
        source = self.source_path if rel == "." else posixpath.join(self.source_path, rel)
        if self.plan.push:
            transport.put(Path(source), fetched)
        else:
            transport.get(source, Path(fetched))
        ops.remove(target)
        ops.rename(fetched, target)

    def cleanup(self) -> None:
        """Keep the staged copy for the next attempt: it is the only copy of those bytes."""

    def failure_fields(self) -> dict[str, Any]:
        return {"partial": self.scratch} if self.scratch else {}

    def on_stuck(self) -> None:
        """A repair that will not be retried puts the data back in place first."""
        ops = self.dest_ops(self.transports.get(self.plan.remote))
        staged = [self.scratch] if self.scratch else staged_copy(self.claim.previous or {},
                                                                 self.dest_path)
        unstage(ops, self.dest_path, staged)

    def _check_expected(self, temp: str, actual: Manifest, ops: Transport) -> None:
        """Verify the whole repaired copy against the checksum it must have."""
        if not self.expected:
            return
        if _kind(self.expected) == "sha512-dirhash":
            if self.plan.push:
                return  # the remote copy's files all match the good copy's manifest
            good = legacy_dirhash(temp) == self.expected
        else:
            good = dataset_checksum(actual) == self.expected
        if not good:
            raise ChecksumMismatchError(f"{self.plan.describe()}: the repaired copy does not "
                                        f"match the reference {self.reference}")

    def _registration_extras(self, checksum: str) -> tuple[dict[str, Any], list[str]]:
        """Record the comparison the repair settled, so CompareChecksums need not redo it."""
        if self.expected and self.reference != self.plan.dest.name:
            return {"compared_checksum": compare_token(checksum, self.expected)}, []
        return {}, ["compared_checksum"]


def repair_plan(ctx: Context, run: dict[str, Any], entry: dict[str, Any], source: Site,
                source_entry: dict[str, Any], dest: Site, push: bool) -> RepairJob:
    key = EntryKey.of(entry)
    plan = make_plan(run, run_label(run), key.type, key.version, source, source_entry, dest,
                     push)
    if ctx.transports is None:
        ctx.transports = TransportPool(ctx.site.stall_timeout)
    if ctx.board is None:
        ctx.board = ProgressBoard(ctx.console)
    return RepairJob(ctx, plan, ctx.transports, ctx.board, entry)


class RetryBadChecksumTransfer(Task):
    """Repair local copies that differ from their reference, file by file, from a good copy.

    Bad copies at peers this site pushes to are repaired by CopyPush, by pushing the good
    files, so a pushed copy is repaired the same way whichever side can reach the other.
    """

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
        job = repair_plan(self.ctx, run, entry, site, source_entry, self.site, push=False)
        schedule(self.ctx, f"{run['_id']}/{key}", job, job.label)

    def flag(self, run: dict[str, Any], entry: dict[str, Any]) -> None:
        """No good copy can be fetched (any more): keep the data, stop retrying, report it."""
        key = EntryKey.of(entry)
        claim = self.db.claim(run["_id"], key, owner=self.ctx.owner,
                              lease_s=self.ctx.config.lease_seconds, statuses=REPAIRABLE,
                              conditions={"checksum_problem": {"$exists": True}},
                              count_attempt=False)
        if not claim:
            return
        if self.ctx.transports is None:
            self.ctx.transports = TransportPool(self.site.stall_timeout)
        path = entry_location(self.site, entry)
        unstage(self.ctx.transports.local(self.site), path, staged_copy(entry, path))
        reason = (f"checksum differs from the reference {entry.get('checksum_problem')}; "
                  "no good copy to repair from")
        self.db.record_failure(claim, reason, kind="permanent", retry_at=None)
        log.error("%s: %s: %s; flagged and kept (`cax retry` once a good copy exists)",
                  run_label(run), key, reason)
