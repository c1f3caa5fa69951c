"""ProcessBatchQueue: turn verified local raw data into processed data through a batch queue.

The life of a processed entry at this site, for the version the site's ``processing`` makes::

    (none) --claim + submit--> transferring (job_id) --job done, output checksummed--> transferred
                                   |
                                   +--> error (reason: cancelled / node failure / timeout /
                                        exit code + output tail) --retry due--> transferring

* The claim is the shared one: the entry is added (or an ``error`` whose retry is due, or a
  ``transferring`` whose lease expired, taken over) in one atomic write, with a lease, and it
  names the raw copy it reads (``reading``), so a purge cannot delete the input meanwhile.
* The job (processor command from the configuration) writes to a per-attempt scratch name.
  When the batch system says the job ended well, the output is checksummed, renamed into
  place, and only then registered ``transferred`` with ``pax_version``, ``pax_hash``,
  ``creation_place``, size, checksum and times.
* A pass asks the batch system about all of this site's jobs in **one** call and renews the
  leases of every job still queued or running in **one** write; a pass costs a fixed number of
  runs-DB round trips and batch calls, not one per run.
* A daemon that takes over an expired claim first asks the batch system about the job the entry
  names (by id, else by job name): if it still runs, it is adopted, not run again.  So a crashed
  daemon never causes a second job.  A job that ended without a good output becomes ``error``
  with the reason, retried up to ``max_attempts`` and then stuck until ``cax retry``.
* When the batch system cannot be asked (``squeue`` fails), nothing is decided this pass.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import posixpath
import secrets
import shutil
import time
from dataclasses import dataclass
from typing import Any

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
from cax.checksum import dataset_checksum, scan_dataset
from cax.claimed import backoff_s, short_reason
from cax.clock import as_utc, when
from cax.config import Processing, Site
from cax.errors import BatchError, CaxError, LeaseLostError
from cax.logcontext import log_context
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
from cax.runsdb.runs import Claim
from cax.tasks.base import Context, Task
from cax.tasks.copyjob import retry_conditions

log = logging.getLogger(__name__)

DONOTPROCESS = "donotprocess"
ONCE_POLL_S = 1.0


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


def _remove(path: str) -> None:
    """Delete a file or directory left by a failed attempt (best effort: it is hidden and
    per-attempt, so a leftover harms nothing)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def _held(run: dict[str, Any], key: EntryKey, entry: dict[str, Any]) -> Claim:
    """Our claim on ``entry``, rebuilt from the runs DB: its owner and token are ours (the
    lease outlives one pass while the job is queued or running)."""
    return Claim(run["_id"], key, entry["lease_owner"], entry.get("lease_token") or "",
                 int(entry.get("attempts") or 1), entry)


# -- the task --------------------------------------------------------------------------------

@dataclass
class _Work:
    """One processed entry of this site to look after in this pass."""

    run: dict[str, Any]
    entry: dict[str, Any] | None  # None: no entry yet
    claim: Claim | None = None  # ours, once claimed


