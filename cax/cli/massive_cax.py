"""massive-cax: one SLURM job per run that still needs work, each running ``cax --once``.

The job's payload is ``cax --once --run N`` (``--name NAME`` for muon-veto runs) with this
site's configuration and ``--ncpu``, so inside the job the whole task list runs for that one
run and processing runs right there, in the job's allocation.  Runs are those that still need
processing here (the ProcessBatchQueue selection: verified raw copy, not ``donotprocess``,
required fields, no processed entry of the version, or one whose retry is due) -- a run
claimed by a daemon has an entry and is skipped -- and whose job is not already queued (by
name, in the one ``squeue`` call of the pass).  The queue is kept at ``max_queued`` own jobs.

Iterative mode (the original's): a full scan at most once a day, and between full scans only
runs that started since the last one, a pass every ``sleep_s`` (an hour by default).
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

import cax
from cax.batch.base import JobSpec, Resources
from cax.batch.slurm import SlurmBackend
from cax.cli.base import (
    RUN_NUMBER,
    FiniteFloat,
    build_context,
    default_config_path,
    guarded,
    host_option,
    log_level_option,
    setup_logging,
)
from cax.config import load_config
from cax.daemon import install_signal_handlers
from cax.errors import BatchError, ConfigError
from cax.runsdb import safe_component
from cax.tasks.process import ProcessBatchQueue, job_name

log = logging.getLogger(__name__)

FULL_SCAN_EVERY = dt.timedelta(days=1)
#: The original's qos for its partitions, used when --qos is not given.
PARTITION_QOS = {"xenon1t": "xenon1t", "kicp": "xenon1t-kicp"}


@dataclass(frozen=True)
class MassiveOptions:
    once: bool = False
    run: int | None = None
    start: int | None = None
    stop: int | None = None
    tag: str | None = None
    ncpu: int = 1
    mem_per_cpu: int = 2000
    walltime_s: float = 48 * 3600
    partition: str | None = None
    qos: str | None = None
    reservation: str | None = None
    max_queued: int | None = None
    dry_run: bool = False
    sleep_s: float = 3600.0


def parse_walltime(text: str) -> float:
    """``48:00:00``, ``2-00:00:00``, ``90`` (minutes) -> seconds."""
    days, _, rest = text.rpartition("-")
    parts = rest.split(":")
    try:
        numbers = [int(p) for p in parts]
        day_count = int(days) if days else 0
    except ValueError:
        raise ConfigError(f"--walltime {text!r}: expected [D-]HH:MM:SS or minutes") from None
    if len(numbers) == 1:
        return day_count * 86400 + numbers[0] * 60
    while len(numbers) < 3:
        numbers.append(0)
    hours, minutes, seconds = numbers[:3]
    return day_count * 86400 + hours * 3600 + minutes * 60 + seconds


def selection(opts: MassiveOptions, since: dt.datetime | None) -> dict[str, Any]:
    """The run filter of the options: --run, or --start/--stop as a range (both honoured)."""
    query: dict[str, Any] = {}
    if opts.run is not None:
        query["number"] = opts.run
    else:
        bounds = {op: v for op, v in (("$gte", opts.start), ("$lte", opts.stop)) if v is not None}
        if bounds:
            query["number"] = bounds
    if opts.tag:
        query["tags.name"] = opts.tag
    if since is not None:
        query["start"] = {"$gt": since}
    return query


def payload(ctx: Any, run: dict[str, Any], ncpu: int) -> tuple[str, ...]:
    """``cax --once --run N`` (``--name`` for the muon veto) for this site and config."""
    which = ["--run", str(int(run["number"]))] if run.get("detector", "tpc") == "tpc" else \
        ["--name", safe_component(run.get("name"))]
    return (sys.executable, "-m", "cax", "--once", "--config", str(ctx.config.path), "--host",
            ctx.site.name, *which, "--ncpu", str(ncpu))


def run_massive(ctx: Any, opts: MassiveOptions, echo: Callable[[str], None]) -> int:
    """Submit jobs for the runs that need them; return the exit status (1: a pass failed)."""
    processing = ctx.site.processing
    if processing is None:
        raise ConfigError(f"site {ctx.site.name} has no processing section")
    task = ProcessBatchQueue(ctx)
    backend = SlurmBackend(opts.max_queued or processing.max_jobs,
                           accounting=processing.accounting, python=processing.python)
    resources = Resources(ncpus=opts.ncpu, mem_per_cpu_mb=opts.mem_per_cpu,
                          walltime_s=opts.walltime_s, partition=opts.partition,
                          qos=opts.qos or PARTITION_QOS.get(opts.partition or ""),
                          reservation=opts.reservation, account=processing.account)
    last_full: dt.datetime | None = None
    status = 0
    while True:
        now = ctx.now()
        full = last_full is None or now - last_full >= FULL_SCAN_EVERY
        since = None if full else last_full
        if full:
            last_full = now
        log.info("%s mode pass", "full" if full else f"iterative (runs since {since:%H:%M})")
        try:
            submitted = _pass(ctx, task, backend, resources, opts, since, job_name, echo)
            log.info("pass done: %d job(s) %s", submitted,
                     "would be submitted" if opts.dry_run else "submitted")
        except BatchError as exc:
            log.error("%s", exc)
            status = 1
        if opts.once or ctx.stop.wait(opts.sleep_s):
            return status


def _pass(ctx: Any, task: ProcessBatchQueue, backend: SlurmBackend, resources: Resources,
          opts: MassiveOptions, since: dt.datetime | None, job_name: Callable,
          echo: Callable[[str], None]) -> int:
    query = {"$and": [task._candidates(ctx.now()), selection(opts, since)]}
    runs = ctx.runsdb.find_runs(query)
    try:
        queued = {s.name for s in backend.poll().values() if s.active}
    except BatchError as exc:
        if not opts.dry_run:
            raise  # never submit without knowing what is queued
        log.warning("dry run: cannot list the queue, showing every run: %s", exc)
        queued = set()
    submitted = 0
    for run in runs:
        if ctx.stop.is_set():
            break
        name = job_name(run, ctx.site.processing)
        if name in queued:
            log.debug("%s already queued", name)
            continue
        if backend.free_slots() <= 0:
            log.info("speed break: %d own jobs queued (max %d); the rest next pass",
                     backend.active_jobs(), backend.max_jobs)
            break
        spec = JobSpec(name, payload(ctx, run, opts.ncpu),
                       f"{ctx.site.processing.jobs_dir}/{name}.massive.log", resources)
        if opts.dry_run:
            script = backend.script_path(spec)
            echo(f"# {' '.join(backend.submit_argv(script))}\n{backend.script(spec)}")
            backend._active += 1  # as if submitted: the throttle applies to a dry run too
        else:
            backend.submit(spec)
        queued.add(name)
        submitted += 1
    return submitted


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--once", is_flag=True, help="One pass, then exit.")
@click.option("--config", "config_path", metavar="FILE", default=None,
              help="Configuration file [default: $CAX_CONFIG or ./cax.json].")
@host_option
@click.option("--run", "run_number", type=RUN_NUMBER, metavar="N", help="Only run N.")
@click.option("--start", type=RUN_NUMBER, metavar="N", help="Only runs numbered N or higher.")
@click.option("--stop", type=RUN_NUMBER, metavar="N", help="Only runs numbered N or lower.")
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
@click.option("--sleep", "sleep_s", type=FiniteFloat(0, 7 * 86400), default=3600, show_default=True,
              help="Seconds between passes (iterative mode).")
@click.option("--dry-run", is_flag=True, help="Print the scripts and commands; submit nothing.")
@log_level_option
@click.option("--log-file", metavar="FILE", help="Also write the log to FILE.")
@click.version_option(cax.__version__, prog_name="massive-cax")
@guarded
def massive_cax(once: bool, config_path: str | None, host: str | None, run_number: int | None,
                start: int | None, stop: int | None, tag: str | None, ncpu: int,
                mem_per_cpu: int, walltime: str, partition: str | None, qos: str | None,
                reservation: str | None, max_queued: int | None, sleep_s: float, dry_run: bool,
                log_level: str, log_file: str | None) -> int:
    """Submit one batch job (cax --once --run N) per run that still needs processing."""
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
