"""Command-line entry points.  The only module that sets up logging, prints and exits.

Exit codes: 0 success (also after a warm stop); 1 a task or item failed (``--once``); 2 usage
or configuration invalid; 3 runs DB unreachable at start; 4 internal error; 128+N killed by
a second signal N.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

import cax
from cax.config import Config, load_config
from cax.daemon import Daemon, install_signal_handlers
from cax.errors import (
    CaxError,
    ConfigError,
    NotAvailableError,
    RunsDBError,
    UnsafeNameError,
)
from cax.logcontext import ContextFilter
from cax.runsdb import open_runsdb, safe_component
from cax.tasks import Context, select_tasks
from cax.workers import Background

log = logging.getLogger("cax")

EXIT_FAILED, EXIT_USAGE, EXIT_DB, EXIT_INTERNAL = 1, 2, 3, 4
LOG_FORMAT = "%(asctime)sZ %(levelname)-7s %(ctx)s%(message)s"
FILE_FORMAT = "%(asctime)sZ %(levelname)-7s %(process)d %(name)s: %(ctx)s%(message)s"


def setup_logging(level: str, log_file: str | None) -> None:
    """Human-readable records on stderr, and in ``log_file`` too when given; times in UTC."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
    if log_file:
        handlers.append(logging.FileHandler(log_file))
        handlers[1].setFormatter(logging.Formatter(FILE_FORMAT, "%Y-%m-%d %H:%M:%S"))
    for handler in handlers:
        handler.formatter.converter = time.gmtime
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
    logging.getLogger("paramiko").setLevel(max(root.level, logging.WARNING))


def guarded(fn: Callable[..., int]) -> Callable[..., None]:
    """Run a command body; turn its errors into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs)
        except ConfigError as exc:
            for problem in exc.problems:
                click.echo(f"cax: {problem}", err=True)
            code = EXIT_USAGE
        except (UnsafeNameError, NotAvailableError) as exc:
            click.echo(f"cax: {exc}", err=True)
            code = EXIT_USAGE
        except RunsDBError as exc:
            click.echo(f"cax: {exc}", err=True)
            code = EXIT_DB
        except CaxError as exc:
            click.echo(f"cax: {exc}", err=True)
            code = EXIT_FAILED
        except Exception as exc:  # the one place that must not let anything out
            log.exception("internal error")
            click.echo(f"cax: internal error: {exc!r} (details in the log)", err=True)
            code = EXIT_INTERNAL
        sys.exit(code)

    return wrapper


def default_config_path() -> str:
    return os.environ.get("CAX_CONFIG", "cax.json")


def make_owner(site: str) -> str:
    """Identify this daemon process in leases and heartbeats: site@host:pid:start."""
    return f"{site}@{socket.gethostname()}:{os.getpid()}:{int(time.time())}"


def run_selector(run: int | None, name: str | None, datasets: tuple[str, ...] | None) -> dict:
    """Turn ``--run``/``--name``/``dataset_list`` into a runs-DB filter."""
    parts: list[dict[str, Any]] = []
    if run is not None:
        parts.append({"number": run})
    if name is not None:
        parts.append({"name": safe_component(name)})
    if datasets is not None:
        parts.append({"name": {"$in": list(datasets)}})
    return parts[0] if len(parts) == 1 else ({"$and": parts} if parts else {})


def terminal_line(text: str) -> None:
    """Redraw the one live progress line on stderr (a terminal only)."""
    width = shutil.get_terminal_size().columns - 1
    click.echo("\r\x1b[K" + text[:width], err=True, nl=False)


def build_context(config: Config, *, dry_run: bool = False, no_db_update: bool = False,
                  run: int | None = None, name: str | None = None,
                  once: bool = False) -> Context:
    """Connect to the runs DB and assemble what the tasks need for this site."""
    runsdb = open_runsdb(config.runs_db, config.runs_db_name, config.runs_collection,
                         read_only=dry_run or no_db_update)
    return Context(
        config=config,
        runsdb=runsdb,
        owner=make_owner(config.site.name),
        dry_run=dry_run,
        selector=run_selector(run, name, config.datasets_wanted),
        background=Background(config.site.max_transfers),
        once=once,
        console=terminal_line if sys.stderr.isatty() else None,
    )


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--once", is_flag=True, help="Do one pass, then exit (1 if anything failed).")
@click.option("--config", "config_path", metavar="FILE", default=None,
              help="Configuration file [default: $CAX_CONFIG or ./cax.json].")
@click.option("--run", "run_number", type=int, metavar="N", help="Only the run(s) numbered N.")
@click.option("--name", metavar="NAME", help="Only the run(s) called NAME.")
@click.option("--host", metavar="SITE", help="Act as this site [default: short host name].")
@click.option("--log", "log_level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--log-file", metavar="FILE", help="Also write the log to FILE.")
@click.option("--dry-run", is_flag=True, help="Log what a pass would do; change nothing.")
@click.option("--disable-database-update", "--disable_database_update", "no_db_update",
              is_flag=True, help="Do the work but write nothing to the runs DB.")
@click.option("--ncpu", type=click.IntRange(1), metavar="N",
              help="Process here with N CPUs (the job command line of massive-cax).")
@click.version_option(cax.__version__, prog_name="cax")
@click.pass_context
def cli(click_ctx: click.Context, once: bool, config_path: str | None, run_number: int | None,
        name: str | None, host: str | None, log_level: str, log_file: str | None,
        dry_run: bool, no_db_update: bool, ncpu: int | None) -> None:
    """Keep this site's data where it must be, and tell the runs DB the truth about it."""
    if click_ctx.invoked_subcommand:
        return
    if run_number is not None and name is not None:
        raise click.UsageError("give --run or --name, not both")
    guarded(_daemon)(once, config_path or default_config_path(), run_number, name, host,
                     log_level, log_file, dry_run, no_db_update, ncpu)


