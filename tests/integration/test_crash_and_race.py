"""A daemon killed mid-transfer loses nothing; two daemons of one site never copy twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cax.checksum import scan_dataset
from cax.daemon import Daemon
from cax.runsdb import TRANSFERRED, EntryKey, find_entry
from cax.tasks import CopyPush
from tests.conftest import advance_clock, edit_site, make_context
from tests.integration.conftest import make_dataset, register, wait_for_partial_bytes


def start_daemon(config, host, tmp_path, *extra):
    log = open(tmp_path / f"{host}-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "cax", "--once", "--config", str(config),
                             "--host", host, "--log", "debug", *extra],
                            stdout=log, stderr=log, start_new_session=True), log.name


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["rsync", "scp"])
def test_kill_9_mid_transfer_then_new_pass_completes(method, ssh_sites, runsdb, sshd,
                                                      tmp_path):
    config = ssh_sites(method)
    raw = tmp_path / "daq/raw/170102_0100"
    make_dataset(raw, files=12, size=4_000_000)
    run_id = register(runsdb, 1, "daq", raw)
    final = tmp_path / "remote/raw/170102_0100"

    daemon, log = start_daemon(config, "daq", tmp_path)
    try:
        partial = wait_for_partial_bytes(final)
        with sshd.frozen_sessions():  # hold the copy mid-way, then kill the daemon
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(10)
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)

    entry = find_entry(runsdb.find_run(run_id), EntryKey("remote", "raw"))
    assert entry["status"] != TRANSFERRED, open(log).read()[-2000:]
    assert not final.exists()  # nothing unverified under the final name

    # Before the lease expires nobody may take the copy over...
    ctx = make_context(config, "daq", runsdb, once=True)
    Daemon(ctx, [CopyPush]).run_pass(wait_background=True)
    assert find_entry(runsdb.find_run(run_id), EntryKey("remote", "raw"))["status"] != \
        TRANSFERRED
    # ...after it, the next pass does, and completes the copy.
    advance_clock(runsdb, 60)
    ctx = make_context(config, "daq", runsdb, once=True)
    result = Daemon(ctx, [CopyPush]).run_pass(wait_background=True)
    ctx.transports.close_all()
    entry = find_entry(runsdb.find_run(run_id), EntryKey("remote", "raw"))
    assert result.failed == 0, result.last_error
    assert entry["status"] == TRANSFERRED and entry["attempts"] == 2
    assert scan_dataset(final) == scan_dataset(raw)
    assert not partial.exists()


@pytest.mark.timeout(180)
def test_two_daemons_of_one_site_racing_copy_each_run_once(ssh_sites, runsdb, tmp_path):
    config = edit_site(ssh_sites("rsync"), "lab", max_transfers=3)
    for n in range(50):
        path = tmp_path / f"remote/raw/170103_{n:04d}"
        make_dataset(path, files=2, size=5_000)
        register(runsdb, 100 + n, "remote", path, manifest=n % 2 == 0)

    daemons = [start_daemon(config, "lab", tmp_path) for _ in range(2)]
    try:
        for proc, log in daemons:
            assert proc.wait(150) == 0, open(log).read()[-3000:]
    finally:
        for proc, _ in daemons:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    copies = [line for _, log in daemons for line in open(log)
              if "transferred and verified" in line]
    assert len(copies) == 50
    for run in runsdb.find_runs({}):
        entry = find_entry(run, EntryKey("lab", "raw"))
        assert entry["status"] == TRANSFERRED and entry["attempts"] == 1
        assert scan_dataset(entry["location"]) == \
            scan_dataset(find_entry(run, EntryKey("remote", "raw"))["location"])
    both = [sum("transferred and verified" in line for line in open(log)) for _, log in daemons]
    print(f"copies per daemon: {both}")
    assert all(both), f"one daemon did all the work: {both}"  # they really raced


def test_idle_pass_round_trips_do_not_grow_with_runs(two_sites, runsdb):
    """An idle pass costs a fixed number of runs-DB round trips, whatever the number of runs,
    and fetches no run document: every task's query excludes the runs already done for it."""
    from cax.tasks import TASKS
    from cax.tasks.checksum import compare_token
    from tests.conftest import make_run

    def done(host: str, number: int) -> dict:
        """A copy as cax leaves it: verified, sized, compared with the reference."""
        checksum = f"adler32:{number:08x}"
        entry = {"host": host, "type": "raw", "status": TRANSFERRED, "location": f"/{host}",
                 "checksum": checksum, "size": 10, "file_count": 1, "verified_time": runsdb.now()}
        if host == "lab":
            entry["compared_checksum"] = compare_token(checksum, checksum)
        return entry

    def idle_pass_cost(count: int, first: int) -> tuple[int, int]:
        runsdb.insert_runs([make_run(first + i, raw_size_byte=10, data=[
            done("daq", first + i), done("lab", first + i)]) for i in range(count)])
        ctx = make_context(two_sites, "lab", runsdb, once=True)
        trips, docs = runsdb.round_trips, runsdb.documents_returned
        Daemon(ctx, list(TASKS)).run_pass(wait_background=True)
        return runsdb.round_trips - trips, runsdb.documents_returned - docs

    (small, small_docs) = idle_pass_cost(100, 0)
    (large, large_docs) = idle_pass_cost(9_900, 100)  # 10,000 runs in all
    print(f"idle pass round trips: {small} at 100 runs, {large} at 10,000 runs; "
          f"documents returned: {small_docs}, {large_docs}")
    assert large == small
    assert (small_docs, large_docs) == (0, 0)
    assert large <= 25
