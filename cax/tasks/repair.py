"""Good copies, and the per-file repair of a copy whose bytes are not its dataset's origin.

A copy is judged against its dataset's origin (``runsdb.origins``), never against another site's
copy.  A copy found to differ (AddChecksum, CompareChecksums, Scrub) leaves ``transferred`` at
once, so the runs DB never calls a bad copy good -- Rucio's SUSPICIOUS -> BAD -> RECOVERED or
LOST:

* if a *good* copy (one that agrees with the origin) exists at a site this site can fetch from,
  or at a site that pushes here, the entry becomes ``error`` with ``checksum_problem`` (the
  origin's site) and ``expected_checksum`` (the origin's checksum), due for repair.
  RetryBadChecksumTransfer (or, for a pushed copy, the pushing site's CopyPush) then moves the
  copy to its scratch name, replaces only the files that differ, verifies every file against
  the origin, renames it back and registers it again;
* otherwise it is flagged and kept: ``error``, no retry, nothing deleted, because it may be the
  last copy of those bytes.  It is reported as stuck each pass; ``cax retry`` retries it once a
  good copy exists.

A repair never overwrites a copy whose own recorded checksum verifies on its disk: those bytes
were vouched for by whoever recorded them, so a disagreement with the origin is a dispute for a
person, not a repair.
"""

from __future__ import annotations

import datetime as dt
import logging
import posixpath
from pathlib import Path
from typing import Any

from cax.checksum import Manifest, dataset_checksum, diff_manifests, legacy_dirhash
from cax.claimed import Keeper, backoff_s, schedule, short_reason
from cax.config import Config, Site
from cax.errors import CaxError, ChecksumMismatchError, LeaseLostError, UnsafeNameError
from cax.paths import entry_location, scratch_path
from cax.progress import ProgressBoard
from cax.runsdb import ERROR, TRANSFERRING, EntryKey, find_entry, run_label
from cax.runsdb.judgement import (
    PROBLEM_FIELDS,
    REPAIRABLE,
    is_good,
    repair_conditions,
    repair_due,
    retry_conditions,
)
from cax.runsdb.ledger import Claim
from cax.runsdb.origins import DISK, Judgement, checksums, copies_of, judge, preferred
from cax.schema import TRANSFER_METHODS
from cax.tasks.base import Context, Task
from cax.tasks.copyjob import CopyJob, CopyPlan, _kind, make_plan
from cax.transport.base import Transport
from cax.transport.pool import TransportPool

log = logging.getLogger(__name__)

#: Suffix of a good file fetched beside the bad one it replaces.
FETCH_SUFFIX = ".cax-fetch"
#: File names a log line lists at most.
FILES_SHOWN = 20
__all__ = ["PROBLEM_FIELDS", "RetryBadChecksumTransfer", "good_copies", "mark_bad_copy"]


def compare_token(ours: Any, origin: str) -> str:
    """Return what ``compared_checksum`` records: the pair of checksums that were compared."""
    return f"{ours if isinstance(ours, str) else ''}|{origin}"


def good_copies(config: Config, run: dict[str, Any], key: EntryKey,
                judgement: Judgement | None = None) -> list[tuple[Site, dict[str, Any]]]:
    """Return the good copies of ``key``'s data that this site can fetch, best first.

    Good: agreeing with the dataset's origin.  Fetchable: another site reached by a transfer
    method; ``download_options`` come first, then the reference sites (a reference site is a
    preferred *source*, never the judge), then the others.
    """
    here = config.site
    judgement = judgement or judge(run, key.type, key.version)
    if not judgement.settled:
        return []
    order = [config.get_site(name) for name in here.download_options] + \
        config.reference_sites(key.type) + list(config.sites)
    found, seen = [], {here.name}
    for site in order:
        if site.name in seen or site.method not in TRANSFER_METHODS:
            continue
        seen.add(site.name)
        entry = find_entry(run, EntryKey(site.name, key.type, key.version))
        if entry is not None and is_good(judgement, entry):
            found.append((site, entry))
    return found


def pushers_with_good_copy(config: Config, run: dict[str, Any], key: EntryKey,
                           judgement: Judgement) -> list[Site]:
    """Sites that push to ``key``'s site and hold a good copy: they repair it by pushing."""
    return [site for site in config.sites if key.host in site.upload_options
            and site.method in TRANSFER_METHODS and site.name != key.host
            and is_good(judgement, find_entry(run, EntryKey(site.name, key.type, key.version)))]


