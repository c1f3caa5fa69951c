"""cax retry on each kind of stuck entry: the entry becomes retryable, and the next pass of the
site that owns the work completes it (local copy path, real files, real checksums)."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import pytest
from click.testing import CliRunner

from cax.checksum import dataset_checksum, scan_dataset
from cax.cli import cli
from cax.clock import utcnow
from cax.daemon import Daemon
from cax.runsdb import ERROR, PURGING, TRANSFERRED, TRANSFERRING, VERIFYING, EntryKey, find_entry
from cax.tasks import select_tasks
from tests.admin_seed import set_entry
from tests.conftest import make_context
from tests.integration.conftest import make_dataset, register

DEAD_OWNER = "lab@gone:999:1"


def cax(config, *args):
    return CliRunner().invoke(cli, ["--config", str(config), "--host", "daq", *args])


def one_pass(config, site, runsdb):
    ctx = make_context(config, site, runsdb, once=True)
    try:
        return Daemon(ctx, select_tasks(None)).run_pass(wait_background=True)
    finally:
        if ctx.transports:
            ctx.transports.close_all()
        ctx.background.shutdown()


def lab_entry(runsdb, run_id):
    return find_entry(runsdb.find_run(run_id), EntryKey("lab", "raw"))


def stuck_lab_copy(runsdb, run_id, tmp_path, **state):
    """Give the run a lab entry in a stuck state, as a failed push from daq leaves it."""
    now = utcnow()
    entry = {"host": "lab", "type": "raw", "location": str(tmp_path / "lab/raw/x"),
             "checksum": None, "source": "daq", "creation_time": now, **state}
    entry["location"] = str(tmp_path / "lab/raw" / runsdb.find_run(run_id)["name"])
    assert runsdb.add_entry(run_id, entry)


STUCK_COPIES = {
    "attempts used up": {"status": ERROR, "attempts": 5, "next_attempt": None,
                         "error": "No space left on device"},
    "permanent error": {"status": ERROR, "attempts": 1, "next_attempt": None,
                        "error_kind": "permanent", "error": "Permission denied"},
    "config error": {"status": ERROR, "attempts": 1, "next_attempt": None,
                     "error_kind": "config", "error": "no dir_raw"},
    "lease of a dead daemon": {"status": TRANSFERRING, "attempts": 5,
                               "lease_owner": DEAD_OWNER},
}


@pytest.mark.parametrize("kind", sorted(STUCK_COPIES))
def test_retried_copy_completes_in_the_next_pass(kind, two_sites, runsdb, tmp_path):
    raw = tmp_path / "daq/raw/170105_0100"
    make_dataset(raw, files=2)
    run_id = register(runsdb, 1, "daq", raw)
    state = dict(STUCK_COPIES[kind])
    if state["status"] == TRANSFERRING:
        state["lease_expires"] = utcnow() - dt.timedelta(minutes=5)
    stuck_lab_copy(runsdb, run_id, tmp_path, **state)
    listed = json.loads(cax(two_sites, "status", "--stuck", "--json").stdout)
    assert [(e["run"], e["site"]) for e in listed] == [(1, "lab")]
    # the command printed is the one that works
    command = listed[0]["command"].split(" retry ", 1)[1].split()
    dry = cax(two_sites, "retry", *command, "--dry-run")
    assert dry.exit_code == 0 and "would retry run 1" in dry.stdout
    assert lab_entry(runsdb, run_id)["status"] == state["status"]  # dry run changed nothing

    result = cax(two_sites, "retry", *command)
    assert result.exit_code == 0, result.output
    assert "retryable at the next pass: run 1 (170105_0100) raw at lab" in result.stdout
    entry = lab_entry(runsdb, run_id)
    assert entry["history"][-1]["event"] == "retry"
    assert "(cax retry)" in entry["history"][-1]["by"]
    assert json.loads(cax(two_sites, "status", "--stuck", "--json").stdout) == []

    one_pass(two_sites, "daq", runsdb)  # daq pushes to lab
    entry = lab_entry(runsdb, run_id)
    assert entry["status"] == TRANSFERRED, entry
    assert entry["checksum"] == dataset_checksum(scan_dataset(raw))


def test_retried_purge_of_a_dead_daemon_is_finished(two_sites, runsdb, tmp_path):
    raw = tmp_path / "daq/raw/170105_0200"
    make_dataset(raw, files=2)
    run_id = register(runsdb, 2, "daq", raw)
    key = EntryKey("daq", "raw")
    expired = utcnow() - dt.timedelta(minutes=5)
    set_entry(runsdb, run_id, key, {"status": PURGING, "lease_owner": "daq@gone:1:1",
                                             "lease_expires": expired})
    assert cax(two_sites, "retry", "--all-stuck").exit_code == 0
    entry = find_entry(runsdb.find_run(run_id), key)
    assert entry["status"] == PURGING and "lease_owner" not in entry
    one_pass(two_sites, "daq", runsdb)
    assert find_entry(runsdb.find_run(run_id), key) is None
    assert not raw.exists()


def test_retried_checksum_mismatch_is_verified_again(two_sites, runsdb, tmp_path):
    """AddChecksum found the DAQ's data differing from its registered checksum (stuck, data
    kept); once the data are restored, a retry sends it back to verifying."""
    raw = tmp_path / "daq/raw/170105_0300"
    make_dataset(raw, files=2)
    good = tmp_path / "good"
    shutil.copytree(raw, good)
    checksum = dataset_checksum(scan_dataset(raw))
    (raw / "f001.zip").write_bytes(b"damaged")
    assert cax(two_sites, "run", "add", "--number", "3", "--location", str(raw),
               "--checksum", checksum).exit_code == 0
    run_id = runsdb.find_runs({"number": 3})[0]["_id"]
    key = EntryKey("daq", "raw")
    set_entry(runsdb, run_id, key, {"status": VERIFYING})  # as the DAQ would leave it
    one_pass(two_sites, "daq", runsdb)
    entry = find_entry(runsdb.find_run(run_id), key)
    assert entry["status"] == ERROR
    assert entry["error"].startswith("data do not match the registered checksum")
    shutil.rmtree(raw)
    shutil.copytree(good, raw)
    result = cax(two_sites, "retry", "--run", "3", "--site", "daq")
    assert result.exit_code == 0, result.output
    assert find_entry(runsdb.find_run(run_id), key)["status"] == VERIFYING
    one_pass(two_sites, "daq", runsdb)
    entry = find_entry(runsdb.find_run(run_id), key)
    assert entry["status"] == TRANSFERRED and entry["checksum"] == checksum


def test_retry_never_touches_a_live_lease_or_a_good_copy(two_sites, runsdb, tmp_path):
    raw = tmp_path / "daq/raw/170105_0400"
    make_dataset(raw, files=1)
    run_id = register(runsdb, 4, "daq", raw)
    stuck_lab_copy(runsdb, run_id, tmp_path, status=TRANSFERRING, lease_owner="lab@vm:1:1",
                   lease_expires=utcnow() + dt.timedelta(minutes=5))
    result = cax(two_sites, "retry", "--run", "4")
    assert result.exit_code == 0
    assert "left run 4 (170105_0400) raw at daq: transferred, not stuck" in result.stdout
    assert "left run 4 (170105_0400) raw at lab: transferring, not stuck" in result.stdout
    assert lab_entry(runsdb, run_id)["lease_owner"] == "lab@vm:1:1"
    assert raw.is_dir()
