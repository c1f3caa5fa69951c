"""AddChecksum, CompareChecksums, RetryBadChecksumTransfer and Scrub, on local sites."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import random
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from cax.checksum import dataset_checksum, legacy_checksum_fields, scan_dataset
from cax.clock import utcnow
from cax.daemon import Daemon
from cax.errors import TransferError
from cax.paths import parse_scratch
from cax.runsdb import ERROR, TRANSFERRED, VERIFYING, EntryKey, find_entry
from cax.tasks import checksum as checksum_tasks
from cax.tasks.checksum import AddChecksum, CompareChecksums
from cax.tasks.repair import RetryBadChecksumTransfer
from cax.tasks.scrub import Scrub
from cax.tasks.stalled import RetryStalledTransfer
from cax.transport.local import LocalTransport
from tests.conftest import (
    advance_clock,
    make_context,
    make_run,
    set_entry,
    write_config,
)

ALL = [AddChecksum, CompareChecksums, RetryBadChecksumTransfer, Scrub, RetryStalledTransfer]


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path, runsdb_uri: tuple[str, str]):
    """Write a config: ``daq`` (raw reference), ``lab`` (pulls from daq), ``tape`` (no daemon)."""

    def make(daq_method: str = "local", **lab: Any) -> Path:
        for d in ("daq/raw", "lab/raw", "tape/raw"):
            (tmp_path / d).mkdir(parents=True, exist_ok=True)
        sites = [
            {"name": "daq", "method": daq_method, "dir_raw": str(tmp_path / "daq/raw"),
             "data_type": ["raw"], "reference_for": ["raw"]},
            {"name": "lab", "method": "local", "dir_raw": str(tmp_path / "lab/raw"),
             "data_type": ["raw"], "download_options": ["daq"], **lab},
        ]
        return write_config(tmp_path / "cax.json", sites, runs_db=runsdb_uri[0],
                            runs_db_name=runsdb_uri[1], sleep_seconds=0.1, lease_seconds=30)

    return make


def write_dataset(path: Path, files: int = 5, size: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for i in range(files):
        target = path / f"sub{i % 3}" / f"file_{i:03d}.bin"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(rng.randbytes(size))
    return path


def flip_byte(path: Path, offset: int = 7) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def independent_checksum(path: Path) -> str:
    """The dataset checksum computed without cax: adler32 per file, sorted listing, sha256."""
    lines = []
    for root, _dirs, names in os.walk(path):
        for name in names:
            full = Path(root) / name
            data = full.read_bytes()
            rel = full.relative_to(path).as_posix()
            lines.append(f"{rel}\t{len(data)}\t{zlib.adler32(data) & 0xFFFFFFFF:08x}\n".encode())
    return "adler32:" + hashlib.sha256(b"".join(sorted(lines))).hexdigest()


def independent_dirhash(path: Path) -> str:
    """The original cax's checksumdir.dirhash(path, 'sha512'), computed without cax."""
    hashes = sorted(hashlib.sha512(p.read_bytes()).hexdigest() for p in path.rglob("*")
                    if p.is_file())
    digest = hashlib.sha512()
    for h in hashes:
        digest.update(h.encode())
    return digest.hexdigest()


def registered(runsdb, run_id, host: str, path: Path, **extra: Any) -> dict[str, Any]:
    """A transferred entry for the dataset at ``path``, with its manifest saved."""
    manifest = scan_dataset(path)
    checksum = dataset_checksum(manifest)
    runsdb.save_manifest(run_id, EntryKey(host, "raw"), manifest, checksum, utcnow())
    return {"host": host, "type": "raw", "status": TRANSFERRED, "location": str(path),
            "checksum": checksum, "verified_time": utcnow(), "creation_time": utcnow(),
            **extra}


def produced(runsdb, run_id, host: str, path: Path, **extra: Any) -> dict[str, Any]:
    """The dataset's producer copy, its origin recorded, as AddChecksum registers the DAQ's
    first read of a new run."""
    manifest = scan_dataset(path)
    checksum = dataset_checksum(manifest)
    runsdb.save_origin_manifest(run_id, EntryKey(host, "raw"), manifest, checksum, utcnow())
    runsdb.runs.update_one({"_id": run_id}, {"$push": {"origins": {
        "type": "raw", "checksum": checksum, "host": host, "evidence": "producer",
        "time": utcnow()}}})
    return registered(runsdb, run_id, host, path, evidence="producer", **extra)


def copied(runsdb, run_id, host: str, path: Path, **extra: Any) -> dict[str, Any]:
    """A copy registered after it was verified against its dataset's origin."""
    return registered(runsdb, run_id, host, path, evidence="origin", **extra)


