"""What each page of ``cax web`` shows, as plain values: the JSON of the page, and what its
template renders.

The views are those of ``cax status`` wherever one exists, built by the same functions
(``cax.admin.status``, ``cax.runsdb.stuck``, ``cax.tape.report``), so the page and ``cax status
--json`` can never disagree: the daemons page is ``cax status --json``, a run's page is ``cax
status --run N --json`` (each copy with every field it has), the stuck page ``cax status --stuck
--all-sites --json``, the tape page ``cax status --tape --json``.  Some say more: the runs x
sites matrix is paged and filtered, and each cell carries the checksum state of its copy
beside the summary's ``cells``; a run's copies carry all their fields; the tape report the time
it was taken (``app``).  The throughput view is the web's own.

Every view is a few indexed queries, as in ``cax status``: nothing here reads every run
document (see ``bench/web.py`` for the times at 100,000 runs).  Bad input raises ``PageError``
with the HTTP status it deserves; nothing here knows about HTTP beyond that number.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, overload

from cax.admin import cax_command
from cax.admin import status as st
from cax.clock import UTC, as_utc
from cax.config import Config
from cax.runsdb import ERROR, STATUSES, RunsDB
from cax.runsdb.stuck import DEFAULT_MAX_ATTEMPTS, error_reason
from cax.schema import DATA_TYPES, TAPE_METHODS
from cax.tape.report import tape_report

#: Runs per page of the matrix, by default and at most.
PER_PAGE, MAX_PER_PAGE = 50, 500
#: Days the throughput chart covers (today included).
THROUGHPUT_DAYS = 30
#: The matrix's status filter: an entry status, or ``none`` (no entry at the chosen site).
NO_ENTRY = "none"
#: The fields of the entries the matrix looks at (the summary's, and the checksum's).
MATRIX_FIELDS = {"number": 1, "name": 1, "start": 1, "data.host": 1, "data.type": 1,
                 "data.status": 1, "data.attempts": 1, "data.next_attempt": 1,
                 "data.error_kind": 1, "data.error": 1, "data.checksum": 1,
                 "data.checksum_problem": 1}


class PageError(Exception):
    """The request cannot be answered: ``status`` is the HTTP status (400, 404)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def to_json(value: Any) -> str:
    """``value`` as ``cax status --json`` prints it (times in ISO 8601), safe inside HTML too."""

    def plain(item: Any) -> Any:
        return item.isoformat() if hasattr(item, "isoformat") else str(item)

    text = json.dumps(value, indent=1, default=plain)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def command_prefix(config: Config) -> str:
    """How a printed ``cax retry`` calls cax, so that it works pasted into a shell as is:
    the command, the configuration and the site this website was started as."""
    return (f"{cax_command()} --config {shlex.quote(str(config.path))} "
            f"--host {shlex.quote(config.site.name)}")


@overload
def int_param(args: Mapping[str, str], name: str, default: int,
              low: int | None = None, high: int | None = None) -> int: ...
@overload
def int_param(args: Mapping[str, str], name: str, default: None = None,
              low: int | None = None, high: int | None = None) -> int | None: ...
def int_param(args: Mapping[str, str], name: str, default: int | None = None,
              low: int | None = None, high: int | None = None) -> int | None:
    """The whole number ``args[name]`` in ``low``..``high`` (else a 400), or ``default``."""
    raw = args.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise PageError(400, f"{name}: {raw[:40]!r} is not a whole number") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise PageError(400, f"{name}: {value} is out of range ({low} to {high})")
    return value


