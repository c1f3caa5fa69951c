"""TapeUpload and TapeRestore on the runs DB, against the dsmc emulator: every failure mode
leaves the entry in the right state, nothing unproven is marked transferred, nothing is left
behind in staging or scratch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cax.checksum import dataset_checksum, legacy_dirhash, scan_dataset
from cax.clock import utcnow
from cax.runsdb import ERROR, TRANSFERRED, EntryKey, find_entry
from cax.tasks import run_task, select_tasks
from cax.tasks.tape import TapeRestore, TapeUpload
from tests.conftest import make_context, make_run, write_config

TAPE = EntryKey("tsm-server", "raw")
LOCAL = EntryKey("daq", "raw")


@pytest.fixture
def tape_config(tmp_path: Path, runsdb_uri: tuple[str, str], fake_tape: Any):
    """``daq`` backs up to ``tsm-server``; ``lab`` restores from it."""

    def make(timeout: float = 60, **tsm: Any) -> Path:
        for d in ("daq/raw", "daq/tsm", "lab/raw", "lab/tsm"):
            (tmp_path / d).mkdir(parents=True, exist_ok=True)
        setup = {"timeout": timeout, **tsm}
        sites = [
            {"name": "daq", "method": "local", "dir_raw": str(tmp_path / "daq/raw"),
             "dir_tsm": str(tmp_path / "daq/tsm"), "data_type": ["raw"],
             "upload_options": ["tsm-server"], "tsm": setup, "max_attempts": 3,
             "retry_backoff": 0},
            {"name": "lab", "method": "local", "dir_raw": str(tmp_path / "lab/raw"),
             "data_type": ["raw"], "download_options": ["tsm-server"], "tsm": setup},
            {"name": "tsm-server", "method": "tsm"},
        ]
        return write_config(tmp_path / "cax.json", sites, runs_db=runsdb_uri[0],
                            runs_db_name=runsdb_uri[1], lease_seconds=30)

    return make


def add_run(runsdb, tmp_path: Path, number: int, name: str, files: int = 3,
            legacy: bool = False) -> tuple[Any, Path]:
    location = tmp_path / "daq/raw" / name
    location.mkdir(parents=True)
    for i in range(files):
        (location / f"XENON1T-{number}-{i:09d}.zip").write_bytes(os.urandom(30_000))
    manifest = scan_dataset(location)
    checksum = legacy_dirhash(location) if legacy else dataset_checksum(manifest)
    runsdb.insert_runs([make_run(number, name=name, data=[
        {"host": "daq", "type": "raw", "status": TRANSFERRED, "location": str(location),
         "checksum": checksum, "creation_time": utcnow()}])])
    run_id = runsdb.find_runs({"number": number})[0]["_id"]
    if not legacy:
        runsdb.save_manifest(run_id, LOCAL, manifest, checksum, utcnow())
    return run_id, location


def entry(runsdb, run_id, key=TAPE):
    return find_entry(runsdb.find_runs({"_id": run_id})[0], key)


def in_thread(config: Path, host: str, db: Any) -> Any:
    """A context without background workers: tape work runs in the task, as in massive-tsm."""
    ctx = make_context(config, host, db)
    ctx.background.shutdown()
    ctx.background = None
    return ctx


def upload(config: Path, runsdb) -> Any:
    ctx = in_thread(config, "daq", runsdb)
    return run_task(TapeUpload(ctx), ctx)


def assert_clean(tmp_path: Path) -> None:
    assert os.listdir(tmp_path / "daq/tsm") == []
    assert [n for n in os.listdir(tmp_path / "lab/raw") if n.startswith(".")] == []


def test_original_task_names_select_the_tape_tasks():
    names = [t.name for t in select_tasks(("CopyPull", "CopyPush"))]
    assert "TapeUpload" in names and "TapeRestore" in names and "CopyPush" in names


def test_upload_registers_a_verified_tape_copy_then_restore_brings_it_back(
        tape_config, runsdb, tmp_path, fake_tape):
    config = tape_config()
    run_id, location = add_run(runsdb, tmp_path, 1, "170101_0000_MV")
    assert upload(config, runsdb).failed == 0
    tape = entry(runsdb, run_id)
    local = entry(runsdb, run_id, LOCAL)
    assert tape["status"] == TRANSFERRED and tape["checksum"] == local["checksum"]
    assert tape["location"] == str(tmp_path / "daq/tsm/170101_0000_MV")
    assert tape["tsm_prefix"] == "170101_0000_MV_" and tape["file_count"] == 3
    assert "lease_owner" not in tape
    assert_clean(tmp_path)
    calls_before = len(fake_tape.calls())
    assert upload(config, runsdb).done == 0  # already on tape: nothing selected, no dsmc
    assert len(fake_tape.calls()) == calls_before

    ctx = in_thread(config, "lab", runsdb)
    assert run_task(TapeRestore(ctx), ctx).failed == 0
    back = entry(runsdb, run_id, EntryKey("lab", "raw"))
    restored = tmp_path / "lab/raw/170101_0000_MV"
    assert back["status"] == TRANSFERRED and back["location"] == str(restored)
    assert back["checksum"] == local["checksum"]
    assert sorted(os.listdir(restored)) == sorted(os.listdir(location))
    assert_clean(tmp_path)


def test_legacy_sha512_entries_go_to_tape_and_come_back(tape_config, runsdb, tmp_path):
    config = tape_config()
    run_id, location = add_run(runsdb, tmp_path, 2, "170102_0000", legacy=True)
    assert upload(config, runsdb).failed == 0
    assert entry(runsdb, run_id)["status"] == TRANSFERRED
    # a tape entry as the original wrote it: its dirhash, no prefix recorded
    runsdb.runs.update_one({"_id": run_id, "data.host": "tsm-server"},
                           {"$set": {"data.$.checksum": legacy_dirhash(location)},
                            "$unset": {"data.$.tsm_prefix": ""}})
    ctx = in_thread(config, "lab", runsdb)
    assert run_task(TapeRestore(ctx), ctx).failed == 0
    assert sorted(os.listdir(tmp_path / "lab/raw/170102_0000")) == sorted(os.listdir(location))


FAILURES = [
    ({"incremental": ["reject"]}, "ANS1017E", "transient"),
    ({"incremental": ["skip"]}, "accounted for", "transient"),
    ({"incremental": ["warn"]}, "ANS1115W", "transient"),
    ({"incremental": ["hang"]}, "timed out", "transient"),
    ({"incremental": ["prompt"]}, "Please enter password", "permanent"),
    ({"incremental": ["nothing"]}, "nothing on tape", "transient"),
    ({"restore": ["corrupt"]}, "differ from what was backed up", "transient"),
    ({"incremental": ["garbage"]}, "unexpected output", "transient"),
]


@pytest.mark.parametrize("modes, reason, kind", FAILURES,
                         ids=[next(iter(m.values()))[0] for m, _, _ in FAILURES])
def test_each_emulator_failure_ends_in_error_and_leaves_nothing(
        tape_config, runsdb, tmp_path, fake_tape, modes, reason, kind):
    hang = any(m == "hang" for ms in modes.values() for m in ms)
    config = tape_config(timeout=5 if hang else 600)
    run_id, _ = add_run(runsdb, tmp_path, 3, "170103_0000")
    fake_tape.set(modes)
    assert upload(config, runsdb).failed == 1
    tape = entry(runsdb, run_id)
    assert tape["status"] == ERROR and reason in tape["error"]
    assert tape["error_kind"] == kind
    assert (tape["next_attempt"] is None) == (kind == "permanent")
    assert "lease_owner" not in tape and tape.get("checksum") is None
    assert runsdb.find_manifest(run_id, TAPE) is None
    assert_clean(tmp_path)


def test_a_failed_upload_is_retried_and_then_succeeds(tape_config, runsdb, tmp_path, fake_tape):
    config = tape_config()
    run_id, _ = add_run(runsdb, tmp_path, 4, "170104_0000")
    fake_tape.set({"incremental": ["reject"]})
    upload(config, runsdb)
    fake_tape.set()
    assert upload(config, runsdb).failed == 0
    tape = entry(runsdb, run_id)
    assert tape["status"] == TRANSFERRED and tape["attempts"] == 2


def test_duplicate_files_are_refused_for_good(tape_config, runsdb, tmp_path, fake_tape):
    config = tape_config()
    run_id, location = add_run(runsdb, tmp_path, 5, "170105_0000", files=2)
    data = (location / "XENON1T-5-000000000.zip").read_bytes()
    (location / "XENON1T-5-000000001.zip").write_bytes(data)
    manifest = scan_dataset(location)
    runsdb.runs.update_one({"_id": run_id, "data.host": "daq"},
                           {"$set": {"data.$.checksum": dataset_checksum(manifest)}})
    runsdb.save_manifest(run_id, LOCAL, manifest, dataset_checksum(manifest), utcnow())
    upload(config, runsdb)
    tape = entry(runsdb, run_id)
    assert tape["status"] == ERROR and "identical content" in tape["error"]
    assert tape["next_attempt"] is None and not fake_tape.calls()
    assert_clean(tmp_path)


def test_restore_of_a_corrupted_tape_copy_registers_nothing_good(tape_config, runsdb,
                                                                  tmp_path, fake_tape):
    config = tape_config()
    run_id, _ = add_run(runsdb, tmp_path, 6, "170106_0000")
    upload(config, runsdb)
    fake_tape.set({"restore": ["corrupt"]})
    ctx = in_thread(config, "lab", runsdb)
    assert run_task(TapeRestore(ctx), ctx).failed == 1
    back = entry(runsdb, run_id, EntryKey("lab", "raw"))
    assert back["status"] == ERROR and "do not match" in back["error"]
    assert not (tmp_path / "lab/raw/170106_0000").exists()
    assert_clean(tmp_path)


def test_tape_report_shows_volume_per_month_pending_and_failed(tape_config, runsdb, tmp_path,
                                                               fake_tape):
    from cax.config import load_config
    from cax.tape.report import tape_report

    config = tape_config()
    add_run(runsdb, tmp_path, 7, "170107_0000")
    upload(config, runsdb)
    add_run(runsdb, tmp_path, 8, "170108_0000")
    fake_tape.set({"incremental": ["reject"]})
    upload(config, runsdb)
    add_run(runsdb, tmp_path, 9, "170109_0000")
    report = tape_report(runsdb, load_config(config, "daq"))
    month = utcnow().strftime("%Y-%m")
    assert [(m.tape, m.month, m.datasets, m.bytes) for m in report.months] == [
        ("tsm-server", month, 1, 90_000)]
    assert [(r.run, r.status) for r in report.failed] == [("run 8 (170108_0000)", "error")]
    assert "ANS1017E" in report.failed[0].detail
    assert [(r.run, r.status) for r in report.pending] == [("run 9 (170109_0000)", "missing")]
    assert report.lines()[1].startswith("tsm-server")
    # the same through the CLI, as text and as JSON
    from click.testing import CliRunner

    from cax.cli import cli

    args = ["--config", str(config), "--host", "daq", "status", "--tape"]
    shown = CliRunner().invoke(cli, args)
    assert shown.exit_code == 0 and shown.output.splitlines() == report.lines(), shown.output
    as_json = CliRunner().invoke(cli, [*args, "--json"])
    assert '"pending"' in as_json.output and "170109_0000" in as_json.output


def test_purge_leaves_the_local_copy_alone_while_tape_reads_it(tape_config, runsdb, tmp_path):
    from cax.tasks.tape import UploadJob

    config = tape_config()
    run_id, _ = add_run(runsdb, tmp_path, 10, "170110_0000")
    ctx = in_thread(config, "daq", runsdb)
    run = runsdb.find_runs({"_id": run_id})[0]
    job = UploadJob(ctx, run, ctx.config.get_site("tsm-server"), find_entry(run, LOCAL))
    assert job.take_claim()
    assert entry(runsdb, run_id)["reading"] == {"host": "daq", "type": "raw"}
    assert runsdb.claim_purge(run_id, LOCAL, keep=(), owner="purger", lease_s=30) is None
    assert job.run()
    tape = entry(runsdb, run_id)
    assert tape["status"] == TRANSFERRED and "reading" not in tape
    assert runsdb.claim_purge(run_id, LOCAL, keep=((TAPE, {}),), owner="purger",
                              lease_s=30) is not None


def test_tape_counts_toward_min_copies_only_when_verified():
    import datetime as dt

    from cax.tasks.purge import PurgePolicy, decide_raw_purge

    policy = PurgePolicy("daq", 1, 0, frozenset(), frozenset({"daq", "tsm-server"}))
    checksum = "adler32:" + "0" * 64
    here = {"host": "daq", "type": "raw", "status": TRANSFERRED, "checksum": checksum}
    old = utcnow() - dt.timedelta(days=3)
    for status, tape_checksum, purge in ((TRANSFERRED, checksum, True),
                                         (ERROR, None, False),
                                         ("transferring", None, False),
                                         (TRANSFERRED, None, False)):
        tape = {"host": "tsm-server", "type": "raw", "status": status,
                "checksum": tape_checksum}
        run = make_run(1, start=old, data=[here, tape])
        assert decide_raw_purge(run, policy, utcnow()).purge is purge, (status, tape_checksum)


def test_a_lost_lease_kills_the_running_client_and_registers_nothing(tape_config, runsdb,
                                                                      tmp_path, fake_tape):
    import json
    import threading
    import time

    from cax.tasks.tape import UploadJob

    config = tape_config(timeout=120)
    data = json.loads(config.read_text())
    data["lease_seconds"] = 5
    config.write_text(json.dumps(data))
    run_id, _ = add_run(runsdb, tmp_path, 11, "170111_0000")
    fake_tape.set({"incremental": ["hang"]})
    ctx = in_thread(config, "daq", runsdb)
    run = runsdb.find_runs({"_id": run_id})[0]
    job = UploadJob(ctx, run, ctx.config.get_site("tsm-server"), find_entry(run, LOCAL))
    assert job.take_claim()

    def steal() -> None:  # another daemon takes the entry over
        deadline = time.monotonic() + 60
        while not any(c[0] == "incremental" for c in fake_tape.calls()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        runsdb.runs.update_one({"_id": run_id, "data.host": "tsm-server"},
                               {"$set": {"data.$.lease_owner": "other", "data.$.lease_token": "t"}})

    thief = threading.Thread(target=steal)
    thief.start()
    start = time.monotonic()
    assert not job.run()
    thief.join()
    assert time.monotonic() - start < 60  # killed by the keeper, not by the 120 s timeout
    tape = entry(runsdb, run_id)
    assert tape["status"] == "transferring" and tape["lease_owner"] == "other"
    assert "taken over" in job.result.detail
    assert_clean(tmp_path)


def test_a_stalled_legacy_tape_entry_is_redone(tape_config, runsdb, tmp_path):
    import datetime as dt

    from cax.tasks.stalled import RetryStalledTransfer

    config = tape_config()
    run_id, _ = add_run(runsdb, tmp_path, 12, "170112_0000")
    legacy = {"host": "tsm-server", "type": "raw", "status": "transferring",
              "location": "n/a", "checksum": None,
              "creation_time": utcnow() - dt.timedelta(days=3)}
    runsdb.runs.update_one({"_id": run_id}, {"$push": {"data": legacy}})
    ctx = in_thread(config, "daq", runsdb)
    run_task(RetryStalledTransfer(ctx), ctx)
    assert entry(runsdb, run_id)["status"] == ERROR
    assert upload(config, runsdb).failed == 0
    assert entry(runsdb, run_id)["status"] == TRANSFERRED


def test_disable_database_update_backs_up_and_writes_nothing(tape_config, runsdb, runsdb_uri,
                                                             tmp_path, fake_tape):
    from cax.runsdb import open_runsdb

    config = tape_config()
    run_id, location = add_run(runsdb, tmp_path, 13, "170113_0000")
    quiet = open_runsdb(*runsdb_uri, read_only=True)
    try:
        ctx = in_thread(config, "daq", quiet)
        assert run_task(TapeUpload(ctx), ctx).failed == 0
    finally:
        quiet.close()
    assert entry(runsdb, run_id) is None
    assert fake_tape.stored(str(tmp_path / "daq/tsm/170113_0000")).is_dir()
    assert_clean(tmp_path)


def test_the_daemon_runs_tape_work_in_its_background_workers(tape_config, runsdb, tmp_path):
    from cax.daemon import Daemon

    config = tape_config()
    run_id, _ = add_run(runsdb, tmp_path, 14, "170114_0000")
    ctx = make_context(config, "daq", runsdb, once=True)
    result = Daemon(ctx, [TapeUpload]).run_pass(wait_background=True)
    assert result.failed == 0
    assert entry(runsdb, run_id)["status"] == TRANSFERRED
    ctx.background.shutdown()
