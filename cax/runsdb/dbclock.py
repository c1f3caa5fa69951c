"""The one clock every lease is written and judged by: the runs DB's own.

Leases are written by one daemon and judged by another, often on another machine.  Judged by
each machine's clock, a daemon whose clock runs 90 s ahead takes over every lease of a few
minutes' length early, and two owners end up writing the same bytes.  So cax never uses a
machine's own clock for runs-DB decisions: it estimates the runs DB's clock as an offset from
the local one, measured by asking the database for its time (MongoDB: ``hello``'s
``localTime``; the embedded store: the kernel time of the machine that holds its files), and
measured again every ``resync_s`` seconds.  The error of the estimate is half a round trip
plus the drift since the last measurement: milliseconds, against leases of minutes.
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
    """``now()`` is the runs DB's time, estimated from this machine's clock and an offset."""

    def __init__(self, server_time: ServerTime | None, local: Callable[[], dt.datetime] = utcnow,
                 resync_s: float = 60.0):
        self.server_time = server_time
        self.local = local
        self.resync_s = resync_s
        self.offset = dt.timedelta(0)
        self._synced_at: float | None = None
        self._lock = threading.Lock()

    def sync(self) -> dt.timedelta:
        """Measure the offset of the runs DB's clock from ours; raise if it cannot be asked."""
        if self.server_time is None:
            self._synced_at = time.monotonic()
            return self.offset
        before = self.local()
        server = as_utc(self.server_time())
        after = self.local()
        offset = server - (before + (after - before) / 2)
        with self._lock:
            if abs(offset - self.offset) > dt.timedelta(seconds=1):
                log.info("runs DB clock is %+.1f s from this machine's", offset.total_seconds())
            self.offset = offset
            self._synced_at = time.monotonic()
        return offset

    def now(self) -> dt.datetime:
        """Return the runs DB's current time (UTC, to the millisecond, as BSON keeps it).

        The offset is measured again when it is older than ``resync_s``; if the runs DB cannot
        be asked then, the last offset is used (it drifts by far less than a lease), and the
        failure surfaces in the next real operation.
        """
        synced = self._synced_at
        if synced is None or time.monotonic() - synced > self.resync_s:
            try:
                self.sync()
            except Exception as exc:  # the DB being away must not break reading the time
                if synced is None:
                    raise
                log.debug("runs DB clock not measured again: %s", exc)
                self._synced_at = time.monotonic() - self.resync_s / 2
        value = self.local() + self.offset
        return value.replace(microsecond=value.microsecond // 1000 * 1000)
