"""``cax status``: what the daemons do, where every copy is, and what waits for a person.

Every view is a plain value (for ``--json``) plus a renderer to text, built from a few indexed
queries: the heartbeats (``cax_daemons``, one document per daemon), one aggregation counting
copies by site, type and status, the two stuck queries of ``cax.runsdb.stuck``, and for
``--summary`` one sorted, limited find of the newest runs.  Nothing scans run documents in
Python beyond what a query returned, so the views stay fast on 100,000 runs.

A daemon is judged from its heartbeat, written at the end of every pass: it is *alive* while
the heartbeat is younger than two of its intervals (its pause between passes plus its last
pass's duration) and a margin, *late* up to ten intervals, then *dead*; a daemon that stopped
on a signal says so.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cax.clock import as_utc, utcnow
from cax.config import Site, Sites
from cax.runsdb import (
    ERROR,
    PURGING,
    TRANSFERRED,
    TRANSFERRING,
    VERIFYING,
    RunsDB,
    safe_component,
)
from cax.runsdb.stuck import (
    DEFAULT_MAX_ATTEMPTS,
    StuckEntry,
    error_reason,
    find_stuck,
    when,
)
from cax.schema import DATA_TYPES

#: A heartbeat is judged against its daemon's interval: alive within ALIVE_INTERVALS of them
#: (plus MARGIN_S), late within LATE_INTERVALS (plus MARGIN_S), dead beyond.
ALIVE_INTERVALS, LATE_INTERVALS, MARGIN_S = 2, 10, 30.0
DEFAULT_SLEEP_S = 60.0
#: Stopped or dead daemons are left out of the text view after a week (every restart of a
#: daemon leaves a heartbeat document of its own).
FORGET_AFTER_S = 7 * 86400
#: History events shown per entry by ``--run``/``--name``.
HISTORY_SHOWN = 5

GREEN, YELLOW, CYAN, RED, MAGENTA, DIM = "32", "33", "36", "31;1", "35", "2"
#: The symbol and colour of each state in the ``--summary`` matrix.
SYMBOLS: dict[str, tuple[str, str]] = {
    TRANSFERRED: ("=", GREEN), VERIFYING: ("v", YELLOW), TRANSFERRING: (">", CYAN),
    ERROR: ("e", YELLOW), "stuck": ("!", RED), PURGING: ("x", MAGENTA), "none": (".", DIM),
}
LEGEND = ("= transferred  v verifying  > transferring  e error (retried)  ! stuck  "
          "x purging  . none")


def now_of(db: RunsDB) -> dt.datetime:
    """The runs DB's clock when it has one (leases and ages are judged by it), else UTC."""
    clock = getattr(db, "now", None)
    return clock() if callable(clock) else utcnow()


def _age_s(value: Any, now: dt.datetime) -> float | None:
    return (now - as_utc(value)).total_seconds() if isinstance(value, dt.datetime) else None


def daemon_state(heartbeat: dict[str, Any], now: dt.datetime) -> str:
    """Judge a daemon from its heartbeat: alive, late, dead (or stopped)."""
    if heartbeat.get("stopped"):
        return "stopped"
    age = _age_s(heartbeat.get("updated"), now)
    if age is None:
        return "dead"
    sleep = heartbeat.get("sleep_seconds")
    interval = float(sleep) if isinstance(sleep, (int, float)) else DEFAULT_SLEEP_S
    took = _age_s(heartbeat.get("pass_start"), as_utc(heartbeat["pass_end"])) \
        if isinstance(heartbeat.get("pass_end"), dt.datetime) else None
    interval += max(took or 0.0, 0.0)
    if age <= ALIVE_INTERVALS * interval + MARGIN_S:
        return "alive"
    if age <= LATE_INTERVALS * interval + MARGIN_S:
        return "late"
    return "dead"


