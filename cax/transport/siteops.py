"""Small filesystem operations run ON a site: prepare, stat, rename, remove, exists, free.

The local backend imports these functions; the SSH backends send this file's source on stdin
to a one-line ``python3`` bootstrap (``cax.transport.ssh.python_command``), then the request as
one JSON line, so no path from the runs DB ever passes through a remote shell and any login
shell (sh, bash, csh, tcsh) can start it.  Several operations go in one request (one round trip).

This file must stay standard-library only and run on the oldest python3 a site may have
(3.6): no ``from __future__`` imports, no subscripted builtin generics, no walrus.

Request:  ``{"ops": [["prepare", "/p", "dir", false], ["stat", "/p"], ...]}``
Reply:    ``{"results": [...]}``, or ``{"results": [...], "error": "...", "errno": N,
"op": i}`` for the first operation that failed (later ones are not run).
"""

import ctypes
import errno
import json
import os
import shutil
import stat
import sys

AT_FDCWD = -100
RENAME_NOREPLACE = 1


def kind(path: str) -> str:
    """Return "dir", "file", "other" or "missing" for ``path`` (symlinks are not followed)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "other"


def exists(path: str) -> bool:
    """Return whether ``path`` exists; errors other than "not there" propagate."""
    return kind(path) != "missing"


def remove(path: str) -> None:
    """Remove ``path`` recursively; a missing path is fine."""
    what = kind(path)
    if what == "dir":
        shutil.rmtree(path)
    elif what != "missing":
        os.unlink(path)


def prepare(path: str, want: str, replace: bool) -> None:
    """Create the parents of ``path``; clear ``path`` if ``replace`` or if it is not a ``want``.

    Raises NotADirectoryError / FileExistsError when a parent is not a directory.
    """
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if kind(parent) != "dir":
        os.makedirs(parent, exist_ok=True)
    have = kind(path)
    if have != "missing" and (replace or have != want):
        remove(path)


def stat_tree(path: str) -> dict:
    """Return ``{"kind": "dir" or "file", "size": bytes, "files": count}`` of a dataset.

    Raises FileNotFoundError if ``path`` is missing.
    """
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        return {"kind": "file", "size": info.st_size, "files": 1}
    size = files = 0
    for root, _dirs, names in os.walk(path, onerror=_raise):
        for name in names:
            size += os.lstat(os.path.join(root, name)).st_size
            files += 1
    return {"kind": "dir", "size": size, "files": files}


def _raise(exc: OSError) -> None:
    raise exc


def rename(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` atomically, refusing to replace an existing ``dst``.

    Uses renameat2(RENAME_NOREPLACE) where the kernel and filesystem have it, so the check and
    the rename are one step; elsewhere falls back to check-then-rename.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        renameat2 = None
    if renameat2 is not None:
        ret = renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE)
        if ret == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst if err == errno.EEXIST else src)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def link_tree(src: str, dst: str) -> None:
    """Make ``dst`` a tree of hard links to the files of ``src`` (a new directory, or a link).

    How a new owner resumes from an earlier attempt's bytes without sharing them: rsync writes
    each file anew and renames it into place, never into an existing inode, so whatever an
    earlier owner's process still writes lands in its own tree, never in ``dst``.
    """
    if not os.path.isdir(src):
        os.link(src, dst)
        return
    os.mkdir(dst)
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        target = dst if rel == "." else os.path.join(dst, rel)
        for name in dirs:
            os.mkdir(os.path.join(target, name))
        for name in files:
            os.link(os.path.join(root, name), os.path.join(target, name))


def free_space(path: str) -> dict:
    """Return ``{"free", "total"}`` bytes of the filesystem that holds (or would hold) ``path``:
    its nearest existing ancestor's, as an unprivileged writer sees it."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    info = os.statvfs(path)
    return {"free": info.f_bavail * info.f_frsize, "total": info.f_blocks * info.f_frsize}


OPS: dict = {"prepare": prepare, "stat": stat_tree, "rename": rename, "remove": remove,
             "exists": exists, "link_tree": link_tree, "free": free_space}


def handle(request: dict) -> dict:
    """Run the operations of one request in order, stopping at the first failure."""
    results = []
    for index, op in enumerate(request["ops"]):
        try:
            results.append(OPS[op[0]](*op[1:]))
        except OSError as exc:
            return {
                "results": results,
                "op": index,
                "errno": exc.errno or 0,
                "error": f"{exc.strerror or exc}: {exc.filename or op[1]}",
            }
    return {"results": results}


def main() -> None:
    """Read one JSON request on stdin, write one JSON reply on stdout."""
    reply = handle(json.loads(sys.stdin.readline()))
    sys.stdout.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
