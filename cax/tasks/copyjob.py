"""One verified, leased, resumable copy of a dataset from one site to another.

The life of a copy, as the runs DB sees it::

    (no entry) --claim--> transferring --every file's checksum matches--> transferred
                               |
                               +--> error (attempts, next_attempt) --retry due--> transferring

  A copy stays ``transferring`` (leased) while it is verified: ``verifying`` is for data that
  others put in place (the DAQ), which AddChecksum checksums, so the two never meet.

It is claimed work (``cax.claimed``): the lease is judged by the runs DB's clock and kept by a
Keeper that aborts the transport when it cannot be renewed; bytes go to a scratch path named
by the claim's token; every file's size and adler32 must equal the source's before the scratch
is renamed into place and the entry registered, in a write that re-checks ownership.

The bytes must be the dataset's *origin* (``runsdb.origins``): the copy is verified against the
origin's manifest where one is recorded, else against its source's recorded checksums, which
the source's judgement ties to the origin; the registration re-checks the origin in the same
write.  Paths are owned: the destination's name derives from the run (``paths.dataset_name``),
and data already at the destination is removed only when the runs DB shows that no other entry
claims that path -- unless it is this copy, verified and renamed into place by an attempt whose
registration failed: that copy is registered, not sent again.  While it runs, the copy's entry
names the source copy in ``reading``, so the source cannot be purged under it; the claim itself
requires the source to still be ``transferred``.
"""

from __future__ import annotations

import errno
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cax.checksum import (
    Manifest,
    dataset_checksum,
    diff_manifests,
    legacy_checksum_fields,
    legacy_dirhash,
    recorded_adler32,
    scan_with_dirhash,
    verifiable_kind,
)
from cax.claimed import ClaimedJob, Keeper
from cax.config import Site
from cax.errors import ChecksumMismatchError, ConfigError, TransferError, UnsafeNameError
from cax.paths import checked_location, dataset_name, dataset_path, scratch_path
from cax.progress import ProgressBoard
from cax.runsdb import ERROR, TRANSFERRED, TRANSFERRING, EntryKey
from cax.runsdb.judgement import retry_conditions
from cax.runsdb.ledger import Claim
from cax.runsdb.origins import ORIGIN, Judgement, Proof, judge
from cax.tasks.base import Context
from cax.transport.base import Transport
from cax.transport.pool import TransportPool

log = logging.getLogger(__name__)

#: Methods that resume into an earlier attempt's bytes (rsync ``--partial``).
RESUMING_METHODS = ("rsync",)


@dataclass(frozen=True)
class CopyPlan:
    """What to copy: one dataset of one run, from ``source`` to ``dest``; ``push`` or pull.

    ``dataset`` is the dataset's name at every site, derived from the run's identity;
    ``judgement`` is what its bytes must be (their origin), judged when the copy was planned.
    """

    run: dict[str, Any]
    label: str
    data_type: str
    version: str | None
    source: Site
    source_entry: dict[str, Any]
    dest: Site
    push: bool
    dataset: str
    judgement: Judgement

    @property
    def run_id(self) -> Any:
        return self.run["_id"]

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


