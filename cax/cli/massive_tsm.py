"""massive-tsm: walk the runs that still need tape (or a restore from it), one dataset at a time.

The original started a full ``cax --once`` process per run on every pass, also for runs already
on tape, and mis-handled its run-range flags (one bound alone was ignored, ``from > to`` crashed
on a typo).  Here the runs-DB query selects only runs with work left, so a run already on tape
costs nothing, and each selected run goes through the daemon's own tape task, in this process,
with its own log file ``tsm_log_<run|name>_<YYMMDD>_<HHMMSS>.txt`` and one summary line.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from cax.cli.base import (
    FILE_FORMAT,
    MAX_RUN_NUMBER,
    RUN_NUMBER,
    FiniteFloat,
    build_context,
    default_config_path,
    guarded,
    host_option,
    log_level_option,
    setup_logging,
    utc_formatter,
)
from cax.config import Config, load_config
from cax.daemon import install_signal_handlers
from cax.errors import CaxError, ConfigError
from cax.logcontext import ContextFilter, log_context
from cax.runsdb import run_label, safe_component
from cax.tasks.base import Context
from cax.tasks.tape import TapeRestore, TapeTask, TapeUpload, tape_sites

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MassiveOptions:
    """The command line of massive-tsm."""

    once: bool = False
    run: int | None = None
    name: str | None = None
    from_run: int | None = None
    to_run: int | None = None
    last_days: float | None = None
    log_dir: Path = Path(".")
    sleep_s: float = 60.0


def selection(opts: MassiveOptions, now: dt.datetime) -> dict[str, Any]:
    """Return the runs-DB filter of --run, --name, --from-run, --to-run and --last-days.

    ``--to-run -1`` means no upper bound, as in the original.  Raises ConfigError for
    ``--from-run`` above ``--to-run``.
    """
    parts: list[dict[str, Any]] = []
    if opts.run is not None:
        parts.append({"number": opts.run})
    if opts.name is not None:
        parts.append({"name": opts.name})
    low = opts.from_run
    high = None if opts.to_run in (None, -1) else opts.to_run
    if low is not None and high is not None and low > high:
        raise ConfigError(f"--from-run {low} is above --to-run {high}")
    bounds = {**({"$gte": low} if low is not None else {}),
              **({"$lte": high} if high is not None else {})}
    if bounds:
        parts.append({"number": bounds})
    if opts.last_days is not None:
        parts.append({"start": {"$gt": now - dt.timedelta(days=opts.last_days)}})
    return parts[0] if len(parts) == 1 else ({"$and": parts} if parts else {})


def log_name(run: dict[str, Any], when: dt.datetime) -> str:
    """``tsm_log_<run|name>_<YYMMDD>_<HHMMSS>.txt``: the number for TPC runs, else the name
    (muon-veto datasets share numbers with TPC runs)."""
    number = run.get("number")
    label = number if isinstance(number, int) and run.get("detector", "tpc") == "tpc" \
        else run.get("name", "unknown")
    return f"tsm_log_{label}_{when.strftime('%y%m%d_%H%M%S')}.txt"


def tape_tasks(config: Config) -> list[type[TapeTask]]:
    """The directions this site's configuration asks for: upload, restore, or both."""
    found: list[type[TapeTask]] = [task for task, push in ((TapeUpload, True),
                                                           (TapeRestore, False))
                                   if tape_sites(config, push)]
    if not found:
        raise ConfigError(f"site {config.site.name} names no tape site (method tsm) in "
                          "upload_options or download_options")
    return found


def check_options(config: Config, opts: MassiveOptions) -> None:
    """Refuse a command line that cannot work before anything is opened (ConfigError)."""
    selection(opts, dt.datetime.now(dt.timezone.utc))
    tape_tasks(config)


def one_pass(ctx: Context, opts: MassiveOptions, formatter: logging.Formatter,
             echo: Callable[[str], None]) -> int:
    """Do every selected run once; return how many datasets failed."""
    failed = 0
    chosen = selection(opts, ctx.now())
    for task_class in tape_tasks(ctx.config):
        task = task_class(ctx)
        query = task.query()
        if query is None:
            continue
        where = {"$and": [query, chosen]} if chosen else query
        runs = sorted(ctx.runsdb.find_runs(where), key=lambda r: r.get("number", 0),
                      reverse=True)
        log.info("massive-tsm: %d run(s) need tape %s", len(runs), task.jobs_direction)
        for run in runs:
            if ctx.stop.is_set():
                return failed
            failed += _one_run(ctx, task, run, opts, formatter, echo)
    return failed


