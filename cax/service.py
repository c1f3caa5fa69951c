"""Running cax as a service: one daemon per site and machine, log reopening, sd_notify.

* **The instance lock.**  Two daemons of one site on one machine would race each other for
  every claim and double the load for nothing, so the looping daemon holds an ``flock`` on
  ``cax-<site>.lock`` in the runtime directory ($CAX_RUNTIME_DIR, else systemd's
  $RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR/cax, else /tmp/cax-<uid>).  The kernel drops it
  when the process dies, however it dies, so a stale lock file never blocks a restart.  The
  descriptor is not inherited by the ssh/rsync children, which must not keep it alive.
* **SIGHUP** reopens the log file (after logrotate moved it), in a thread, so the handler
  never takes the logging lock the interrupted code may hold.
* **sd_notify**: with $NOTIFY_SOCKET set (``Type=notify``), READY/STATUS/WATCHDOG/STOPPING
  datagrams go to systemd; no dependency is needed for a datagram.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from pathlib import Path

from cax.errors import AlreadyRunningError

log = logging.getLogger(__name__)


def runtime_dir() -> Path:
    """Where the lock files live (created if needed)."""
    for name in ("CAX_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
        if os.environ.get(name):
            return Path(os.environ[name].split(":")[0])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "cax"
    return Path(f"/tmp/cax-{os.getuid()}")


class InstanceLock:
    """The one-daemon-per-site-and-machine lock; held until the process ends or ``release``."""

    def __init__(self, site: str, directory: Path | None = None):
        self.site = site
        self.path = (directory or runtime_dir()) / f"cax-{site}.lock"
        self._fd = -1

    def acquire(self) -> InstanceLock:
        """Take the lock; raise AlreadyRunningError naming the holder's pid if it is taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunningError(
                f"another cax daemon for site {self.site} runs on this machine (pid {holder}, "
                f"lock {self.path}); not starting a second one") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def reopen_log_files() -> None:
    """Close and reopen every log file of the root logger (after a rotation moved it)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream:
                    handler.stream.close()
                handler.stream = handler._open()
            finally:
                handler.release()
    log.info("log file reopened (SIGHUP)")


def reopen_logs_soon() -> None:
    """For a signal handler: reopen the log files in a thread of their own."""
    threading.Thread(target=reopen_log_files, name="cax-reopen-logs", daemon=True).start()


class Notifier:
    """systemd's notification protocol; every call is a no-op without $NOTIFY_SOCKET."""

    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or ""
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        #: Seconds between watchdog pings (half systemd's WatchdogSec), or None.
        self.watchdog_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine \
            else None
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, message: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            log.debug("sd_notify %s not sent: %s", message.split("=")[0], exc)

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """Tell systemd the daemon is alive (at most every half interval)."""
        if self.watchdog_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_s / 2:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")
