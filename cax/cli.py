"""Command-line entry points.  The only module that sets up logging, prints and exits.

Exit codes: 0 success (also after a warm stop); 1 a task or item failed (``--once``); 2 usage
or configuration invalid; 3 runs DB unreachable at start; 4 internal error; 5 another daemon of
the same site runs on this machine; 128+N killed by a second signal N.
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
    AlreadyRunningError,
    CaxError,
    ConfigError,
    RunsDBError,
    UnsafeNameError,
)
from cax.logcontext import ContextFilter
from cax.runsdb import open_runsdb, safe_component
from cax.tasks import Context, select_tasks
from cax.workers import Background

log = logging.getLogger("cax")

EXIT_FAILED, EXIT_USAGE, EXIT_DB, EXIT_INTERNAL, EXIT_RUNNING = 1, 2, 3, 4, 5
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
        except UnsafeNameError as exc:
            click.echo(f"cax: {exc}", err=True)
            code = EXIT_USAGE
        except RunsDBError as exc:
            click.echo(f"cax: {exc}", err=True)
            code = EXIT_DB
        except AlreadyRunningError as exc:
            click.echo(f"cax: {exc}", err=True)
            code = EXIT_RUNNING
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


def tasks_of(config: Config) -> list:
    """The tasks of this site; an unknown name is reported with the file and the section."""
    try:
        return select_tasks(config.tasks_wanted)
    except ConfigError as exc:
        where = f"site {config.site.name!r} key" if config.site.task_list is not None else "key"
        raise ConfigError([f"{config.path.name}: {where} 'task_list': "
                           f"{p.removeprefix('task_list: ')}" for p in exc.problems]) from None


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
@click.option("--host", metavar="SITE", help="Act as this site [default: $CAX_HOST, $HOSTNAME "
              "if it names a site, else the short host name].")
@click.option("--runs-db", metavar="URI", help="The runs DB: mongodb://..., embedded:PATH "
              "[default: $CAX_RUNS_DB, else the config's runs_db].")
@click.option("--log", "log_level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--log-file", metavar="FILE", help="Also write the log to FILE.")
@click.option("--dry-run", is_flag=True, help="Log what a pass would do; change nothing.")
@click.option("--disable-database-update", "--disable_database_update", "no_db_update",
              is_flag=True, help="Do the work but write nothing to the runs DB.")
@click.option("--metrics-file", metavar="FILE", help="After each pass, write Prometheus "
              "metrics to FILE (for node_exporter's textfile collector).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), metavar="PORT",
              help="Serve Prometheus metrics on 127.0.0.1:PORT.")
@click.option("--ncpu", type=click.IntRange(1), metavar="N",
              help="Process here with N CPUs (the job command line of massive-cax and of the "
              "original's batch scripts).")
@click.version_option(cax.__version__, prog_name="cax")
@click.pass_context
def cli(click_ctx: click.Context, once: bool, config_path: str | None, run_number: int | None,
        name: str | None, host: str | None, runs_db: str | None, log_level: str,
        log_file: str | None, dry_run: bool, no_db_update: bool, metrics_file: str | None,
        metrics_port: int | None, ncpu: int | None) -> None:
    """Keep this site's data where it must be, and tell the runs DB the truth about it."""
    if click_ctx.invoked_subcommand:
        click_ctx.obj = {"config_path": config_path or default_config_path(), "host": host,
                         "log_level": log_level, "log_file": log_file, "runs_db": runs_db}
        return
    if run_number is not None and name is not None:
        raise click.UsageError("give --run or --name, not both")
    guarded(_daemon)(once, config_path or default_config_path(), run_number, name, host,
                     log_level, log_file, dry_run, no_db_update, metrics_file, metrics_port,
                     runs_db, ncpu)


