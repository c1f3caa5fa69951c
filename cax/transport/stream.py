"""Transport that streams a whole dataset over one SSH channel (methods ``stream`` and ``auto``).

For datasets of many small files: rsync and scp pay per-file round trips, this pays one ssh
command per copy.  The site runs ``cax.transport.streamproto`` (sent on stdin to the one-line
python bootstrap, no shell string built from names) over the rsync backend's OpenSSH
ControlMaster; this side runs the other end in-process.  The receiving end computes each file's
adler32 from the bytes as it writes them, and ``put``/``get`` return that manifest of the
destination; the caller verifies it against the recorded manifest.

Resume: a file gets the source's mtime only when complete, and a new attempt sends only the
files that are missing, differ in size or mtime, or whose adler32 differs from the source's
(both ends compute it for those).  The receiver writes small files on a few threads (see
``streamproto._Writers``).  Copying a single file (per-file repair) is the same
protocol with one entry.

``auto`` streams a dataset with at least ``STREAM_MIN_FILES`` files whose mean size is at most
``STREAM_MAX_MEAN_BYTES``, and uses rsync otherwise (its delta resume of one big half-copied
file is worth keeping).  Measured on this machine with bench/transfer.py (loopback, 2 cores):
see the module constants.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

from cax import proc
from cax.checksum import Manifest
from cax.errors import TransferError
from cax.transport import ssh, streamproto
from cax.transport.base import (
    PERMANENT_ERROR_RE,
    Endpoint,
    Progress,
    StallWatch,
    transfer_timeout_s,
)
from cax.transport.rsync import RsyncTransport

log = logging.getLogger(__name__)

STREAM_MIN_FILES = 20
STREAM_MAX_MEAN_BYTES = 8 * 2**20
"""``auto`` thresholds (see bench/transfer.py and the report in the module docstring)."""
WATCH_PERIOD_S = 0.2
STREAM_SOURCE = Path(streamproto.__file__).read_text()


def streams(info: dict) -> bool:
    """Return whether ``auto`` streams a dataset of ``info`` (``{"kind", "size", "files"}``)."""
    files = max(1, info["files"])
    return info["kind"] == "dir" and files >= STREAM_MIN_FILES \
        and info["size"] / files <= STREAM_MAX_MEAN_BYTES


class StreamTransport(RsyncTransport):
    """Copy datasets as one stream over the transport's ControlMaster; site ops as rsync's."""

    def __init__(self, endpoint: Endpoint, *, stall_timeout_s: float = 60.0):
        super().__init__(endpoint, stall_timeout_s=stall_timeout_s)
        self.auto = endpoint.method == "auto"
        #: Whether the last put/get streamed: its manifest was computed by the receiver from
        #: the bytes it wrote, so it is the destination's (rsync's, when ``auto`` chose rsync,
        #: is the source's read).
        self.manifest_is_destination = False

    def put(self, local: Path, remote: str, progress: Progress | None = None) -> Manifest | None:
        local = Path(local).absolute()
        info = self.stat_source(local, "put")
        self.manifest_is_destination = not (self.auto and not streams(info))
        if not self.manifest_is_destination:
            return super().put(local, remote, progress)
        try:
            listing = streamproto.list_tree(str(local))
        except OSError as exc:
            raise self.fail("put", local, f"source: {exc.strerror or exc}", False) from exc
        return self._stream("put", remote, {"role": "receive", "path": remote}, info["size"],
                            progress, lambda r, w, add: streamproto.send(
                                str(local), r, w, add, listing=listing))

    def get(self, remote: str, local: Path, progress: Progress | None = None) -> Manifest | None:
        local = Path(local).absolute()
        size = 0
        if self.auto:
            (info,) = self._siteop("get", remote, ["stat", remote])
            if not streams(info):
                self.manifest_is_destination = False
                return super().get(remote, local, progress)
            size = info["size"]
        self.manifest_is_destination = True
        return self._stream("get", remote, {"role": "send", "path": remote}, size, progress,
                            lambda r, w, add: streamproto.receive(str(local), r, w, add))

    def _stream(self, what: str, remote: str, request: dict, nbytes: int,
                progress: Progress | None, run) -> Manifest:
        """Run the site's end with ``request`` and ours (``run(rfile, wfile, add)``)."""
        self._ensure_master()
        argv = ["ssh", *ssh.openssh_options(self.endpoint, self._control), self._host,
                ssh.python_command(self.endpoint)]
        watch = StallWatch(self.stall_timeout_s, progress)
        limit_s = transfer_timeout_s(nbytes)
        why: list[str] = []
        done = threading.Event()
        with proc.popen(argv, stdin=subprocess.PIPE, binary=True) as child, \
                self._tracked(child):
            errors: deque[bytes] = deque(maxlen=25)
            drain = threading.Thread(target=lambda: errors.extend(child.stderr), daemon=True,
                                     name="cax-stream-stderr")
            drain.start()
            streamproto.grow_pipe(child.stdin)
            streamproto.grow_pipe(child.stdout)

            def watchdog() -> None:
                started = time.monotonic()
                while not done.wait(WATCH_PERIOD_S):
                    late = time.monotonic() - started > limit_s
                    if watch.stalled() or late:
                        why.append("stalled" if watch.stalled() else "timeout")
                        self._kill_master()  # it holds our pipes (fd passing)
                        child.kill()
                        return

            guard = threading.Thread(target=watchdog, daemon=True, name="cax-stream-watchdog")
            guard.start()
            failure: BaseException | None = None
            try:
                child.stdin.write(ssh.script_input(STREAM_SOURCE, "").encode("ascii"))
                streamproto.send_line(child.stdin, request)
                manifest = run(child.stdout, child.stdin, watch.add)
                child.stdin.close()
                child.wait(proc.KILL_GRACE_S)
            except (OSError, ValueError, streamproto.StreamError, subprocess.TimeoutExpired) as exc:
                failure = exc
            except BaseException:  # e.g. the progress callback raised: stop at once
                self._stop_master()
                raise
            finally:
                done.set()
                guard.join()
                if failure is not None or child.poll() is None:
                    self._stop_master()
                    child.kill()
                child.wait()
                drain.join(5)
        if failure is not None:
            raise self._stream_error(what, remote, failure, why, child.returncode,
                                     b"".join(errors).decode("utf-8", "replace"))
        return {rel: (size, adler) for rel, (size, adler) in manifest.items()}

    def _stream_error(self, what: str, remote: str, exc: BaseException, why: list[str],
                      code: int | None, stderr: str) -> TransferError:
        if why == ["stalled"]:
            return self.stalled_error(what, remote)
        if why:
            return self.fail(what, remote, "timed out", retryable=True)
        known = ssh.classify_ssh_stderr(self.endpoint, stderr)
        if known:
            return TransferError(known[0], retryable=known[1])
        if isinstance(exc, streamproto.StreamError) and exc.errno is not None:
            # the other end's filesystem error (missing source, permission, not a directory)
            permanent = bool(PERMANENT_ERROR_RE.search(str(exc)))
            return self.fail(what, remote, str(exc), retryable=not permanent)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is not None:
            permanent = bool(PERMANENT_ERROR_RE.search(exc.strerror or ""))  # our own disk
            where = os.fsdecode(exc.filename)
            return self.fail(what, where, exc.strerror, retryable=not permanent)
        last = stderr.strip().splitlines()[-1] if stderr.strip() else str(exc) or "no output"
        return self.fail(what, remote, f"stream failed (exit {code}): {last}", retryable=True)
