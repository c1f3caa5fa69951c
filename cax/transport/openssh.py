"""Transport with OpenSSH's own ``scp`` binary (SFTP protocol) over the rsync backend's master.

The fastest verified cax method over SSH on CPU-bound machines: the bytes move through
OpenSSH's C client with AES-GCM, and the copy is verified with the site-side manifest.  It
does not resume: ``put``/``get`` clear a partial copy first (scp would nest a directory copied
onto an existing one), so an interrupted copy starts over.

Everything but the copy itself is ``RsyncTransport``'s: one OpenSSH ControlMaster per transport
carries scp's SFTP session and the site commands (prepare, stat, rename, remove, exists,
manifest), and connection and filesystem errors are mapped the same way.

Paths never pass through a shell: scp runs without ``-O``, so the remote side is the SFTP
server, and operands follow ``--``.  In SFTP mode scp expands glob patterns in a remote
SOURCE, so ``get`` escapes ``\\ * ? [ ]`` there.  scp prints no progress without a tty:
a background thread polls the size of the destination (the site's, through the master, for
``put``; the local tree for ``get``) about once a second, and that drives the stall watchdog.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cax import proc
from cax.checksum import Manifest
from cax.errors import TransferError
from cax.transport import siteops, ssh
from cax.transport.base import (
    OS_CAUSE_RE,
    PERMANENT_ERROR_RE,
    Endpoint,
    Progress,
    StallWatch,
    transfer_timeout_s,
)
from cax.transport.rsync import (
    RsyncTransport,
    _drain,
    _follow,
    _OutputReader,
    _stop_group,
)

log = logging.getLogger(__name__)

SIZE_POLL_S = 1.0
"""How often the destination's size is measured (at most; slower when measuring is slow)."""
SIZE_POLL_TIMEOUT_S = 60.0
_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")


def scp_options(ep: Endpoint, control_path: str) -> list[str]:
    """Return the ssh options of the rsync backend spelled for scp (``-P`` port, ``User=``)."""
    opts = ssh.openssh_options(ep, control_path)
    out: list[str] = []
    for flag, value in zip(opts[::2], opts[1::2], strict=True):
        if flag == "-p":
            out += ["-P", value]  # scp's -p preserves times
        elif flag == "-l":
            out += ["-o", f"User={value}"]  # scp's -l limits bandwidth
        else:
            out += [flag, value]
    return out


def glob_escape(path: str) -> str:
    """Quote the characters scp's SFTP-mode glob would expand in a remote source path."""
    return _GLOB_SPECIAL.sub(r"\\\1", path)


