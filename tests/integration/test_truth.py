"""Nothing lied about, by any writer (issue 17): each test is a path by which a writer once told
the runs DB something false, after which correct machinery deleted or overwrote real data.

They go through the commands and passes a site runs (local sites, real files, the embedded
store), so each fails on the code before the fix as well as guarding it after.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cax.checksum import dataset_checksum, scan_dataset
from cax.cli import cax_rm, cli
from cax.daemon import Daemon
from cax.errors import RunsDBError
from cax.runsdb import ERROR, TRANSFERRED, TRANSFERRING, VERIFYING, EntryKey, RunsDB, find_entry
from cax.tasks import select_tasks
from tests.conftest import make_context, make_run, write_config
from tests.integration.conftest import make_dataset

RAW_DAQ = EntryKey("daq", "raw")
RAW_LAB = EntryKey("lab", "raw")


def cax(config, *args, host="daq"):
    return CliRunner().invoke(cli, ["--config", str(config), "--host", host, *args])


def one_pass(config, site, runsdb, tasks=None):
    ctx = make_context(config, site, runsdb, once=True)
    try:
        return Daemon(ctx, select_tasks(tasks)).run_pass(wait_background=True)
    finally:
        if ctx.transports:
            ctx.transports.close_all()
        for pool in (ctx.background, getattr(ctx, "jobs", None)):
            if pool is not None:
                pool.shutdown()
        if getattr(ctx, "close_batch", None):
            ctx.close_batch()
        elif ctx.batch:
            ctx.batch.close()


def entry(runsdb, number, key):
    return find_entry(runsdb.find_runs({"number": number})[0], key)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def dirhash(path: Path) -> str:
    """The original cax's sha512 dirhash, computed independently of cax."""
    if path.is_file():
        return hashlib.sha512(path.read_bytes()).hexdigest()
    digest = hashlib.sha512()
    for h in sorted(hashlib.sha512(p.read_bytes()).hexdigest() for p in path.rglob("*")
                    if p.is_file()):
        digest.update(h.encode())
    return digest.hexdigest()


# -- 1. one run registered on another run's data ------------------------------------------------


def test_run_add_refuses_another_runs_data_by_location_and_by_json(two_sites, runsdb,
                                                                   tmp_path):
    """``run add`` of run 2 on run 1's directory exited 0; AddChecksum then registered run 2
    with run 1's bytes, and purge later deleted them under it."""
    first = tmp_path / "daq/raw/170101_0000"
    make_dataset(first, files=2, size=1000)
    assert cax(two_sites, "run", "add", "--number", "1", "--location", str(first)).exit_code == 0
    before = runsdb.find_runs({})
    wrong_name = cax(two_sites, "run", "add", "--number", "2", "--name", "170102_0000",
                     "--location", str(first))
    assert wrong_name.exit_code == 2, wrong_name.output
    assert wrong_name.stderr.count("\n") == 1 and "does not belong to run 2" in wrong_name.stderr
    same_name = cax(two_sites, "run", "add", "--number", "2", "--detector", "tpc",
                    "--location", str(first) + "/")
    assert same_name.exit_code != 0 and "already" in same_name.stderr
    doc = tmp_path / "run2.json"
    doc.write_text(json.dumps([{"number": 2, "name": "170102_0000", "start": "2017-01-02",
                                "data": [{"host": "daq", "type": "raw", "status": "verifying",
                                          "location": str(first)}]}]))
    by_json = cax(two_sites, "run", "add", "--json", str(doc))
    assert by_json.exit_code != 0 and "does not belong to run 2" in by_json.stderr
    assert runsdb.find_runs({}) == before  # nothing written by any of them
    one_pass(two_sites, "daq", runsdb, ["AddChecksum"])
    assert runsdb.count_runs({}) == 1 and entry(runsdb, 1, RAW_DAQ)["status"] == TRANSFERRED


@pytest.mark.parametrize("make, why", [
    (lambda raw: (raw / "170103_0000").mkdir(), "is empty"),
    (lambda raw: make_dataset(raw / "lost+found", files=1, size=10), r"lost\+found"),
    (lambda raw: make_dataset(raw / ".170103_0000", files=1, size=10), "hidden|unsafe"),
    (lambda raw: make_dataset(raw / "170103_0000.bak", files=1, size=10), "backup"),
    (lambda raw: (raw / "170103_0000").symlink_to(raw.parent.parent), "outside the data"),
])
def test_run_add_refuses_what_is_not_a_run(two_sites, runsdb, tmp_path, make, why):
    raw = tmp_path / "daq/raw"
    make(raw)
    (target,) = [p for p in raw.iterdir()]
    result = cax(two_sites, "run", "add", "--number", "3", "--name", "170103_0000",
                 "--location", str(target))
    assert result.exit_code == 2 and re.search(why, result.stderr), result.output
    assert result.stderr.count("\n") == 1 and runsdb.count_runs({}) == 0
    from_dir = cax(two_sites, "run", "add", "--from-dir", str(raw))
    assert from_dir.exit_code == 0 and re.search(why, from_dir.stdout), from_dir.output
    assert runsdb.count_runs({}) == 0


