"""The daemon loop: run every task once per pass, report, sleep, repeat.

A pass is one function, ``run_pass``, so tests drive the daemon a pass at a time.  Nothing that
goes wrong in one task or one run stops the loop; a runs-DB outage makes the pause between
passes grow (capped) until the database answers again.  Signal handlers only set a flag: the
first SIGTERM/SIGINT lets the current step finish and exits 0; a second one kills the running
commands and ends the process at once (exit 128+N).  SIGHUP reopens the log file and re-reads
the configuration at the start of the next pass (systemd's ``reload``): a valid one replaces
the one in force, an invalid one is logged and the one in force is kept.

After each pass a looping daemon writes its heartbeat (with its pause, so ``cax status`` can
judge whether it is late), its metrics when asked to (``cax.metrics``) and, under systemd,
pings the watchdog (``cax.service.Notifier``); a stopped daemon's last heartbeat says it
stopped.  A ``--once`` run writes no heartbeat: it is no daemon, and a finished one must not
look like a dead one.  A ``--once`` run for chosen runs says which of their entries it left
alone because another process holds them under a live lease.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from cax import proc
from cax.clock import as_utc, utcnow, when
from cax.config import Config
from cax.errors import CaxError, ConfigError
from cax.runsdb import run_label
from cax.service import Notifier, reopen_logs_soon
from cax.tasks import Context, Outcome, Report, Task, run_task

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 600.0
#: How soon a pause notices a SIGHUP (the handler only sets a flag).
RELOAD_POLL_S = 1.0
#: Runs a ``--once`` pass looks at when it says what others hold.
HELD_RUNS_SHOWN = 20
#: Settings a reload cannot change under a running daemon (a restart applies them).
RUNS_DB_KEYS = ("runs_db", "runs_db_name", "runs_collection")


@dataclass(frozen=True)
class Reloaded:
    """A configuration re-read on SIGHUP, checked as at start-up, with its tasks and filter."""

    config: Config
    tasks: list[type[Task]]
    selector: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass
class PassResult:
    """What one pass did: one Outcome per task."""

    number: int
    outcomes: list[Outcome] = field(default_factory=list)
    #: ERROR lines logged during the pass (a failure even where no task counted one).
    error_lines: int = 0

    @property
    def failed(self) -> int:
        return sum(o.failed for o in self.outcomes)

    @property
    def last_error(self) -> str | None:
        errors = [e for o in self.outcomes for e in o.errors]
        return errors[-1] if errors else None


class ErrorCounter(logging.Handler):
    """Counts ERROR lines logged by cax during a pass: each one is a failed or refused item,
    so ``--once`` cannot exit 0 after printing one, whatever path logged it."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


