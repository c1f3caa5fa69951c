"""massive-cax: one SLURM job per run that needs processing, each running cax --once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cax.cli.massive_cax import MassiveOptions, parse_walltime, selection
from cax.runsdb import TRANSFERRED
from tests.batch.helpers import REFERENCE, processed, processing_config, raw_runs, wait_until
from tests.batch.test_process_slurm import SLURM, queued


def massive(config, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from cax.cli import massive_cax; "
                           "massive_cax()", "--config", str(config), "--host", "lab", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_start_and_stop_are_both_honoured():
    assert selection(MassiveOptions(start=3, stop=7), None) == {"number": {"$gte": 3, "$lte": 7}}
    assert parse_walltime("48:00:00") == 48 * 3600 and parse_walltime("1-00:30:00") == 88200
    assert parse_walltime("90") == 5400


def test_dry_run_prints_scripts_and_writes_nothing(tmp_path, runsdb_uri, runsdb, monkeypatch):
    config = processing_config(tmp_path, runsdb_uri, REFERENCE, **SLURM)
    ids = raw_runs(tmp_path, runsdb, 3)
    done = massive(config, "--once", "--dry-run", "--start", "2", "--stop", "3",
                   "--partition", "xenon1t")
    assert done.returncode == 0, done.stderr
    for number in (2, 3):
        assert f"#SBATCH --job-name=cax_{number}_v1.0" in done.stdout
        assert f'"--run", "{number}", "--ncpu", "1"' in done.stdout
    assert "cax_1_v1.0" not in done.stdout  # --start honoured, not overwritten by --stop
    assert "#SBATCH --qos=xenon1t" in done.stdout and "sbatch --parsable" in done.stdout
    assert not list((tmp_path / "jobs").iterdir())
    assert all(processed(runsdb, i) is None for i in ids)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_massive_cax_once_processes_runs_end_to_end(slurm, tmp_path, runsdb_uri, runsdb):
    config = processing_config(tmp_path, runsdb_uri, REFERENCE, max_jobs=10, **SLURM)
    ids = raw_runs(tmp_path, runsdb, 3)
    done = massive(config, "--once", "--mem-per-cpu", "100")
    assert done.returncode == 0, done.stderr
    assert len(queued(slurm)) == 3
    again = massive(config, "--once", "--mem-per-cpu", "100")  # queued runs are skipped
    assert again.returncode == 0 and len(queued(slurm)) <= 3
    wait_until(lambda: all((processed(runsdb, i) or {}).get("status") == TRANSFERRED
                           for i in ids), timeout=240, what="the jobs to process the runs")
    entry = processed(runsdb, ids[0])
    assert entry["job_id"].startswith("local:")  # processed inside the SLURM job, by cax


def test_the_demo_processes_its_runs(tmp_path):
    from cax.demo import run_demo

    lines = list(run_demo(tmp_path / "demo", 2))
    rows = [line for line in lines if " processed " in line]
    assert len(rows) == 2 and all("transferred" in row for row in rows), "\n".join(lines)
    made = sorted((tmp_path / "demo/lab/processed/pax_v1.0.0").glob("*.root"))
    assert len(made) == 2 and all(p.stat().st_size > 0 for p in made)
