"""The runs-DB module: conditional entries, leases, identity-matched updates, manifests."""

from __future__ import annotations

import datetime as dt

import pytest

from cax.clock import utcnow
from cax.errors import RunsDBError
from cax.runsdb import (
    ERROR,
    TRANSFERRED,
    TRANSFERRING,
    EntryKey,
    find_entry,
    open_runsdb,
)
from cax.runsdb.dbclock import DBClock
from cax.runsdb.origins import Proof
from tests.conftest import advance_clock, make_run

RAW_AT_B = EntryKey("b", "raw")


def fresh(runsdb, **entry_fields):
    runsdb.insert_runs([make_run(1, data=[{"host": "a", "type": "raw", "status": TRANSFERRED}])])
    run_id = runsdb.find_runs({})[0]["_id"]
    if entry_fields:
        assert runsdb.add_entry(run_id, {"host": "b", "type": "raw", **entry_fields})
    return run_id


def test_add_entry_twice_only_first_is_added(runsdb):
    run_id = fresh(runsdb)
    assert runsdb.add_entry(run_id, {"host": "b", "type": "raw", "status": TRANSFERRING})
    assert not runsdb.add_entry(run_id, {"host": "b", "type": "raw", "status": TRANSFERRING})
    assert len(runsdb.find_run(run_id)["data"]) == 2


def test_add_entry_processed_versions_are_distinct(runsdb):
    run_id = fresh(runsdb)
    for version in ("v1", "v2"):
        entry = {"host": "b", "type": "processed", "pax_version": version}
        assert runsdb.add_entry(run_id, entry)
        assert not runsdb.add_entry(run_id, entry)
    assert len(runsdb.find_run(run_id)["data"]) == 3


def test_claim_held_lease_refused_expired_lease_taken_over(runsdb):
    run_id = fresh(runsdb, status=TRANSFERRING)
    first = runsdb.claim(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="A", lease_s=60)
    assert first.entry["lease_owner"] == "A" and not first.takeover
    assert runsdb.claim(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="B", lease_s=60) is None
    advance_clock(runsdb, 61)
    taken = runsdb.claim(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="B", lease_s=60)
    assert taken.entry["lease_owner"] == "B" and taken.attempts == 2 and taken.takeover
    assert taken.previous["lease_owner"] == "A" and taken.token != first.token
    # The loser can neither renew nor register nor record a failure any more.
    assert not runsdb.renew(first, 60)
    assert not runsdb.register_verified(first, {"checksum": "adler32:x"}, proof=Proof())
    assert not runsdb.record_failure(first, "late", kind="transient", retry_at=None)
    assert runsdb.register_verified(taken, {"checksum": "adler32:y"}, proof=Proof())
    entry = find_entry(runsdb.find_run(run_id), RAW_AT_B)
    assert entry["status"] == TRANSFERRED and entry["checksum"] == "adler32:y"
    assert not {"lease_owner", "lease_token", "lease_expires"} & set(entry)


def test_same_owner_other_attempt_cannot_write(runsdb):
    """Ownership is owner *and* token: a stale thread of the same daemon changes nothing."""
    run_id = fresh(runsdb, status=TRANSFERRING)
    old = runsdb.claim(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="A", lease_s=1)
    advance_clock(runsdb, 2)
    new = runsdb.claim(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="A", lease_s=60)
    assert new and not runsdb.register_verified(old, {}, proof=Proof())
    assert runsdb.renew(new, 60)


def test_claim_only_from_listed_status_and_conditions(runsdb):
    run_id = fresh(runsdb, status=ERROR, attempts=2)
    assert runsdb.claim(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="A", lease_s=60) is None
    assert runsdb.claim(run_id, RAW_AT_B, statuses=[ERROR], owner="A", lease_s=60,
                        conditions={"attempts": {"$lt": 2}}) is None
    assert runsdb.claim(run_id, RAW_AT_B, statuses=[ERROR], owner="A", lease_s=60,
                        conditions={"attempts": {"$lt": 3}}) is not None


def test_claim_requires_other_entries_atomically(runsdb):
    run_id = fresh(runsdb, status=ERROR)
    source_gone = [(EntryKey("a", "raw"), {"status": ERROR})]
    assert runsdb.claim(run_id, RAW_AT_B, statuses=[ERROR], owner="A", lease_s=60,
                        requires=source_gone) is None
    source_good = [(EntryKey("a", "raw"), {"status": TRANSFERRED})]
    assert runsdb.claim(run_id, RAW_AT_B, statuses=[ERROR], owner="A", lease_s=60,
                        requires=source_good, conditions={"$or": [{"x": {"$exists": False}}]})