def make_plan(run: dict[str, Any], label: str, data_type: str, version: str | None,
              source: Site, source_entry: dict[str, Any], dest: Site, push: bool) -> CopyPlan:
    """Plan a copy; raises UnsafeNameError if the source is not where this run's data goes."""
    path = checked_location(source, data_type, source_entry.get("location"), version)
    ident = {k: run.get(k) for k in ("_id", "number", "name", "detector")}
    return CopyPlan(ident, label, data_type, version, source, source_entry, dest, push,
                    dataset_name(run, data_type, path), judge(run, data_type, version))


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` says the destination's filesystem is full (here or at a site)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return isinstance(exc, TransferError) and exc.disk_full


def same_machine(a: Site, b: Site) -> bool:
    """Whether two sites' data live on one machine (the same host name, or both local)."""
    return (a.hostname or "localhost") == (b.hostname or "localhost")


def overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


class CopyJob(ClaimedJob):
    """Claim, copy, verify and register one dataset copy described by a CopyPlan."""

    done_message = "transferred and verified"

    def __init__(self, ctx: Context, plan: CopyPlan, transports: TransportPool,
                 board: ProgressBoard):
        super().__init__(ctx)
        self.plan, self.transports, self.board = plan, transports, board
        self.run_id, self.key, self.label = plan.run_id, plan.dest_key, plan.describe()
        self.source_path = checked_location(plan.source, plan.data_type,
                                            plan.source_entry.get("location"), plan.version)
        self.dest_path = dataset_path(plan.dest, plan.data_type, plan.dataset, plan.version)
        self.scratch: str | None = None
        self.writing = False  # bytes may be at the scratch path
        self.adopted: str | None = None  # the previous attempt's scratch we resumed from
        self.legacy_hash: str | None = None  # the original's sha512, in mixed operation

    # -- claim (in the task's thread) ---------------------------------------------------------

    def claim_fields(self) -> dict[str, Any]:
        plan = self.plan
        inherited = {k: plan.source_entry[k] for k in INHERITED_FIELDS if k in plan.source_entry}
        return {**inherited, "status": TRANSFERRING, "location": self.dest_path,
                "source": plan.source.name, "method": plan.remote.method,
                "transfer_start": self.ctx.now(), "reading": plan.source_key.match()}

    def source_still_good(self) -> list[tuple[EntryKey, dict[str, Any]]]:
        """The claim requires the source copy to be verified, where it was, at that instant."""
        return [(self.plan.source_key, {"status": TRANSFERRED,
                                        "location": self.plan.source_entry.get("location")})]

    def take(self) -> Claim | None:
        """Add the destination entry, or take over a due retry or an expired lease."""
        fields, requires, now = self.claim_fields(), self.source_still_good(), self.ctx.now()
        common = dict(owner=self.ctx.owner, lease_s=self.lease_s, fields=fields,
                      requires=requires, run=self.plan.run)
        claim = self.db.claim(self.run_id, self.key, new_entry={"checksum": None},
                              statuses=[ERROR],
                              conditions=retry_conditions(self.ctx.site.max_attempts, now),
                              **common)
        return claim or self.db.claim(self.run_id, self.key, statuses=[TRANSFERRING],
                                      conditions={"lease_expires": {"$lt": now}}, **common)

    # -- the work (in a worker thread) --------------------------------------------------------

    def dest_ops(self, transport: Transport) -> Transport:
        return transport if self.plan.push else self.transports.local(self.ctx.site)

    def prepare(self, keeper: Keeper) -> tuple[Transport, Transport, Manifest, str]:
        """Connect (the keeper may abort the transport), name our scratch, and return the
        transport, the destination's operations, the checksums the copy must have and the
        scratch path (also ``self.scratch``, for the failure's clean-up)."""
        assert self.claim is not None
        transport = self.transports.get(self.plan.remote)
        keeper.add_stopper(transport.abort)
        dest_ops = self.dest_ops(transport)
        expected = self._expected_manifest(transport, self.transports.local(self.ctx.site))
        scratch = self.scratch = scratch_path(self.dest_path, self.claim.token)
        return transport, dest_ops, expected, scratch

    def work(self, keeper: Keeper) -> None:
        plan = self.plan
        self.refuse_own_source()
        transport, dest_ops, expected, scratch = self.prepare(keeper)
        self.require_data_dir(dest_ops)
        self.adopt_previous_scratch(dest_ops, scratch)
        if dest_ops.exists(self.dest_path):
            self.clear_destination(dest_ops)
            if self.adopt_final(dest_ops, expected):
                return
        total = sum(size for size, _ in expected.values())
        log.info("%s: copying %d file(s), %d bytes (attempt %d of %d)", plan.route(),
                 len(expected), total, self.attempts, self.max_attempts)
        tracker = self.board.start(f"{plan.label} {plan.data_type}->{plan.dest.name}", total)

        def progress(nbytes: int) -> None:
            tracker(nbytes)
            keeper.check()

        self.writing = True
        try:
            if plan.push:
                read = transport.put(Path(self.source_path), scratch, progress)
            else:
                read = transport.get(self.source_path, Path(scratch), progress)
        except TransferError:
            keeper.check()  # an abort by the keeper reads as the lease lost, not a failure
            raise
        finally:
            self.board.finish(tracker)
        keeper.check()
        if read is not None and getattr(transport, "manifest_is_destination", False):
            actual, read = read, None  # the receiver checksummed the bytes as it wrote them
            if self.ctx.config.legacy_checksums:  # mixed operation: the original's checksum too
                self.legacy_hash = scan_with_dirhash(
                    self.source_path if plan.push else scratch)[1]
        else:
            actual, self.legacy_hash = self._read_back(dest_ops, scratch)
        bad = diff_manifests(expected, actual)
        if bad:
            source_bad = read is not None and diff_manifests(expected, read)
            dest_ops.remove(scratch)
            where = "the source copy" if source_bad else "the copy"
            raise ChecksumMismatchError(
                f"{plan.describe()}: {len(bad)} file(s) of {where} differ from the reference "
                f"checksums: {', '.join(bad[:5])}", files=bad)
        self._check_legacy(scratch, dest_ops)
        self._save_manifest(actual)  # before the rename: a copy in place has its manifest
        keeper.check(0.15)
        dest_ops.rename(scratch, self.dest_path)
        self.scratch = None
        self._register(actual)
        if self.adopted:  # the previous attempt's tree, no longer anybody's
            try:
                dest_ops.remove(self.adopted)
            except (OSError, TransferError) as exc:
                log.info("%s: old scratch %s left for RetryStalledTransfer: %s",
                         self.plan.route(), self.adopted, exc)

    def require_data_dir(self, dest_ops: Transport) -> None:
        """The destination site's data directory must exist: cax creates what lies below it,
        never the directory itself, so a typo in ``dir_raw`` or ``dir_processed`` fails the
        copy as a configuration error (listed by ``cax status --stuck``) instead of making a
        new directory tree at the site."""
        plan = self.plan
        top = plan.dest.data_dir(plan.data_type)
        if top and not dest_ops.exists(top):
            key = "dir_raw" if plan.data_type == "raw" else "dir_processed"
            raise ConfigError(f"{plan.describe()}: {dest_ops.where(top)} does not exist (site "
                              f"{plan.dest.name} key {key!r}); cax does not create a site's "
                              "data directory: create it if the path is right, else fix the key")

    def refuse_own_source(self) -> None:
        """No copy ever writes into, or removes, its own source."""
        plan = self.plan
        if same_machine(plan.source, plan.dest) and overlaps(self.source_path, self.dest_path):
            raise UnsafeNameError(f"{plan.describe()}: destination {self.dest_path} overlaps "
                                  f"the source {self.source_path} on the same machine; check "
                                  "the data directories of both sites")

    def adopt_previous_scratch(self, dest_ops: Transport, scratch: str) -> None:
        """Resume from the bytes of the previous attempt (rsync) in ``scratch``, without
        sharing them; other methods start afresh, and the old bytes are removed after success.

        The previous owner has stopped its own processes (it let its lease expire, and stops
        its work well before that, or it recorded its failure), but a process on the far side
        of a dead connection may still finish one buffered file.  So the bytes are not taken
        over but hard-linked into this claim's scratch: rsync replaces files by renaming new
        ones into place, so a late write lands in the old tree only.  The old tree is an orphan
        then, which RetryStalledTransfer removes.

        The original cax copied straight to the final path, so a stalled legacy copy's bytes
        (``partial``, see RetryStalledTransfer) are there: linked, then cleared as unregistered
        data before the copy, and never removed after it, when the final path is the new copy.
        """
        prev = self.claim.previous if self.claim else None
        if not prev:
            return
        old = prev.get("partial") or (prev.get("lease_token") and
                                      scratch_path(self.dest_path, prev["lease_token"]))
        if not old or old == scratch or posixpath.dirname(old) != posixpath.dirname(
                self.dest_path) or not dest_ops.exists(old):
            return
        if posixpath.normpath(old) != posixpath.normpath(self.dest_path):
            self.adopted = old  # removed once this attempt succeeded
        if self.plan.remote.method not in RESUMING_METHODS:
            return
        log.info("%s: resuming from the bytes of the previous attempt", self.plan.route())
        try:
            dest_ops.link_tree(old, scratch)
        except (OSError, TransferError) as exc:  # a fresh start is always correct
            log.info("%s: not resuming (%s)", self.plan.route(), exc)
            if dest_ops.exists(scratch):
                dest_ops.remove(scratch)

    def adopt_final(self, dest_ops: Transport, expected: Manifest) -> bool:
        """Register the copy already at the destination if it is this copy, verified: an
        earlier attempt renamed it into place and then failed to register it (the runs DB away
        for a moment).  Sending it again would throw a verified copy away.  Anything else there
        is removed (``clear_destination`` checked that no other entry names it)."""
        try:
            found = dest_ops.manifest(self.dest_path)
        except (OSError, ValueError, TransferError) as exc:
            log.info("%s: unreadable data at %s (%s)", self.plan.route(), self.dest_path, exc)
            found = None
        if found is not None and not diff_manifests(expected, found):
            self._check_legacy(self.dest_path, dest_ops)  # the original's sha512, if any
            self.legacy_hash = self._legacy_hash_of(self.dest_path)
            log.info("%s: the verified copy of an earlier attempt is in place; registering it",
                     self.plan.route())
            self._save_manifest(found)
            self._register(found)
            return True
        log.info("removing unregistered data at %s", dest_ops.where(self.dest_path))
        dest_ops.remove(self.dest_path)
        return False

    def _legacy_hash_of(self, path: str) -> str | None:
        """The original's sha512 of a copy in mixed operation (local bytes only)."""
        if not self.ctx.config.legacy_checksums:
            return None
        return scan_with_dirhash(self.source_path if self.plan.push else path)[1]

    def clear_destination(self, dest_ops: Transport) -> None:
        """Refuse to touch data at the destination path if any entry but ours names it.

        Our own entry's data there is an earlier attempt's, renamed but never registered.
        Anything another entry (of any run) names is somebody's copy: refuse, touch nothing.
        """
        plan = self.plan
        for run in self.db.find_runs_with_location(plan.dest.name, self.dest_path):
            for entry in run.get("data") or ():
                if entry.get("host") != plan.dest.name or entry.get("location", "").rstrip(
                        "/") != self.dest_path:
                    continue
                if run["_id"] == plan.run_id and EntryKey.of(entry) == self.key:
                    continue
                raise UnsafeNameError(
                    f"{plan.describe()}: {dest_ops.where(self.dest_path)} holds the "
                    f"{entry.get('type')} data of run {run.get('number', '?')} "
                    f"({run.get('name', '?')}, status {entry.get('status')}); not touching it")

    def keeps_scratch(self) -> bool:
        """Whether a failed attempt's bytes wait for the next one: only where the method
        resumes, and never after the destination's disk filled up (they would keep it full)."""
        return self.plan.remote.method in RESUMING_METHODS and not disk_full(self.failure)

    def cleanup(self) -> None:
        """After a failure: keep a resumable scratch for the next attempt, else remove it."""
        if self.scratch is None or not self.writing:
            return
        if self.keeps_scratch():
            return
        dest_ops = self.dest_ops(self.transports.get(self.plan.remote))
        for path in (self.scratch, self.adopted if disk_full(self.failure) else None):
            if path and dest_ops.exists(path):
                dest_ops.remove(path)

    def failure_fields(self) -> dict[str, Any]:
        """Say where a resumable scratch waits for the next attempt."""
        if self.scratch and self.writing and self.keeps_scratch():
            return {"partial": self.scratch}
        return {}

    def _expected_manifest(self, transport: Transport, local: Transport) -> Manifest:
        """Return the per-file checksums the copy must have: the origin's.

        That is the origin's recorded manifest where there is one; else the source's recorded
        manifest, when it matches the source's recorded checksum; else the source's files are
        checksummed and must match that recorded checksum.  Whichever it is must equal the
        origin's checksum when the origin has an adler32 one (the source was judged good, but
        its bytes are what is copied).
        """
        plan = self.plan
        origin = plan.judgement.origin
        expected = self.db.find_origin_manifest(plan.run_id, plan.source_key, origin) \
            if plan.judgement.stored else None
        if expected is None:
            recorded = self.db.find_manifest(plan.run_id, plan.source_key)
            adler = recorded_adler32(plan.source_entry)
            if recorded is not None and (not adler or dataset_checksum(recorded) == adler):
                expected = recorded
            else:
                source_ops = local if plan.push else transport
                expected = source_ops.manifest(self.source_path)
                if adler and dataset_checksum(expected) != adler:
                    raise ChecksumMismatchError(f"{plan.describe()}: the source copy does not "
                                                "match its registered checksum; not copying it")
        want = recorded_adler32(origin or {})
        if want and dataset_checksum(expected) != want:
            raise ChecksumMismatchError(f"{plan.describe()}: the source's files are not the "
                                        "dataset's origin; not copying them")
        return expected

    def _read_back(self, dest_ops: Transport, scratch: str) -> tuple[Manifest, str | None]:
        """The manifest of the copy at ``scratch`` and, in mixed operation
        (``legacy_checksums``), its sha512 dirhash.

        On a local destination both come from one read of each file; a push to a remote site
        hashes the local source instead (the per-file adler32 comparison ties the two).
        """
        if not self.ctx.config.legacy_checksums:
            return dest_ops.manifest(scratch), None
        if not self.plan.push or self.plan.remote.method == "local":
            return scan_with_dirhash(scratch)
        return dest_ops.manifest(scratch), scan_with_dirhash(self.source_path)[1]

    def _check_legacy(self, temp: str, dest_ops: Transport) -> None:
        """Verify a copy of a source registered by the original cax against its sha512 dirhash."""
        checksum = self.plan.source_entry.get("checksum")
        if not checksum or _kind(checksum) != "sha512-dirhash":
            return
        path = temp if not self.plan.push else self.source_path
        if legacy_dirhash(path) != checksum:
            raise ChecksumMismatchError(f"{self.plan.describe()}: data differ from the legacy "
                                        "sha512 checksum of the source entry")

    def _save_manifest(self, manifest: Manifest) -> None:
        plan = self.plan
        self.db.save_manifest(plan.run_id, plan.dest_key, manifest, dataset_checksum(manifest),
                              self.ctx.now())

    def _register(self, manifest: Manifest) -> None:
        """Register the verified copy, its checksum the origin's, re-checked in the write."""
        plan, now = self.plan, self.ctx.now()
        checksum = dataset_checksum(manifest)
        fields = {"checksum": checksum, "size": sum(size for size, _ in manifest.values()),
                  "file_count": len(manifest), "transfer_end": now, "evidence": ORIGIN}
        unset = ("checksum_problem", "expected_checksum", "partial", "reading",
                 "adler32_checksum", "disputed", "compared_checksum", "compared_with")
        extra = legacy_checksum_fields(manifest, self.legacy_hash) if self.legacy_hash else {}
        self.register({**fields, **extra}, tuple(u for u in unset if u not in extra),
                      proof=Proof.against(plan.judgement))
        log.info("%s: %s (%s, %d bytes)", plan.route(), self.done_message, checksum[:20],
                 fields["size"])


#: Fields a copy carries over from its source, as the original's copy_handshake did (processed
#: data: which pax made it, where); its readers use them.
INHERITED_FIELDS = ("pax_hash", "creation_place")


_kind = verifiable_kind
