"""ProcessBatchQueue: turn verified local raw data into processed data through a batch queue.

The life of a processed entry at this site, for the version the site's ``processing`` makes::

    (none) --claim + submit--> transferring (job_id) --job done, output validated--> transferred
                                   |                     (the version's origin)
                                   +--> error (reason: cancelled / node failure / timeout /
                                        exit code + output tail / invalid output) --retry due-->

Processing is claimed work like every copy (``cax.claimed``): one ``ProcessJob`` per attempt,
under a Keeper that renews its lease while the job is queued or running, whatever the length
of the daemon's passes, and cancels the job when the lease cannot be kept.  The waiting threads
share one ``JobWatcher``, so the batch system is asked about all of them in one call.

* The claim adds the entry (or takes an ``error`` whose retry is due, or a ``transferring``
  whose lease expired) in one atomic write, naming the raw copy it reads (``reading``, so no
  purge deletes the input meanwhile), only while that raw copy is verified and while the version
  has no origin yet: the first output of a version is its origin, and every other site copies
  it instead of making different bytes of its own.
* The job writes to a per-attempt scratch name.  When the batch system says it ended well, the
  output must exist, hold bytes (unless ``allow_empty``) and pass the section's ``validate``
  command; only then is its manifest saved, is it renamed into place (never over another entry's
  data) and registered ``transferred`` -- as the version's origin, in the same write.
* A daemon that takes over an expired claim first asks the batch system about the job the entry
  names (by id, else by job name): if it still runs it is adopted, if it finished its output is
  judged, so a crashed daemon never causes a second job.  An output already in place whose
  registration failed (the runs DB away for a moment) is registered, not made again.
* ``cax retry`` of a processed entry makes it a due ``error``, so a new job is submitted.
"""

from __future__ import annotations

import logging
import os
import posixpath
import secrets
import shutil
from dataclasses import dataclass
from typing import Any

from cax import proc
from cax.batch import (
    BatchBackend,
    JobSpec,
    JobState,
    JobStatus,
    LocalBackend,
    Resources,
    SlurmBackend,
    recorded_status,
)
from cax.batch.watcher import JobWatcher
from cax.checksum import Manifest, dataset_checksum, scan_dataset
from cax.claimed import ClaimedJob, Keeper, LeftRunning, schedule
from cax.clock import as_utc
from cax.config import Processing, Site
from cax.errors import BatchError, BatchFullError, CaxError, CommandError, LeaseLostError
from cax.paths import checked_location, scratch_path
from cax.processors.command import fill_command, placeholders
from cax.runsdb import (
    ERROR,
    TRANSFERRED,
    TRANSFERRING,
    EntryKey,
    find_entry,
    run_label,
    safe_component,
)
from cax.runsdb.judgement import retry_conditions
from cax.runsdb.ledger import Claim
from cax.runsdb.origins import PRODUCER, Proof, dataset_match, origin_record
from cax.tasks.base import Context, Task
from cax.workers import Background

log = logging.getLogger(__name__)

DONOTPROCESS = "donotprocess"
#: Seconds between polls of the batch system (one call for every job waited on).
POLL_S = {"local": 1.0, "slurm": 15.0}


# -- where things go ---------------------------------------------------------------------------

def output_dir(site: Site, processing: Processing) -> str:
    """``<dir_processed>/<prefix><version>``: the directory of this version's processed data."""
    if not site.dir_processed:
        raise CaxError(f"site {site.name} processes data but has no dir_processed")
    return posixpath.join(posixpath.normpath(site.dir_processed),
                          safe_component(processing.prefix + processing.version, "version"))


def output_path(site: Site, processing: Processing, run: dict[str, Any]) -> str:
    """Where the processed data of ``run`` go: ``<dir>/<name>[_MV]<suffix>``."""
    name = safe_component(run.get("name"))
    if run.get("detector") == "muon_veto":
        name += "_MV"
    return posixpath.join(output_dir(site, processing), safe_component(name + processing.suffix))


def scratch_output(final: str, token: str) -> str:
    """The per-attempt name the processor writes to, beside ``final`` (hidden); the entry
    names it in ``partial`` while the job runs, so scratch cleanup leaves it alone."""
    return scratch_path(final, safe_component(token, "job token"))


def job_name(run: dict[str, Any], processing: Processing) -> str:
    """``cax_<number|name>_<version>``: what the admins see in the queue."""
    ident = run.get("number") if run.get("detector", "tpc") == "tpc" else run.get("name")
    return f"cax_{safe_component(str(ident))}_{safe_component(processing.version, 'version')}"


