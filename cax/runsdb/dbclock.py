"""The one clock every lease is written and judged by: the runs DB's own.

Leases are written by one daemon and judged by another, often on another machine.  Judged by
each machine's clock, a daemon whose clock runs 90 s ahead takes over every lease of a few
minutes' length early, and two owners end up writing the same bytes.  So cax never uses a
machine's wall clock for runs-DB decisions.  It asks the database for its time (MongoDB:
``hello``'s ``localTime``; the embedded store: the kernel time of the machine that holds its
files) and carries that reading forward with this machine's *monotonic* clock::

    runs-DB time = its time at the last reading + monotonic time elapsed since

A step of the wall clock (an NTP correction, a person running ``date -s``) therefore changes
nothing: the monotonic clock never jumps, and the Keeper's watchdog, which stops the work before
a lease can expire, measures on that same clock.  The reading is repeated every ``resync_s``
seconds; its error is half a round trip plus the drift of the monotonic clock since: milliseconds,
against leases of minutes.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

from cax.clock import as_utc, utcnow

log = logging.getLogger(__name__)

ServerTime = Callable[[], dt.datetime]


class DBClock:
    """``now()`` is the runs DB's time: its last reading carried forward by a monotonic clock.

    ``local`` (this machine's wall clock) only serves the log line that reports how far the two
    clocks differ, and the runs DB that cannot tell its time (``server_time`` None).
    """

    def __init__(self, server_time: ServerTime | None, local: Callable[[], dt.datetime] = utcnow,
                 resync_s: float = 60.0, monotonic: Callable[[], float] = time.monotonic):
        self.server_time = server_time
        self.local = local
        self.resync_s = resync_s
        self.monotonic = monotonic
        self.offset = dt.timedelta(0)  # of the runs DB's clock from this machine's, for logs
        self._base: dt.datetime | None = None  # the runs DB's time at ...
        self._base_mono = 0.0  # ... this monotonic instant
        self._synced_at: float | None = None
        self._lock = threading.Lock()

    def sync(self) -> dt.timedelta:
        """Read the runs DB's clock; return its offset from ours; raise if it cannot be asked."""
        if self.server_time is None:  # no clock of its own: this machine's, carried forward
            with self._lock:
                self._base, self._base_mono = as_utc(self.local()), self.monotonic()
                self._synced_at = self._base_mono
            return self.offset
        before = self.monotonic()
        server = as_utc(self.server_time())
        after = self.monotonic()
        middle = before + (after - before) / 2
        offset = server - as_utc(self.local())
        with self._lock:
            if abs(offset - self.offset) > dt.timedelta(seconds=1):
                log.info("runs DB clock is %+.1f s from this machine's", offset.total_seconds())
            self.offset = offset
            self._base, self._base_mono = server, middle
            self._synced_at = after
        return offset

    def now(self) -> dt.datetime:
        """Return the runs DB's current time (UTC, to the millisecond, as BSON keeps it).

        The reading is repeated when it is older than ``resync_s``; if the runs DB cannot be
        asked then, the last reading is carried forward (the monotonic clock drifts by far less
        than a lease), and the failure surfaces in the next real operation.
        """
        synced = self._synced_at
        if synced is None or self.monotonic() - synced > self.resync_s:
            try:
                self.sync()
            except Exception as exc:  # the DB being away must not break reading the time
                if synced is None:
                    raise
                log.debug("runs DB clock not read again: %s", exc)
                self._synced_at = self.monotonic() - self.resync_s / 2
        with self._lock:
            base, base_mono = self._base, self._base_mono
        assert base is not None
        value = base + dt.timedelta(seconds=self.monotonic() - base_mono)
        return value.replace(microsecond=value.microsecond // 1000 * 1000)