def daemons(db: RunsDB, now: dt.datetime) -> list[dict[str, Any]]:
    """One row per daemon heartbeat, by site then host: who, last pass, age, state, error."""
    rows = []
    for hb in db.find_heartbeats():
        age = _age_s(hb.get("updated"), now)
        rows.append({"id": hb.get("_id"), "site": hb.get("site"), "host": hb.get("host"),
                     "pid": hb.get("pid"), "version": hb.get("version"),
                     "pass": hb.get("pass"), "last_pass": hb.get("updated"),
                     "age_s": None if age is None else round(age, 1),
                     "sleep_seconds": hb.get("sleep_seconds"),
                     "state": daemon_state(hb, now), "last_error": hb.get("last_error")})
    return sorted(rows, key=lambda r: (str(r["site"]), str(r["host"]), str(r["id"])))


def max_attempts_of(config: Sites) -> dict[str, int]:
    return {site.name: site.max_attempts for site in config.sites}


def stuck(db: RunsDB, config: Sites, now: dt.datetime, site: str | None = None,
          selector: dict[str, Any] | None = None) -> list[StuckEntry]:
    """The stuck entries (concerning ``site`` when given), lease owners judged alive or not."""
    states = {row["id"]: row["state"] for row in daemons(db, now)}
    return find_stuck(db, now, max_attempts=max_attempts_of(config), daemon_states=states,
                      site=site, selector=selector)


def overview(db: RunsDB, config: Sites, site: str | None = None) -> dict[str, Any]:
    """The default view: daemons, copies by site/type/status, and how many entries are stuck."""
    now = now_of(db)
    copies = sorted(db.count_copies(), key=lambda r: (str(r.get("host")), str(r.get("type")),
                                                      str(r.get("status"))))
    return {"now": now, "daemons": daemons(db, now), "copies": copies,
            "stuck": len(stuck(db, config, now, site))}


def run_view(db: RunsDB, number: int | None = None, name: str | None = None
             ) -> list[dict[str, Any]]:
    """Every copy of the run(s) numbered ``number`` or called ``name``, with every detail."""
    query: dict[str, Any] = {"number": number} if number is not None \
        else {"name": safe_component(name)}
    now = now_of(db)
    runs = []
    for run in db.find_runs(query):
        entries = []
        for e in run.get("data") or ():
            if not isinstance(e, dict):
                continue
            changed = e.get("modified_time") or e.get("verified_time") or e.get("creation_time")
            entries.append({
                "site": e.get("host"), "type": e.get("type"), "version": e.get("pax_version"),
                "status": e.get("status"), "location": e.get("location"),
                "size": e.get("size"), "files": e.get("file_count"),
                "checksum": e.get("checksum"), "age_s": _rounded(_age_s(changed, now)),
                "attempts": e.get("attempts"), "next_attempt": e.get("next_attempt"),
                "error": e.get("error"), "error_kind": e.get("error_kind"),
                "source": e.get("source"), "checksum_problem": e.get("checksum_problem"),
                "lease_owner": e.get("lease_owner"), "lease_expires": e.get("lease_expires"),
                "history": list(e.get("history") or ())[-HISTORY_SHOWN:]})
        runs.append({"number": run.get("number"), "name": run.get("name"),
                     "detector": run.get("detector"), "start": run.get("start"),
                     "tags": [t.get("name") if isinstance(t, dict) else t
                              for t in run.get("tags") or ()],
                     "data": entries})
    return runs


def entries_with_status(db: RunsDB, host: str, status: str) -> list[dict[str, Any]]:
    """The original's ``cax-status --host H --status S``: every entry at ``host`` in ``status``.

    One indexed query; each row is the run's number and name with the entry's type, version
    and location.
    """
    rows = []
    for run in db.find_runs({"data": {"$elemMatch": {"host": host, "status": status}}}):
        for e in run.get("data") or ():
            if isinstance(e, dict) and e.get("host") == host and e.get("status") == status:
                rows.append({"number": run.get("number"), "name": run.get("name"),
                             "type": e.get("type"), "version": e.get("pax_version"),
                             "location": e.get("location")})
    return rows


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass(frozen=True)
class Summary:
    """The newest runs x sites matrix: ``runs[i]["cells"][site][type]`` is a state or None.

    ``newest`` is how many runs were asked for; ``more`` says whether older runs exist that
    the matrix leaves out.
    """

    sites: list[str]
    types: list[str]
    runs: list[dict[str, Any]]
    newest: int = 20
    more: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"sites": self.sites, "types": self.types, "runs": self.runs,
                "newest": self.newest, "more": self.more}


