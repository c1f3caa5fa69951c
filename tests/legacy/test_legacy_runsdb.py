"""A runs DB as the original cax wrote it: one pass verifies it, catches the bad copy, keeps it all.

The fixture has the DAQ's run fields, sha512 dirhash checksums in every legacy status, list-valued
and datetime ``creation_time``, processed entries with ``pax_version``/``pax_hash``/
``creation_place``, ``tsm-server`` and ``rucio-catalogue`` entries (a ruciax ``:a:b:c``
checksum), a copy in a former directory (``legacy_dirs``) and a dataset with a symlink.  The
config is list-form with the original's site names and no ``reference_for``: the default
reference (the original's master, xe1t-datamanager) must be found on its own.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from cax.checksum import legacy_dirhash
from cax.config import load_config
from cax.daemon import Daemon
from cax.tasks import TASKS, Context
from tests.conftest import make_run

DM, MW = "xe1t-datamanager", "midway-login1"
#: What the original's readers use in a data entry (cax-behaviour.md §1.4).
ORIGINAL_FIELDS = ("host", "type", "status", "location", "checksum", "creation_time",
                   "pax_version", "pax_hash", "creation_place", "rse", "rule_info")
UTC = dt.timezone.utc
OLD = dt.datetime(2017, 3, 1, 12, tzinfo=UTC)


def original_dirhash(path: Path) -> str:
    """checksumdir.dirhash(path, 'sha512') as the original computed it, written independently."""
    if path.is_file():
        return hashlib.sha512(path.read_bytes()).hexdigest()
    hashes = []
    for root, _dirs, files in os.walk(path):  # followlinks=False, as checksumdir
        for name in files:
            with open(os.path.join(root, name), "rb") as f:  # a file symlink is followed
                hashes.append(hashlib.sha512(f.read()).hexdigest())
    digest = hashlib.sha512()
    for h in sorted(hashes):
        digest.update(h.encode())
    return digest.hexdigest()


def dataset(path: Path, seed: int, files: int = 3) -> Path:
    path.mkdir(parents=True)
    for i in range(files):
        (path / f"XENON1T-{seed}-{i:09d}.zip").write_bytes(bytes([seed, i]) * 5000)
    (path / "pax_info.json").write_text(json.dumps({"run": seed}))
    return path


def daq_fields(number: int) -> dict[str, Any]:
    return {"reader": {"self_trigger": True, "ini": {"write_mode": 2}},
            "trigger": {"events_built": 1234}, "source": {"type": "none"},
            "processor": {"DEFAULT": {"gains": [1.0], "drift_velocity_liquid": 1.44,
                                      "electron_lifetime_liquid": 500.0}},
            "end": OLD + dt.timedelta(hours=number, minutes=50),
            "tags": [{"name": "_sciencerun0"}]}


@pytest.fixture()
def deployment(tmp_path: Path, runsdb: Any, runsdb_uri: tuple[str, str], monkeypatch) -> dict:
    dm_raw, dm_old, mw_raw, mw_proc = (tmp_path / d for d in ("dm/raw", "dm/old-raw",
                                                              "mw/raw", "mw/processed"))
    for d in (dm_raw, dm_old, mw_raw, mw_proc / "pax_v6.4.2"):
        d.mkdir(parents=True)
    sites = [
        {"name": MW, "method": "local", "dir_raw": str(mw_raw) + "/",
         "dir_processed": str(mw_proc), "data_type": ["raw", "processed"],
         "upload_options": [], "download_options": [DM],
         "dir_minitrees": "/project/lgrandi/xenon1t/minitrees", "grid_cert": "/x/proxy"},
        {"name": DM, "method": "local", "dir_raw": str(dm_raw), "dir_tsm": str(tmp_path / "tsm"),
         "legacy_dirs": [str(dm_old)], "data_type": ["raw"],
         "upload_options": [MW, "rucio-catalogue"], "download_options": [],  # tape: tests/tape
         "rucio_upload_rse": "LNGS_USERDISK"},
        {"name": "tsm-server", "method": "tsm", "hostname": None, "dir_raw": None},
        {"name": "rucio-catalogue", "method": "rucio", "hostname": None, "dir_raw": None},
    ]
    config_path = tmp_path / "cax.json"
    config_path.write_text(json.dumps(sites))
    monkeypatch.setenv("CAX_RUNS_DB", runsdb_uri[0])

    runs = []
    # run 1: good copies everywhere, processed data at midway, tape and rucio entries
    good = dataset(dm_raw / "170301_1300", 1)
    copy1 = dataset(mw_raw / "170301_1300", 1)
    root = mw_proc / "pax_v6.4.2" / "170301_1300.root"
    root.write_bytes(b"root file" * 1000)
    runs.append(make_run(1, start=OLD + dt.timedelta(hours=1), data=[
        {"host": DM, "type": "raw", "status": "transferred", "location": str(good),
         "checksum": original_dirhash(good), "creation_time": OLD},
        {"host": MW, "type": "raw", "status": "transferred", "location": str(copy1),
         "checksum": original_dirhash(copy1), "creation_time": [OLD]},  # issue #40 shape
        {"host": MW, "type": "processed", "status": "transferred", "location": str(root),
         "checksum": original_dirhash(root), "creation_time": OLD, "pax_version": "v6.4.2",
         "pax_hash": "n/a", "creation_place": MW},
        {"host": "tsm-server", "type": "raw", "status": "transferred",
         "location": "/data/xenon/tsm/170301_1300", "checksum": original_dirhash(good),
         "creation_time": OLD},
        {"host": "rucio-catalogue", "type": "raw", "status": "transferred",
         "location": "x1t_SR000_170301_1300_tpc:raw", "checksum": ":a:b:c",
         "rse": ["NIKHEF_USERDISK", "UC_OSG_USERDISK"], "rule_info": "OK:2,REPL:0,STUCK:0",
         "creation_time": OLD},
    ], **daq_fields(1)))
    # run 2: the master copy lies in the datamanager's former directory; midway's copy is bad
    master = dataset(dm_old / "170301_1400", 2)
    bad = dataset(mw_raw / "170301_1400", 2)
    runs.append(make_run(2, start=OLD + dt.timedelta(hours=2), data=[
        {"host": DM, "type": "raw", "status": "transferred", "location": str(master),
         "checksum": original_dirhash(master), "creation_time": OLD},
        {"host": MW, "type": "raw", "status": "transferred", "location": str(bad),
         "checksum": original_dirhash(bad), "creation_time": OLD},
        {"host": "tsm-server", "type": "raw", "status": "transferring", "location": "n/a",
         "checksum": None, "creation_time": OLD},
    ], **daq_fields(2)))
    victim = sorted(bad.glob("*.zip"))[1]
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x01  # one flipped bit, after the original verified the copy
    victim.write_bytes(bytes(data))
    # run 3: a dataset with a symlink inside it (the original's checksum followed it)
    linked = dataset(dm_raw / "170301_1500", 3)
    (linked / "latest.zip").symlink_to("XENON1T-3-000000000.zip")
    linked_copy = dataset(mw_raw / "170301_1500", 3)
    (linked_copy / "latest.zip").symlink_to("XENON1T-3-000000000.zip")
    runs.append(make_run(3, start=OLD + dt.timedelta(hours=3), data=[
        {"host": DM, "type": "raw", "status": "transferred", "location": str(linked),
         "checksum": original_dirhash(linked), "creation_time": OLD},
        {"host": MW, "type": "raw", "status": "transferred", "location": str(linked_copy),
         "checksum": original_dirhash(linked_copy), "creation_time": OLD},
        {"host": "tsm-server", "type": "raw", "status": "error", "location": "n/a",
         "checksum": "n/a", "creation_time": OLD},
    ], **daq_fields(3)))
    # run 4: sha512 checksums on entries in the other legacy statuses
    waiting = dataset(dm_raw / "170301_1600", 4)
    failed = dataset(mw_raw / "170301_1600", 4)
    runs.append(make_run(4, start=OLD + dt.timedelta(hours=4), data=[
        {"host": DM, "type": "raw", "status": "verifying", "location": str(waiting),
         "checksum": original_dirhash(waiting), "creation_time": OLD},
        {"host": MW, "type": "raw", "status": "error", "location": str(failed),
         "checksum": original_dirhash(failed), "creation_time": [OLD]},
    ], **daq_fields(4)))
    runsdb.insert_runs(runs)
    return {"config": config_path, "bad": bad, "victim": victim, "good": [copy1, root,
                                                                          linked_copy]}


def one_pass(config_path: Path, site: str, runsdb: Any) -> None:
    from cax.cli import make_owner, run_selector
    from cax.workers import Background

    config = load_config(config_path, site)
    ctx = Context(config=config, runsdb=runsdb, owner=make_owner(site),
                  selector=run_selector(None, None, config.datasets_wanted),
                  background=Background(config.site.max_transfers), once=True)
    try:
        Daemon(ctx, list(TASKS)).run_pass(wait_background=True)
    finally:
        ctx.background.shutdown()


def snapshot(tree: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in sorted(tree.rglob("*"))}


def test_legacy_symlink_dataset_verifies_as_the_original_hashed_it(deployment):
    linked = deployment["good"][2]
    assert legacy_dirhash(linked) == original_dirhash(linked)


def test_pass_verifies_good_copies_catches_the_bad_one_and_keeps_the_originals_fields(
        deployment, runsdb):
    whole = {"_id": 1, "number": 1, "name": 1, "detector": 1, "start": 1, "reader": 1,
             "trigger": 1, "processor": 1, "tags": 1, "source": 1, "end": 1, "data": 1}

    def read_all() -> dict[int, dict[str, Any]]:
        return {r["number"]: r for r in runsdb.find_runs({}, projection=whole)}

    before = copy.deepcopy(read_all())
    files_before = {str(p): snapshot(p) if p.is_dir() else (p.stat().st_ino,)
                    for p in deployment["good"]}

    one_pass(deployment["config"], DM, runsdb)
    one_pass(deployment["config"], MW, runsdb)

    after = read_all()
    # nothing re-copied: the good copies' files are the same inodes, untouched
    for p in deployment["good"]:
        assert (snapshot(p) if p.is_dir() else (p.stat().st_ino,)) == files_before[str(p)]
    # the run-level DAQ fields are untouched
    for number, run in before.items():
        for field in ("number", "name", "detector", "start", "reader", "trigger", "processor",
                      "tags", "source", "end"):
            assert after[number][field] == run[field], (number, field)
    # every original entry is still there with every field the original's readers use, and
    # no good copy's checksum was rewritten
    bad_location = str(deployment["bad"])
    for number, run in before.items():
        for old in run["data"]:
            matches = [e for e in after[number]["data"]
                       if (e["host"], e["type"], e.get("pax_version")) ==
                       (old["host"], old["type"], old.get("pax_version"))]
            assert len(matches) == 1, (number, old["host"])
            new = matches[0]
            if old["location"] == bad_location:
                continue
            if old["status"] in ("verifying", "error"):  # verified or retried: may move on
                assert new["status"] in ("verifying", "transferred", "error", "transferring")
                assert new.get("checksum") in (old["checksum"], None) or new["status"] == \
                    "transferred", new
                continue
            for field in ORIGINAL_FIELDS:
                if field == "status" and old["status"] == "transferring":
                    assert new["status"] in ("transferring", "error")  # a stalled push, reported
                elif field in old:
                    assert new.get(field) == old[field], (number, old["host"], field)
    # the corrupted copy is caught via the default reference (the datamanager, in its former
    # directory), and no longer claims to be transferred
    bad_entry = next(e for e in after[2]["data"] if e["host"] == MW)
    assert bad_entry["status"] == "error" and bad_entry["checksum_problem"] == DM, bad_entry
    assert bad_entry["checksum"] == before[2]["data"][1]["checksum"]  # the original's value


def test_bad_legacy_copy_is_repaired_from_the_master_in_its_former_directory(deployment,
                                                                              runsdb):
    for site in (MW, MW):  # the first pass finds the flipped bit, the next repairs it
        one_pass(deployment["config"], site, runsdb)
    run = next(r for r in runsdb.find_runs({"number": 2}))
    entry = next(e for e in run["data"] if e["host"] == MW)
    master = next(e for e in run["data"] if e["host"] == DM)
    assert entry["status"] == "transferred", entry
    assert legacy_dirhash(deployment["bad"]) == master["checksum"]


@pytest.mark.parametrize("mixed", [False, True], ids=["new only", "mixed operation"])
def test_mixed_operation_registers_the_originals_checksum_too(deployment, runsdb, monkeypatch,
                                                              mixed):
    """With CAX_LEGACY_CHECKSUMS=1 a new copy's `checksum` is what old daemons compare."""
    if mixed:
        monkeypatch.setenv("CAX_LEGACY_CHECKSUMS", "1")
    fresh = dataset(Path(deployment["good"][0]).parents[2] / "dm/raw/170301_2100", 9)
    runsdb.insert_runs([make_run(9, start=OLD + dt.timedelta(hours=9), data=[
        {"host": DM, "type": "raw", "status": "transferred", "location": str(fresh),
         "checksum": original_dirhash(fresh), "creation_time": OLD},
    ], **daq_fields(9))])
    one_pass(deployment["config"], MW, runsdb)
    entry = next(e for e in next(r for r in runsdb.find_runs({"number": 9}))["data"]
                 if e["host"] == MW)
    assert entry["status"] == "transferred", entry
    if mixed:
        assert entry["checksum"] == original_dirhash(fresh)
        assert entry["adler32_checksum"].startswith("adler32:")
    else:
        assert entry["checksum"].startswith("adler32:") and "adler32_checksum" not in entry


