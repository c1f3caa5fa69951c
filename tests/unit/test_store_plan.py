"""The embedded store's planner: a write at a busy site costs the same at 400 runs as at 4,000.

A claim names one run by ``_id`` and its entry at a site that holds a copy of nearly every run.
The planner must answer it from the ``_id`` row alone, judge the other conditions on that
candidate, and never look up the whole site.  Work is measured in SQLite virtual-machine steps
and decoded documents, never in time, so these tests cannot fail on a busy machine.  The
candidates stay a superset of the matches whatever the order: hypothesis compares the store's
answers with mongomock's on the same documents.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from unittest import mock

import bson
import mongomock
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cax.runsdb import TRANSFERRED, TRANSFERRING, EntryKey, open_runsdb, storeplan
from cax.runsdb.origins import Proof
from cax.runsdb.runs import RunsDB
from cax.runsdb.store import EmbeddedClient
from cax.runsdb.storeplan import ALL, And, Planner, Term, parse
from tests.conftest import REAL_MONGODB, make_run

pytestmark = pytest.mark.skipif(bool(REAL_MONGODB), reason="embedded store only")
EXAMPLES = int(os.environ.get("CAX_HYPOTHESIS_EXAMPLES", "60"))
LAB = EntryKey("lab", "raw")


class FakeReader:
    """An index of ``sizes[term columns]`` rows per term, recording what the planner asks."""

    def __init__(self, rows: dict[tuple, set[int]]):
        self.table = rows
        self.looked_up: list[tuple] = []
        self.probed: list[tuple[tuple, int]] = []
        self.counted: list[tuple[tuple, int]] = []

    def _rows(self, term: Term) -> set[int]:
        return self.table[term.columns]

    def rows(self, term: Term) -> set[int]:
        self.looked_up.append(term.columns)
        return self._rows(term)

    def count(self, term: Term, cap: int) -> int:
        self.counted.append((term.columns, cap))
        return min(len(self._rows(term)), cap)

    def probe(self, term: Term, rows) -> set[int]:
        self.probed.append((term.columns, len(rows)))
        return self._rows(term) & set(rows)


ID = (("_id", (7,)),)
SITE = (("host", ("lab",)), ("type", ("raw",)), ("status", ("transferred",)))
OTHER = (("host", ("daq",)), ("type", ("raw",)))


def test_a_query_naming_an_id_is_answered_from_that_row_alone():
    reader = FakeReader({ID: {7}, SITE: set(range(100_000)), OTHER: set(range(100_000))})
    query = {"_id": 7, "data": {"$elemMatch": {"host": "lab", "type": "raw",
                                               "status": {"$in": ["transferred"]},
                                               "lease_expires": {"$not": {"$gt": 1}}}},
             "$and": [{"data": {"$not": {"$elemMatch": {"host": "daq", "type": "raw"}}}}]}
    found = Planner(reader).plan(query)
    assert found.rows == {7} and not found.complement  # mongomock judges the rest on it
    assert reader.looked_up == [ID]
    assert reader.probed == [] and reader.counted == []


def test_the_most_selective_term_drives_and_the_others_are_probed_on_its_rows():
    error = (("host", ("lab",)), ("status", ("error",)))
    reader = FakeReader({SITE: set(range(100_000)), error: set(range(20)),
                         OTHER: set(range(0, 100_000, 2))})
    query = {"$and": [{"data": {"$elemMatch": {"host": "lab", "type": "raw",
                                               "status": "transferred"}}},
                      {"data": {"$elemMatch": {"host": "lab", "status": "error"}}},
                      {"data": {"$not": {"$elemMatch": {"host": "daq", "type": "raw"}}}}]}
    found = Planner(reader).plan(query)
    assert found.rows == set(range(1, 20, 2))
    assert reader.looked_up == [error]
    assert sorted(reader.probed) == [(OTHER, 20), (SITE, 20)]
    assert all(cap <= 4096 for _, cap in reader.counted)  # no term counted to the end


def test_without_a_positive_term_a_negation_is_a_complement():
    reader = FakeReader({OTHER: {1, 2}})
    found = Planner(reader).plan({"data": {"$not": {"$elemMatch": {"host": "daq",
                                                                    "type": "raw"}}}})
    assert found.complement and found.rows == {1, 2}


def test_an_or_is_the_union_of_its_parts_and_unjudgeable_means_everything():
    a, b = (("host", ("a",)),), (("host", ("b",)),)
    reader = FakeReader({a: {1}, b: {2, 3}})
    found = Planner(reader).plan({"$or": [{"data.host": "a"}, {"data.host": "b"}]})
    assert found.rows == {1, 2, 3} and not found.complement
    assert Planner(reader).plan({"$or": [{"data.host": "a"}, {"x": 1}]}).everything
    assert parse({"x": {"$gt": 1}}) is ALL
    assert isinstance(parse({"_id": 1, "number": 2}), And)


def _steps(db: RunsDB, fn) -> tuple[int, object]:
    """SQLite VM steps (in tens) taken by ``fn``, and what it returned."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    conn = db.runs.file.conn
    conn.set_progress_handler(tick, 10)
    try:
        result = fn()
    finally:
        conn.set_progress_handler(None, 10)
    return steps[0], result


