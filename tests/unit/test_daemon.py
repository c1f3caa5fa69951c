"""The daemon loop: selection, isolation of failures, heartbeat, backoff, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cax import tasks as tasks_module
from cax.daemon import Daemon
from cax.errors import RunsDBError, TransferError
from cax.tasks import Task, select_tasks
from tests.conftest import make_context, make_run


class Recorder(Task):
    """Records the runs it is given; fails on run number 2."""

    seen: list = []

    def query(self):
        return {}

    def each_run(self, run):
        Recorder.seen.append(run["number"])
        if run["number"] == 2:
            raise TransferError("boom on run 2")


class Crasher(Task):
    def query(self):
        return {"number": 1}

    def each_run(self, run):
        raise KeyError("a bug")


@pytest.fixture(autouse=True)
def _clear():
    Recorder.seen = []


@pytest.fixture
def ctx(two_sites, runsdb):
    runsdb.insert_runs([make_run(n, name=f"run{n}") for n in (1, 2, 3)])
    return make_context(two_sites, "daq", runsdb)


def test_pass_failure_in_one_run_does_not_stop_the_others(ctx):
    result = Daemon(ctx, [Recorder, Crasher]).run_pass()
    assert sorted(Recorder.seen) == [1, 2, 3]
    counts = {o.task: (o.done, o.failed) for o in result.outcomes}
    assert counts["Recorder"] == (2, 1)
    assert counts["Crasher"] == (0, 1)  # an unexpected exception is isolated too


def test_once_exit_status_reflects_failures(ctx):
    assert Daemon(ctx, [Recorder]).run(once=True) == 1
    ctx.selector = {"number": 3}
    assert Daemon(ctx, [Recorder]).run(once=True) == 0


@pytest.mark.parametrize("kwargs, expected", [
    ({"run": 2}, [2]), ({"name": "run3"}, [3]), ({}, [3, 2, 1]),
])
def test_selection_by_run_and_name(two_sites, runsdb, kwargs, expected):
    runsdb.insert_runs([make_run(n, name=f"run{n}") for n in (1, 2, 3)])
    ctx = make_context(two_sites, "daq", runsdb, **kwargs)
    Daemon(ctx, [Recorder]).run_pass()
    assert Recorder.seen == expected


def test_dataset_list_limits_runs(two_sites, runsdb):
    config = json.loads(two_sites.read_text())
    config["dataset_list"] = ["run1", "run3"]
    two_sites.write_text(json.dumps(config))
    runsdb.insert_runs([make_run(n, name=f"run{n}") for n in (1, 2, 3)])
    Daemon(make_context(two_sites, "daq", runsdb), [Recorder]).run_pass()
    assert sorted(Recorder.seen) == [1, 3]


def test_task_list_selects_tasks_in_pass_order(monkeypatch):
    monkeypatch.setattr(tasks_module, "TASKS", [Recorder, Crasher])
    assert select_tasks(("Crasher", "Recorder")) == [Recorder, Crasher]
    assert select_tasks(None) == [Recorder, Crasher]


def test_heartbeat_written_each_pass(ctx):
    daemon = Daemon(ctx, [Recorder])
    daemon.run_pass()
    daemon.run_pass()
    (beat,) = ctx.runsdb.find_heartbeats("daq")
    assert beat["_id"] == ctx.owner
    assert beat["pass"] == 2 and beat["pid"] == os.getpid()
    assert beat["counts"]["Recorder"] == {"done": 2, "failed": 1}
    assert "boom on run 2" in beat["last_error"]
    assert beat["pass_end"] >= beat["pass_start"]


def test_runs_db_outage_is_survived_with_backoff(ctx, monkeypatch):
    daemon = Daemon(ctx, [Recorder])

    def down(*args, **kwargs):
        raise RunsDBError("runs DB: find_runs: connection refused")

    with monkeypatch.context() as m:
        m.setattr(ctx.runsdb, "find_runs", down)
        m.setattr(ctx.runsdb, "write_heartbeat", down)
        first = daemon.run_pass()
        pause1 = daemon.sleep_seconds()
        daemon.run_pass()
        pause2 = daemon.sleep_seconds()
    assert first.failed >= 1 and pause2 > pause1 > ctx.config.sleep_seconds
    daemon.run_pass()  # the DB is back
    assert daemon.sleep_seconds() == ctx.config.sleep_seconds
    assert sorted(Recorder.seen) == [1, 2, 3]


def test_stop_flag_ends_the_pass_between_runs(ctx):
    class Stopper(Task):
        def query(self):
            return {}

        def each_run(self, run):
            Recorder.seen.append(run["number"])
            self.ctx.stop.set()

    Daemon(ctx, [Stopper, Recorder]).run_pass()
    assert Recorder.seen == [3]


def start_daemon(config, tmp_path):
    data = json.loads(config.read_text())
    data["sleep_seconds"] = 300
    config.write_text(json.dumps(data))
    return subprocess.Popen(
        [sys.executable, "-m", "cax", "--config", str(config), "--host", "daq"],
        stderr=subprocess.PIPE, text=True, cwd=tmp_path)


def wait_for_heartbeat(runsdb, daemon):
    deadline = time.monotonic() + 30
    while not runsdb.find_heartbeats("daq"):
        assert time.monotonic() < deadline and daemon.poll() is None, daemon.stderr.read()
        time.sleep(0.1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_warm_stop_exits_zero(two_sites, runsdb, tmp_path, sig):
    """The real daemon, in its own process: a warm stop ends the loop with status 0."""
    daemon = start_daemon(two_sites, tmp_path)
    try:
        wait_for_heartbeat(runsdb, daemon)
        daemon.send_signal(sig)
        assert daemon.wait(20) == 0
        err = daemon.stderr.read()
        assert "stopped after 1 pass" in err
        # acknowledged at once, before the stop completes
        assert f"{sig.name}: stopping after the current step; again to stop now" in err
    finally:
        if daemon.poll() is None:
            daemon.kill()


@pytest.mark.timeout(60)
def test_second_signal_is_a_cold_stop(two_sites, runsdb, tmp_path, monkeypatch):
    """A second SIGTERM during a step that does not end exits at once with 128+15."""
    stuck = tmp_path / "stuck.py"
    stuck.write_text(
        "import time, runpy, sys\n"
        "from cax import tasks\n"
        "MARK = sys.argv.pop()\n"
        "class Hang(tasks.Task):\n"
        "    def query(self):\n"
        "        return {}\n"
        "    def each_run(self, run):\n"
        "        open(MARK + '.started', 'w').close()\n"
        "        time.sleep(600)\n"
        "tasks.TASKS[:] = [Hang]\n"
        "sys.argv = ['cax'] + sys.argv[1:]\n"
        "runpy.run_module('cax', run_name='__main__')\n")
    runsdb.insert_runs([make_run(1)])
    marker = tmp_path / "m"
    daemon = subprocess.Popen([sys.executable, str(stuck), "--config", str(two_sites),
                               "--host", "daq", str(marker)], stderr=subprocess.PIPE,
                              text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "m.started").exists():
            assert time.monotonic() < deadline and daemon.poll() is None, daemon.stderr.read()
            time.sleep(0.05)
        daemon.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert daemon.poll() is None  # warm: still finishing the step
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(10) == -signal.SIGTERM  # killed by the signal: the shell shows 143
    finally:
        if daemon.poll() is None:
            daemon.kill()
