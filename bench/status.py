"""Benchmark the cax status views on an embedded store seeded with 100,000 runs.

Each run has a verified copy at ``daq`` and one at ``lab``; one run in 1,000 has a stuck copy,
one in 500 a retrying one.  Times (median of the rounds) each view -- default, --stuck,
--summary, --run N -- against the anchor: what the original cax did to learn the same thing,
a full scan of every run document (``find({})``) counted in Python, in the same process.
Also counts the round trips of each view.  The last line is ``ratio status/full-scan <R>``:
the slowest view's time over the anchor's (lower is better; a view must not scan).

    python bench/status.py [--runs 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from cax.admin import status as st
from cax.config import load_config
from cax.runsdb import open_runsdb

CHECKSUM = "adler32:" + "ab" * 32


START = dt.datetime(2017, 1, 1, tzinfo=dt.timezone.utc)


def seed(db, runs: int, start: dt.datetime = START, tape: str | None = None) -> None:
    """Insert the run documents (the store's streamed bulk insert), one every 10 minutes from
    ``start``; with ``tape``, each run also has a copy at that tape site."""
    docs = []
    for n in range(runs):
        when = start + dt.timedelta(minutes=10 * n)
        name = when.strftime("%y%m%d_%H%M")
        lab = {"host": "lab", "type": "raw", "status": "transferred", "checksum": CHECKSUM,
               "location": f"/lab/raw/{name}", "source": "daq", "size": 3_000_000,
               "file_count": 3, "transfer_end": when + dt.timedelta(minutes=50)}
        if n % 1000 == 7:
            lab = {**lab, "status": "error", "attempts": 5, "next_attempt": None,
                   "error": "rsync: No space left on device"}
        elif n % 500 == 3:
            lab = {**lab, "status": "error", "attempts": 1, "next_attempt": when,
                   "error": "ssh: timeout"}
        data = [{"host": "daq", "type": "raw", "status": "transferred", "checksum": CHECKSUM,
                 "location": f"/daq/raw/{name}", "size": 3_000_000, "file_count": 3,
                 "creation_time": when + dt.timedelta(minutes=5)}, lab]
        if tape:
            data.append({"host": tape, "type": "raw", "status": "transferred",
                         "checksum": CHECKSUM, "location": name, "size": 3_000_000,
                         "file_count": 3, "source": "daq",
                         "transfer_end": when + dt.timedelta(minutes=70)})
        docs.append({"number": n, "name": name, "detector": "tpc", "start": when, "tags": [],
                     "data": data})
    db.insert_runs(docs)


def full_scan(db) -> Counter:
    """The anchor: fetch every run and count its copies in Python."""
    counts: Counter = Counter()
    for run in db.runs.find({}):
        for e in run.get("data") or ():
            counts[e.get("host"), e.get("status")] += 1
    return counts


def timed(fn: Callable[[], object], rounds: int, db) -> tuple[float, int]:
    walls = []
    trips = 0
    for _ in range(rounds):
        before = db.round_trips
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        trips = db.round_trips - before
    return statistics.median(walls), trips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "cax.json").write_text(
            '{"runs_db": "file:store", "sites": ['
            '{"name": "daq", "method": "local", "dir_raw": "/daq/raw", "data_type": ["raw"]},'
            '{"name": "lab", "method": "local", "dir_raw": "/lab/raw", "data_type": ["raw"]}]}')
        config = load_config(root / "cax.json", "daq")
        t0 = time.perf_counter()
        db = open_runsdb(config.runs_db, create=True)
        seed(db, args.runs)
        db.find_runs({"number": -1})
        print(f"seeded {args.runs} runs in {time.perf_counter() - t0:.1f} s", flush=True)
        now = st.now_of(db)
        views = {
            "default": lambda: st.overview(db, config, "daq"),
            "--stuck": lambda: st.stuck(db, config, now, "daq"),
            "--summary": lambda: st.summary(db, config, 20),
            "--run N": lambda: st.run_view(db, args.runs // 2),
        }
        anchor, anchor_trips = timed(lambda: full_scan(db), args.rounds, db)
        print(f"anchor full scan: {anchor:.2f} s", flush=True)
        slowest = 0.0
        for name, view in views.items():
            wall, trips = timed(view, args.rounds, db)
            slowest = max(slowest, wall)
            print(f"status {name:<10} {wall:7.3f} s  {trips} round trip(s)", flush=True)
        stuck = len(st.stuck(db, config, now, "daq"))
        print(f"stuck entries found: {stuck} (expected {len(range(7, args.runs, 1000))})")
        db.close()
    print(f"ratio status/full-scan {slowest / anchor:.2f}")


if __name__ == "__main__":
    main()
