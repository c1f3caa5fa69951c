"""Unique indexes in the embedded store, as the MongoDB manual says a server enforces them.

The provenance rule -- a (host, location) is named by at most one entry of all runs -- is the
unique index ``[("data.host", 1), ("data.location", 1)]``: one key per ``data[]`` element, a
missing field indexed as null, the constraint between documents only.  Every write path
(insert, update, find_one_and_update, upsert, replace) is refused with MongoDB's duplicate key
error and writes nothing; an index over data that already breaks it is not created.

mongomock cannot be the reference here: its unique check reads ``data.host`` of an array as
missing, so it enforces nothing per element (see ``test_store_index`` for the top-level keys,
where it agrees with the server).  These expectations are the manual's (Unique Indexes;
Multikey Indexes, "Unique Multikey Index").
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from pymongo.errors import DuplicateKeyError, OperationFailure

from cax.runsdb.store import EmbeddedClient
from cax.runsdb.storefile import FILE_NAME, FORMAT
from cax.runsdb.storeunique import key_values

HOST_LOCATION = [("data.host", 1), ("data.location", 1)]
NAME = "data.host_1_data.location_1"


@pytest.fixture
def runs(tmp_path: Path):
    coll = EmbeddedClient(tmp_path / "store")["run"]["runs_new"]
    assert coll.create_index(HOST_LOCATION, unique=True) == NAME
    yield coll
    coll.client.close()


def entry(host: str, location: str | None = None, **fields) -> dict:
    found = {"host": host, "type": "raw", "status": "transferred", **fields}
    if location is not None:
        found["location"] = location
    return found


def run(number: int, *entries: dict) -> dict:
    return {"_id": number, "number": number, "name": f"r{number}", "data": list(entries)}


def test_a_second_run_naming_a_host_location_is_refused_with_mongodbs_error(runs):
    runs.insert_one(run(1, entry("lab", "/x")))
    with pytest.raises(DuplicateKeyError) as caught:
        runs.insert_one(run(2, entry("daq", "/y"), entry("lab", "/x")))
    assert str(caught.value).startswith(
        'E11000 duplicate key error collection: run.runs_new index: '
        'data.host_1_data.location_1 dup key: { data.host: "lab", data.location: "/x" }')
    assert caught.value.code == 11000
    assert caught.value.details["keyValue"] == {"data.host": "lab", "data.location": "/x"}
    assert runs.find_one({"_id": 2}) is None  # nothing written, not even its other entry
    runs.insert_one(run(3, entry("daq", "/y")))  # nor its key taken


def test_keys_are_per_entry_not_every_host_with_every_location(runs):
    runs.insert_one(run(1, entry("lab", "/x"), entry("daq", "/y")))
    runs.insert_one(run(2, entry("lab", "/y"), entry("daq", "/x")))  # other pairs: allowed
    assert [d["_id"] for d in runs.find({})] == [1, 2]


def test_one_run_may_repeat_its_own_key(runs):
    """The constraint is between documents: the manual's ``{a: [{b: 5}, {b: 5}]}``."""
    runs.insert_one(run(1, entry("lab", "/x"), entry("lab", "/x", type="processed")))
    assert runs.update_one({"_id": 1}, {"$push": {"data": entry("lab", "/x", type="x")}}
                           ).modified_count == 1
    assert len(runs.find_one({"_id": 1})["data"]) == 3


def test_a_missing_location_is_null_so_only_one_run_may_lack_it_per_host(runs):
    runs.insert_one(run(1, entry("lab")))
    runs.insert_one(run(2, entry("daq")))  # (daq, null) is another key
    with pytest.raises(DuplicateKeyError, match=r'dup key: \{ data.host: "lab", '
                                               r'data.location: null \}'):
        runs.insert_one(run(3, entry("lab")))


