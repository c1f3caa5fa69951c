"""A view too slow to compute while a visitor waits: computed in a thread, served when ready.

The tape report is the one: its volume per month sums the size of every tape copy, which no
index holds, so it reads every tape copy -- as ``cax status --tape`` does.  On a MongoDB server
that is seconds at 100,000 runs; on the embedded store, minutes (``bench/web.py``), and the
store serves one operation at a time, so a visitor waiting for it would stall every other page.
Here it runs on its own runs-DB connection (its own SQLite reader), one computation at a time
however many ask; a request waits ``wait_s`` for a fresh value and otherwise gets the last one
with the time it was taken, or none yet (the page then says so and reloads itself).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Snapshot(Generic[T]):
    """The last value (None: not computed yet), when its computation began, and whether a
    newer one is being computed; ``error`` if the last computation failed."""

    value: T | None
    taken: dt.datetime | None
    computing: bool
    error: str | None = None


class BackgroundView(Generic[T]):
    """``compute()`` run in a thread when its last value is older than ``max_age_s``."""

    def __init__(self, name: str, compute: Callable[[], T], *, max_age_s: float = 60.0,
                 wait_s: float = 0.5,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)):
        self.name = name
        self.compute = compute
        self.max_age_s = max_age_s
        self.wait_s = wait_s
        self.clock = clock
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._value: T | None = None
        self._taken: dt.datetime | None = None
        self._started: float | None = None  # monotonic start of the computation under way
        self._error: str | None = None
        self._generation = 0  # computations finished

    def get(self) -> Snapshot[T]:
        """The freshest value to be had within ``wait_s``; starts a computation if due."""
        with self._lock:
            fresh = self._taken is not None and self._error is None and \
                (self.clock() - self._taken).total_seconds() <= self.max_age_s
            if not fresh:
                if self._started is None:
                    self._start()
                seen = self._generation
                deadline = time.monotonic() + self.wait_s
                while self._generation == seen and (left := deadline - time.monotonic()) > 0:
                    self._done.wait(left)
            return Snapshot(self._value, self._taken, self._started is not None, self._error)

    def _start(self) -> None:
        self._started = time.monotonic()
        taken = self.clock()
        threading.Thread(target=self._run, args=(taken,), name=f"cax-web-{self.name}",
                         daemon=True).start()

    def _run(self, taken: dt.datetime) -> None:
        try:
            value: Any = self.compute()
            error = None
        except Exception as exc:  # reported on the page; the next request tries again
            log.warning("cax web: %s not computed: %s", self.name, exc)
            value, error = None, str(exc)
        with self._lock:
            log.info("cax web: %s computed in %.1f s", self.name,
                     time.monotonic() - (self._started or time.monotonic()))
            if error is None:
                self._value, self._taken = value, taken
            self._error = error
            self._started = None
            self._generation += 1
            self._done.notify_all()