def _populated(path: Path, runs: int) -> RunsDB:
    db = open_runsdb(f"file:{path}", create=True)
    db.insert_runs([make_run(n, data=[
        {"host": site, "type": "raw", "status": TRANSFERRED, "checksum": f"adler32:{n:08x}",
         "location": f"/{site}/raw/{n}"} for site in ("daq", "lab")]) for n in range(runs)])
    return db


def _work_per_write(db: RunsDB, number: int, monkeypatch) -> dict[str, tuple[int, int]]:
    """(VM steps, documents decoded) of each write a task makes at the populated site, and
    of the read that names a copy by its (host, location): the unique key of provenance."""
    run_id = db.find_runs({"number": number}, projection={"_id": 1})[0]["_id"]
    decoded: list[int] = []
    real = bson.decode
    monkeypatch.setattr(bson, "decode", lambda *a, **k: decoded.append(1) or real(*a, **k))
    work = {}

    def measure(name: str, fn):
        decoded.clear()
        steps, result = _steps(db, fn)
        assert result, name
        work[name] = (steps, len(decoded))
        return result

    claim = measure("claim", lambda: db.claim(
        run_id, LAB, owner="o", lease_s=60, statuses=[TRANSFERRED],
        conditions={"checksum": f"adler32:{number:08x}"}, count_attempt=False))
    measure("renew", lambda: db.renew(claim, 60))
    measure("register", lambda: db.register_verified(claim, {"checksum": "adler32:x"},
                                                     proof=Proof()))
    measure("claim new", lambda: db.claim(run_id, EntryKey("lab", "processed", "v1"),
                                          owner="o", lease_s=60,
                                          new_entry={"status": TRANSFERRING}))
    measure("record", lambda: db.record_compared(run_id, LAB, "a|b", ["b"]))
    measure("by location", lambda: db.find_runs_with_location("lab", f"/lab/raw/{number}"))
    monkeypatch.undo()
    return work


def test_work_at_a_populated_site_does_not_grow_with_its_runs(tmp_path, monkeypatch):
    small = _work_per_write(_populated(tmp_path / "small", 400), 200, monkeypatch)
    large = _work_per_write(_populated(tmp_path / "large", 4000), 2000, monkeypatch)
    for name, (steps, decoded) in large.items():
        assert decoded <= 5, f"{name} decoded {decoded} documents"  # query, update, filters
        assert steps <= 1.5 * small[name][0] + 50, \
            f"{name}: {small[name][0]} VM steps (x10) at 400 runs, {steps} at 4,000"


# -- the candidates are a superset, whatever the order: store == mongomock ------------------

hosts = st.sampled_from(["lab", "daq", "tape"])
statuses = st.sampled_from([TRANSFERRED, TRANSFERRING, "error"])
locations = st.sampled_from(["/a", "/b", "/c"])
entry = st.fixed_dictionaries({"host": hosts, "type": st.sampled_from(["raw", "processed"])},
                              optional={"status": statuses, "location": locations,
                                        "checksum": st.sampled_from(["x", "y"])})
document = st.fixed_dictionaries({"number": st.integers(0, 6)},
                                 optional={"data": st.lists(entry, max_size=3)})


