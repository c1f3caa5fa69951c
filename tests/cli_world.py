"""A small world for command-line tests: two local sites, an embedded runs DB, a stuck entry.

The runs DB is always the embedded store (also when CAX_TEST_MONGODB_URI is set): tests that
must show a command wrote nothing read its generation, the counter every write bumps.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cax.runsdb import ERROR, TRANSFERRED, open_runsdb
from tests.conftest import make_run, write_config

STORE_FILE = "runsdb.sqlite"


@dataclass(frozen=True)
class World:
    """Where a world's pieces are."""

    root: Path
    config: Path
    store: Path

    @property
    def uri(self) -> str:
        return f"file:{self.store}"

    def generation(self) -> int:
        """The embedded store's change counter (read without cax: no write of its own)."""
        with sqlite3.connect(f"file:{self.store / STORE_FILE}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()
        return int(row[0])

    def data(self) -> dict[str, str]:
        """Every file of the sites' data directories with a hash of its content."""
        return {str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for top in ("daq", "lab") for p in sorted((self.root / top).rglob("*"))
                if p.is_file()}

    def db(self) -> Any:
        return open_runsdb(self.uri)


def make_world(root: Path, **top: Any) -> World:
    """Two local sites, daq (pushes raw data) and lab (pulls; processes with SLURM), with
    three runs: run 1 copied
    to both, run 2 at daq only, run 3 stuck at lab (its attempts used up); and the directory
    of run 9 at daq, not registered."""
    for d in ("daq/raw", "lab/raw", "lab/processed"):
        (root / d).mkdir(parents=True, exist_ok=True)
    store = root / "runsdb"
    sites = [
        {"name": "daq", "method": "local", "dir_raw": str(root / "daq/raw"),
         "data_type": ["raw"], "upload_options": ["lab"], "reference_for": ["raw"]},
        {"name": "lab", "method": "local", "dir_raw": str(root / "lab/raw"),
         "dir_processed": str(root / "lab/processed"), "data_type": ["raw"],
         "download_options": ["daq"], "processing": {
             "command": ["{python}", "-m", "cax.processors.reference", "{input}", "{output}"],
             "version": "v1", "backend": "slurm", "jobs_dir": str(root / "lab/jobs")}},
    ]
    config = write_config(root / "cax.json", sites, runs_db=f"file:{store}",
                          sleep_seconds=0.1, lease_seconds=30, **top)
    now = dt.datetime.now(dt.timezone.utc)
    runs = []
    for number in (1, 2, 3):
        name = f"17010{number}_0000"
        path = root / "daq/raw" / name
        path.mkdir()
        (path / "f.dat").write_bytes(os.urandom(1000))
        data = [{"host": "daq", "type": "raw", "status": TRANSFERRED, "location": str(path),
                 "checksum": None, "creation_time": now}]
        if number == 1:
            data.append({**data[0], "host": "lab", "location": str(root / "lab/raw" / name),
                         "source": "daq"})
        if number == 3:
            data.append({"host": "lab", "type": "raw", "status": ERROR, "attempts": 5,
                         "next_attempt": now, "error": "rsync: No space left on device",
                         "error_kind": "transient", "source": "daq",
                         "location": str(root / "lab/raw" / name), "creation_time": now})
        runs.append(make_run(number, name=name, data=data))
    fresh = root / "daq/raw/170109_0000"  # written, not registered yet
    fresh.mkdir()
    (fresh / "f.dat").write_bytes(os.urandom(1000))
    db = open_runsdb(f"file:{store}", create=True)
    try:
        db.insert_runs(runs)
    finally:
        db.close()
    return World(root, config, store)


def cax(*args: str, cwd: Path, env: dict[str, str] | None = None,
        program: str = "cax") -> subprocess.CompletedProcess:
    """Run a command of this checkout (``cax``, ``cax-mv``, ...) in a subprocess, in ``env``
    (default: this process's environment)."""
    entry = "main" if program == "cax" else program.replace("-", "_")
    code = f"import sys; from cax import cli; sys.argv[0] = {program!r}; cli.{entry}()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=os.environ.copy() if env is None else env)


def without_site_env() -> dict[str, str]:
    """An environment in which this machine names no configured site."""
    env = {k: v for k, v in os.environ.items() if k not in ("CAX_HOST", "CAX_CONFIG",
                                                            "CAX_RUNS_DB")}
    env["HOSTNAME"] = "nowhere"
    return env
