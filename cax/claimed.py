"""Claimed work: the one path by which anything cax makes or copies becomes "good".

Copies, repairs, checksums, purges, processing and tape all follow it::

    claim (a lease on the entry, judged by the runs DB's clock)
      -> work in a scratch path unique to this owner and attempt
      -> verify every checksum
      -> register, in one write that re-checks ownership (owner and token)

* **Lease.** ``RunsDB.claim`` grants it atomically; a ``Keeper`` renews it while the work
  goes on.  If the keeper cannot renew before a local deadline -- measured on the monotonic
  clock, at ``STOP_AT`` of the lease after the last renewal was *sent* -- it stops the work
  (kills the transport or the subprocess) itself, so the old owner has stopped writing before
  the lease can expire and anybody else may claim.  If another owner took the lease over, it
  stops the work at once.
* **Scratch.** Bytes are written under ``scratch_path(final, token)``; the token is unique to
  the claim, so two owners never write the same file.
* **Register.** Only after every checksum matched, and only while the claim is ours.
* **Failures** are classified by ``failure_kind``: transient ones (races, a vanished file, a
  network cut, a checksum mismatch) are retried with backoff up to ``max_attempts``, which
  counts takeovers of expired leases too; permanent ones and configuration errors are retried
  once the configuration changes (their fix usually is a change of it), or by a person
  (``cax retry``).
* **Scheduling** of background work (busy, full, wait, claim, submit) is ``schedule``.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cax.clock import when
from cax.errors import CaxError, ConfigError, LeaseLostError, UnsafeNameError
from cax.runsdb import EntryKey
from cax.runsdb.ledger import Claim
from cax.runsdb.origins import Proof

log = logging.getLogger(__name__)

#: Renew the lease this often (a fraction of its length).
RENEW_EVERY = 0.25
#: Stop the work when no renewal succeeded for this fraction of the lease.
STOP_AT = 0.75
#: The lease time that must be left to begin a final step (rename, register).
FINAL_STEP_LEFT = 0.15
MAX_BACKOFF_S = 6 * 3600
#: errno values that retrying cannot fix: the site's permissions or filesystem need a person.
PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}


def failure_kind(exc: BaseException) -> str:
    """Tell whether retrying ``exc`` can help: ``transient``, ``permanent`` or ``config``.

    Races are transient: a file that vanished (ENOENT) was most likely moved or replaced by
    someone else meanwhile.  Errors that name an explicit ``retryable`` say so themselves.
    """
    if isinstance(exc, (ConfigError, UnsafeNameError)):
        return "config"
    retryable = getattr(exc, "retryable", None)
    if retryable is not None:
        return "transient" if retryable else "permanent"
    if isinstance(exc, OSError):
        return "permanent" if exc.errno in PERMANENT_ERRNOS else "transient"
    if isinstance(exc, CaxError):
        return "transient"
    return "permanent"  # a bug or bad data: retrying the same thing gives the same result


def backoff_s(first_s: float, attempts: int) -> float:
    """Seconds before the next attempt: doubling from ``first_s``, at most six hours."""
    return min(first_s * 2 ** max(attempts - 1, 0), MAX_BACKOFF_S)


def config_fingerprint(raw_sites: Any) -> str:
    """A short hash of the sites' configuration: config errors retry when it changes."""
    text = json.dumps(raw_sites, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def short_reason(exc: BaseException, limit: int = 300) -> str:
    """Return the first line of ``exc`` for the runs DB, shortened in the middle: the cause
    usually comes last, after long paths."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else f"{text[:100]} ... {text[-(limit - 105):]}"


class LeftRunning(CaxError):
    """The daemon stops while work it started goes on outside it (a batch job): nothing is
    recorded or removed; the lease lapses and the next daemon adopts the work."""


class Keeper:
    """Renews a claim's lease while work goes on; stops the work when it cannot.

    ``add_stopper`` registers what stops the work (abort a transport, kill a process group).
    The stoppers run once, from the keeper's watchdog thread, when the lease was taken over
    or when no renewal succeeded for ``STOP_AT`` of the lease.  The watchdog is separate from
    the renewing thread, so a renewal that hangs on an unreachable runs DB cannot delay it.
    """

    def __init__(self, db: Any, claim: Claim, lease_s: float, granted_at: float):
        self.db, self.claim, self.lease_s = db, claim, lease_s
        self.lost: str | None = None  # why the work must stop
        self._deadline = granted_at + lease_s * STOP_AT
        self._stoppers: list[Callable[[], None]] = []
        self._cond = threading.Condition()
        self._done = False
        self._threads = [threading.Thread(target=self._renew_loop, daemon=True,
                                          name="cax-lease"),
                         threading.Thread(target=self._watchdog, daemon=True,
                                          name="cax-lease-watchdog")]

    def __enter__(self) -> Keeper:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()
        self._threads[1].join()
        self._threads[0].join(timeout=1.0)  # a renewal stuck on the DB is left to finish

    def add_stopper(self, stop: Callable[[], None]) -> None:
        """Register ``stop``; it is called at once if the work must already stop."""
        with self._cond:
            self._stoppers.append(stop)
            fire = self.lost is not None
        if fire:
            self._call(stop)

    def remove_stopper(self, stop: Callable[[], None]) -> None:
        with self._cond:
            if stop in self._stoppers:
                self._stoppers.remove(stop)

    def left_s(self) -> float:
        """Seconds until this daemon stops the work unless a renewal succeeds."""
        return self._deadline - time.monotonic()

    def check(self, need_fraction: float = 0.0) -> None:
        """Raise LeaseLostError if the work must stop, or if less than ``need_fraction`` of
        the lease is left (a final step must not start when it might outlive the lease)."""
        if self.lost is None and self.left_s() < need_fraction * self.lease_s:
            self._lose(f"lease of {self.claim.key} has too little time left "
                       f"({max(self.left_s(), 0):.1f} s) for the final step")
        if self.lost is not None:
            raise LeaseLostError(self.lost)

    def _renew_loop(self) -> None:
        interval = self.lease_s * RENEW_EVERY
        while True:
            with self._cond:
                if self._cond.wait_for(lambda: self._done or self.lost is not None, interval):
                    return
            sent = time.monotonic()
            try:
                ok = self.db.renew(self.claim, self.lease_s)
            except CaxError as exc:  # a DB hiccup: the next renewal may still make it
                log.warning("lease of %s not renewed (%.0f s left before the work is "
                            "stopped): %s", self.claim.key, max(self.left_s(), 0), exc)
                continue
            if not ok:
                self._lose(f"lease of {self.claim.key} was taken over by another daemon")
                return
            with self._cond:
                self._deadline = max(self._deadline, sent + self.lease_s * STOP_AT)
                self._cond.notify_all()

    def _watchdog(self) -> None:
        with self._cond:
            while not self._done:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._done:
                return
        self._lose(f"lease of {self.claim.key} could not be renewed for "
                   f"{self.lease_s * STOP_AT:.0f} s (runs DB unreachable?)")

    def _lose(self, reason: str) -> None:
        with self._cond:
            if self.lost is not None:
                return
            self.lost = reason
            stoppers = list(self._stoppers)
            self._cond.notify_all()
        log.warning("%s: stopping the work", reason)
        for stop in stoppers:
            self._call(stop)

    @staticmethod
    def _call(stop: Callable[[], None]) -> None:
        try:
            stop()
        except Exception:  # a stopper failing must not keep the others from running
            log.exception("stopping the work failed")


class ClaimedJob:
    """One attempt of claimed work at this site.

    Subclasses set ``run_id``, ``key`` and ``label``, and implement ``take`` (the claim, with
    the runs-DB transition that fits), ``work`` (which ends with ``register``) and, if they
    write scratch data, ``cleanup``.
    """

    run_id: Any
    key: EntryKey
    label: str

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.db = ctx.runsdb
        self.claim: Claim | None = None
        self.keeper: Keeper | None = None
        self._granted_at = 0.0
        #: Why the attempt failed, for ``cleanup`` (None while it has not).
        self.failure: BaseException | None = None

    @property
    def lease_s(self) -> float:
        return self.ctx.config.lease_seconds

    @property
    def max_attempts(self) -> int:
        return self.ctx.site.max_attempts

    @property
    def attempts(self) -> int:
        return self.claim.attempts if self.claim else 0

    def take(self) -> Claim | None:
        """Claim the entry with the transition that fits the work; None if not ours."""
        raise NotImplementedError

    def work(self, keeper: Keeper) -> None:
        """Do the work under ``keeper``; verify; end with ``self.register(...)``."""
        raise NotImplementedError

    def cleanup(self) -> None:
        """Remove this attempt's scratch data after a failure (never anything registered)."""

    def failure_fields(self) -> dict[str, Any]:
        """Fields recorded with a failure besides the reason (e.g. a resumable scratch)."""
        return {}

    def on_stuck(self) -> None:
        """Called when the work will not be retried automatically (e.g. put data back)."""

    def record_lease_loss(self) -> bool:
        """Whether a lease this daemon could not keep is recorded as a failed attempt (the
        work was stopped), rather than left to expire for a taker-over to judge (work that
        goes on outside the daemon, such as a batch job whose cancel may not have worked)."""
        return True

    # -- the life of an attempt ---------------------------------------------------------------

    def take_claim(self) -> bool:
        """Claim the work for this daemon; False if another daemon has it or it gave up."""
        self._granted_at = time.monotonic()  # before the request: the lease is older than this
        claim = self.take()
        if claim is None:
            return False
        self.claim = claim
        if claim.takeover:
            prev = claim.previous or {}
            done = claim.attempts - 1  # the attempts made: the claim counted a new one
            log.warning("%s: took over %s from %s, whose lease expired at %s (%s)",
                        self.label, self.key, prev.get("lease_owner"),
                        when(prev.get("lease_expires")),
                        f"attempt {claim.attempts}" if claim.attempts <= self.max_attempts
                        else f"none left after {done}")
            if claim.attempts > self.max_attempts:
                self._record(f"gave up after {done} attempt(s): the last one's daemon "
                             f"({prev.get('lease_owner')}) stopped without finishing",
                             "permanent", attempts=done)
                self.claim = None
                return False
        return True

    def run(self) -> bool:
        """Do the claimed work; record the outcome in the runs DB; return whether it went."""
        assert self.claim is not None, "run() before a successful take_claim()"
        keeper = Keeper(self.db, self.claim, self.lease_s, self._granted_at)
        self.keeper = keeper
        try:
            with keeper:
                self.work(keeper)
            return True
        except LeftRunning as exc:  # a warm stop: the work goes on without us
            log.info("%s", exc)
            return True
        except LeaseLostError as exc:
            log.warning("%s: %s; not registered", self.label, exc)
            self.failure = exc
            self._cleanup()
            if keeper.lost and "taken over" not in keeper.lost and self.record_lease_loss():
                self._record(short_reason(exc), "transient")  # still ours if nobody took it
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, bugs included
            if not isinstance(exc, (CaxError, OSError)):
                log.exception("%s: unexpected error", self.label)
            self.failure = exc
            self._cleanup()
            self.fail(exc)
        return False

    def register(self, fields: dict[str, Any], unset: tuple[str, ...] = (), *,
                 proof: Proof) -> None:
        """Register the verified result, only while the claim is ours and ``proof`` holds."""
        assert self.claim is not None
        if self.keeper is not None:
            self.keeper.check(FINAL_STEP_LEFT)
        if not self.db.register_verified(self.claim, fields, unset, proof=proof):
            raise LeaseLostError(f"entry {self.key} changed hands, or its dataset's origin "
                                 "changed, before registration")

    def fail(self, exc: BaseException) -> None:
        """Record a failed attempt with its kind; log it with the attempt count."""
        self._record(short_reason(exc), failure_kind(exc))

    def _cleanup(self) -> None:
        try:
            self.cleanup()
        except (CaxError, OSError) as exc:
            log.warning("%s: scratch data not removed: %s", self.label, exc)

    def _record(self, reason: str, kind: str, attempts: int | None = None) -> None:
        """Record the failure; ``attempts`` corrects the count a claim made but did not use."""
        assert self.claim is not None
        now = self.ctx.now()
        fields = self.failure_fields()
        if attempts is None:
            attempts = self.attempts
        else:
            fields["attempts"] = attempts
        stuck = kind != "transient" or attempts >= self.max_attempts
        retry_at = None if stuck else now + dt.timedelta(
            seconds=backoff_s(self.ctx.site.retry_backoff, attempts))
        if stuck:
            why = {"transient": f"no attempts left ({attempts} of {self.max_attempts})",
                   "permanent": "retrying alone cannot fix this; retried once the "
                                "configuration changes",
                   "config": "retried once the configuration changes"}[kind]
            log.error("%s: %s failed on attempt %d, not retried (%s; `cax retry` retries "
                      "it): %s", self.label, self.key, attempts, why, reason)
        else:
            log.warning("%s: %s attempt %d of %d failed, retrying after %s: %s", self.label,
                        self.key, attempts, self.max_attempts, when(retry_at), reason)
        if stuck:
            self.on_stuck()
        try:
            config_hash = None if kind == "transient" else self.ctx.config_hash
            self.db.record_failure(self.claim, reason, kind=kind, retry_at=retry_at,
                                   config_hash=config_hash, fields=fields)
        except CaxError as exc:  # the lease expires and the work is taken over later
            log.error("%s: failure not recorded: %s", self.label, exc)


def schedule(ctx: Any, name: str, job: ClaimedJob, what: str, pool: Any = None) -> bool:
    """Claim ``job`` and run it in a background worker of ``pool`` (default: the transfer
    workers; none: here, in this thread).

    Skips work already running under ``name`` in this process; when every worker is busy the
    work waits for the next pass, except with ``--once``, which waits for a free worker.
    Returns whether the job was started.
    """
    background = pool if pool is not None else ctx.background
    if background is not None:
        if background.busy(name):
            return False
        if ctx.dry_run:
            log.info("dry run: would %s", what)
            return False
        if background.full:
            if not ctx.once:
                log.debug("all %d workers busy; %s waits for the next pass",
                          background.max_workers, what)
                return False
            background.wait_for_slot()
    elif ctx.dry_run:
        log.info("dry run: would %s", what)
        return False
    if not job.take_claim():
        log.debug("%s: claimed by another daemon", what)
        return False
    if background is None:
        job.run()
    else:
        background.submit(name, job.run)
    return True
