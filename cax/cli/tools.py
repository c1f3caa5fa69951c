"""The original's one-shot tools: cax-mv, cax-rm, cax-stray and cax-status.

Their logic is in ``cax.oneshot`` and ``cax.admin.status``; here are their command lines.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from cax.cli.base import (
    EXIT_FAILED,
    RUN_NUMBER,
    build_context,
    default_config_path,
    guarded,
    host_option,
    log_level_option,
    open_db,
    setup_logging,
)
from cax.config import load_config
from cax.tasks import Context


def _site_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options the one-shot commands share with the original's."""
    options = [
        click.option("--config", "config_path", metavar="FILE", default=None,
                     help="Configuration file [default: $CAX_CONFIG or ./cax.json]."),
        host_option,
        log_level_option,
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
@click.option("--run", "run_number", required=True, type=RUN_NUMBER, metavar="N",
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
              help="Configuration file [default: $CAX_CONFIG or ./cax.json].")
@click.option("--disable_database_update", is_flag=True, hidden=True,
              help="Accepted for the original's command lines; this command writes nothing.")
@guarded
def cax_status(host: str, wanted: str, config_path: str | None,
               disable_database_update: bool) -> int:
    """The original's cax-status: list every entry at SITE with STATUS (see `cax status`)."""
    from cax.admin.status import entries_with_status

    config = load_config(config_path or default_config_path(), host)
    setup_logging("info", None)
    db = open_db(config, read_only=True)
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