def _daemon(once: bool, config_path: str, run: int | None, name: str | None, host: str | None,
            log_level: str, log_file: str | None, dry_run: bool, no_db_update: bool,
            metrics_file: str | None = None, metrics_port: int | None = None,
            runs_db: str | None = None, ncpu: int | None = None) -> int:
    from cax.service import InstanceLock, Notifier

    if name is not None:
        safe_component(name)
    config = load_config(config_path, host, runs_db)
    tasks = tasks_of(config)
    # The looping daemon is the one per site and machine; --once and --dry-run runs are not.
    lock = None if once or dry_run else InstanceLock(config.site.name).acquire()
    setup_logging(log_level, log_file)
    for note in config.notes:
        log.info("%s", note)
    ctx = build_context(config, dry_run=dry_run, no_db_update=no_db_update, run=run, name=name,
                        once=once)
    ctx.ncpu = ncpu
    log.info("cax %s for site %s (%s), config %s%s", cax.__version__, config.site.name,
             ctx.owner, config.path, ", dry run" if dry_run else "")
    install_signal_handlers(ctx.stop)
    metrics = None
    if metrics_file or metrics_port is not None:
        from cax.metrics import DaemonMetrics

        metrics = DaemonMetrics(config.site.name, ctx.now())
        if metrics_port is not None:
            port = metrics.serve(metrics_port)
            log.info("metrics served on http://127.0.0.1:%d/metrics", port)
    try:
        return Daemon(ctx, tasks, metrics=metrics, metrics_file=metrics_file,
                      notifier=Notifier()).run(once=once)
    finally:
        ctx.runsdb.close()
        if metrics is not None:
            metrics.close()
        if lock is not None:
            lock.release()


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
    from cax.tape.massive import MassiveOptions, check_options, run_massive

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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", required=True, metavar="SITE", help="The site whose entries to list.")
@click.option("--status", "wanted", required=True, metavar="STATUS",
              help="The entry status to list (e.g. error, transferring).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="cax.json [default: ./cax.json, then the packaged one].")
@click.option("--disable_database_update", is_flag=True, hidden=True,
              help="Accepted for the original's command lines; this command writes nothing.")
@guarded
def cax_status(host: str, wanted: str, config_path: str | None,
               disable_database_update: bool) -> int:
    """The original's cax-status: list every entry at SITE with STATUS (see `cax status`)."""
    from cax.admin.status import entries_with_status

    config = load_config(config_path or default_config_path(), host)
    setup_logging("info", None)
    db = _open_db(config, read_only=True)
    try:
        rows = entries_with_status(db, host, wanted)
    finally:
        db.close()
    for r in rows:
        version = f"@{r['version']}" if r["version"] else ""
        click.echo(f"run {r['number']} ({r['name']}) {r['type']}{version} at {host}: {wanted}, "
                   f"{r['location']}")
    click.echo(f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'} at {host} with status "
               f"{wanted}; `cax status` shows more", err=True)
    return 0


# -- the operator's commands: run add, status, retry, config check (logic in cax/admin/) ------


def _admin_config(obj: dict[str, Any]) -> Config:
    config = load_config(obj["config_path"], obj["host"])
    setup_logging(obj["log_level"], obj["log_file"])
    return config


def _open_db(config: Config, read_only: bool = False, create: bool = False) -> Any:
    return open_runsdb(config.runs_db, config.runs_db_name, config.runs_collection,
                       read_only=read_only, create=create)


def _echo_json(value: Any) -> None:
    import json

    def plain(item: Any) -> Any:
        return item.isoformat() if hasattr(item, "isoformat") else str(item)

    click.echo(json.dumps(value, indent=1, default=plain))


def retry_prefix(config: Config) -> str:
    """How the printed commands call cax: the name on PATH, else its full path, and the config."""
    from cax.admin import cax_command

    return f"{cax_command()} --config {config.path}"


@cli.group("run")
def run_group() -> None:
    """Register runs in the runs DB, as the DAQ does."""


@run_group.command("add")
@click.option("--number", type=int, metavar="N", help="Run number (with --from-dir: the first).")
@click.option("--name", metavar="NAME", help="Run name, e.g. 170131_1200 (default: the "
              "location's last component).")
@click.option("--detector", default="tpc", show_default=True, metavar="NAME")
@click.option("--start", metavar="TIME", help="Start time, ISO 8601 UTC [default: from a "
              "YYMMDD_HHMM name, else now].")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="A tag (repeatable).")
