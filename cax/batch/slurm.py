"""The ``slurm`` batch backend: sbatch, one squeue per pass, sacct for the finished.

A job is a small Python script (no shell: the ``#SBATCH`` lines are Python comments) that
``exec``s the job wrapper ``cax.batch.supervise`` with the processor's argument list as a
literal, so no runs-DB string ever passes through a shell.  It is submitted with
``sbatch --parsable``.

Reconciling is one ``squeue --user`` call for every own job (``-t all`` also lists jobs that
ended within MinJobAge), plus at most one ``sacct`` call for the asked-about jobs that squeue
no longer lists or that failed (for their exit code): ``sacct`` where the site has accounting,
``sacct --completion`` where it has only the job-completion file.  Without either, a job squeue
has forgotten is LOST and the caller reads the wrapper's status file.

Any failure or timeout of ``sbatch``, ``squeue`` or ``sacct`` raises BatchError: an unanswered
question is never taken for "queue empty" or "job gone".
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence

from cax import proc
from cax.batch.base import BatchBackend, JobSpec, JobState, JobStatus, status_path
from cax.errors import BatchError, BatchFullError, CommandError

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 60.0
ACCOUNTING = ("sacct", "completion", "none")
#: Resource values end up in ``#SBATCH`` lines: one token, nothing that could add a line.
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:@+=%/-]+$")

_STATES = {
    "PENDING": JobState.PENDING, "CONFIGURING": JobState.PENDING, "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING, "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING, "SUSPENDED": JobState.RUNNING,
    "RUNNING": JobState.RUNNING, "COMPLETING": JobState.RUNNING, "RESIZING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING, "STAGE_OUT": JobState.RUNNING, "STOPPED": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED, "FAILED": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED, "BOOT_FAIL": JobState.NODE_FAIL,
    "DEADLINE": JobState.TIMEOUT, "SPECIAL_EXIT": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED, "PREEMPTED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED, "TIMEOUT": JobState.TIMEOUT,
    "NODE_FAIL": JobState.NODE_FAIL,
}


def slurm_state(text: str) -> JobState:
    """Map a SLURM state (``CANCELLED by 0``, ``COMPLETING``, ...) to a JobState."""
    word = text.strip().split(" ", 1)[0].rstrip("+")
    try:
        return _STATES[word]
    except KeyError:
        raise BatchError(f"unknown SLURM job state {text!r}") from None


def slurm_time(seconds: float) -> str:
    """Format a wall time for ``--time`` (SLURM counts whole minutes; round up)."""
    minutes = max(math.ceil(seconds / 60), 1)
    days, rest = divmod(minutes, 24 * 60)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00"


def _exit_code(text: str) -> int | None:
    code = text.split(":", 1)[0]
    return int(code) if code.isdigit() else None


class SlurmBackend(BatchBackend):
    """Jobs on a SLURM cluster, at most ``max_jobs`` of this user's named ``prefix*`` at once."""

    kind = "slurm"

    def __init__(self, max_jobs: int, *, accounting: str = "completion", prefix: str = "cax_",
                 python: str | None = None, user: str | None = None,
                 timeout_s: float = COMMAND_TIMEOUT_S):
        super().__init__(max_jobs)
        if accounting not in ACCOUNTING:
            raise BatchError(f"accounting must be one of {', '.join(ACCOUNTING)}")
        self.accounting = accounting
        self.prefix = prefix
        self.python = python or sys.executable
        self.user = user or getpass.getuser()
        self.timeout_s = timeout_s
        self._active = 0
        self.squeue_calls = 0

    # -- scripts --------------------------------------------------------------------------

    def script(self, spec: JobSpec) -> str:
        """Return the batch script for ``spec`` (also what ``--dry-run`` prints)."""
        r = spec.resources
        options = [f"--job-name={spec.name}", "--ntasks=1", f"--cpus-per-task={r.ncpus}",
                   f"--mem-per-cpu={r.mem_per_cpu_mb}", f"--time={slurm_time(r.walltime_s)}",
                   f"--output={spec.output}"]
        for flag, value in (("partition", r.partition), ("qos", r.qos),
                            ("reservation", r.reservation), ("account", r.account)):
            if value:
                options.append(f"--{flag}={value}")
        for option in options:
            if not SAFE_VALUE.match(option.split("=", 1)[1]):
                raise BatchError(f"refusing sbatch option {option!r}: one plain token expected")
        argv = [self.python, "-m", "cax.batch.supervise", "--status", status_path(spec.output),
                "--", *spec.argv]
        lines = [f"#!{self.python}", *(f"#SBATCH {o}" for o in options),
                 "# Written by cax: runs the job wrapper with the processor's argument list.",
                 "import os",
                 f"os.environ.update({json.dumps(dict(spec.env or {}))})"]
        if spec.cwd:
            lines.append(f"os.chdir({json.dumps(spec.cwd)})")
        lines.append(f"os.execv({json.dumps(self.python)}, {json.dumps(argv)})")
        return "\n".join(lines) + "\n"

    @staticmethod
    def script_path(spec: JobSpec) -> str:
        return os.path.splitext(spec.output)[0] + ".sbatch"

    @staticmethod
    def submit_argv(script: str) -> list[str]:
        return ["sbatch", "--parsable", script]

    # -- the interface --------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> str:
        if self.free_slots() <= 0:
            raise BatchFullError(f"SLURM throttle: {self._active} own jobs queued "
                             f"(max {self.max_jobs})")
        path = self.script_path(spec)
        text = self.script(spec)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
        os.chmod(path, 0o755)
        out = self._run(self.submit_argv(path)).stdout.strip()
        job_id = out.split(";", 1)[0]
        if not job_id.isdigit():
            raise BatchError(f"sbatch answered {out[:200]!r}, not a job id")
        self._active += 1
        log.info("job %s submitted: %s", job_id, spec.name)
        return job_id

    def poll(self, job_ids: Iterable[str] = ()) -> dict[str, JobStatus]:
        wanted = [str(j) for j in job_ids]
        for job_id in wanted:
            if not job_id.isdigit():
                raise BatchError(f"not a SLURM job id: {job_id!r}")
        found = self._squeue()
        self._active = sum(1 for s in found.values() if s.active and s.name.startswith(
            self.prefix))
        ask = [j for j in wanted if j not in found or found[j].state == JobState.FAILED]
        if ask and self.accounting != "none":
            for job_id, status in self._sacct(ask).items():
                if job_id in found:
                    status = JobStatus(job_id, status.state, found[job_id].name,
                                       status.exit_code, found[job_id].detail or status.detail)
                found[job_id] = status
        for job_id in wanted:
            found.setdefault(job_id, JobStatus(job_id, JobState.LOST,
                                               detail="no longer known to SLURM"))
        return found

    def cancel(self, job_id: str) -> None:
        if not str(job_id).isdigit():
            raise BatchError(f"not a SLURM job id: {job_id!r}")
        self._run(["scancel", str(job_id)])

    def active_jobs(self) -> int:
        return self._active

    # -- helpers --------------------------------------------------------------------------

    def _run(self, argv: Sequence[str]):
        self.calls += 1
        try:
            return proc.run(argv, timeout=self.timeout_s)
        except CommandError as exc:
            raise BatchError(f"SLURM: {exc}") from exc

    def _squeue(self) -> dict[str, JobStatus]:
        """Every job of this user SLURM still lists, in one call."""
        self.squeue_calls += 1
        out = self._run(["squeue", "--noheader", "--states=all", f"--user={self.user}",
                         "--format=%i|%j|%T|%r"]).stdout
        found = {}
        for line in out.splitlines():
            if not line.strip():
                continue
            parts = line.strip().split("|")
            if len(parts) != 4:
                raise BatchError(f"squeue: unexpected line {line[:200]!r}")
            job_id, name, state, reason = parts
            detail = "" if reason in ("None", "(null)") else reason
            state = slurm_state(state)
            code = 0 if state == JobState.COMPLETED else None
            found[job_id] = JobStatus(job_id, state, name, code, detail)
        return found

    def _sacct(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """Final states and exit codes of ``job_ids``, in one call."""
        argv = ["sacct", "--noheader", "--parsable2", "--jobs", ",".join(job_ids),
                "--format=JobID,JobName,State,ExitCode"]
        if self.accounting == "completion":
            argv.insert(1, "--completion")
        else:
            argv.insert(1, "--allocations")
        out = self._run(argv).stdout
        found = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) < 4 or parts[0] not in job_ids:
                continue
            job_id, name, state, code = parts[:4]
            found[job_id] = JobStatus(job_id, slurm_state(state), name, _exit_code(code))
        return found