def _one_run(ctx: Context, task: TapeTask, run: dict[str, Any], opts: MassiveOptions,
             formatter: logging.Formatter, echo: Callable[[str], None]) -> int:
    path = opts.log_dir / log_name(run, ctx.now())
    handler = logging.FileHandler(path)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    before = len(task.results)
    try:
        with log_context(run_label(run)):
            try:
                task.each_run(run)
            except (CaxError, OSError) as exc:
                log.error("%s", exc)
            new = task.results[before:]
            for result in new:
                log.info("massive-tsm: %s", result.line())
    finally:
        root.removeHandler(handler)
        handler.close()
    for result in new:
        echo(result.line() + f" (log {path})")
    if not new:
        path.unlink(missing_ok=True)  # claimed elsewhere meanwhile: nothing to keep
    return sum(not r.ok for r in new)


def run_massive(ctx: Context, opts: MassiveOptions, formatter: logging.Formatter,
                echo: Callable[[str], None]) -> int:
    """Pass after pass (one with ``once``) until stopped; return the exit status."""
    opts.log_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    while not ctx.stop.is_set():
        failed = one_pass(ctx, opts, formatter, echo)
        if opts.once:
            break
        ctx.stop.wait(opts.sleep_s)
    return 1 if failed else 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--once", is_flag=True, help="Do one pass over the runs, then exit.")
@click.option("--config", "config_path", metavar="FILE", default=None,
              help="Configuration file, e.g. the original's cax_tsm_upload.json.")
@host_option
@click.option("--run", "run_number", type=RUN_NUMBER, metavar="N", help="Only run N.")
@click.option("--name", metavar="NAME", help="Only the run(s) called NAME.")
@click.option("--from-run", "--from_run", "from_run", type=RUN_NUMBER, metavar="N",
              help="Only runs numbered N or more.")
@click.option("--to-run", "--to_run", "to_run", type=click.IntRange(-1, MAX_RUN_NUMBER),
              metavar="N",
              help="Only runs numbered N or less (-1: no limit).")
@click.option("--last-days", "--last_days", "last_days", type=FiniteFloat(0, 36525),
              metavar="D",
              help="Only runs started in the last D days.")
@log_level_option
@click.option("--log-file", "--logfile", "log_file", metavar="FILE",
              help="Also write the summary log to FILE.")
@click.option("--log-dir", metavar="DIR", default=None,
              help="Where the per-dataset logs go [default: beside --log-file, else .].")
@click.option("--sleep", "sleep_s", type=FiniteFloat(0, 7 * 86400), default=60.0, show_default=True,
              help="Seconds between passes without --once.")
@click.option("--disable-database-update", "--disable_database_update", "no_db_update",
              is_flag=True, help="Do the work but write nothing to the runs DB.")
@guarded
def massive_tsm(once: bool, config_path: str | None, host: str | None, run_number: int | None,
                name: str | None, from_run: int | None, to_run: int | None,
                last_days: float | None, log_level: str, log_file: str | None,
                log_dir: str | None, sleep_s: float, no_db_update: bool) -> int:
    """Back runs up to tape (or restore them from it), one dataset at a time."""
    if run_number is not None and name is not None:
        raise ConfigError("give --run or --name, not both")
    if name is not None:
        safe_component(name)
    config = load_config(config_path or default_config_path(), host)
    setup_logging(log_level, log_file)
    where = Path(log_dir) if log_dir else (Path(log_file).parent if log_file else Path("."))
    opts = MassiveOptions(once, run_number, name, from_run, to_run, last_days, where, sleep_s)
    check_options(config, opts)
    ctx = build_context(config, no_db_update=no_db_update, once=True)
    ctx.background.shutdown()
    ctx.background = None  # one dataset at a time, in this thread, with its own log file
    install_signal_handlers(ctx.stop)
    formatter = utc_formatter(FILE_FORMAT)
    try:
        return run_massive(ctx, opts, formatter, click.echo)
    finally:
        ctx.runsdb.close()
