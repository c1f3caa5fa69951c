"""Prometheus metrics of a daemon: written after every pass, served over HTTP on request.

After each pass the daemon takes a snapshot (a few runs-DB queries: the copy counts, the copies
this site finished since the last snapshot, the stuck entries, the heartbeats) and

* writes it in the text format to a file for node_exporter's textfile collector
  (``--metrics-file``; prometheus_client writes a temporary file and renames it, so the
  collector never reads half a file), and/or
* serves it over HTTP (``--metrics-port``, on ``--metrics-bind``, 127.0.0.1 by default), from
  the same snapshot: a scrape costs the runs DB nothing.

Counters (bytes and files moved, errors, passes) count since the daemon started, as
Prometheus expects; ``rate()`` copes with restarts.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cax.clock import as_utc
from cax.runsdb import TRANSFERRED, RunsDB
from cax.runsdb.stuck import find_stuck

log = logging.getLogger(__name__)

#: Address the HTTP endpoint listens on by default: metrics are for a local Prometheus.
LISTEN = "127.0.0.1"


def finished_copies(db: RunsDB, site: str, since: dt.datetime, until: dt.datetime
                    ) -> list[dict[str, Any]]:
    """The copies made at or from ``site`` that became ``transferred`` in (since, until]."""
    window = {"$gt": since, "$lte": until}
    query = {"data": {"$elemMatch": {"status": TRANSFERRED, "transfer_end": window,
                                     "$or": [{"host": site}, {"source": site}]}}}
    projection = {"data.host": 1, "data.source": 1, "data.status": 1, "data.size": 1,
                  "data.file_count": 1, "data.transfer_start": 1, "data.transfer_end": 1}
    found = []
    for run in db.find_runs(query, projection=projection):
        for e in run.get("data") or ():
            end = e.get("transfer_end")
            if e.get("status") == TRANSFERRED and site in (e.get("host"), e.get("source")) \
                    and isinstance(end, dt.datetime) and since < as_utc(end) <= until:
                found.append(e)
    return found


def newest_heartbeats(beats: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dt.datetime]:
    """The time of the newest heartbeat of each (site, machine).

    One series per site and machine, not per process: every restart of a daemon writes a
    heartbeat document of its own, and a label naming the process would leave a series
    behind at every restart.
    """
    newest: dict[tuple[str, str], dt.datetime] = {}
    for hb in beats:
        updated = hb.get("updated")
        if isinstance(updated, dt.datetime):
            key = (str(hb.get("site")), str(hb.get("host")))
            newest[key] = max(newest.get(key, as_utc(updated)), as_utc(updated))
    return newest


class DaemonMetrics:
    """A prometheus_client collector holding the latest snapshot of one daemon."""

    def __init__(self, site: str, started: dt.datetime):
        self.site = site
        self.since = started
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._lock = threading.Lock()
        self._families: list[Metric] = []
        self.moved_bytes = 0
        self.moved_files = 0
        self.passes = 0
        self.errors: Counter[str] = Counter()
        self._server: Any = None

    # -- the collector interface ----------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            return list(self._families)

    # -- snapshots ------------------------------------------------------------------------

    def observe(self, db: RunsDB, *, now: dt.datetime, pass_start: dt.datetime,
                failed_by_task: dict[str, int], max_attempts: dict[str, int],
                heartbeat_states: dict[str, str] | None = None) -> None:
        """Take the snapshot after a pass (the daemon calls this once per pass)."""
        site = self.site
        copies = db.count_copies()
        done = finished_copies(db, site, self.since, now)
        self.since = now
        nbytes = sum(int(e.get("size") or 0) for e in done)
        seconds = sum(max((as_utc(e["transfer_end"]) - as_utc(e["transfer_start"]))
                          .total_seconds(), 0.0) for e in done
                      if isinstance(e.get("transfer_start"), dt.datetime))
        self.moved_bytes += nbytes
        self.moved_files += sum(int(e.get("file_count") or 0) for e in done)
        self.passes += 1
        for task, failed in failed_by_task.items():
            self.errors[task] += failed
        stuck = find_stuck(db, now, max_attempts=max_attempts, site=site)
        beats = db.find_heartbeats()

        fams: list[Metric] = []
        g = GaugeMetricFamily("cax_copies", "Data entries in the runs DB by site, type and "
                              "status.", labels=["site", "type", "status"])
        for row in copies:
            g.add_metric([str(row.get("host")), str(row.get("type")), str(row.get("status"))],
                         row["count"])
        fams.append(g)
        c = CounterMetricFamily("cax_moved_bytes", "Bytes of copies made at or from this site "
                                "since the daemon started.", labels=["site"])
        c.add_metric([site], self.moved_bytes)
        fams.append(c)
        c = CounterMetricFamily("cax_moved_files", "Files of copies made at or from this site "
                                "since the daemon started.", labels=["site"])
        c.add_metric([site], self.moved_files)
        fams.append(c)
        g = GaugeMetricFamily("cax_transfer_rate_bytes_per_second", "Bytes per second of the "
                              "copies finished since the previous pass (0: none).",
                              labels=["site"])
        g.add_metric([site], nbytes / seconds if seconds > 0 else 0.0)
        fams.append(g)
        g = GaugeMetricFamily("cax_pass_duration_seconds", "Duration of the last pass.",
                              labels=["site"])
        g.add_metric([site], max((now - pass_start).total_seconds(), 0.0))
        fams.append(g)
        c = CounterMetricFamily("cax_passes", "Passes since the daemon started.",
                                labels=["site"])
        c.add_metric([site], self.passes)
        fams.append(c)
        c = CounterMetricFamily("cax_task_errors", "Failed items by task since the daemon "
                                "started.", labels=["site", "task"])
        for task in sorted(self.errors):
            c.add_metric([site, task], self.errors[task])
        fams.append(c)
        g = GaugeMetricFamily("cax_stuck_entries", "Entries concerning this site that wait "
                              "for a person (cax status --stuck).", labels=["site"])
        g.add_metric([site], len(stuck))
        fams.append(g)
        g = GaugeMetricFamily("cax_last_pass_timestamp_seconds", "When the last pass ended "
                              "(Unix time).", labels=["site"])
        g.add_metric([site], now.timestamp())
        fams.append(g)
        g = GaugeMetricFamily("cax_heartbeat_age_seconds", "Age of the newest heartbeat of "
                              "the daemons of each site and machine in the runs DB.",
                              labels=["site", "host"])
        for (hb_site, host), updated in sorted(newest_heartbeats(beats).items()):
            g.add_metric([hb_site, host], max((now - updated).total_seconds(), 0.0))
        fams.append(g)
        with self._lock:
            self._families = fams

    # -- outputs --------------------------------------------------------------------------

    def write(self, path: str | Path) -> None:
        """Write the snapshot for node_exporter's textfile collector (atomically)."""
        write_to_textfile(str(path), self.registry)

    def serve(self, port: int, address: str = LISTEN) -> int:
        """Serve the snapshot on ``address``:``port`` (0: any free port); return the port.

        Raises OSError if the address cannot be listened on (in use, not this machine's).
        """
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
