"""The ``cax`` command: the daemon (no subcommand), and the group the subcommands join."""

from __future__ import annotations

import threading
from pathlib import Path

import click

import cax
from cax.cli.base import (
    build_context,
    default_config_path,
    guarded,
    log,
    setup_logging,
    tasks_of,
)
from cax.config import load_config
from cax.daemon import Daemon, install_signal_handlers
from cax.runsdb import safe_component


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
