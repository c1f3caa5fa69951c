"""ProcessBatchQueue with the local backend: exactly once, retries, timeouts, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cax.checksum import dataset_checksum, scan_dataset
from cax.daemon import Daemon
from cax.runsdb import ERROR, TRANSFERRED, TRANSFERRING
from cax.tasks import ProcessBatchQueue
from tests.batch.helpers import (
    REFERENCE,
    VERSION,
    alive,
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


def test_a_run_is_processed_and_registered_with_its_checksum(tmp_path, runsdb_uri, runsdb):
    config = processing_config(tmp_path, runsdb_uri, REFERENCE)
    (run_id,) = raw_runs(tmp_path, runsdb, 1)
    ctx = make_context(config, "lab", runsdb, once=True)
    assert Daemon(ctx, [ProcessBatchQueue]).run(once=True) == 0
    entry = processed(runsdb, run_id)
    run = runsdb.find_run(run_id)
    final = tmp_path / f"lab/processed/pax_{VERSION}/{run['name']}.root"
    assert entry["status"] == TRANSFERRED
    assert entry["location"] == str(final)
    assert entry["checksum"] == dataset_checksum(scan_dataset(final))
    assert entry["size"] == final.stat().st_size
    assert (entry["pax_version"], entry["pax_hash"], entry["creation_place"]) == \
        (VERSION, "abc123", "lab")
    assert entry["job_name"] == f"cax_1_{VERSION}" and entry["job_id"].startswith("local:")
    assert "lease_owner" not in entry and "reading" not in entry
    summary = json.loads(final.read_text())  # a real processed file, from every raw file
    assert [f["path"] for f in summary["files"]] == ["f001.zip", "sub/f000.zip"]
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".")]  # no scratch left
    # processed once: another pass finds nothing to do
    assert Daemon(ctx, [ProcessBatchQueue]).run(once=True) == 0
    assert processed(runsdb, run_id)["checksum"] == entry["checksum"]


def test_runs_not_ready_are_not_processed(tmp_path, runsdb_uri, runsdb):
    config = processing_config(tmp_path, runsdb_uri, REFERENCE, required_fields=["gains"])
    ids = raw_runs(tmp_path, runsdb, 3)
    runsdb.set_run_fields(ids[0], {"gains": [1.0]})
    runsdb.set_run_fields(ids[1], {"gains": [1.0], "tags": [{"name": "donotprocess"}]})
    ctx = make_context(config, "lab", runsdb, once=True)
    assert Daemon(ctx, [ProcessBatchQueue]).run(once=True) == 0
    assert processed(runsdb, ids[0])["status"] == TRANSFERRED
    assert processed(runsdb, ids[1]) is None  # tagged donotprocess
    assert processed(runsdb, ids[2]) is None  # no gains


def test_two_daemons_racing_process_each_run_once(tmp_path, runsdb_uri, runsdb):
    count = tmp_path / "starts"
    config = processing_config(tmp_path, runsdb_uri, counting_reference(count), max_jobs=4)
    ids = raw_runs(tmp_path, runsdb, 6)
    daemons = [subprocess.Popen([sys.executable, "-m", "cax", "--once", "--config",
                                 str(config), "--host", "lab", "--log", "debug"],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"d{i}.log", "w"))
               for i in range(2)]
    for daemon in daemons:
        assert daemon.wait(180) == 0
    names = [name for name, _ in starts(count)]
    assert sorted(names) == sorted(set(names)) and len(names) == 6  # each run exactly once
    assert all(processed(runsdb, i)["status"] == TRANSFERRED for i in ids)
    owners = {processed(runsdb, i)["job_id"].split(":")[2] for i in ids}
    print(f"6 runs processed once each by {len(owners)} job-starting daemon process(es)")


def test_failing_processor_is_retried_then_stuck_with_its_stderr(tmp_path, runsdb_uri, runsdb):
    count = tmp_path / "starts"
    command = python_command(f"""
        import sys
        open({str(count)!r}, "a").write("x 1\\n")
        print("pax: calibration constants missing for this run", file=sys.stderr)
        sys.exit(3)
    """, "{output}")
    config = processing_config(tmp_path, runsdb_uri, command, site={"max_attempts": 2})
    (run_id,) = raw_runs(tmp_path, runsdb, 1)
    ctx = make_context(config, "lab", runsdb, once=True)
    for _ in range(3):
        assert Daemon(ctx, [ProcessBatchQueue]).run(once=True) in (0, 1)
    entry = processed(runsdb, run_id)
    assert entry["status"] == ERROR and entry["attempts"] == 2
    assert entry["next_attempt"] is None  # stuck
    assert "exit code 3" in entry["error"] and "calibration constants missing" in entry["error"]
    assert len(starts(count)) == 2  # max_attempts, then no more


def test_hanging_processor_is_killed_at_its_timeout(tmp_path, runsdb_uri, runsdb):
    pids = tmp_path / "pids"
    command = python_command(f"""
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "600"])
        open({str(pids)!r}, "w").write(str(os.getpid()) + " " + str(child.pid))
        time.sleep(600)
    """, "{output}")
    config = processing_config(tmp_path, runsdb_uri, command, timeout=2,
                               site={"max_attempts": 1})
    (run_id,) = raw_runs(tmp_path, runsdb, 1)
    ctx = make_context(config, "lab", runsdb, once=True)
    assert Daemon(ctx, [ProcessBatchQueue]).run(once=True) == 1
    entry = processed(runsdb, run_id)
    assert entry["status"] == ERROR and "timeout" in entry["error"]
    assert not any(alive(int(p)) for p in pids.read_text().split())


def test_output_that_cannot_be_checksummed_is_not_registered(tmp_path, runsdb_uri, runsdb):
    command = python_command("import os, sys; os.mkfifo(sys.argv[1])", "{output}")
    config = processing_config(tmp_path, runsdb_uri, command, site={"max_attempts": 1})
    (run_id,) = raw_runs(tmp_path, runsdb, 1)
    ctx = make_context(config, "lab", runsdb, once=True)
    assert Daemon(ctx, [ProcessBatchQueue]).run(once=True) == 1
    entry = processed(runsdb, run_id)
    assert entry["status"] == ERROR and entry["checksum"] is None
    assert "neither a regular file" in entry["error"]
    assert not os.path.exists(entry["location"])  # nothing unverified under the final name


def start_daemon(config: Path, tmp_path: Path) -> subprocess.Popen:
    """A background daemon (not --once) for site lab."""
    return subprocess.Popen([sys.executable, "-m", "cax", "--config", str(config), "--host",
                             "lab", "--log", "debug"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / f"daemon-{time.monotonic_ns()}.log", "w"))


@pytest.mark.timeout(180)
def test_kill_9_mid_job_then_takeover_never_runs_two_processors(tmp_path, runsdb_uri, runsdb):
    count, gate = tmp_path / "starts", tmp_path / "gate"
    config = processing_config(tmp_path, runsdb_uri, counting_reference(count, gate),
                               top={"lease_seconds": 5})
    (run_id,) = raw_runs(tmp_path, runsdb, 1)
    daemon = start_daemon(config, tmp_path)
    try:
        wait_until(lambda: starts(count), what="the first processor")
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait()
    finally:
        if daemon.poll() is None:
            daemon.kill()
    (_, first), = starts(count)
    wait_until(lambda: not alive(first), what="the orphaned processor to die")
    assert processed(runsdb, run_id)["status"] == TRANSFERRING  # lease still held by the dead

    def second_started() -> bool:
        return len(starts(count)) == 2

    gate.touch()
    run_passes(config, runsdb, lambda: processed(runsdb, run_id)["status"] == TRANSFERRED)
    assert len(starts(count)) == 2  # redone once, only after the first had died
    entry = processed(runsdb, run_id)
    assert entry["attempts"] == 2 and second_started()


@pytest.mark.timeout(180)
def test_takeover_adopts_a_job_whose_processor_still_runs(tmp_path, runsdb_uri, runsdb,
                                                          monkeypatch):
    """A daemon that can no longer renew its lease (its runs DB connection hangs) and cannot
    cancel its job either leaves a processor running: the daemon taking over adopts that job
    instead of starting a second one."""
    from cax.errors import RunsDBError
    from cax.runsdb import open_runsdb
    from cax.tasks.process import ProcessJob

    count, gate = tmp_path / "starts", tmp_path / "gate"
    config = processing_config(tmp_path, runsdb_uri, counting_reference(count, gate),
                               top={"lease_seconds": 5})
    (run_id,) = raw_runs(tmp_path, runsdb, 1)
    hung_db = open_runsdb(*runsdb_uri)
    hung = make_context(config, "lab", hung_db)
    ctx = make_context(config, "lab", runsdb)
    ctx.owner += "-other"
    real_cancel = ProcessJob.cancel
    monkeypatch.setattr(ProcessJob, "cancel", lambda job: job.ctx is hung or real_cancel(job))
    Daemon(hung, [ProcessBatchQueue]).run_pass()
    try:
        wait_until(lambda: starts(count), what="the first processor")

        def unreachable(*args, **kwargs):
            raise RunsDBError("runs DB: renew: timed out")

        monkeypatch.setattr(hung_db, "renew", unreachable)
        other = Daemon(ctx, [ProcessBatchQueue])
        wait_until(lambda: (other.run_pass() and False) or
                   processed(runsdb, run_id).get("lease_owner") == ctx.owner,
                   timeout=60, what="the takeover")
        assert len(starts(count)) == 1  # adopted, not started again
        gate.touch()
        wait_until(lambda: (other.run_pass() and False) or
                   processed(runsdb, run_id)["status"] == TRANSFERRED, what="registration")
        assert len(starts(count)) == 1
        assert processed(runsdb, run_id)["attempts"] == 1
        hung.jobs.wait()  # the hung daemon's attempt ends: it changes nothing
        assert processed(runsdb, run_id)["status"] == TRANSFERRED
    finally:
        for context in (hung, ctx):
            context.close_batch()