def test_runs_without_entries_share_the_null_key(runs):
    """No ``data``, or an empty one: the key (null, null), as on a server; a second is refused."""
    runs.insert_one({"_id": 1, "number": 1})
    with pytest.raises(DuplicateKeyError, match=r"data.host: null, data.location: null"):
        runs.insert_one({"_id": 2, "number": 2, "data": []})


def test_an_explicit_null_location_equals_a_missing_one(runs):
    runs.insert_one(run(1, entry("lab")))
    with pytest.raises(DuplicateKeyError):
        runs.insert_one(run(2, {**entry("lab"), "location": None}))


def test_numbers_are_one_key_whatever_their_type(tmp_path):
    coll = EmbeddedClient(tmp_path)["run"]["runs"]
    coll.create_index([("number", 1)], unique=True)
    coll.insert_one({"_id": 1, "number": 7})
    with pytest.raises(DuplicateKeyError, match=r"index: number_1 dup key: \{ number: 7 \}"):
        coll.insert_one({"_id": 2, "number": 7.0})
    coll.insert_one({"_id": 3, "number": 7.5})
    coll.insert_one({"_id": 4})  # the one document without a number
    with pytest.raises(DuplicateKeyError, match=r"number: null"):
        coll.insert_one({"_id": 5, "name": "no number either"})


def test_every_write_path_is_refused_and_writes_nothing(runs):
    runs.insert_one(run(1, entry("lab", "/x")))
    runs.insert_one(run(2, entry("lab", "/y")))
    before = list(runs.find({}))
    generation = runs.client.generation()
    taken = entry("lab", "/x")
    attempts = [
        lambda: runs.update_one({"_id": 2}, {"$push": {"data": taken}}),
        lambda: runs.update_many({"number": {"$gte": 2}}, {"$set": {"data.0.location": "/x"}}),
        lambda: runs.find_one_and_update({"_id": 2, "data": {"$elemMatch": {"host": "lab"}}},
                                         {"$set": {"data.$.location": "/x"}}),
        lambda: runs.update_one({"_id": 3}, {"$set": {"data": [taken]}}, upsert=True),
        lambda: runs.replace_one({"_id": 2}, run(2, taken)),
        lambda: runs.replace_one({"_id": 9}, run(9, taken), upsert=True),
        lambda: runs.insert_many([run(5, entry("lab", "/new")), run(6, taken)]),
    ]
    for attempt in attempts:
        with pytest.raises(DuplicateKeyError):
            attempt()
    assert list(runs.find({})) == before
    assert runs.client.generation() == generation  # not one transaction committed
    # (pymongo's insert_many raises BulkWriteError after inserting the documents before the
    # duplicate; the embedded store inserts a batch in one transaction: all or nothing)


def test_a_key_given_up_is_free_for_another_run(runs):
    runs.insert_one(run(1, entry("lab", "/x")))
    runs.insert_one(run(2, entry("lab", "/y")))
    runs.update_one({"_id": 1, "data.host": "lab"}, {"$set": {"data.$.location": "/z"}})
    runs.update_one({"_id": 2, "data.host": "lab"}, {"$set": {"data.$.location": "/x"}})
    runs.delete_one({"_id": 1})
    runs.insert_one(run(3, entry("lab", "/z")))
    runs.update_one({"_id": 3}, {"$pull": {"data": {"host": "lab"}}})
    runs.insert_one(run(4, entry("lab", "/z")))
    assert {d["_id"]: d["data"][0]["location"] for d in runs.find({"data.host": "lab"})} == \
        {2: "/x", 4: "/z"}


def test_creating_it_over_duplicates_fails_and_leaves_no_index(tmp_path):
    coll = EmbeddedClient(tmp_path)["run"]["runs_new"]
    coll.insert_many([run(1, entry("lab", "/x")), run(2, entry("lab", "/y")),
                      run(3, entry("daq", "/z"), entry("lab", "/y"))])
    with pytest.raises(DuplicateKeyError) as caught:
        coll.create_index(HOST_LOCATION, unique=True)
    assert isinstance(caught.value, OperationFailure) and caught.value.code == 11000
    assert 'dup key: { data.host: "lab", data.location: "/y" }' in str(caught.value)
    assert NAME not in coll.index_information()
    coll.insert_one(run(4, entry("lab", "/x")))  # nothing enforced
    coll.delete_many({"_id": {"$in": [3, 4]}})
    assert coll.create_index(HOST_LOCATION, unique=True) == NAME
    assert coll.index_information()[NAME] == {"key": HOST_LOCATION, "unique": True}