def add_run(runsdb, number: int, entries: list[dict[str, Any]]) -> Any:
    located = [e["location"] for e in entries if isinstance(e.get("location"), str)]
    name = Path(located[0]).name.split(".")[0] if located else "170101_0000"
    runsdb.insert_runs([make_run(number, name=name, data=entries)])
    return runsdb.find_runs({"number": number})[0]["_id"]


def entry_of(runsdb, run_id, host: str) -> dict[str, Any]:
    return find_entry(runsdb.find_run(run_id), EntryKey(host, "raw"))


def one_pass(ctx, tasks=None) -> None:
    Daemon(ctx, tasks or ALL).run_pass(wait_background=True)


# -- AddChecksum -----------------------------------------------------------------------------


def test_addchecksum_verifying_entry_transferred_with_independent_checksum(
        config, runsdb, tmp_path):
    path = write_dataset(tmp_path / "daq/raw/170101_0000", files=7)
    run_id = add_run(runsdb, 1, [{"host": "daq", "type": "raw", "status": VERIFYING,
                                  "location": str(path)}])
    ctx = make_context(config(), "daq", runsdb)
    one_pass(ctx, [AddChecksum])
    entry = entry_of(runsdb, run_id, "daq")
    assert entry["status"] == TRANSFERRED
    assert entry["checksum"] == independent_checksum(path)
    assert entry["file_count"] == 7 and entry["size"] == 7 * 300
    assert entry["verified_time"] is not None and "lease_owner" not in entry
    manifest = runsdb.find_manifest(run_id, EntryKey("daq", "raw"))
    assert dataset_checksum(manifest) == entry["checksum"] and len(manifest) == 7


def test_addchecksum_missing_dataset_marked_error(config, runsdb, tmp_path):
    run_id = add_run(runsdb, 1, [{"host": "daq", "type": "raw", "status": VERIFYING,
                                  "location": str(tmp_path / "daq/raw/gone")}])
    one_pass(make_context(config(), "daq", runsdb), [AddChecksum])
    entry = entry_of(runsdb, run_id, "daq")
    assert entry["status"] == ERROR
    assert entry["error"].startswith("data missing") and "checksum" not in entry


def test_addchecksum_legacy_sha512_verified_and_kept(config, runsdb, tmp_path):
    path = write_dataset(tmp_path / "daq/raw/170101_0000")
    legacy = independent_dirhash(path)
    run_id = add_run(runsdb, 1, [{"host": "daq", "type": "raw", "status": VERIFYING,
                                  "location": str(path), "checksum": legacy}])
    one_pass(make_context(config(), "daq", runsdb), [AddChecksum])
    entry = entry_of(runsdb, run_id, "daq")
    assert entry["status"] == TRANSFERRED and entry["checksum"] == legacy  # not overwritten
    assert runsdb.find_manifest(run_id, EntryKey("daq", "raw")) == scan_dataset(path)


def test_addchecksum_recorded_checksum_mismatch_error_data_kept(config, runsdb, tmp_path):
    path = write_dataset(tmp_path / "daq/raw/170101_0000")
    legacy = independent_dirhash(path)
    flip_byte(path / "sub1/file_001.bin")
    run_id = add_run(runsdb, 1, [{"host": "daq", "type": "raw", "status": VERIFYING,
                                  "location": str(path), "checksum": legacy}])
    one_pass(make_context(config(), "daq", runsdb), [AddChecksum])
    entry = entry_of(runsdb, run_id, "daq")
    assert (entry["status"], entry["checksum"]) == (ERROR, legacy)
    assert entry["error"].startswith("data do not match the registered checksum")
    # flagged and kept: no copy of those bytes exists elsewhere, so nothing may replace it
    assert entry["next_attempt"] is None and entry["error_kind"] == "permanent"
    assert len(list(path.rglob("*.bin"))) == 5


