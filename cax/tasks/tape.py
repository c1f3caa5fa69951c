"""TapeUpload and TapeRestore: raw data to IBM TSM tape exactly once, proven readable, and back.

* TapeUpload (``tsm`` sites in ``upload_options``): for each run with a verified local raw copy
  and a tape entry that needs work (none, a retry due, a dead lease), claim the tape entry,
  stage, back up, restore to a scratch place and compare every file; register ``transferred``
  with the tape path and the local copy's checksums (the original's sha512 too, where the local
  copy records one, so old daemons and the original's restore count it), or ``error`` with the
  reason.  Only a good local copy (its dataset's origin) is backed up.
* TapeRestore (``tsm`` sites in ``download_options``): for each run whose tape entry is
  ``transferred`` and whose local raw copy is missing, claim the local entry, restore into a
  scratch place beside ``dir_raw/<name>``, undo the tape names, verify against the dataset's
  origin (adler32, or the original's sha512 dirhash) and register the local copy.
* A tape entry the original cax left ``transferring`` without a lease for over a day is taken
  over and redone (the original's tape configurations run no RetryStalledTransfer).

The original's ``task_list`` names these steps ``CopyPush`` and ``CopyPull`` (its tape configs
list only those), so each task answers to that name too.  The daemon runs tape work in its
background workers; massive-tsm runs it in its own thread, exactly one dataset at a time.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from cax.checksum import dataset_checksum, scan_dataset
from cax.claimed import ClaimedJob, Keeper, schedule, short_reason
from cax.config import Config, Site
from cax.errors import CaxError, ChecksumMismatchError, ConfigError
from cax.paths import checked_location, scratch_path
from cax.runsdb import ERROR, TRANSFERRED, TRANSFERRING, EntryKey, find_entry, run_label
from cax.runsdb.judgement import (
    good_entry,
    is_good,
    needs_copy,
    needs_copy_query,
    retry_conditions,
)
from cax.runsdb.ledger import Claim
from cax.runsdb.origins import ORIGIN, Proof, checksums, differs, judge, preferred
from cax.schema import TAPE_METHODS
from cax.tape.dsmc import Dsmc, TsmSetup
from cax.tape.roundtrip import backup_and_verify, restore_and_verify
from cax.tape.staging import DatasetRefused, remove_tree
from cax.tasks.base import Context, Task
from cax.tasks.stalled import creation_time

log = logging.getLogger(__name__)


def tape_sites(config: Config, push: bool) -> list[Site]:
    """The tape sites this site backs up to (``push``) or restores from."""
    names = config.site.upload_options if push else config.site.download_options
    return [s for s in (config.get_site(n) for n in names) if s.method in TAPE_METHODS]


def client_of(site: Site) -> Dsmc:
    """The tape client of ``site`` (its ``tsm`` section; ConfigError if invalid)."""
    return Dsmc(TsmSetup.of(site.tsm))


#: A lease-less ``transferring`` entry of the original older than this is stalled.
STALL_AFTER = dt.timedelta(hours=24)


def stalled_legacy(now: dt.datetime) -> dict[str, Any]:
    """Conditions on a ``transferring`` entry of the original cax (no lease) that has not moved
    for a day: nobody will finish it."""
    return {"status": TRANSFERRING, "lease_owner": {"$exists": False},
            "lease_expires": {"$exists": False},
            "$or": [{"creation_time": {"$exists": False}},
                    {"creation_time": {"$lt": now - STALL_AFTER}}]}


def is_stalled_legacy(entry: dict[str, Any], now: dt.datetime) -> bool:
    """The Python twin of ``stalled_legacy``."""
    if entry.get("status") != TRANSFERRING or "lease_owner" in entry \
            or "lease_expires" in entry:
        return False
    created = creation_time(entry)
    return created is None or created < now - STALL_AFTER


def needs_work(entry: dict[str, Any] | None, site: Site, now: dt.datetime) -> bool:
    """Whether an entry is absent, in ``error`` with a retry due, leased by a dead owner, or a
    stalled transfer of the original."""
    return needs_copy(entry, site.max_attempts, now) or bool(
        entry and is_stalled_legacy(entry, now))


def needs_work_query(key: EntryKey, site: Site, now: dt.datetime) -> list[dict[str, Any]]:
    """``needs_work`` as runs-DB query parts."""
    return needs_copy_query(key, site.max_attempts, now) + [
        {"data": key.elem_match(**stalled_legacy(now))}]


@dataclass
class TapeResult:
    """What one tape job did, for massive-tsm's summary line."""

    label: str
    direction: str
    ok: bool = False
    files: int = 0
    size: int = 0
    seconds: float = 0.0
    detail: str = ""

    def line(self) -> str:
        rate = self.size / self.seconds / 1e6 if self.seconds else 0.0
        outcome = "ok" if self.ok else f"failed: {self.detail}"
        return (f"{self.label}: tape {self.direction}: {self.files} file(s), {self.size} bytes, "
                f"{rate:.1f} MB/s, {self.seconds:.1f} s: {outcome}")


