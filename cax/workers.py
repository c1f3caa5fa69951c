"""Work that outlives one pass: transfers run in a small thread pool, so a slow copy never
blocks the other tasks, and the next pass can start while it goes on."""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

log = logging.getLogger(__name__)


class Background:
    """A bounded set of named jobs.  A job whose key is already running is not started twice."""

    def __init__(self, max_workers: int, prefix: str = "cax-work"):
        self.max_workers = max_workers
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix=prefix)
        self._running: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self.failures: list[str] = []

    def busy(self, key: str) -> bool:
        with self._lock:
            return key in self._running

    @property
    def full(self) -> bool:
        with self._lock:
            return len(self._running) >= self.max_workers

    def submit(self, key: str, fn: Callable[[], bool]) -> bool:
        """Start ``fn`` under ``key`` unless it runs already or all workers are busy.

        ``fn`` returns True on success; False or an exception counts as a failure.
        """
        with self._lock:
            if key in self._running or len(self._running) >= self.max_workers:
                return False
            ctx = contextvars.copy_context()
            future = self._pool.submit(ctx.run, fn)
            self._running[key] = future
        future.add_done_callback(functools.partial(self._done, key))
        return True

    def wait_for_slot(self) -> None:
        """Block until a worker is free (``--once`` copies everything in one pass)."""
        with self._freed:
            self._freed.wait_for(lambda: len(self._running) < self.max_workers)

    def _done(self, key: str, future: Future) -> None:
        with self._lock:
            self._running.pop(key, None)
            self._freed.notify_all()
            exc = future.exception()
            if exc is not None:
                log.error("%s: unexpected error: %r", key, exc, exc_info=exc)
                self.failures.append(f"{key}: {exc!r}")
            elif future.result() is False:
                self.failures.append(key)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every running job has finished."""
        with self._lock:
            futures = list(self._running.values())
        for future in futures:
            if not future.done():
                futures_wait([future], timeout)

    def take_failures(self) -> list[str]:
        with self._lock:
            failures, self.failures = self.failures, []
        return failures

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
