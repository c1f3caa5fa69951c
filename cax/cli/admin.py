"""``cax retry`` and ``cax config check``: the operator's repairs and checks."""

from __future__ import annotations

import socket

import click

from cax.cli.base import EXIT_USAGE, RUN_NUMBER, Globals, guarded, open_db
from cax.cli.root import cli


@cli.command()
@click.option("--run", "run_number", type=RUN_NUMBER, metavar="N", help="Entries of run N.")
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
def retry(obj: Globals, run_number: int | None, name: str | None, site: str | None,
          data_type: str | None, version: str | None, all_stuck: bool, dry_run: bool) -> int:
    """Make stuck entries retryable at the next pass (deletes nothing)."""
    import getpass

    from cax.admin import retry as rt
    from cax.admin import status as st

    if all_stuck == (run_number is not None or name is not None):
        raise click.UsageError("give --run, --name or --all-stuck")
    if run_number is not None and name is not None:
        raise click.UsageError("give --run or --name, not both")
    dry_run = dry_run or obj.dry_run
    config = obj.config()
    if site:
        config.get_site(site)
    db = open_db(config, read_only=dry_run)
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



@cli.group("config")
def config_group() -> None:
    """Check the configuration."""


@config_group.command("check")
@click.option("--network", is_flag=True, help="Also reach every SSH site and run "
              "remote_python there.")
@click.pass_obj
@guarded
def config_check(obj: Globals, network: bool) -> int:
    """Check the configuration and what the machine must provide for it: what the daemon
    checks at start-up (give its --metrics-file, --metrics-port, --metrics-bind before
    `config`), and the runs DB."""
    from cax.admin.configcheck import StartOptions, check

    config = obj.config()
    options = StartOptions(obj.metrics_file, obj.metrics_port, obj.metrics_bind)
    findings = check(config, options, network=network)
    problems = [p for f in findings for p in f.problems]
    for problem in problems:
        click.echo(f"cax: {config.path.name}: {problem}", err=True)
    if problems:
        return EXIT_USAGE
    click.echo(f"{config.path}: site {config.site.name}: no problems found; checked:")
    for finding in findings:
        click.echo(f"  {finding.what}: {finding.checked}")
    return 0
