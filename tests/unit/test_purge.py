"""BufferPurger and PurgeProcessed: the decision, the claim race, crash recovery, dry run."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import logging
from collections import namedtuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cax.clock import utcnow
from cax.daemon import Daemon
from cax.runsdb import (
    ERROR,
    PURGING,
    STATUSES,
    TRANSFERRED,
    EntryKey,
    find_entry,
    open_runsdb,
)
from cax.tasks import purge as purge_module
from cax.tasks.purge import (
    BufferPurger,
    PurgePolicy,
    PurgeProcessed,
    decide_processed_purge,
    decide_raw_purge,
    parse_version,
)
from tests.conftest import advance_clock, make_context, make_run
from tests.unit.housekeeping import copy_entry, make_dataset, make_sites

OLD = utcnow() - dt.timedelta(days=30)
NOW = utcnow()


def raw_run(number, *entries, start=OLD):
    return make_run(number, name=f"run{number}", start=start, data=list(entries))


def insert(runsdb, run):
    runsdb.insert_runs([run])
    return runsdb.find_runs({"number": run["number"]})[0]["_id"]


# -- the pure decision ------------------------------------------------------------------------

POLICY = PurgePolicy("a", 2, 7, frozenset({"ref"}), frozenset({"a", "b", "c", "ref", "tsm"}))


GOOD = "adler32:" + "a" * 64


def entries(*hosts, status=TRANSFERRED, **fields):
    fields.setdefault("checksum", GOOD)
    return [{"host": h, "type": "raw", "status": status, "location": f"/{h}/raw/r", **fields}
            for h in hosts]


@pytest.mark.parametrize("data, start, policy, purge", [
    (entries("a", "b", "c"), OLD, POLICY, True),
    (entries("a", "b", "tsm"), OLD, POLICY, True),  # a tape copy counts
    (entries("a", "b"), OLD, POLICY, False),  # one other copy, two needed
    (entries("a", "b", "ghost"), OLD, POLICY, False),  # unconfigured hosts do not count
    (entries("a", "b", "c"), NOW - dt.timedelta(days=3), POLICY, False),  # too young
    (entries("a", "b") + entries("c", status=ERROR), OLD, POLICY, False),
    (entries("a") + entries("b", "c", type="processed"), OLD, POLICY, False),
    (entries("a", status=PURGING) + entries("b", "c"), OLD, POLICY, False),
    (entries("a", "b", "c"), OLD, dataclasses.replace(POLICY, purge_days=None), False),
])
def test_decide_raw_purge_cases_decided_as_expected(data, start, policy, purge):
    run = raw_run(1, *data, start=start)
    assert decide_raw_purge(run, policy, NOW).purge is purge


def test_decide_raw_purge_reference_site_needs_another_reference_copy():
    policy = PurgePolicy("ref", 1, 7, frozenset({"ref", "ref2"}),
                         frozenset({"ref", "ref2", "b", "c"}))
    assert not decide_raw_purge(raw_run(1, *entries("ref", "b", "c")), policy, NOW).purge
    decision = decide_raw_purge(raw_run(1, *entries("ref", "b", "ref2")), policy, NOW)
    assert decision.purge and [k.host for k, _ in decision.keep] == ["ref2"]


def test_decide_raw_purge_copy_with_other_checksum_not_counted():
    good, bad = "adler32:" + "a" * 64, "adler32:" + "b" * 64
    run = raw_run(1, *entries("a", "b", checksum=good), *entries("c", checksum=bad))
    assert not decide_raw_purge(run, POLICY, NOW).purge
    run = raw_run(1, *entries("a", "b", "c", checksum=good))
    decision = decide_raw_purge(run, POLICY, NOW)
    assert decision.purge and all(extra == {"checksum": good} for _, extra in decision.keep)


def test_parse_version_compares_numerically():
    assert parse_version("v6.10.0") > parse_version("v6.9.1")
    assert parse_version("v6.10") < parse_version("v6.10.0")
    assert parse_version("latest") is None and parse_version(None) is None


def processed(host, version, status=TRANSFERRED):
    return {"host": host, "type": "processed", "pax_version": version, "status": status,
            "location": f"/{host}/processed/pax_{version}/r.root", "checksum": GOOD}


@pytest.mark.parametrize("data, purge", [
    ([processed("a", "v6.9.1"), processed("a", "v6.10.0")], True),
    ([processed("a", "v6.9.1"), processed("a", "v6.8.0")], False),  # only older here
    ([processed("a", "v6.9.1"), processed("b", "v6.10.0")], False),  # newer, but elsewhere
    ([processed("a", "v6.9.1"), processed("a", "v6.10.0", ERROR)], False),
])
def test_decide_processed_purge_only_with_newer_version_here(data, purge):
    assert decide_processed_purge(raw_run(1, *data), "a", "v6.9.1").purge is purge


# -- the property: never below min_copies, never the last reference copy ----------------------

SITES = ("s0", "s1", "s2", "s3")
NUMBERS = itertools.count(1)  # one run per example, in one runs DB
Scenario = namedtuple("Scenario", "data refs min_copies purge_days age order interleave")


@st.composite
def scenarios(draw):
    data = []
    for host in (*SITES, "ghost"):
        if draw(st.booleans()):
            data.append({"host": host, "type": draw(st.sampled_from(["raw"] * 4 + ["processed"])),
                         "status": draw(st.sampled_from([TRANSFERRED] * 4 + list(STATUSES))),
                         "location": f"/{host}/r",
                         "checksum": draw(st.sampled_from([None, "adler32:" + "a" * 64,
                                                           "adler32:" + "b" * 64]))})
    return Scenario(
        data, draw(st.frozensets(st.sampled_from(SITES))),
        {s: draw(st.integers(1, 3)) for s in SITES},
        {s: draw(st.sampled_from([None, 0, 5, 5, 50])) for s in SITES},
        draw(st.floats(0, 100)), draw(st.permutations(SITES)), draw(st.booleans()))


def verified(run, hosts):
    return {e["host"] for e in run["data"]
            if e["type"] == "raw" and e["status"] == TRANSFERRED and e["host"] in hosts
            and e.get("checksum")}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
def test_purge_decision_and_claim_never_drop_below_min_copies(runsdb, scenario):
    now = utcnow()
    number = next(NUMBERS)
    data = [{**e, "location": f"{e['location']}{number}"} for e in scenario.data]  # its own
    run_id = insert(runsdb, make_run(number, start=now - dt.timedelta(days=scenario.age),
                                     data=data))
    initial = runsdb.find_run(run_id)
    purged = []

    def policy(site):
        return PurgePolicy(site, scenario.min_copies[site], scenario.purge_days[site],
                           scenario.refs, frozenset(SITES))

    def attempt(site, decision):
        if not decision.purge:
            return
        before = runsdb.find_run(run_id)
        claim = runsdb.claim_purge(run_id, EntryKey(site, "raw"), keep=decision.keep,
                                   owner=site, lease_s=60)
        if not claim:
            return
        others = verified(before, set(SITES) - {site})
        assert len(others) >= scenario.min_copies[site]
        assert site not in scenario.refs or others & scenario.refs
        assert scenario.age >= scenario.purge_days[site]
        assert runsdb.remove_claimed(claim, PURGING)
        purged.append(site)

    decisions = {}
    for site in scenario.order:  # interleaved: every site decides on the same old state
        state = initial if scenario.interleave else runsdb.find_run(run_id)
        decisions[site] = decide_raw_purge(state, policy(site), now)
        if not scenario.interleave:
            attempt(site, decisions[site])
    if scenario.interleave:
        for site in scenario.order:
            attempt(site, decisions[site])
    final = runsdb.find_run(run_id)
    if purged:
        assert len(verified(final, SITES)) >= min(scenario.min_copies[s] for s in purged)
    if verified(initial, scenario.refs):
        assert verified(final, scenario.refs)


# -- the tasks ----------------------------------------------------------------------------------

@pytest.fixture
def sites(tmp_path, runsdb_uri):
    return make_sites(tmp_path, runsdb_uri,
                      a={"purge": 7, "min_copies": 1}, b={"purge": 7, "min_copies": 1},
                      c={"purge": 7, "min_copies": 2}, tsm={"method": "tsm"})


def dataset(tmp_path, site, name="run1"):
    return make_dataset(tmp_path / site / "raw" / name)


def run_on_a_and_b(number, here, start=OLD):
    """Run ``number``: its copy ``here`` on site a, and a like one on site b."""
    return raw_run(number, copy_entry("a", here),
                   copy_entry("b", f"/b/raw/run{number}", like=here), start=start)


def test_buffer_purger_enough_copies_deletes_data_then_entry_and_manifest(
        sites, runsdb, tmp_path):
    here, there = dataset(tmp_path, "c"), dataset(tmp_path, "b")
    run_id = insert(runsdb, raw_run(1, copy_entry("c", here), copy_entry("b", there),
                                    copy_entry("tsm", "/tape/run1", like=here)))
    runsdb.save_manifest(run_id, EntryKey("c", "raw"), {}, "x", utcnow())
    result = Daemon(make_context(sites, "c", runsdb), [BufferPurger]).run_pass()
    assert result.failed == 0
    assert not here.exists() and there.exists()
    run = runsdb.find_run(run_id)
    assert find_entry(run, EntryKey("c", "raw")) is None
    assert find_entry(run, EntryKey("b", "raw"))["status"] == TRANSFERRED
    assert runsdb.find_manifest(run_id, EntryKey("c", "raw")) is None


def test_buffer_purger_too_few_copies_or_young_run_keeps_data(sites, runsdb, tmp_path):
    young = dataset(tmp_path, "c", "young")
    lonely = dataset(tmp_path, "c", "lonely")
    insert(runsdb, raw_run(1, copy_entry("c", young), copy_entry("b", "/b/raw/young", like=young),
                           copy_entry("a", "/a/raw/young", like=young), start=utcnow()))
    insert(runsdb, raw_run(2, copy_entry("c", lonely),
                           copy_entry("b", "/b/raw/lonely", like=lonely)))
    ctx = make_context(sites, "c", runsdb)
    Daemon(ctx, [BufferPurger]).run_pass()
    assert young.exists() and lonely.exists()
    assert runsdb.find_runs(BufferPurger(ctx).query()) == []  # an idle pass fetches nothing


def test_buffer_purger_two_sites_purging_each_others_copy_only_one_wins(
        sites, runsdb, tmp_path):
    copy_a, copy_b = dataset(tmp_path, "a"), dataset(tmp_path, "b")
    run_id = insert(runsdb, raw_run(1, copy_entry("a", copy_a), copy_entry("b", copy_b)))
    tasks = [BufferPurger(make_context(sites, site, runsdb)) for site in ("a", "b")]
    for task in tasks:  # both decide on the same state ...
        for run in runsdb.find_runs(task.query()):
            task.each_run(run)
        assert len(task.candidates) == 1
    for task in tasks:  # ... then both claim
        task.finish()
    assert copy_a.exists() != copy_b.exists()
    data = runsdb.find_run(run_id)["data"]
    assert len(data) == 1 and data[0]["status"] == TRANSFERRED
    assert (tmp_path / data[0]["host"] / "raw" / "run1").exists()


def test_buffer_purger_crash_after_claim_resumes_after_lease_expiry(sites, runsdb, tmp_path):
    here = dataset(tmp_path, "a")
    run_id = insert(runsdb, run_on_a_and_b(1, here))
    ctx = make_context(sites, "a", runsdb)
    decision = decide_raw_purge(runsdb.find_run(run_id), BufferPurger(ctx).policy, utcnow())
    assert runsdb.claim_purge(run_id, EntryKey("a", "raw"), keep=decision.keep,
                              owner="dead-daemon", lease_s=30)
    (here / "f001.zip").unlink()  # the crash came in the middle of the deletion
    Daemon(ctx, [BufferPurger]).run_pass()  # the lease still holds: hands off
    assert here.exists()
    assert find_entry(runsdb.find_run(run_id), EntryKey("a", "raw"))["status"] == PURGING
    advance_clock(runsdb, 60)
    assert Daemon(ctx, [BufferPurger]).run_pass().failed == 0
    assert not here.exists()
    assert find_entry(runsdb.find_run(run_id), EntryKey("a", "raw")) is None


def test_buffer_purger_failed_delete_keeps_purging_and_next_pass_finishes(
        sites, runsdb, tmp_path, monkeypatch):
    here = dataset(tmp_path, "a")
    run_id = insert(runsdb, run_on_a_and_b(1, here))
    ctx = make_context(sites, "a", runsdb)
    real_remove = purge_module.siteops.remove

    def broken(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(purge_module.siteops, "remove", broken)
    assert Daemon(ctx, [BufferPurger]).run_pass().failed == 1
    entry = find_entry(runsdb.find_run(run_id), EntryKey("a", "raw"))
    assert entry["status"] == PURGING and "lease_owner" not in entry
    monkeypatch.setattr(purge_module.siteops, "remove", real_remove)
    assert Daemon(ctx, [BufferPurger]).run_pass().failed == 0
    assert not here.exists() and find_entry(runsdb.find_run(run_id), EntryKey("a", "raw")) is None


@pytest.mark.parametrize("mode", ["dry_run", "no_db_update"])
def test_buffer_purger_dry_run_or_no_db_update_deletes_nothing(
        sites, runsdb, runsdb_uri, tmp_path, caplog, mode):
    here = dataset(tmp_path, "a")
    run_id = insert(runsdb, run_on_a_and_b(1, here))
    before = runsdb.find_run(run_id)
    read_only = open_runsdb(*runsdb_uri, read_only=True)
    caplog.set_level(logging.INFO)
    try:
        ctx = make_context(sites, "a", read_only, dry_run=mode == "dry_run")
        assert Daemon(ctx, [BufferPurger]).run_pass().failed == 0
    finally:
        read_only.close()
    assert here.exists() and runsdb.find_run(run_id) == before
    if mode == "dry_run":
        assert f"dry run: would purge run 1 (run1) raw at {here}" in caplog.text


def test_buffer_purger_free_space_target_purges_oldest_first_then_stops(
        tmp_path, runsdb_uri, runsdb, monkeypatch):
    config = make_sites(tmp_path, runsdb_uri, b={},
                        a={"purge": 7, "min_copies": 1, "purge_free_below": 0.25})
    paths = {n: dataset(tmp_path, "a", f"run{n}") for n in (1, 2, 3)}
    for n, path in paths.items():
        # run 3 is the oldest
        insert(runsdb, run_on_a_and_b(n, path, start=OLD - dt.timedelta(days=10 * n)))
    usage = namedtuple("usage", "total used free")

    def disk_usage(path):  # 10% free, plus 10% per purged dataset
        gone = sum(not p.exists() for p in paths.values())
        return usage(100, 90 - 10 * gone, 10 + 10 * gone)

    monkeypatch.setattr(purge_module.shutil, "disk_usage", disk_usage)
    Daemon(make_context(config, "a", runsdb), [BufferPurger]).run_pass()
    assert [p.exists() for p in paths.values()] == [True, False, False]


def test_purge_processed_old_version_dropped_when_newer_is_here(tmp_path, runsdb_uri, runsdb):
    config = make_sites(tmp_path, runsdb_uri, a={"pax_version_purge": "v6.9.1"})
    base = tmp_path / "a" / "processed"
    files = {}
    for version in ("v6.9.1", "v6.10.0"):
        files[version] = base / f"pax_{version}" / "run1.root"
        files[version].parent.mkdir(parents=True)
        files[version].write_bytes(b"x" * 100)
    run_id = insert(runsdb, raw_run(1, *(copy_entry("a", p, data_type="processed", version=v)
                                         for v, p in files.items())))
    assert Daemon(make_context(config, "a", runsdb), [PurgeProcessed]).run_pass().failed == 0
    assert not files["v6.9.1"].exists() and files["v6.10.0"].exists()
    assert [e["pax_version"] for e in runsdb.find_run(run_id)["data"]] == ["v6.10.0"]