class Daemon:
    """Runs ``tasks`` over the runs DB, pass after pass, for one site."""

    def __init__(self, ctx: Context, tasks: list[type[Task]], *, metrics: Any = None,
                 metrics_file: str | None = None, notifier: Notifier | None = None,
                 reload: Callable[[], Reloaded] | None = None,
                 reload_requested: threading.Event | None = None,
                 heartbeat: bool | None = None):
        self.ctx = ctx
        self.tasks = tasks
        self.passes = 0
        self.db_failures = 0
        self.metrics = metrics  # cax.metrics.DaemonMetrics, when metrics are wanted
        self.metrics_file = metrics_file
        self.notifier = notifier or Notifier({})
        #: Re-reads and checks the configuration (raises ConfigError), on SIGHUP.
        self.reload = reload
        self.reload_requested = reload_requested or threading.Event()
        self._last_info: dict[str, Any] | None = None
        self._retired: list[Any] = []  # transport pools of an earlier configuration
        #: Whether passes write a heartbeat: a looping daemon's do, a --once run's do not.
        self.heartbeat = not ctx.once if heartbeat is None else heartbeat
        self._config_read = utcnow()

    def run_pass(self, wait_background: bool = False) -> PassResult:
        """Run every task once, then write the heartbeat; return what happened.

        ``wait_background`` waits for transfers started in this pass (``--once``).
        """
        self.passes += 1
        result = PassResult(self.passes)
        errors = ErrorCounter()
        logging.getLogger("cax").addHandler(errors)
        try:
            self._run_tasks(result, wait_background)
        finally:
            logging.getLogger("cax").removeHandler(errors)
        result.error_lines = errors.count
        return result

    def _run_tasks(self, result: PassResult, wait_background: bool) -> None:
        started = self.ctx.now()
        log.info("pass %d: start (%d tasks)", self.passes, len(self.tasks))
        for line in self.ctx.config.silent_noops():
            log.warning("%s", line)
        for task_class in self.tasks:
            if self.ctx.stop.is_set():
                log.info("stop requested: skipping the remaining tasks")
                break
            self.notifier.watchdog()
            result.outcomes.append(run_task(task_class(self.ctx), self.ctx))
        if self.ctx.pools():
            background = Outcome("background")
            for pool in self.ctx.pools():
                if wait_background:
                    pool.wait()
                for failure in pool.take_failures():
                    background.fail(failure)
            result.outcomes.append(background)
        self._report(result, started)
        self._metrics(result, started)
        db_trouble = any(o.db_errors for o in result.outcomes)
        self.db_failures = self.db_failures + 1 if db_trouble else 0
        log.info("pass %d: done, %d item(s) done, %d failed", self.passes,
                 sum(o.done for o in result.outcomes), result.failed)

    def _report(self, result: PassResult, started: Any) -> None:
        info = {
            "pass": result.number,
            "pass_start": started,
            "pass_end": self.ctx.now(),
            "counts": {o.task: {"done": o.done, "failed": o.failed} for o in result.outcomes},
            "last_error": result.last_error,
            "sleep_seconds": self.ctx.config.sleep_seconds,
        }
        self._last_info = info
        if not self.heartbeat:
            return  # a one-off pass is no daemon: no heartbeat document to outlive it
        try:
            Report(self.ctx).heartbeat(info)
        except CaxError as exc:
            log.warning("heartbeat not written: %s", exc)
            result.outcomes.append(Outcome("Report", failed=1, db_errors=1, errors=[str(exc)]))

    def _metrics(self, result: PassResult, started: Any) -> None:
        """Snapshot the metrics and write the textfile; a failure costs only this snapshot."""
        if self.metrics is None:
            return
        try:
            self.metrics.observe(
                self.ctx.runsdb, now=self.ctx.now(), pass_start=started,
                failed_by_task={o.task: o.failed for o in result.outcomes},
                max_attempts={s.name: s.max_attempts for s in self.ctx.config.sites})
            if self.metrics_file:
                self.metrics.write(self.metrics_file)
        except (CaxError, OSError) as exc:
            log.warning("metrics not updated: %s", exc)

    def _stopped(self) -> None:
        """Leave a last heartbeat that says this daemon stopped (not died)."""
        if self._last_info is None or self.ctx.runsdb.read_only or not self.heartbeat:
            return
        try:
            Report(self.ctx).heartbeat({**self._last_info, "stopped": self.ctx.now()})
        except CaxError as exc:
            log.warning("last heartbeat not written: %s", exc)

    def _pause(self, seconds: float) -> bool:
        """Sleep until the next pass, pinging the watchdog; True if a stop was requested."""
        step = self.notifier.watchdog_s or seconds
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.notifier.watchdog()
            if self.ctx.stop.wait(min(left, step / 2, RELOAD_POLL_S)):
                return True
            if self.reload_requested.is_set():
                return False  # reload now, not after the whole pause
        return self.ctx.stop.is_set()

    def _reload_if_asked(self) -> None:
        """Apply a configuration re-read on SIGHUP, or keep the one in force if it is invalid.

        Work already running goes on under the settings it started with; transports and new
        work use the new ones.  A change of the runs DB needs a restart, so a reload that
        changes it is refused as a whole.
        """
        if not self.reload_requested.is_set():
            return
        self.reload_requested.clear()
        if self.reload is None:
            return
        old = self.ctx.config
        try:
            new = self.reload()
            changed = [k for k in RUNS_DB_KEYS if getattr(new.config, k) != getattr(old, k)]
            if changed:
                raise ConfigError(f"{', '.join(changed)} changed: a running daemon keeps its "
                                  "runs DB; restart it to use another")
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("SIGHUP: %s", problem)
            log.error("SIGHUP: configuration %s is invalid; keeping the one in force (read "
                      "at %s)", old.path, when(self._config_read))
            return
        self._apply(new)

    def _apply(self, new: Reloaded) -> None:
        old, ctx = self.ctx.config, self.ctx
        ctx.config, ctx.selector, self.tasks = new.config, new.selector, new.tasks
        ctx.__dict__.pop("config_hash", None)  # a cached property of the old configuration
        if ctx.transports is not None:
            self._retired.append(ctx.transports)  # running copies finish on their connections
            ctx.transports = None
        self._config_read = utcnow()
        log.info("SIGHUP: configuration %s re-read and valid: now in force (%d tasks)",
                 new.config.path, len(new.tasks))
        for line in new.warnings:
            log.warning("%s", line)
        if new.config.site.max_transfers != old.site.max_transfers:
            log.warning("SIGHUP: max_transfers %d -> %d takes effect at the next restart",
                        old.site.max_transfers, new.config.site.max_transfers)

    def _say_what_others_hold(self) -> None:
        """Log the entries of the chosen runs that another process holds under a live lease.

        A ``--once`` pass never takes over a live lease, so after a cold stop it leaves the
        stopped daemon's work alone until that lease expires: say so, and when.
        """
        if not self.ctx.selector:
            return
        try:
            runs = self.ctx.runsdb.find_runs(self.ctx.selector, projection={
                "number": 1, "name": 1, "data": 1}, limit=HELD_RUNS_SHOWN)
            now = self.ctx.now()
        except CaxError as exc:
            log.warning("cannot tell which entries other processes hold: %s", exc)
            return
        for line in held_by_others(runs, now, self.ctx.owner):
            log.warning("%s", line)

    def sleep_seconds(self) -> float:
        """The pause before the next pass: the configured one, longer after DB failures."""
        base = self.ctx.config.sleep_seconds
        if not self.db_failures:
            return base
        return min(max(base, 5.0) * 2 ** (self.db_failures - 1), MAX_BACKOFF_S)

    def run(self, once: bool = False) -> int:
        """Loop until stopped; return the exit status (``--once``: 1 if anything failed)."""
        self.notifier.ready(f"site {self.ctx.site.name}: first pass")
        try:
            while True:
                self._reload_if_asked()
                result = self.run_pass(wait_background=once)
                if once:
                    self._say_what_others_hold()
                    return 1 if result.failed or result.error_lines else 0
                if self.ctx.stop.is_set():
                    break
                pause = self.sleep_seconds()
                self.notifier.status(f"site {self.ctx.site.name}: pass {result.number} done, "
                                     f"{result.failed} failed; sleeping {pause:.0f} s")
                log.info("sleeping %.0f s", pause)
                if self._pause(pause):
                    break
        finally:
            self.notifier.stopping()
            for pool in self.ctx.pools():
                pool.wait()
                pool.shutdown()
            self.ctx.jobs = None  # made again by the next pass that processes
            for transports in [*self._retired, self.ctx.transports]:
                if transports is not None:
                    transports.close_all()
            self.ctx.close_batch()  # local jobs end (and are retried); SLURM jobs go on
            self._stopped()
        log.info("stopped after %d pass(es)", self.passes)
        return 0