def _conditions():
    one = st.one_of(
        st.builds(lambda v: {"_id": v}, st.integers(0, 8)),
        st.builds(lambda v: {"_id": {"$in": v}}, st.lists(st.integers(0, 8), max_size=3)),
        st.builds(lambda v: {"number": v}, st.integers(0, 6)),
        st.builds(lambda h: {"data.host": h}, hosts),
        st.builds(lambda h, s: {"data": {"$elemMatch": {"host": h, "status": s}}}, hosts,
                  statuses),
        st.builds(lambda h, loc: {"data": {"$elemMatch": {"host": h, "location": {
            "$in": [loc, loc + "/"]}}}}, hosts, locations),
        st.builds(lambda h, s: {"data": {"$elemMatch": {"host": h, "status": {"$in": [s]},
                                                        "checksum": "x"}}}, hosts, statuses),
        st.builds(lambda h: {"data": {"$not": {"$elemMatch": {"host": h, "type": "raw"}}}},
                  hosts),
        st.builds(lambda h: {"data": {"$not": {"$elemMatch": {"host": h,
                                                              "checksum": "x"}}}}, hosts),
        st.just({"data.status": {"$ne": "error"}}),
    )
    nested = st.recursive(one, lambda inner: st.one_of(
        st.builds(lambda qs: {"$and": qs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda qs: {"$or": qs}, st.lists(inner, min_size=1, max_size=3))),
        max_leaves=5)
    # conjunctions of two or three terms are what the planner orders: drawn as often as not
    return st.one_of(nested, st.builds(lambda qs: {"$and": qs},
                                       st.lists(one, min_size=2, max_size=3)))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(docs=st.lists(document, max_size=12), query=_conditions(),
       extra=st.lists(_conditions(), max_size=2), eager=st.booleans(),
       probe=st.sampled_from([None, True, False]))
def test_the_store_finds_what_mongomock_finds(tmp_path_factory, docs, query, extra, eager,
                                              probe):
    """``eager``: the planner's thresholds at their smallest, and ``probe`` its choice between
    judging a term on the candidates and looking it up forced, so that a dozen documents take
    every path that 100,000 runs would."""
    with contextlib.ExitStack() as patches:
        if eager:
            patches.enter_context(mock.patch.object(storeplan, "EVALUATE_BELOW", 0))
            patches.enter_context(mock.patch.object(storeplan, "LARGE", 2))
        if probe is not None:
            patches.enter_context(mock.patch.object(
                Planner, "_cheaper_to_probe", lambda self, term, size: probe))
        _compare(tmp_path_factory, docs, query, extra)


def _compare(tmp_path_factory, docs, query, extra):
    store = EmbeddedClient(tmp_path_factory.mktemp("store"))["run"]["runs"]
    reference = mongomock.MongoClient()["run"]["runs"]
    for n, doc in enumerate(docs):
        store.insert_one({"_id": n, **doc})
        reference.insert_one({"_id": n, **doc})
    for part in extra:  # several top-level fields: the planner orders them
        query = {**query, **{k: v for k, v in part.items() if k not in query}}
    assert sorted(d["_id"] for d in store.find(query)) == \
        sorted(d["_id"] for d in reference.find(query))
    store.client.close()


def test_a_renewal_rewrites_the_run_and_no_index(tmp_path):
    """A write that changes no indexed value writes the run's page and the store's counter,
    not the pages of every index (SQLite rewrites the entries of each column it is told to
    SET, changed or not): each page less is less to fsync at every commit."""
    db = _populated(tmp_path / "store", 2000)
    run_id = db.find_runs({"number": 1000}, projection={"_id": 1})[0]["_id"]
    claim = db.claim(run_id, LAB, owner="o", lease_s=60, statuses=[TRANSFERRED],
                     count_attempt=False)
    conn = db.runs.file.conn
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert db.renew(claim, 60)
    frames = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    assert frames <= 3, f"a renewal wrote {frames} pages"


def test_a_regular_expression_on_id_is_a_pattern_not_a_value(tmp_path):
    store = EmbeddedClient(tmp_path)["run"]["runs"]
    store.insert_many([{"_id": "abc"}, {"_id": "xyz"}, {"_id": 7}])
    assert store.find({"_id": re.compile("^a")}) == [{"_id": "abc"}]
    assert store.find({"_id": {"$in": [re.compile("^x"), 7]}}) == [{"_id": "xyz"}, {"_id": 7}]
    assert parse({"_id": re.compile("^a")}) is ALL