def handles(site: Site, data_type: str) -> bool:
    """Whether ``site`` holds copies of ``data_type``: it lists the type, or (processed) it
    makes them with its own ``processing`` section."""
    return data_type in site.data_type or (data_type == "processed"
                                           and site.processing is not None)


def summary(db: RunsDB, config: Sites, newest: int = 20) -> Summary:
    """The state of every copy of the ``newest`` runs, one column per configured site.

    A site's processed cell is its copy of the version it handles (its processing section's,
    its ``processor_version``, the top-level one), of any version when it names none.  One
    find, sorted by start and limited, fetching only the fields of the entries it shows.
    """
    sites = [site.name for site in config.sites]
    types = [t for t in DATA_TYPES if any(handles(s, t) for s in config.sites)] or ["raw"]
    versions = {site.name: config.version_of(site) for site in config.sites}
    limits = max_attempts_of(config)
    projection = {"number": 1, "name": 1, "start": 1, "data.host": 1, "data.type": 1,
                  "data.status": 1, "data.attempts": 1, "data.next_attempt": 1,
                  "data.error_kind": 1, "data.error": 1, "data.pax_version": 1}
    found = db.find_runs({}, projection=projection, limit=newest + 1) if newest > 0 else []
    rows = []
    for run in found[:newest]:
        cells: dict[str, dict[str, str | None]] = {s: dict.fromkeys(types) for s in sites}
        for e in run.get("data") or ():
            if not isinstance(e, dict) or e.get("host") not in cells \
                    or e.get("type") not in types:
                continue
            wanted = versions.get(e["host"])
            if e["type"] == "processed" and wanted and e.get("pax_version") != wanted:
                continue
            state = e.get("status")
            if state == ERROR and error_reason(e, limits.get(e["host"], DEFAULT_MAX_ATTEMPTS)):
                state = "stuck"
            cells[e["host"]][e["type"]] = state
        rows.append({"number": run.get("number"), "name": run.get("name"), "cells": cells})
    return Summary(sites, types, rows, newest, len(found) > newest)


# -- text renderings ---------------------------------------------------------------------------


def _paint(text: str, colour: str, colour_on: bool) -> str:
    return f"\x1b[{colour}m{text}\x1b[0m" if colour_on else text


