"""Transport for sites that share this machine's filesystem.

Copies with its own loop instead of ``shutil``/``cp`` so that the adler32 of every file comes
from the very buffer that was written: the returned manifest costs no second read of the
source.  Files are fsynced before ``put`` returns, because the caller records the copy as done
right after verifying it.  ``put`` and ``get`` are the same operation.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import zlib
from pathlib import Path

from cax.checksum import Manifest, scan_dataset
from cax.errors import TransferError
from cax.transport import siteops
from cax.transport.base import Progress, StallWatch, Transport

log = logging.getLogger(__name__)

BLOCK_BYTES = 4 * 2**20
RETRYABLE_ERRNOS = {errno.ENOSPC, errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.EDQUOT}


class _Stalled(Exception):
    pass


class LocalTransport(Transport):
    """Copy datasets within this machine's filesystems (a site that is mounted here)."""

    def put(self, local: Path, remote: str, progress: Progress | None = None) -> Manifest | None:
        return self._copy(Path(local), Path(remote), progress, "put")

    def get(self, remote: str, local: Path, progress: Progress | None = None) -> Manifest | None:
        return self._copy(Path(remote), Path(local), progress, "get")

    def manifest(self, remote: str) -> Manifest:
        return scan_dataset(Path(remote))

    def rename(self, src: str, dst: str) -> None:
        siteops.rename(src, dst)

    def remove(self, remote: str) -> None:
        try:
            siteops.remove(remote)
        except OSError as exc:
            raise self._error("remove", remote, exc) from exc

    def exists(self, remote: str) -> bool:
        return siteops.exists(remote)  # errors other than "not there" propagate

    def _copy(self, src: Path, dst: Path, progress: Progress | None, what: str) -> Manifest:
        """Replace ``dst`` by a copy of ``src``; return the manifest of what was read."""
        src, dst = src.absolute(), dst.absolute()
        if dst == src or src in dst.parents:
            raise self.fail(what, dst, f"destination is inside the source {src}", retryable=False)
        watch = StallWatch(self.stall_timeout_s, progress)
        try:
            is_dir = stat.S_ISDIR(os.stat(src).st_mode)
        except OSError as exc:
            raise self._error(f"{what} source", src, exc) from exc
        try:
            siteops.prepare(str(dst), "dir" if is_dir else "file", replace=True)
            if not is_dir:
                return {".": _copy_file(src, dst, watch)}
            return _copy_tree(src, dst, watch)
        except _Stalled:
            raise self.stalled_error(what, dst) from None
        except OSError as exc:
            raise self._error(what, exc.filename or dst, exc) from exc

    def _error(self, what: str, path: str | Path, exc: OSError) -> TransferError:
        return self.fail(what, path, exc.strerror or exc, exc.errno in RETRYABLE_ERRNOS)


def _copy_tree(src: Path, dst: Path, watch: StallWatch) -> Manifest:
    """Copy the tree ``src`` to the new directory ``dst``; return its manifest.

    Like ``scan_dataset``, refuses symlinks and special files inside the tree: a copy would not
    reproduce them and the manifest could not describe them.
    """
    manifest: Manifest = {}
    dirs: list[tuple[Path, os.stat_result]] = []
    pending = [Path(".")]
    while pending:
        rel = pending.pop()
        target = dst / rel
        target.mkdir()
        dirs.append((target, os.stat(src / rel)))
        with os.scandir(src / rel) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(rel / entry.name)
            elif entry.is_file(follow_symlinks=False):
                key = (rel / entry.name).as_posix()
                manifest[key] = _copy_file(Path(entry.path), target / entry.name, watch)
            else:
                raise OSError(errno.EINVAL, "symlink or special file in dataset", entry.path)
    for target, info in reversed(dirs):  # children first: filling a dir changes its mtime
        os.chmod(target, stat.S_IMODE(info.st_mode))
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
        _fsync_dir(target)
    _fsync_dir(dst.parent)
    return manifest


def _copy_file(src: Path, dst: Path, watch: StallWatch) -> tuple[int, str]:
    """Copy one regular file with its mode and times, fsync it; return (size, adler32 hex)."""
    buf = bytearray(BLOCK_BYTES)
    view = memoryview(buf)
    adler, size = 1, 0
    watch.alive()  # time spent on the previous file (fsync) is not a stall
    fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    with open(fd, "rb", buffering=0) as fin:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(src))
        with open(dst, "wb", buffering=0) as fout:
            while n := fin.readinto(buf):
                if watch.stalled():  # this one read took longer than the stall timeout
                    raise _Stalled
                chunk = view[:n]
                while chunk:
                    chunk = chunk[fout.write(chunk) :]
                adler = zlib.adler32(view[:n], adler)
                size += n
                watch.add(n)
            os.fchmod(fout.fileno(), stat.S_IMODE(info.st_mode))
            os.utime(fout.fileno(), ns=(info.st_atime_ns, info.st_mtime_ns))
            os.fsync(fout.fileno())
    return size, f"{adler:08x}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
