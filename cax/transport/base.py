"""The transport interface: move one dataset between this machine and one site.

A dataset is a directory tree of raw files or one processed file.  Paths on the site are
absolute POSIX strings; local paths are ``pathlib.Path``.  Backends live one per module
(``local``, ``scp``, ``rsync``, ``openssh``) and are found through ``open_transport`` by the
method name in the site's config, imported only when used.

Errors, for every backend:
  * ``TransferError(retryable=True)``: network or SSH failure, dropped connection, stalled
    copy, timeout, non-zero tool exit that may go away.  The message names site, host and path.
  * ``TransferError(retryable=False)``: authentication failure, unknown or changed host key,
    permission denied at the destination, source missing, destination parent not a directory.
  * ``FileExistsError`` from ``rename`` when the target exists, ``FileNotFoundError`` from
    ``manifest``/``rename`` when the path is missing on the site.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cax.checksum import Manifest
from cax.errors import ConfigError, TransferError
from cax.transport import siteops

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
"""Called with the number of NEW bytes copied since the previous call."""

TIMEOUT_BASE_S = 600.0
TIMEOUT_PER_MB_S = 2.0
PERMANENT_ERROR_RE = re.compile(
    r"Permission denied|Operation not permitted|Not a directory"
    r"|Is a directory|Read-only file system"
)
"""Filesystem errors in a tool's message that trying again will not fix.  "No such file or
directory" and "File exists" are not among them: during a copy they mean a race (a file moved
or replaced meanwhile), which the next attempt, after backoff, sees the end of."""
OS_CAUSE_RE = re.compile(
    PERMANENT_ERROR_RE.pattern + r"|No space left on device|Disk quota exceeded"
    r"|Input/output error|No such file or directory|File exists|Stale file handle"
    r"|File too large")
"""A tool's line that names the operating system's reason: the cause to report, where the
tool's last lines only say that it, or its peer, gave up ("Broken pipe", "failed to upload")."""
REMOTE_OP_TIMEOUT_S = 300.0
"""Small site-side commands (prepare, stat, rename, remove, exists)."""
MANIFEST_TIMEOUT_S = 4 * 3600.0
"""Reading a whole dataset on a site; its size is not known beforehand (100 GB at 7 MB/s)."""


@dataclass(frozen=True)
class Endpoint:
    """How to reach a site; built from the site's cax.json section by the config code."""

    site: str
    method: str  # "local" | "scp" | "rsync" | "openssh" | "stream" | "auto"
    hostname: str | None = None
    port: int = 22
    username: str | None = None
    key_file: str | None = None  # private key; None → ssh defaults / agent
    known_hosts: str | None = None  # None → ~/.ssh/known_hosts
    accept_new_host_keys: bool = False  # explicit per-site opt-in; default refuses unknown keys
    connect_timeout_s: float = 30
    remote_python: str = "python3"  # runs the site-side helper scripts
    ciphers: tuple[str, ...] = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr")
    streams: int | None = None  # parallel SSH connections per copy; None: automatic

    @property
    def address(self) -> str:
        """Return ``host:port`` for messages (``local`` for a shared filesystem)."""
        return f"{self.hostname}:{self.port}" if self.hostname else "local"

    @property
    def known_hosts_path(self) -> str:
        """Return the known_hosts file actually used."""
        return self.known_hosts or os.path.expanduser("~/.ssh/known_hosts")


def transfer_timeout_s(nbytes: int) -> float:
    """Return the overall time limit for copying ``nbytes``: a fixed part plus one per MB.

    Stalls are caught much earlier by the progress watchdog; this only bounds a copy that
    creeps along forever.
    """
    return TIMEOUT_BASE_S + TIMEOUT_PER_MB_S * nbytes / 1e6


class StallWatch:
    """Track byte progress and say when none came for ``stall_timeout_s``.

    ``add`` forwards new bytes to the caller's progress callback; ``stalled`` is polled by the
    backend's loop or watchdog thread.
    """

    def __init__(self, stall_timeout_s: float, progress: Progress | None = None):
        self.stall_timeout_s = stall_timeout_s
        self.progress = progress
        self.total = 0
        self.last = time.monotonic()

    def add(self, nbytes: int) -> None:
        """Record ``nbytes`` new bytes (0 still counts as a sign of life)."""
        self.last = time.monotonic()
        if nbytes:
            self.total += nbytes
            if self.progress:
                self.progress(nbytes)

    def alive(self) -> None:
        """Record a sign of life that moved no bytes."""
        self.last = time.monotonic()

    def stalled(self) -> bool:
        """Return True when nothing happened for longer than the stall timeout."""
        return time.monotonic() - self.last > self.stall_timeout_s


NO_SPACE_RE = re.compile(r"No space left on device|ENOSPC")
NOT_A_DISK_ERROR_RE = re.compile(
    r"No space left|[Cc]onnect|stalled|timed out|aborted|host key|[Aa]uthentication|[Pp]ermission")
