"""One poll of the batch system for every job a daemon waits on.

Each processing attempt waits for its own job in its own thread (under the Keeper of its
claim), but a cluster's admins do not want one ``squeue`` per job: the waiting threads share a
JobWatcher, which asks the backend about all of them in one call every ``interval_s`` seconds
and wakes each waiter when its job has a final state.  When the batch system cannot be asked,
nothing is concluded: the waiters keep waiting, and the failure is logged once per poll.
"""

from __future__ import annotations

import logging
import threading
import time

from cax.batch.base import BatchBackend, JobStatus
from cax.errors import BatchError

log = logging.getLogger(__name__)


class JobWatcher:
    """Polls ``backend`` for the jobs being waited on; ``wait`` blocks until one is final."""

    def __init__(self, backend: BatchBackend, interval_s: float):
        self.backend = backend
        self.interval_s = interval_s
        self._watched: dict[str, int] = {}  # job id -> number of waiters
        self._known: dict[str, JobStatus] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        #: Polls made, for the tests and benchmarks.
        self.polls = 0

    def wait(self, job_id: str, timeout_s: float) -> JobStatus | None:
        """Return the job's status once it is final, or the last known one (None: not polled
        yet) after ``timeout_s``."""
        end = time.monotonic() + timeout_s
        with self._cond:
            if not self._watched:
                self._cond.notify_all()  # the poll loop idles while nothing is watched
            self._watched[job_id] = self._watched.get(job_id, 0) + 1
            self._start()
            try:
                while not self._closed:
                    status = self._known.get(job_id)
                    left = end - time.monotonic()
                    if (status is not None and not status.active) or left <= 0:
                        return status
                    self._cond.wait(left)
                return self._known.get(job_id)
            finally:
                self._watched[job_id] -= 1
                if not self._watched[job_id]:
                    del self._watched[job_id]

    def forget(self, job_id: str) -> None:
        """Drop what is known of a job whose outcome was handled."""
        with self._cond:
            self._known.pop(job_id, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="cax-jobs")
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._watched)
                if self._closed:
                    return
                ids = sorted(self._watched)
            try:
                found = self.backend.poll(ids)
            except BatchError as exc:
                log.error("batch system not answering, nothing concluded: %s", exc)
                found = {}
            with self._cond:
                self.polls += 1
                for job_id, status in found.items():
                    previous = self._known.get(job_id)
                    if previous is None or previous.active:  # a final state is kept
                        self._known[job_id] = status
                self._cond.notify_all()
                self._cond.wait(self.interval_s)
