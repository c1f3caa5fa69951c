"""The batch interface: submit a job, poll all of one's jobs at once, cancel one.

Processing hands its processor command to a batch system rather than running it in the pass:
a bounded pool of local subprocesses (``local``) or a SLURM cluster (``slurm``).  Both backends
answer the same questions with the same vocabulary, so the task that drives them (and its
tests) cannot tell them apart.  Polling is one call for every job, however many: a cluster's
admins do not want one ``squeue`` per job, and a pass over 500 queued jobs must stay cheap.

A backend never guesses.  When it cannot learn the truth (``squeue`` fails or hangs) it raises
BatchError; "I could not ask" must never read as "the job is gone".
"""

from __future__ import annotations

import enum
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

TAIL_LINES = 10
TAIL_BYTES = 4096


@dataclass(frozen=True)
class Resources:
    """What a job asks of the batch system (the local backend honours ``ncpus`` only as info)."""

    ncpus: int = 1
    mem_per_cpu_mb: int = 2000
    walltime_s: float = 48 * 3600
    partition: str | None = None
    qos: str | None = None
    reservation: str | None = None
    account: str | None = None


@dataclass(frozen=True)
class JobSpec:
    """One job: a name the admins can read, an argument list (never a shell string), its
    resources, and the file that receives its stdout and stderr."""

    name: str
    argv: tuple[str, ...]
    output: str
    resources: Resources = field(default_factory=Resources)
    env: Mapping[str, str] | None = None  # extra variables for the job
    cwd: str | None = None


class JobState(str, enum.Enum):
    """Where a job is.  PENDING and RUNNING are active; everything else is final."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    NODE_FAIL = "node_fail"
    #: Gone from the batch system with no record of how it ended (e.g. records expired).
    LOST = "lost"

    @property
    def active(self) -> bool:
        return self in (JobState.PENDING, JobState.RUNNING)


@dataclass(frozen=True)
class JobStatus:
    """What the batch system knows of one job."""

    job_id: str
    state: JobState
    name: str = ""
    exit_code: int | None = None
    detail: str = ""  # the batch system's own reason (e.g. "CANCELLED by 0", "Priority")

    @property
    def active(self) -> bool:
        return self.state.active

    def reason(self, output: str | None = None) -> str:
        """One readable line of why a final job did not succeed, with its output's tail."""
        parts = [f"job {self.job_id} {self.state.value}"]
        if self.exit_code not in (None, 0):
            parts.append(f"exit code {self.exit_code}")
        if self.detail:
            parts.append(self.detail)
        text = ", ".join(parts)
        tail = output_tail(output) if output else ""
        return f"{text}: {tail}" if tail else text


def output_tail(path: str, lines: int = TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a job's output file, joined by `` | ``; '' if none."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(size - TAIL_BYTES, 0))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [line.strip() for line in data.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


class BatchBackend(ABC):
    """A batch system as processing sees it."""

    #: ``local`` or ``slurm``; recorded with each job id in the runs DB.
    kind: str = ""

    def __init__(self, max_jobs: int):
        self.max_jobs = max_jobs
        #: Calls made to the batch system (submit, poll, cancel), for the benchmarks.
        self.calls = 0

    @abstractmethod
    def submit(self, spec: JobSpec) -> str:
        """Queue ``spec``; return its job id.  Raises BatchError if it was not queued."""

    @abstractmethod
    def poll(self, job_ids: Iterable[str] = ()) -> dict[str, JobStatus]:
        """Return the state of every own active job and of each of ``job_ids``, in one call.

        A job id the batch system has no record of is reported LOST, never omitted; an id that
        is malformed or belongs to another machine raises BatchError.  Raises BatchError when
        the batch system cannot be asked.
        """

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Ask the batch system to end the job (a job already gone is not an error)."""

    @abstractmethod
    def active_jobs(self) -> int:
        """How many own jobs are pending or running, as of the last poll or submit."""

    def free_slots(self) -> int:
        """How many more jobs may be queued now (the throttle: ``max_jobs`` own jobs)."""
        return max(self.max_jobs - self.active_jobs(), 0)

    def close(self) -> None:  # noqa: B027 - a hook whose default does nothing, not abstract
        """Release what the backend holds (the local backend ends its jobs)."""


def status_path(output: str) -> str:
    """Where the job wrapper records how a job ended: beside its output."""
    return output + ".status"


def recorded_status(job_id: str, output: str) -> JobStatus | None:
    """Return how the job ended as its wrapper recorded it, or None if it recorded nothing.

    The wrapper writes this file atomically when the processor exits, so it outlives both the
    daemon that started the job and the batch system's memory of it.
    """
    import json

    try:
        with open(status_path(output)) as fh:
            data = json.load(fh)
        state = JobState(data["state"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    code = data.get("exit_code")
    return JobStatus(job_id, state, exit_code=code if isinstance(code, int) else None,
                     detail=str(data.get("detail") or ""))
