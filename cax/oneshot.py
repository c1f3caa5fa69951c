"""What cax-mv, cax-rm and cax-stray do: an admin's one-off changes to datasets at this site.

Each keeps the runs DB truthful at every instant, as the daemon does: the entry is claimed
before the data are touched, and the data and the entry change together or not at all.  These
functions take a Context and return results or raise the named errors (ConfigError and
UnsafeNameError for bad input, RunsDBError, CaxError when the operation failed, OSError for
the filesystem); the ``cax.cli`` package prints them and chooses the exit code.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cax.checksum import diff_manifests, scan_dataset
from cax.config import Site
from cax.errors import (
    CaxError,
    ChecksumMismatchError,
    ConfigError,
    LeaseLostError,
    UnsafeNameError,
)
from cax.paths import base_dir, checked_location, parse_scratch, scratch_path
from cax.runsdb import (
    PURGING,
    STATUSES,
    TRANSFERRED,
    TRANSFERRING,
    VERIFYING,
    EntryKey,
    run_label,
)
from cax.runsdb.entries import check_dataset_name
from cax.runsdb.ledger import Claim
from cax.schema import DATA_TYPES
from cax.tasks.base import Context
from cax.tasks.purge import delete_and_pull, verifiable
from cax.transport import siteops
from cax.transport.local import LocalTransport
from cax.transport.pool import endpoint_for

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Found:
    """A local copy found by its location: its run, identity, entry and checked path."""

    run: dict[str, Any]
    key: EntryKey
    entry: dict[str, Any]
    path: str

    @property
    def label(self) -> str:
        return run_label(self.run)


@dataclass(frozen=True)
class MoveResult:
    label: str
    source: str
    target: str
    copied: bool  # across filesystems: copied, verified, then the source deleted
    leftover: str | None = None  # a source that could not be deleted after the move


@dataclass(frozen=True)
class RemoveResult:
    label: str
    path: str
    other_copies: int  # verified copies of the same data left at other sites


@dataclass
class StrayDeletion:
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # no longer strays when re-checked
    failed: list[tuple[str, str]] = field(default_factory=list)


def classify(site: Site, path: str) -> tuple[str, str]:
    """Return (data type, checked path) of a dataset path inside this site's data directories.

    Raises UnsafeNameError for anything else.
    """
    types = sorted((t for t in DATA_TYPES if site.data_dir(t)),
                   key=lambda t: -len(site.data_dir(t) or ""))  # the most specific first
    for data_type in types:
        try:
            return data_type, checked_location(site, data_type, path)
        except UnsafeNameError:
            continue
    dirs = ", ".join(filter(None, (site.dir_raw, site.dir_processed))) or "none configured"
    raise UnsafeNameError(f"{path} is not a dataset inside the data directories of site "
                          f"{site.name} ({dirs})")


def locate(ctx: Context, path: str, number: int | None = None) -> Found:
    """Return the entry of this site at ``path`` (in run ``number``); ConfigError if none."""
    data_type, path = classify(ctx.site, path)
    here = ctx.site.name
    if number is not None and not ctx.runsdb.count_runs({"number": number}):
        raise ConfigError(f"unknown run {number}")
    found = [Found(run, EntryKey.of(e), e, path)
             for run in ctx.runsdb.find_runs_with_location(here, path, number)
             for e in run.get("data") or ()
             if e.get("host") == here and e.get("type") == data_type
             and isinstance(e.get("location"), str) and posixpath.normpath(e["location"]) == path]
    where = f" in run {number}" if number is not None else ""
    if not found:
        raise ConfigError(f"no {data_type} entry of site {here} has location {path}{where}")
    if len(found) > 1:
        raise ConfigError(f"{len(found)} entries of site {here} have location {path}; "
                          "name the run")
    return found[0]


def _refuse_without_db(ctx: Context, command: str) -> None:
    """Moving or deleting data the runs DB describes without telling it would make it lie."""
    if ctx.runsdb.read_only:
        raise ConfigError(f"{command}: with runs DB updates disabled the runs DB would describe "
                          "data that are no longer there; nothing done")


def _claim(ctx: Context, found: Found, statuses: list[str], **fields: Any) -> Claim:
    claim = ctx.runsdb.claim(
        found.run["_id"], found.key, owner=ctx.owner, statuses=statuses,
        lease_s=ctx.config.lease_seconds, fields=fields or None, count_attempt=False,
        conditions={"location": found.entry.get("location")})
    if not claim:
        status = found.entry.get("status")
        raise CaxError(f"{found.label}: the {found.key} entry ({status}) is in use by "
                       f"{found.entry.get('lease_owner') or 'another process'} or has changed; "
                       "nothing done")
    return claim


def _release(ctx: Context, claim: Claim) -> None:
    try:
        ctx.runsdb.release(claim)
    except CaxError as exc:  # the lease expires by itself
        log.warning("lease of %s not released: %s", claim.key, exc)


def move_target(ctx: Context, found: Found, target: str) -> str:
    """Check where a copy may move: inside the same data directory (and processed version),
    under its own dataset name, to a place no entry names."""
    target = checked_location(ctx.site, found.key.type, target, found.key.version)
    base = base_dir(ctx.site, found.key.type, found.key.version)
    if not target.startswith(base + "/"):
        raise UnsafeNameError(f"{target}: a {found.key} copy must stay inside {base}")
    if target == found.path:
        raise ConfigError(f"{target}: source and target are the same")
    check_dataset_name(found.run, target)
    if os.path.lexists(target):
        raise ConfigError(f"{target} exists; not replacing it")
    ctx.runsdb.check_place_free(ctx.site.name, target)
    return target


def move_dataset(ctx: Context, source: str, target: str) -> MoveResult:
    """Move a local copy to ``target`` and record its new location; on failure neither changes.

    Order: claim the entry (it stays ``transferred``), move the data (one rename, or across
    filesystems a verified copy), record the new location; if recording fails, the data go
    back.  The source of a cross-filesystem move is deleted only after the record.
    """
    _refuse_without_db(ctx, "cax-mv")
    found = locate(ctx, source)
    if found.entry.get("status") != TRANSFERRED:
        raise ConfigError(f"{found.label}: the {found.key} entry is {found.entry.get('status')}; "
                          "only verified copies are moved")
    target = move_target(ctx, found, target)
    claim = _claim(ctx, found, [TRANSFERRED])
    try:
        copied = _place(ctx, found, target, claim.token)
    except BaseException:
        _release(ctx, claim)
        raise
    try:
        if not ctx.runsdb.relocate(claim, found.run, target):
            raise LeaseLostError(f"{found.key}: lease lost before the new location was recorded")
    except BaseException:
        _unplace(found.path, target, copied)
        _release(ctx, claim)
        raise
    log.info("%s: %s moved from %s to %s", found.label, found.key, found.path, target)
    return MoveResult(found.label, found.path, target, copied, _drop_source(found, copied))


def _rename(source: str, target: str) -> None:
    """The fast path of a move (a separate name so tests can make it fail)."""
    siteops.rename(source, target)


def _place(ctx: Context, found: Found, target: str, token: str) -> bool:
    """Put the data at ``target``; return True if copied (the source still exists)."""
    os.makedirs(posixpath.dirname(target), exist_ok=True)
    try:
        _rename(found.path, target)
        return False
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    temp = scratch_path(target, token)
    transport = LocalTransport(endpoint_for(ctx.site, "local"),
                               stall_timeout_s=ctx.site.stall_timeout)
    read = transport.put(Path(found.path), temp)
    expected = ctx.runsdb.find_manifest(found.run["_id"], found.key) or read or {}
    bad = diff_manifests(expected, scan_dataset(Path(temp)))
    if bad:
        siteops.remove(temp)
        raise ChecksumMismatchError(f"{target}: {len(bad)} file(s) differ after copying: "
                                    f"{', '.join(bad[:5])}", files=bad)
    siteops.rename(temp, target)
    return True


def _unplace(source: str, target: str, copied: bool) -> None:
    try:
        if copied:
            siteops.remove(target)
        else:
            siteops.rename(target, source)
    except OSError as exc:
        log.critical("rollback failed: the data are at %s, the runs DB says %s; move them "
                     "back by hand: %s", target, source, exc)
        raise


def _drop_source(found: Found, copied: bool) -> str | None:
    if not copied:
        return None
    try:
        siteops.remove(found.path)
        return None
    except OSError as exc:
        log.warning("moved, but the old copy %s could not be deleted: %s", found.path, exc)
        return found.path


def other_verified_copies(found: Found) -> set[str]:
    """The other sites holding a verified copy (a checksum cax can verify) of these data."""
    key = found.key
    return {e.get("host") for e in found.run.get("data") or ()
            if e.get("host") != key.host and e.get("type") == key.type
            and (key.version is None or e.get("pax_version") == key.version)
            and e.get("status") == TRANSFERRED and verifiable(e.get("checksum"))}


def remove_dataset(ctx: Context, location: str, number: int, *, force: bool = False,
                   confirm: Callable[[str], bool] | None = None) -> RemoveResult:
    """Delete a local copy and its entry: entry to ``purging`` first, data, then the entry.

    The last verified copy of a run's data is deleted only with ``force`` (and, on a
    terminal, after ``confirm``), never by accident.
    """
    _refuse_without_db(ctx, "cax-rm")
    found = locate(ctx, location, number)
    _refuse_shared_place(ctx, found)
    others = other_verified_copies(found)
    if not others:
        question = (f"{found.path} is the last verified copy of {found.label} {found.key.type} "
                    "data; delete it anyway?")
        if not force:
            raise ConfigError(f"{found.path} is the last verified copy of {found.label} "
                              f"{found.key.type} data; nothing deleted (--force deletes it)")
        if confirm is not None and not confirm(question):
            raise ConfigError("nothing deleted")
    granted = time.monotonic()
    claim = _claim(ctx, found, list(STATUSES), status=PURGING)
    log.info("%s: removing %s at %s", found.label, found.key, found.path)
    delete_and_pull(ctx, claim, found.path, granted)
    return RemoveResult(found.label, found.path, len(others))


def _refuse_shared_place(ctx: Context, found: Found) -> None:
    """Never delete a path that another entry (of any run) names: ``--force`` included.  Such
    an entry is a mistaken registration of the other run's data; ``cax run remove``
    unregisters it without touching the data."""
    for run in ctx.runsdb.find_runs_with_location(ctx.site.name, found.path):
        for entry in run.get("data") or ():
            if entry.get("host") != ctx.site.name or not isinstance(entry.get("location"), str) \
                    or posixpath.normpath(entry["location"]) != found.path:
                continue
            if run["_id"] == found.run["_id"] and EntryKey.of(entry) == found.key:
                continue
            raise ConfigError(
                f"{found.path} is also the location of {run_label(run)}'s {entry.get('type')} "
                f"entry ({entry.get('status')}); nothing deleted (an entry registered on another "
                "run's data is removed with `cax run remove`, which keeps the data)")


def _dataset_paths(site: Site) -> list[str]:
    """Every top-level dataset path in this site's data directories (``pax_*`` opened)."""
    bases = {t: posixpath.normpath(site.data_dir(t) or "") for t in DATA_TYPES
             if site.data_dir(t)}
    paths = []
    for data_type, base in bases.items():
        if not os.path.isdir(base):
            continue
        for name in sorted(os.listdir(base)):
            path = posixpath.join(base, name)
            if any(b == path or b.startswith(path + "/") for b in bases.values()):
                continue  # the other type's directory inside this one
            if data_type == "processed" and name.startswith("pax_") \
                    and os.path.isdir(path) and not os.path.islink(path):
                paths += [posixpath.join(path, n) for n in sorted(os.listdir(path))]
            else:
                paths.append(path)
    return list(dict.fromkeys(paths))  # once, should both types share a directory


