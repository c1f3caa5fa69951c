"""``cax run add``: put runs into the runs DB as the DAQ does, so cax has something to move.

A run document has the shape of the original (``number``, ``name``, ``detector``, ``start``,
``tags``, ``data``); its one data entry is the raw copy at the site that holds it, always
``verifying``: AddChecksum at that site reads it and registers it ``transferred`` as the
dataset's origin -- its first verified read, or the checksum the caller gave (``--checksum``),
verified against the bytes.  Nobody's word is taken for what the bytes are.  Three sources:

* the command-line fields of one run;
* ``--from-dir``: every run directory under a folder inside the site's ``dir_raw`` (the name
  is the run name; the start comes from a ``YYMMDD_HHMM`` name, else the directory's time;
  numbers follow the highest one in the runs DB unless a first number is given);
* ``--json``: run documents as the DAQ wrote them (one object or a list; MongoDB extended
  JSON such as ``{"$date": ...}`` is understood; ISO 8601 strings become times).

A run directory is refused, with one line saying why, when it is another run's location, is
not named after its run, is empty, is ``lost+found``, hidden or a backup copy (``.bak``,
``~``, ...), or is a symlink that leads outside the site's data directories (``--from-dir``
skips those with the same line).  The write is ``RunsDB.register_run``, which refuses a
duplicate number or name within a detector in the same atomic write, and whose unique index
of places refuses a location already taken.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bson import json_util

from cax.checksum import checksum_kind
from cax.clock import UTC, as_utc, utcnow
from cax.config import Config, Site
from cax.errors import ConfigError, UnsafeNameError
from cax.paths import checked_location
from cax.runsdb import VERIFYING, RunsDB, safe_component
from cax.runsdb.entries import check_dataset_name
from cax.runsdb.stuck import when

RUN_NAME_TIME = re.compile(r"^(\d{6}_\d{4})(?:_.*)?$")
DETECTORS = ("tpc", "muon_veto")
#: Names of directories that hold no run: editors' and admins' backup copies.
BACKUP_NAME = re.compile(r"(~|\.(bak|backup|orig|old|save|sav|tmp|swp|copy|partial))$",
                         re.IGNORECASE)


@dataclass
class Registered:
    """What a registration did: runs added, refused (with why), skipped as already there."""

    added: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def parse_start(value: Any, what: str = "start") -> dt.datetime:
    """Return a UTC time from a datetime or an ISO 8601 string (naive means UTC)."""
    if isinstance(value, dt.datetime):
        return as_utc(value)
    if isinstance(value, str):
        try:
            return as_utc(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            pass
    raise ConfigError(f"{what}: expected a time such as 2017-01-31T12:00:00, got "
                      f"{str(value)[:40]!r}")


def raw_entry(site: Site, location: str, checksum: str | None = None,
              now: dt.datetime | None = None) -> dict[str, Any]:
    """The raw data entry of a new run at ``site``: ``verifying``, with the checksum the DAQ
    gave if any (AddChecksum verifies the bytes against it before anything counts them)."""
    path = checked_location(site, "raw", location)
    if checksum is not None and checksum_kind(checksum) not in ("adler32", "sha512-dirhash"):
        raise ConfigError(f"--checksum: {checksum[:40]!r} is not a cax checksum "
                          "(adler32:<64 hex> or a 128-hex sha512 of the original)")
    return {"host": site.name, "type": "raw", "status": VERIFYING, "location": path,
            "checksum": checksum, "creation_time": now or utcnow()}


def refusal(site: Site, path: Path) -> str | None:
    """Why the directory ``path`` (at this machine's ``site``) holds no run, or None."""
    name = path.name
    if name == "lost+found":
        return "is the filesystem's lost+found, not a run"
    if name.startswith("."):
        return "is hidden (a scratch or a partial copy), not a run"
    if BACKUP_NAME.search(name):
        return "looks like a backup copy, not a run"
    if path.is_symlink():
        target = path.resolve()
        homes = [Path(d).resolve() for d in (site.dir_raw, *site.legacy_dirs) if d]
        if not any(target == home or home in target.parents for home in homes):
            return (f"is a symlink to {target}, outside the data directories of site "
                    f"{site.name}")
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a directory"
    if not any(files for _, _, files in os.walk(path)):
        return "is empty: no files to register"
    return None


def check_new_run(db: RunsDB, site: Site, doc: dict[str, Any], local: bool) -> None:
    """Refuse a run document whose raw directory is not one to register; ConfigError or
    UnsafeNameError (LocationTakenError) with one line naming the directory and why."""
    entry = doc["data"][0]
    location = entry["location"]
    if local:
        why = refusal(site, Path(location))
        if why:
            raise ConfigError(f"--location: {location} {why}")
    check_dataset_name(doc, location)
    db.check_place_free(site.name, location)


def run_document(number: int, name: str, detector: str, start: dt.datetime,
                 tags: Sequence[str], entry: dict[str, Any]) -> dict[str, Any]:
    """A run document in the original shape, with its one raw entry."""
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ConfigError(f"run number: expected a whole number >= 0, got {number!r}")
    safe_component(detector, "detector")
    return {"number": number, "name": safe_component(name), "detector": detector,
            "start": as_utc(start), "tags": [{"name": safe_component(t, "tag")} for t in tags],
            "data": [entry]}


def describe(doc: dict[str, Any]) -> str:
    return f"run {doc.get('number')} ({doc.get('name')}, {doc.get('detector')})"


def register(db: RunsDB, docs: Iterable[dict[str, Any]], dry_run: bool = False) -> Registered:
    """Register each run document; refuse duplicates and taken places with one line each.

    ``dry_run`` checks everything the write would, and writes nothing.
    """
    result = Registered()
    for doc in docs:
        try:
            if dry_run:
                for entry in doc.get("data") or ():
                    if isinstance(entry, dict) and isinstance(entry.get("location"), str):
                        check_dataset_name(doc, entry["location"])
                        db.check_place_free(entry.get("host"), entry["location"])
                existing = db.find_duplicate_run(doc)
            else:
                existing = db.register_run(doc)  # checks names and places itself
        except UnsafeNameError as exc:
            result.refused.append(f"{describe(doc)} not registered: {exc}")
            continue
        if existing is None:
            result.added.append(doc)
        else:
            result.refused.append(
                f"{describe(doc)} not registered: the runs DB already has {describe(existing)}, "
                f"started {when(existing.get('start'))}")
    return result


def start_from_name(name: str, default: dt.datetime | None = None) -> dt.datetime:
    """The start time a DAQ run name (``YYMMDD_HHMM``, maybe with a suffix) carries, else
    ``default`` (now if None)."""
    match = RUN_NAME_TIME.match(name)
    if match:
        try:
            return dt.datetime.strptime(match.group(1), "%y%m%d_%H%M").replace(tzinfo=UTC)
        except ValueError:
            pass
    return default or utcnow()


def _start_of(path: Path) -> dt.datetime:
    mtime = dt.datetime.fromtimestamp(path.stat().st_mtime, UTC).replace(microsecond=0)
    return start_from_name(path.name, mtime)


def from_dir(db: RunsDB, site: Site, directory: str | os.PathLike, *, detector: str = "tpc",
             first_number: int | None = None, tags: Sequence[str] = (),
             match: str | None = None, dry_run: bool = False) -> Registered:
    """Register every run directory under ``directory`` (inside the site's ``dir_raw``).

    Directories whose location is already an entry of the site are skipped, and so are those
    that hold no run (``refusal``) or whose name does not match ``match`` (a shell pattern);
    the others get numbers after the highest in the runs DB (or from ``first_number``), in name
    order.  ``dry_run`` says what would be registered and writes nothing.
    """
    folder = Path(os.path.abspath(directory))  # a relative DIR is the working directory's
    if not folder.is_dir():
        raise ConfigError(f"--from-dir: {folder} is not a directory")
    candidates = sorted(folder.iterdir())
    known = {ref["location"].rstrip("/") for ref in db.find_site_locations(site.name)
             if isinstance(ref.get("location"), str)}
    result = Registered()
    todo = []
    for path in candidates:
        if match and not fnmatch.fnmatchcase(path.name, match):
            continue
        if not path.is_dir() and not path.is_symlink():
            continue  # files beside the runs are not runs
        why = refusal(site, path)
        try:
            location = checked_location(site, "raw", str(path))
        except UnsafeNameError as exc:
            why = why or str(exc)
            location = str(path)
        if why:
            result.skipped.append(f"{path}: {why}")
        elif location in known:
            result.skipped.append(f"{location}: already registered at {site.name}")
        else:
            todo.append((path, location))
    number = first_number if first_number is not None else next_number(db)
    docs = []
    for path, location in todo:
        docs.append(run_document(number, path.name, detector, _start_of(path), tags,
                                 raw_entry(site, location)))
        number += 1
    done = register(db, docs, dry_run=dry_run)
    result.added, result.refused = done.added, done.refused
    return result


def next_number(db: RunsDB) -> int:
    """One more than the highest run number in the runs DB (0 for an empty one)."""
    top = db.highest_run_number()
    return 0 if top is None else top + 1


def load_json(path: str | os.PathLike, config: Config) -> list[dict[str, Any]]:
    """Read run documents as the DAQ wrote them; check what cax relies on, keep the rest."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        raw = json_util.loads(text, json_options=json_util.JSONOptions(tz_aware=True,
                                                                         tzinfo=UTC))
    except FileNotFoundError:
        raise ConfigError(f"--json: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--json: {path}: cannot read: {str(exc)[:80]}") from None
    except ValueError as exc:
        raise ConfigError(f"--json: {path}: invalid JSON: {str(exc)[:80]}") from None
    docs = raw if isinstance(raw, list) else [raw]
    sites = {s.name: s for s in config.sites}
    checked = []
    for i, doc in enumerate(docs):
        where = f"--json: {path.name}: document {i}"
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: expected an object")
        number, name = doc.get("number"), doc.get("name")
        if isinstance(number, bool) or not isinstance(number, int):
            raise ConfigError(f"{where}: 'number' must be a whole number, got {number!r:.40}")
        safe_component(name)
        doc = {**doc, "start": parse_start(doc.get("start"), f"{where} 'start'"),
               "detector": doc.get("detector", "tpc"), "tags": doc.get("tags") or [],
               "data": doc.get("data") or []}
        for entry in doc["data"]:
            host = entry.get("host") if isinstance(entry, dict) else None
            if host in sites and entry.get("type") == "raw":
                checked_location(sites[host], "raw", entry.get("location"))
            elif not isinstance(entry, dict) or not isinstance(host, str):
                raise ConfigError(f"{where}: each data entry needs a 'host'")
        checked.append(doc)
    return checked
