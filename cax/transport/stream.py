"""Transport that streams whole datasets over SSH (methods ``stream`` and ``auto``), over one
connection or several at once.

For datasets of many small files: rsync and scp pay per-file round trips, this pays one ssh
command per copy.  The site runs ``cax.transport.streamproto`` (sent on stdin to the one-line
python bootstrap, no shell string built from names) over the rsync backend's OpenSSH
ControlMaster; this side runs the other end in-process.  The receiving end computes each file's
adler32 from the bytes as it writes them, and ``put``/``get`` return that manifest of the
destination; the caller verifies it against the recorded manifest.

Resume: a file gets the source's mtime only when complete, and a new attempt sends only the
files that are missing, differ in size or mtime, or whose adler32 differs from the source's
(both ends compute it for those); of a large half-copied file, only the blocks whose hash
differs from the source's and the rest (``streamproto.RESUME_BLOCK``).  Copying a single file
(per-file repair) is the same protocol with one entry.

Parallel streams (issue 21): over a long round trip one SSH channel is capped by its window
(``lanes``), so a copy is spread over N streams, each on its own ControlMaster, i.e. its own
SSH and TCP connection.  The receiver first answers what it holds (``prepare``/``plan``, one
command), the work is cut into pieces (large files into ranges, each with its own adler32),
the streams take pieces (a push: from one queue as they go; a pull: a share fixed when the
site's sender starts), and a last command gives the range-written files their mtime.  A
stream whose connection dies or stalls is started again on a fresh connection with the pieces
it had not finished; the others go on.  N is the site's ``streams`` key, or automatic from the
round trip (measured once per transport by echoing a line through the site's end) and the
rate one stream reaches: one stream on a LAN.

``auto`` is ``stream``: with the block resume it no longer hands large files to rsync, whose
delta resume was the reason (bench/transfer.py: 1 GiB streamed 1.86 s, through rsync 2.98 s).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from cax import proc
from cax.checksum import Manifest
from cax.errors import TransferError
from cax.transport import lanes, ssh, streamproto
from cax.transport.base import (
    PERMANENT_ERROR_RE,
    Endpoint,
    Progress,
    StallWatch,
    transfer_timeout_s,
)
from cax.transport.rsync import RsyncTransport

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: Our end of a site command, ``run(rfile, wfile, add)``: it reads the site's answers from
#: ``rfile``, writes to ``wfile``, hands the bytes it moved to ``add``; what it returns is
#: the command's result.
SiteRun = Callable[[IO[bytes], IO[bytes], Callable[[int], None]], _T]

WATCH_PERIOD_S = 0.2
STREAM_SOURCE = Path(streamproto.__file__).read_text()
STREAM_RETRIES = 2
"""How often one stream of a parallel copy is started again after its connection failed."""
ROUND_TRIP_TTL_S = 3600.0
"""How long a measured round trip is trusted (routes change)."""
PINGS = 3
LOGINS_AT_ONCE = 8
"""Logins started at once: sshd's MaxStartups (10 by default) drops some beyond 10
unauthenticated connections at a time."""


class _Shared:
    """The caller's progress callback, called by one stream at a time."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        if nbytes and self.progress:
            with self.lock:
                self.progress(nbytes)


class _Pieces:
    """The pieces still to send, taken by the streams as they go; a failed stream gives back
    what it took."""

    def __init__(self, pieces: list[list]):
        self.todo = deque(pieces)
        self.lock = threading.Lock()

    def take(self) -> list | None:
        with self.lock:
            return self.todo.popleft() if self.todo else None

    def give_back(self, pieces: list[list]) -> None:
        with self.lock:
            self.todo.extendleft(reversed(pieces))

    def drain(self) -> list[list]:
        with self.lock:
            pieces, self.todo = list(self.todo), deque()
        return pieces

    def __bool__(self) -> bool:
        with self.lock:
            return bool(self.todo)


class _SiteEndFailed(Exception):
    """One site command failed: ``error`` for the caller, ``died`` if the connection or the
    stream broke (worth starting again), not the filesystem at either end."""

    def __init__(self, error: TransferError, died: bool):
        super().__init__(str(error))
        self.error, self.died = error, died