def test_declaring_it_again_is_harmless_and_a_conflict_is_mongodbs(runs):
    runs.insert_one(run(1, entry("lab", "/x")))
    assert runs.create_index(HOST_LOCATION, unique=True) == NAME
    with pytest.raises(OperationFailure) as caught:
        runs.create_index(HOST_LOCATION)  # same name, not unique
    assert caught.value.code == 85
    with pytest.raises(OperationFailure) as caught:
        runs.create_index([("data.host", 1)], name=NAME, unique=True)
    assert caught.value.code == 86
    with pytest.raises(DuplicateKeyError):
        runs.insert_one(run(2, entry("lab", "/x")))


def test_options_that_would_change_the_rule_are_refused_not_ignored(tmp_path):
    coll = EmbeddedClient(tmp_path)["run"]["runs_new"]
    for options, message in (({"sparse": True}, "does not keep unique indexes with"),
                             ({"partialFilterExpression": {"data.location": "/x"}},
                              "partial indexes of"),
                             ({"partialFilterExpression": {}}, "partial indexes of")):
        with pytest.raises(OperationFailure, match=message):
            coll.create_index(HOST_LOCATION, unique=True, **options)
    assert list(coll.index_information()) == ["_id_"]
    coll.create_index(HOST_LOCATION, unique=True, background=True)  # a server's detail


def test_a_partial_index_keys_only_the_documents_its_filter_matches(tmp_path):
    """As on MongoDB: with ``partialFilterExpression: {data.location: {$exists: true}}``, runs
    whose entries name no place (a new run of the DAQ, no entries yet) are not indexed at all,
    so they never collide on null keys; every entry of a run that names a place is."""
    coll = EmbeddedClient(tmp_path)["run"]["runs_new"]
    coll.create_index(HOST_LOCATION, unique=True, name="places",
                      partialFilterExpression={"data.location": {"$exists": True}})
    coll.insert_many([run(1), run(2), run(3, entry("lab")), run(4, entry("lab"))])
    coll.insert_one(run(5, entry("lab", "/x")))
    with pytest.raises(DuplicateKeyError):
        coll.insert_one(run(6, entry("lab", "/x")))
    coll.insert_one(run(7, entry("lab", "/y"), entry("daq")))
    with pytest.raises(DuplicateKeyError):  # (daq, null) of an indexed run, as on a server
        coll.insert_one(run(8, entry("lab", "/z"), entry("daq")))
    with pytest.raises(OperationFailure, match="same name"):
        coll.create_index(HOST_LOCATION, unique=True, name="places")


def test_the_index_holds_for_every_client_and_after_reopening(tmp_path):
    first = EmbeddedClient(tmp_path)["run"]["runs_new"]
    first.create_index(HOST_LOCATION, unique=True)
    first.insert_one(run(1, entry("lab", "/x")))
    other = EmbeddedClient(tmp_path)["run"]["runs_new"]  # another daemon's client
    with pytest.raises(DuplicateKeyError):
        other.insert_one(run(2, entry("lab", "/x")))
    first.client.close()
    other.client.close()
    again = EmbeddedClient(tmp_path)["run"]["runs_new"]
    with pytest.raises(DuplicateKeyError):
        again.update_one({"_id": 3}, {"$setOnInsert": {"data": [entry("lab", "/x")]}},
                         upsert=True)


def test_dropping_the_collection_drops_its_indexes(runs):
    runs.insert_one(run(1, entry("lab", "/x")))
    runs.drop()
    assert list(runs.index_information()) == ["_id_"]
    runs.insert_many([run(1, entry("lab", "/x")), run(2, entry("lab", "/x"))])