def job_log(processing: Processing, name: str, token: str) -> str:
    return posixpath.join(processing.jobs_dir, f"{name}.{safe_component(token, 'job token')}.log")


def make_backend(processing: Processing, ncpu: int | None = None) -> BatchBackend:
    """The batch backend of a ``processing`` section.  ``ncpu`` (``cax --ncpu``: we run inside
    a batch job already) forces one local job at a time."""
    if ncpu is not None or processing.backend == "local":
        return LocalBackend(1 if ncpu is not None else processing.max_jobs,
                            timeout_s=processing.timeout)
    return SlurmBackend(processing.max_jobs, accounting=processing.accounting,
                        python=processing.python)


def resources(processing: Processing, ncpu: int | None = None) -> Resources:
    return Resources(ncpus=ncpu or processing.ncpus, mem_per_cpu_mb=processing.mem_per_cpu,
                     walltime_s=processing.timeout, partition=processing.partition,
                     qos=processing.qos, reservation=processing.reservation,
                     account=processing.account)


def remove_output(path: str) -> None:
    """Delete a file or directory an attempt left under its scratch name (best effort: it is
    hidden and per-attempt, so a leftover harms nothing)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


class JobFailed(CaxError):
    """The job ended without a good output; retried with backoff up to ``max_attempts``."""


@dataclass
class Processor:
    """What every processing attempt of this site shares: its section, backend and watcher."""

    site: Site
    processing: Processing
    backend: BatchBackend
    watcher: JobWatcher
    ncpu: int | None = None

    @property
    def key(self) -> EntryKey:
        return EntryKey(self.site.name, "processed", self.processing.version)

    @property
    def raw_key(self) -> EntryKey:
        return EntryKey(self.site.name, "raw")

    def spec(self, run: dict[str, Any], token: str) -> JobSpec:
        raw = find_entry(run, self.raw_key)
        source = checked_location(self.site, "raw", raw.get("location") if raw else None)
        final = output_path(self.site, self.processing, run)
        name = job_name(run, self.processing)
        values = placeholders(self.processing, run=run, site=self.site.name, input=source,
                              output=scratch_output(final, token), ncpus=self.ncpu)
        return JobSpec(name=name, argv=fill_command(self.processing, values),
                       output=job_log(self.processing, name, token),
                       resources=resources(self.processing, self.ncpu))

    def validate(self, run: dict[str, Any], output: str, job: str) -> Manifest:
        """The manifest of a finished job's output; JobFailed unless it is one to register."""
        if not os.path.lexists(output):
            raise JobFailed(f"job {job} completed but wrote no output {output}")
        try:
            manifest = scan_dataset(output)
        except (OSError, ValueError) as exc:
            raise JobFailed(f"output of job {job} unreadable: {exc}") from None
        if not self.processing.allow_empty and not sum(size for size, _ in manifest.values()):
            raise JobFailed(f"job {job} completed but its output {output} is empty "
                            "(allow_empty is off)")
        if self.processing.validate:
            raw = find_entry(run, self.raw_key) or {}
            values = placeholders(self.processing, run=run, site=self.site.name,
                                  input=str(raw.get("location") or ""), output=output,
                                  ncpus=self.ncpu)
            argv = [arg.format_map(values) for arg in self.processing.validate]
            try:
                proc.run(argv, timeout=self.processing.validate_timeout)
            except CommandError as exc:
                raise JobFailed(f"output of job {job} refused by the validator: {exc}") from None
        return manifest