def _daemon(once: bool, config_path: str, run: int | None, name: str | None, host: str | None,
            log_level: str, log_file: str | None, dry_run: bool, no_db_update: bool,
            ncpu: int | None = None) -> int:
    if name is not None:
        safe_component(name)
    config = load_config(config_path, host)
    tasks = select_tasks(config.tasks_wanted)
    setup_logging(log_level, log_file)
    ctx = build_context(config, dry_run=dry_run, no_db_update=no_db_update, run=run, name=name,
                        once=once)
    ctx.ncpu = ncpu
    log.info("cax %s for site %s (%s), config %s%s", cax.__version__, config.site.name,
             ctx.owner, config.path, ", dry run" if dry_run else "")
    install_signal_handlers(ctx.stop)
    try:
        return Daemon(ctx, tasks).run(once=once)
    finally:
        ctx.runsdb.close()


@cli.command()
@click.option("--dir", "directory", default="cax-demo", show_default=True,
              help="Where to create the demo (runs DB, data of two sites, cax.json).")
@click.option("--runs", default=4, show_default=True, help="How many runs to create.")
@guarded
def demo(directory: str, runs: int) -> int:
    """Create a self-contained example with two local sites and run cax on it."""
    from cax.demo import run_demo

    setup_logging("info", None)
    for line in run_demo(Path(directory), runs):
        click.echo(line)
    return 0


def main() -> None:
    """Entry point of ``cax``."""
    threading.current_thread().name = "cax"
    cli(prog_name="cax")


def _not_available(command: str, issue: str) -> Callable[[], None]:
    @guarded
    def entry() -> int:
        raise NotAvailableError(f"{command} is not available yet ({issue})")

    return entry


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--once", is_flag=True, help="One pass, then exit.")
@click.option("--config", "config_path", metavar="FILE", default=None,
              help="Configuration file [default: $CAX_CONFIG or ./cax.json].")
@click.option("--host", metavar="SITE", help="Act as this site [default: short host name].")
@click.option("--run", "run_number", type=int, metavar="N", help="Only run N.")
@click.option("--start", type=int, metavar="N", help="Only runs numbered N or higher.")
@click.option("--stop", type=int, metavar="N", help="Only runs numbered N or lower.")
@click.option("--tag", metavar="TAG", help="Only runs with this tag.")
@click.option("--ncpu", type=click.IntRange(1), default=1, show_default=True,
              help="CPUs per job (passed on to cax in the job).")
@click.option("--mem-per-cpu", "--mem_per_cpu", "mem_per_cpu", type=click.IntRange(1),
              default=2000, show_default=True, help="MB of memory per CPU.")
@click.option("--walltime", default="48:00:00", show_default=True, help="Job time limit.")
@click.option("--partition", metavar="NAME", help="SLURM partition.")
@click.option("--qos", metavar="NAME", help="SLURM qos [default: the partition's, if known].")
@click.option("--reservation", metavar="NAME", help="SLURM reservation.")
@click.option("--max-queued", type=click.IntRange(1), metavar="N",
              help="Own jobs queued at most [default: processing.max_jobs].")
