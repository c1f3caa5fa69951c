"""ProcessBatchQueue against a real SLURM: submit, throttle, register, scancel, time limit,
a daemon killed while its job is queued, and one squeue per pass with 200 jobs queued."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from cax.daemon import Daemon
from cax.runsdb import ERROR, TRANSFERRED
from cax.tasks import ProcessBatchQueue
from tests.batch.helpers import (
    VERSION,
    counting_reference,
    processed,
    processing_config,
    python_command,
    raw_runs,
    run_passes,
    starts,
    wait_until,
)
from tests.conftest import make_context

SLURM = {"backend": "slurm", "accounting": "completion", "mem_per_cpu": 100}


def queued(slurm, name: str | None = None) -> list[str]:
    out = slurm.run("squeue", "--noheader", "--user=root", "--format=%i|%j|%T")
    rows = [line.split("|") for line in out.split()]
    return [r[0] for r in rows if r[1].startswith("cax_") and (name is None or r[1] == name)]


def partition(slurm, state: str) -> None:
    slurm.run("scontrol", "update", "PartitionName=debug", f"State={state}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submit_throttle_scancel_retry_and_register(slurm, tmp_path, runsdb_uri, runsdb):
    count, gate = tmp_path / "starts", tmp_path / "gate"
    config = processing_config(tmp_path, runsdb_uri, counting_reference(count, gate), **SLURM)
    ids = raw_runs(tmp_path, runsdb, 3)
    ctx = make_context(config, "lab", runsdb)
    daemon = Daemon(ctx, [ProcessBatchQueue])
    daemon.run_pass()
    wait_until(lambda: len(queued(slurm)) == 2, what="two jobs queued")
    daemon.run_pass()
    assert len(queued(slurm)) == 2  # throttled at max_jobs
    assert sum(processed(runsdb, i) is not None for i in ids) == 2
    victim = next(i for i in ids if processed(runsdb, i))
    job = processed(runsdb, victim)["job_id"]
    assert job.isdigit() and processed(runsdb, victim)["job_name"].startswith("cax_")
    wait_until(lambda: starts(count), what="a job to start")
    slurm.run("scancel", job)
    wait_until(lambda: (daemon.run_pass() and False) or
               processed(runsdb, victim).get("error"), timeout=120, what="the cancel")
    assert "cancelled" in processed(runsdb, victim)["error"]
    gate.touch()
    wait_until(lambda: (daemon.run_pass() and False) or
               all(processed(runsdb, i) and processed(runsdb, i)["status"] == TRANSFERRED
                   for i in ids), timeout=180, what="all three registered")
    entry = processed(runsdb, victim)
    assert entry["attempts"] == 2 and entry["job_id"] != job  # retried as a new job
    assert (entry["pax_version"], entry["creation_place"]) == (VERSION, "lab")
    assert os.path.getsize(entry["location"]) == entry["size"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_daemon_killed_while_its_job_is_queued_causes_no_second_job(slurm, tmp_path,
                                                                      runsdb_uri, runsdb):
    count = tmp_path / "starts"
    config = processing_config(tmp_path, runsdb_uri, counting_reference(count),
                               top={"lease_seconds": 5}, **SLURM)
    (run_id,) = raw_runs(tmp_path, runsdb, 1)
    partition(slurm, "DOWN")  # jobs are accepted but stay pending
    try:
        daemon = subprocess.Popen([sys.executable, "-m", "cax", "--config", str(config),
                                   "--host", "lab"], stdout=subprocess.DEVNULL,
                                  stderr=open(tmp_path / "daemon.log", "w"))
        try:
            wait_until(lambda: (processed(runsdb, run_id) or {}).get("job_id"),
                       what="the job id")
            os.kill(daemon.pid, signal.SIGKILL)
            daemon.wait()
        finally:
            if daemon.poll() is None:
                daemon.kill()
        job = processed(runsdb, run_id)["job_id"]
        ctx = make_context(config, "lab", runsdb)
        other = Daemon(ctx, [ProcessBatchQueue])
        wait_until(lambda: (other.run_pass() and False) or
                   processed(runsdb, run_id).get("lease_owner") == ctx.owner,
                   timeout=60, what="the takeover")
        assert queued(slurm) == [job]  # adopted, not submitted again
    finally:
        partition(slurm, "UP")
    run_passes(config, runsdb, lambda: processed(runsdb, run_id)["status"] == TRANSFERRED,
               timeout=120)
    assert len(starts(count)) == 1 and processed(runsdb, run_id)["job_id"] == job


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_squeue_per_poll_with_200_jobs_queued(slurm, tmp_path, runsdb_uri, runsdb,
                                                  monkeypatch):
    """200 queued jobs, each waited on under its own lease: the batch system is asked about
    all of them in one squeue per poll, and a pass costs a fixed number of runs-DB round trips
    and no batch-system call."""
    from cax.tasks import process

    monkeypatch.setitem(process.POLL_S, "slurm", 0.5)
    config = processing_config(tmp_path, runsdb_uri, counting_reference(tmp_path / "starts"),
                               max_jobs=250, **SLURM)
    raw_runs(tmp_path, runsdb, 200, files=1, size=100)
    partition(slurm, "DOWN")
    ctx = make_context(config, "lab", runsdb)
    try:
        daemon = Daemon(ctx, [ProcessBatchQueue])
        daemon.run_pass()
        wait_until(lambda: len(queued(slurm)) == 200, timeout=120, what="200 jobs queued")
        backend, watcher = ctx.batch, ctx.watcher
        wait_until(lambda: watcher.polls >= 2, what="the watcher polling")
        squeues, polls, calls = backend.squeue_calls, watcher.polls, backend.calls
        trips = runsdb.round_trips
        daemon.run_pass()
        wait_until(lambda: watcher.polls >= polls + 3, what="three more polls")
        squeue_per_poll = (backend.squeue_calls - squeues) / (watcher.polls - polls)
        print(f"200 jobs queued: squeue calls per poll {squeue_per_poll:.2f}, batch-system "
              f"calls {backend.calls - calls} over {watcher.polls - polls} polls")
        assert squeue_per_poll <= 1.5  # one per poll (a poll may be under way at either end)
        assert len(queued(slurm)) == 200  # nothing submitted twice
    finally:
        ctx.stop.set()  # the waiting attempts leave their jobs queued
        for pool in ctx.pools():
            pool.wait()
        ctx.close_batch()
        slurm.cancel_all()
        partition(slurm, "UP")
    print(f"runs-DB round trips of the second pass's query: {runsdb.round_trips - trips}")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_job_over_its_time_limit_is_detected(slurm, tmp_path, runsdb_uri, runsdb):
    """SLURM counts whole minutes and checks limits every 30 s: about 90 s of waiting."""
    command = python_command("import time; time.sleep(600)", "{output}")
    config = processing_config(tmp_path, runsdb_uri, command, timeout=1,
                               site={"max_attempts": 1}, **SLURM)
    (run_id,) = raw_runs(tmp_path, runsdb, 1)
    run_passes(config, runsdb, lambda: processed(runsdb, run_id)["status"] == ERROR,
               timeout=300)
    assert "timeout" in processed(runsdb, run_id)["error"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_queue_full_of_an_earlier_daemons_jobs_costs_no_attempt(slurm, tmp_path, runsdb_uri,
                                                                   runsdb):
    """A daemon restarted while its predecessor's jobs fill the queue (max_jobs of them) must
    neither submit beyond the throttle nor count the full queue as a failed attempt of each
    run: it used to claim every run, fail each with "SLURM throttle" and, after max_attempts
    passes, leave them all as permanent errors."""
    config = processing_config(tmp_path, runsdb_uri, counting_reference(tmp_path / "starts"),
                               **SLURM)
    ids = raw_runs(tmp_path, runsdb, 3)
    partition(slurm, "DOWN")
    try:
        for n in range(2):  # the earlier daemon's jobs, still pending
            slurm.run("sbatch", f"--job-name=cax_earlier{n}", "--mem-per-cpu=100",
                      f"--output={tmp_path / 'earlier.log'}", "--wrap", "sleep 600")
        wait_until(lambda: len(queued(slurm)) == 2, what="the earlier jobs queued")
        daemon = Daemon(make_context(config, "lab", runsdb), [ProcessBatchQueue])
        for _ in range(4):  # more passes than max_attempts
            daemon.run_pass()
        assert len(queued(slurm)) == 2  # the throttle counts the earlier daemon's jobs
        assert [processed(runsdb, i) for i in ids] == [None, None, None]
    finally:
        slurm.cancel_all()
        partition(slurm, "UP")
    run_passes(config, runsdb, lambda: all((processed(runsdb, i) or {}).get("status") ==
                                           TRANSFERRED for i in ids), timeout=180)
    assert [processed(runsdb, i)["attempts"] for i in ids] == [1, 1, 1]
