"""``cax run add`` and ``cax run remove``: register runs as the DAQ does, unregister entries."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import click

from cax.cli.base import EXIT_FAILED, RUN_NUMBER, Globals, guarded, open_db
from cax.cli.root import cli
from cax.errors import CaxError, ConfigError


@cli.group("run")
def run_group() -> None:
    """Register runs in the runs DB, as the DAQ does."""


@run_group.command("add")
@click.option("--number", type=RUN_NUMBER, metavar="N",
              help="Run number (with --from-dir: the first).")
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
def run_add(obj: Globals, number: int | None, name: str | None, detector: str,
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
    dry_run = dry_run or obj.dry_run
    config = obj.config()
    where = config.get_site(site) if site else config.site
    local = where is config.site or where.method == "local"
    db = open_db(config, read_only=dry_run, create=create_runs_db and not dry_run)
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
@click.option("--run", "run_number", type=RUN_NUMBER, metavar="N", help="The run numbered N.")
@click.option("--name", metavar="NAME", help="The run called NAME.")
@click.option("--site", metavar="SITE", help="The site of the entry [default: this site].")
@click.option("--type", "data_type", type=click.Choice(["raw", "processed"]), default="raw",
              show_default=True, help="The entry's data type.")
@click.option("--version", metavar="V", help="The processed entry's version.")
@click.option("--dry-run", is_flag=True, help="Say what would be unregistered; change nothing.")
@click.pass_obj
@guarded
def run_remove(obj: Globals, run_number: int | None, name: str | None, site: str | None,
               data_type: str, version: str | None, dry_run: bool) -> int:
    """Unregister one entry of a run, leaving its data where they are (refused while leased)."""
    import getpass

    from cax.admin.retry import targets_of_runs

    if (run_number is None) == (name is None):
        raise click.UsageError("give --run or --name")
    if data_type == "processed" and not version:
        raise click.UsageError("--version is required with --type processed")
    dry_run = dry_run or obj.dry_run
    config = obj.config()
    host = config.get_site(site).name if site else config.site.name
    db = open_db(config, read_only=dry_run)
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