class ProcessJob(ClaimedJob):
    """One processing attempt of one run: claim, submit (or adopt) the job, wait for it under
    the Keeper, validate its output and register it as the version's origin."""

    def __init__(self, ctx: Context, processor: Processor, run: dict[str, Any],
                 entry: dict[str, Any] | None):
        super().__init__(ctx)
        self.processor = processor
        self.run_doc, self.run_id = run, run["_id"]
        self.key = processor.key
        self.label = f"{run_label(run)} {self.key}"
        self.entry = entry  # as the pass saw it (None: no entry yet)
        self.final = output_path(processor.site, processor.processing, run)
        self.job_id: str | None = None
        self.scratch: str | None = None
        self.running = False  # a job of ours may still be writing the scratch

    @property
    def takeover(self) -> bool:
        return bool(self.entry and self.entry.get("status") == TRANSFERRING)

    # -- claim --------------------------------------------------------------------------------

    def take(self) -> Claim | None:
        now, processing = self.ctx.now(), self.processor.processing
        raw = find_entry(self.run_doc, self.processor.raw_key) or {}
        kw: dict[str, Any] = dict(
            owner=self.ctx.owner, lease_s=self.lease_s, run=self.run_doc,
            requires=[(self.processor.raw_key, {"status": TRANSFERRED,
                                                "location": raw.get("location")})],
            where=[{"origins": {"$not": {"$elemMatch": dataset_match("processed",
                                                                     processing.version)}}}])
        if self.takeover:  # the attempt is the job's, if one was submitted: counted then
            assert self.entry is not None
            return self.db.claim(self.run_id, self.key, statuses=[TRANSFERRING],
                                 conditions={"lease_expires": {"$lt": now}},
                                 count_attempt=not self.entry.get("job_name"), **kw)
        fields = {"status": TRANSFERRING, "location": self.final,
                  "creation_place": self.processor.site.name, "pax_hash": processing.pax_hash,
                  "reading": self.processor.raw_key.match(), "transfer_start": now}
        return self.db.claim(self.run_id, self.key, new_entry={"checksum": None},
                             statuses=[ERROR],
                             conditions=retry_conditions(self.max_attempts, now), fields=fields,
                             **kw)

    # -- the work -----------------------------------------------------------------------------

    def work(self, keeper: Keeper) -> None:
        if self.adopt_output():
            return
        status = self.previous_job() if self.takeover else None
        if status is None:
            self.submit()
        else:
            log.info("%s: adopting job %s (%s)", self.label, status.job_id, status.state.value)
            self.job_id = status.job_id
        assert self.job_id is not None
        self.running = True
        keeper.add_stopper(self.cancel)
        status = self.wait(keeper, status)
        self.running = False
        self.processor.watcher.forget(self.job_id)
        if status.state != JobState.COMPLETED:
            raise JobFailed(status.reason(self.log_file))
        assert self.scratch is not None
        manifest = self.processor.validate(self.run_doc, self.scratch, self.job_id)
        self.place_and_register(manifest, keeper)

    @property
    def log_file(self) -> str:
        claim_entry = self.claim.entry if self.claim else {}
        return job_log(self.processor.processing, claim_entry.get("job_name") or "",
                       claim_entry.get("job_token") or "")

    def previous_job(self) -> JobStatus | None:
        """The job the taken-over entry names, as the batch system knows it; None if none."""
        entry = (self.claim.previous or {}) if self.claim else {}
        backend = self.processor.backend
        token = entry.get("job_token")
        if token:
            self.scratch = scratch_output(self.final, token)
        job_id = entry.get("job_id")
        status: JobStatus | None
        if job_id and entry.get("job_backend") == backend.kind:
            status = backend.poll([job_id]).get(job_id) or JobStatus(job_id, JobState.LOST)
        elif job_id:  # recorded under another backend (the configuration changed)
            status = JobStatus(job_id, JobState.LOST, detail=f"{entry.get('job_backend')} job")
        else:
            found = [s for s in backend.poll().values() if s.active and
                     s.name == entry.get("job_name")]
            status = found[0] if found else None
        if status is not None and status.state == JobState.LOST:
            status = recorded_status(status.job_id, self.log_file) or status
        if status is not None and not status.active and status.state != JobState.COMPLETED:
            raise JobFailed(status.reason(self.log_file))
        return status

    def submit(self) -> None:
        """Submit the job of our claim; name and token are recorded first, so a crash between
        submit and recording the id leaves a job that a taker-over finds by its name."""
        assert self.claim is not None
        if self.processor.backend.free_slots() <= 0:
            raise BatchFullError(f"{self.processor.backend.kind} batch queue full "
                                 f"({self.processor.backend.max_jobs} own jobs)")
        token = secrets.token_hex(4)
        spec = self.processor.spec(self.run_doc, token)
        self.scratch = scratch_output(self.final, token)
        os.makedirs(output_dir(self.processor.site, self.processor.processing), exist_ok=True)
        job = {"job_name": spec.name, "job_token": token,
               "job_backend": self.processor.backend.kind, "job_id": None,
               "partial": self.scratch}
        if not self.db.update_claimed(self.claim, job):
            raise LeaseLostError(f"{self.key}: claim lost before submitting")
        self.claim.entry.update(job)
        try:
            self.job_id = self.processor.backend.submit(spec)
        except BatchFullError:
            raise
        except BatchError as exc:
            raise JobFailed(f"not submitted: {exc}") from None
        if not self.db.update_claimed(self.claim, {"job_id": self.job_id}):
            self.cancel()
            raise LeaseLostError(f"{self.key}: claim lost after submitting job {self.job_id}; "
                                 "cancelled it")
        log.info("%s: submitted job %s (attempt %d)", self.label, self.job_id, self.attempts)

    def wait(self, keeper: Keeper, status: JobStatus | None) -> JobStatus:
        """Wait for the job to end, while the keeper holds the lease; on a warm stop leave it
        running (its lease lapses, and the next daemon adopts it)."""
        assert self.job_id is not None
        interval = POLL_S.get(self.processor.backend.kind, 15.0)
        while status is None or status.active:
            status = self.processor.watcher.wait(self.job_id, min(interval, 1.0))
            keeper.check()
            if self.ctx.stop.is_set() and (status is None or status.active):
                raise LeftRunning(f"{self.label}: job {self.job_id} left running; the next "
                                  "daemon adopts it when the lease lapses")
        if status.state == JobState.LOST:
            status = recorded_status(status.job_id, self.log_file) or status
        return status

    def cancel(self) -> None:
        if self.job_id and self.running:
            try:
                self.processor.backend.cancel(self.job_id)
            except BatchError as exc:
                log.error("%s: cannot cancel job %s: %s", self.label, self.job_id, exc)

    # -- the output ---------------------------------------------------------------------------

    def adopt_output(self) -> bool:
        """Register the output already in place if an earlier attempt renamed it there but
        failed to register it; False if there is nothing of the kind."""
        if not os.path.lexists(self.final):
            return False
        pending = self.db.find_origin_manifest(self.run_id, self.key, None, pending=True)
        try:
            found = scan_dataset(self.final)
        except (OSError, ValueError):
            return False
        if pending is None or found != pending:
            return False
        self.db.check_place_free(self.processor.site.name, self.final, self.run_id, self.key)
        log.info("%s: the output of an earlier attempt is in place; registering it", self.label)
        self.register_output(found)
        return True

    def place_and_register(self, manifest: Manifest, keeper: Keeper) -> None:
        """The registration step: manifest saved, output renamed into place (never over another
        entry's data), entry registered as the version's origin."""
        assert self.scratch is not None
        checksum = dataset_checksum(manifest)
        self.db.save_origin_manifest(self.run_id, self.key, manifest, checksum, self.ctx.now())
        keeper.check(0.15)
        if os.path.lexists(self.final):
            self.db.check_place_free(self.processor.site.name, self.final, self.run_id,
                                     self.key)
            log.info("%s: removing unregistered data at %s", self.label, self.final)
            remove_output(self.final)
        os.rename(self.scratch, self.final)
        self.scratch = None
        self.register_output(manifest)

    def register_output(self, manifest: Manifest) -> None:
        now, processing = self.ctx.now(), self.processor.processing
        checksum = dataset_checksum(manifest)
        size = sum(size for size, _ in manifest.values())
        self.db.save_manifest(self.run_id, self.key, manifest, checksum, now)
        origin = origin_record(checksum, host=self.processor.site.name, evidence=PRODUCER,
                               now=now, key=self.key, size=size, file_count=len(manifest))
        fields = {"location": self.final, "checksum": checksum, "size": size,
                  "file_count": len(manifest), "pax_version": processing.version,
                  "pax_hash": processing.pax_hash, "evidence": PRODUCER,
                  "creation_place": self.processor.site.name, "transfer_end": now}
        self.register(fields, ("reading", "partial", "disputed", "checksum_problem",
                               "expected_checksum"), proof=Proof(establishes=origin))
        log.info("processed %s: %s (%d bytes, %s)", self.key, self.final, size, checksum[:20])

    def cleanup(self) -> None:
        """Remove what a failed attempt's job left, once the job no longer writes it."""
        if self.scratch and not self.running:
            remove_output(self.scratch)

    def failure_fields(self) -> dict[str, Any]:
        return {"transfer_end": self.ctx.now()}

    def fail(self, exc: BaseException) -> None:
        """A full batch queue is no failed attempt: the claim is given back as it was (an
        entry this claim added is removed), and a later pass submits the job."""
        if not isinstance(exc, BatchFullError):
            super().fail(exc)
            return
        assert self.claim is not None
        log.info("%s: not submitted, %s; left for a later pass", self.label, exc)
        try:
            self.db.give_back(self.claim)
        except CaxError as lost:  # the lease expires and a later pass takes it
            log.warning("%s: claim not given back: %s", self.label, lost)

    def record_lease_loss(self) -> bool:
        """A submitted job may outlive a cancel that failed: the taker-over asks the batch
        system about it, adopts it or records how it ended."""
        return self.job_id is None


