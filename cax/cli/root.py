"""The ``cax`` command: the daemon (no subcommand), and the group the subcommands join.

Options given before a subcommand either act on it or are refused (exit 2, one line), never
ignored: ``GLOBAL_USE`` says which subcommand acts on which.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

import cax
from cax.admin.configcheck import StartOptions, select_site_tasks, startup_findings
from cax.cli.base import (
    EXIT_USAGE,
    RUN_NUMBER,
    Globals,
    build_context,
    default_config_path,
    guarded,
    log,
    log_level_option,
    run_selector,
    setup_logging,
)
from cax.config import Config, load_config
from cax.daemon import Daemon, Reloaded, install_signal_handlers
from cax.errors import ConfigError, RunsDBError
from cax.runsdb import safe_component

if TYPE_CHECKING:  # prometheus_client is imported only when metrics are asked for
    from cax.metrics import DaemonMetrics
    from cax.tasks import Context

#: Runs a demo makes at most (3 MB each).
MAX_DEMO_RUNS = 100
#: A looping daemon whose runs DB does not answer at start tries again after this many
#: seconds, doubling up to the second figure.
START_RETRY_S = (5.0, 300.0)
#: The options every subcommand acts on: which configuration, site, runs DB, and the log.
COMMON = ("config_path", "host", "runs_db", "log_level", "log_file")
#: What each subcommand acts on, of the options given before it (the rest are refused).
GLOBAL_USE: dict[str, tuple[str, ...]] = {
    "run": (*COMMON, "dry_run"),
    "retry": (*COMMON, "dry_run"),
    "status": COMMON,
    "web": COMMON,
    # config check checks what the daemon would be given: its metrics file and port
    "config": (*COMMON, "metrics_file", "metrics_port", "metrics_bind"),
    "demo": ("log_level", "log_file"),
}
#: How each option is spelt, for the message refusing it.
SPELLING = {"once": "--once", "config_path": "--config", "run_number": "--run", "name": "--name",
            "host": "--host", "runs_db": "--runs-db", "log_level": "--log",
            "log_file": "--log-file", "dry_run": "--dry-run",
            "no_db_update": "--disable-database-update", "metrics_file": "--metrics-file",
            "metrics_port": "--metrics-port", "metrics_bind": "--metrics-bind", "ncpu": "--ncpu"}


@dataclass(frozen=True)
class DaemonOptions:
    """The daemon's command line."""

    config_path: str
    once: bool = False
    run: int | None = None
    name: str | None = None
    host: str | None = None
    runs_db: str | None = None
    log_level: str = "info"
    log_file: str | None = None
    dry_run: bool = False
    no_db_update: bool = False
    metrics_file: str | None = None
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    ncpu: int | None = None

    @property
    def start(self) -> StartOptions:
        return StartOptions(self.metrics_file, self.metrics_port, self.metrics_bind, self.ncpu)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--once", is_flag=True, help="Do one pass, then exit (1 if anything failed).")
@click.option("--config", "config_path", metavar="FILE", default=None,
              help="Configuration file [default: $CAX_CONFIG or ./cax.json].")
@click.option("--run", "run_number", type=RUN_NUMBER, metavar="N",
              help="Only the run(s) numbered N.")
@click.option("--name", metavar="NAME", help="Only the run(s) called NAME.")
@click.option("--host", metavar="SITE", help="Act as this site [default: $CAX_HOST, $HOSTNAME "
              "if it names a site, else the short host name].")
@click.option("--runs-db", metavar="URI", help="The runs DB: mongodb://..., embedded:PATH "
              "[default: $CAX_RUNS_DB, else the config's runs_db].")
@log_level_option
@click.option("--log-file", metavar="FILE", help="Also write the log to FILE.")
@click.option("--dry-run", is_flag=True, help="Log what a pass would do; change nothing.")
@click.option("--disable-database-update", "--disable_database_update", "no_db_update",
              is_flag=True, help="Do the work but write nothing to the runs DB.")
@click.option("--metrics-file", metavar="FILE", help="After each pass, write Prometheus "
              "metrics to FILE (for node_exporter's textfile collector).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), metavar="PORT",
              help="Serve Prometheus metrics on PORT (of --metrics-bind).")
@click.option("--metrics-bind", default="127.0.0.1", show_default=True, metavar="ADDRESS",
              help="The address --metrics-port listens on.")
@click.option("--ncpu", type=click.IntRange(1), metavar="N",
              help="Process here with N CPUs (the job command line of massive-cax and of the "
              "original's batch scripts).")
@click.version_option(cax.__version__, prog_name="cax")
@click.pass_context
def cli(click_ctx: click.Context, once: bool, config_path: str | None, run_number: int | None,
        name: str | None, host: str | None, runs_db: str | None, log_level: str,
        log_file: str | None, dry_run: bool, no_db_update: bool, metrics_file: str | None,
        metrics_port: int | None, metrics_bind: str, ncpu: int | None) -> None:
    """Keep this site's data where it must be, and tell the runs DB the truth about it.

    Without a command, run the daemon for this site.  Options before a command act on it
    (--config, --host, --runs-db, --log, --log-file; --dry-run on run and retry) or are
    refused.
    """
    path = config_path or default_config_path()
    if click_ctx.invoked_subcommand:
        refused = unused_options(click_ctx, click_ctx.invoked_subcommand)
        if refused:
            click.echo(f"cax: {refused}", err=True)
            click_ctx.exit(EXIT_USAGE)
        click_ctx.obj = Globals(path, host, runs_db, log_level, log_file, dry_run,
                                metrics_file, metrics_port, metrics_bind)
        return
    if run_number is not None and name is not None:
        raise click.UsageError("give --run or --name, not both")
    guarded(_daemon)(DaemonOptions(path, once, run_number, name, host, runs_db, log_level,
                                   log_file, dry_run, no_db_update, metrics_file, metrics_port,
                                   metrics_bind, ncpu))


