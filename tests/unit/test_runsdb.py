"""The runs-DB module: conditional entries, leases, identity-matched updates, manifests."""

from __future__ import annotations

import datetime as dt

from cax.clock import utcnow
from cax.runsdb import (
    ERROR,
    TRANSFERRED,
    TRANSFERRING,
    EntryKey,
    find_entry,
    open_runsdb,
)
from tests.conftest import make_run

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


def test_claim_entry_held_lease_refused_expired_lease_taken_over(runsdb):
    run_id = fresh(runsdb, status=TRANSFERRING)
    now = utcnow()
    first = runsdb.claim_entry(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="A", now=now,
                               lease_s=60)
    assert first["lease_owner"] == "A"
    assert runsdb.claim_entry(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="B",
                              now=now + dt.timedelta(seconds=59), lease_s=60) is None
    later = now + dt.timedelta(seconds=61)
    taken = runsdb.claim_entry(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="B", now=later,
                               lease_s=60, count_attempt=True)
    assert taken["lease_owner"] == "B" and taken["attempts"] == 1
    # The loser can neither renew nor update any more.
    assert not runsdb.renew_lease(run_id, RAW_AT_B, "A", later, 60)
    assert not runsdb.update_entry(run_id, RAW_AT_B, {"status": TRANSFERRED}, owner="A")
    assert runsdb.update_entry(run_id, RAW_AT_B, {"status": TRANSFERRED}, owner="B", release=True)
    entry = find_entry(runsdb.find_run(run_id), RAW_AT_B)
    assert entry["status"] == TRANSFERRED and "lease_owner" not in entry


def test_claim_entry_only_from_listed_status_and_conditions(runsdb):
    run_id = fresh(runsdb, status=ERROR, attempts=2)
    now = utcnow()
    assert runsdb.claim_entry(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="A", now=now,
                              lease_s=60) is None
    assert runsdb.claim_entry(run_id, RAW_AT_B, statuses=[ERROR], owner="A", now=now, lease_s=60,
                              conditions={"attempts": {"$lt": 2}}) is None
    assert runsdb.claim_entry(run_id, RAW_AT_B, statuses=[ERROR], owner="A", now=now, lease_s=60,
                              conditions={"attempts": {"$lt": 3}}) is not None


def test_claim_entry_updates_the_right_element(runsdb):
    """A positional update must touch the claimed entry, not the first one in the array."""
    run_id = fresh(runsdb, status=TRANSFERRING)
    runsdb.claim_entry(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="A", now=utcnow(),
                       lease_s=60, fields={"location": "/x"})
    run = runsdb.find_run(run_id)
    assert find_entry(run, EntryKey("a", "raw")) == {"host": "a", "type": "raw",
                                                     "status": TRANSFERRED}
    assert find_entry(run, RAW_AT_B)["location"] == "/x"


def test_update_entry_matches_identity_not_snapshot(runsdb):
    run_id = fresh(runsdb, status=TRANSFERRING, location="/x")
    runsdb.update_entry(run_id, RAW_AT_B, {"size": 5})  # someone else changed a field
    assert runsdb.update_entry(run_id, RAW_AT_B, {"status": TRANSFERRED})
    assert find_entry(runsdb.find_run(run_id), RAW_AT_B)["status"] == TRANSFERRED


def test_remove_entry_respects_owner_and_status(runsdb):
    run_id = fresh(runsdb, status=TRANSFERRING)
    runsdb.claim_entry(run_id, RAW_AT_B, statuses=[TRANSFERRING], owner="A", now=utcnow(),
                       lease_s=60)
    assert not runsdb.remove_entry(run_id, RAW_AT_B, owner="B")
    assert not runsdb.remove_entry(run_id, RAW_AT_B, status=ERROR)
    assert runsdb.remove_entry(run_id, RAW_AT_B, owner="A")
    assert find_entry(runsdb.find_run(run_id), RAW_AT_B) is None


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
    assert ro.update_entry(run_id, EntryKey("a", "raw"), {"status": ERROR})
    ro.write_heartbeat("x", {"site": "a"})
    assert db.find_run(run_id) == before
    assert db.find_heartbeats() == []


def test_embedded_store_persists_across_clients(tmp_path):
    uri = f"file:{tmp_path / 'db'}"
    first = open_runsdb(uri)
    first.insert_runs([make_run(7)])
    second = open_runsdb(uri)
    assert [r["number"] for r in second.find_runs({})] == [7]
    run_id = second.find_runs({})[0]["_id"]
    second.add_entry(run_id, {"host": "b", "type": "raw"})
    assert len(first.find_run(run_id)["data"]) == 1  # first sees the second's write


def test_dry_run_on_missing_embedded_db_creates_nothing(tmp_path):
    import pytest

    from cax.errors import RunsDBError

    with pytest.raises(RunsDBError):
        open_runsdb(f"file:{tmp_path / 'nothing'}", read_only=True)
    assert not (tmp_path / "nothing").exists()
