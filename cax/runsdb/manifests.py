"""Per-file manifests: the checksum of every file of a copy, and of its dataset's origin.

They live in their own collection (``cax_manifests``), not in the run document, which must
stay small for runs of thousands of files; one bad file can then be found and re-fetched alone.
A file name is kept as the filesystem has it: names that are not UTF-8 are stored as bytes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import bson
from bson.errors import InvalidDocument

from cax.errors import DatasetError
from cax.runsdb.base import Store, db_call
from cax.runsdb.entries import EntryKey

#: The pseudo-site under which a dataset's origin manifest is kept (no site name has an "@").
ORIGIN_MANIFEST_HOST = "@origin"


def stored_name(path: str) -> str | bson.Binary:
    """A manifest's file name as BSON can hold it: the name itself when it is UTF-8, else its
    bytes (a name the filesystem allows is never refused: names are bytes on POSIX, and cax
    reads them decoded with surrogateescape)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return bson.Binary(path.encode("utf-8", "surrogateescape"))


def loaded_name(value: str | bytes) -> str:
    """The inverse of ``stored_name``."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


class Manifests(Store):
    """The manifests part of the runs DB."""

    @staticmethod
    def _manifest_id(run_id: Any, key: EntryKey) -> str:
        return f"{run_id}/{key.host}/{key.type}/{key.version or ''}"

    @db_call
    def save_manifest(self, run_id: Any, key: EntryKey, files: dict[str, tuple[int, str]],
                      checksum: str, now: dt.datetime) -> None:
        """Keep the per-file checksums of one copy outside the (small) run document."""
        if self._skip("manifest", run_id, key):
            return
        doc = {"run": run_id, "host": key.host, "type": key.type, "pax_version": key.version,
               "checksum": checksum, "time": now,
               "files": [[stored_name(path), size, adler]
                         for path, (size, adler) in sorted(files.items())]}
        try:
            self.manifests.replace_one({"_id": self._manifest_id(run_id, key)},
                                       {"_id": self._manifest_id(run_id, key), **doc},
                                       upsert=True)
        except InvalidDocument as exc:  # pymongo checks the size before sending
            raise DatasetError(f"the manifest of {len(files)} files of {key} is larger than "
                               "the runs DB's 16 MiB document limit; cax cannot register a "
                               f"dataset of that many files ({str(exc)[:80]})") from None

    @db_call
    def find_manifest(self, run_id: Any, key: EntryKey) -> dict[str, tuple[int, str]] | None:
        """Return the per-file checksums recorded for one copy, or None."""
        doc = self.manifests.find_one({"_id": self._manifest_id(run_id, key)})
        if not doc:
            return None
        return {loaded_name(path): (size, adler) for path, size, adler in doc["files"]}

    @staticmethod
    def _origin_key(key: EntryKey) -> EntryKey:
        return EntryKey(ORIGIN_MANIFEST_HOST, key.type, key.version)

    @db_call
    def save_origin_manifest(self, run_id: Any, key: EntryKey, files: dict[str, tuple[int, str]],
                             checksum: str, now: dt.datetime) -> None:
        """Keep the producer's per-file checksums of a dataset (its origin's manifest), before
        the write that records the origin; a leftover of a producer whose registration failed
        is replaced by the next one, and only a manifest whose checksum is the recorded
        origin's is ever used (``find_origin_manifest``)."""
        self.save_manifest(run_id, self._origin_key(key), files, checksum, now)

    @db_call
    def find_origin_manifest(self, run_id: Any, key: EntryKey, origin: dict[str, Any] | None,
                             *, pending: bool = False) -> dict[str, tuple[int, str]] | None:
        """The per-file checksums of the dataset's origin, if recorded and still its own; with
        ``pending``, the last producer's whatever the origin (for its adoption)."""
        if not origin and not pending:
            return None
        doc = self.manifests.find_one({"_id": self._manifest_id(run_id, self._origin_key(key))})
        if not doc or not pending and doc.get("checksum") != (origin or {}).get("checksum"):
            return None
        return {loaded_name(path): (size, adler) for path, size, adler in doc["files"]}

    @db_call
    def remove_manifest(self, run_id: Any, key: EntryKey) -> None:
        if not self._skip("remove manifest", run_id, key):
            self.manifests.delete_one({"_id": self._manifest_id(run_id, key)})
