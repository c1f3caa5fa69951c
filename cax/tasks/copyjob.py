"""One verified, leased, resumable copy of a dataset from one site to another.

The life of a copy, as the runs DB sees it::

    (no entry) --claim--> transferring --every file's checksum matches--> transferred
                               |
                               +--> error (attempts, next_attempt) --retry due--> transferring

  A copy stays ``transferring`` (leased) while it is verified: ``verifying`` is for data that
  others put in place (the DAQ), which AddChecksum checksums, so the two never meet.

* The claim is atomic: a new entry is added only if none exists for the destination, and an
  existing ``error`` (retry due) or ``transferring`` (lease expired) entry is taken over by one
  ``find_one_and_update``.  A thread renews the lease while the copy runs.
* Bytes go to a hidden partial name beside the destination and are renamed into place only
  after every file's size and adler32 equal the source's.  The entry becomes ``transferred``
  only after that, so a crash at any instant leaves nothing unverified marked good.
* A failure records a short reason and the attempt count; the next attempt waits with
  exponential backoff; after ``max_attempts`` (or at once for errors that retrying cannot fix)
  the entry stays ``error`` and is reported as stuck.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cax.checksum import (
    Manifest,
    checksum_kind,
    dataset_checksum,
    diff_manifests,
    legacy_dirhash,
)
from cax.config import Site
from cax.errors import CaxError, ChecksumMismatchError, LeaseLostError, TransferError
from cax.paths import checked_location, dataset_path, partial_path
from cax.progress import ProgressBoard
from cax.runsdb import ERROR, TRANSFERRED, TRANSFERRING, EntryKey
from cax.tasks.base import Context
from cax.transport.base import Transport
from cax.transport.pool import TransportPool

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 6 * 3600


@dataclass(frozen=True)
class CopyPlan:
    """What to copy: one dataset of one run, from ``source`` to ``dest``; ``push`` or pull."""

    run_id: Any
    label: str
    data_type: str
    version: str | None
    source: Site
    source_entry: dict[str, Any]
    dest: Site
    push: bool

    @property
    def dest_key(self) -> EntryKey:
        return EntryKey(self.dest.name, self.data_type, self.version)

    @property
    def source_key(self) -> EntryKey:
        return EntryKey(self.source.name, self.data_type, self.version)

    @property
    def remote(self) -> Site:
        return self.dest if self.push else self.source

    def route(self) -> str:
        return f"{self.data_type} {self.source.name} -> {self.dest.name}"

    def describe(self) -> str:
        return f"{self.label} {self.route()}"


def retry_conditions(site: Site, now: dt.datetime) -> dict[str, Any]:
    """Conditions on an ``error`` entry whose next attempt is due and not yet stuck."""
    return {"attempts": {"$not": {"$gte": site.max_attempts}},
            "next_attempt": {"$not": {"$gt": now}}}


def short_reason(exc: BaseException, limit: int = 300) -> str:
    """Return the first line of ``exc`` for the runs DB, shortened in the middle: the cause
    usually comes last, after long paths."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else f"{text[:100]} ... {text[-(limit - 105):]}"


def backoff_s(site: Site, attempts: int) -> float:
    return min(site.retry_backoff * 2 ** max(attempts - 1, 0), MAX_BACKOFF_S)


class LeaseKeeper:
    """Renews a lease in the background; ``lost`` turns true if another daemon took it over."""

    def __init__(self, ctx: Context, run_id: Any, key: EntryKey):
        self.ctx, self.run_id, self.key = ctx, run_id, key
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cax-lease")

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        interval = self.ctx.config.lease_seconds / 3
        while not self._stop.wait(interval):
            try:
                if not self.ctx.runsdb.renew_lease(self.run_id, self.key, self.ctx.owner,
                                                   self.ctx.now(), self.ctx.config.lease_seconds):
                    self.lost = True
                    return
            except CaxError as exc:  # a DB hiccup: the lease may still be renewed next time
                log.warning("lease of %s not renewed: %s", self.key, exc)

    def check(self) -> None:
        if self.lost:
            raise LeaseLostError(f"lease of {self.key} was taken over by another daemon")