def test_claim_updates_the_right_element(runsdb):
    """A positional update must touch the claimed entry, not the first one in the array."""
    run_id = fresh(runsdb, status=TRANSFERRING)
    run = runsdb.find_run(run_id)
    place = f"/data/{run['name']}"
    assert runsdb.claim(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="A", lease_s=60,
                        fields={"location": place}, run=run)
    run = runsdb.find_run(run_id)
    assert find_entry(run, EntryKey("a", "raw")) == {"host": "a", "type": "raw",
                                                     "status": TRANSFERRED}
    assert find_entry(run, RAW_AT_B)["location"] == place


def test_failure_and_reset_recorded_in_history(runsdb):
    run_id = fresh(runsdb, status=ERROR, attempts=0, source="a")  # a failed copy from a
    claim = runsdb.claim(run_id, RAW_AT_B, statuses=[ERROR], owner="A", lease_s=60)
    assert runsdb.record_failure(claim, "disk on fire", kind="permanent", retry_at=None)
    entry = find_entry(runsdb.find_run(run_id), RAW_AT_B)
    assert (entry["error_kind"], entry["next_attempt"], entry["attempts"]) == (
        "permanent", None, 1)
    assert runsdb.reset_entry(run_id, RAW_AT_B, by="alice")
    entry = find_entry(runsdb.find_run(run_id), RAW_AT_B)
    assert entry["attempts"] == 0 and entry["next_attempt"] is not None
    assert "error_kind" not in entry
    assert [(h["event"], h["by"]) for h in entry["history"]] == [("failed", "A"),
                                                                 ("retry", "alice")]


def test_reset_of_an_entry_cax_did_not_copy_sends_it_back_to_verifying(runsdb):
    """The DAQ's copy failed AddChecksum: no copy task redoes it, so AddChecksum must."""
    run_id = fresh(runsdb, status=ERROR, attempts=5, next_attempt=None, error="mismatch")
    assert runsdb.reset_entry(run_id, RAW_AT_B, by="alice")
    entry = find_entry(runsdb.find_run(run_id), RAW_AT_B)
    assert entry["status"] == "verifying" and "next_attempt" not in entry
    assert entry["history"][-1]["detail"] == "was error"


def test_remove_claimed_respects_owner_and_status(runsdb):
    run_id = fresh(runsdb, status=TRANSFERRING)
    claim = runsdb.claim(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="A", lease_s=60)
    assert not runsdb.remove_claimed(claim, ERROR)
    assert runsdb.remove_claimed(claim, TRANSFERRING)
    assert find_entry(runsdb.find_run(run_id), RAW_AT_B) is None


def test_claim_purge_refused_while_a_transfer_reads_the_copy(runsdb):
    """Issue 7 item 3: a live copy reading our data blocks its purge, atomically."""
    run_id = fresh(runsdb, status=TRANSFERRING, checksum="adler32:x")
    reader = runsdb.claim(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="push", lease_s=60,
                          fields={"reading": EntryKey("a", "raw").match()})
    assert runsdb.claim_purge(run_id, EntryKey("a", "raw"), keep=(), owner="a",
                              lease_s=60) is None
    assert runsdb.release(reader, unset=("reading",))
    assert runsdb.claim_purge(run_id, EntryKey("a", "raw"), keep=(), owner="a", lease_s=60)


def test_db_clock_is_the_servers_not_this_machines():
    """Leases are judged by one clock: a local clock 90 s ahead changes nothing."""
    server = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    local = server + dt.timedelta(seconds=90)
    clock = DBClock(lambda: server, local=lambda: local)
    assert clock.now() == server


def test_manifest_round_trip(runsdb):
    run_id = fresh(runsdb)
    files = {"a/b.zip": (10, "0000000a"), "c": (0, "00000001")}
    runsdb.save_manifest(run_id, RAW_AT_B, files, "adler32:x", utcnow())
    assert runsdb.find_manifest(run_id, RAW_AT_B) == files
    runsdb.remove_manifest(run_id, RAW_AT_B)
    assert runsdb.find_manifest(run_id, RAW_AT_B) is None


def test_naive_datetimes_are_utc_like_on_a_server(runsdb):
    runsdb.insert_runs([make_run(1, start=dt.datetime(2017, 1, 1, 12))])
    start = runsdb.find_runs({})[0]["start"]
    assert start == dt.datetime(2017, 1, 1, 12, tzinfo=dt.timezone.utc)