@click.option("--site", metavar="SITE", help="Site holding the raw data [default: this site].")
@click.option("--location", metavar="PATH", help="The raw dataset's directory at that site.")
@click.option("--checksum", metavar="SUM", help="The checksum the DAQ recorded; the data are "
              "verified against it before they count (default: their first read).")
@click.option("--from-dir", "from_dir", metavar="DIR", help="Register every run directory "
              "under DIR (inside the site's dir_raw) not registered yet.")
@click.option("--match", metavar="PATTERN", help="With --from-dir: only directories whose name "
              "matches this shell pattern (e.g. '17*_*').")
@click.option("--json", "json_file", metavar="FILE", help="Register the run documents in FILE "
              "(as the DAQ writes them).")
@click.option("--dry-run", is_flag=True, help="Say what would be registered; write nothing.")
@click.option("--create-runs-db", is_flag=True, help="Create the embedded runs DB if it does "
              "not exist yet (otherwise a missing one is an outage: exit 3).")
@click.pass_obj
@guarded
def run_add(obj: dict[str, Any], number: int | None, name: str | None, detector: str,
            start: str | None, tags: tuple[str, ...], site: str | None, location: str | None,
            checksum: str | None, from_dir: str | None, match: str | None,
            json_file: str | None, dry_run: bool, create_runs_db: bool) -> int:
    """Register a run (or every run under a folder, or run documents from a JSON file)."""
    from cax.admin import register as reg

    if sum(x is not None for x in (location, from_dir, json_file)) != 1:
        raise click.UsageError("give one of --location, --from-dir, --json")
    if location is not None and number is None:
        raise click.UsageError("--number is required with --location")
    if match is not None and from_dir is None:
        raise click.UsageError("--match goes with --from-dir")
    config = _admin_config(obj)
    where = config.get_site(site) if site else config.site
    local = where is config.site or where.method == "local"
    db = _open_db(config, read_only=dry_run, create=create_runs_db and not dry_run)
    try:
        if from_dir:
            result = reg.from_dir(db, where, from_dir, detector=detector, first_number=number,
                                  tags=tags, match=match, dry_run=dry_run)
        elif json_file:
            result = reg.register(db, reg.load_json(json_file, config), dry_run=dry_run)
        else:
            assert location is not None and number is not None
            path = os.path.abspath(location) if local else location
            when = reg.parse_start(start, "--start") if start else None
            doc_name = name or Path(path.rstrip("/")).name
            if when is None:
                when = reg.start_from_name(doc_name)
            doc = reg.run_document(number, doc_name, detector, when, tags,
                                   reg.raw_entry(where, path, checksum))
            reg.check_new_run(db, where, doc, local)
            result = reg.register(db, [doc], dry_run=dry_run)
    finally:
        db.close()
    verb = "would register" if dry_run else "registered"
    for doc in result.added:
        entry = doc["data"][0] if doc.get("data") else {}
        click.echo(f"{verb} {reg.describe(doc)}"
                   + (f": {entry.get('type')} at {entry.get('host')} {entry.get('status')}, "
                      f"{entry.get('location')}" if entry else ""))
    for line in result.skipped:
        click.echo(f"skipped {line}")
    for line in result.refused:
        click.echo(f"cax: {line}", err=True)
    if not result.added and not result.skipped and not result.refused:
        click.echo("nothing to register")
    return EXIT_FAILED if result.refused else 0


@run_group.command("remove")
@click.option("--run", "run_number", type=int, metavar="N", help="The run numbered N.")
@click.option("--name", metavar="NAME", help="The run called NAME.")
@click.option("--site", metavar="SITE", help="The site of the entry [default: this site].")
@click.option("--type", "data_type", type=click.Choice(["raw", "processed"]), default="raw",
              show_default=True, help="The entry's data type.")