class StreamTransport(RsyncTransport):
    """Copy datasets as streams over the transport's ControlMasters; site ops as rsync's."""

    def __init__(self, endpoint: Endpoint, *, stall_timeout_s: float = 60.0):
        super().__init__(endpoint, stall_timeout_s=stall_timeout_s)
        #: The manifest put/get return was computed by the receiver from the bytes it wrote.
        self.manifest_is_destination = True
        #: Streams the last put/get used (for tests and the bench).
        self.last_streams = 1
        self._extra: list[RsyncTransport] = []  # the connections of streams 2..N
        self._round_trip: tuple[float, float] | None = None  # (seconds, when measured)
        self._peak_rate = lanes.PEAK_RATE

    # ---------------------------------------------------------------- data

    def put(self, local: Path, remote: str, progress: Progress | None = None) -> Manifest | None:
        local = Path(local).absolute()
        info = self.stat_source(local, "put")
        try:
            listing = streamproto.list_tree(str(local))
        except OSError as exc:
            raise self.fail("put", local, f"source: {exc.strerror or exc}", False) from exc
        streams = self._streams(info["size"])
        self.last_streams = streams
        started = time.monotonic()
        if streams == 1:
            manifest = self._stream("put", remote, {"role": "receive", "path": remote},
                                    info["size"], progress, lambda r, w, add: streamproto.send(
                                        str(local), r, w, add, listing=listing))
        else:
            manifest = self._parallel_put(local, remote, listing, info["size"], streams,
                                          progress)
        self._learn_rate(info["size"], time.monotonic() - started)
        return manifest

    def get(self, remote: str, local: Path, progress: Progress | None = None) -> Manifest | None:
        local = Path(local).absolute()
        streams, size = self._streams(None), 0
        if streams > 1:
            (info,) = self._siteop("get", remote, ["stat", remote])
            size = info["size"]
            streams = lanes.streams_for_size(streams, size)
        self.last_streams = streams
        started = time.monotonic()
        if streams == 1:
            manifest = self._stream("get", remote, {"role": "send", "path": remote}, size,
                                    progress, lambda r, w, add: streamproto.receive(
                                        str(local), r, w, add))
        else:
            manifest = self._parallel_get(remote, local, size, streams, progress)
        self._learn_rate(size, time.monotonic() - started)
        return manifest

    # ---------------------------------------------------------------- how many streams

    def _streams(self, nbytes: int | None) -> int:
        """Return the streams for a copy of ``nbytes`` (None: not known yet, the most)."""
        configured = self.endpoint.streams
        if configured == 1:
            return 1
        wanted = configured or lanes.auto_streams(self.round_trip_s(), self._peak_rate)
        return wanted if nbytes is None else lanes.streams_for_size(wanted, nbytes)

    def round_trip_s(self) -> float:
        """Return the round trip to the site through its SSH connection, measured once per
        transport (and hour): lines echoed by the site's end once it runs."""
        known = self._round_trip
        if known is not None and time.monotonic() - known[1] < ROUND_TRIP_TTL_S:
            return known[0]

        def echo(rfile, wfile, add) -> float:
            best = float("inf")
            for i in range(PINGS + 1):  # the first answer includes the site's start-up
                t0 = time.monotonic()
                wfile.write(b"%d\n" % i)
                wfile.flush()
                if rfile.readline() != b"%d\n" % i:
                    raise streamproto.StreamError("the echo came back wrong")
                if i:
                    best = min(best, time.monotonic() - t0)
            return best

        measured = self._command("connect to", "", {"role": "echo", "path": ""}, echo)
        self._round_trip = (measured, time.monotonic())
        log.debug("%r: round trip %.1f ms", self, measured * 1000)
        return measured

    def _learn_rate(self, nbytes: int, seconds: float) -> None:
        if nbytes >= lanes.MIN_STREAM_BYTES and seconds > 0:
            self._peak_rate = max(self._peak_rate, nbytes / seconds)

    # ---------------------------------------------------------------- one stream

    def _stream(self, what: str, remote: str, request: dict, nbytes: int,
                progress: Progress | None, run: SiteRun[dict[str, Any]]) -> Manifest:
        """Run the site's end with ``request`` and ours (``run(rfile, wfile, add)``)."""
        watch = StallWatch(self.stall_timeout_s, progress)
        try:
            manifest = self._site_end(self, what, remote, request, nbytes, watch, run).result
        except _SiteEndFailed as failed:
            raise failed.error from failed.__cause__
        return {rel: (size, adler) for rel, (size, adler) in manifest.items()}

    def _site_end(self, conn: RsyncTransport, what: str, remote: str, request: dict,
                  nbytes: int, watch: StallWatch, run: SiteRun[_T]) -> _Done[_T]:
        """Run one site command over ``conn``'s connection and ``run`` against it.

        Kills it when ``watch`` saw no progress for the stall timeout or the size-based limit
        passed; raises _SiteEndFailed with the TransferError to report.
        """
        try:
            conn._ensure_master()  # noqa: SLF001 - the connections are this module's
        except TransferError as exc:  # a login refused by a busy sshd (MaxStartups) may pass
            raise _SiteEndFailed(exc, died=exc.retryable and not self.aborted) from exc
        argv = ["ssh", *ssh.openssh_options(self.endpoint, conn._control), self._host,  # noqa: SLF001
                ssh.python_command(self.endpoint)]
        limit_s = transfer_timeout_s(nbytes)
        why: list[str] = []
        done = threading.Event()
        with proc.popen(argv, stdin=subprocess.PIPE, binary=True) as child, \
                conn._tracked(child):  # noqa: SLF001
            to_site, from_site = proc.pipe(child.stdin), proc.pipe(child.stdout)
            site_errors = proc.pipe(child.stderr)
            errors: deque[bytes] = deque(maxlen=25)
            drain = threading.Thread(target=lambda: errors.extend(site_errors), daemon=True,
                                     name="cax-stream-stderr")
            drain.start()
            streamproto.grow_pipe(to_site)
            streamproto.grow_pipe(from_site)

            def watchdog() -> None:
                started = time.monotonic()
                while not done.wait(WATCH_PERIOD_S):
                    late = time.monotonic() - started > limit_s
                    if watch.stalled() or late:
                        why.append("stalled" if watch.stalled() else "timeout")
                        conn._kill_master()  # noqa: SLF001 - it holds our pipes (fd passing)
                        child.kill()
                        return

            guard = threading.Thread(target=watchdog, daemon=True, name="cax-stream-watchdog")
            guard.start()
            failure: BaseException | None = None
            try:
                to_site.write(ssh.script_input(STREAM_SOURCE, "").encode("ascii"))
                streamproto.send_line(to_site, request)
                result = run(from_site, to_site, watch.add)
                to_site.close()
                child.wait(proc.KILL_GRACE_S)
            except (OSError, ValueError, KeyError, streamproto.StreamError,
                    subprocess.TimeoutExpired) as exc:
                failure = exc
            except BaseException:  # e.g. the progress callback raised: stop at once
                conn._stop_master()  # noqa: SLF001
                raise
            finally:
                done.set()
                guard.join()
                if failure is not None or child.poll() is None:
                    conn._stop_master()  # noqa: SLF001
                    child.kill()
                child.wait()
                drain.join(5)
        if failure is not None:
            stderr = b"".join(errors).decode("utf-8", "replace")
            error, died = self._stream_error(what, remote, failure, why, child.returncode,
                                             stderr)
            raise _SiteEndFailed(error, died) from failure
        return _Done(result)

    def _stream_error(self, what: str, remote: str, exc: BaseException, why: list[str],
                      code: int | None, stderr: str) -> tuple[TransferError, bool]:
        """Return the error to report, and whether the stream died (not a filesystem's
        error or a refused login: starting it again may work)."""
        if why == ["stalled"]:
            return self.stalled_error(what, remote), True
        if why:
            return self.fail(what, remote, "timed out", retryable=True), False
        known = ssh.classify_ssh_stderr(self.endpoint, stderr)
        if known:
            return TransferError(known[0], retryable=known[1]), False
        if isinstance(exc, streamproto.StreamError) and exc.errno is not None:
            # the other end's filesystem error (missing source, permission, not a directory)
            permanent = bool(PERMANENT_ERROR_RE.search(str(exc)))
            return self.fail(what, remote, str(exc), retryable=not permanent), False
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is not None:
            permanent = bool(PERMANENT_ERROR_RE.search(exc.strerror or ""))  # our own disk
            where = os.fsdecode(exc.filename)
            return self.fail(what, where, exc.strerror, retryable=not permanent), False
        last = stderr.strip().splitlines()[-1] if stderr.strip() else str(exc) or "no output"
        error = self.fail(what, remote, f"stream failed (exit {code}): {last}", retryable=True)
        return error, True

    # ---------------------------------------------------------------- several streams

    def _connections(self, streams: int) -> list[RsyncTransport]:
        """Return ``streams`` connections: this transport's and its extra ones (kept for the
        next copy, logins are round trips too)."""
        while len(self._extra) < streams - 1:
            self._extra.append(RsyncTransport(self.endpoint,
                                              stall_timeout_s=self.stall_timeout_s))
        return [self, *self._extra[:streams - 1]]

    @staticmethod
    def _log_in(conns: list[RsyncTransport]) -> list[threading.Thread]:
        """Start the extra connections' logins in the background (joined before use)."""

        room = threading.Semaphore(LOGINS_AT_ONCE)

        def login(conn: RsyncTransport) -> None:
            try:
                with room:
                    conn._ensure_master()  # noqa: SLF001
            except TransferError as exc:  # the stream itself will try again and report
                log.debug("%r: login failed: %s", conn, exc)

        threads = [threading.Thread(target=login, args=(c,), daemon=True,
                                    name="cax-stream-login") for c in conns]
        for thread in threads:
            thread.start()
        return threads

    def _parallel_put(self, local: Path, remote: str, listing: dict, nbytes: int,
                      streams: int, progress: Progress | None) -> Manifest:
        shared = _Shared(progress)
        conns = self._connections(streams)
        logins = self._log_in(conns[1:])
        try:
            reply = self._command("put", remote, {"role": "prepare", "path": remote},
                                  lambda r, w, add: (streamproto.send_line(w, listing),
                                                     streamproto.read_line(r))[1])
            have, partial = reply["have"], reply["partial"]
            items = streamproto.plan(str(local), listing, have, partial)
        except OSError as exc:
            raise self.fail("put", local, f"source: {exc.strerror or exc}", True) from exc
        finally:
            for thread in logins:
                thread.join()
        queue = _Pieces(lanes.split(items, streams))

        def one(conn: RsyncTransport, taken: list[list]) -> dict:
            def pieces() -> Iterator[list]:
                while (piece := queue.take()) is not None:
                    taken.append(piece)
                    yield piece

            def run(rfile, wfile, add) -> dict:
                streamproto.send_line(wfile, listing)
                return streamproto.send_part(str(local), listing, pieces(), rfile, wfile, add)

            request = {"role": "receive-part", "path": remote}
            return self._site_end(conn, "put", remote, request, nbytes,
                                  StallWatch(self.stall_timeout_s, shared.add), run).result

        answers = self._run_streams("put", remote, conns, [queue] * streams, one)
        manifest, to_complete = self._assemble("put", remote, listing, have, partial, answers)
        self._command("put", remote, {"role": "complete", "path": remote, "rels": to_complete},
                      lambda r, w, add: (streamproto.send_line(w, listing),
                                         streamproto.read_line(r))[1])
        return manifest

    def _parallel_get(self, remote: str, local: Path, nbytes: int, streams: int,
                      progress: Progress | None) -> Manifest:
        shared = _Shared(progress)
        conns = self._connections(streams)
        logins = self._log_in(conns[1:])
        got: dict = {}

        def plan(rfile, wfile, add) -> list:
            got["listing"], got["have"], got["partial"] = streamproto.prepare(
                str(local), rfile, wfile)
            return streamproto.read_line(rfile)["items"]

        try:
            items = self._command("get", remote, {"role": "plan", "path": remote}, plan)
        finally:
            for thread in logins:
                thread.join()
        listing = got["listing"]
        shares = [_Pieces(share) for share in lanes.assign(lanes.split(items, streams),
                                                           streams)]

        def one(conn: RsyncTransport, taken: list[list]) -> dict:
            share = shares[conns.index(conn)].drain()
            taken.extend(share)

            def run(rfile, wfile, add) -> dict:
                streamproto.send_line(wfile, listing)
                return streamproto.receive_part(str(local), listing, rfile, wfile, add)

            request = {"role": "send-part", "path": remote, "items": share}
            return self._site_end(conn, "get", remote, request, nbytes,
                                  StallWatch(self.stall_timeout_s, shared.add), run).result

        answers = self._run_streams("get", remote, conns, shares, one)
        manifest, to_complete = self._assemble("get", remote, listing, got["have"],
                                               got["partial"], answers)
        try:
            streamproto.complete(str(local), listing, to_complete)
        except (OSError, streamproto.StreamError) as exc:
            raise self.fail("get to", local, exc, retryable=True) from exc
        return manifest

    def _command(self, what: str, remote: str, request: dict, run: SiteRun[_T]) -> _T:
        """Run a short site command of a parallel copy over the first connection."""
        try:
            return self._site_end(self, what, remote, request, 0,
                                  StallWatch(self.stall_timeout_s), run).result
        except _SiteEndFailed as failed:
            raise failed.error from failed.__cause__

    def _run_streams(self, what: str, remote: str, conns: list[RsyncTransport],
                     queues: list[_Pieces],
                     one: Callable[[RsyncTransport, list[list]], dict]) -> list[dict]:
        """Run one stream per connection until its queue is empty; return their answers.

        A stream whose connection died is started again (up to STREAM_RETRIES times) with
        the pieces it had taken back in its queue, on a fresh connection; the others go on.
        Any other failure stops every stream and is raised here.
        """
        answers: list[dict] = []
        fatal: list[BaseException] = []
        stop = threading.Event()

        def stream(k: int) -> None:
            conn, queue, retries = conns[k], queues[k], 0
            while queue and not stop.is_set():
                taken: list[list] = []
                try:
                    answers.append(one(conn, taken))
                except _SiteEndFailed as failed:
                    queue.give_back(taken)
                    if failed.died and retries < STREAM_RETRIES and not self.aborted \
                            and not stop.is_set():
                        retries += 1
                        stop.wait(0.2 * retries)  # a login refused at a busy moment
                        log.warning("stream %d of %d to %s died (%s); starting it again "
                                    "alone", k + 1, len(conns), self.endpoint.site,
                                    failed.error)
                        continue
                    fatal.append(failed.error)
                except BaseException as exc:  # noqa: BLE001 - e.g. the progress callback's
                    fatal.append(exc)
                if fatal:
                    if not stop.is_set():
                        stop.set()
                        for other in conns:  # the others stop now, not at their end;
                            # (no abort flag: the transport stays usable for the next copy)
                            RsyncTransport._abort_now(other)  # noqa: SLF001
                    return

        threads = [threading.Thread(target=stream, args=(k,), daemon=True,
                                    name=f"cax-stream-{k + 1}") for k in range(len(conns))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.aborted:
            raise self.fail(what, remote, "aborted", retryable=True)
        if fatal:
            first = next((e for e in fatal if not isinstance(e, TransferError)), fatal[0])
            raise first
        if any(queues):
            raise self.fail(what, remote, "a stream gave up with work left", retryable=True)
        return answers

    def _assemble(self, what: str, remote: str, listing: dict, have: dict, partial: dict,
                  answers: list[dict]) -> tuple[Manifest, list[str]]:
        """Return the copy's manifest, from every stream's answer, and the files to complete."""
        written: dict = {}
        ranges: dict = {}
        for answer in answers:
            written.update(answer["files"])
            for rel, pieces in answer["ranges"].items():
                ranges.setdefault(rel, []).extend(pieces)
        try:
            manifest, to_complete = streamproto.assemble(listing, have, partial, written,
                                                         ranges)
        except streamproto.StreamError as exc:
            raise self.fail(what, remote, exc, retryable=True) from exc
        return {rel: (size, adler) for rel, (size, adler) in manifest.items()}, to_complete

    # ---------------------------------------------------------------- connections

    def _abort_now(self) -> None:
        super()._abort_now()
        for conn in self._extra:
            conn._aborted.set()  # noqa: SLF001 - no new login for this copy
            conn._abort_now()  # noqa: SLF001

    def close(self) -> None:
        for conn in self._extra:
            conn.close()
        self._extra = []
        super().close()


class _Done(Generic[_T]):
    """What ``run`` returned (a value, so that a None result is not a failure)."""

    def __init__(self, result: _T):
        self.result = result