class TapeJob(ClaimedJob):
    """One claimed piece of tape work on one run, on the shared claimed-work machinery.

    Subclasses give ``key`` (the entry worked on), ``reads`` (the copy read, which purge then
    leaves alone), ``claim_fields``, ``requires`` (what must still hold at the claim) and
    ``produce`` (does the work under the keeper, returns the fields to register).
    """

    direction: ClassVar[str] = ""
    reads: EntryKey

    def __init__(self, ctx: Context, run: dict[str, Any], tape: Site):
        super().__init__(ctx)
        self.run_doc, self.tape = run, tape
        self.judgement = judge(run, "raw", None)
        self.run_id = run["_id"]
        self.label = run_label(run)
        self.client = client_of(ctx.site)
        self.result = TapeResult(self.label, self.direction)

    def claim_fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def requires(self) -> list[tuple[EntryKey, dict[str, Any]]]:
        raise NotImplementedError

    def produce(self, keeper: Keeper) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def token(self) -> str:
        return self.claim.token if self.claim else "unclaimed"

    def take(self) -> Claim | None:
        """Add the entry, or take over a due retry or an expired lease."""
        now = self.ctx.now()
        fields = {"status": TRANSFERRING, **self.claim_fields(), "transfer_start": now,
                  "reading": self.reads.match()}
        common = {"owner": self.ctx.owner, "lease_s": self.lease_s, "fields": fields,
                  "requires": self.requires(), "run": self.run_doc}
        return self.db.claim(self.run_id, self.key, new_entry={"checksum": None},
                             statuses=[ERROR],
                             conditions=retry_conditions(self.max_attempts, now),
                             **common) or \
            self.db.claim(self.run_id, self.key, statuses=[TRANSFERRING],
                          conditions={"lease_expires": {"$lt": now}}, **common) or \
            self.db.claim(self.run_id, self.key, statuses=[TRANSFERRING],
                          conditions={k: v for k, v in stalled_legacy(now).items()
                                      if k != "status"}, **common)

    def work(self, keeper: Keeper) -> None:
        fields = self.produce(keeper)
        self.register({"transfer_end": self.ctx.now(), "evidence": ORIGIN, **fields},
                      ("reading", "adler32_checksum", "partial"),
                      proof=Proof.against(self.judgement))

    def run(self) -> bool:
        """Do the claimed work and record its outcome; time it for the summary line."""
        start = time.monotonic()
        try:
            self.result.ok = super().run()
        finally:
            self.result.seconds = time.monotonic() - start
        if not self.result.ok and not self.result.detail:
            self.result.detail = (self.keeper.lost if self.keeper and self.keeper.lost
                                  else "lease lost")
        return self.result.ok

    def fail(self, exc: BaseException) -> None:
        self.result.detail = short_reason(exc)
        for line in getattr(exc, "lines", [])[-40:]:
            log.info("dsmc output: %s", line)
        super().fail(exc)


