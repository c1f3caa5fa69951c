"""``cax status`` and ``cax web``: what the daemons do and where every copy is."""

from __future__ import annotations

import sys
from typing import Any

import click

from cax.cli.base import admin_config, echo_json, guarded, open_db, retry_prefix, setup_logging
from cax.cli.root import cli
from cax.config import load_config
from cax.errors import ConfigError


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
    config = admin_config(obj)
    db = open_db(config, read_only=True)
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
        echo_json(value)
    else:
        for line in lines:
            click.echo(line, color=paint)  # click strips colours when not asked to keep them
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