def test_processed_copy_keeps_pax_hash_and_creation_place(deployment, runsdb, tmp_path):
    config = json.loads(deployment["config"].read_text())
    for site in config:
        if site["name"] == DM:
            site.update(dir_processed=str(tmp_path / "dm/processed"),
                        data_type=["raw", "processed"])
        if site["name"] == MW:
            site.update(processor_version="v6.4.2")
    deployment["config"].write_text(json.dumps(config))
    root = tmp_path / "dm/processed/pax_v6.4.2/170301_2200.root"
    root.parent.mkdir(parents=True)
    root.write_bytes(b"processed" * 999)
    runsdb.insert_runs([make_run(10, start=OLD + dt.timedelta(hours=10), data=[
        {"host": DM, "type": "processed", "status": "transferred", "location": str(root),
         "checksum": original_dirhash(root), "creation_time": OLD, "pax_version": "v6.4.2",
         "pax_hash": "3f2a9c1", "creation_place": "midway-login1"},
    ], **daq_fields(10))])
    one_pass(deployment["config"], MW, runsdb)
    entry = next(e for e in next(r for r in runsdb.find_runs({"number": 10}))["data"]
                 if e["host"] == MW)
    assert entry["status"] == "transferred", entry
    assert (entry["pax_version"], entry["pax_hash"], entry["creation_place"]) == (
        "v6.4.2", "3f2a9c1", "midway-login1")


def test_mixed_operation_new_daq_data_get_the_originals_checksum(deployment, runsdb,
                                                                  monkeypatch, tmp_path):
    monkeypatch.setenv("CAX_LEGACY_CHECKSUMS", "1")
    fresh = dataset(tmp_path / "dm/raw/170301_2300", 11)
    runsdb.insert_runs([make_run(11, start=OLD + dt.timedelta(hours=11), data=[
        {"host": DM, "type": "raw", "status": "verifying", "location": str(fresh),
         "checksum": None, "creation_time": OLD},
    ], **daq_fields(11))])
    one_pass(deployment["config"], DM, runsdb)
    entry = next(e for e in next(r for r in runsdb.find_runs({"number": 11}))["data"]
                 if e["host"] == DM)
    assert entry["status"] == "transferred", entry
    assert entry["checksum"] == original_dirhash(fresh)
    assert entry["adler32_checksum"].startswith("adler32:")