def held_by_others(runs: list[dict[str, Any]], now: dt.datetime, owner: str) -> list[str]:
    """One line per entry of ``runs`` under a live lease of another owner than ``owner``."""
    lines = []
    for run in runs:
        for entry in run.get("data") or ():
            expires = entry.get("lease_expires") if isinstance(entry, dict) else None
            holder = entry.get("lease_owner") if isinstance(entry, dict) else None
            if not isinstance(expires, dt.datetime) or holder in (None, owner) \
                    or as_utc(expires) <= now:
                continue
            left = (as_utc(expires) - now).total_seconds()
            version = f"@{entry['pax_version']}" if entry.get("pax_version") else ""
            lines.append(
                f"{run_label(run)}: {entry.get('type')}{version} at {entry.get('host')} is "
                f"{entry.get('status')} under the lease of {holder} until {when(expires)} "
                f"({left:.0f} s from now); left alone: a live lease is never taken over (if "
                "its holder is gone, e.g. after a cold stop, the lease expires by itself)")
    return lines


def install_signal_handlers(stop: threading.Event,
                            reload_requested: threading.Event | None = None) -> None:
    """First SIGTERM/SIGINT: warm stop (set ``stop``).  Second: cold stop, exit 128+N.

    SIGHUP reopens the log file (logrotate's ``postrotate``) and, with ``reload_requested``,
    asks for the configuration to be re-read at the start of the next pass.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            stop.set()
            log.warning("%s: stopping after the current step; again to stop now",
                        signal.Signals(signum).name)
            return
        proc.kill_all()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    def hangup(signum: int, frame: FrameType | None) -> None:
        if reload_requested is not None:
            reload_requested.set()
        reopen_logs_soon()

    signal.signal(signal.SIGHUP, hangup)
