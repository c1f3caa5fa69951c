"""The embedded store's compiled ``$expr`` (``storeexpr``) answers as mongomock does.

Random runs -- entries with and without checksums, origins, judged states, odd values where a
string belongs -- are asked CompareChecksums' query and small expressions of every compiled
operator, in the store and in a plain mongomock collection holding the same runs.
"""

from __future__ import annotations

import os

import bson
import mongomock
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cax.runsdb.store import EmbeddedClient
from cax.runsdb.storeexpr import compile_expr
from cax.tasks.checksum import compare_query

EXAMPLES = int(os.environ.get("CAX_HYPOTHESIS_EXAMPLES", "60"))
checksum = st.one_of(st.sampled_from(["adler32:1", "adler32:2", "", "adler32:1|adler32:2",
                                      "adler32:1|", "adler32:2|adler32:2"]),
                     st.none(), st.just(7), st.just(["x"]))
optional = {"checksum": checksum, "compared_checksum": checksum,
            "compared_with": st.one_of(st.lists(st.sampled_from(["adler32:1", "adler32:2", ""]),
                                                max_size=3), st.none(), st.just("x")),
            "disputed": st.one_of(st.none(), st.just("yes")),
            "pax_version": st.sampled_from(["v1", "v2", None])}
entry = st.fixed_dictionaries({"host": st.sampled_from(["a", "b", "c"]),
                               "type": st.sampled_from(["raw", "processed"]),
                               "status": st.sampled_from(["transferred", "error"])},
                              optional=optional)
origin = st.fixed_dictionaries({"type": st.sampled_from(["raw", "processed"])}, optional={
    "checksum": checksum, "pax_version": st.sampled_from(["v1", "v2"])})
run = st.fixed_dictionaries({"number": st.integers(0, 3)}, optional={
    "data": st.lists(entry, max_size=4),
    "origins": st.one_of(st.lists(origin, max_size=2), st.none())})
EXPRESSIONS = [
    {"$gt": [{"$size": {"$ifNull": ["$data", []]}}, 1]},
    {"$eq": ["$number", 2]}, {"$ne": ["$number", 2.0]}, {"$lte": ["$number", "x"]},
    {"$in": ["$number", [1, 3]]}, {"$not": {"$eq": ["$number", 0]}},
    {"$and": []}, {"$or": [{"$eq": ["$number", 1]}, "$missing"]},
    {"$eq": [{"$concat": [{"$ifNull": [{"$arrayElemAt": [
        {"$map": {"input": "$data", "as": "d", "in": "$$d.host"}}, -1]}, ""]}, "!"]}, "a!"]},
    {"$setEquals": [{"$ifNull": [{"$map": {"input": {"$filter": {
        "input": "$data", "as": "d", "cond": {"$eq": ["$$d.status", "error"]}}}, "as": "d",
        "in": "$$d.type"}}, []]}, ["raw"]]},
    {"$gt": ["$data", None]},  # an array compared: mongomock's, per run
]


def _both(tmp_path_factory, runs):
    store = EmbeddedClient(tmp_path_factory.mktemp("store"))["run"]["runs"]
    reference = mongomock.MongoClient()["run"]["runs"]
    for n, doc in enumerate(runs):
        store.insert_one({"_id": n, **doc})
        reference.insert_one(bson.decode(bson.encode({"_id": n, **doc})))
    return store, reference


def _same(store, reference, query):
    """Both answers equal, where mongomock answers: it fails on some values the server
    compares (a TypeError for an array beside a string, a KeyError for some missing fields),
    and reads ``$not: [x]`` wrongly; the store, evaluating what decides first, may not meet
    the values mongomock fails on."""
    try:
        want = sorted(d["_id"] for d in reference.find(query))
    except (TypeError, KeyError):
        assume(False)
    assert sorted(d["_id"] for d in store.find(query)) == want


@settings(max_examples=EXAMPLES * 2, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(runs=st.lists(run, max_size=8), here=st.sampled_from(["a", "b"]),
       types=st.sampled_from([["raw"], ["raw", "processed"]]))
def test_compare_query_equals_mongomock(tmp_path_factory, runs, here, types):
    store, reference = _both(tmp_path_factory, runs)
    query = compare_query(here, types)
    _same(store, reference, query)
    store.client.close()


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(runs=st.lists(run, max_size=6), expr=st.sampled_from(EXPRESSIONS))
def test_compiled_operators_equal_mongomock(tmp_path_factory, runs, expr):
    store, reference = _both(tmp_path_factory, runs)
    assert compile_expr(expr) is not None
    _same(store, reference, {"$expr": expr})
    store.client.close()


@pytest.mark.parametrize("expr", [{"$add": [1, 2]}, {"$eq": ["$$NOW", 1]}, {"a": 1, "b": 2},
                                  {"$filter": {"input": "$data", "cond": True}}])
def test_what_is_not_compiled_is_left_to_mongomock(expr):
    assert compile_expr(expr) is None
