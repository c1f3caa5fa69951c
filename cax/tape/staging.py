"""Check a raw dataset for tape, stage it under tape names, and undo the names after a restore.

Tape keeps objects by path, and raw files have generic names (``XENON1T-0-000000000.zip``), so
the original cax staged each file as ``<dataset>_<file>`` in ``dir_tsm/<dataset>/`` before the
backup, and cut a fixed 12 characters after a restore: right for ``YYMMDD_HHMM_``, wrong for
muon-veto datasets (``YYMMDD_HHMM_MV_`` is 15).  Here the prefix is recorded with the tape entry
and undone exactly, whatever the dataset name.

Staging reads each source byte once and checksums the bytes it writes (adler32 per file, and
sha512 when the source carries the original's dirhash), so no separate checksum pass is needed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from cax.checksum import Manifest
from cax.errors import CaxError

log = logging.getLogger(__name__)

BLOCK = 1 << 20


class DatasetRefused(CaxError):
    """The dataset cannot go to tape as it is (empty, sub-folders, duplicate files)."""

    retryable = False


def tape_prefix(dataset: str, rename: bool) -> str:
    """Return the prefix staged file names get: ``<dataset>_``, or "" without renaming."""
    return f"{dataset}_" if rename else ""


def tape_name(rel: str, prefix: str) -> str:
    """Return the staged name of ``rel``: the prefix goes on its top-level component."""
    return prefix + rel


def original_name(staged: str, prefix: str) -> str:
    """Undo ``tape_name``; a name without the prefix is kept (the original left those too)."""
    return staged[len(prefix):] if prefix and staged.startswith(prefix) else staged


def list_dataset(root: str, subdirs: bool) -> list[str]:
    """Return the sorted relative paths of the files of ``root``.

    Raises DatasetRefused for an empty dataset, a sub-folder when ``subdirs`` is false, or a
    symlink or special file; FileNotFoundError if ``root`` is missing.
    """
    found, pending = [], [""]
    while pending:
        prefix = pending.pop()
        with os.scandir(os.path.join(root, prefix) if prefix else root) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    if not subdirs:
                        raise DatasetRefused(f"{root}: sub-folder {rel!r} in the dataset "
                                             "(set tsm.subdirs to back up trees)")
                    pending.append(rel + "/")
                elif entry.is_file(follow_symlinks=False):
                    found.append(rel)
                else:
                    raise DatasetRefused(f"{root}: symlink or special file {rel!r}")
    if not found:
        raise DatasetRefused(f"{root}: no files in the dataset")
    return sorted(found)


@dataclass
class Staged:
    """A staged dataset: where, its manifest under original names, and how names changed."""

    path: str
    prefix: str
    manifest: Manifest  # original relative path -> (size, adler32)
    sha512: dict[str, str] = field(default_factory=dict)  # when asked for (legacy sources)
    bytes_read: int = 0

    def staged_path(self, rel: str) -> str:
        return posixpath.join(self.path, tape_name(rel, self.prefix))

    def staged_manifest(self) -> Manifest:
        return {tape_name(rel, self.prefix): value for rel, value in self.manifest.items()}

    @property
    def size(self) -> int:
        return sum(size for size, _ in self.manifest.values())


def copy_and_hash(src: str, dst: str, want_sha512: bool,
                  check: Callable[[], None] | None = None) -> tuple[int, str, str | None]:
    """Copy one regular file, hashing the bytes as they pass; keep its mode and times.

    Returns (size, adler32 hex, sha512 hex or None).  ``check`` is called every block (a lease
    check that raises stops the copy).
    """
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DatasetRefused(f"not a regular file: {src}")
        value, total = 1, 0
        sha = hashlib.sha512() if want_sha512 else None
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        with open(dst, "xb", buffering=0) as out:
            while True:
                n = os.readv(fd, [buf])
                if not n:
                    break
                block = view[:n]
                value = zlib.adler32(block, value)
                if sha is not None:
                    sha.update(block)
                out.write(block)
                total += n
                if check:
                    check()
    finally:
        os.close(fd)
    shutil.copystat(src, dst, follow_symlinks=False)
    return total, f"{value & 0xFFFFFFFF:08x}", sha.hexdigest() if sha else None


def stage(source: str, target: str, prefix: str, *, subdirs: bool = False,
          want_sha512: bool = False, check: Callable[[], None] | None = None) -> Staged:
    """Copy the dataset ``source`` to the new directory ``target`` under tape names.

    Refuses (DatasetRefused) what the original refused: no files, sub-folders (unless
    ``subdirs``), and two files with identical content, which the original's name-blind
    checksum could not tell apart.  ``target`` must not exist.
    """
    files = list_dataset(source, subdirs)
    os.mkdir(target)
    staged = Staged(target, prefix, {})
    by_content: dict[tuple[int, str], str] = {}
    for rel in files:
        dst = staged.staged_path(rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        size, adler, sha = copy_and_hash(os.path.join(source, rel), dst, want_sha512, check)
        staged.manifest[rel] = (size, adler)
        staged.bytes_read += size
        if sha:
            staged.sha512[rel] = sha
        twin = by_content.get((size, adler))
        if twin is not None and _same_bytes(staged.staged_path(twin), dst):
            raise DatasetRefused(f"{source}: files {twin!r} and {rel!r} have identical content")
        by_content.setdefault((size, adler), rel)
    log.debug("staged %s as %s: %d file(s), %d bytes", source, target, len(files), staged.size)
    return staged


def _same_bytes(a: str, b: str) -> bool:
    """Compare two files byte by byte (only when size and adler32 already agree: rare)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(BLOCK), fb.read(BLOCK)
            if x != y:
                return False
            if not x:
                return True


def legacy_from_sha512(sha512: dict[str, str]) -> str:
    """Return the original's dirhash from per-file sha512 digests (names play no part)."""
    digest = hashlib.sha512()
    for hexdigest in sorted(sha512.values()):
        digest.update(hexdigest.encode("utf-8"))
    return digest.hexdigest()


def find_restored(scratch: str, dataset: str) -> str:
    """Return the restored dataset inside ``scratch``.

    ``dsmc restore DIR/ DEST/`` puts the files either in ``DEST/<dataset>/`` (what the original
    found) or directly in ``DEST/``; both are accepted.  Raises FileNotFoundError if empty.
    """
    nested = os.path.join(scratch, dataset)
    if os.path.isdir(nested) and os.listdir(nested):
        return nested
    if os.path.isdir(scratch) and [n for n in os.listdir(scratch) if n != dataset]:
        return scratch
    raise FileNotFoundError(f"nothing was restored into {scratch}")


def unstage_names(directory: str, prefix: str) -> list[str]:
    """Rename the top-level files of a restored dataset back to their original names.

    Returns the names that did not carry the prefix (kept as they are).  A target name that
    exists already is an error (two staged names cannot map to one original).
    """
    kept: list[str] = []
    if not prefix:
        return kept
    for name in sorted(os.listdir(directory)):
        original = original_name(name, prefix)
        if original == name:
            kept.append(name)
            continue
        target = os.path.join(directory, original)
        if os.path.lexists(target):
            raise DatasetRefused(f"{directory}: {name!r} and {original!r} both restored")
        os.rename(os.path.join(directory, name), target)
    return kept


def remove_tree(path: str | None) -> None:
    """Remove a staging or scratch tree if it exists (cleanup in every outcome)."""
    if path and os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