# -- the runs x sites matrix -------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixFilter:
    """What the matrix shows: runs by number, name, tag, or copy status (at a site)."""

    number: int | None = None
    name: str | None = None
    tag: str | None = None
    status: str | None = None
    site: str | None = None

    @classmethod
    def parse(cls, args: Mapping[str, str]) -> MatrixFilter:
        """Read the filter from query parameters; a bad value is a 400."""
        text = {f.name: (args.get(f.name) or "").strip() or None for f in fields(cls)
                if f.name != "number"}
        for name, value in text.items():
            if value is not None and len(value) > 200:
                raise PageError(400, f"{name}: longer than 200 characters")
        status = text["status"]
        if status is not None and status not in (*STATUSES, NO_ENTRY):
            raise PageError(400, f"status: {status[:40]!r} is not one of "
                                 f"{', '.join((*STATUSES, NO_ENTRY))}")
        if status == NO_ENTRY and text["site"] is None:
            raise PageError(400, f"status {NO_ENTRY!r} needs a site")
        return cls(number=int_param(args, "number"), **text)

    def query(self) -> dict[str, Any]:
        """The runs-DB filter: each part is one the indexes answer (number, name, tags.name,
        data.host/data.status)."""
        parts: list[dict[str, Any]] = []
        if self.number is not None:
            parts.append({"number": self.number})
        if self.name is not None:
            parts.append({"name": self.name})
        if self.tag is not None:
            parts.append({"tags.name": self.tag})
        if self.status == NO_ENTRY:
            parts.append({"data": {"$not": {"$elemMatch": {"host": self.site}}}})
        elif self.status is not None and self.site is not None:
            parts.append({"data": {"$elemMatch": {"host": self.site, "status": self.status}}})
        elif self.status is not None:
            parts.append({"data.status": self.status})
        elif self.site is not None:
            parts.append({"data.host": self.site})
        return parts[0] if len(parts) == 1 else ({"$and": parts} if parts else {})

    def params(self) -> dict[str, str]:
        """The filter as query parameters, for the links of the next page."""
        return {k: str(v) for k, v in asdict(self).items() if v is not None}


def parse_cursor(raw: str | None) -> tuple[dt.datetime | None, int] | None:
    """``older=<start in epoch ms or 'none'>_<number>``: where the previous page ended."""
    if not raw:
        return None
    start, _, number = raw.partition("_")
    try:
        when = None if start == "none" else \
            dt.datetime.fromtimestamp(int(start) / 1000, tz=UTC)
        return when, int(number)
    except (ValueError, OverflowError, OSError):
        raise PageError(400, f"older: {raw[:40]!r} is not a page of this website") from None


def _cursor(run: dict[str, Any]) -> str | None:
    start, number = run.get("start"), run.get("number")
    if not isinstance(number, int) or isinstance(number, bool):
        return None  # a number the keyset cannot continue from: no older page link
    if start is None:
        return f"none_{number}"
    if not isinstance(start, dt.datetime):
        return None
    return f"{int(as_utc(start).timestamp() * 1000)}_{number}"


def checksum_state(entry: dict[str, Any]) -> str:
    """``differs`` (found to differ from the reference copy), ``recorded`` or ``none``."""
    if entry.get("checksum_problem"):
        return "differs"
    checksum = entry.get("checksum")
    return "recorded" if isinstance(checksum, str) and checksum else "none"


def matrix(db: RunsDB, config: Config, flt: MatrixFilter, older: tuple | None = None,
           per_page: int = PER_PAGE) -> dict[str, Any]:
    """One page of the runs x sites matrix, newest first: ``cax status --summary --json``'s
    ``sites``, ``types`` and ``runs[].cells``, plus each cell's checksum state (``checks``),
    the run's start, and the cursor of the next (older) page.

    One sorted, limited find (the ``start`` index; the filter's own index narrows it).
    """
    sites = [site.name for site in config.sites]
    types = [t for t in DATA_TYPES if any(t in s.data_type for s in config.sites)] or ["raw"]
    limits = st.max_attempts_of(config)
    found = db.find_runs_older(flt.query(), older, projection=MATRIX_FIELDS,
                               limit=per_page + 1)
    rows = []
    for run in found[:per_page]:
        cells: dict[str, dict[str, str | None]] = {s: dict.fromkeys(types) for s in sites}
        checks: dict[str, dict[str, str | None]] = {s: dict.fromkeys(types) for s in sites}
        for e in run.get("data") or ():
            if not isinstance(e, dict) or e.get("host") not in cells \
                    or e.get("type") not in types:
                continue
            state = e.get("status")
            if state == ERROR and error_reason(e, limits.get(e["host"], DEFAULT_MAX_ATTEMPTS)):
                state = "stuck"
            cells[e["host"]][e["type"]] = state
            checks[e["host"]][e["type"]] = checksum_state(e)
        rows.append({"number": run.get("number"), "name": run.get("name"),
                     "start": run.get("start"), "cells": cells, "checks": checks})
    more = len(found) > per_page and bool(rows)
    return {"sites": sites, "types": types, "runs": rows, "filter": flt.params(),
            "per_page": per_page, "older": _cursor(found[per_page - 1]) if more else None}