"""Failures whose message says why already, or that a disk cannot cause: no diagnosis (it
would only add a connection attempt to a failure that may be one)."""
FULL_DISK_BYTES = 64 << 20
FULL_DISK_FRACTION = 0.001
"""A destination with no more free space than this (or this fraction of its size) is full."""

ABORT_WAIT_S = 30.0
"""How long ``abort`` waits for the running copy to give up (a write blocked on a hung mount)."""


class Transport(ABC):
    """Move one dataset between this machine and one site.

    Paths on the site are absolute POSIX strings.  A transport is a context manager; ``close``
    releases its connection.  Instances are not thread-safe: use one per worker; the one
    exception is ``abort``, which exists to be called from another thread.
    """

    def __init__(self, endpoint: Endpoint, *, stall_timeout_s: float = 60.0):
        self.endpoint = endpoint
        self.stall_timeout_s = stall_timeout_s
        self._aborted = threading.Event()
        self._ops = threading.Condition()
        self._running: dict[int, int] = {}  # thread id -> nesting depth of put/get

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Wrap every backend's ``put`` and ``get`` so that ``abort`` can stop and await them."""
        super().__init_subclass__(**kwargs)
        for name in ("put", "get"):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_abortable", False):
                setattr(cls, name, _abortable(name, method))
        close = cls.__dict__.get("close")
        if close is not None and not getattr(close, "_abortable", False):
            setattr(cls, "close", _resetting(close))  # noqa: B010

    # ----------------------------------------------------------------- abort

    def abort(self) -> None:
        """Stop the running ``put``/``get`` of this transport at once; safe from any thread.

        The running call raises ``TransferError("... aborted", retryable=True)``.  When this
        returns, the processes the copy started are dead and reaped (or its connection is
        closed and its loop has stopped), so nothing of ours writes to the destination any
        more.  The transport stays aborted (every later put/get raises at once) until
        ``close``; the caller drops it, as it does after any TransferError.
        """
        self._aborted.set()
        try:
            self._abort_now()
        finally:
            me = threading.get_ident()
            deadline = time.monotonic() + ABORT_WAIT_S
            with self._ops:
                while any(t != me for t in self._running):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        log.warning("%r: the aborted copy did not stop within %g s", self,
                                    ABORT_WAIT_S)
                        break
                    self._ops.wait(left)

    @property
    def aborted(self) -> bool:
        """Return whether ``abort`` was called (since the last ``close``)."""
        return self._aborted.is_set()

    def _abort_now(self) -> None:  # noqa: B027 - backends with processes or connections add to it
        """Kill what the running copy started (backend hook; called from any thread)."""

    def _reset_abort(self) -> None:
        self._aborted.clear()

    @abstractmethod
    def put(self, local: Path, remote: str, progress: Progress | None = None) -> Manifest | None:
        """Copy a local file or directory tree so that it exists exactly at ``remote``.

        Parents of ``remote`` are created.  If ``remote`` holds a partial copy from an earlier
        attempt, the transport may resume into it (rsync) or must replace it.  ``progress`` gets
        byte increments.  Return the source manifest if the method computed it while reading
        the source, else None.  The caller verifies with ``manifest(remote)``.
        """

    @abstractmethod
    def get(self, remote: str, local: Path, progress: Progress | None = None) -> Manifest | None:
        """Copy ``remote`` on the site to ``local`` (the mirror image of ``put``)."""

    @abstractmethod
    def manifest(self, remote: str) -> Manifest:
        """Return per-file size and adler32 of ``remote``, computed on the site itself.

        Raises FileNotFoundError if ``remote`` does not exist.
        """

    @abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Atomically rename ``src`` to ``dst`` on the site.

        Raises FileExistsError if ``dst`` exists, FileNotFoundError if ``src`` does not.
        """

    @abstractmethod
    def remove(self, remote: str) -> None:
        """Remove ``remote`` recursively; a missing path is fine."""

    def link_tree(self, src: str, dst: str) -> None:
        """Make ``dst`` a tree of hard links to the files of ``src`` on the site."""
        raise NotImplementedError

    @abstractmethod
    def exists(self, remote: str) -> bool:
        """Return whether ``remote`` exists on the site (a symlink counts, even dangling).

        A failure to find out raises TransferError (network) or OSError (e.g. permission
        denied on a parent): it never reads as "absent".
        """

    @abstractmethod
    def free_space(self, remote: str) -> dict:
        """Return ``{"free", "total"}`` bytes of the site's filesystem that holds ``remote``."""

    def disk_full(self, what: str, source: str | Path, dest: str | Path) -> str | None:
        """After a failed copy: say so if the destination's filesystem is full, or has less
        room than a pushed dataset needs.

        Tools often lose the reason on the way (rsync's sender reports only "Broken pipe",
        SFTP only "Failure"), and a full disk is what an admin must be told first.
        """
        try:
            if what == "get":
                space, needed = siteops.free_space(str(dest)), 0
            else:
                space, needed = self.free_space(str(dest)), siteops.stat_tree(str(source))["size"]
        except (OSError, TransferError, ValueError, KeyError, TypeError):
            return None  # no diagnosis: the copy's own error stands
        free = space["free"]
        where = f"this machine's {dest}" if what == "get" else self.where(dest)
        if free < needed:
            return f"not enough space: {free} bytes free at {where}, {needed} needed"
        if free <= max(FULL_DISK_BYTES, space["total"] * FULL_DISK_FRACTION):
            return f"the disk is full: {free} bytes free at {where}"
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold a connection
        """Release the connection (idempotent)."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} site={self.endpoint.site} {self.endpoint.address}>"

    # ----------------------------------------------------------------- derived helpers

    def where(self, path: str | Path) -> str:
        """Return ``site (host:port) path`` for error messages."""
        return f"site {self.endpoint.site} ({self.endpoint.address}) {path}"

    def fail(self, what: str, path: str | Path, reason: object, retryable: bool) -> TransferError:
        """Build a TransferError for ``what`` on ``path`` with site, host and the reason."""
        return TransferError(f"{what} {self.where(path)}: {reason}", retryable=retryable)

    def stat_source(self, local: Path, what: str) -> dict:
        """Return ``{"kind", "size", "files"}`` of a local source; missing is not retryable."""
        try:
            return siteops.stat_tree(str(local))
        except OSError as exc:
            retryable = isinstance(exc, FileNotFoundError)  # moved meanwhile: a race
            raise self.fail(what, local, f"source: {exc.strerror or exc}",
                            retryable=retryable) from exc

    def stalled_error(self, what: str, path: str | Path) -> TransferError:
        """Build the (retryable) error for a copy that made no progress."""
        reason = f"stalled: no progress for {self.stall_timeout_s:g} s"
        return self.fail(what, path, reason, retryable=True)


def _abortable(what: str, method: Callable) -> Callable:
    @functools.wraps(method)
    def run(self: Transport, *args: object, **kwargs: object) -> Manifest | None:
        me = threading.get_ident()
        path = str(args[0]) if args else "?"  # a str or Path: as the message shows it
        with self._ops:
            if self._aborted.is_set():
                raise self.fail(what, path, "aborted", retryable=True)
            self._running[me] = self._running.get(me, 0) + 1
        try:
            return method(self, *args, **kwargs)
        except BaseException as exc:
            if self._aborted.is_set() and not (isinstance(exc, TransferError)
                                               and str(exc).endswith("aborted")):
                raise self.fail(what, path, "aborted", retryable=True) from exc
            explained = _naming_full_disk(self, what, args, exc)
            if explained is not None:
                raise explained from exc
            raise
        finally:
            with self._ops:
                self._running[me] -= 1
                if not self._running[me]:
                    del self._running[me]
                self._ops.notify_all()

    run._abortable = True  # type: ignore[attr-defined]
    return run


def _naming_full_disk(transport: Transport, what: str, args: tuple,
                      exc: BaseException) -> TransferError | None:
    """A failed put's or get's error marked ``disk_full`` (with the full disk named when the
    tool did not say so), or None."""
    if what not in ("put", "get") or len(args) < 2 or not isinstance(exc, TransferError) \
            or not exc.retryable:
        return None
    if NO_SPACE_RE.search(str(exc)):  # the tool said it itself
        return TransferError(str(exc), retryable=True, disk_full=True)
    if NOT_A_DISK_ERROR_RE.search(str(exc)):
        return None
    full = transport.disk_full(what, args[0], args[1])
    return TransferError(f"{exc}; {full}", retryable=True, disk_full=True) if full else None


def _resetting(close: Callable) -> Callable:
    @functools.wraps(close)
    def run(self: Transport) -> None:
        try:
            close(self)
        finally:
            self._reset_abort()

    run._abortable = True  # type: ignore[attr-defined]
    return run


_BACKENDS = {
    "local": "cax.transport.local.LocalTransport",
    "scp": "cax.transport.scp.ScpTransport",
    "rsync": "cax.transport.rsync.RsyncTransport",
    "openssh": "cax.transport.openssh.OpenSSHTransport",
    "stream": "cax.transport.stream.StreamTransport",
    "auto": "cax.transport.stream.StreamTransport",
}


def open_transport(endpoint: Endpoint, **kwargs: object) -> Transport:
    """Return a transport for ``endpoint.method``, importing its backend on first use.

    Raises ConfigError naming the known methods if the method is unknown.
    """
    target = _BACKENDS.get(endpoint.method)
    if target is None:
        known = ", ".join(sorted(_BACKENDS))
        raise ConfigError(
            f"site {endpoint.site}: unknown transfer method {endpoint.method!r} (known: {known})"
        )
    module_name, class_name = target.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(endpoint, **kwargs)
