"""The ``local`` batch backend: a bounded pool of subprocesses on this machine.

Each job is the processor under the job wrapper (``cax.batch.supervise``), in its own process
group, with its output in a file.  The wrapper enforces the timeout (a hung processor is killed
with its group) and, through ``PR_SET_PDEATHSIG``, ends the job when the daemon dies, even by
``kill -9``.  The kernel sends that signal when the *thread* that forked the child exits, so
every job is started from one long-lived spawner thread, never from a short-lived worker.

A job id is ``local:<host>:<pid>:<start ticks>``: any daemon on this machine can tell from the
id alone whether that exact process still runs (the start time guards against a reused pid),
which is what a daemon taking over a crashed one's claim must know before it starts anything.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cax.batch.base import (
    BatchBackend,
    JobSpec,
    JobState,
    JobStatus,
    recorded_status,
    status_path,
)
from cax.errors import BatchError, BatchFullError

log = logging.getLogger(__name__)

CLOSE_WAIT_S = 15.0


def _host() -> str:
    return socket.gethostname().split(".", 1)[0]


def process_start_ticks(pid: int) -> int | None:
    """Return the start time of process ``pid`` (clock ticks since boot), or None if it is gone
    or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


@dataclass
class _Job:
    spec: JobSpec
    proc: subprocess.Popen


class LocalBackend(BatchBackend):
    """Runs up to ``max_jobs`` jobs at once as subprocesses, each killed after ``timeout_s``."""

    kind = "local"

    def __init__(self, max_jobs: int, timeout_s: float | None = None):
        super().__init__(max_jobs)
        self.timeout_s = timeout_s
        self.host = _host()
        self._jobs: dict[str, _Job] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="cax-batch-spawner")

    # -- the interface --------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> str:
        self.calls += 1
        if self.free_slots() <= 0:
            raise BatchFullError(f"local batch queue full ({self.max_jobs} jobs running)")
        try:
            proc = self._spawner.submit(self._spawn, spec).result()
        except OSError as exc:
            raise BatchError(f"cannot start job {spec.name}: {exc}") from exc
        ticks = process_start_ticks(proc.pid)
        job_id = f"local:{self.host}:{proc.pid}:{ticks if ticks is not None else 0}"
        with self._lock:
            self._jobs[job_id] = _Job(spec, proc)
        log.info("job %s started: %s (%s)", job_id, spec.name, " ".join(spec.argv)[:300])
        return job_id

    def poll(self, job_ids: Iterable[str] = ()) -> dict[str, JobStatus]:
        self.calls += 1
        found: dict[str, JobStatus] = {}
        with self._lock:
            for job_id, job in list(self._jobs.items()):
                if job.proc.poll() is None:
                    found[job_id] = JobStatus(job_id, JobState.RUNNING, job.spec.name)
                    continue
                del self._jobs[job_id]
                found[job_id] = self._final(job_id, job)
        for job_id in job_ids:
            if job_id not in found:
                found[job_id] = self._foreign(job_id)
        return found

    def cancel(self, job_id: str) -> None:
        self.calls += 1
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None:
            self._cancelled.add(job_id)
            _signal(job.proc.pid, signal.SIGTERM)
            return
        pid = self._live_pid(job_id)
        if pid is not None:
            _signal(pid, signal.SIGTERM)

    def active_jobs(self) -> int:
        with self._lock:
            return sum(1 for job in self._jobs.values() if job.proc.poll() is None)

    def close(self) -> None:
        """End every job still running (their wrapper kills the processor groups) and wait."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.proc.poll() is None:
                _signal(job.proc.pid, signal.SIGTERM)
        for job in jobs:
            try:
                job.proc.wait(CLOSE_WAIT_S)
            except subprocess.TimeoutExpired:
                _signal(job.proc.pid, signal.SIGKILL)
                job.proc.wait()
        self._spawner.shutdown(wait=True)

    # -- helpers --------------------------------------------------------------------------

    def _spawn(self, spec: JobSpec) -> subprocess.Popen:
        """Start the wrapper (in the spawner thread: see the module docstring)."""
        argv = [sys.executable, "-m", "cax.batch.supervise", "--status", status_path(spec.output),
                "--parent", str(os.getpid())]
        if self.timeout_s:
            argv += ["--timeout", f"{self.timeout_s:g}"]
        argv += ["--", *spec.argv]
        os.makedirs(os.path.dirname(spec.output) or ".", exist_ok=True)
        try:
            os.unlink(status_path(spec.output))
        except FileNotFoundError:
            pass
        env = {**os.environ, **(spec.env or {})}
        with open(spec.output, "ab") as out:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=spec.cwd, env=env,
                                    start_new_session=True)

    def _final(self, job_id: str, job: _Job) -> JobStatus:
        recorded = recorded_status(job_id, job.spec.output)
        if recorded is not None:
            return JobStatus(job_id, recorded.state, job.spec.name, recorded.exit_code,
                             recorded.detail)
        code = job.proc.returncode
        if job_id in self._cancelled:  # ended before its wrapper could record anything
            return JobStatus(job_id, JobState.CANCELLED, job.spec.name, code, "cancelled")
        detail = f"wrapper killed by {signal.Signals(-code).name}" if code < 0 else \
            "wrapper recorded no status"
        return JobStatus(job_id, JobState.FAILED, job.spec.name, code, detail)

    def _parse(self, job_id: str) -> tuple[str, int, int]:
        parts = job_id.split(":")
        if len(parts) != 4 or parts[0] != "local" or not (parts[2].isdigit()
                                                          and parts[3].isdigit()):
            raise BatchError(f"not a local job id: {job_id!r}")
        return parts[1], int(parts[2]), int(parts[3])

    def _live_pid(self, job_id: str) -> int | None:
        host, pid, ticks = self._parse(job_id)
        if host != self.host:
            raise BatchError(f"job {job_id} ran on {host}; this is {self.host}: cannot tell "
                             f"whether it still runs")
        return pid if process_start_ticks(pid) == ticks else None

    def _foreign(self, job_id: str) -> JobStatus:
        """A job this backend did not start (another daemon's): alive or gone, from /proc."""
        if self._live_pid(job_id) is not None:
            return JobStatus(job_id, JobState.RUNNING)
        return JobStatus(job_id, JobState.LOST, detail="process gone")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
