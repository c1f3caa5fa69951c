"""The SLURM backend's own promises: its script, its calls, and never guessing."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from cax.batch import JobSpec, JobState, Resources, SlurmBackend
from cax.batch.slurm import slurm_time
from cax.errors import BatchError


def fake_slurm(tmp_path: Path, monkeypatch, **scripts: str) -> None:
    """Put fake SLURM commands (name -> sh body) first on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in scripts.items():
        path = bindir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")


def test_script_has_the_directives_and_no_shell(tmp_path):
    spec = JobSpec("cax_6123_v6.8.0", ("pax", "--input", "/data/raw/a b;rm -rf /", "$(x)"),
                   str(tmp_path / "job.log"),
                   Resources(ncpus=4, mem_per_cpu_mb=2000, walltime_s=48 * 3600,
                             partition="xenon1t", qos="xenon1t", reservation="r1",
                             account="pi-lgrandi"))
    text = SlurmBackend(10, python="/usr/bin/python3").script(spec)
    for line in ("#!/usr/bin/python3", "#SBATCH --job-name=cax_6123_v6.8.0",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --mem-per-cpu=2000",
                 "#SBATCH --time=2-00:00:00", f"#SBATCH --output={spec.output}",
                 "#SBATCH --partition=xenon1t", "#SBATCH --qos=xenon1t",
                 "#SBATCH --reservation=r1", "#SBATCH --account=pi-lgrandi"):
        assert line in text.splitlines()
    tree = ast.parse(text)  # the body is Python: the argument list is a literal, no shell
    literal = ast.literal_eval(tree.body[-1].value.args[1])
    assert literal[-4:] == ["pax", "--input", "/data/raw/a b;rm -rf /", "$(x)"]


def test_a_resource_that_would_add_a_directive_is_refused(tmp_path):
    spec = JobSpec("cax_1_v1", ("true",), str(tmp_path / "job.log"),
                   Resources(partition="debug\n#SBATCH --uid=0"))
    with pytest.raises(BatchError):
        SlurmBackend(10).script(spec)


def test_slurm_time_rounds_up_to_minutes():
    assert slurm_time(1) == "0-00:01:00"
    assert slurm_time(3601) == "0-01:01:00"
    assert slurm_time(2 * 86400) == "2-00:00:00"


@pytest.mark.parametrize("body", ["echo 'slurm_load_jobs error: Socket timed out' >&2; exit 1",
                                  "sleep 30", "echo 'garbage'"])
def test_failing_or_hanging_squeue_is_an_error_never_an_empty_queue(tmp_path, monkeypatch, body):
    fake_slurm(tmp_path, monkeypatch, squeue=body, sacct="exit 0")
    backend = SlurmBackend(10, timeout_s=1)
    with pytest.raises(BatchError):
        backend.poll(["12"])


def test_failing_sbatch_is_an_error(tmp_path, monkeypatch):
    fake_slurm(tmp_path, monkeypatch, sbatch="echo 'sbatch: error: invalid partition' >&2; exit 1")
    with pytest.raises(BatchError, match="invalid partition"):
        SlurmBackend(10).submit(JobSpec("cax_1_v1", ("true",), str(tmp_path / "job.log")))


def test_a_job_forgotten_by_squeue_is_found_in_the_completion_file(tmp_path, monkeypatch):
    fake_slurm(tmp_path, monkeypatch, squeue="exit 0",
               sacct="echo '12|cax_1_v1|TIMEOUT|0:15'; echo '13|cax_2_v1|FAILED|3:0'")
    polled = SlurmBackend(10).poll(["12", "13", "14"])
    assert polled["12"].state == JobState.TIMEOUT
    assert (polled["13"].state, polled["13"].exit_code) == (JobState.FAILED, 3)
    assert polled["14"].state == JobState.LOST