def mark_bad_copy(ctx: Context, run: dict[str, Any], claim: Claim, entry: dict[str, Any],
                  judgement: Judgement, reason: str) -> None:
    """Take our claimed copy out of ``transferred``: due for repair, or flagged and kept.

    The repair's target is the origin's checksum.  With no settled origin yet (a dataset of the
    original's whose copies disagree) the repair is due later, when their daemons may have
    settled it; with no good copy to repair from, the copy is flagged and kept.  A copy that
    went bad more than ``max_attempts`` times is flagged too, so a bad source cannot make it loop.
    """
    key, site, now = EntryKey.of(entry), ctx.site, ctx.now()
    origin = judgement.origin
    expected = preferred(origin) if origin else None
    where = (origin or {}).get("host") or "origin"
    failures = int(entry.get("checksum_failures") or 0) + 1
    retry_at: dt.datetime | None = None
    if failures > site.max_attempts:
        reason = f"{reason}, again after {failures - 1} repairs; left for a human"
    elif not expected:
        others = [e for e in copies_of(run, key.type, key.version) if e.get("host") != key.host]
        reason = f"{reason}; its dataset has no settled origin ({judgement.describe()})"
        if others and not judgement.disputed:  # their daemons may settle it
            retry_at = now + dt.timedelta(seconds=backoff_s(site.retry_backoff, failures))
    elif good_copies(ctx.config, run, key, judgement) or pushers_with_good_copy(
            ctx.config, run, key, judgement):
        retry_at = now
    else:
        reason = f"{reason}; no good copy to repair from"
    if not ctx.runsdb.flag_bad_copy(claim, reference=where, expected=expected, reason=reason,
                                    failures=failures, retry_at=retry_at):
        raise LeaseLostError(f"entry {key} is no longer ours")
    what = "due for repair" if retry_at == now else "repair retried later" if retry_at \
        else "flagged and kept, not retried"
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
                                     unset=("compared_checksum", "compared_with")):
        raise LeaseLostError(f"entry {claim.key} is no longer ours")
    log.error("%s: %s", claim.key, reason)


