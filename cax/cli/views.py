"""``cax status`` and ``cax web``: what the daemons do and where every copy is.

``cax status`` reads the whole runs DB, so it needs no site of its own: without --host, and
when this machine names no site, its views are of every site.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from cax.cli.base import (
    EXIT_FAILED,
    RUN_NUMBER,
    Globals,
    echo_json,
    guarded,
    open_db,
    setup_logging,
)
from cax.cli.root import cli
from cax.config import guess_site, load_sites
from cax.errors import ConfigError
from cax.runsdb.stuck import StuckEntry


@cli.command()
@click.option("--run", "run_number", type=RUN_NUMBER, metavar="N", help="Every copy of run N.")
@click.option("--name", metavar="NAME", help="Every copy of the run called NAME.")
@click.option("--stuck", is_flag=True, help="What waits for a person, with the retry command.")
@click.option("--summary", is_flag=True, help="Newest runs x sites matrix.")
@click.option("--tape", is_flag=True, help="Tape: volume per month, pending and failed datasets.")
@click.option("--newest", type=click.IntRange(1), default=20, show_default=True, metavar="N",
              help="Runs shown by --summary.")
@click.option("--all-sites", is_flag=True, help="--stuck: of every site, not only this one's "
              "[default without a site of this machine].")
@click.option("--json", "as_json", is_flag=True, help="Print the view as JSON.")
@click.option("--color/--no-color", default=None, help="Colour --summary [default: on a "
              "terminal].")
@click.pass_obj
@guarded
def status(obj: Globals, run_number: int | None, name: str | None, stuck: bool,
           summary: bool, tape: bool, newest: int, all_sites: bool, as_json: bool,
           color: bool | None) -> int:
    """Show the daemons, the copies and what is stuck.

    Exits 1 with --stuck when anything is stuck (for cron and monitoring), 2 for an unknown
    --run or --name.
    """
    from cax.admin import status as st

    if sum(bool(x) for x in (run_number is not None, name, stuck, summary, tape)) > 1:
        raise click.UsageError("give one of --run, --name, --stuck, --summary, --tape")
    config = load_sites(obj.config_path, obj.runs_db)
    here = guess_site(config, obj.host)
    setup_logging(obj.log_level, obj.log_file)

    def prefix(entry: StuckEntry | None = None) -> str:
        """How a printed command calls cax: as this site, else as the entry's."""
        return obj.command(config, here.name if here else (entry.key.host if entry else None))

    db = open_db(config, read_only=True)
    paint = False
    code = 0
    try:
        site = None if all_sites or here is None else here.name
        if run_number is not None or name:
            runs = st.run_view(db, run_number, name)
            if not runs:
                raise ConfigError(f"no run {run_number if name is None else repr(name)} in "
                                  "the runs DB")
            lines = [] if as_json else list(st.render_runs(runs))
            value: Any = runs
        elif stuck:
            entries = st.stuck(db, config, st.now_of(db), site)
            value = [e.as_dict(prefix(e)) for e in entries]
            lines = list(st.render_stuck(entries, site, prefix))
            code = EXIT_FAILED if entries else 0
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
            lines = list(st.render_overview(value, f"{prefix()} status --stuck"))
    finally:
        db.close()
    if as_json:
        echo_json(value)
    else:
        for line in lines:
            click.echo(line, color=paint)  # click strips colours when not asked to keep them
    return code



@cli.command()
@click.option("--bind", default="127.0.0.1", show_default=True, metavar="ADDRESS",
              help="Listen on ADDRESS; any but loopback needs $CAX_WEB_TOKEN, or "
              "$CAX_WEB_USER and $CAX_WEB_PASSWORD.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Listen on PORT (0: any free port, printed at start).")
@click.pass_obj
@guarded
def web(obj: Globals, bind: str, port: int) -> int:
    """Serve a read-only website over the runs DB: runs, daemons, stuck, tape, throughput."""
    from cax.web.server import serve

    return serve(obj.config(), bind=bind, port=port, announce=click.echo)
