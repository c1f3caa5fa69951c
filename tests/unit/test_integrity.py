"""Issue 7: the holes a review found in "nothing lost, nothing lied about", one test each.

Local sites and the embedded store; the SSH cases are in tests/integration/test_lease_safety.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from pathlib import Path

import pytest

from cax.checksum import dataset_checksum, scan_dataset
from cax.clock import utcnow
from cax.daemon import Daemon
from cax.errors import UnsafeNameError
from cax.runsdb import ERROR, TRANSFERRED, TRANSFERRING, EntryKey, find_entry
from cax.tasks import (
    CompareChecksums,
    CopyPush,
    PurgeProcessed,
    RetryBadChecksumTransfer,
    RetryStalledTransfer,
)
from cax.tasks.copyjob import CopyJob, make_plan
from cax.tasks.purge import PurgePolicy, decide_raw_purge
from tests.conftest import advance_clock, edit_site, make_context, make_run, set_entry
from tests.unit.housekeeping import copy_entry, make_dataset, make_sites

LAB = EntryKey("lab", "raw")


@pytest.fixture
def sites(tmp_path, runsdb_uri):
    """``daq`` pushes raw data to ``lab``; ``lab`` fetches from nowhere."""
    return make_sites(tmp_path, runsdb_uri,
                      daq={"data_type": ["raw"], "upload_options": ["lab"], "max_attempts": 3,
                           "reference_for": ["raw"]},
                      lab={"data_type": ["raw"], "max_attempts": 3})


def insert(runsdb, run) -> object:
    marker = f"test-{id(run)}"
    runsdb.insert_runs([{**run, "marker": marker}])
    return runsdb.find_runs({"marker": marker})[0]["_id"]


def pass_of(sites, host, runsdb, tasks, **kw):
    ctx = make_context(sites, host, runsdb, once=True, **kw)
    return Daemon(ctx, tasks).run_pass(wait_background=True)


def entry(runsdb, run_id, key=LAB):
    return find_entry(runsdb.find_run(run_id), key)


# -- item 2: a transfer never deletes another run's verified copy --------------------------------


def test_duplicate_run_documents_refused_and_no_data_touched(sites, runsdb, tmp_path, caplog):
    source = make_dataset(tmp_path / "daq/raw/170101_0100")
    good = make_dataset(tmp_path / "lab/raw/170101_0100", size=7)
    first = insert(runsdb, make_run(1, data=[copy_entry("daq", source)]))
    # the same run inserted twice by the DAQ; one copy already verified at lab
    second = insert(runsdb, make_run(1, data=[copy_entry("daq", source),
                                              copy_entry("lab", good)]))
    before = scan_dataset(good)
    with caplog.at_level(logging.ERROR):
        result = pass_of(sites, "daq", runsdb, [CopyPush])
    assert scan_dataset(good) == before
    assert entry(runsdb, first) is None and entry(runsdb, second)["status"] == TRANSFERRED
    assert result.failed >= 1
    assert any("duplicates" in r.getMessage() and str(second) in r.getMessage()
               for r in caplog.records)


def test_destination_held_by_another_runs_entry_is_not_removed(sites, runsdb, tmp_path):
    source = make_dataset(tmp_path / "daq/raw/170101_0200")
    other = make_dataset(tmp_path / "lab/raw/170101_0200", size=5)
    run_id = insert(runsdb, make_run(2, data=[copy_entry("daq", source)]))
    # another run (another detector's) claims the very path at lab
    insert(runsdb, make_run(3, name="170101_0300", detector="muon_veto",
                            data=[copy_entry("lab", other)]))
    before = scan_dataset(other)
    pass_of(sites, "daq", runsdb, [CopyPush])
    assert scan_dataset(other) == before
    got = entry(runsdb, run_id)
    assert got["status"] == ERROR and "holds the raw data of run 3" in got["error"]
    assert got["error_kind"] == "config" and got["next_attempt"] is None


def test_destination_name_derives_from_the_run_not_the_source_location(sites, runsdb,
                                                                       tmp_path):
    source = make_dataset(tmp_path / "daq/raw/some_other_name")
    run_id = insert(runsdb, make_run(4, data=[copy_entry("daq", source)]))
    pass_of(sites, "daq", runsdb, [CopyPush])
    assert entry(runsdb, run_id) is None  # refused before any claim
    assert not (tmp_path / "lab/raw/some_other_name").exists()


# -- items 3 and 4: purge --------------------------------------------------------------------


@pytest.mark.parametrize("checksum", [None, "n/a", "ADLER32:0000abcd", ":a:b:c", "md5:ff", 7])
def test_purge_counts_only_copies_with_a_checksum_cax_verifies(checksum):
    good = "adler32:" + "a" * 64
    run = make_run(1, start=utcnow() - dt.timedelta(days=30), data=[
        {"host": "a", "type": "raw", "status": TRANSFERRED, "checksum": good},
        {"host": "b", "type": "raw", "status": TRANSFERRED, "checksum": checksum}])
    policy = PurgePolicy("a", 1, 7, frozenset(), frozenset({"a", "b"}))
    decision = decide_raw_purge(run, policy, utcnow())  # never raises
    assert not decision.purge and "0 verified copies" in decision.reason


def test_purge_waits_while_a_push_reads_the_source(sites, runsdb, tmp_path):
    sites = edit_site(sites, "daq", purge=1, min_copies=1)
    source = make_dataset(tmp_path / "daq/raw/170101_0500")
    run_id = insert(runsdb, make_run(5, start=utcnow() - dt.timedelta(days=30), data=[
        copy_entry("daq", source),
        copy_entry("other", "/x/raw/170101_0500", like=source)]))
    sites = edit_site(sites, "daq", min_copies=1)
    # a push to lab is running: it reads daq's copy
    runsdb.claim(run_id, LAB, owner="pusher", lease_s=60, new_entry={},
                 fields={"status": TRANSFERRING, "reading": EntryKey("daq", "raw").match()})
    from cax.tasks import BufferPurger
    ctx = make_context(sites, "daq", runsdb)
    decision = decide_raw_purge(runsdb.find_run(run_id), BufferPurger(ctx).policy, utcnow())
    assert runsdb.claim_purge(run_id, EntryKey("daq", "raw"), keep=decision.keep, owner="p",
                              lease_s=60) is None
    assert source.is_dir()


# -- item 6: races are transient -------------------------------------------------------------


def test_source_vanished_during_copy_is_retried_not_stuck(sites, runsdb, tmp_path):
    source = make_dataset(tmp_path / "daq/raw/170101_0600")
    run_id = insert(runsdb, make_run(6, data=[copy_entry("daq", source)]))
    for path in sorted(source.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    source.rmdir()
    pass_of(sites, "daq", runsdb, [CopyPush])
    got = entry(runsdb, run_id)
    assert got["status"] == ERROR and got["error_kind"] == "transient"
    assert got["attempts"] == 1 and got["next_attempt"] is not None


# -- item 7: a version's folder is exact ------------------------------------------------------


def test_processed_entry_in_another_versions_folder_is_refused(tmp_path, runsdb_uri, runsdb):
    sites = make_sites(tmp_path, runsdb_uri, a={"data_type": ["processed"],
                                                "processor_version": "v6.10.0",
                                                "pax_version_purge": "v6.9.1"})
    newer = make_dataset(tmp_path / "a/processed/pax_v6.10.0/170101_0700.root")
    old_entry = copy_entry("a", newer, data_type="processed", version="v6.9.1")
    new_entry = copy_entry("a", newer, data_type="processed", version="v6.10.0")
    insert(runsdb, make_run(7, data=[old_entry, new_entry]))
    result = pass_of(sites, "a", runsdb, [PurgeProcessed])
    assert newer.is_dir() and result.failed == 1


# -- item 8: nothing stuck in silence ----------------------------------------------------------


def test_repair_that_died_on_its_last_attempt_is_recorded_and_reported(sites, runsdb, tmp_path,
                                                                        caplog):
    lab = make_dataset(tmp_path / "lab/raw/170101_0800")
    daq = make_dataset(tmp_path / "daq/raw/170101_0800")
    run_id = insert(runsdb, make_run(8, data=[copy_entry("daq", daq), copy_entry(
        "lab", lab, status=TRANSFERRING, checksum_problem="daq", attempts=3,
        expected_checksum=dataset_checksum(scan_dataset(daq)), lease_owner="dead",
        lease_token="0badf00d", lease_expires=utcnow() - dt.timedelta(minutes=5))]))
    sites = edit_site(sites, "lab", download_options=["daq"])
    with caplog.at_level(logging.WARNING):
        pass_of(sites, "lab", runsdb, [RetryBadChecksumTransfer, RetryStalledTransfer])
    got = entry(runsdb, run_id)
    assert got["status"] == ERROR and got["error_kind"] == "permanent"
    assert "gave up after 3 attempt(s)" in got["error"] and got["next_attempt"] is None
    messages = [r.getMessage() for r in caplog.records]
    assert any("took over raw at lab from dead" in m for m in messages)
    assert any("stuck entr" in m and "gave up" in m for m in messages)
    assert lab.is_dir()


def test_lease_less_transferring_entry_without_creation_time_is_reset(sites, runsdb, tmp_path):
    run_id = insert(runsdb, make_run(9, data=[
        {"host": "daq", "type": "raw", "status": TRANSFERRING,
         "location": str(tmp_path / "daq/raw/170101_0900")}]))
    pass_of(sites, "daq", runsdb, [RetryStalledTransfer])
    got = entry(runsdb, run_id, EntryKey("daq", "raw"))
    assert got["status"] == ERROR and got["next_attempt"] is not None


def test_config_error_retried_once_the_configuration_changes(sites, runsdb, tmp_path):
    source = make_dataset(tmp_path / "daq/raw/170101_1000")
    run_id = insert(runsdb, make_run(10, data=[copy_entry("daq", source)]))
    (tmp_path / "lab/raw").rename(tmp_path / "lab/raw-missing")
    (tmp_path / "lab/raw").write_text("a file where the directory should be")
    broken = edit_site(sites, "lab", dir_raw=str(tmp_path / "lab/raw/sub"))
    pass_of(broken, "daq", runsdb, [CopyPush])
    got = entry(runsdb, run_id)
    assert got["status"] == ERROR and got["next_attempt"] is None, got
    pass_of(broken, "daq", runsdb, [RetryStalledTransfer, CopyPush])
    assert entry(runsdb, run_id)["status"] == ERROR  # same configuration: still waits
    (tmp_path / "lab/raw").unlink()
    (tmp_path / "lab/raw-missing").rename(tmp_path / "lab/raw")
    fixed = edit_site(sites, "lab", dir_raw=str(tmp_path / "lab/raw"))
    pass_of(fixed, "daq", runsdb, [RetryStalledTransfer, CopyPush])
    got = entry(runsdb, run_id)
    assert got["status"] == TRANSFERRED, got


def test_stuck_push_reported_by_the_source_sites_daemon(sites, runsdb, tmp_path, caplog):
    run_id = insert(runsdb, make_run(11, data=[
        copy_entry("daq", make_dataset(tmp_path / "daq/raw/170101_1100")),
        {"host": "lab", "type": "raw", "status": ERROR, "source": "daq",
         "error": "push refused by lab", "attempts": 3, "next_attempt": None,
         "location": str(tmp_path / "lab/raw/170101_1100")}]))
    with caplog.at_level(logging.WARNING):
        pass_of(sites, "daq", runsdb, [RetryStalledTransfer])
    assert any("push refused by lab" in r.getMessage() for r in caplog.records), run_id


# -- item 12: honest exit codes ---------------------------------------------------------------


def test_once_fails_after_a_refused_location(sites, runsdb, tmp_path):
    insert(runsdb, make_run(12, data=[copy_entry("daq", "/etc/passwd/../shadow")]))
    assert Daemon(make_context(sites, "daq", runsdb), [CopyPush]).run(once=True) == 1


# -- item 13: a copy never writes or removes its own source -------------------------------------


def test_copy_into_its_own_source_is_refused(sites, runsdb, tmp_path):
    source = make_dataset(tmp_path / "daq/raw/170101_1300")
    run_id = insert(runsdb, make_run(13, data=[copy_entry("daq", source)]))
    ctx = make_context(sites, "daq", runsdb)
    run = runsdb.find_run(run_id)
    same_dir = dataclasses.replace(ctx.config.get_site("lab"), dir_raw=str(tmp_path / "daq/raw"))
    plan = make_plan(run, "run 13", "raw", None, ctx.site, find_entry(run, EntryKey("daq", "raw")),
                     same_dir, push=True)
    job = CopyJob(ctx, plan, None, None)  # type: ignore[arg-type]
    with pytest.raises(UnsafeNameError, match="overlaps the source"):
        job.refuse_own_source()


# -- item 15: the repair of a pushed copy re-fetches only the bad files --------------------------


def test_bad_pushed_copy_repaired_by_the_pushing_site_file_by_file(sites, runsdb, tmp_path,
                                                                     monkeypatch):
    daq = make_dataset(tmp_path / "daq/raw/170101_1500", files=10)
    lab = make_dataset(tmp_path / "lab/raw/170101_1500", files=10)
    bad = sorted(p for p in lab.rglob("*") if p.is_file())[4]
    bad.write_bytes(b"rotten" + bad.read_bytes()[6:])
    expected = dataset_checksum(scan_dataset(daq))
    run_id = insert(runsdb, make_run(15, data=[copy_entry("daq", daq), copy_entry(
        "lab", lab, status=ERROR, checksum_problem="daq", expected_checksum=expected,
        checksum=expected, attempts=0, next_attempt=utcnow() - dt.timedelta(minutes=1))]))
    untouched = {p: p.stat().st_ino for p in lab.rglob("*") if p.is_file() and p != bad}
    sent = []
    from cax.transport.local import LocalTransport
    real_put = LocalTransport.put

    def put(self, local, remote, progress=None):
        sent.append(Path(local).name)
        return real_put(self, local, remote, progress)

    monkeypatch.setattr(LocalTransport, "put", put)
    pass_of(sites, "daq", runsdb, [CopyPush])  # lab has no daemon that could fetch
    got = entry(runsdb, run_id)
    assert got["status"] == TRANSFERRED and got["checksum"] == expected, got
    assert sent == [bad.name]
    assert {p: p.stat().st_ino for p in lab.rglob("*") if p.is_file() and p != bad} == untouched


def test_advance_clock_helper_moves_the_db_clock(runsdb):
    before = runsdb.now()
    advance_clock(runsdb, 3600)
    assert runsdb.now() - before >= dt.timedelta(seconds=3599)


def test_once_fails_after_any_error_line(sites, runsdb, tmp_path):
    """Issue 7 item 12: an ERROR line that no task counted still makes ``--once`` exit 1."""
    here = make_dataset(tmp_path / "lab/raw/170101_1201")
    insert(runsdb, make_run(12, name="170101_1201", data=[  # a dispute: logged, not a failure
        copy_entry("lab", here, evidence="self"),
        {"host": "daq", "type": "raw", "status": TRANSFERRED, "evidence": "self",
         "checksum": "adler32:" + "0" * 64, "location": "/x/170101_1201"}]))
    ctx = make_context(sites, "lab", runsdb)
    assert Daemon(ctx, [CompareChecksums]).run(once=True) == 1


def test_stalled_legacy_pull_resumes_from_the_bytes_it_left(sites, runsdb, tmp_path):
    """Issue 11 item 7: a stalled transfer of the original keeps its bytes for rsync."""
    source = make_dataset(tmp_path / "daq/raw/170101_1600", files=4)
    half = tmp_path / "lab/raw/170101_1600"
    half.mkdir(parents=True)
    first = sorted(p for p in source.rglob("*") if p.is_file())[1]
    (half / first.name).write_bytes(first.read_bytes())  # what the original got across
    run_id = insert(runsdb, make_run(16, data=[copy_entry("daq", source), {
        "host": "lab", "type": "raw", "status": TRANSFERRING, "location": str(half),
        "creation_time": utcnow() - dt.timedelta(days=3)}]))
    import os
    old = utcnow().timestamp() - 3 * 86400
    os.utime(half / first.name, (old, old))
    os.utime(half, (old, old))
    pass_of(sites, "lab", runsdb, [RetryStalledTransfer])
    assert entry(runsdb, run_id)["partial"] == str(half)


# -- attempt counts: what the log says is what the runs DB holds ---------------------------------


def _attempts_said(caplog) -> list[int]:
    import re

    said = []
    for record in caplog.records:
        found = re.search(r"attempt (\d+) of \d+ failed|failed on attempt (\d+)|"
                          r"gave up after (\d+) attempt|none left after (\d+)",
                          record.getMessage())
        if found:
            said.append(int(next(g for g in found.groups() if g)))
    return said


def test_attempt_counts_in_messages_are_the_runs_dbs(sites, runsdb, tmp_path, caplog):
    """Each failure's message, the stored ``attempts`` and the stuck reason agree, up to the
    limit, and a takeover of the last attempt does not count one attempt more than it says."""
    from cax.admin.status import run_view
    from cax.runsdb.stuck import error_reason

    sites = edit_site(sites, "daq", max_attempts=2)
    source = tmp_path / "daq/raw/170101_1400"  # registered, but gone: a transient failure
    run_id = insert(runsdb, make_run(14, data=[copy_entry("daq", source,
                                                          checksum="adler32:" + "1" * 64)]))
    for expected in (1, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            pass_of(sites, "daq", runsdb, [CopyPush])
        got = entry(runsdb, run_id)
        assert _attempts_said(caplog) == [expected] == [got["attempts"]]
        advance_clock(runsdb, 3600)
    assert error_reason(got, 2)[1].startswith("2 attempt(s), none left (max_attempts 2)")
    shown = [e for e in run_view(runsdb, number=14)[0]["data"] if e["site"] == "lab"]
    assert shown[0]["attempts"] == 2

    set_entry(runsdb, run_id, LAB, {"status": TRANSFERRING, "lease_owner": "dead",
                                    "lease_token": "0badf00d",
                                    "lease_expires": runsdb.now() - dt.timedelta(minutes=5)})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pass_of(sites, "daq", runsdb, [CopyPush])
    got = entry(runsdb, run_id)
    assert got["status"] == ERROR and "gave up after 2 attempt(s)" in got["error"]
    assert _attempts_said(caplog) == [2, 2] and got["attempts"] == 2


def test_a_stored_origin_whose_checksum_cax_cannot_verify_is_described_not_a_crash():
    """An origin written by hand or another tool with a checksum of a kind cax does not know:
    describing its judgement (the logs, the ``disputed`` field) must not raise TypeError."""
    from cax.runsdb.origins import judge

    run = make_run(1, origins=[{"type": "raw", "checksum": "md5:0123456789abcdef0123",
                                "host": "daq", "evidence": "producer"}])
    judgement = judge(run, "raw", None)
    assert judgement.stored
    assert judgement.describe() == \
        "origin md5:0123456789abcdef... at daq (recorded by its producer)"
