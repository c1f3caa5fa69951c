"""The embedded store itself: migration, failed writes, other processes' changes, outages, clock.

These run on the embedded store only (a MongoDB server has none of these properties to test).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import bson
import mongomock.filtering
import pytest

from cax.clock import utcnow
from cax.errors import RunsDBError
from cax.runsdb import TRANSFERRED, EntryKey, find_entry, open_runsdb
from cax.runsdb.store import EmbeddedClient
from tests.conftest import REAL_MONGODB, make_run, skip_or_fail, tiny_disk

RAW_AT_B = EntryKey("b", "raw")


@pytest.fixture
def store(tmp_path: Path) -> str:
    uri = f"file:{tmp_path / 'runsdb'}"
    open_runsdb(uri, create=True).close()
    return uri


def _files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_old_bson_files_are_migrated_on_first_open(tmp_path):
    """A store written by the previous cax (one BSON file per collection) opens with its runs."""
    directory = tmp_path / "runsdb"
    directory.mkdir()
    runs = [{"_id": bson.ObjectId(), **make_run(n, data=[{"host": "a", "type": "raw",
                                                         "status": TRANSFERRED}])}
            for n in range(3)]
    (directory / "run.runs_new.bson").write_bytes(b"".join(bson.encode(r) for r in runs))
    (directory / "run.cax_manifests.bson").write_bytes(bson.encode(
        {"_id": f"{runs[0]['_id']}/a/raw/", "files": [["f", 1, "00000001"]]}))
    db = open_runsdb(f"file:{directory}")
    assert sorted(r["number"] for r in db.find_runs({})) == [0, 1, 2]
    assert db.find_manifest(runs[0]["_id"], EntryKey("a", "raw")) == {"f": (1, "00000001")}
    assert "runsdb.sqlite" in _files(directory)
    assert "run.runs_new.bson.migrated" in _files(directory)  # kept as a backup, not re-read
    db.add_entry(runs[0]["_id"], {"host": "b", "type": "raw"})
    again = open_runsdb(f"file:{directory}")
    assert len(again.find_run(runs[0]["_id"])["data"]) == 2


def test_failed_write_leaves_memory_equal_to_disk(store, tmp_path, monkeypatch):
    """An update failing mid-way (after mongomock applied it) is applied nowhere."""
    db = open_runsdb(store)
    db.insert_runs([make_run(1, data=[{"host": "b", "type": "raw", "status": "transferring"}])])
    run_id = db.find_runs({})[0]["_id"]
    before = db.find_run(run_id)
    from cax.runsdb import storefile

    def full_disk(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(storefile.StoreFile, "replace", full_disk)
    with pytest.raises(RunsDBError):
        db.set_run_fields(run_id, {"tags": ["failed"]})
    monkeypatch.undo()
    assert db.find_run(run_id) == before  # this client's view
    assert open_runsdb(store).find_run(run_id) == before  # the file
    assert db.set_run_fields(run_id, {"end": before["start"]})  # the next write: only itself
    after = open_runsdb(store).find_run(run_id)
    assert after["tags"] == [] and after["end"] == before["start"]
    assert find_entry(after, RAW_AT_B)["status"] == "transferring"
    assert not [n for n in _files(tmp_path / "runsdb") if n.endswith(".tmp")]


def test_full_disk_leaves_memory_equal_to_disk(tmp_path):
    """On a real full disk (a tiny tmpfs) a failed write changes nothing, leaves no temp file."""
    with tiny_disk(tmp_path / "small", "400k") as mount:
        uri = f"file:{mount / 'runsdb'}"
        db = open_runsdb(uri, create=True)
        db.insert_runs([make_run(1, data=[{"host": "b", "type": "raw", "status": "x"}])])
        run_id = db.find_runs({})[0]["_id"]
        before = db.find_run(run_id)
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        with pytest.raises(RunsDBError):
            for i in range(200):  # free pages may absorb a few writes; random bytes do not pack
                db.set_run_fields(run_id, {f"field{i}": os.urandom(2000).hex()})
        (mount / "filler").unlink()
        now = db.find_run(run_id)
        assert now == open_runsdb(uri).find_run(run_id)
        assert not [n for n in _files(mount / "runsdb") if n.endswith(".tmp")]
        assert before["_id"] == now["_id"]
        db.close()


def _write_one(uri: str, number: int) -> None:
    subprocess.run([sys.executable, "-c", (
        "import sys; from cax.runsdb import open_runsdb\n"
        f"db = open_runsdb({uri!r})\n"
        f"run = db.find_runs({{'number': {number}}})[0]\n"
        "db.add_entry(run['_id'], {'host': 'b', 'type': 'raw', 'status': 'transferred'})\n")],
        check=True, timeout=120)


def test_other_process_change_is_seen_incrementally(store, monkeypatch):
    """After another process writes one run, a query evaluates that run, not all of them."""
    db = open_runsdb(store)
    db.insert_runs([make_run(n, data=[{"host": "a", "type": "raw", "status": TRANSFERRED}])
                    for n in range(600)])
    # A query the index cannot judge (a missing field): evaluated on every run, once.
    query = {"data": {"$elemMatch": {"host": "a", "size": None, "type": "raw"}},
             "tags.user": "never"}
    assert db.find_runs(query) == []
    evaluated: list[int] = []
    real = mongomock.filtering.filter_applies
    monkeypatch.setattr(mongomock.filtering, "filter_applies",
                        lambda q, d: evaluated.append(1) or real(q, d))
    _write_one(store, 7)
    assert len(db.find_runs({"data.host": "b"})) == 1  # the other process's write is seen
    evaluated.clear()
    assert db.find_runs(query) == []
    assert len(evaluated) == 1, f"{len(evaluated)} documents evaluated for one change"


def test_vanished_store_directory_is_an_outage_not_an_empty_db(store, tmp_path):
    db = open_runsdb(store)
    db.insert_runs([make_run(1)])
    run_id = db.find_runs({})[0]["_id"]
    shutil.move(str(tmp_path / "runsdb"), str(tmp_path / "elsewhere"))  # an unmounted disk
    with pytest.raises(RunsDBError):
        db.find_runs({})
    with pytest.raises(RunsDBError):
        db.add_entry(run_id, {"host": "b", "type": "raw"})


def test_corrupt_store_file_is_a_runs_db_error(tmp_path):
    directory = tmp_path / "runsdb"
    directory.mkdir()
    (directory / "runsdb.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(RunsDBError):
        open_runsdb(f"file:{directory}")


def test_store_generation_counts_writes(store):
    db = open_runsdb(store)
    first = db.client.generation()
    db.insert_runs([make_run(1)])
    run_id = db.find_runs({})[0]["_id"]
    db.add_entry(run_id, {"host": "b", "type": "raw"})
    assert not db.add_entry(run_id, {"host": "b", "type": "raw"})  # matched nothing: no write
    assert db.client.generation() == first + 2


def test_server_time_is_the_kernel_clock_even_under_faketime(tmp_path):
    """A daemon under libfaketime gets the real time from the store, not its faked clock."""
    if shutil.which("faketime") is None:
        skip_or_fail("faketime is not installed")
    EmbeddedClient(tmp_path / "runsdb").close()
    code = ("import time; from cax.runsdb.store import EmbeddedClient\n"
            f"c = EmbeddedClient({str(tmp_path / 'runsdb')!r})\n"
            "print(time.time(), c.server_time().timestamp())\n")
    out = subprocess.run(["faketime", "-f", "-3d", sys.executable, "-c", code],
                         env={**os.environ, "NO_FAKE_STAT": "1"}, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    faked, server = (float(v) for v in out.split())
    real = time.time()
    assert real - faked > 2 * 86400, "faketime did not fake the child's clock"
    assert abs(real - server) < 60
    assert abs(EmbeddedClient(tmp_path / "runsdb").server_time() - utcnow()) \
        < dt.timedelta(seconds=60)


pytestmark = pytest.mark.skipif(bool(REAL_MONGODB), reason="embedded store only")


def test_documents_returned_counts_what_replies_carry(store):
    """The idle-pass test asserts zero documents returned; this shows the counter counts."""
    db = open_runsdb(store)
    db.insert_runs([make_run(n) for n in range(3)])
    before = db.documents_returned
    assert len(db.find_runs({})) == 3
    assert db.count_runs({}) == 3  # a count returns no run document
    assert db.find_runs({"number": 99}) == []
    assert db.documents_returned - before == 3


def test_server_round_trip_counter_counts_batches_not_counts():
    """On a MongoDB server the documents are counted from the replies' batches."""
    from types import SimpleNamespace as Event

    from cax.runsdb.connect import _RoundTripCounter
    from cax.runsdb.runs import RunsDB

    runsdb = RunsDB(mongomock.MongoClient()["run"])
    counter = _RoundTripCounter()
    counter.runsdb = runsdb
    replies = [("find", {"filter": {}}, {"cursor": {"firstBatch": [{}, {}]}}),
               ("getMore", {}, {"cursor": {"nextBatch": [{}]}}),
               ("aggregate", {"pipeline": [{"$match": {}}, {"$group": {"_id": 1}}]},
                {"cursor": {"firstBatch": [{"n": 5}]}}),
               ("findAndModify", {}, {"value": {"_id": 1}}),
               ("findAndModify", {}, {"value": None})]
    for request_id, (name, command, reply) in enumerate(replies):
        counter.started(Event(command_name=name, command=command, request_id=request_id))
        counter.succeeded(Event(command_name=name, reply=reply, request_id=request_id))
    assert (runsdb.round_trips, runsdb.documents_returned) == (5, 4)


