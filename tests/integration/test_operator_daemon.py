"""The daemon as an operator meets it, in real processes (issue 18 items 7 and 8): no
heartbeat from a ``--once``, the metrics address, SIGHUP re-reading the configuration, and a
``--once`` that says why it leaves a run alone."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from cax.runsdb import TRANSFERRING, EntryKey
from tests.admin_seed import set_entry
from tests.cli_world import cax, make_world


@pytest.fixture
def world(tmp_path):
    return make_world(tmp_path / "w")


def start(world, *extra):
    """A looping daemon of site daq, logging to ``cax.log`` beside the configuration."""
    return subprocess.Popen(
        [sys.executable, "-m", "cax", "--config", str(world.config), "--host", "daq",
         "--log-file", str(world.root / "cax.log"), *extra],
        cwd=world.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CAX_RUNTIME_DIR": str(world.root / "run")})


def log_text(world):
    path = world.root / "cax.log"
    return path.read_text() if path.exists() else ""


def wait_for(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def stop():
    procs = []
    yield procs.append
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.communicate(timeout=60)


def test_once_leaves_no_heartbeat(world):
    """Item 7: every ``--once`` added a daemon row kept a week, which monitoring then took for
    a dead daemon."""
    result = cax("--config", str(world.config), "--host", "daq", "--once", cwd=world.root)
    assert result.returncode == 0, result.stderr
    db = world.db()
    try:
        assert db.find_heartbeats() == []
    finally:
        db.close()
    overview = cax("--config", str(world.config), "--host", "daq", "status", "--json",
                   cwd=world.root)
    assert json.loads(overview.stdout)["daemons"] == []


@pytest.mark.slow
def test_metrics_listen_on_the_address_given(world, stop):
    """Item 7: the metrics port listened only on 127.0.0.1."""
    daemon = start(world, "--metrics-port", "0", "--metrics-bind", "127.0.0.2")
    stop(daemon)
    wait_for(lambda: "pass 1: done" in log_text(world), "the first pass")
    port = int(re.search(r"served on http://127\.0\.0\.2:(\d+)/metrics",
                         log_text(world)).group(1))
    with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=30) as reply:
        assert b"cax_passes_total" in reply.read()


@pytest.mark.slow
def test_sighup_rereads_the_configuration_and_keeps_it_when_invalid(world, stop):
    """Item 8: SIGHUP only reopened the log; systemd's ``reload`` re-reads and validates the
    configuration, keeping the one in force when the new one is invalid, and says which."""
    daemon = start(world)
    stop(daemon)
    wait_for(lambda: "pass 1: done" in log_text(world), "the first pass")
    good = json.loads(world.config.read_text())
    good["sites"][0]["task_list"] = ["AddChecksum"]
    world.config.write_text(json.dumps(good))
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "re-read and valid: now in force (1 tasks)" in log_text(world),
             "the reload")
    wait_for(lambda: "start (1 tasks)" in log_text(world), "a pass with the new task list")
    world.config.write_text('{"sites": [')  # a half-written file
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "is invalid; keeping the one in force" in log_text(world),
             "the refused reload")
    assert "SIGHUP: cax.json: line 1 column 12: invalid JSON" in log_text(world)
    bad_db = {**good, "runs_db": f"file:{world.root / 'elsewhere'}"}
    world.config.write_text(json.dumps(bad_db))
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "runs_db changed: a running daemon keeps its runs DB" in log_text(world),
             "the refused change of runs DB")
    seen = log_text(world).count("start (1 tasks)")
    wait_for(lambda: log_text(world).count("start (1 tasks)") > seen, "passes going on")
    assert daemon.poll() is None
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) == 0


def test_once_for_a_run_says_which_entries_another_process_holds(world):
    """Item 8: after a cold stop, ``--once --run N`` did nothing for the lease's length
    without saying why."""
    db = world.db()
    try:
        run_id = db.find_runs({"number": 2})[0]["_id"]
        now = db.now()
        db.add_entry(run_id, {"host": "lab", "type": "raw", "status": TRANSFERRING,
                              "location": str(world.root / "lab/raw/170102_0000")})
        set_entry(db, run_id, EntryKey("lab", "raw"), {
            "lease_owner": "daq@gone:4242:1", "lease_token": "t0ken",
            "lease_expires": now + dt.timedelta(seconds=100)})
    finally:
        db.close()
    result = cax("--config", str(world.config), "--host", "daq", "--once", "--run", "2",
                 cwd=world.root)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if "under the lease of" in x)
    assert "WARNING" in line
    assert "run 2 (170102_0000): raw at lab is transferring under the lease of " \
           "daq@gone:4242:1 until " in line
    assert "left alone: a live lease is never taken over" in line
    assert not (world.root / "lab/raw/170102_0000").exists()