def test_addchecksum_corrupt_copy_with_recorded_sha512_repaired_from_a_verified_copy(
        config, runsdb, tmp_path):
    """Issue 17.9: a corrupt copy with a recorded sha512 is repaired from a verified copy
    elsewhere (it used to become a permanent error that ``cax retry`` could not clear)."""
    good = write_dataset(tmp_path / "daq/raw/170101_0000")
    legacy = independent_dirhash(good)
    lab = write_dataset(tmp_path / "lab/raw/170101_0000")
    flip_byte(lab / "sub1/file_001.bin")
    run_id = add_run(runsdb, 1, [
        {"host": "daq", "type": "raw", "status": TRANSFERRED, "location": str(good),
         "checksum": legacy},
        {"host": "lab", "type": "raw", "status": VERIFYING, "location": str(lab),
         "checksum": legacy}])
    ctx = make_context(config(), "lab", runsdb)
    one_pass(ctx, [AddChecksum])
    entry = entry_of(runsdb, run_id, "lab")
    assert entry["status"] == ERROR and entry["error_kind"] == "transient", entry
    one_pass(ctx, [RetryBadChecksumTransfer])
    entry = entry_of(runsdb, run_id, "lab")
    assert entry["status"] == TRANSFERRED and independent_dirhash(lab) == legacy


def test_addchecksum_entry_leased_by_copy_job_left_alone(config, runsdb, tmp_path):
    path = write_dataset(tmp_path / "lab/raw/170101_0000")
    run_id = add_run(runsdb, 1, [{"host": "lab", "type": "raw", "status": VERIFYING,
                                  "location": str(path), "lease_owner": "copyjob",
                                  "lease_expires": utcnow() + dt.timedelta(minutes=5)}])
    one_pass(make_context(config(), "lab", runsdb), [AddChecksum])
    assert entry_of(runsdb, run_id, "lab")["status"] == VERIFYING