class UploadJob(TapeJob):
    """Back the local raw copy up to tape and prove it readable."""

    direction = "upload"

    def __init__(self, ctx: Context, run: dict[str, Any], tape: Site, local: dict[str, Any]):
        super().__init__(ctx, run, tape)
        self.key = EntryKey(tape.name, "raw")
        self.reads = EntryKey(ctx.site.name, "raw")
        self.local = local
        self.source = checked_location(ctx.site, "raw", local.get("location"))
        if not ctx.site.dir_tsm:
            raise ConfigError(f"site {ctx.site.name} backs up to tape but has no dir_tsm")
        self.dataset = posixpath.basename(self.source)

    def claim_fields(self) -> dict[str, Any]:
        return {"location": os.path.join(self.ctx.site.dir_tsm, self.dataset),
                "source": self.ctx.site.name, "method": self.tape.method}

    def requires(self) -> list[tuple[EntryKey, dict[str, Any]]]:
        """The local copy must still be verified, where it was, when the claim is made."""
        return [(self.reads, {"status": TRANSFERRED, "location": self.local.get("location")})]

    def produce(self, keeper: Keeper) -> dict[str, Any]:
        recorded = self.db.find_manifest(self.run_id, self.reads)
        log.info("%s: tape upload of %s (attempt %d)", self.result.label, self.source,
                 self.attempts)
        origin = self.judgement.origin or {}
        copy = backup_and_verify(self.client, self.source, self.ctx.site.dir_tsm, self.dataset,
                                 self.token, recorded=recorded,
                                 checksum=preferred(origin) or self.local.get("checksum"),
                                 keeper=keeper)
        self.result.files, self.result.size = copy.files, copy.size
        keeper.check()
        if not self.judgement.settled or differs({"checksum": copy.checksum}, origin):
            raise ChecksumMismatchError(f"{self.label}: the staged files are not the dataset's "
                                        "origin; not registered")
        self.db.save_manifest(self.run_id, self.key, copy.manifest, copy.checksum,
                              self.ctx.now())
        log.info("Upload to tape: [succcessful] %s (%s)", copy.location, copy.checksum[:20])
        fields = {"location": copy.location, "checksum": copy.checksum, "size": copy.size,
                  "file_count": copy.files, "tsm_prefix": copy.prefix, "tsm_mode": copy.mode}
        legacy = checksums(self.local).get("sha512-dirhash")
        if legacy:  # what the local copy is known by to the original's daemons and restore
            fields.update(checksum=legacy, adler32_checksum=copy.checksum)
        return fields

    def fail(self, exc: BaseException) -> None:
        log.info("Upload to tape: [failed] %s", self.source)
        super().fail(exc)


class RestoreJob(TapeJob):
    """Restore a tape copy into this site's ``dir_raw`` and verify it."""

    direction = "restore"

    def __init__(self, ctx: Context, run: dict[str, Any], tape: Site, there: dict[str, Any]):
        super().__init__(ctx, run, tape)
        self.key = EntryKey(ctx.site.name, "raw")
        self.reads = EntryKey(tape.name, "raw")
        self.there = there
        location = there.get("location")
        if not isinstance(location, str) or not location.startswith("/"):
            raise ConfigError(f"{self.result.label}: tape entry has no usable location "
                              f"{location!r}")
        self.tape_location = posixpath.normpath(location)
        self.dataset = posixpath.basename(self.tape_location)
        if not ctx.site.dir_raw:
            raise ConfigError(f"site {ctx.site.name} restores from tape but has no dir_raw")
        self.final = os.path.join(ctx.site.dir_raw, self.dataset)
        checked_location(ctx.site, "raw", posixpath.normpath(self.final))
        # The original cax always prefixed "<dataset>_"; entries written here record theirs.
        self.prefix = there.get("tsm_prefix", f"{self.dataset}_")

    def claim_fields(self) -> dict[str, Any]:
        return {"location": self.final, "source": self.tape.name, "method": self.tape.method}

    def requires(self) -> list[tuple[EntryKey, dict[str, Any]]]:
        """The tape copy must still be verified, where it was, when the claim is made."""
        return [(self.reads, {"status": TRANSFERRED, "location": self.there.get("location")})]

    @property
    def scratch(self) -> str:
        """Hidden, beside the final place, unique to this claim (owner and attempt)."""
        return scratch_path(self.final, self.token)

    def produce(self, keeper: Keeper) -> dict[str, Any]:
        origin = self.judgement.origin
        if origin is None:
            raise DatasetRefused(f"{self.tape_location}: the dataset has no settled origin to "
                                 f"verify a restore against ({self.judgement.describe()})")
        origin_manifest = self.db.find_origin_manifest(self.run_id, self.key, origin) \
            if self.judgement.stored else None
        reference = preferred(origin)
        # the tape copy agreed with the origin (is_good), so they share a checksum cax verifies
        assert reference is not None
        adopted = self.adopt_final(origin)
        if adopted is not None:
            return adopted
        tape_manifest = origin_manifest or self.db.find_manifest(self.run_id, self.reads)
        log.info("%s: tape restore of %s into %s (attempt %d)", self.result.label,
                 self.tape_location, self.final, self.attempts)
        manifest = restore_and_verify(self.client, self.tape_location, self.prefix, self.final,
                                      self.scratch, reference, tape_manifest, keeper=keeper)
        checksum = dataset_checksum(manifest)
        if differs({"checksum": checksum}, origin):
            raise ChecksumMismatchError(f"{self.label}: the restored data are not the "
                                        "dataset's origin; not registered")
        self.result.files = len(manifest)
        self.result.size = sum(size for size, _ in manifest.values())
        self.db.save_manifest(self.run_id, self.key, manifest, checksum, self.ctx.now())
        return {"location": self.final, "checksum": checksum, "size": self.result.size,
                "file_count": self.result.files}

    def adopt_final(self, origin: dict[str, Any]) -> dict[str, Any] | None:
        """The fields of the restored copy already in place, if an earlier attempt renamed it
        there but could not register it (the runs DB away); None if nothing is there."""
        if not os.path.lexists(self.final):
            return None
        self.db.check_place_free(self.ctx.site.name, self.final, self.run_id, self.key)
        manifest = scan_dataset(self.final)
        checksum = dataset_checksum(manifest)
        if differs({"checksum": checksum}, origin) is not False:
            raise FileExistsError(f"{self.final} exists and is not this dataset; not replacing "
                                  "it with the tape copy")
        log.info("%s: the verified restore of an earlier attempt is in place; registering it",
                 self.label)
        self.db.save_manifest(self.run_id, self.key, manifest, checksum, self.ctx.now())
        return {"location": self.final, "checksum": checksum,
                "size": sum(size for size, _ in manifest.values()), "file_count": len(manifest)}

    def cleanup(self) -> None:
        remove_tree(self.scratch)


