"""Benchmark the pages of ``cax web`` on an embedded store seeded with 100,000 runs.

The runs are ``bench/status.py``'s (a verified copy at ``daq`` and one at ``lab`` each, one in
1,000 stuck, one in 500 retrying), the newest started now, so the last 30 days hold about 4,300
of them for the throughput page; with ``--tape-runs N`` the newest N also have a copy at the tape
site ``tape`` (default: every run, as at XENON, where every raw run went to tape).  Each page is
requested through the application (query and rendering, as a browser gets it), the median of
``--rounds``; beside it, the ``cax status`` view it mirrors, timed in the same process.  The
tape report is computed in the background (``cax.web.background``): the page is timed on the
first request (which waits for it at most 0.8 s) and once computed, and the time the report
took to compute is printed beside it.  The
matrix is timed on its first page, two filters (one the index answers, a tag no run has, which
reads every run), and pages 50,000 and 99,950 runs deep.  The throughput page is timed cold (the
first request after the store was opened; ``cax web`` makes it before it serves) and warm.

The last line is ``ratio web/budget <R>``: the slowest page's time over the 1 s budget of
issue 22 (lower is better; above 1 a page misses it).

    python bench/web.py [--runs 100000] [--rounds 3] [--tape-runs N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from status import seed  # noqa: E402  (bench/status.py: the same runs)

from cax.admin import status as st  # noqa: E402
from cax.clock import utcnow  # noqa: E402
from cax.config import load_config  # noqa: E402
from cax.runsdb import open_runsdb  # noqa: E402
from cax.web.app import create_app  # noqa: E402

BUDGET_S = 1.0


class Collector:
    """Stands in for the runs DB while ``seed`` makes the documents."""

    def __init__(self) -> None:
        self.docs: list[dict] = []

    def insert_runs(self, docs: list[dict]) -> None:
        self.docs.extend(docs)


def timed(fn: Callable[[], object], rounds: int) -> float:
    walls = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tape-runs", type=int, default=None,
                        help="runs with a tape copy (default: all)")
    args = parser.parse_args()
    tape_runs = args.runs if args.tape_runs is None else min(args.tape_runs, args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "cax.json").write_text(json.dumps({"runs_db": "file:store", "sites": [
            {"name": "daq", "method": "local", "dir_raw": "/daq/raw", "data_type": ["raw"],
             "upload_options": ["lab", "tape"]},
            {"name": "lab", "method": "local", "dir_raw": "/lab/raw", "data_type": ["raw"]},
            {"name": "tape", "method": "tsm", "data_type": None}]}))
        config = load_config(root / "cax.json", "daq")
        t0 = time.perf_counter()
        writer = open_runsdb(config.runs_db, create=True)
        start = utcnow() - dt.timedelta(minutes=10 * args.runs)
        plain, taped = Collector(), Collector()
        seed(plain, args.runs, start)
        seed(taped, args.runs, start, tape="tape")
        untaped = args.runs - tape_runs
        writer.insert_runs(plain.docs[:untaped] + taped.docs[untaped:])
        writer.close()
        db = open_runsdb(config.runs_db, read_only=True)  # as cax web opens it
        db.find_runs({"number": -1})
        print(f"seeded {args.runs} runs ({tape_runs} with a tape copy) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        slow_db = open_runsdb(config.runs_db, read_only=True)
        client = create_app(config, db, slow_db=slow_db).test_client()

        def page(path: str) -> Callable[[], object]:
            def get() -> object:
                response = client.get(path)
                assert response.status_code == 200, (path, response.status_code)
                return response
            return get

        t0 = time.perf_counter()
        page("/throughput")()
        cold = time.perf_counter() - t0
        print(f"web /throughput (cold, first after opening the store) {cold:7.3f} s",
              flush=True)
        first = client.get("/?format=json").json
        deep = db.find_runs({"number": args.runs // 2}, projection={"number": 1, "start": 1})
        last = db.find_runs({"number": 50}, projection={"number": 1, "start": 1})
        cursor = "{}_{}".format

        def at(run: dict) -> str:
            return cursor(int(run["start"].timestamp() * 1000), run["number"])

        now = st.now_of(db)
        pages = [
            ("/", "status --summary", lambda: st.summary(db, config, 50)),
            ("/?status=error&site=lab", None, None),
            ("/?tag=calibration", None, None),
            (f"/?older={at(deep[0])}", None, None),
            (f"/?older={at(last[0])}", None, None),
            (f"/run/{args.runs // 2}", "status --run N", lambda: st.run_view(db, args.runs // 2)),
            ("/daemons", "status", lambda: st.overview(db, config, None)),
            ("/stuck", "status --stuck --all-sites", lambda: st.stuck(db, config, now, None)),
            ("/throughput", None, None),
        ]
        assert len(first["runs"]) == 50
        slowest, slowest_path = 0.0, ""
        for path, mirror, view in pages:
            wall = timed(page(path), args.rounds)
            if wall > slowest:
                slowest, slowest_path = wall, path
            line = f"web {path:<40} {wall:7.3f} s"
            if view is not None:
                line += f"   ({mirror}: {timed(view, args.rounds):.3f} s)"
            print(line, flush=True)
        # the tape report: computed in the background; the first request waits at most 0.8 s
        t0 = time.perf_counter()
        status = first_status = client.get("/tape").status_code
        asked = time.perf_counter() - t0
        while status != 200:
            time.sleep(0.5)
            status = client.get("/tape?format=json").status_code
        computed = time.perf_counter() - t0
        said = "the report" if first_status == 200 else "'being computed'"
        print(f"web {'/tape (first request: ' + said + ')':<40} {asked:7.3f} s   (report "
              f"computed in the background in {computed:.1f} s: status --tape's query)",
              flush=True)
        cached = timed(page("/tape"), args.rounds)
        print(f"web {'/tape (computed)':<40} {cached:7.3f} s", flush=True)
        for path, wall in (("/tape (first)", asked), ("/tape", cached)):
            if wall > slowest:
                slowest, slowest_path = wall, path
        slow_db.close()
        print(f"slowest page {slowest_path}")
        db.close()
    print(f"ratio web/budget {slowest / BUDGET_S:.2f}")


if __name__ == "__main__":
    main()
