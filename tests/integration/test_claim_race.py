"""Claims are atomic: racing clients, in threads and in separate processes, never win twice."""

from __future__ import annotations

import multiprocessing
import threading

from cax.runsdb import TRANSFERRING, EntryKey, open_runsdb
from tests.conftest import make_run

N_RUNS = 60


def _claim_all(db, owner: str, run_ids: list, results: list) -> None:
    """Try to add and then claim an entry for every run; record what this owner won."""
    for run_id in run_ids:
        if db.add_entry(run_id, {"host": "b", "type": "raw", "status": TRANSFERRING}):
            results.append(("add", run_id))
        if db.claim(run_id, EntryKey("b", "raw"), statuses=[TRANSFERRING], owner=owner,
                    lease_s=600):
            results.append(("claim", run_id))


def _process_worker(uri: str, db_name: str, owner: str, run_ids: list, queue) -> None:
    db = open_runsdb(uri, db_name)
    won: list = []
    _claim_all(db, owner, run_ids, won)
    queue.put([(kind, str(run_id)) for kind, run_id in won])


def _setup(uri: str, db_name: str) -> list:
    db = open_runsdb(uri, db_name)
    db.insert_runs([make_run(i) for i in range(N_RUNS)])
    return [r["_id"] for r in db.find_runs({})]


def _assert_each_once(won: list) -> None:
    for kind in ("add", "claim"):
        ids = [run_id for k, run_id in won if k == kind]
        assert len(ids) == N_RUNS, f"{kind}: {len(ids)} granted for {N_RUNS} runs"
        assert len(set(ids)) == N_RUNS


def test_claims_race_between_threads_granted_once(runsdb_uri):
    run_ids = _setup(*runsdb_uri)
    db = open_runsdb(*runsdb_uri)  # one client shared by the threads, as in the daemon
    won: list = []
    threads = [threading.Thread(target=_claim_all, args=(db, f"t{i}", run_ids, won))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _assert_each_once(won)


def test_claims_race_between_processes_granted_once(runsdb_uri):
    run_ids = _setup(*runsdb_uri)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_process_worker,
                         args=(*runsdb_uri, f"p{i}", run_ids if i % 2 else run_ids[::-1],
                               queue)) for i in range(3)]
    for p in procs:
        p.start()
    won = [item for _ in procs for item in queue.get(timeout=120)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    _assert_each_once(won)
