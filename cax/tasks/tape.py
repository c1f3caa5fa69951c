"""TapeUpload and TapeRestore: raw data to IBM TSM tape exactly once, proven readable, and back.

* TapeUpload (``tsm`` sites in ``upload_options``): for each run with a verified local raw copy
  and a tape entry that needs work (none, a retry due, a dead lease), claim the tape entry,
  stage, back up, restore to a scratch place and compare every file; register ``transferred``
  with the tape path and checksum, or ``error`` with the reason.  The tape entry's checksum is the
  local copy's (names as in the dataset), so purge sees the two as the same data.
* TapeRestore (``tsm`` sites in ``download_options``): for each run whose tape entry is
  ``transferred`` and whose local raw copy is missing, claim the local entry, restore into a
  scratch place beside ``dir_raw/<name>``, undo the tape names, verify against the tape entry's
  checksum (adler32, or the original's sha512 dirhash) and register the local copy.

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

from cax.checksum import dataset_checksum
from cax.claimed import ClaimedJob, Keeper, schedule, short_reason
from cax.clock import as_utc
from cax.config import Site
from cax.errors import CaxError, ConfigError
from cax.paths import checked_location, scratch_path
from cax.runsdb import ERROR, TRANSFERRED, TRANSFERRING, EntryKey, find_entry, run_label
from cax.runsdb.runs import Claim
from cax.schema import TAPE_METHODS
from cax.tape.dsmc import Dsmc, TsmSetup
from cax.tape.roundtrip import backup_and_verify, restore_and_verify
from cax.tape.staging import DatasetRefused, remove_tree
from cax.tasks.base import Context, Task
from cax.tasks.copyjob import is_retry_due, retry_conditions

log = logging.getLogger(__name__)


def tape_sites(ctx: Context, push: bool) -> list[Site]:
    """The tape sites this site backs up to (``push``) or restores from."""
    names = ctx.site.upload_options if push else ctx.site.download_options
    return [s for s in (ctx.config.get_site(n) for n in names) if s.method in TAPE_METHODS]


def client_of(site: Site) -> Dsmc:
    """The tape client of ``site`` (its ``tsm`` section; ConfigError if invalid)."""
    return Dsmc(TsmSetup.of(site.tsm))


def needs_work(entry: dict[str, Any] | None, site: Site, now: dt.datetime) -> bool:
    """Whether an entry is absent, in ``error`` with a retry due, or leased by a dead owner."""
    if entry is None:
        return True
    status = entry.get("status")
    if status == ERROR:
        return entry.get("attempts", 0) < site.max_attempts and is_retry_due(entry, now)
    expires = entry.get("lease_expires")
    return status == TRANSFERRING and expires is not None and as_utc(expires) < now


def needs_work_query(key: EntryKey, site: Site, now: dt.datetime) -> list[dict[str, Any]]:
    """``needs_work`` as runs-DB query parts."""
    return [{"data": {"$not": key.elem_match()}},
            {"data": key.elem_match(status=ERROR, **retry_conditions(site, now))},
            {"data": key.elem_match(status=TRANSFERRING, lease_expires={"$lt": now})}]


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
                  "requires": self.requires()}
        return self.db.claim(self.run_id, self.key, new_entry={"checksum": None},
                             statuses=[ERROR], conditions=retry_conditions(self.ctx.site, now),
                             **common) or \
            self.db.claim(self.run_id, self.key, statuses=[TRANSFERRING],
                          conditions={"lease_expires": {"$lt": now}}, **common)

    def work(self, keeper: Keeper) -> None:
        fields = self.produce(keeper)
        self.register({"transfer_end": self.ctx.now(), **fields}, ("reading",))

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
        copy = backup_and_verify(self.client, self.source, self.ctx.site.dir_tsm, self.dataset,
                                 self.token, recorded=recorded,
                                 checksum=self.local.get("checksum"), keeper=keeper)
        self.result.files, self.result.size = copy.files, copy.size
        keeper.check()
        self.db.save_manifest(self.run_id, self.key, copy.manifest, copy.checksum,
                              self.ctx.now())
        log.info("Upload to tape: [succcessful] %s (%s)", copy.location, copy.checksum[:20])
        return {"location": copy.location, "checksum": copy.checksum, "size": copy.size,
                "file_count": copy.files, "tsm_prefix": copy.prefix, "tsm_mode": copy.mode}

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
        reference = self.there.get("checksum")
        if not reference:
            raise DatasetRefused(f"{self.tape_location}: the tape entry has no checksum")
        tape_manifest = self.db.find_manifest(self.run_id, self.reads)
        log.info("%s: tape restore of %s into %s (attempt %d)", self.result.label,
                 self.tape_location, self.final, self.attempts)
        manifest = restore_and_verify(self.client, self.tape_location, self.prefix, self.final,
                                      self.scratch, reference, tape_manifest, keeper=keeper)
        checksum = dataset_checksum(manifest)
        self.result.files = len(manifest)
        self.result.size = sum(size for size, _ in manifest.values())
        self.db.save_manifest(self.run_id, self.key, manifest, checksum, self.ctx.now())
        return {"location": self.final, "checksum": checksum, "size": self.result.size,
                "file_count": self.result.files}

    def cleanup(self) -> None:
        remove_tree(self.scratch)


class TapeTask(Task):
    """What TapeUpload and TapeRestore share: the tape sites, and running jobs in the pass."""

    push: ClassVar[bool]
    #: The original's task_list names for this step.
    aliases: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.tapes = tape_sites(ctx, self.push) if "raw" in (ctx.site.data_type or ("raw",)) \
            else []
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
        here = find_entry(run, EntryKey(self.site.name, "raw"))
        if not here or here.get("status") != TRANSFERRED:
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
        for tape in self.tapes:
            there = find_entry(run, EntryKey(tape.name, "raw"))
            if there and there.get("status") == TRANSFERRED:
                return [RestoreJob(self.ctx, run, tape, there)]
        return []