def unused_options(click_ctx: click.Context, command: str) -> str | None:
    """Say which options given before ``command`` it does not act on (None: it acts on all)."""
    used = GLOBAL_USE.get(command, ())
    given = [name for name in SPELLING if click_ctx.get_parameter_source(name)
             not in (click.core.ParameterSource.DEFAULT, None)]
    refused = [name for name in given if name not in used]
    if not refused:
        return None
    words = ", ".join(SPELLING[name] for name in refused)
    hint = " (give it after the command)" if command in ("status", "retry") and \
        {"run_number", "name"} & set(refused) else ""
    return f"{words} does not apply to `cax {command}`{hint}; nothing done"


def daemon_config(opts: DaemonOptions) -> Reloaded:
    """Load the configuration and run the start-up checks ``cax config check`` runs too.

    Raises ConfigError with every problem that keeps the daemon from starting; the others
    come back as warnings to log.
    """
    config = load_config(opts.config_path, opts.host, opts.runs_db)
    findings = startup_findings(config, opts.start)
    label = config.path.name
    blocking = [f"{label}: {p}" for f in findings if f.blocks_start for p in f.problems]
    if blocking:
        raise ConfigError(blocking)
    warnings = [f"{label}: {p}" for f in findings if not f.blocks_start for p in f.problems]
    return Reloaded(config, select_site_tasks(config),
                    run_selector(opts.run, opts.name, config.datasets_wanted), warnings)


def _daemon(opts: DaemonOptions) -> int:
    from cax.service import InstanceLock, Notifier

    if opts.name is not None:
        safe_component(opts.name)
    started = daemon_config(opts)
    config = started.config
    # The looping daemon is the one per site and machine; --once and --dry-run runs are not.
    lock = None if opts.once or opts.dry_run else InstanceLock(config.site.name).acquire()
    try:
        setup_logging(opts.log_level, opts.log_file)
        metrics = _metrics(opts, config)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    for note in config.notes:
        log.info("%s", note)
    for line in started.warnings:
        log.warning("%s", line)
    try:
        stop, reload_requested = threading.Event(), threading.Event()
        install_signal_handlers(stop, reload_requested)
        ctx = _connect(opts, config, stop)
        if ctx is None:
            return 0
        ctx.ncpu = opts.ncpu
        log.info("cax %s for site %s (%s), config %s%s", cax.__version__, config.site.name,
                 ctx.owner, config.path, ", dry run" if opts.dry_run else "")
        if metrics is not None:
            metrics.since = ctx.now()
        try:
            return Daemon(ctx, started.tasks, metrics=metrics, metrics_file=opts.metrics_file,
                          notifier=Notifier(), reload=lambda: daemon_config(opts),
                          reload_requested=reload_requested).run(once=opts.once)
        finally:
            ctx.runsdb.close()
    finally:
        if metrics is not None:
            metrics.close()
        if lock is not None:
            lock.release()


def _connect(opts: DaemonOptions, config: Config, stop: threading.Event) -> Context | None:
    """The daemon's context, once its runs DB answers.

    A looping daemon started while the runs DB is away (a server down, the embedded store's
    files unmounted or unwritable) waits for it, saying so, with a back-off, as it would
    in the middle of its work: a daemon that exits at start is one nobody restarts.  ``--once``
    and ``--dry-run`` are a person at a shell, who is told at once (exit 3).  None: stopped
    while waiting.
    """
    delay = START_RETRY_S[0]
    while True:
        try:
            ctx = build_context(config, dry_run=opts.dry_run, no_db_update=opts.no_db_update,
                                run=opts.run, name=opts.name, once=opts.once)
        except RunsDBError as exc:
            if opts.once or opts.dry_run:
                raise
            log.warning("%s; trying again in %.0f s", exc, delay)
            if stop.wait(delay):
                log.info("stopped before the runs DB answered")
                return None
            delay = min(delay * 2, START_RETRY_S[1])
            continue
        ctx.stop = stop
        return ctx


def _metrics(opts: DaemonOptions, config: Config) -> DaemonMetrics | None:
    """The daemon's metrics, served on --metrics-bind:--metrics-port when asked to."""
    if not opts.metrics_file and opts.metrics_port is None:
        return None
    from cax.clock import utcnow
    from cax.metrics import DaemonMetrics

    metrics = DaemonMetrics(config.site.name, utcnow())
    if opts.metrics_port is not None:
        try:
            port = metrics.serve(opts.metrics_port, opts.metrics_bind)
        except (OSError, UnicodeError) as exc:
            raise ConfigError(f"--metrics-port: cannot listen on {opts.metrics_bind}:"
                              f"{opts.metrics_port}: {getattr(exc, 'strerror', None) or exc}"
                              ) from None
        log.info("metrics served on http://%s:%d/metrics", opts.metrics_bind, port)
    return metrics


@cli.command()
@click.option("--dir", "directory", default="cax-demo", show_default=True,
              help="Where to create the demo (runs DB, data of two sites, cax.json).")
@click.option("--runs", type=click.IntRange(1, MAX_DEMO_RUNS), default=4, show_default=True,
              help="How many runs to create (3 MB each).")
@click.pass_obj
@guarded
def demo(obj: Globals, directory: str, runs: int) -> int:
    """Create a self-contained example with two local sites and run cax on it."""
    from cax.demo import run_demo

    setup_logging(obj.log_level, obj.log_file)
    for line in run_demo(Path(directory), runs):
        click.echo(line)
    return 0


def main() -> None:
    """Entry point of ``cax``."""
    threading.current_thread().name = "cax"
    cli(prog_name="cax")