class CopyJob:
    """Claim, copy, verify and register one dataset copy described by a CopyPlan."""

    done_message = "transferred and verified"

    def __init__(self, ctx: Context, plan: CopyPlan, transports: TransportPool,
                 board: ProgressBoard):
        self.ctx, self.plan, self.transports, self.board = ctx, plan, transports, board
        self.db = ctx.runsdb
        self.attempts = 0
        name = checked_location(plan.source, plan.data_type, plan.source_entry.get("location"))
        self.source_path = name
        self.dest_path = dataset_path(plan.dest, plan.data_type, Path(name).name, plan.version)

    # -- claim (in the task's thread) ---------------------------------------------------------

    def claim(self) -> bool:
        """Take the destination entry for this daemon; False if another daemon has it."""
        plan, now = self.plan, self.ctx.now()
        fields = {"status": TRANSFERRING, "location": self.dest_path, "source": plan.source.name,
                  "method": plan.remote.method, "transfer_start": now}
        lease = {"lease_owner": self.ctx.owner,
                 "lease_expires": now + dt.timedelta(seconds=self.ctx.config.lease_seconds)}
        entry = {**plan.dest_key.match(), **fields, **lease, "checksum": None,
                 "creation_time": now, "modified_time": now, "attempts": 1}
        if plan.data_type != "raw":
            entry["pax_version"] = plan.version
        if self.db.add_entry(plan.run_id, entry):
            self.attempts = 1
            return True
        lease_s = self.ctx.config.lease_seconds
        for statuses, conditions in (
            ([ERROR], retry_conditions(self.ctx.site, now)),
            ([TRANSFERRING], {"lease_expires": {"$lt": now}}),
        ):
            got = self.db.claim_entry(plan.run_id, plan.dest_key, statuses=statuses,
                                      owner=self.ctx.owner, now=now, lease_s=lease_s,
                                      fields=fields, conditions=conditions, count_attempt=True)
            if got:
                self.attempts = got.get("attempts", 1)
                return True
        return False

    # -- the work (in a worker thread) --------------------------------------------------------

    def run(self) -> bool:
        """Do the claimed copy; record the outcome in the runs DB; return whether it succeeded."""
        try:
            with LeaseKeeper(self.ctx, self.plan.run_id, self.plan.dest_key) as keeper:
                self._copy_verify_register(keeper)
            return True
        except LeaseLostError as exc:
            log.warning("%s: %s; leaving it to the new owner", self.plan.route(), exc)
        except (CaxError, OSError) as exc:
            self._record_failure(exc)
        except Exception as exc:  # a bug must not leave a claim dangling
            log.exception("%s: unexpected error", self.plan.route())
            self._record_failure(exc)
        return False

    def _copy_verify_register(self, keeper: LeaseKeeper) -> None:
        plan = self.plan
        transport = self.transports.get(plan.remote)
        local = self.transports.local(self.ctx.site)
        dest_ops = transport if plan.push else local
        expected = self._expected_manifest(transport, local)
        temp = partial_path(self.dest_path)
        if dest_ops.exists(self.dest_path):  # unregistered leftovers of an earlier attempt
            log.info("removing unverified %s", dest_ops.where(self.dest_path))
            dest_ops.remove(self.dest_path)
        total = sum(size for size, _ in expected.values())
        log.info("%s: copying %d file(s), %d bytes (attempt %d)", plan.route(), len(expected),
                 total, self.attempts)
        tracker = self.board.start(f"{plan.label} {plan.data_type}->{plan.dest.name}", total)

        def progress(nbytes: int) -> None:
            tracker(nbytes)
            keeper.check()

        try:
            if plan.push:
                read = transport.put(Path(self.source_path), temp, progress)
            else:
                read = transport.get(self.source_path, Path(temp), progress)
        finally:
            self.board.finish(tracker)
        keeper.check()
        actual = dest_ops.manifest(temp)
        bad = diff_manifests(expected, actual)
        if bad:
            source_bad = read is not None and diff_manifests(expected, read)
            dest_ops.remove(temp)
            where = "the source copy" if source_bad else "the copy"
            raise ChecksumMismatchError(
                f"{plan.describe()}: {len(bad)} file(s) of {where} differ from the reference "
                f"checksums: {', '.join(bad[:5])}", files=bad)
        self._check_legacy(temp, dest_ops)
        keeper.check()
        dest_ops.rename(temp, self.dest_path)
        self._register(actual)

    def _expected_manifest(self, transport: Transport, local: Transport) -> Manifest:
        """Return the per-file checksums the copy must have: the source's recorded ones.

        Without a recorded manifest they are computed at the source and, if the source entry
        has an adler32 checksum, checked against it first.
        """
        plan = self.plan
        recorded = self.db.find_manifest(plan.run_id, plan.source_key)
        checksum = plan.source_entry.get("checksum")
        if recorded is not None and (not checksum or dataset_checksum(recorded) == checksum):
            return recorded
        source_ops = local if plan.push else transport
        computed = source_ops.manifest(self.source_path)
        if checksum and checksum_kind(checksum) == "adler32" \
                and dataset_checksum(computed) != checksum:
            raise ChecksumMismatchError(f"{plan.describe()}: the source copy does not match its "
                                        "registered checksum; not copying it")
        return computed

    def _check_legacy(self, temp: str, dest_ops: Transport) -> None:
        """Verify a copy of a source registered by the original cax against its sha512 dirhash."""
        checksum = self.plan.source_entry.get("checksum")
        if not checksum or checksum_kind(checksum) != "sha512-dirhash":
            return
        path = temp if not self.plan.push else self.source_path
        if legacy_dirhash(path) != checksum:
            raise ChecksumMismatchError(f"{self.plan.describe()}: data differ from the legacy "
                                        "sha512 checksum of the source entry")

    def _register(self, manifest: Manifest) -> None:
        plan, now = self.plan, self.ctx.now()
        checksum = dataset_checksum(manifest)
        self.db.save_manifest(plan.run_id, plan.dest_key, manifest, checksum, now)
        fields = {"status": TRANSFERRED, "checksum": checksum,
                  "size": sum(size for size, _ in manifest.values()), "file_count": len(manifest),
                  "transfer_end": now, "verified_time": now, "modified_time": now}
        unset = ["error", "next_attempt", "checksum_problem", "expected_checksum"]
        extra, drop = self._registration_extras(checksum)
        if not self.db.update_entry(plan.run_id, plan.dest_key, {**fields, **extra},
                                    owner=self.ctx.owner, release=True, unset=unset + drop):
            raise LeaseLostError(f"entry {plan.dest_key} changed hands before registration")
        log.info("%s: %s (%s, %d bytes)", plan.route(), self.done_message, checksum[:20],
                 fields["size"])

    def _registration_extras(self, checksum: str) -> tuple[dict[str, Any], list[str]]:
        """Fields to set and to unset besides the usual ones when the copy is registered."""
        return {}, []

    def _record_failure(self, exc: BaseException) -> None:
        plan, now = self.plan, self.ctx.now()
        retryable = getattr(exc, "retryable", True) and not isinstance(exc, ValueError)
        stuck = not retryable or self.attempts >= self.ctx.site.max_attempts
        reason = short_reason(exc)
        fields: dict[str, Any] = {"status": ERROR, "error": reason, "transfer_end": now,
                                  "modified_time": now}
        if stuck:
            fields["attempts"] = max(self.attempts, self.ctx.site.max_attempts)
            fields["next_attempt"] = None
            log.error("%s: failed, stuck after %d attempt(s): %s", plan.route(),
                      self.attempts, reason)
        else:
            fields["next_attempt"] = now + dt.timedelta(seconds=backoff_s(self.ctx.site,
                                                                          self.attempts))
            log.warning("%s: attempt %d failed, retrying after %s: %s", plan.route(),
                        self.attempts, fields["next_attempt"].strftime("%H:%M:%S"), reason)
        if isinstance(exc, TransferError):
            self.transports.discard(plan.remote)
        try:
            self.db.update_entry(plan.run_id, plan.dest_key, fields, owner=self.ctx.owner,
                                 release=True)
        except CaxError as db_exc:  # the lease will expire and the copy be taken over
            log.error("%s: failure not recorded: %s", plan.route(), db_exc)
