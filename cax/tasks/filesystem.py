"""AddSize and SetPermission: facts about, and access to, the verified copies at this site.

Both act once per copy and leave a mark on its entry (``size``/``file_count``,
``permissions_applied``), so their queries select only copies that still need them and an idle
pass fetches no runs -- the original ran ``chmod -R``/``chown -R`` on every dataset every pass.
"""

from __future__ import annotations

import grp
import hashlib
import json
import logging
import os
import stat
from collections.abc import Mapping
from typing import Any

from cax import proc
from cax.errors import ConfigError
from cax.paths import entry_location
from cax.runsdb import TRANSFERRED, EntryKey
from cax.schema import DATA_TYPES
from cax.tasks.base import Task
from cax.transport import siteops

log = logging.getLogger(__name__)

#: Time allowed for a site's ACL command (e.g. ``setfacl -R``) on one dataset.
ACL_TIMEOUT_S = 3600.0


def _here(site: str, **conditions: Any) -> dict[str, Any]:
    return {"data": {"$elemMatch": {"host": site, "status": TRANSFERRED, **conditions}}}


class AddSize(Task):
    """Record bytes and file count of verified local copies that lack them.

    Copies made by this release carry both from their manifest; this fills in copies registered
    by the original cax.  For raw data the run's top-level ``raw_size_byte`` is set once.  The
    sizes are sent ``BATCH`` at a time (``record_sizes``): after importing the original's runs
    DB every copy lacks them, and one write per copy made this the longest part of the first
    pass (100,000 copies).
    """

    BATCH = 500

    def __init__(self, ctx: Any):
        super().__init__(ctx)
        self.sizes: list[tuple[Any, EntryKey, int, int, bool]] = []

    def query(self) -> dict[str, Any] | None:
        name, types = self.site.name, {"$in": list(DATA_TYPES)}
        return {"$or": [
            _here(name, type=types, size=None),
            _here(name, type=types, file_count=None),
            {"$and": [{"raw_size_byte": {"$exists": False}}, _here(name, type="raw")]},
        ]}

    def each_location(self, run: dict[str, Any], entry: dict[str, Any]) -> None:
        if entry.get("host") != self.site.name or entry.get("status") != TRANSFERRED \
                or entry.get("type") not in DATA_TYPES:
            return
        key = EntryKey.of(entry)
        size, count = entry.get("size"), entry.get("file_count")
        if size is None or count is None:
            info = siteops.stat_tree(entry_location(self.site, entry))
            size, count = info["size"], info["files"]
        elif key.type != "raw" or "raw_size_byte" in run:
            return
        if self.ctx.dry_run:
            log.info("dry run: would record %s: %d bytes in %d file(s)", key, size, count)
            return
        log.debug("%s: %d bytes in %d file(s)", key, size, count)
        self.sizes.append((run["_id"], key, size, count,
                           key.type == "raw" and "raw_size_byte" not in run))
        if len(self.sizes) >= self.BATCH:
            self.flush()

    def finish(self) -> None:
        self.flush()

    def flush(self) -> None:
        """Send the sizes collected so far in one write."""
        sizes, self.sizes = self.sizes, []
        if sizes:
            changed = self.db.record_sizes(sizes)
            log.info("sizes of %d cop%s recorded (%d write(s) changed something)", len(sizes),
                     "y" if len(sizes) == 1 else "ies", changed)


def settings_digest(settings: Mapping[str, Any]) -> str:
    """Return a short fingerprint of permission settings, recorded on each copy they were
    applied to, so a copy is done again only when the settings change."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def split_mode(mode: str) -> tuple[int, int]:
    """Return (file mode, directory mode) for the configured octal ``mode``.

    Files get the permission bits as given.  Directories also get ``x`` wherever the mode
    gives ``r`` (chmod's ``X``: "0640" makes directories 0750, or they could not be entered),
    and keep the setgid/sticky bits, which mean nothing good on data files.
    """
    value = int(mode, 8)
    return value & 0o777, value | ((value & 0o444) >> 2)


def group_id(name: str) -> int:
    """Return the gid of group ``name``; ConfigError if this machine does not know it."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"key 'permissions': unknown group {name!r} on this machine") from None


def _fix(path: str, info: os.stat_result, mode: int | None, gid: int | None) -> None:
    """chown first: changing the group may clear setgid bits that chmod then sets."""
    if gid is not None and info.st_gid != gid:
        os.chown(path, -1, gid, follow_symlinks=False)
    if mode is not None and stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)


def apply_tree(path: str, mode: str | None, gid: int | None) -> None:
    """Give ``path`` and everything below it ``mode`` and group ``gid`` (None: unchanged).

    Symlinks are left alone: chmod would follow them out of the dataset.  Directories are
    changed after their contents, so a mode without owner access cannot lock the walk out.
    """
    file_mode, dir_mode = split_mode(mode) if mode else (None, None)
    top = os.lstat(path)
    if stat.S_ISLNK(top.st_mode):
        raise OSError(f"refusing to change permissions through the symlink {path}")
    if not stat.S_ISDIR(top.st_mode):
        _fix(path, top, file_mode, gid)
        return
    for root, dirs, files in os.walk(path, topdown=False, onerror=_raise):
        for name in files + dirs:
            child = os.path.join(root, name)
            info = os.lstat(child)
            if stat.S_ISREG(info.st_mode):
                _fix(child, info, file_mode, gid)
        _fix(root, os.lstat(root), dir_mode, gid)


def _raise(exc: OSError) -> None:
    raise exc


def apply_permissions(path: str, settings: Mapping[str, Any]) -> None:
    """Apply one data type's ``permissions`` settings (mode, group, ACL command) to ``path``.

    The ACL command is an argument list; ``{path}`` inside an argument becomes the dataset
    path within that one argument, never through a shell.
    """
    group = settings.get("group")
    apply_tree(path, settings.get("mode"), group_id(group) if group else None)
    command = settings.get("acl_command")
    if command:
        proc.run([arg.replace("{path}", path) for arg in command], timeout=ACL_TIMEOUT_S)


class SetPermission(Task):
    """Apply the site's ``permissions`` for each data type once to each verified local copy."""

    def settings(self) -> dict[str, Mapping[str, Any]]:
        return {t: s for t, s in (self.site.permissions or {}).items() if self.site.data_dir(t)}

    def query(self) -> dict[str, Any] | None:
        parts = [_here(self.site.name, type=data_type,
                       permissions_applied={"$ne": settings_digest(settings)})
                 for data_type, settings in self.settings().items()]
        return {"$or": parts} if parts else None

    def each_location(self, run: dict[str, Any], entry: dict[str, Any]) -> None:
        settings = self.settings().get(entry.get("type", ""))
        if not settings or entry.get("host") != self.site.name \
                or entry.get("status") != TRANSFERRED:
            return
        digest = settings_digest(settings)
        if entry.get("permissions_applied") == digest:
            return
        key = EntryKey.of(entry)
        path = entry_location(self.site, entry)
        if self.ctx.dry_run:
            log.info("dry run: would set permissions %s on %s", dict(settings), path)
            return
        apply_permissions(path, settings)
        self.db.record_permissions(run["_id"], key, digest)
        log.info("%s: permissions %s applied to %s", key, digest, path)