def check_relpath(rel: str) -> str:
    """Return a manifest path if it stays inside its dataset; raise UnsafeNameError otherwise."""
    if rel != "." and (rel.startswith("/") or posixpath.normpath(rel) != rel
                       or rel.split("/", 1)[0] == ".."):
        raise UnsafeNameError(f"refusing file name {rel!r} from a manifest")
    return rel


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
    claim's scratch name while it is repaired, and moved back after every file verified
    against the origin.
    """

    done_message = "repaired and verified"

    def __init__(self, ctx: Context, plan: CopyPlan, transports: TransportPool,
                 board: ProgressBoard, entry: dict[str, Any]):
        super().__init__(ctx, plan, transports, board)
        self.entry = entry
        self.dest_path = entry_location(plan.dest, entry)
        self.expected = preferred(plan.judgement.origin) if plan.judgement.origin else None
        self.label = f"{plan.label} repair of {plan.dest_key} from {plan.source.name}"
        self.vouched: str | None = None  # why the copy must not be overwritten, if it must not
        self.expected_manifest: Manifest = {}

    def take(self) -> Claim | None:
        """Lease the entry while it is due for repair (or its repairer died)."""
        now, fields = self.ctx.now(), {**self.claim_fields(), "location": self.dest_path}
        common = {"checksum_problem": {"$exists": True}}
        kw = dict(owner=self.ctx.owner, lease_s=self.lease_s, fields=fields,
                  requires=self.source_still_good(), run=self.plan.run)
        return (self.db.claim(self.run_id, self.key, statuses=[ERROR],
                              conditions={**common, **retry_conditions(self.max_attempts, now)},
                              **kw)
                or self.db.claim(self.run_id, self.key, statuses=[TRANSFERRING],
                                 conditions={**common, "lease_expires": {"$lt": now}}, **kw))

    def work(self, keeper: Keeper) -> None:
        plan = self.plan
        if not self.expected:
            raise CaxError(f"{plan.describe()}: its dataset has no settled origin "
                           f"({plan.judgement.describe()}); nothing to repair towards")
        transport, dest_ops, expected, scratch = self.prepare(keeper)
        self.expected_manifest = expected
        self._stage(dest_ops, scratch)
        current = dest_ops.manifest(scratch)
        self._refuse_vouched(current, scratch)
        bad = diff_manifests(expected, current)
        log.info("%s: re-fetching %d of %d file(s) (attempt %d of %d): %s", self.label,
                 len(bad), len(expected), self.attempts, self.max_attempts,
                 ", ".join(bad[:FILES_SHOWN]) + (" ..." if len(bad) > FILES_SHOWN else ""))
        for rel in bad:
            self._refetch(transport, dest_ops, scratch, rel, rel in expected)
            keeper.check()
        actual = dest_ops.manifest(scratch)
        still = diff_manifests(expected, actual)
        if still:
            raise ChecksumMismatchError(f"{plan.describe()}: {len(still)} file(s) still "
                                        f"differ after repair: {', '.join(still[:5])}", still)
        self._check_expected(scratch, actual, dest_ops)
        self.legacy_hash = self._legacy_hash_of(scratch)
        self._save_manifest(actual)
        keeper.check(0.15)
        dest_ops.rename(scratch, self.dest_path)
        self.scratch = None
        self._register(actual)

    def _refuse_vouched(self, current: Manifest, scratch: str) -> None:
        """Never overwrite a copy whose own recorded checksum verifies on its disk: whoever
        recorded it vouched for those bytes, so their differing from the origin is a dispute
        for a person, not rot to repair.  (A checksum cax computed from the bytes as it found
        them, evidence ``disk``, vouches for nothing.)"""
        recorded = checksums(self.entry)
        if not recorded or self.entry.get("evidence") == DISK or not diff_manifests(
                self.expected_manifest, current):
            return
        if "adler32" in recorded:
            vouched = dataset_checksum(current) == recorded["adler32"]
        elif self.plan.push:
            vouched = True  # cannot be read from here: never overwrite what may be vouched for
        else:
            vouched = legacy_dirhash(scratch) == recorded["sha512-dirhash"]
        if vouched:
            self.vouched = (f"its own recorded checksum verifies on disk but differs from the "
                            f"dataset's origin ({self.plan.judgement.describe()}): disputed, "
                            "not repaired")
            raise CaxError(f"{self.plan.describe()}: {self.vouched}")

    def fail(self, exc: BaseException) -> None:
        if self.vouched:
            self._record(self.vouched, "permanent")
        else:
            super().fail(exc)

    def _stage(self, ops: Transport, scratch: str) -> None:
        """Move the copy to our scratch name (an earlier attempt may have staged it)."""
        assert self.claim is not None  # work() runs under the claim
        if ops.exists(self.dest_path):
            ops.rename(self.dest_path, scratch)
            return
        for old in staged_copy(self.claim.previous or {}, self.dest_path):
            if ops.exists(old):
                ops.rename(old, scratch)
                return
        raise FileNotFoundError(2, "copy to repair is gone", self.dest_path)

    def _refetch(self, transport: Transport, ops: Transport, scratch: str, rel: str,
                 wanted: bool) -> None:
        """Replace one bad file of the copy staged at ``scratch`` by the good one (or delete an
        extra one).

        The good file arrives under a hidden name first, so a failed fetch leaves the bad file
        in place; the next attempt finds the leftover as an extra file and deletes it.
        """
        check_relpath(rel)
        target = scratch if rel == "." else posixpath.join(scratch, rel)
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
        fields: dict[str, Any] = {"partial": self.scratch} if self.scratch else {}
        if self.vouched:
            fields["disputed"] = self.vouched
        return fields

    def on_stuck(self) -> None:
        """A repair that will not be retried puts the data back in place first."""
        assert self.claim is not None  # called when a failure is recorded under the claim
        ops = self.dest_ops(self.transports.get(self.plan.remote))
        staged = [self.scratch] if self.scratch else staged_copy(self.claim.previous or {},
                                                                 self.dest_path)
        unstage(ops, self.dest_path, staged)

    def _check_expected(self, temp: str, actual: Manifest, ops: Transport) -> None:
        """Verify the whole repaired copy against the origin's checksum."""
        assert self.expected
        if _kind(self.expected) == "sha512-dirhash":
            if self.plan.push:
                return  # the remote copy's files all match the good copy's manifest
            good = legacy_dirhash(temp) == self.expected
        else:
            good = dataset_checksum(actual) == self.expected
        if not good:
            raise ChecksumMismatchError(f"{self.plan.describe()}: the repaired copy does not "
                                        "match its dataset's origin")


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
    """Repair local copies that differ from their origin, file by file, from a good copy.

    Bad copies at peers this site pushes to are repaired by CopyPush, by pushing the good
    files, so a pushed copy is repaired the same way whichever side can reach the other.
    """

    def query(self) -> dict[str, Any] | None:
        conditions = repair_conditions(self.site.max_attempts, self.ctx.now())
        return {"data": {"$elemMatch": {"host": self.site.name, **conditions}}}

    def each_run(self, run: dict[str, Any]) -> None:
        now = self.ctx.now()
        for entry in list(run.get("data") or ()):
            if entry.get("host") == self.site.name and repair_due(entry, self.site.max_attempts,
                                                                  now):
                self.repair(run, entry)

    def repair(self, run: dict[str, Any], entry: dict[str, Any]) -> None:
        key = EntryKey.of(entry)
        sources = good_copies(self.ctx.config, run, key)
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
                              lease_s=self.ctx.config.lease_seconds, statuses=list(REPAIRABLE),
                              conditions={"checksum_problem": {"$exists": True}},
                              count_attempt=False)
        if not claim:
            return
        if self.ctx.transports is None:
            self.ctx.transports = TransportPool(self.site.stall_timeout)
        path = entry_location(self.site, entry)
        unstage(self.ctx.transports.local(self.site), path, staged_copy(entry, path))
        reason = "differs from its dataset's origin; no good copy to repair from"
        self.db.record_failure(claim, reason, kind="permanent", retry_at=None)
        log.error("%s: %s: %s; flagged and kept (`cax retry` once a good copy exists)",
                  run_label(run), key, reason)