def test_run_add_dry_run_and_match_write_nothing_then_register(two_sites, runsdb, tmp_path):
    raw = tmp_path / "daq/raw"
    for name in ("170104_0000", "170104_0100", "calibration"):
        make_dataset(raw / name, files=1, size=10)
    dry = cax(two_sites, "run", "add", "--from-dir", str(raw), "--match", "1701*", "--dry-run")
    assert dry.exit_code == 0 and dry.stdout.count("would register") == 2, dry.output
    assert runsdb.count_runs({}) == 0
    real = cax(two_sites, "run", "add", "--from-dir", str(raw), "--match", "1701*")
    assert real.exit_code == 0 and runsdb.count_runs({}) == 2


def test_rm_force_never_deletes_another_runs_copy_and_run_remove_keeps_data(two_sites, runsdb,
                                                                          tmp_path):
    """Removing a mistaken registration with ``cax-rm --force`` deleted the other run's copy
    while that run's entry still said ``transferred``; ``cax run remove`` unregisters it and
    leaves the data alone."""
    data = tmp_path / "daq/raw/170101_0000"
    make_dataset(data, files=2, size=1000)
    checksum = dataset_checksum(scan_dataset(data))
    good = {"host": "daq", "type": "raw", "status": TRANSFERRED, "location": str(data),
            "checksum": checksum}
    runsdb.insert_runs([make_run(1, name="170101_0000", data=[good]),
                        make_run(2, name="170102_0000", data=[dict(good)])])  # the old bug's
    content = tree(data)
    removed = CliRunner().invoke(cax_rm, ["--location", str(data), "--run", "2", "--force",
                                          "--config", str(two_sites), "--host", "daq"])
    assert removed.exit_code == 2 and "also the location of run 1" in removed.stderr
    assert tree(data) == content and entry(runsdb, 1, RAW_DAQ)["status"] == TRANSFERRED
    unregistered = cax(two_sites, "run", "remove", "--run", "2")
    assert unregistered.exit_code == 0, unregistered.output
    assert entry(runsdb, 2, RAW_DAQ) is None and entry(runsdb, 1, RAW_DAQ) is not None
    assert tree(data) == content


# -- 2. a corrupt copy became the judge --------------------------------------------------------


def test_a_corrupt_reference_copy_never_overwrites_a_copy_whose_checksum_verifies(
        tmp_path, runsdb_uri, runsdb):
    """Legacy processed data, the original's config: the first reference site's copy was
    corrupt and was checksummed from disk as it was; the next site then "repaired" its good
    copy -- whose recorded sha512 verified on disk -- with the corrupt bytes."""
    sites = []
    for name in ("ref", "other"):
        (tmp_path / name / "processed/pax_v1").mkdir(parents=True)
        sites.append({"name": name, "method": "local", "data_type": ["processed"],
                      "dir_processed": str(tmp_path / name / "processed"),
                      "processor_version": "v1", "scrub_after_days": 0,
                      "download_options": ["other" if name == "ref" else "ref"],
                      **({"reference_for": ["processed"]} if name == "ref" else {})})
    config = write_config(tmp_path / "cax.json", sites, runs_db=runsdb_uri[0],
                          runs_db_name=runsdb_uri[1], lease_seconds=30)
    good = tmp_path / "other/processed/pax_v1/170101_0000.root"
    good.write_bytes(os.urandom(5000))
    corrupt = tmp_path / "ref/processed/pax_v1/170101_0000.root"
    corrupt.write_bytes(good.read_bytes()[:2000] + b"X" + good.read_bytes()[2001:])
    vouched = dirhash(good)
    runsdb.insert_runs([make_run(1, name="170101_0000", data=[
        {"host": "ref", "type": "processed", "pax_version": "v1", "status": TRANSFERRED,
         "location": str(corrupt), "checksum": None},  # the original registered no checksum
        {"host": "other", "type": "processed", "pax_version": "v1", "status": TRANSFERRED,
         "location": str(good), "checksum": vouched}])])
    original = good.read_bytes()
    for _ in range(3):
        for site in ("ref", "other"):
            one_pass(config, site, runsdb)
    processed = EntryKey("other", "processed", "v1")
    assert good.read_bytes() == original  # never overwritten
    assert entry(runsdb, 1, processed)["checksum"] == vouched
    assert corrupt.read_bytes() == original  # the corrupt copy was the one repaired


