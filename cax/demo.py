"""``cax demo``: a self-contained example on the embedded runs DB, with two local sites.

It plays the DAQ (writes runs of real files and registers them as ``verifying`` at site
``daq`` the way ``cax run add`` does), then runs one pass of cax as ``daq`` and two as
``lab``: the DAQ's copies get their checksums, are pushed to ``lab`` and verified there, and
``lab`` processes them with the reference processor (local batch backend) into
``lab/processed/pax_v1.0.0/``.  One more run directory is written but left unregistered, so the
suggested next commands (register it, run the passes, look at the status) have something to
do.  Everything stays in one directory.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

from cax.admin import cax_command
from cax.admin.register import raw_entry, register, run_document
from cax.clock import utcnow
from cax.config import load_config
from cax.daemon import Daemon
from cax.errors import ConfigError
from cax.runsdb import open_runsdb
from cax.tasks import Context, select_tasks
from cax.workers import Background

MARKER = ".cax-demo"
FILES_PER_RUN = 3
FILE_BYTES = 1_000_000


def demo_config(root: Path) -> dict:
    """Two sites on this machine: the DAQ buffer ``daq`` and an analysis site ``lab``."""
    return {
        "runs_db": "file:runsdb",
        "sleep_seconds": 60,
        "sites": [
            {"name": "daq", "method": "local", "dir_raw": str(root / "daq" / "raw"),
             "data_type": ["raw"], "reference_for": ["raw"], "upload_options": ["lab"],
             "purge": 30, "min_copies": 1},
            {"name": "lab", "method": "local", "dir_raw": str(root / "lab" / "raw"),
             "dir_processed": str(root / "lab" / "processed"),
             "data_type": ["raw"], "download_options": ["daq"],
             "processing": {"command": ["{python}", "-m", "cax.processors.reference", "{input}",
                                        "{output}", "--ncpus", "{ncpus}"],
                            "version": "v1.0.0", "backend": "local", "max_jobs": 2,
                            "timeout": 600,
                            "validate": ["{python}", "-m", "cax.processors.reference",
                                         "--validate", "{output}"]}},
        ],
    }


def prepare(root: Path, runs: int) -> Path:
    """Create the demo directory (replacing an earlier demo, never anything else)."""
    if root.exists():
        if not (root / MARKER).exists():
            raise ConfigError(f"{root} exists and is not a cax demo; choose another --dir")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("created by cax demo\n")
    root = root.resolve()
    config = root / "cax.json"
    config.write_text(json.dumps(demo_config(root), indent=2) + "\n")
    daq = load_config(config, "daq").site
    db = open_runsdb(f"file:{root / 'runsdb'}", create=True)
    start = utcnow() - dt.timedelta(days=runs + 1)
    docs = []
    for number in range(1, runs + 2):
        when = start + dt.timedelta(days=number)
        name = when.strftime("%y%m%d_%H%M")
        location = root / "daq" / "raw" / name
        location.mkdir(parents=True)
        for i in range(FILES_PER_RUN):
            (location / f"XENON1T-{number}-{i:09d}.zip").write_bytes(os.urandom(FILE_BYTES))
        if number <= runs:  # the last one is for the user to register
            docs.append(run_document(number, name, "tpc", when, [],
                                     raw_entry(daq, str(location), now=when)))
    (root / "lab" / "raw").mkdir(parents=True)
    register(db, docs)
    db.close()
    return config


def one_pass(config_path: Path, site: str) -> int:
    """Run one pass of every task as ``site``; return how many items failed."""
    config = load_config(config_path, site)
    db = open_runsdb(config.runs_db, config.runs_db_name, config.runs_collection)
    ctx = Context(config=config, runsdb=db, owner=f"demo-{site}@{os.getpid()}",
                  background=Background(config.site.max_transfers), once=True)
    try:
        # its passes stand for the two sites' daemons: they leave heartbeats, as daemons do,
        # so that `cax status` and `cax web` show them
        daemon = Daemon(ctx, select_tasks(config.tasks_wanted), heartbeat=True)
        return daemon.run_pass(wait_background=True).failed
    finally:
        for pool in ctx.pools():
            pool.shutdown()
        if ctx.transports:
            ctx.transports.close_all()
        ctx.close_batch()
        db.close()


def summary(config_path: Path) -> Iterator[str]:
    """Yield a table of every copy the runs DB knows of."""
    config = load_config(config_path, "daq")
    db = open_runsdb(config.runs_db)
    yield (f"{'run':>4} {'name':<12} {'site':<5} {'type':<9} {'version':<7} {'status':<12} "
           f"{'size':>9}  checksum")
    for run in sorted(db.find_runs({}), key=lambda r: r["number"]):
        for entry in run["data"]:
            yield (f"{run['number']:>4} {run['name']:<12} {entry['host']:<5} {entry['type']:<9} "
                   f"{entry.get('pax_version') or '-':<7} {entry['status']:<12} "
                   f"{entry.get('size', 0):>9}  "
                   f"{(entry.get('checksum') or '-')[:24]}")
    db.close()


def run_demo(root: Path, runs: int = 4) -> Iterator[str]:
    """Build the demo under ``root``, run cax on it, and yield lines describing what it did."""
    config = prepare(root, runs)
    yield f"cax demo in {config.parent}: {runs} runs of {FILES_PER_RUN} files registered at " \
          "site daq"
    for site, what in (("daq", "checksums, push"), ("lab", "pull, verify"),
                       ("lab", "process (reference processor, local batch backend)")):
        failed = one_pass(config, site)
        yield f"pass as site {site} ({what}): {'ok' if not failed else f'{failed} failure(s)'}"
    yield ""
    yield from summary(config)
    yield ""
    cax = f"{cax_command()} --config {shlex.quote(str(config))}"
    yield f"One more run is waiting in {config.parent / 'daq' / 'raw'}, not registered yet."
    yield "Try it yourself:"
    yield f"  {cax} --host daq run add --from-dir {shlex.quote(str(config.parent / 'daq' / 'raw'))}"
    yield f"  {cax} --host daq --once --dry-run"
    yield f"  {cax} --host daq --once"
    yield f"  {cax} --host lab --once --log debug"
    yield f"  {cax} --host daq status --summary"
    yield f"  {cax} --host daq status"
    yield ""
    yield "See every run, copy and daemon in a browser (read-only, this machine only):"
    yield f"  {cax} --host daq web"
    yield "  and open http://127.0.0.1:8080/"
