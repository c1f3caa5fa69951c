"""A view too slow to compute while a visitor waits: computed in a thread, served when ready.

The tape report is the one: its volume per month sums the size of every tape copy, which no
index holds, so it reads every tape copy -- as ``cax status --tape`` does.  On a MongoDB server
that is seconds at 100,000 runs; on the embedded store, minutes (``bench/web.py``), and the
store serves one operation at a time, so a visitor waiting for it would stall every other page.
Here it runs on its own runs-DB connection (its own SQLite reader), one computation at a time
however many ask, and again only when asked and the last one finished more than ``max_age_s``
ago -- or twice as long ago as it took, so that a report of minutes keeps at most a third of a
core busy.  A request gets the last value with the time it was taken; it waits up to ``wait_s``
for a newer one only when there is none yet or the last took less than that (the page then
says it is being computed and reloads itself).
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
        self._taken: dt.datetime | None = None  # when the computation of the value began
        self._finished: dt.datetime | None = None  # ... and when it ended
        self._took_s = 0.0
        self._started: float | None = None  # monotonic start of the computation under way
        self._error: str | None = None
        self._generation = 0  # computations finished

    def get(self) -> Snapshot[T]:
        """The last value, a newer one if it comes within ``wait_s`` (see the module)."""
        with self._lock:
            age = None if self._finished is None else \
                (self.clock() - self._finished).total_seconds()
            due = age is None or self._error is not None or \
                age > max(self.max_age_s, 2 * self._took_s)
            if due:
                if self._started is None:
                    self._start()
                if self._value is None or self._took_s < self.wait_s:
                    seen = self._generation
                    deadline = time.monotonic() + self.wait_s
                    while self._generation == seen and \
                            (left := deadline - time.monotonic()) > 0:
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
            self._took_s = time.monotonic() - (self._started or time.monotonic())
            log.info("cax web: %s computed in %.1f s", self.name, self._took_s)
            if error is None:
                self._value, self._taken, self._finished = value, taken, self.clock()
            self._error = error
            self._started = None
            self._generation += 1
            self._done.notify_all()