# -- 3 and 4. processing: a retry, and a job that exits 0 with nothing ---------------------------


def processing_sites(tmp_path, runsdb_uri, command, **processing):
    for sub in ("lab/raw", "lab/processed", "jobs"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    section = {"command": command, "version": "v1", "jobs_dir": str(tmp_path / "jobs"),
               "timeout": 300, **processing}
    lab = {"name": "lab", "method": "local", "dir_raw": str(tmp_path / "lab/raw"),
           "dir_processed": str(tmp_path / "lab/processed"), "data_type": ["raw"],
           "retry_backoff": 0, "max_attempts": 1, "processing": section}
    return write_config(tmp_path / "cax.json", [lab], runs_db=runsdb_uri[0],
                        runs_db_name=runsdb_uri[1], lease_seconds=30)


REFERENCE = ["{python}", "-m", "cax.processors.reference", "{input}", "{output}"]


def raw_run(tmp_path, runsdb, number=1):
    data = tmp_path / f"lab/raw/17010{number}_0000"
    make_dataset(data, files=2, size=1000)
    runsdb.insert_runs([make_run(number, name=data.name, data=[
        {"host": "lab", "type": "raw", "status": VERIFYING, "location": str(data)}])])
    return data


def test_retry_of_a_failed_processed_entry_submits_the_job_again(tmp_path, runsdb_uri,
                                                                 runsdb):
    """``cax retry`` turned a failed processed entry into ``verifying``: no job ran, and
    AddChecksum registered whatever bytes sat at the output path."""
    config = processing_sites(tmp_path, runsdb_uri, [sys.executable, "-c", "raise SystemExit(3)",
                                                     "{output}"])
    raw_run(tmp_path, runsdb)
    one_pass(config, "lab", runsdb, ["AddChecksum", "ProcessBatchQueue"])
    key = EntryKey("lab", "processed", "v1")
    assert entry(runsdb, 1, key)["status"] == ERROR
    garbage = tmp_path / "lab/processed/pax_v1/170101_0000.root"
    garbage.write_bytes(b"whatever sat there")
    data = json.loads(config.read_text())
    data["sites"][0]["processing"]["command"] = REFERENCE
    config.write_text(json.dumps(data))
    result = cax(config, "retry", "--run", "1", "--site", "lab", "--type", "processed",
                 host="lab")
    assert result.exit_code == 0, result.output
    assert entry(runsdb, 1, key)["status"] != VERIFYING
    one_pass(config, "lab", runsdb, ["AddChecksum", "ProcessBatchQueue"])
    done = entry(runsdb, 1, key)
    assert done["status"] == TRANSFERRED and done.get("job_id")
    assert json.loads(garbage.read_text())["processor"] == "cax.processors.reference"
    assert done["checksum"] == dataset_checksum(scan_dataset(garbage))


@pytest.mark.parametrize("code, why", [
    ("open(sys.argv[1], 'w').close()", "empty"),
    ("open(sys.argv[1], 'w').write('not the reference format')", "refused by the validator"),
])
def test_a_job_that_exits_0_without_a_good_output_is_not_registered(tmp_path, runsdb_uri,
                                                                    runsdb, code, why):
    """A processing job that exited 0 and wrote an empty file was registered ``transferred``."""
    config = processing_sites(tmp_path, runsdb_uri,
                              [sys.executable, "-c", f"import sys; {code}", "{output}"],
                              validate=["{python}", "-m", "cax.processors.reference",
                                        "--validate", "{output}"])
    raw_run(tmp_path, runsdb)
    one_pass(config, "lab", runsdb, ["AddChecksum", "ProcessBatchQueue"])
    got = entry(runsdb, 1, EntryKey("lab", "processed", "v1"))
    assert got["status"] == ERROR and why in got["error"], got
    assert not (tmp_path / "lab/processed/pax_v1/170101_0000.root").exists()


# -- 5. processing's lease is kept while its job runs, whatever the passes ------------------------


def test_a_running_jobs_lease_is_kept_between_passes(tmp_path, runsdb_uri, runsdb):
    """Leases of processing were renewed once per pass: with passes further apart than the
    lease, a running job's lease lapsed and another daemon took the run over."""
    gate = tmp_path / "gate"
    code = (f"import os, sys, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.05)\n"
            "sys.argv = ['ref', sys.argv[1], sys.argv[2]]\nimport runpy\n"
            "runpy.run_module('cax.processors.reference', run_name='__main__')")
    config = processing_sites(tmp_path, runsdb_uri,
                              [sys.executable, "-c", code, "{input}", "{output}"])
    data = json.loads(config.read_text())
    data["lease_seconds"] = 5
    config.write_text(json.dumps(data))
    raw_run(tmp_path, runsdb)
    one_pass(config, "lab", runsdb, ["AddChecksum"])
    ctx = make_context(config, "lab", runsdb)
    other = make_context(config, "lab", runsdb)
    other.owner += "-other"
    key = EntryKey("lab", "processed", "v1")
    try:
        Daemon(ctx, select_tasks(["ProcessBatchQueue"])).run_pass()
        deadline = time.monotonic() + 30
        while not (entry(runsdb, 1, key) or {}).get("job_id"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        owner = entry(runsdb, 1, key)["lease_owner"]
        time.sleep(8)  # longer than the lease: no pass of the owner ran meanwhile
        Daemon(other, select_tasks(["ProcessBatchQueue"])).run_pass()
        assert entry(runsdb, 1, key)["lease_owner"] == owner  # still held: not taken over
        gate.touch()
        deadline = time.monotonic() + 60
        while entry(runsdb, 1, key)["status"] != TRANSFERRED:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        gate.touch()
        for context in (ctx, other):
            for pool in (context.background, getattr(context, "jobs", None)):
                if pool is not None:
                    pool.wait()
            if getattr(context, "close_batch", None):
                context.close_batch()
            elif context.batch:
                context.batch.close()


# -- 7 and 8. names that are not UTF-8; a registration that failed after the rename ---------------


def test_a_file_name_that_is_not_utf8_is_copied_and_registered(two_sites, runsdb, tmp_path):
    data = tmp_path / "daq/raw/170101_0000"
    make_dataset(data, files=1, size=100)
    odd = os.fsdecode(b"caf\xe9.zip")  # a name that is not UTF-8 (surrogate-escaped)
    (data / odd).write_bytes(b"odd name")
    runsdb.insert_runs([make_run(1, name=data.name, data=[
        {"host": "daq", "type": "raw", "status": VERIFYING, "location": str(data)}])])
    one_pass(two_sites, "daq", runsdb)
    assert entry(runsdb, 1, RAW_DAQ)["status"] == TRANSFERRED
    assert entry(runsdb, 1, RAW_LAB)["status"] == TRANSFERRED
    copy = tmp_path / "lab/raw/170101_0000"
    assert (copy / odd).read_bytes() == b"odd name"


def test_a_copy_whose_registration_failed_after_the_rename_is_registered_not_sent_again(
        two_sites, runsdb, tmp_path, monkeypatch):
    data = tmp_path / "daq/raw/170101_0000"
    make_dataset(data, files=3, size=1000)
    runsdb.insert_runs([make_run(1, name=data.name, data=[
        {"host": "daq", "type": "raw", "status": VERIFYING, "location": str(data)}])])
    one_pass(two_sites, "daq", runsdb, ["AddChecksum"])
    real = RunsDB.register_verified
    calls = []

    def away_once(self, claim, *args, **kwargs):
        calls.append(claim.key)
        if claim.key == RAW_LAB and len([c for c in calls if c == RAW_LAB]) == 1:
            raise RunsDBError("runs DB: register_verified: connection reset")
        return real(self, claim, *args, **kwargs)

    monkeypatch.setattr(RunsDB, "register_verified", away_once)
    from cax.transport.local import LocalTransport
    from tests.conftest import advance_clock

    sent = []
    real_put = LocalTransport.put
    monkeypatch.setattr(LocalTransport, "put", lambda self, *a, **k: sent.append(a) or
                        real_put(self, *a, **k))
    one_pass(two_sites, "daq", runsdb, ["CopyPush"])
    copy = tmp_path / "lab/raw/170101_0000"
    assert copy.is_dir() and entry(runsdb, 1, RAW_LAB)["status"] != TRANSFERRED
    assert len(sent) == 1
    files = {p.name: (p.stat().st_ino, p.stat().st_ctime_ns) for p in copy.rglob("*")
             if p.is_file()}
    advance_clock(runsdb, 3600)
    one_pass(two_sites, "daq", runsdb, ["CopyPush"])
    assert entry(runsdb, 1, RAW_LAB)["status"] == TRANSFERRED
    assert len(sent) == 1  # registered where it was, not sent again
    assert {p.name: (p.stat().st_ino, p.stat().st_ctime_ns) for p in copy.rglob("*")
            if p.is_file()} == files


# -- 9. legacy deployments -------------------------------------------------------------------------


def test_legacy_checksums_repair_records_the_repaired_datas_adler32(tmp_path, runsdb_uri,
                                                                    runsdb):
    """With ``legacy_checksums``, a repaired copy kept the corrupt data's ``adler32_checksum``."""
    for site in ("daq", "lab"):
        (tmp_path / site / "raw").mkdir(parents=True)
    sites = [{"name": "daq", "method": "local", "dir_raw": str(tmp_path / "daq/raw"),
              "data_type": ["raw"], "upload_options": ["lab"]},
             {"name": "lab", "method": "local", "dir_raw": str(tmp_path / "lab/raw"),
              "data_type": ["raw"], "download_options": ["daq"], "scrub_after_days": 0}]
    config = write_config(tmp_path / "cax.json", sites, runs_db=runsdb_uri[0],
                          runs_db_name=runsdb_uri[1], lease_seconds=30,
                          legacy_checksums=True)
    data = tmp_path / "daq/raw/170101_0000"
    make_dataset(data, files=3, size=1000)
    runsdb.insert_runs([make_run(1, name=data.name, data=[
        {"host": "daq", "type": "raw", "status": VERIFYING, "location": str(data)}])])
    one_pass(config, "daq", runsdb, ["AddChecksum", "CopyPush"])
    copy = tmp_path / "lab/raw/170101_0000"
    assert entry(runsdb, 1, RAW_LAB)["adler32_checksum"] == dataset_checksum(scan_dataset(copy))
    victim = sorted(p for p in copy.rglob("*") if p.is_file())[0]
    victim.write_bytes(b"rotten" + victim.read_bytes()[6:])
    for _ in range(2):
        one_pass(config, "lab", runsdb, ["Scrub", "RetryBadChecksumTransfer"])
    repaired = entry(runsdb, 1, RAW_LAB)
    assert repaired["status"] == TRANSFERRED
    assert repaired["adler32_checksum"] == dataset_checksum(scan_dataset(copy)) == \
        dataset_checksum(scan_dataset(data))
    assert repaired["checksum"] == dirhash(copy)


def test_a_symlink_inside_a_dataset_is_one_clear_line_not_a_traceback(two_sites, runsdb,
                                                                      tmp_path, caplog):
    data = tmp_path / "daq/raw/170301_1500"
    make_dataset(data, files=2, size=1000)
    (data / "latest.zip").symlink_to("f001.zip")
    runsdb.insert_runs([make_run(3, name=data.name, data=[
        {"host": "daq", "type": "raw", "status": TRANSFERRED, "location": str(data),
         "checksum": dirhash(data)}])])
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            one_pass(two_sites, "daq", runsdb)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "unexpected error" not in caplog.text
    assert entry(runsdb, 3, RAW_DAQ)["status"] == TRANSFERRED  # its sha512 still verifies
    lab = entry(runsdb, 3, RAW_LAB)
    assert lab["status"] == ERROR and "symlink" in lab["error"] and lab["next_attempt"] is None


def test_a_stalled_transfer_of_the_original_at_a_tape_site_is_listed_and_retried(
        tmp_path, runsdb_uri, runsdb):
    """A ``transferring`` tape entry the original left without a lease was never redone, and
    ``cax retry`` called it "not stuck"."""
    (tmp_path / "daq/raw").mkdir(parents=True)
    sites = [{"name": "daq", "method": "local", "dir_raw": str(tmp_path / "daq/raw"),
              "dir_tsm": str(tmp_path / "tsm"), "data_type": ["raw"],
              "upload_options": ["tsm-server"], "task_list": ["CopyPush"]},
             {"name": "tsm-server", "method": "tsm"}]
    config = write_config(tmp_path / "cax.json", sites, runs_db=runsdb_uri[0],
                          runs_db_name=runsdb_uri[1], lease_seconds=30)
    old = dt.datetime(2017, 3, 1, tzinfo=dt.timezone.utc)
    runsdb.insert_runs([make_run(1, name="170301_1300", data=[
        {"host": "tsm-server", "type": "raw", "status": TRANSFERRING, "location": "n/a",
         "checksum": None, "creation_time": old}])])
    stuck = cax(config, "status", "--stuck", "--all-sites", "--json")
    assert stuck.exit_code in (0, 1) and "tsm-server" in stuck.stdout, stuck.output
    retried = cax(config, "retry", "--run", "1", "--site", "tsm-server")
    assert retried.exit_code == 0 and "retryable" in retried.stdout, retried.output
    assert entry(runsdb, 1, EntryKey("tsm-server", "raw"))["status"] == ERROR