@click.option("--sleep", "sleep_s", type=float, default=3600, show_default=True,
              help="Seconds between passes (iterative mode).")
@click.option("--dry-run", is_flag=True, help="Print the scripts and commands; submit nothing.")
@click.option("--log", "log_level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--log-file", metavar="FILE", help="Also write the log to FILE.")
@click.version_option(cax.__version__, prog_name="massive-cax")
@guarded
def massive_cax(once: bool, config_path: str | None, host: str | None, run_number: int | None,
                start: int | None, stop: int | None, tag: str | None, ncpu: int,
                mem_per_cpu: int, walltime: str, partition: str | None, qos: str | None,
                reservation: str | None, max_queued: int | None, sleep_s: float, dry_run: bool,
                log_level: str, log_file: str | None) -> int:
    """Submit one batch job (cax --once --run N) per run that still needs processing."""
    from cax.batch.massive import MassiveOptions, parse_walltime, run_massive

    config = load_config(config_path or default_config_path(), host)
    setup_logging(log_level, log_file)
    opts = MassiveOptions(once, run_number, start, stop, tag, ncpu, mem_per_cpu,
                          parse_walltime(walltime), partition, qos, reservation, max_queued,
                          dry_run, sleep_s)
    ctx = build_context(config, dry_run=dry_run, once=True)
    install_signal_handlers(ctx.stop)
    try:
        return run_massive(ctx, opts, click.echo)
    finally:
        ctx.background.shutdown()
        ctx.runsdb.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--once", is_flag=True, help="Do one pass over the runs, then exit.")
@click.option("--config", "config_path", metavar="FILE", default=None,
              help="Configuration file, e.g. the original's cax_tsm_upload.json.")
@click.option("--host", metavar="SITE", help="Act as this site [default: short host name].")
@click.option("--run", "run_number", type=int, metavar="N", help="Only run N.")
@click.option("--name", metavar="NAME", help="Only the run(s) called NAME.")
@click.option("--from-run", "--from_run", "from_run", type=int, metavar="N",
              help="Only runs numbered N or more.")
@click.option("--to-run", "--to_run", "to_run", type=int, metavar="N",
              help="Only runs numbered N or less (-1: no limit).")
@click.option("--last-days", "--last_days", "last_days", type=float, metavar="D",
              help="Only runs started in the last D days.")
@click.option("--log", "log_level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--log-file", "--logfile", "log_file", metavar="FILE",
              help="Also write the summary log to FILE.")
@click.option("--log-dir", metavar="DIR", default=None,
              help="Where the per-dataset logs go [default: beside --log-file, else .].")
@click.option("--sleep", "sleep_s", type=float, default=60.0, show_default=True,
              help="Seconds between passes without --once.")
@click.option("--disable-database-update", "--disable_database_update", "no_db_update",
              is_flag=True, help="Do the work but write nothing to the runs DB.")
@guarded
def massive_tsm(once: bool, config_path: str | None, host: str | None, run_number: int | None,
                name: str | None, from_run: int | None, to_run: int | None,
                last_days: float | None, log_level: str, log_file: str | None,
                log_dir: str | None, sleep_s: float, no_db_update: bool) -> int:
    """Back runs up to tape (or restore them from it), one dataset at a time."""
    from cax.tape.massive import MassiveOptions, run_massive

    if run_number is not None and name is not None:
        raise ConfigError("give --run or --name, not both")
    if name is not None:
        safe_component(name)
    config = load_config(config_path or default_config_path(), host)
    setup_logging(log_level, log_file)
    where = Path(log_dir) if log_dir else (Path(log_file).parent if log_file else Path("."))
    opts = MassiveOptions(once, run_number, name, from_run, to_run, last_days, where, sleep_s)
    ctx = build_context(config, no_db_update=no_db_update, once=True)
    ctx.background.shutdown()
    ctx.background = None  # one dataset at a time, in this thread, with its own log file
    install_signal_handlers(ctx.stop)
    formatter = logging.Formatter(FILE_FORMAT, "%Y-%m-%d %H:%M:%S")
    formatter.converter = time.gmtime
    try:
        return run_massive(ctx, opts, formatter, click.echo)
    finally:
        ctx.runsdb.close()


