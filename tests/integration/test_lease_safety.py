"""Issue 7 item 1: a registered copy is never corrupted by a second owner.

Two ways a second owner used to appear while the first still wrote: a daemon whose clock runs
ahead judged a live lease expired, and a daemon that could not reach the runs DB to renew kept
writing past its lease.  Both run here on a real sshd with rsync and a lease of 6 s.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cax.checksum import scan_dataset
from cax.daemon import Daemon
from cax.errors import RunsDBError
from cax.runsdb import TRANSFERRED, EntryKey, find_entry
from cax.tasks import CopyPush
from tests.conftest import advance_clock, make_context, skip_or_fail
from tests.integration.conftest import (
    make_dataset,
    register,
    scratches,
    wait_for_partial_bytes,
)

REMOTE = EntryKey("remote", "raw")


def start_daemon(config, host, tmp_path, *, skew_s: int = 0):
    """``cax --once`` as a process; with ``skew_s`` its clock runs that far ahead (faketime)."""
    env = dict(os.environ)
    argv = [sys.executable, "-m", "cax", "--once", "--config", str(config), "--host", host,
            "--log", "debug"]
    if skew_s:
        if not shutil.which("faketime"):
            skip_or_fail("faketime is not installed")
        # the kernel stamps file times itself: the store's clock stays the machine's
        env.update(NO_FAKE_STAT="1", FAKETIME_DONT_FAKE_MONOTONIC="1")
        argv = ["faketime", "-f", f"{skew_s:+d}s", *argv]
    log = tmp_path / f"{host}-{skew_s}-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True, env=env)
    return process, log


def writers_of(path: Path) -> list[str]:
    """Command lines of the processes of this machine that name ``path``."""
    found = []
    for proc_dir in Path("/proc").iterdir():
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if str(path) in cmdline and proc_dir.name != str(os.getpid()):
            found.append(cmdline)
    return found


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@pytest.mark.timeout(180)
def test_daemon_with_clock_90s_ahead_never_takes_over_a_live_lease(ssh_sites, runsdb, sshd,
                                                                    tmp_path):
    config = ssh_sites("rsync")
    raw = tmp_path / "daq/raw/170104_0100"
    make_dataset(raw, files=12, size=4_000_000)
    run_id = register(runsdb, 1, "daq", raw)
    final = tmp_path / "remote/raw/170104_0100"
    first, first_log = start_daemon(config, "daq", tmp_path)
    try:
        wait_for_partial_bytes(final)
        with sshd.frozen_sessions():  # the first daemon's copy is slowed to a halt...
            time.sleep(1)
            # ...and a second daemon of the same site, its clock 90 s ahead, makes a pass.
            second, second_log = start_daemon(config, "daq", tmp_path, skew_s=90)
            try:
                second.wait(60)
            finally:
                stop(second)
            entry = find_entry(runsdb.find_run(run_id), REMOTE)
            assert entry["lease_owner"].split(":")[1] == str(first.pid), \
                second_log.read_text()[-3000:]
            assert len(scratches(final)) == 1  # nobody else wrote a byte
        first.wait(90)
    finally:
        stop(first)
    entry = find_entry(runsdb.find_run(run_id), REMOTE)
    assert entry["status"] == TRANSFERRED and entry["attempts"] == 1, \
        first_log.read_text()[-3000:]
    assert scan_dataset(final) == scan_dataset(raw)
    assert scratches(final) == []


@pytest.mark.timeout(180)
def test_runs_db_outage_stops_the_copy_before_the_lease_can_be_taken(ssh_sites, runsdb, sshd,
                                                                      tmp_path, monkeypatch):
    """The old owner cannot renew: it has stopped writing before anyone else may claim."""
    config = ssh_sites("rsync")
    raw = tmp_path / "daq/raw/170104_0200"
    make_dataset(raw, files=12, size=4_000_000)
    run_id = register(runsdb, 2, "daq", raw)
    final = tmp_path / "remote/raw/170104_0200"
    ctx = make_context(config, "daq", runsdb, once=True)
    outage = threading.Event()
    real_renew = type(runsdb).renew

    def renew(self, claim, lease_s):
        if outage.is_set():
            raise RunsDBError("runs DB: renew: connection refused")
        return real_renew(self, claim, lease_s)

    monkeypatch.setattr(type(runsdb), "renew", renew)
    copying = threading.Thread(target=Daemon(ctx, [CopyPush]).run_pass,
                               kwargs={"wait_background": True})
    copying.start()
    try:
        scratch = wait_for_partial_bytes(final)
        with sshd.frozen_sessions():
            outage.set()
            expires = find_entry(runsdb.find_run(run_id), REMOTE)["lease_expires"]
            copying.join(30)  # the keeper stops the copy: the pass ends
            stopped_at = runsdb.now()
            assert not copying.is_alive(), "the copy was not stopped by its keeper"
            assert stopped_at < expires, "the copy outlived its lease"
            assert writers_of(scratch) == []  # every local process of the copy is gone
    finally:
        outage.clear()
        copying.join(60)
    ctx.transports.close_all()
    entry = find_entry(runsdb.find_run(run_id), REMOTE)
    assert entry["status"] != TRANSFERRED and "lease_owner" not in entry
    assert not final.exists()
    # The next pass (a new owner) completes the copy in a scratch of its own.
    monkeypatch.undo()
    advance_clock(runsdb, 3600)
    ctx = make_context(config, "daq", runsdb, once=True)
    assert Daemon(ctx, [CopyPush]).run_pass(wait_background=True).failed == 0
    ctx.transports.close_all()
    entry = find_entry(runsdb.find_run(run_id), REMOTE)
    assert entry["status"] == TRANSFERRED and scan_dataset(final) == scan_dataset(raw)
    assert entry["attempts"] == 2