def test_a_duplicate_id_gets_mongodbs_message(runs):
    runs.insert_one(run(1, entry("lab", "/x")))
    with pytest.raises(DuplicateKeyError, match=r"index: _id_ dup key: \{ _id: 1 \}"):
        runs.insert_one(run(1, entry("lab", "/other")))


def test_parallel_arrays_cannot_be_indexed(tmp_path):
    coll = EmbeddedClient(tmp_path)["run"]["c"]
    coll.create_index([("a", 1), ("b", 1)], unique=True)
    coll.insert_one({"_id": 1, "a": [1, 2], "b": 3})  # one array: a key per element
    with pytest.raises(DuplicateKeyError):
        coll.insert_one({"_id": 2, "a": 2, "b": 3})
    with pytest.raises(OperationFailure, match="cannot index parallel arrays") as caught:
        coll.insert_one({"_id": 3, "a": [5], "b": [6]})
    assert caught.value.code == 171
    assert coll.find_one({"_id": 3}) is None


@pytest.mark.parametrize(("doc", "keys"), [
    ({"data": [{"host": "a", "location": "/x"}, {"host": "b"}]}, [("a", "/x"), ("b", None)]),
    ({"data": [{"host": "a", "location": "/x"}, {"host": "a", "location": "/x"}]},
     [("a", "/x")]),
    ({"data": []}, [(None, None)]),
    ({}, [(None, None)]),
    ({"data": ["not an entry", {"host": "a"}]}, [(None, None), ("a", None)]),
    ({"data": {"host": "a", "location": "/x"}}, [("a", "/x")]),  # not an array: one key
    ({"data": [{"host": ["a", "b"], "location": "/x"}]}, [("a", "/x"), ("b", "/x")]),
])
def test_keys_follow_the_manuals_multikey_rules(doc, keys):
    assert key_values(doc, HOST_LOCATION) == keys


def _as_format_2(directory: Path) -> None:
    """Turn a store into what cax wrote before unique indexes (format 2)."""
    conn = sqlite3.connect(directory / FILE_NAME)
    conn.execute("DROP INDEX entries_location")
    conn.execute("ALTER TABLE entries DROP COLUMN location")
    conn.execute("DROP TABLE index_keys")
    conn.execute("DROP TABLE indexes")
    conn.execute("UPDATE meta SET value = 2 WHERE name = 'format'")
    conn.commit()
    conn.close()


def test_a_format_2_store_is_upgraded_in_place(tmp_path):
    """A store written before unique indexes opens with its runs, read-only as it is, and
    for writing upgraded: locations indexed, a unique index can be declared."""
    coll = EmbeddedClient(tmp_path)["run"]["runs_new"]
    coll.insert_many([run(n, entry("lab", f"/x{n}"), entry("daq", f"/d{n}"))
                      for n in range(50)])
    coll.client.close()
    _as_format_2(tmp_path)
    read_only = EmbeddedClient(tmp_path, read_only=True)["run"]["runs_new"]
    found = read_only.find({"data": {"$elemMatch": {"host": "lab", "location": "/x7"}}})
    assert [d["_id"] for d in found] == [7]
    assert "location" not in read_only.file.entry_columns
    read_only.client.close()
    again = EmbeddedClient(tmp_path)["run"]["runs_new"]
    assert "location" in again.file.entry_columns
    conn = sqlite3.connect(tmp_path / FILE_NAME)
    assert conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone() == (FORMAT,)
    assert conn.execute("SELECT count(*) FROM entries WHERE location IS NULL").fetchone() == (0,)
    conn.close()
    assert [d["_id"] for d in again.find({"data": {"$elemMatch": {
        "host": "lab", "location": "/x7"}}})] == [7]
    again.create_index(HOST_LOCATION, unique=True)
    with pytest.raises(DuplicateKeyError):
        again.insert_one(run(99, entry("daq", "/d3")))