def render_summary(table: Summary, colour: bool = False) -> Iterator[str]:
    """Yield the matrix: one line per run, one cell per site (one symbol per data type)."""
    width = {s: max(len(s), len(table.types)) for s in table.sites}
    names = max([len(str(r["name"])) for r in table.runs] + [4])
    yield " ".join([f"{'run':>6}", f"{'name':<{names}}",
                    *(s.ljust(width[s]) for s in table.sites)]).rstrip()
    for row in table.runs:
        cells = []
        for site in table.sites:
            marks = [SYMBOLS.get(row["cells"][site][t] or "none", ("?", RED))
                     for t in table.types]
            text = "".join(_paint(symbol, c, colour) for symbol, c in marks)
            cells.append(text + " " * (width[site] - len(marks)))
        yield " ".join([f"{row['number']!s:>6}", f"{row['name']!s:<{names}}", *cells]).rstrip()
    per = f"; per site: {' '.join(table.types)}" if len(table.types) > 1 else ""
    yield LEGEND + per
    if table.more:
        yield f"(the newest {table.newest} runs; --newest N shows more)"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _size(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return "-"


def _table(header: list[str], rows: list[list[str]]) -> Iterator[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        yield "  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()


def render_overview(view: dict[str, Any], retry_hint: str = "cax status --stuck"
                    ) -> Iterator[str]:
    """Yield the default view as text."""
    yield f"daemons (at {when(view['now'])}):"
    shown = [d for d in view["daemons"] if d["state"] in ("alive", "late")
             or (d["age_s"] is not None and d["age_s"] < FORGET_AFTER_S)]
    hidden = len(view["daemons"]) - len(shown)
    view = {**view, "daemons": shown}
    if view["daemons"]:
        yield from _table(
            ["site", "host", "pid", "version", "last pass", "age", "state", "last error"],
            [[str(d["site"]), str(d["host"]), str(d["pid"]), str(d["version"]),
              when(d["last_pass"]), _ago(d["age_s"]), d["state"],
              (d["last_error"] or "-")[:60]] for d in view["daemons"]])
    else:
        yield "  none has written a heartbeat" if not hidden else "  none recently"
    if hidden:
        yield f"  ({hidden} daemon(s) stopped or dead for over a week not shown; --json lists them)"
    yield "copies:"
    if view["copies"]:
        yield from _table(["site", "type", "status", "count"],
                          [[str(c.get("host")), str(c.get("type")), str(c.get("status")),
                            str(c["count"])] for c in view["copies"]])
    else:
        yield "  none"
    count = view["stuck"]
    yield f"stuck: {count} entr{'y' if count == 1 else 'ies'}" + \
        (f" (see: {retry_hint})" if count else "")


def render_stuck(entries: list[StuckEntry], site: str | None,
                 prefix: str | Callable[[StuckEntry], str]) -> Iterator[str]:
    """Yield one block per stuck entry: what, why, and the command that retries it.

    ``prefix`` is how the command calls cax (for each entry, when a callable).
    """
    if not entries:
        yield "nothing is stuck" + (f" for site {site}" if site else "")
        return
    for e in entries:
        why = e.because_of(site) if site else None
        yield f"run {e.number} ({e.name}) {e.key}: {e.status}" + (f", {why}" if why else "")
        yield f"  {e.reason}"
        yield f"  retry: {e.command(prefix(e) if callable(prefix) else prefix)}"


def render_runs(runs: list[dict[str, Any]]) -> Iterator[str]:
    """Yield every copy of the runs of ``run_view`` with its details."""
    for run in runs:
        yield f"run {run['number']} ({run['name']}, {run['detector']}), started " \
              f"{when(run['start'])}" + (f", tags {', '.join(map(str, run['tags']))}"
                                         if run["tags"] else "")
        if not run["data"]:
            yield "  no copies"
        for e in run["data"]:
            version = f"@{e['version']}" if e["version"] else ""
            checksum = (e["checksum"] or "-")[:28] if isinstance(e["checksum"], str) else "-"
            yield f"  {e['type']}{version} at {e['site']}: {e['status']}, {_size(e['size'])}, " \
                  f"{e['files'] if e['files'] is not None else '-'} files, checksum {checksum}, " \
                  f"changed {_ago(e['age_s'])} ago"
            yield f"    location {e['location']}"
            if e["attempts"] is not None or e["status"] == ERROR:
                yield f"    attempts {e['attempts'] or 0}, next attempt {when(e['next_attempt'])}"
            if e["error"]:
                kind = f" ({e['error_kind']})" if e["error_kind"] else ""
                yield f"    error{kind}: {e['error']}"
            if e["source"]:
                yield f"    copied from {e['source']}"
            if e["checksum_problem"]:
                yield f"    differs from the reference at {e['checksum_problem']}"
            if e["lease_owner"]:
                yield f"    lease {e['lease_owner']} until {when(e['lease_expires'])}"
            for event in e["history"]:
                if isinstance(event, dict):
                    detail = f": {event['detail']}" if event.get("detail") else ""
                    yield f"    {when(event.get('time'))} {event.get('event')} by " \
                          f"{event.get('by')}{detail}"
