"""The embedded store at a site that holds most runs (issue 19): what keeps an idle pass and the
first pass after an import cheap, checked for being right as well as cheap.

* ``entries.verified`` answers Scrub's "not verified since" (a time that moves every pass) as an
  index range, ``entries.disputed`` the stuck views' disputed copies: the answers equal
  mongomock's, whatever ``verified_time`` and ``disputed`` hold;
* a remembered answer is brought up to date from the documents written since, by any client;
* ``bulk_write`` applies its updates in one transaction, or none of them;
* the names of ``tags`` are indexed (cax web's tag filter), equal to mongomock whatever ``tags``
  holds.
"""

from __future__ import annotations

import datetime as dt
import os

import bson
import mongomock
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import InsertOne, UpdateOne
from pymongo.errors import DuplicateKeyError, OperationFailure

from cax.runsdb import store as store_module
from cax.runsdb.store import EmbeddedClient

EXAMPLES = int(os.environ.get("CAX_HYPOTHESIS_EXAMPLES", "60"))
T1, T2 = dt.datetime(2017, 1, 1), dt.datetime(2017, 6, 1)
verified = st.one_of(st.none(), st.sampled_from([T1, T2, "2017-01-01", 5]),
                     st.datetimes(dt.datetime(2016, 6, 1), dt.datetime(2017, 12, 1)))
entry = st.fixed_dictionaries({"host": st.sampled_from(["a", "b"]),
                               "status": st.sampled_from(["transferred", "error"])},
                              optional={"verified_time": verified,
                                        "disputed": st.sampled_from([None, "x"])})
document = st.fixed_dictionaries({"number": st.integers(0, 5),
                                  "data": st.lists(entry, max_size=3)})
QUERIES = [
    {"data": {"$elemMatch": {"host": "a", "status": "transferred",
                             "verified_time": {"$not": {"$gte": T2}}}}},
    {"data": {"$elemMatch": {"host": "a", "verified_time": {"$not": {"$gt": T1}}}}},
    {"data": {"$elemMatch": {"verified_time": {"$lt": T2}}}},
    {"data": {"$elemMatch": {"verified_time": {"$gte": T1, "$lt": T2}}}},
    {"data": {"$elemMatch": {"verified_time": {"$gt": T1}}}},
    {"data": {"$elemMatch": {"verified_time": T1}}},
    {"data": {"$elemMatch": {"verified_time": {"$lte": T1}, "host": "b"}}},
    {"data": {"$not": {"$elemMatch": {"host": "a", "verified_time": {"$lt": T2}}}}},
    {"data": {"$elemMatch": {"verified_time": {"$not": {"$lt": T2}}}}},
    {"data.verified_time": {"$lt": T2}},
    {"data": {"$elemMatch": {"disputed": {"$exists": True}}}},
    {"data": {"$elemMatch": {"host": "a", "disputed": {"$exists": False}}}},
    {"data": {"$not": {"$elemMatch": {"disputed": {"$exists": 1}}}}},
    {"$or": [{"data": {"$elemMatch": {"status": "error"}}},
             {"data": {"$elemMatch": {"disputed": {"$exists": True}}}}]},
]


tag_name = st.one_of(st.sampled_from(["calib", "blind", 3]), st.none(),
                     st.lists(st.sampled_from(["calib", "x"]), max_size=2))
tag = st.one_of(st.fixed_dictionaries({}, optional={"name": tag_name, "user": st.just("u")}),
                st.just("calib"), st.lists(st.fixed_dictionaries({"name": tag_name}), max_size=1))
tagged = st.fixed_dictionaries({"number": st.integers(0, 5)}, optional={"tags": st.one_of(
    st.lists(tag, max_size=3), st.lists(tag, max_size=3), st.none(), st.just({"name": "calib"}),
    st.just("calib"))})
TAG_QUERIES = [{"tags.name": "calib"}, {"tags.name": {"$in": ["blind", 3]}},
               {"tags.name": "calib", "number": {"$lt": 3}},
               {"$or": [{"tags.name": "blind"}, {"number": 2}]}, {"tags.name": None},
               {"tags.name": {"$ne": "calib"}}, {"tags.name": "nobody"}]


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(docs=st.lists(tagged, max_size=10), query=st.sampled_from(TAG_QUERIES),
       change=st.integers(0, 9))
