"""The Task interface and the runner that applies a task to the runs that may need it.

A task is idempotent in luigi's sense: it tells from the runs DB whether a run needs work, so a
pass after a crash redoes only what is missing.  ``query`` pushes that decision to the server,
so an idle pass fetches no run documents at all, whatever the size of the runs DB.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cax.claimed import config_fingerprint
from cax.config import Config, Site
from cax.errors import CaxError, RunsDBError
from cax.logcontext import log_context
from cax.runsdb import RunsDB, run_label

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What every task works with: configuration, runs DB, identity and the stop flag."""

    config: Config
    runsdb: RunsDB
    owner: str
    dry_run: bool = False
    selector: dict[str, Any] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    #: The clock of every runs-DB decision: the runs DB's own (``RunsDB.now``) by default.
    now: Callable[..., Any] = None  # type: ignore[assignment]
    background: Any = None  # cax.workers.Background, for work that outlives one pass
    once: bool = False  # one pass only: wait for a free transfer slot instead of skipping
    console: Callable[[str], None] | None = None  # live progress line on a terminal, if any
    transports: Any = None  # cax.transport.pool.TransportPool, made when first needed
    board: Any = None  # cax.progress.ProgressBoard of the running copies
    batch: Any = None  # cax.batch.BatchBackend of processing, made when first needed
    watcher: Any = None  # cax.batch.watcher.JobWatcher over ``batch``
    jobs: Any = None  # cax.workers.Background of processing attempts (one per batch job)
    ncpu: int | None = None  # cax --ncpu: process here, in this (batch) job, with N CPUs

    def __post_init__(self) -> None:
        if self.now is None:
            self.now = self.runsdb.now

    @property
    def site(self) -> Site:
        return self.config.site

    def pools(self) -> list[Any]:
        """The background workers: transfers, then processing attempts."""
        return [p for p in (self.background, self.jobs) if p is not None]

    def close_batch(self) -> None:
        """Stop watching jobs and release the batch backend (local jobs end; SLURM jobs go on
        and are adopted by the next daemon)."""
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
        if self.batch is not None:
            self.batch.close()
            self.batch = None

    @functools.cached_property
    def config_hash(self) -> str:
        """Fingerprint of the sites' configuration, kept with errors it caused."""
        return config_fingerprint(repr(self.config.sites))


@dataclass
class Outcome:
    """What one task did in one pass."""

    task: str
    done: int = 0
    failed: int = 0
    db_errors: int = 0
    errors: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failed += 1
        self.errors.append(message)


class Task:
    """One kind of work at this site, applied run by run.

    Subclasses implement ``query`` (which runs may need work, as a MongoDB filter; None means
    nothing to do at this site) and ``each_run`` or ``each_location``.  Raising CaxError or
    OSError marks the run failed in this pass; the runner goes on with the next run.
    """

    #: Tasks a site may name in ``task_list``; also the order in the registry.
    name: ClassVar[str] = ""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.site = ctx.site
        self.db = ctx.runsdb

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = cls.__name__

    def query(self) -> dict[str, Any] | None:
        """Return a filter selecting the runs that may need this task, or None."""
        return None

    def each_run(self, run: dict[str, Any]) -> None:
        """Work on one run; by default, on each of its data entries in turn."""
        for entry in list(run.get("data") or ()):
            self.each_location(run, entry)

    def each_location(self, run: dict[str, Any], entry: dict[str, Any]) -> None:
        """Work on one data entry of a run."""

    def finish(self) -> None:
        """Called once after the runs of this pass."""


def _combine(*queries: dict[str, Any]) -> dict[str, Any]:
    parts = [q for q in queries if q]
    if not parts:
        return {}
    return parts[0] if len(parts) == 1 else {"$and": parts}


def run_task(task: Task, ctx: Context) -> Outcome:
    """Apply ``task`` to every selected run that may need it; never raise for one bad run."""
    outcome = Outcome(task.name)
    with log_context(task.name):
        try:
            query = task.query()
            runs = [] if query is None else ctx.runsdb.find_runs(_combine(query, ctx.selector))
        except (CaxError, OSError) as exc:
            log.error("cannot select runs: %s", exc)
            outcome.fail(str(exc))
            outcome.db_errors += isinstance(exc, RunsDBError)
            return outcome
        for run in runs:
            if ctx.stop.is_set():
                break
            _run_one(task, run, outcome)
        try:
            task.finish()
        except (CaxError, OSError) as exc:
            log.error("%s", exc)
            outcome.fail(str(exc))
        except Exception as exc:
            log.exception("unexpected error finishing the task")
            outcome.fail(f"internal error: {exc!r}")
    return outcome


def _run_one(task: Task, run: dict[str, Any], outcome: Outcome) -> None:
    label = run_label(run)
    with log_context(label):
        try:
            task.each_run(run)
            outcome.done += 1
        except RunsDBError as exc:
            log.warning("runs DB problem: %s", exc)
            outcome.fail(f"{label}: {exc}")
            outcome.db_errors += 1
        except (CaxError, OSError) as exc:
            log.error("%s", exc)
            outcome.fail(f"{label}: {exc}")
        except Exception as exc:
            log.exception("unexpected error")
            outcome.fail(f"{label}: internal error: {exc!r}")