@click.option("--version", metavar="V", help="The processed entry's version.")
@click.option("--dry-run", is_flag=True, help="Say what would be unregistered; change nothing.")
@click.pass_obj
@guarded
def run_remove(obj: dict[str, Any], run_number: int | None, name: str | None, site: str | None,
               data_type: str, version: str | None, dry_run: bool) -> int:
    """Unregister one entry of a run, leaving its data where they are (refused while leased)."""
    import getpass

    from cax.admin.retry import targets_of_runs

    if (run_number is None) == (name is None):
        raise click.UsageError("give --run or --name")
    if data_type == "processed" and not version:
        raise click.UsageError("--version is required with --type processed")
    config = _admin_config(obj)
    host = config.get_site(site).name if site else config.site.name
    db = _open_db(config, read_only=dry_run)
    try:
        targets = targets_of_runs(db, number=run_number, name=name, site=host,
                                  data_type=data_type, version=version)
        if not targets:
            raise ConfigError(f"run {run_number if name is None else name}: no {data_type} "
                              f"entry at {host}")
        by = f"{getpass.getuser()}@{socket.gethostname()} (cax run remove)"
        for target in targets:
            if dry_run:
                click.echo(f"would unregister {target.label()} ({target.status}); data kept")
            elif db.remove_entry(target.run_id, target.key, by=by) is not None:
                click.echo(f"unregistered {target.label()}; its data were left in place")
            else:
                raise CaxError(f"{target.label()} is in use under a live lease (or changed "
                               "meanwhile); not unregistered")
    finally:
        db.close()
    return 0


@cli.command()
@click.option("--run", "run_number", type=int, metavar="N", help="Every copy of run N.")
@click.option("--name", metavar="NAME", help="Every copy of the run called NAME.")
@click.option("--stuck", is_flag=True, help="What waits for a person, with the retry command.")
@click.option("--summary", is_flag=True, help="Newest runs x sites matrix.")
@click.option("--tape", is_flag=True, help="Tape: volume per month, pending and failed datasets.")
@click.option("--newest", default=20, show_default=True, metavar="N",
              help="Runs shown by --summary.")
@click.option("--all-sites", is_flag=True, help="--stuck: of every site, not only this one's.")
@click.option("--json", "as_json", is_flag=True, help="Print the view as JSON.")
@click.option("--color/--no-color", default=None, help="Colour --summary [default: on a "
              "terminal].")
@click.pass_obj
@guarded
def status(obj: dict[str, Any], run_number: int | None, name: str | None, stuck: bool,
           summary: bool, tape: bool, newest: int, all_sites: bool, as_json: bool,
           color: bool | None) -> int:
    """Show the daemons, the copies and what is stuck."""
    from cax.admin import status as st

    if sum(bool(x) for x in (run_number is not None, name, stuck, summary, tape)) > 1:
        raise click.UsageError("give one of --run, --name, --stuck, --summary, --tape")
    config = _admin_config(obj)
    db = _open_db(config, read_only=True)
    paint = False
    try:
        site = None if all_sites else config.site.name
        if run_number is not None or name:
            runs = st.run_view(db, run_number, name)
            if not runs:
                raise ConfigError(f"no run {run_number if name is None else repr(name)} in "
                                  "the runs DB")
            lines = [] if as_json else list(st.render_runs(runs))
            value: Any = runs
        elif stuck:
            entries = st.stuck(db, config, st.now_of(db), site)
            prefix = retry_prefix(config)
            value = [e.as_dict(prefix) for e in entries]
            lines = list(st.render_stuck(entries, site, prefix))
        elif tape:
            from dataclasses import asdict

            from cax.tape.report import tape_report

            report = tape_report(db, config)
            value, lines = asdict(report), report.lines()
        elif summary:
            table = st.summary(db, config, newest)
            value = table.as_dict()
            paint = sys.stdout.isatty() if color is None else color
            lines = list(st.render_summary(table, colour=paint))
        else:
            value = st.overview(db, config, site)
            lines = list(st.render_overview(value, f"{retry_prefix(config)} status --stuck"))
    finally:
        db.close()
    if as_json:
        _echo_json(value)
    else:
        for line in lines:
            click.echo(line, color=paint)  # click strips colours when not asked to keep them
    return 0