# -- one-shot commands: cax-mv, cax-rm, cax-stray (their logic is in cax/oneshot.py) ----------

def _site_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options the one-shot commands share with the original's."""
    options = [
        click.option("--config", "config_path", metavar="FILE", default=None,
                     help="Configuration file [default: $CAX_CONFIG or ./cax.json]."),
        click.option("--host", metavar="SITE", help="Act as this site [default: short host name]."),
        click.option("--log", "log_level", default="info", show_default=True,
                     type=click.Choice(["debug", "info", "warning", "error"],
                                       case_sensitive=False)),
        click.option("--log-file", metavar="FILE", help="Also write the log to FILE."),
        click.option("--disable-database-update", "--disable_database_update", "no_db_update",
                     is_flag=True, help="Write nothing to the runs DB (cax-mv and cax-rm then "
                     "refuse to change data the runs DB describes)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _oneshot(body: Callable[..., int], config_path: str | None, host: str | None,
             log_level: str, log_file: str | None, no_db_update: bool) -> int:
    """Run ``body(ctx)`` for this site; a filesystem error means the operation failed (1)."""
    config = load_config(config_path or default_config_path(), host)
    setup_logging(log_level, log_file)
    ctx = build_context(config, no_db_update=no_db_update)
    try:
        return body(ctx)
    except OSError as exc:
        click.echo(f"cax: {exc}", err=True)
        return EXIT_FAILED
    finally:
        ctx.runsdb.close()
        ctx.background.shutdown()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--input", "source", required=True, metavar="PATH", help="The dataset to move.")
@click.option("--output", "target", required=True, metavar="PATH",
              help="Its new path, inside the same data directory.")
@_site_options
@guarded
def cax_mv(source: str, target: str, **site: Any) -> int:
    """Move a dataset of this site and record its new location in the runs DB."""
    from cax import oneshot

    def body(ctx: Context) -> int:
        result = oneshot.move_dataset(ctx, os.path.abspath(source), os.path.abspath(target))
        how = " (copied across filesystems, verified)" if result.copied else ""
        click.echo(f"moved {result.label}: {result.source} -> {result.target}{how}")
        if result.leftover:
            click.echo(f"cax: the old copy {result.leftover} could not be deleted; "
                       "remove it by hand", err=True)
            return EXIT_FAILED
        return 0

    return _oneshot(body, **site)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--location", required=True, metavar="PATH", help="The dataset to delete.")
@click.option("--run", "run_number", required=True, type=int, metavar="N",
              help="The run it belongs to.")
@click.option("--force", is_flag=True,
              help="Delete it even if no other site holds a verified copy (asks on a terminal).")
@_site_options
@guarded
def cax_rm(location: str, run_number: int, force: bool, **site: Any) -> int:
    """Delete a dataset of this site and remove its entry from the runs DB."""
    from cax import oneshot

    def ask(question: str) -> bool:
        try:
            return click.confirm(question)
        except click.Abort:
            return False

    def body(ctx: Context) -> int:
        result = oneshot.remove_dataset(ctx, os.path.abspath(location), run_number, force=force,
                                        confirm=ask if sys.stdin.isatty() else None)
        click.echo(f"removed {result.label}: {result.path}; verified copies at other sites: "
                   f"{result.other_copies}")
        return 0

    return _oneshot(body, **site)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--delete", is_flag=True, help="Delete the strays (after confirmation).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_site_options
@guarded
def cax_stray(delete: bool, yes: bool, **site: Any) -> int:
    """List (or delete) files in this site's data directories that no runs-DB entry uses."""
    from cax import oneshot

    def body(ctx: Context) -> int:
        strays = oneshot.find_strays(ctx)
        for path in strays:
            click.echo(path)
        if not delete or not strays:
            return 0
        try:
            if not yes and not click.confirm(f"Delete these {len(strays)} path(s)?"):
                raise click.Abort
        except click.Abort:
            click.echo("nothing deleted", err=True)
            return EXIT_FAILED
        result = oneshot.delete_strays(ctx, strays)
        for path in result.deleted:
            click.echo(f"deleted {path}")
        for path in result.kept:
            click.echo(f"kept {path}: in use since it was listed")
        for path, reason in result.failed:
            click.echo(f"cax: cannot delete {path}: {reason}", err=True)
        return EXIT_FAILED if result.failed else 0

    return _oneshot(body, **site)