def test_addchecksum_two_daemons_never_checksum_same_entry(config, runsdb, tmp_path,
                                                           monkeypatch):
    cfg = config()
    ids = []
    for n in range(12):
        path = write_dataset(tmp_path / f"lab/raw/run{n:02d}", files=2, seed=n)
        ids.append(add_run(runsdb, n, [{"host": "lab", "type": "raw", "status": VERIFYING,
                                        "location": str(path)}]))
    scanned: list[str] = []
    workers: set[str] = set()
    real_scan = checksum_tasks.scan_dataset

    def slow_scan(path, **kw):
        scanned.append(str(path))
        workers.add(threading.current_thread().name)
        time.sleep(0.01)  # let the other daemon try to take the same entry meanwhile
        return real_scan(path, **kw)

    monkeypatch.setattr(checksum_tasks, "scan_dataset", slow_scan)
    contexts = [make_context(cfg, "lab", runsdb) for _ in range(2)]
    for i, ctx in enumerate(contexts):
        ctx.owner = f"lab-daemon-{i}"
    start = threading.Barrier(2)

    def daemon(ctx):
        start.wait()
        one_pass(ctx, [AddChecksum])

    threads = [threading.Thread(target=daemon, args=(c,)) for c in contexts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(scanned) == sorted(set(scanned)) and len(scanned) == 12
    assert len(workers) == 2  # both daemons did work: they really competed
    assert all(entry_of(runsdb, i, "lab")["status"] == TRANSFERRED for i in ids)


# -- CompareChecksums --------------------------------------------------------------------------


def test_compare_legacy_copy_judged_by_the_kind_it_shares_with_the_origin(config, runsdb,
                                                                          tmp_path):
    """A copy of the original's (sha512 only) against an origin that records both kinds: the
    recorded checksums decide, nothing is read, and the copy is judged once."""
    daq = write_dataset(tmp_path / "daq/raw/170101_0000")
    lab = write_dataset(tmp_path / "lab/raw/170101_0000")
    run_id = add_run(runsdb, 1, [])
    runsdb.add_entry(run_id, produced(runsdb, run_id, "daq", daq))
    runsdb.runs.update_one({"_id": run_id}, {"$set": {
        "origins.0.legacy_checksum": independent_dirhash(daq)}})
    runsdb.add_entry(run_id, {"host": "lab", "type": "raw", "status": TRANSFERRED,
                              "location": str(lab), "checksum": independent_dirhash(lab)})
    ctx = make_context(config(), "lab", runsdb)
    assert len(runsdb.find_runs(CompareChecksums(ctx).query())) == 1
    one_pass(ctx, [CompareChecksums])
    entry = entry_of(runsdb, run_id, "lab")
    assert entry["status"] == TRANSFERRED
    assert entry["compared_checksum"] == f"{entry['checksum']}|{independent_checksum(daq)}"
    assert runsdb.find_runs(CompareChecksums(ctx).query()) == []


def test_compare_reads_a_copy_of_another_kind_and_flags_it_only_when_it_is_rotten(
        config, runsdb, tmp_path):
    """Against an adler32 origin, a legacy sha512 copy is read once: the good one is judged
    good; one whose bytes no longer match its own recorded checksum is bad (due for repair);
    nothing reads the reference site's copy to judge."""
    daq = write_dataset(tmp_path / "daq/raw/170101_0000")
    ids = []
    for number, name in ((1, "170101_0000"), (2, "170101_0100")):
        lab = write_dataset(tmp_path / "lab/raw" / name)
        recorded = independent_dirhash(lab)
        if number == 2:
            flip_byte(lab / "sub0/file_000.bin")  # rotted after the original recorded it
        run_id = add_run(runsdb, number, [])
        source = write_dataset(tmp_path / "daq/raw" / name)
        runsdb.add_entry(run_id, produced(runsdb, run_id, "daq", source))
        runsdb.add_entry(run_id, {"host": "lab", "type": "raw", "status": TRANSFERRED,
                                  "location": str(lab), "checksum": recorded})
        ids.append(run_id)
    ctx = make_context(config(), "lab", runsdb)
    one_pass(ctx, [CompareChecksums])
    good, flagged = (entry_of(runsdb, i, "lab") for i in ids)
    assert good["status"] == TRANSFERRED and good["compared_checksum"].startswith(
        good["checksum"])
    assert flagged["status"] == ERROR and flagged["next_attempt"] is not None
    assert flagged["error"].startswith("data do not match their recorded checksum") or \
        flagged["error"].startswith("differs from its dataset's origin"), flagged["error"]
    assert flagged["expected_checksum"] == independent_checksum(tmp_path / "daq/raw/170101_0100")
    assert daq.exists()


def test_compare_a_self_verifying_copy_that_is_not_the_origin_is_disputed_not_repaired(
        config, runsdb, tmp_path):
    """Issue 17.2, seen from the judged side: a copy whose own recorded checksum verifies on its
    disk but differs from the origin is a dispute for a person, never "repaired"."""
    daq = write_dataset(tmp_path / "daq/raw/170101_0000", seed=1)
    lab = write_dataset(tmp_path / "lab/raw/170101_0000", seed=2)  # other bytes, vouched for
    run_id = add_run(runsdb, 1, [])
    runsdb.add_entry(run_id, produced(runsdb, run_id, "daq", daq))
    recorded = independent_dirhash(lab)
    runsdb.add_entry(run_id, {"host": "lab", "type": "raw", "status": TRANSFERRED,
                              "location": str(lab), "checksum": recorded})
    content = {p: p.read_bytes() for p in lab.rglob("*.bin")}
    ctx = make_context(config(), "lab", runsdb)
    for _ in range(2):
        one_pass(ctx, ALL)
    entry = entry_of(runsdb, run_id, "lab")
    assert entry["status"] == TRANSFERRED and entry["checksum"] == recorded
    assert entry["evidence"] == "self" and "origin" in entry["disputed"]
    assert {p: p.read_bytes() for p in lab.rglob("*.bin")} == content


def test_compare_unsettled_legacy_copies_read_their_own_evidence(config, runsdb, tmp_path):
    """Two copies of the original's that disagree, no origin: each site reads its own copy; a
    copy whose record verifies gains the evidence ``self``; the state is judged once."""
    daq = write_dataset(tmp_path / "daq/raw/170101_0000")
    lab = write_dataset(tmp_path / "lab/raw/170101_0000")
    run_id = add_run(runsdb, 1, [])
    runsdb.add_entry(run_id, registered(runsdb, run_id, "daq", daq))
    runsdb.add_entry(run_id, registered(runsdb, run_id, "lab", lab))
    ctx = make_context(config(), "lab", runsdb)
    assert runsdb.find_runs(CompareChecksums(ctx).query()) == []  # they agree: settled
    set_entry(runsdb, run_id, EntryKey("daq", "raw"), {"checksum": "adler32:" + "0" * 64})
    assert len(runsdb.find_runs(CompareChecksums(ctx).query())) == 1
    one_pass(ctx, [CompareChecksums])
    entry = entry_of(runsdb, run_id, "lab")
    assert entry["status"] == TRANSFERRED and entry["evidence"] == "self"
    assert runsdb.find_runs(CompareChecksums(ctx).query()) == []


@pytest.mark.parametrize("mixed_side", ["reference", "copy"])
def test_compare_across_mixed_operation_uses_the_recorded_adler32_without_reading(
        config, runsdb, tmp_path, monkeypatch, mixed_side):
    """In mixed operation a copy's ``checksum`` is the original's sha512 and its adler32 is in
    ``adler32_checksum``; against the other kind, the adler32s are compared without reading."""
    daq = write_dataset(tmp_path / "daq/raw/170101_0000")
    good = write_dataset(tmp_path / "lab/raw/170101_0000")

    def entry(run_id, host, path, mixed):
        fields = registered(runsdb, run_id, host, path)
        if mixed:
            fields.update(legacy_checksum_fields(scan_dataset(path), independent_dirhash(path)))
        return fields

    run_id = add_run(runsdb, 1, [])
    runsdb.add_entry(run_id, entry(run_id, "daq", daq, mixed_side == "reference"))
    runsdb.add_entry(run_id, entry(run_id, "lab", good, mixed_side == "copy"))
    reads = []
    monkeypatch.setattr(checksum_tasks.ChecksumTask, "read",
                        lambda *a, **k: reads.append(a) or None)
    ctx = make_context(config(), "lab", runsdb)
    one_pass(ctx, [CompareChecksums])
    matched = entry_of(runsdb, run_id, "lab")
    assert matched["status"] == TRANSFERRED and reads == []
    assert runsdb.find_runs(CompareChecksums(ctx).query()) == []


def test_compare_at_the_reference_site_nothing_to_compare(config, runsdb, tmp_path):
    daq = write_dataset(tmp_path / "daq/raw/170101_0000")
    run_id = add_run(runsdb, 1, [])
    runsdb.add_entry(run_id, registered(runsdb, run_id, "daq", daq))
    ctx = make_context(config(), "daq", runsdb)
    assert runsdb.find_runs(CompareChecksums(ctx).query()) == []
    one_pass(ctx, [CompareChecksums])
    assert "compared_checksum" not in entry_of(runsdb, run_id, "daq")


# -- repair ----------------------------------------------------------------------------------


class FetchSpy:
    """Records every file the local transport is asked to fetch."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str]] = []
        real = LocalTransport.get

        def get(transport, remote, local, progress=None):
            self.calls.append((str(remote), str(local)))
            return real(transport, remote, local, progress)

        monkeypatch.setattr(LocalTransport, "get", get)


def _stats(path: Path, skip: str) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in path.rglob("*.bin")
            if p.name != skip}


def test_repair_flipped_byte_in_100_file_run_refetches_only_that_file(
        config, runsdb, tmp_path, monkeypatch, caplog):
    daq = write_dataset(tmp_path / "daq/raw/170101_0000", files=100, size=2000)
    lab = write_dataset(tmp_path / "lab/raw/170101_0000", files=100, size=2000)
    flip_byte(lab / "sub0/file_042.bin", offset=1234)
    run_id = add_run(runsdb, 1, [{"host": "lab", "type": "raw", "status": VERIFYING,
                                  "location": str(lab)}])
    runsdb.add_entry(run_id, produced(runsdb, run_id, "daq", daq))
    before = _stats(lab, skip="file_042.bin")
    spy = FetchSpy(monkeypatch)
    ctx = make_context(config(), "lab", runsdb)
    with caplog.at_level(logging.ERROR):
        one_pass(ctx, [AddChecksum, CompareChecksums, RetryBadChecksumTransfer])
    assert [(remote, Path(local).relative_to(tmp_path / "lab/raw").parts[1:])
            for remote, local in spy.calls] == [(str(daq / "sub0/file_042.bin"),
                                                 ("sub0", ".file_042.bin.cax-fetch"))]
    assert parse_scratch(Path(spy.calls[0][1]).parts[-3]) is not None
    assert _stats(lab, skip="file_042.bin") == before  # the other 99 files were not touched
    entry = entry_of(runsdb, run_id, "lab")
    reference = entry_of(runsdb, run_id, "daq")
    assert entry["status"] == TRANSFERRED and entry["checksum"] == reference["checksum"]
    assert entry["evidence"] == "origin"
    assert not {"checksum_problem", "expected_checksum", "lease_owner", "error"} & set(entry)
    assert (lab / "sub0/file_042.bin").read_bytes() == (daq / "sub0/file_042.bin").read_bytes()
    assert any("differ from the dataset's origin" in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "lab/raw").glob(".*"))


def test_repair_no_good_copy_flags_and_keeps_data(config, runsdb, tmp_path, monkeypatch):
    run_id, _daq, lab = _bad_lab_copy(runsdb, tmp_path, files=5)
    content = {p: p.read_bytes() for p in lab.rglob("*.bin")}
    spy = FetchSpy(monkeypatch)
    ctx = make_context(config(daq_method="tsm"), "lab", runsdb)  # the origin's copy is on tape
    one_pass(ctx, [Scrub])
    entry = entry_of(runsdb, run_id, "lab")
    assert entry["status"] == ERROR and entry["next_attempt"] is None
    for _ in range(2):
        one_pass(ctx, ALL)
    entry = entry_of(runsdb, run_id, "lab")
    assert entry["status"] == ERROR and entry["error"].endswith("no good copy to repair from")
    assert entry["next_attempt"] is None and entry["error_kind"] == "permanent"
    assert spy.calls == []
    assert {p: p.read_bytes() for p in lab.rglob("*.bin")} == content


def _bad_lab_copy(runsdb, tmp_path: Path, files: int = 20) -> tuple[Any, Path, Path]:
    """A run whose lab copy, verified 40 days ago, has since rotted (a flipped byte in
    file_003): Scrub finds it."""
    daq = write_dataset(tmp_path / "daq/raw/170101_0000", files=files)
    lab = write_dataset(tmp_path / "lab/raw/170101_0000", files=files)
    run_id = add_run(runsdb, 1, [])
    runsdb.add_entry(run_id, produced(runsdb, run_id, "daq", daq))
    runsdb.add_entry(run_id, copied(runsdb, run_id, "lab", lab,
                                    verified_time=utcnow() - dt.timedelta(days=40)))
    flip_byte(lab / "sub0/file_003.bin")
    return run_id, daq, lab


def _connection_reset(*args, **kwargs):
    raise TransferError("connection reset", retryable=True)


def test_repair_failure_backs_off_keeps_partial_then_resumes(config, runsdb, tmp_path,
                                                             monkeypatch):
    run_id, daq, lab = _bad_lab_copy(runsdb, tmp_path)
    ctx = make_context(config(), "lab", runsdb)
    one_pass(ctx, [Scrub])

    monkeypatch.setattr(LocalTransport, "get", _connection_reset)
    one_pass(ctx, [RetryBadChecksumTransfer, RetryStalledTransfer])
    entry = entry_of(runsdb, run_id, "lab")
    assert (entry["status"], entry["attempts"]) == (ERROR, 1)
    assert entry["next_attempt"] > utcnow() and entry["checksum_problem"] == "daq"
    (partial,) = (tmp_path / "lab/raw").glob(".170101_0000.*.cax-partial")
    assert partial.is_dir() and not lab.exists()  # kept for the retry, which resumes from it
    assert entry["partial"] == str(partial)
    monkeypatch.undo()
    spy = FetchSpy(monkeypatch)
    one_pass(ctx, [RetryBadChecksumTransfer])
    assert entry_of(runsdb, run_id, "lab")["status"] == ERROR  # backing off
    advance_clock(runsdb, 3600)
    one_pass(ctx, [RetryBadChecksumTransfer])
    assert [Path(remote).name for remote, _ in spy.calls] == ["file_003.bin"]
    entry = entry_of(runsdb, run_id, "lab")
    assert entry["status"] == TRANSFERRED and entry["checksum"] == independent_checksum(daq)
    assert lab.is_dir() and not partial.exists()


def test_repair_stuck_after_last_attempt_data_put_back(config, runsdb, tmp_path, monkeypatch):
    run_id, _daq, lab = _bad_lab_copy(runsdb, tmp_path)
    content = {p.name: p.read_bytes() for p in lab.rglob("*.bin")}
    ctx = make_context(config(max_attempts=1), "lab", runsdb)
    one_pass(ctx, [Scrub])

    monkeypatch.setattr(LocalTransport, "get", _connection_reset)
    one_pass(ctx, [RetryBadChecksumTransfer, RetryStalledTransfer])
    entry = entry_of(runsdb, run_id, "lab")
    assert entry["status"] == ERROR and entry["attempts"] >= 1 and entry["next_attempt"] is None
    assert {p.name: p.read_bytes() for p in lab.rglob("*.bin")} == content
    assert not list((tmp_path / "lab/raw").glob(".*"))


def test_repair_of_dead_repairer_taken_over(config, runsdb, tmp_path):
    run_id, daq, lab = _bad_lab_copy(runsdb, tmp_path)
    ctx = make_context(config(), "lab", runsdb)
    one_pass(ctx, [Scrub])
    lab.rename(tmp_path / "lab/raw/.170101_0000.0badf00d.cax-partial")  # moved aside, then died
    past = utcnow() - dt.timedelta(minutes=5)
    set_entry(runsdb, run_id, EntryKey("lab", "raw"), {
        "status": "transferring", "lease_owner": "dead", "lease_expires": past,
        "lease_token": "0badf00d"})
    one_pass(ctx, [RetryBadChecksumTransfer])
    entry = entry_of(runsdb, run_id, "lab")
    assert entry["status"] == TRANSFERRED and entry["checksum"] == independent_checksum(daq)


def test_repair_dry_run_touches_nothing(config, runsdb, tmp_path, monkeypatch):
    run_id, _daq, lab = _bad_lab_copy(runsdb, tmp_path)
    one_pass(make_context(config(), "lab", runsdb), [Scrub])
    before = _stats(lab, skip="")
    spy = FetchSpy(monkeypatch)
    one_pass(make_context(config(), "lab", runsdb, dry_run=True), [RetryBadChecksumTransfer])
    assert spy.calls == [] and _stats(lab, skip="") == before
    assert entry_of(runsdb, run_id, "lab")["attempts"] == 0


def test_repair_good_copy_gone_before_repair_flagged_not_fetched(config, runsdb, tmp_path,
                                                                 monkeypatch):
    run_id, _daq, lab = _bad_lab_copy(runsdb, tmp_path, files=5)
    ctx = make_context(config(), "lab", runsdb)
    one_pass(ctx, [Scrub])
    assert entry_of(runsdb, run_id, "lab")["next_attempt"] is not None  # due for repair
    set_entry(runsdb, run_id, EntryKey("daq", "raw"), {"status": ERROR})
    spy = FetchSpy(monkeypatch)
    one_pass(ctx, [RetryBadChecksumTransfer])
    entry = entry_of(runsdb, run_id, "lab")
    assert entry["status"] == ERROR and "no good copy" in entry["error"]
    assert spy.calls == [] and len(list(lab.rglob("*.bin"))) == 5


def test_repair_scrub_finds_changed_file_and_repairs_it(config, runsdb, tmp_path,
                                                        monkeypatch):
    daq = write_dataset(tmp_path / "daq/raw/170101_0000", files=10)
    lab = write_dataset(tmp_path / "lab/raw/170101_0000", files=10)
    run_id = add_run(runsdb, 1, [])
    runsdb.add_entry(run_id, produced(runsdb, run_id, "daq", daq))
    old = utcnow() - dt.timedelta(days=40)
    runsdb.add_entry(run_id, copied(runsdb, run_id, "lab", lab, verified_time=old))
    flip_byte(lab / "sub1/file_004.bin")  # bit rot after the copy was verified
    spy = FetchSpy(monkeypatch)
    ctx = make_context(config(scrub_bytes_per_pass=10**9), "lab", runsdb)
    one_pass(ctx, [CompareChecksums, Scrub])
    assert entry_of(runsdb, run_id, "lab")["status"] == ERROR
    one_pass(ctx, [RetryBadChecksumTransfer])
    assert [Path(remote).name for remote, _ in spy.calls] == ["file_004.bin"]
    entry = entry_of(runsdb, run_id, "lab")
    assert entry["status"] == TRANSFERRED and entry["verified_time"] > old
    assert entry["checksum"] == independent_checksum(daq)


def test_repair_scrub_only_copy_changed_flagged_and_kept(config, runsdb, tmp_path):
    lab = write_dataset(tmp_path / "lab/raw/170101_0000")
    run_id = add_run(runsdb, 1, [])
    old = utcnow() - dt.timedelta(days=40)
    runsdb.add_entry(run_id, registered(runsdb, run_id, "lab", lab, verified_time=old))
    flip_byte(lab / "sub0/file_000.bin")
    ctx = make_context(config(scrub_bytes_per_pass=10**9), "lab", runsdb)
    one_pass(ctx, ALL)
    entry = entry_of(runsdb, run_id, "lab")
    assert entry["status"] == ERROR and "no good copy" in entry["error"]
    assert len(list(lab.rglob("*.bin"))) == 5


# -- Scrub and the idle pass -------------------------------------------------------------------


def test_scrub_budget_limits_bytes_oldest_first(config, runsdb, tmp_path):
    now = utcnow()
    ids = []
    for n in range(5):
        path = write_dataset(tmp_path / f"lab/raw/run{n}", files=2, size=500, seed=n)
        run_id = add_run(runsdb, n, [])
        age = dt.timedelta(days=31 + n)  # run 4 is the oldest
        runsdb.add_entry(run_id, registered(runsdb, run_id, "lab", path,
                                            verified_time=now - age, size=1000))
        ids.append(run_id)
    ctx = make_context(config(scrub_bytes_per_pass=2500), "lab", runsdb)
    one_pass(ctx, [Scrub])
    fresh = [n for n, i in enumerate(ids)
             if entry_of(runsdb, i, "lab")["verified_time"] > now - dt.timedelta(days=1)]
    assert fresh == [3, 4]
    one_pass(ctx, [Scrub])
    fresh = [n for n, i in enumerate(ids)
             if entry_of(runsdb, i, "lab")["verified_time"] > now - dt.timedelta(days=1)]
    assert fresh == [1, 2, 3, 4]


def test_scrub_of_many_small_copies_claims_and_releases_them_in_groups(config, runsdb,
                                                                        tmp_path, caplog):
    """150 small copies cost three group claims and releases, not 300 writes; a copy that
    another daemon holds is left to it, and one whose lease is taken over while its group is
    read is not recorded as scrubbed (the others are), with an error saying so."""
    now = utcnow()
    ids = []
    for n in range(150):
        path = write_dataset(tmp_path / f"lab/raw/run{n}", files=1, size=50, seed=n)
        run_id = add_run(runsdb, n, [])
        runsdb.add_entry(run_id, registered(runsdb, run_id, "lab", path,
                                            verified_time=now - dt.timedelta(days=40 + n)))
        ids.append(run_id)
    held = runsdb.claim(ids[149], EntryKey("lab", "raw"), owner="other", lease_s=600,
                        statuses=[TRANSFERRED], count_attempt=False)  # the oldest: group 1
    assert held
    ctx = make_context(config(), "lab", runsdb)
    taken = ids[100]
    real = Scrub.scrub

    def scrub(task, run, entry):  # another daemon takes run 100's lease while it is read
        if run["_id"] == taken:
            runsdb.runs.update_one({"_id": taken}, {"$set": {"data.0.lease_token": "theirs"}})
        real(task, run, entry)

    before = runsdb.round_trips
    caplog.set_level(logging.ERROR)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Scrub, "scrub", scrub)
        one_pass(ctx, [Scrub])
    assert runsdb.round_trips - before <= 3 * 3 + 4  # claim, read back, release per group
    fresh = {n for n, i in enumerate(ids)
             if entry_of(runsdb, i, "lab")["verified_time"] > now - dt.timedelta(days=1)}
    assert fresh == set(range(149)) - {100}
    assert entry_of(runsdb, ids[149], "lab")["lease_owner"] == "other"
    assert "1 of 63 scrubbed copies were no longer ours" in caplog.text  # 149 was not ours


def test_scrub_on_by_default_and_off_with_a_zero_budget(config, runsdb):
    assert Scrub(make_context(config(), "lab", runsdb)).query() is not None
    assert Scrub(make_context(config(scrub_bytes_per_pass=0), "lab", runsdb)).query() is None


@pytest.mark.parametrize("runs", [2, 20])
def test_idle_pass_constant_round_trips_and_no_runs_fetched(config, runsdb, tmp_path,
                                                            monkeypatch, runs):
    for n in range(runs):
        daq = write_dataset(tmp_path / f"daq/raw/run{n}", files=1, seed=n)
        lab = write_dataset(tmp_path / f"lab/raw/run{n}", files=1, seed=n)
        run_id = add_run(runsdb, n, [])
        runsdb.add_entry(run_id, produced(runsdb, run_id, "daq", daq))
        runsdb.add_entry(run_id, copied(runsdb, run_id, "lab", lab))
    ctx = make_context(config(scrub_bytes_per_pass=10**9), "lab", runsdb)
    one_pass(ctx)
    fetched: list[int] = []
    real = runsdb.find_runs
    monkeypatch.setattr(runsdb, "find_runs",
                        lambda *a, **k: fetched.append(len(found := real(*a, **k))) or found)
    before = runsdb.round_trips
    one_pass(ctx)
    assert runsdb.round_trips - before == IDLE_ROUND_TRIPS
    assert fetched and set(fetched) == {0}


#: One query per task (RetryStalledTransfer: stalled entries and stuck errors) + heartbeat.
IDLE_ROUND_TRIPS = 7


def test_scrub_of_a_copy_the_original_registered_without_a_checksum(config, runsdb, tmp_path):
    """What is on disk is recorded, as found (evidence ``disk``): it vouches for nothing, so a
    copy that disagrees with it is never protected by it."""
    lab = write_dataset(tmp_path / "lab/raw/170101_0000")
    run_id = add_run(runsdb, 1, [{"host": "lab", "type": "raw", "status": TRANSFERRED,
                                  "location": str(lab), "checksum": None}])
    one_pass(make_context(config(), "lab", runsdb), [Scrub])
    entry = entry_of(runsdb, run_id, "lab")
    assert entry["status"] == TRANSFERRED and entry["evidence"] == "disk"
    assert entry["checksum"] == independent_checksum(lab)