# -- one run -------------------------------------------------------------------------------


def run_page(db: RunsDB, config: Config, number: int) -> list[dict[str, Any]]:
    """Every copy of the run(s) numbered ``number``: ``cax status --run N --json``, each copy
    with ``fields`` (every field it has, its whole history included), and whether it is a
    tape copy or processed data.  An unknown run is a 404."""
    runs = st.run_view(db, number)
    if not runs:
        raise PageError(404, f"no run {number} in the runs DB")
    tapes = {s.name for s in config.sites if s.method in TAPE_METHODS}
    full = {(r.get("number"), r.get("name")): r for r in db.find_runs({"number": number})}
    for run in runs:
        raw = full.get((run["number"], run["name"]), {})
        # by the copy's key, not its position: the run may have changed since run_view read it
        entries = {(e.get("host"), e.get("type"), e.get("pax_version")): e
                   for e in raw.get("data") or () if isinstance(e, dict)}
        for view in run["data"]:
            view["fields"] = entries.get((view["site"], view["type"], view["version"]), {})
            view["tape"] = view["site"] in tapes
    return runs


# -- daemons, stuck, tape ----------------------------------------------------------------------


def daemons_page(db: RunsDB, config: Config) -> dict[str, Any]:
    """``cax status --json``: the daemons, the copies by site, type and status, the stuck count
    (of every site: the website serves all of them)."""
    return st.overview(db, config, None)


def stuck_page(db: RunsDB, config: Config, site: str | None) -> list[dict[str, Any]]:
    """``cax status --stuck --json`` of ``site`` (None: every site), each with its command."""
    if site is not None and site not in {s.name for s in config.sites}:
        raise PageError(400, f"site: {site[:40]!r} is not a site of the configuration")
    prefix = command_prefix(config)
    return [e.as_dict(prefix) for e in st.stuck(db, config, st.now_of(db), site)]


def tape_page(db: RunsDB, config: Config) -> dict[str, Any]:
    """``cax status --tape --json``."""
    return asdict(tape_report(db, config))


# -- throughput ----------------------------------------------------------------------------


def throughput_since(now: dt.datetime, days: int = THROUGHPUT_DAYS) -> dt.datetime:
    """Midnight (UTC) of the first day shown.  The same all day long: the embedded store then
    answers the query from what it remembers of the last one (``find_registered_since``)."""
    first = as_utc(now).date() - dt.timedelta(days=days - 1)
    return dt.datetime(first.year, first.month, first.day, tzinfo=UTC)


def throughput(db: RunsDB, now: dt.datetime | None = None,
               days: int = THROUGHPUT_DAYS) -> dict[str, Any]:
    """Bytes and copies registered per site per UTC day over the last ``days`` days."""
    now = as_utc(now or st.now_of(db))
    since = throughput_since(now, days)
    dates = [(since + dt.timedelta(days=i)).date() for i in range(days)]
    index = {d: i for i, d in enumerate(dates)}
    sizes: dict[str, list[int]] = {}
    counts: dict[str, list[int]] = {}
    for copy in db.find_registered_since(since):
        day = index.get(as_utc(copy["time"]).date())
        if day is None:  # registered "in the future" by a clock ahead of the runs DB's
            continue
        site = str(copy["host"])
        sizes.setdefault(site, [0] * days)[day] += int(copy["size"] or 0) \
            if isinstance(copy["size"], (int, float)) else 0
        counts.setdefault(site, [0] * days)[day] += 1
    sites = sorted(sizes)
    return {"since": since, "until": now, "days": [d.isoformat() for d in dates],
            "sites": sites, "bytes": {s: sizes[s] for s in sites},
            "copies": {s: counts[s] for s in sites}}