# -- the task --------------------------------------------------------------------------------

class ProcessBatchQueue(Task):
    """Start processing attempts for runs that need them, in the processing workers."""

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.processing = self.site.processing
        self._runs: list[dict[str, Any]] = []
        if self.processing is not None:
            self.key = EntryKey(self.site.name, "processed", self.processing.version)
            self.raw_key = EntryKey(self.site.name, "raw")

    def _candidates(self, now: Any) -> dict[str, Any]:
        """Runs that may need a new attempt: verified raw here, not excluded, fields present,
        no origin of this version anywhere, and no processed entry of our version here, or one
        in error whose retry is due."""
        processing = self.processing
        assert processing is not None, "asked of a site with a processing section only"
        query: dict[str, Any] = {
            "data": self.raw_key.elem_match(status=TRANSFERRED),
            "tags.name": {"$ne": DONOTPROCESS},
            "origins": {"$not": {"$elemMatch": dataset_match("processed",
                                                             processing.version)}},
            "$or": [{"data": {"$not": self.key.elem_match()}},
                    {"data": self.key.elem_match(
                        status=ERROR, **retry_conditions(self.site.max_attempts, now))}],
        }
        for name in processing.required_fields:
            query[name] = {"$exists": True, "$ne": None}
        return query

    def query(self) -> dict[str, Any] | None:
        if self.processing is None:
            return None
        now = self.ctx.now()
        return {"$or": [self._candidates(now),
                        {"data": self.key.elem_match(status=TRANSFERRING,
                                                     lease_expires={"$lt": now})}]}

    def each_run(self, run: dict[str, Any]) -> None:
        self._runs.append(run)  # started in finish(), newest first, as many as slots allow

    @property
    def processor(self) -> Processor:
        ctx, processing = self.ctx, self.processing
        assert processing is not None, "only a site with a processing section has a processor"
        if ctx.batch is None:
            ctx.batch = make_backend(processing, ctx.ncpu)
        if ctx.watcher is None:
            ctx.watcher = JobWatcher(ctx.batch, POLL_S.get(ctx.batch.kind, 15.0))
        if ctx.jobs is None:
            ctx.jobs = Background(1 if ctx.ncpu is not None else processing.max_jobs,
                                  prefix="cax-job")
        return Processor(self.site, processing, ctx.batch, ctx.watcher, ctx.ncpu)

    def finish(self) -> None:
        if self.processing is None or not self._runs:
            return
        processor = self.processor
        free = self._free_slots(processor)
        for run in self._runs:
            if self.ctx.stop.is_set():
                break
            with_label = run_label(run)
            entry = find_entry(run, self.key)
            if not self._wanted(run, entry):
                continue
            if self.ctx.dry_run:
                self._describe(processor, run)
                continue
            job = ProcessJob(self.ctx, processor, run, entry)
            # A taken-over entry's job is adopted if it still runs: it needs no free slot.
            # With --once, a job waits for a worker, and so for its own slot to free.
            if free <= 0 and not job.takeover and not self.ctx.once:
                log.info("batch queue full (%d own jobs, max %d): the other runs wait for a "
                         "later pass", processor.backend.active_jobs(),
                         processor.backend.max_jobs)
                break
            what = f"processing of {with_label}"
            if schedule(self.ctx, f"process/{run['_id']}", job, what, pool=self.ctx.jobs):
                free -= not job.takeover
            elif self.ctx.jobs.full and not self.ctx.once:
                break  # every processing worker busy: the rest waits for the next pass

    def _free_slots(self, processor: Processor) -> int:
        """How many jobs this pass may submit: the batch system is asked once (its own jobs
        queued by an earlier daemon count too); if it cannot be asked, none."""
        if self.ctx.dry_run:
            return 0
        try:
            processor.backend.poll()
        except BatchError as exc:
            log.warning("batch system not answering, nothing submitted this pass: %s", exc)
            return 0
        return processor.backend.free_slots()

    def _wanted(self, run: dict[str, Any], entry: dict[str, Any] | None) -> bool:
        """The conditions the query cannot check on a run it returned for another reason."""
        if entry and entry.get("status") == TRANSFERRING:
            expires = entry.get("lease_expires")
            return expires is not None and as_utc(expires) < self.ctx.now()
        raw = find_entry(run, self.raw_key)
        tags = {t.get("name") for t in run.get("tags") or () if isinstance(t, dict)}
        return bool(raw and raw.get("status") == TRANSFERRED) and DONOTPROCESS not in tags

    def _describe(self, processor: Processor, run: dict[str, Any]) -> None:
        spec = processor.spec(run, "dry-run")
        log.info("dry run: would submit %s (%s backend): %s", spec.name, processor.backend.kind,
                 " ".join(spec.argv))
        if isinstance(processor.backend, SlurmBackend):
            log.info("dry run: sbatch script:\n%s", processor.backend.script(spec))