def test_read_only_mode_writes_nothing(runsdb_uri):
    db = open_runsdb(*runsdb_uri)
    run_id = fresh(db)
    before = db.find_run(run_id)
    ro = open_runsdb(*runsdb_uri, read_only=True)
    assert ro.add_entry(run_id, {"host": "b", "type": "raw", "status": TRANSFERRING})
    assert ro.reset_entry(run_id, EntryKey("a", "raw"), by="x") is False
    ro.write_heartbeat("x", {"site": "a"})
    assert db.find_run(run_id) == before
    assert db.find_heartbeats() == []


def test_embedded_store_persists_across_clients(tmp_path):
    uri = f"file:{tmp_path / 'db'}"
    first = open_runsdb(uri, create=True)
    first.insert_runs([make_run(7)])
    second = open_runsdb(uri)
    assert [r["number"] for r in second.find_runs({})] == [7]
    run_id = second.find_runs({})[0]["_id"]
    second.add_entry(run_id, {"host": "b", "type": "raw"})
    assert len(first.find_run(run_id)["data"]) == 1  # first sees the second's write


def test_missing_embedded_db_is_an_outage_and_nothing_is_created(tmp_path):
    """Issue 17.10: a store that is not there (moved, unmounted) is an outage for every kind of
    opening -- a dry run, a status view, a registration -- and nothing is created at its path;
    only an explicit ``create`` makes one."""
    for read_only in (True, False):
        with pytest.raises(RunsDBError, match="no embedded runs DB"):
            open_runsdb(f"file:{tmp_path / 'nothing'}", read_only=read_only)
        assert not (tmp_path / "nothing").exists()
    (tmp_path / "mountpoint").mkdir()  # an empty directory is no store either
    with pytest.raises(RunsDBError):
        open_runsdb(f"file:{tmp_path / 'mountpoint'}")
    assert list((tmp_path / "mountpoint").iterdir()) == []
    open_runsdb(f"file:{tmp_path / 'new'}", create=True).close()
    open_runsdb(f"file:{tmp_path / 'new'}", read_only=True).close()


def test_one_place_one_entry_is_refused_in_the_write_itself(runsdb):
    """Invariant (a): a claim naming a place another run's entry names is refused by the unique
    index of places in the same write (the two runs share a name in different detectors, so
    the place names each of them: only the index stands in the way)."""
    from cax.runsdb.base import LocationTakenError

    place = "/data/raw/170101_0000"
    runsdb.register_run(make_run(1, name="170101_0000", data=[
        {"host": "daq", "type": "raw", "status": TRANSFERRED, "location": place}]))
    runsdb.insert_runs([make_run(1, name="170101_0000", detector="tpc-test")])
    other = runsdb.find_runs({"detector": "tpc-test"})[0]
    with pytest.raises(LocationTakenError, match="already names that place"):
        runsdb.claim(other["_id"], EntryKey("daq", "raw"), owner="x", lease_s=60,
                     new_entry={"status": TRANSFERRING, "location": place + "/"}, run=other)
    assert runsdb.find_run(other["_id"])["data"] == []
    runsdb.remove_entry(runsdb.find_runs({"detector": "tpc"})[0]["_id"], EntryKey("daq", "raw"),
                        by="test")  # the place is given up with its entry ...
    assert runsdb.claim(other["_id"], EntryKey("daq", "raw"), owner="x", lease_s=60,
                        new_entry={"status": TRANSFERRING, "location": place}, run=other)


def test_give_back_restores_the_entry_as_it_was_before_the_claim(runsdb):
    """Work that never started (a full batch queue) is no attempt: the entry returns to what
    it was, failure and attempt count included; an entry the claim added is removed."""
    run_id = fresh(runsdb, status=ERROR, attempts=2, error="job failed", next_attempt=None)
    before = find_entry(runsdb.find_run(run_id), RAW_AT_B)
    claim = runsdb.claim(run_id, RAW_AT_B, statuses=[ERROR], owner="A", lease_s=60,
                         fields={"status": TRANSFERRING, "transfer_start": runsdb.now()})
    assert claim and find_entry(runsdb.find_run(run_id), RAW_AT_B)["attempts"] == 3
    assert runsdb.give_back(claim)
    assert find_entry(runsdb.find_run(run_id), RAW_AT_B) == before
    assert not runsdb.give_back(claim)  # no longer ours
    new = EntryKey("c", "raw")
    claim = runsdb.claim(run_id, new, owner="A", lease_s=60, new_entry={"status": TRANSFERRING})
    assert runsdb.give_back(claim)
    assert find_entry(runsdb.find_run(run_id), new) is None