class ProcessBatchQueue(Task):
    """Submit processing jobs for runs that need them and register what they produced."""

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.processing = self.site.processing
        self._runs: list[dict[str, Any]] = []
        self._mine_active: list[_Work] = []
        if self.processing is not None:
            self.key = EntryKey(self.site.name, "processed", self.processing.version)
            self.raw_key = EntryKey(self.site.name, "raw")

    # -- selection ----------------------------------------------------------------------

    def _candidates(self, now: dt.datetime) -> dict[str, Any]:
        """Runs that may need a new job: verified raw here, not excluded, fields present, and
        no processed entry of our version here, or one in error whose retry is due."""
        query: dict[str, Any] = {
            "data": self.raw_key.elem_match(status=TRANSFERRED),
            "tags.name": {"$ne": DONOTPROCESS},
            "$or": [{"data": {"$not": self.key.elem_match()}},
                    {"data": self.key.elem_match(status=ERROR, **retry_conditions(self.site,
                                                                                  now))}],
        }
        for name in self.processing.required_fields:
            query[name] = {"$exists": True, "$ne": None}
        return query

    def query(self) -> dict[str, Any] | None:
        if self.processing is None:
            return None
        return {"$or": [self._candidates(self.ctx.now()),
                        {"data": self.key.elem_match(status=TRANSFERRING)}]}

    def each_run(self, run: dict[str, Any]) -> None:
        self._runs.append(run)  # the work happens in finish(): one batch poll for all runs

    # -- the pass -------------------------------------------------------------------------

    @property
    def backend(self) -> BatchBackend:
        if self.ctx.batch is None:
            self.ctx.batch = make_backend(self.processing, self.ctx.ncpu)
        return self.ctx.batch

    def finish(self) -> None:
        if self.processing is None:
            return
        failures = self._pass(self._runs)
        while self.ctx.once and not self.ctx.dry_run and self._mine_active \
                and not self.ctx.stop.is_set():
            time.sleep(ONCE_POLL_S)  # --once: wait for our jobs (and start the rest), as copies
            query = {"$and": [self.query(), self.ctx.selector]} if self.ctx.selector \
                else self.query()
            failures += self._pass(self.db.find_runs(query))
        if failures:
            raise CaxError(f"{len(failures)} processing job(s) failed: {'; '.join(failures)}")

    def _pass(self, runs: list[dict[str, Any]], submit: bool = True) -> list[str]:
        """Reconcile every entry of ``runs`` with one batch poll, then submit new jobs."""
        now = self.ctx.now()
        work = [_Work(run, find_entry(run, self.key)) for run in runs]
        running = [w for w in work if w.entry and w.entry.get("status") == TRANSFERRING]
        ids = [w.entry["job_id"] for w in running
               if w.entry.get("job_id") and w.entry.get("job_backend") == self.backend.kind]
        self._mine_active: list[_Work] = []
        failures: list[str] = []
        try:
            polled = self.backend.poll(ids)
        except BatchError as exc:  # cannot tell what runs: decide nothing this pass
            log.error("batch system unavailable, nothing decided this pass: %s", exc)
            return [str(exc)]
        by_name = {s.name: s for s in polled.values() if s.active and s.name}
        for item in running:
            with log_context(run_label(item.run)):
                try:
                    failure = self._reconcile(item, polled, by_name, now)
                except LeaseLostError as exc:
                    log.warning("%s", exc)
                    failure = None
                except (CaxError, OSError) as exc:
                    log.error("%s", exc)
                    failure = f"{run_label(item.run)}: {exc}"
                if failure:
                    failures.append(failure)
        self._renew_active(now)
        if submit:
            fresh = [w for w in work if not (w.entry and w.entry.get("status") == TRANSFERRING)]
            failures += self._submit_new(fresh, now)
        return failures

    def _renew_active(self, now: dt.datetime) -> None:
        if self._mine_active and not self.ctx.dry_run:
            renewed = self.db.renew_leases(self.key, self.ctx.owner,
                                           self.ctx.config.lease_seconds)
            log.debug("renewed %d lease(s) of queued or running jobs", renewed)

    # -- one entry with a job ---------------------------------------------------------------

    def _reconcile(self, item: _Work, polled: dict[str, JobStatus],
                   by_name: dict[str, JobStatus], now: dt.datetime) -> str | None:
        entry = item.entry
        mine = entry.get("lease_owner") == self.ctx.owner
        expired = not entry.get("lease_expires") or as_utc(entry["lease_expires"]) <= now
        if not mine and not expired:
            return None  # another daemon looks after it
        status = self._job_status(item, polled, by_name)
        if not mine:
            if self.ctx.dry_run:
                log.info("dry run: would take over %s (job %s)", self.key,
                         status.state.value if status else "none")
                return None
            adopt = status is not None and status.active
            # The attempt is the job's: adopting it, or recording how it ended, counts none;
            # a claim whose daemon died before submitting anything is a new attempt.
            claimed = self.db.claim(
                item.run["_id"], self.key, owner=self.ctx.owner,
                lease_s=self.ctx.config.lease_seconds, statuses=[TRANSFERRING],
                fields={"job_id": status.job_id} if adopt else None,
                count_attempt=status is None)
            if claimed is None:
                return None  # another daemon was faster
            log.info("took over %s from %s (%s)", self.key, entry.get("lease_owner"),
                     f"adopting job {status.job_id}, {status.state.value}" if adopt
                     else "its job is gone" if status else "it never submitted a job")
            item.claim, item.entry = claimed, claimed.entry
            entry = claimed.entry
        elif item.claim is None:
            item.claim = _held(item.run, self.key, entry)
        if status is None:  # claimed, but no job was ever submitted (a crash in between)
            return self._start_job(item, now, takeover=True)
        if status.active:
            self._mine_active.append(item)
            return None
        return self._finished(item, status, now)

    def _job_status(self, item: _Work, polled: dict[str, JobStatus],
                    by_name: dict[str, JobStatus]) -> JobStatus | None:
        """What the batch system says of the entry's job: by id, else by name; None: no job."""
        entry = item.entry
        job_id = entry.get("job_id")
        if job_id and entry.get("job_backend") == self.backend.kind:
            return polled.get(job_id) or JobStatus(job_id, JobState.LOST)
        found = by_name.get(entry.get("job_name") or "")
        if found is not None:
            return found
        if job_id:  # recorded under another backend (the configuration changed)
            return JobStatus(job_id, JobState.LOST, detail=f"{entry.get('job_backend')} job")
        return None

    def _finished(self, item: _Work, status: JobStatus, now: dt.datetime) -> str | None:
        entry, run = item.entry, item.run
        token = entry.get("job_token") or ""
        log_file = job_log(self.processing, entry.get("job_name") or "", token)
        if status.state == JobState.LOST:
            status = recorded_status(status.job_id, log_file) or status
        final = output_path(self.site, self.processing, run)
        scratch = scratch_output(final, token)
        if status.state == JobState.COMPLETED:
            if not os.path.exists(scratch):
                return self._fail(item, f"job {status.job_id} completed but wrote no output "
                                  f"{scratch}", now)
            try:
                manifest = scan_dataset(scratch)
            except (OSError, ValueError) as exc:
                return self._fail(item, f"output of job {status.job_id} unreadable: {exc}", now,
                                  scratch)
            self._register(item, manifest, scratch, final, now)
            return None
        return self._fail(item, status.reason(log_file), now, scratch)

    # -- new jobs -------------------------------------------------------------------------

    def _submit_new(self, fresh: list[_Work], now: dt.datetime) -> list[str]:
        failures = []
        for item in fresh:
            if self.backend.free_slots() <= 0 or self.ctx.stop.is_set():
                break
            with log_context(run_label(item.run)):
                try:
                    if not self._wanted(item.run):
                        continue
                    if self.ctx.dry_run:
                        self._describe(item.run)
                        continue
                    if not self._claim_new(item, now):
                        continue
                    failure = self._start_job(item, now)
                except (CaxError, OSError) as exc:
                    log.error("%s", exc)
                    failure = f"{run_label(item.run)}: {exc}"
                if failure:
                    failures.append(failure)
        return failures

    def _wanted(self, run: dict[str, Any]) -> bool:
        """The conditions the query cannot check on a run it returned for another reason."""
        raw = find_entry(run, self.raw_key)
        tags = {t.get("name") for t in run.get("tags") or () if isinstance(t, dict)}
        return bool(raw and raw.get("status") == TRANSFERRED) and DONOTPROCESS not in tags

    def _claim_new(self, item: _Work, now: dt.datetime) -> bool:
        run, lease_s = item.run, self.ctx.config.lease_seconds
        fields = {"status": TRANSFERRING, "location": output_path(self.site, self.processing,
                                                                  run),
                  "creation_place": self.site.name, "pax_hash": self.processing.pax_hash,
                  "reading": self.raw_key.match(), "transfer_start": now}
        entry = {"checksum": None}
        claimed = self.db.claim(run["_id"], self.key, owner=self.ctx.owner, lease_s=lease_s,
                                statuses=[ERROR], conditions=retry_conditions(self.site, now),
                                fields=fields, new_entry=entry,
                                requires=[(self.raw_key, {"status": TRANSFERRED})])
        if claimed is None:
            return False
        item.claim, item.entry = claimed, claimed.entry
        return True

    def _job_spec(self, run: dict[str, Any], token: str) -> JobSpec:
        raw = find_entry(run, self.raw_key)
        source = checked_location(self.site, "raw", raw.get("location") if raw else None)
        final = output_path(self.site, self.processing, run)
        name = job_name(run, self.processing)
        values = placeholders(self.processing, run=run, site=self.site.name, input=source,
                              output=scratch_output(final, token), ncpus=self.ctx.ncpu)
        return JobSpec(name=name, argv=fill_command(self.processing, values),
                       output=job_log(self.processing, name, token),
                       resources=resources(self.processing, self.ctx.ncpu))

    def _describe(self, run: dict[str, Any]) -> None:
        spec = self._job_spec(run, "dry-run")
        log.info("dry run: would submit %s (%s backend): %s", spec.name, self.backend.kind,
                 " ".join(spec.argv))
        if isinstance(self.backend, SlurmBackend):
            log.info("dry run: sbatch script:\n%s", self.backend.script(spec))

    def _start_job(self, item: _Work, now: dt.datetime, takeover: bool = False) -> str | None:
        """Submit the job of a claimed entry and record its id; a refusal is a failure."""
        run, entry = item.run, item.entry
        token = secrets.token_hex(4)  # names the scratch output like every claim's scratch
        spec = self._job_spec(run, token)
        scratch = scratch_output(output_path(self.site, self.processing, run), token)
        os.makedirs(output_dir(self.site, self.processing), exist_ok=True)
        # Name and token first: a crash between submit and recording the id leaves a job that
        # a taker-over finds by its name.
        if not self.db.update_claimed(item.claim, {"job_name": spec.name, "job_token": token,
                                                   "job_backend": self.backend.kind,
                                                   "job_id": None, "partial": scratch}):
            raise LeaseLostError(f"{self.key}: claim lost before submitting")
        try:
            job_id = self.backend.submit(spec)
        except BatchError as exc:
            return self._fail(item, f"not submitted: {exc}", now)
        if not self.db.update_claimed(item.claim, {"job_id": job_id}):
            log.warning("%s: claim lost after submitting job %s; cancelling it", self.key, job_id)
            self.backend.cancel(job_id)
            return None
        item.entry = {**entry, "job_id": job_id, "job_token": token, "job_name": spec.name,
                      "job_backend": self.backend.kind}
        self._mine_active.append(item)
        log.info("%s job %s for %s (attempt %d)", "resubmitted" if takeover else "submitted",
                 job_id, self.key, entry.get("attempts", 1))
        return None

    # -- outcomes -------------------------------------------------------------------------

    def _register(self, item: _Work, manifest: dict, scratch: str, final: str,
                  now: dt.datetime) -> None:
        """Move the checksummed output into place, then register it ``transferred``."""
        run = item.run
        checksum = dataset_checksum(manifest)
        size = sum(size for size, _ in manifest.values())
        os.replace(scratch, final)
        self.db.save_manifest(run["_id"], self.key, manifest, checksum, now)
        fields = {"location": final, "checksum": checksum, "size": size,
                  "file_count": len(manifest), "pax_version": self.processing.version,
                  "pax_hash": self.processing.pax_hash, "creation_place": self.site.name,
                  "transfer_end": now}
        if not self.db.register_verified(item.claim, fields, unset=["reading", "partial"]):
            raise LeaseLostError(f"{self.key}: changed hands before registration")
        log.info("processed %s: %s (%d bytes, %s)", self.key, final, size, checksum[:20])

    def _fail(self, item: _Work, reason: str, now: dt.datetime, scratch: str | None = None) -> str:
        """Record a failed attempt: retry later, or stuck after ``max_attempts``; remove what
        the attempt left under its scratch name."""
        if scratch:
            _remove(scratch)
        attempts = item.entry.get("attempts", 1)
        stuck = attempts >= self.site.max_attempts
        reason = short_reason(Exception(reason), limit=600)
        retry_at = None if stuck else now + dt.timedelta(
            seconds=backoff_s(self.site.retry_backoff, attempts))
        if stuck:
            log.error("%s: failed, stuck after %d attempt(s): %s", self.key, attempts, reason)
        else:
            log.warning("%s: attempt %d failed, retry after %s: %s", self.key, attempts,
                        when(retry_at), reason)
        self.db.record_failure(item.claim, reason, kind="transient", retry_at=retry_at,
                               fields={"transfer_end": now}, unset=["reading", "partial"])
        return f"{run_label(item.run)}: {reason}"