class TapeTask(Task):
    """What TapeUpload and TapeRestore share: the tape sites, and running jobs in the pass."""

    push: ClassVar[bool]
    #: The original's task_list names for this step.
    aliases: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        handles_raw = "raw" in (ctx.site.data_type or ("raw",))
        self.tapes = tape_sites(ctx.config, self.push) if handles_raw else []
        self.results: list[TapeResult] = []
        if self.tapes:
            TsmSetup.of(ctx.site.tsm)  # refuse a bad setup before any claim

    def jobs(self, run: dict[str, Any]) -> list[TapeJob]:
        raise NotImplementedError

    def each_run(self, run: dict[str, Any]) -> None:
        """Start the run's tape work: in a background worker in the daemon (a backup may take
        hours), or here, one at a time, without workers (massive-tsm), collecting results."""
        failed = []
        for job in self.jobs(run):
            if self.ctx.stop.is_set():
                return
            what = f"tape {job.direction} of {run_label(run)}"
            if self.ctx.background is not None:
                schedule(self.ctx, f"{run['_id']}/{job.key}", job, what)
                continue
            if self.ctx.dry_run:
                log.info("dry run: would %s", what)
                continue
            if not job.take_claim():
                log.debug("%s: claimed by another daemon", job.key)
                continue
            ok = job.run()
            self.results.append(job.result)
            if not ok:
                failed.append(job.result.detail)
        if failed:
            raise CaxError(f"tape {self.jobs_direction}: {failed[0]}")

    @property
    def jobs_direction(self) -> str:
        return "upload" if self.push else "restore"


class TapeUpload(TapeTask):
    """Back up this site's verified raw copies to the tape sites in ``upload_options``."""

    push = True
    aliases = ("CopyPush",)

    def query(self) -> dict[str, Any] | None:
        if not self.tapes:
            return None
        now = self.ctx.now()
        here = EntryKey(self.site.name, "raw")
        wanted = [q for t in self.tapes for q in needs_work_query(EntryKey(t.name, "raw"),
                                                                  self.site, now)]
        return {"$and": [{"data": here.elem_match(status=TRANSFERRED)}, {"$or": wanted}]}

    def jobs(self, run: dict[str, Any]) -> list[TapeJob]:
        here = good_entry(run, EntryKey(self.site.name, "raw"))
        if here is None:
            return []
        now = self.ctx.now()
        return [UploadJob(self.ctx, run, t, here) for t in self.tapes
                if needs_work(find_entry(run, EntryKey(t.name, "raw")), self.site, now)]


class TapeRestore(TapeTask):
    """Restore raw data from the tape sites in ``download_options`` when it is missing here."""

    push = False
    aliases = ("CopyPull",)

    def query(self) -> dict[str, Any] | None:
        if not self.tapes:
            return None
        now = self.ctx.now()
        have = [{"data": EntryKey(t.name, "raw").elem_match(status=TRANSFERRED)}
                for t in self.tapes]
        here = EntryKey(self.site.name, "raw")
        return {"$and": [{"$or": have}, {"$or": needs_work_query(here, self.site, now)}]}

    def jobs(self, run: dict[str, Any]) -> list[TapeJob]:
        if not needs_work(find_entry(run, EntryKey(self.site.name, "raw")), self.site,
                          self.ctx.now()):
            return []
        judgement = judge(run, "raw", None)
        for tape in self.tapes:
            there = find_entry(run, EntryKey(tape.name, "raw"))
            if there is not None and is_good(judgement, there):
                return [RestoreJob(self.ctx, run, tape, there)]
        return []
