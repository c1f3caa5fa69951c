"""The installed command line, end to end, in subprocesses."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from cax.runsdb import TRANSFERRED, EntryKey, find_entry
from tests.integration.conftest import make_dataset, register


def cax(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cax", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its content and its mtime.

    The embedded store's ``-shm`` file is left out: it is SQLite's shared-memory index of the
    WAL, which every reader updates; it holds no data.
    """
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            + str(p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".sqlite-shm")}


def test_dry_run_logs_actions_and_writes_nothing(two_sites, runsdb, tmp_path):
    raw = tmp_path / "daq/raw/170104_0100"
    make_dataset(raw, files=2)
    register(runsdb, 1, "daq", raw)
    before = snapshot(tmp_path)
    result = cax("--once", "--dry-run", "--config", str(two_sites), "--host", "daq",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dry run: would copy run 1 (170104_0100) raw daq -> lab" in result.stderr
    assert snapshot(tmp_path) == before


def test_disable_database_update_copies_but_leaves_db(two_sites, runsdb, tmp_path):
    raw = tmp_path / "daq/raw/170104_0200"
    make_dataset(raw, files=2)
    run_id = register(runsdb, 2, "daq", raw)
    db_files = snapshot(tmp_path / "runsdb")
    result = cax("--once", "--disable-database-update", "--config", str(two_sites), "--host",
                 "daq", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "lab/raw/170104_0200").is_dir()
    assert snapshot(tmp_path / "runsdb") == db_files
    assert find_entry(runsdb.find_run(run_id), EntryKey("lab", "raw")) is None


def test_once_copies_and_exit_zero(two_sites, runsdb, tmp_path):
    raw = tmp_path / "daq/raw/170104_0300"
    make_dataset(raw, files=3)
    run_id = register(runsdb, 3, "daq", raw)
    result = cax("--once", "--config", str(two_sites), "--host", "daq", "--run", "3",
                 "--log-file", str(tmp_path / "cax.log"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert find_entry(runsdb.find_run(run_id), EntryKey("lab", "raw"))["status"] == TRANSFERRED
    assert "transferred and verified" in (tmp_path / "cax.log").read_text()


def test_unreachable_runs_db_exit_3(tmp_path):
    config = tmp_path / "cax.json"
    config.write_text('{"runs_db": "mongodb://127.0.0.1:1/run?serverSelectionTimeoutMS=300",'
                      ' "sites": [{"name": "a", "method": "local"}]}')
    result = cax("--once", "--config", str(config), "--host", "a", cwd=tmp_path)
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1].startswith("cax: runs DB")
    assert "Traceback" not in result.stderr


def test_demo_runs_and_shows_verified_copies(tmp_path):
    result = cax("demo", "--dir", str(tmp_path / "demo"), "--runs", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == 6  # two runs, raw at daq and at lab, processed at lab
    assert {row[5] for row in rows} == {TRANSFERRED}
    assert sum(row[3] == "processed" for row in rows) == 2
    assert {row[2] for row in rows} == {"daq", "lab"}
    again = cax("demo", "--dir", str(tmp_path / "demo"), "--runs", "1", cwd=tmp_path)
    assert again.returncode == 0  # an earlier demo is replaced, anything else refused
    (tmp_path / "precious").mkdir()
    refused = cax("demo", "--dir", str(tmp_path / "precious"), cwd=tmp_path)
    assert refused.returncode == 2 and "not a cax demo" in refused.stderr