class OpenSSHTransport(RsyncTransport):
    """Copy datasets with OpenSSH ``scp`` (SFTP mode) over the transport's ControlMaster."""

    def put(self, local: Path, remote: str, progress: Progress | None = None) -> Manifest | None:
        local = Path(local).absolute()
        info = self.stat_source(local, "put")
        # replace: scp nests a directory copied onto an existing one and cannot resume
        self._siteop("put", remote, ["prepare", remote, info["kind"], True])
        self._scp(
            "put",
            remote,
            (str(local), self._remote_arg(remote)),
            info,
            progress,
            lambda: self._remote_size(remote),
        )
        return None

    def get(self, remote: str, local: Path, progress: Progress | None = None) -> Manifest | None:
        local, info = self._prepare_get(remote, local, replace=True)
        self._scp(
            "get",
            remote,
            (self._remote_arg(glob_escape(remote)), str(local)),
            info,
            progress,
            lambda: siteops.stat_tree(str(local))["size"],
        )
        return None

    def _scp(
        self,
        what: str,
        remote: str,
        args: tuple[str, str],
        info: dict,
        progress: Progress | None,
        measure: Callable[[], int | None],
    ) -> None:
        """Run one scp of ``args`` (source, destination), polling the destination's size.

        Aborts it when the size did not grow for the stall timeout or it ran past the
        size-based time limit.
        """
        self._ensure_master()
        argv = ["scp", "-r", "-p", "-q", *scp_options(self.endpoint, self._control), "--", *args]
        period = min(SIZE_POLL_S, max(0.2, self.stall_timeout_s / 2))
        watch = StallWatch(self.stall_timeout_s + 2 * period, progress)
        limit_s = transfer_timeout_s(info["size"])
        with proc.popen(argv, merge_stderr=True) as child, self._tracked(child):
            reader = _OutputReader(proc.pipe(child.stdout))
            poller = _SizePoller(measure, period)
            try:
                aborted = _follow(child, poller, watch, limit_s)
            finally:
                poller.stop()
                if child.poll() is None:  # stalled, too slow, or the progress callback raised
                    _stop_group(child)
                if child.returncode != 0:
                    # the master holds scp's ssh pipes (fd passing) and a poll may hang on a
                    # dead peer: ending the master releases both
                    self._stop_master()
                _drain(child, reader)
                poller.join(5)
        if aborted == "stalled":
            raise self.stalled_error(what, remote)
        if aborted:
            raise self.fail(what, remote, f"scp timed out after {limit_s:g} s", True)
        if child.returncode != 0:
            error = self._scp_error(what, remote, child.returncode, list(reader.tail))
            if what == "put" and not self.aborted:  # the site tells a cause from a race
                error = self._diagnose_put(remote, error)
            raise error
        if info["size"] > watch.total:
            watch.add(info["size"] - watch.total)  # the bytes since the last poll

    def _scp_error(self, what: str, remote: str, code: int, tail: list[str]) -> TransferError:
        text = "\n".join(tail)
        known = ssh.classify_ssh_stderr(self.endpoint, text)
        if known:
            return TransferError(known[0], retryable=known[1])
        lines = [line.strip() for line in tail if line.strip()] or ["no output"]
        # scp ends with a generic "failed to upload ..."; the cause is an earlier line
        cause = next((x for x in lines if OS_CAUSE_RE.search(x)), lines[-1])
        retryable = not PERMANENT_ERROR_RE.search(text)
        return self.fail(what, remote, f"scp exited with {code}: {cause}", retryable)

    def _diagnose_put(self, remote: str, error: TransferError) -> TransferError:
        """Return the site's own error for a failed put when it names one, else ``error``.

        The SFTP server reports EPERM as "Permission denied", and a directory it could not
        create as "stat remote: No such file or directory"; creating the destination directly
        on the site shows the real cause.
        """
        try:
            self._siteops(["prepare", remote + "/.cax-probe", "dir", False], path=remote)
            self._siteops(["remove", remote], path=remote)
        except OSError as exc:
            # the cause goes last: the runs DB keeps the two ends of a long message
            cause = os.strerror(exc.errno) if exc.errno else str(exc)
            return TransferError(f"{error}; creating it on the site: {cause}", retryable=False)
        except TransferError:
            pass
        return error

    def _remote_size(self, remote: str) -> int | None:
        """Return the bytes under ``remote`` on the site (None while it cannot be measured).

        Runs in the poller thread: it uses the master but never starts or stops it.
        """
        argv = [
            "ssh",
            *ssh.openssh_options(self.endpoint, self._control),
            self._host,
            ssh.python_command(self.endpoint),
        ]
        request = ssh.script_input(ssh.SITEOPS_SOURCE, ssh.siteops_request(["stat", remote]))
        result = proc.run(argv, input=request, timeout=SIZE_POLL_TIMEOUT_S, check=False,
                          host=self._host, purpose=f"size of {remote}")
        if result.returncode != 0 or not result.stdout.strip():
            return None
        try:
            return ssh.siteops_results(result.stdout)[0]["size"]
        except OSError:
            return None  # not created yet


class _SizePoller(threading.Thread):
    """Measure the destination's size every ``period_s`` and hand growth to a StallWatch."""

    def __init__(self, measure: Callable[[], int | None], period_s: float):
        super().__init__(name="cax-scp-size", daemon=True)
        self.measure, self.period_s = measure, period_s
        self.total = self._sent = 0
        self._stopped = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._stopped.is_set():
            started = time.monotonic()
            try:
                size = self.measure()
            except Exception as exc:  # noqa: BLE001 - a failed poll only means no news
                log.debug("measuring the destination failed: %s", exc)
                size = None
            if size is not None and not self._stopped.is_set():
                self.total = max(self.total, size)
            took = time.monotonic() - started
            self._stopped.wait(max(self.period_s - took, 4 * took))  # cheap on big trees

    def stop(self) -> None:
        self._stopped.set()

    def forward(self, watch: StallWatch) -> None:
        """Pass new bytes to ``watch`` (called from the copying thread)."""
        total = self.total
        if total > self._sent:
            watch.add(total - self._sent)
            self._sent = total
