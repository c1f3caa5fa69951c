"""Sites that process, runs to process, and processors that count, fail, hang or wait."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from cax.daemon import Daemon
from cax.runsdb import EntryKey, find_entry
from cax.tasks import ProcessBatchQueue
from tests.conftest import make_context, write_config
from tests.integration.conftest import make_dataset, register

VERSION = "v1.0"
KEY = EntryKey("lab", "processed", VERSION)
REFERENCE = ["{python}", "-m", "cax.processors.reference", "{input}", "{output}",
             "--ncpus", "{ncpus}"]


def python_command(code: str, *args: str) -> list[str]:
    """A processor ``python -c CODE ARGS...``; braces in CODE are kept (not placeholders)."""
    body = textwrap.dedent(code).replace("{", "{{").replace("}", "}}")
    return [sys.executable, "-c", body, *args]


def counting_reference(count_file: Path, gate: Path | None = None) -> list[str]:
    """The reference processor, after noting its start (run name, pid) in ``count_file`` and,
    with ``gate``, waiting until that file exists."""
    code = "\n".join([
        "import os, runpy, sys, time",
        f"with open({str(count_file)!r}, 'a') as fh:",
        "    fh.write(os.path.basename(sys.argv[1]) + ' ' + str(os.getpid()) + '\\n')",
        f"gate = {str(gate) if gate else ''!r}",
        "while gate and not os.path.exists(gate):",
        "    time.sleep(0.05)",
        "sys.argv = ['reference', sys.argv[1], sys.argv[2]]",
        "runpy.run_module('cax.processors.reference', run_name='__main__')",
    ])
    return python_command(code, "{input}", "{output}")


def starts(count_file: Path) -> list[tuple[str, int]]:
    if not count_file.exists():
        return []
    return [(name, int(pid)) for name, pid in
            (line.split() for line in count_file.read_text().splitlines())]


def processing_config(tmp_path: Path, runsdb_uri: tuple[str, str], command: list[str],
                      *, site: dict[str, Any] | None = None, top: dict[str, Any] | None = None,
                      **processing: Any) -> Path:
    """A config with one site ``lab`` that holds raw data and processes it."""
    for sub in ("lab/raw", "lab/processed", "jobs"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    section = {"command": command, "version": VERSION, "pax_hash": "abc123",
               "jobs_dir": str(tmp_path / "jobs"), "max_jobs": 2, "timeout": 300,
               **processing}
    lab = {"name": "lab", "method": "local", "dir_raw": str(tmp_path / "lab/raw"),
           "dir_processed": str(tmp_path / "lab/processed"), "data_type": ["raw"],
           "retry_backoff": 0, "max_attempts": 3, "processing": section, **(site or {})}
    options = {"runs_db": runsdb_uri[0], "runs_db_name": runsdb_uri[1], "sleep_seconds": 0.1,
               "lease_seconds": 30, **(top or {})}
    return write_config(tmp_path / "cax.json", [lab], **options)


def raw_runs(tmp_path: Path, runsdb: Any, count: int, *, files: int = 2,
             size: int = 100_000, **fields: Any) -> list[Any]:
    """Register ``count`` runs with a verified raw copy at ``lab``; return their ids."""
    ids = []
    for number in range(1, count + 1):
        path = tmp_path / "lab/raw" / f"17010{number % 10}_{number:04d}"
        make_dataset(path, files=files, size=size)
        ids.append(register(runsdb, number, "lab", path, manifest=False, **fields))
    return ids


def processed(runsdb: Any, run_id: Any) -> dict[str, Any] | None:
    return find_entry(runsdb.find_run(run_id), KEY)


def run_passes(config: Path, runsdb: Any, until, *, timeout: float = 120, **ctx: Any):
    """Run passes of ProcessBatchQueue (one daemon) until ``until()`` is true; return the
    daemon."""
    context = make_context(config, "lab", runsdb, **ctx)
    daemon = Daemon(context, [ProcessBatchQueue])
    deadline = time.monotonic() + timeout
    while True:
        daemon.run_pass()
        if until():
            return daemon
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def wait_until(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
