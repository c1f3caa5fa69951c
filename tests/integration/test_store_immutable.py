"""Issue 17.11: the embedded store's files made immutable (``chattr +i``) under running daemons.

With a WAL journal, SQLite maps the ``-shm`` file into every process; once the file cannot be
written, the next read of the mapping kills the process with SIGBUS -- a daemon dead with no
log line.  Whatever the store's files do, a daemon logs, backs off and comes back, and a daemon
started meanwhile waits for the store instead of exiting.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cax.runsdb import TRANSFERRED, EntryKey, find_entry
from tests.conftest import REAL_MONGODB
from tests.integration.conftest import make_dataset, register

pytestmark = pytest.mark.skipif(bool(REAL_MONGODB), reason="the embedded store's files")


def chattr(flag: str, store: Path) -> None:
    paths = [store, *store.iterdir()]
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


def start(config: Path, host: str, log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "cax", "--config", str(config), "--host",
                                 host, "--log", "info"], stdout=out, stderr=out,
                                start_new_session=True)


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def copied(runsdb, run_id) -> bool:
    entry = find_entry(runsdb.find_run(run_id), EntryKey("lab", "raw"))
    return bool(entry) and entry["status"] == TRANSFERRED


@pytest.mark.timeout(300)
def test_immutable_store_files_are_survived_by_running_and_starting_daemons(
        two_sites, runsdb, runsdb_uri, tmp_path):
    store = Path(runsdb_uri[0][len("file:"):])
    try:
        chattr("+i", store)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"chattr +i is not possible here: {exc}")
    chattr("-i", store)
    first = register(runsdb, 1, "daq", make_dataset_at(tmp_path, "170101_0000"))
    logs = [tmp_path / "lab.log", tmp_path / "daq.log"]
    running = start(two_sites, "lab", logs[0])
    late = None
    try:
        wait_for(lambda: copied(runsdb, first))
        chattr("+i", store)
        try:
            late = start(two_sites, "daq", logs[1])  # a (re)start while the store is frozen
            time.sleep(8)  # many passes of the running daemon, the late one's start
            assert running.poll() is None, logs[0].read_text()[-2000:]
            assert late.poll() is None, logs[1].read_text()[-2000:]
        finally:
            chattr("-i", store)
        second = register(runsdb, 2, "daq", make_dataset_at(tmp_path, "170101_0100"))
        wait_for(lambda: copied(runsdb, second))
        assert running.poll() is None and late.poll() is None
    finally:
        for daemon in (running, late):
            if daemon is not None and daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(60)
    assert running.returncode == 0 and late.returncode == 0
    assert "is not writable; trying again in 5 s" in logs[1].read_text()
    frozen = logs[0].read_text()
    assert "runs DB" in frozen and ("readonly" in frozen or "I/O error" in frozen), frozen[-3000:]


def make_dataset_at(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "daq/raw" / name
    make_dataset(path, files=2, size=10_000)
    return path