FROZEN = """
import subprocess, sys
from cax.errors import RunsDBError
from cax.runsdb import open_runsdb
store = sys.argv[1]
db = open_runsdb("file:" + store)
db.insert_runs([{"number": n, "name": f"r{n}", "data": []} for n in range(100)])
freeze = lambda flag: subprocess.run(f"chattr {flag} {store} {store}/*", shell=True, check=True)
freeze("+i")
try:
    print("read", len(db.find_runs({})), flush=True)
    try:
        db.insert_runs([{"number": 100, "name": "r100", "data": []}])
    except RunsDBError as exc:
        print("refused", exc, flush=True)
finally:
    freeze("-i")
db.insert_runs([{"number": 101, "name": "r101", "data": []}])
print("read", len(db.find_runs({})), flush=True)
"""


def test_store_files_made_immutable_refuse_writes_without_killing_the_process(store):
    """Issue 17.11: with a WAL journal the first read after ``chattr +i`` died of SIGBUS (the
    ``-shm`` file is mapped into memory); now reads go on, a write is refused with one
    RunsDBError, and the store takes writes again once the flag is gone."""
    path = store[len("file:"):]
    if subprocess.run(["chattr", "+i", path], capture_output=True).returncode:
        pytest.skip("chattr +i is not possible on this file system")
    subprocess.run(["chattr", "-i", path], check=True)
    try:
        done = subprocess.run([sys.executable, "-c", FROZEN, path], capture_output=True,
                              text=True, timeout=120)
    finally:
        subprocess.run(f"chattr -R -i {path}", shell=True)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    lines = done.stdout.splitlines()
    assert lines[0] == "read 100" and lines[-1] == "read 101", lines
    assert lines[1].startswith("refused runs DB: insert_runs:") and len(lines) == 3, lines


def test_a_store_left_in_wal_mode_is_switched_when_opened_alone(store, caplog):
    """A store an older cax left in WAL mode: used as it is while that cax has it open (with a
    warning), switched to the rollback journal by the first open that has it alone."""
    from cax.runsdb.storefile import FILE_NAME

    file = Path(store[len("file:"):]) / FILE_NAME
    older = sqlite3.connect(file, isolation_level=None)
    assert older.execute("PRAGMA journal_mode = WAL").fetchone() == ("wal",)
    older.execute("SELECT count(*) FROM docs").fetchone()
    db = open_runsdb(store)
    db.insert_runs([make_run(1)])
    assert "left in WAL mode while another process has it open" in caplog.text
    assert db.find_runs({})[0]["number"] == 1
    db.close()
    older.close()
    open_runsdb(store).close()
    assert file.read_bytes()[18:20] == b"\x01\x01"  # the header's rollback-journal versions
    assert not file.with_name(FILE_NAME + "-wal").exists()