def test_tag_names_from_the_index_equal_mongomock(tmp_path_factory, docs, query, change):
    store = EmbeddedClient(tmp_path_factory.mktemp("store"))["run"]["runs"]
    reference = mongomock.MongoClient(tz_aware=True)["run"]["runs"]
    for n, doc in enumerate(docs):
        store.insert_one({"_id": n, **doc})
        reference.insert_one(bson.decode(bson.encode({"_id": n, **doc})))
    for collection in (store, reference):  # tags replaced, one document's tags taken away
        collection.update_one({"_id": change}, {"$set": {"tags": [{"name": "blind"}]}})
        collection.update_one({"_id": change // 2}, {"$unset": {"tags": ""}})
    assert sorted(d["_id"] for d in store.find(query)) == \
        sorted(d["_id"] for d in reference.find(query))
    store.client.close()


def test_a_tag_nobody_has_decodes_nothing(tmp_path, monkeypatch):
    store = EmbeddedClient(tmp_path)["run"]["runs"]
    store.insert_many([{"number": n, "start": dt.datetime(2017, 1, 1) + dt.timedelta(minutes=n),
                        "tags": [{"name": "blind"}] if n % 2 else []} for n in range(2000)])
    decoded = []
    real = bson.decode
    monkeypatch.setattr(bson, "decode", lambda *a, **k: decoded.append(1) or real(*a, **k))
    assert store.find({"tags.name": "calibration"}, sort=[("start", -1)], limit=50) == []
    assert len(decoded) <= 1  # the query's own round trip


def scrub_query(cutoff: dt.datetime) -> dict:
    return {"data": {"$elemMatch": {"host": "a", "status": "transferred", "type": {"$in": ["raw"]},
                                    "verified_time": {"$not": {"$gte": cutoff}}}}}


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(docs=st.lists(document, max_size=10), query=st.sampled_from(QUERIES))
def test_verified_time_and_disputed_from_the_index_equal_mongomock(tmp_path_factory, docs,
                                                                     query):
    store = EmbeddedClient(tmp_path_factory.mktemp("store"))["run"]["runs"]
    reference = mongomock.MongoClient(tz_aware=True)["run"]["runs"]
    for n, doc in enumerate(docs):
        store.insert_one({"_id": n, **doc})
        reference.insert_one(bson.decode(bson.encode({"_id": n, **doc})))
    assert sorted(d["_id"] for d in store.find(query)) == \
        sorted(d["_id"] for d in reference.find(query))
    store.client.close()


def test_scrub_at_a_site_verified_yesterday_decodes_nothing(tmp_path, monkeypatch):
    """2,000 copies verified a day ago, the cutoff a week ago: the index range is empty, so
    no run is decoded (before: every run, each pass, as the cutoff moves)."""
    store = EmbeddedClient(tmp_path)["run"]["runs"]
    now = dt.datetime(2026, 12, 7)
    store.insert_many([{"number": n, "data": [
        {"host": "a", "type": "raw", "status": "transferred",
         "verified_time": now - dt.timedelta(days=1)},
        {"host": "b", "type": "raw", "status": "transferred"}]} for n in range(2000)])
    store.update_one({"number": 7}, {"$unset": {"data.0.verified_time": ""}})
    decoded = []
    real = bson.decode
    monkeypatch.setattr(bson, "decode", lambda *a, **k: decoded.append(1) or real(*a, **k))
    for day in range(3):  # three passes, three cutoffs
        found = store.find(scrub_query(now - dt.timedelta(days=7 - day)))
        assert [d["number"] for d in found] == [7]
    assert len(decoded) <= 6  # per pass: the query's own round trip and run 7


PENDING = {"$expr": {"$gt": ["$size", "$done"]}}  # a condition no index holds


def test_a_remembered_answer_sees_every_writer(tmp_path, monkeypatch):
    """The answer of a query the index cannot judge is remembered with the generation it was
    read at; another client's inserts, updates and deletes since are all seen, and an answer
    with nothing written since is read without planning or decoding any other document."""
    mine = EmbeddedClient(tmp_path)["run"]["runs"]
    other = EmbeddedClient(tmp_path)["run"]["runs"]
    mine.insert_many([{"_id": n, "size": 10, "done": 10 if n % 50 else 5} for n in range(400)])
    reference = mongomock.MongoClient()["run"]["runs"]
    reference.insert_many(mine.find({}))

    def same() -> list[int]:
        got = sorted(d["_id"] for d in mine.find(PENDING))
        assert got == sorted(d["_id"] for d in reference.find(PENDING))
        return got

    assert same() == [0, 50, 100, 150, 200, 250, 300, 350]
    for client in (other, reference):
        client.update_one({"_id": 3}, {"$set": {"done": 1}})  # now pending
        client.update_one({"_id": 50}, {"$set": {"done": 10}})  # no longer
        client.delete_one({"_id": 100})
        client.insert_one({"_id": 400, "size": 2, "done": 1})
    assert same() == [0, 3, 150, 200, 250, 300, 350, 400]
    decoded, planned = [], []
    real_decode, real_plan = bson.decode, mine.file.candidates
    monkeypatch.setattr(bson, "decode", lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    monkeypatch.setattr(mine.file, "candidates", lambda *a: planned.append(1) or real_plan(*a))
    assert same() == [0, 3, 150, 200, 250, 300, 350, 400]
    assert planned == [] and len(decoded) <= 9  # the query's round trip and the 8 matches


def test_a_remembered_answer_is_not_kept_for_a_query_on_now(tmp_path):
    store = EmbeddedClient(tmp_path)["run"]["runs"]
    store.insert_many([{"_id": n} for n in range(300)])
    query = {"$expr": {"$lt": ["$_id", 1]}, "x": {"$ne": "$$NOW"}}
    assert [d["_id"] for d in store.find(query)] == [0]
    assert store.client._memo == {}
    assert [d["_id"] for d in store.find({"$expr": {"$lt": ["$_id", 1]}})] == [0]
    assert len(store.client._memo) == 1


def test_bulk_write_applies_all_updates_or_none(tmp_path):
    store = EmbeddedClient(tmp_path)["run"]["runs"]
    store.create_index("name", unique=True)
    store.insert_many([{"_id": 1, "name": "a", "data": [{"host": "x", "n": 0}]},
                       {"_id": 2, "name": "b", "data": [{"host": "x", "n": 0}]}])
    result = store.bulk_write([
        UpdateOne({"_id": 1}, {"$set": {"data.$[e].n": 1}}, array_filters=[{"e.host": "x"}]),
        UpdateOne({"_id": 2}, {"$set": {"v": 1}}),
        UpdateOne({"_id": 3}, {"$set": {"v": 1}}),
        UpdateOne({"_id": 2}, {"$set": {"v": 1}})], ordered=False)
    assert (result.matched_count, result.modified_count) == (3, 2)
    assert store.find_one({"_id": 1})["data"] == [{"host": "x", "n": 1}]
    with pytest.raises(DuplicateKeyError):
        store.bulk_write([UpdateOne({"_id": 1}, {"$set": {"v": 2}}),
                          UpdateOne({"_id": 2}, {"$set": {"name": "a"}})])
    assert store.find_one({"_id": 1}).get("v") is None  # the first was not applied either
    generation = store.client.generation()
    for refused in (InsertOne({"_id": 5}), UpdateOne({"_id": 9}, {"$set": {"v": 1}}, upsert=True),
                    UpdateOne({"_id": 1}, {"$set": {"v": 1}}, hint="name_1")):
        with pytest.raises(OperationFailure, match="bulk_write takes UpdateOne"):
            store.bulk_write([UpdateOne({"_id": 1}, {"$set": {"v": 3}}), refused])
    assert store.client.generation() == generation


def test_memo_limits_hold(tmp_path):
    """An answer of more than MEMO_MATCHES documents is not remembered (it is decoded anyway)."""
    store = EmbeddedClient(tmp_path)["run"]["runs"]
    store.insert_many([{"_id": n} for n in range(300)])
    limit = store_module.MEMO_MATCHES
    try:
        store_module.MEMO_MATCHES = 100
        assert len(store.find({"$expr": {"$gte": ["$_id", 0]}})) == 300
        assert store.client._memo == {}
    finally:
        store_module.MEMO_MATCHES = limit


def test_remembered_lookups_see_every_writer(tmp_path):
    """A copy task's query names the time (so it is planned anew each pass); the large
    lookups it plans with are remembered and brought up to date from what any client wrote
    since: runs gaining and losing a copy, deleted and inserted runs."""
    mine = EmbeddedClient(tmp_path)["run"]["runs"]
    other = EmbeddedClient(tmp_path)["run"]["runs"]
    reference = mongomock.MongoClient()["run"]["runs"]
    runs = [{"_id": n, "data": [{"host": "daq", "type": "raw", "status": "transferred"}] + (
        [{"host": "lab", "type": "raw", "status": "transferred"}] if n % 100 else [])}
        for n in range(1500)]
    mine.insert_many([dict(r) for r in runs])
    reference.insert_many([dict(r) for r in runs])

    def copy_query(now: int) -> dict:
        return {"$and": [{"data": {"$elemMatch": {"host": "daq", "status": "transferred"}}},
                         {"$or": [{"data": {"$not": {"$elemMatch": {"host": "lab",
                                                                      "type": "raw"}}}},
                                  {"data": {"$elemMatch": {"host": "lab", "status": "error",
                                                           "next": {"$lte": now}}}}]}]}

    def same(now: int) -> list[int]:
        got = sorted(d["_id"] for d in mine.find(copy_query(now)))
        assert got == sorted(d["_id"] for d in reference.find(copy_query(now)))
        return got

    assert same(0) == list(range(0, 1500, 100))
    assert mine.client.file.remembered  # the daq and lab lookups
    for client in (other, reference):
        client.update_one({"_id": 5}, {"$pull": {"data": {"host": "lab"}}})  # lost its copy
        client.update_one({"_id": 200}, {"$push": {"data": {"host": "lab", "type": "raw"}}})
        client.update_one({"_id": 7}, {"$set": {"data.1.status": "error", "data.1.next": 1}})
        client.delete_one({"_id": 300})
        client.insert_one({"_id": 2000, "data": [{"host": "daq", "status": "transferred"}]})
    got = same(1)
    assert {5, 7, 2000} <= set(got) and not {200, 300} & set(got)


def test_the_stuck_views_query_decodes_only_the_stuck(tmp_path, monkeypatch):
    """2,000 runs, one copy in error and one disputed: the stuck views' query (sorted, limited)
    decodes those two, not every run (before entries.disputed: all 2,000, 2.6 s at 100,000)."""
    store = EmbeddedClient(tmp_path)["run"]["runs"]
    store.insert_many([{"number": n, "start": dt.datetime(2017, 1, 1) + dt.timedelta(minutes=n),
                        "data": [{"host": "a", "status": "error" if n == 5 else "transferred",
                                  **({"disputed": "x"} if n == 9 else {})}]}
                       for n in range(2000)])
    query = {"$or": [{"data": {"$elemMatch": {"status": "error"}}},
                     {"data": {"$elemMatch": {"disputed": {"$exists": True}}}}]}
    decoded = []
    real = bson.decode
    monkeypatch.setattr(bson, "decode", lambda *a, **k: decoded.append(1) or real(*a, **k))
    found = store.find(query, sort=[("start", -1), ("number", -1)], limit=5000)
    assert [d["number"] for d in found] == [9, 5]
    assert len(decoded) <= 3  # the query's round trip and the two runs


def test_a_lookup_remembered_in_a_write_that_rolled_back_is_forgotten(tmp_path):
    """A lookup made inside a writing transaction sees that transaction's own writes; if it
    rolls back, another client may commit something else under the same generation, and the
    lookup must not be trusted as of it."""
    mine = EmbeddedClient(tmp_path)["run"]["runs"]
    other = EmbeddedClient(tmp_path)["run"]["runs"]
    mine.create_index("name", unique=True)
    mine.insert_many([{"_id": n, "name": f"r{n}", "data": [{"host": "lab"}]}
                      for n in range(1500)])
    lacking = {"data": {"$not": {"$elemMatch": {"host": "lab"}}}}
    with pytest.raises(DuplicateKeyError):
        mine.bulk_write([UpdateOne({"_id": 1}, {"$pull": {"data": {"host": "lab"}}}),
                         UpdateOne(lacking, {"$set": {"x": 1}}),  # plans with the lab lookup
                         UpdateOne({"_id": 2}, {"$set": {"name": "r3"}})])
    other.update_one({"_id": 500}, {"$pull": {"data": {"host": "lab"}}})  # the same generation
    assert [d["_id"] for d in mine.find(lacking)] == [500]