@cli.command()
@click.option("--run", "run_number", type=int, metavar="N", help="Entries of run N.")
@click.option("--name", metavar="NAME", help="Entries of the run called NAME.")
@click.option("--site", metavar="SITE", help="Only entries at SITE.")
@click.option("--type", "data_type", type=click.Choice(["raw", "processed"]),
              help="Only entries of this data type.")
@click.option("--version", metavar="V", help="Only processed entries of this version.")
@click.option("--all-stuck", is_flag=True, help="Every stuck entry concerning this site (with "
              "--site: at that site).")
@click.option("--dry-run", is_flag=True, help="Say what would be retried; change nothing.")
@click.pass_obj
@guarded
def retry(obj: dict[str, Any], run_number: int | None, name: str | None, site: str | None,
          data_type: str | None, version: str | None, all_stuck: bool, dry_run: bool) -> int:
    """Make stuck entries retryable at the next pass (deletes nothing)."""
    import getpass

    from cax.admin import retry as rt
    from cax.admin import status as st

    if all_stuck == (run_number is not None or name is not None):
        raise click.UsageError("give --run, --name or --all-stuck")
    if run_number is not None and name is not None:
        raise click.UsageError("give --run or --name, not both")
    config = _admin_config(obj)
    if site:
        config.get_site(site)
    db = _open_db(config, read_only=dry_run)
    try:
        now = st.now_of(db)
        stuck = st.stuck(db, config, now, None if site else config.site.name)
        if all_stuck:
            targets = rt.targets_of_stuck(stuck, site=site, data_type=data_type,
                                          version=version)
        else:
            targets = rt.targets_of_runs(db, number=run_number, name=name, site=site,
                                         data_type=data_type, version=version)
        by = f"{getpass.getuser()}@{socket.gethostname()} (cax retry)"
        result = rt.retry(db, targets, by=by, now=now,
                          stuck_keys={(e.run_id, e.key) for e in stuck}, dry_run=dry_run)
    finally:
        db.close()
    verb = "would retry" if dry_run else "retryable at the next pass:"
    for target in result.reset:
        click.echo(f"{verb} {target.label()}")
    for target, why in result.left:
        click.echo(f"left {target.label()}: {why}")
    if not targets:
        click.echo("nothing to retry")
    return 0


@cli.command()
@click.option("--bind", default="127.0.0.1", show_default=True, metavar="ADDRESS",
              help="Listen on ADDRESS; any but loopback needs $CAX_WEB_TOKEN, or "
              "$CAX_WEB_USER and $CAX_WEB_PASSWORD.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Listen on PORT (0: any free port, printed at start).")
@click.pass_obj
@guarded
def web(obj: dict[str, Any], bind: str, port: int) -> int:
    """Serve a read-only website over the runs DB: runs, daemons, stuck, tape, throughput."""
    from cax.web.server import serve

    config = load_config(obj["config_path"], obj["host"], obj["runs_db"])
    setup_logging(obj["log_level"], obj["log_file"])
    return serve(config, bind=bind, port=port, announce=click.echo)


@cli.group("config")
def config_group() -> None:
    """Check the configuration."""


@config_group.command("check")
@click.option("--network", is_flag=True, help="Also reach every SSH site and run "
              "remote_python there.")
@click.pass_obj
@guarded
def config_check(obj: dict[str, Any], network: bool) -> int:
    """Validate the configuration and what the machine must provide for it."""
    from cax.admin.configcheck import check

    config = _admin_config(obj)
    problems = check(config, network=network)
    for problem in problems:
        click.echo(f"cax: {config.path.name}: {problem}", err=True)
    if problems:
        return EXIT_USAGE
    click.echo(f"{config.path}: site {config.site.name}: no problems found"
               + ("" if network else " (add --network to reach the SSH sites)"))
    return 0
