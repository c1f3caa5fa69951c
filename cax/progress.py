"""Progress of running copies: a live bar per copy on a terminal, a log line otherwise.

A physicist running ``cax --once --run N`` wants to see bytes, rate and time left; a daemon in
the background must not fill its log, so it writes one line per copy at most every 30 s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 30.0
REDRAW_INTERVAL_S = 0.25
BAR_WIDTH = 20


def _human(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Tracker:
    """Progress of one copy; call it with the number of new bytes."""

    def __init__(self, board: ProgressBoard, label: str, total: int):
        self.board, self.label, self.total = board, label, max(total, 0)
        self.done = 0
        self.started = self.last_log = time.monotonic()

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        self.board.update(self)

    def describe(self, bar: bool) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        fraction = min(self.done / self.total, 1.0) if self.total else 1.0
        left = (self.total - self.done) / rate if rate > 0 and self.total > self.done else 0
        filled = int(fraction * BAR_WIDTH)
        shape = f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] " if bar else ""
        return (f"{self.label} {shape}{fraction:4.0%} {_human(self.done)}/{_human(self.total)} "
                f"{_human(rate)}/s ETA {_clock(left)}")


class ProgressBoard:
    """All copies running in this process.  ``console`` draws one line on a terminal."""

    def __init__(self, console: Callable[[str], None] | None = None):
        self.console = console
        self._trackers: list[Tracker] = []
        self._lock = threading.Lock()
        self._drawn = 0.0

    def start(self, label: str, total: int) -> Tracker:
        tracker = Tracker(self, label, total)
        with self._lock:
            self._trackers.append(tracker)
        return tracker

    def finish(self, tracker: Tracker) -> None:
        with self._lock:
            if tracker in self._trackers:
                self._trackers.remove(tracker)
            remaining = list(self._trackers)
        if self.console:
            self.console(" | ".join(t.describe(bar=True) for t in remaining))

    def update(self, tracker: Tracker) -> None:
        now = time.monotonic()
        if self.console:
            if now - self._drawn >= REDRAW_INTERVAL_S:
                self._drawn = now
                with self._lock:
                    line = " | ".join(t.describe(bar=True) for t in self._trackers)
                self.console(line)
        elif now - tracker.last_log >= LOG_INTERVAL_S:
            tracker.last_log = now
            log.info("progress: %s", tracker.describe(bar=False))