def find_strays(ctx: Context) -> list[str]:
    """Return the files and directories in the data directories no entry of this site uses.

    A path is used if an entry's location is it or lies below it; a partial name
    (``.NAME.cax-partial``) is used while the entry of NAME is being copied or verified.
    """
    covered: set[str] = set()
    busy: set[str] = set()
    for ref in ctx.runsdb.find_site_locations(ctx.site.name):
        location = ref.get("location")
        if not isinstance(location, str) or not location.startswith("/"):
            continue
        path = posixpath.normpath(location)
        if ref.get("status") in (TRANSFERRING, VERIFYING):
            busy.add(path)
        while path not in covered and path != "/":
            covered.add(path)
            path = posixpath.dirname(path)
    strays = []
    for path in _dataset_paths(ctx.site):
        head, name = posixpath.split(path)
        scratch = parse_scratch(name)
        if path in covered or (scratch and posixpath.join(head, scratch[0]) in busy):
            continue
        strays.append(path)
    return strays


def delete_strays(ctx: Context, paths: list[str]) -> StrayDeletion:
    """Delete those of ``paths`` that are still strays now (a copy may have begun since)."""
    result = StrayDeletion()
    current = set(find_strays(ctx))
    for path in paths:
        if path not in current:
            result.kept.append(path)
            continue
        try:
            siteops.remove(path)
            result.deleted.append(path)
            log.info("deleted stray %s", path)
        except OSError as exc:
            result.failed.append((path, exc.strerror or str(exc)))
    return result
