"""The tape report (``cax status --tape``): volume on tape per month, pending and failed datasets.

The original's ``cax-tsm-watch`` scraped log files into ROOT graphs and summed ``dsmc query``
sizes; the runs DB already knows every tape copy, so the report is two projected queries and
no tape client.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cax.clock import as_utc
from cax.config import Sites
from cax.runsdb import ERROR, TRANSFERRED, TRANSFERRING, RunsDB, run_label
from cax.schema import TAPE_METHODS

_FIELDS = {"number": 1, "name": 1, "start": 1, "data.host": 1, "data.type": 1,
           "data.status": 1, "data.size": 1, "data.verified_time": 1, "data.transfer_end": 1,
           "data.error": 1, "data.next_attempt": 1, "data.attempts": 1}


@dataclass(frozen=True)
class MonthRow:
    """Datasets and bytes that reached one tape site in one month (by verification time)."""

    tape: str
    month: str  # YYYY-MM
    datasets: int
    bytes: int


@dataclass(frozen=True)
class DatasetRow:
    """A dataset not (yet) on tape: pending (no entry, or under way) or failed."""

    tape: str
    run: str
    status: str  # "missing", "transferring", "error", "stuck"
    detail: str = ""


@dataclass
class TapeReport:
    months: list[MonthRow] = field(default_factory=list)
    pending: list[DatasetRow] = field(default_factory=list)
    failed: list[DatasetRow] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report as text, one row a line."""
        out = ["tape site     month    datasets            bytes"]
        out += [f"{m.tape:<13} {m.month}  {m.datasets:>8} {m.bytes:>16,}" for m in self.months]
        out.append(f"pending: {len(self.pending)}")
        out += [f"  {r.tape} {r.run}: {r.status}" for r in self.pending]
        out.append(f"failed: {len(self.failed)}")
        out += [f"  {r.tape} {r.run}: {r.status}: {r.detail}" for r in self.failed]
        return out


def tape_site_names(config: Sites) -> list[str]:
    return [s.name for s in config.sites if s.method in TAPE_METHODS]


def _month(entry: dict[str, Any]) -> str:
    when = entry.get("verified_time") or entry.get("transfer_end")
    return as_utc(when).strftime("%Y-%m") if isinstance(when, dt.datetime) else "unknown"


def tape_report(db: RunsDB, config: Sites) -> TapeReport:
    """Return the tape report for the tape sites of ``config``.

    Pending counts raw data verified at a site that backs up to that tape, with no good tape
    copy yet; failed lists tape entries in ``error`` (``stuck`` once no retry is scheduled).
    """
    report = TapeReport()
    tapes = tape_site_names(config)
    if not tapes:
        return report
    pushers = {t: [s.name for s in config.sites if t in s.upload_options] for t in tapes}
    on_tape = db.find_runs({"data": {"$elemMatch": {"host": {"$in": tapes}, "type": "raw"}}},
                           projection=_FIELDS)
    months: dict[tuple[str, str], list[int]] = {}
    for run in on_tape:
        for entry in _raw_entries(run, tapes):
            status, tape = entry.get("status"), entry["host"]
            if status == TRANSFERRED:
                row = months.setdefault((tape, _month(entry)), [0, 0])
                row[0] += 1
                row[1] += int(entry.get("size") or 0)
            elif status == ERROR:
                stuck = entry.get("next_attempt") is None
                report.failed.append(DatasetRow(tape, run_label(run),
                                                "stuck" if stuck else "error",
                                                str(entry.get("error") or "")))
            elif status == TRANSFERRING:
                report.pending.append(DatasetRow(tape, run_label(run), "transferring"))
    report.months = [MonthRow(t, m, n, b) for (t, m), (n, b) in sorted(months.items())]
    for tape, sources in pushers.items():
        if not sources:
            continue
        query = {"$and": [
            {"data": {"$elemMatch": {"host": {"$in": sources}, "type": "raw",
                                     "status": TRANSFERRED}}},
            {"data": {"$not": {"$elemMatch": {"host": tape, "type": "raw"}}}}]}
        for run in db.find_runs(query, projection=_FIELDS):
            report.pending.append(DatasetRow(tape, run_label(run), "missing"))
    return report


def _raw_entries(run: dict[str, Any], hosts: Iterable[str]) -> list[dict[str, Any]]:
    wanted = set(hosts)
    return [e for e in run.get("data") or () if e.get("host") in wanted and e.get("type") == "raw"]
