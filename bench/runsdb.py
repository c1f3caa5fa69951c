"""Benchmark: the embedded runs DB at 1,000, 10,000 and 100,000 runs.

Each size runs in its own process (so its peak RSS is its own): the runs are seeded in one
transaction, each with a raw copy at two sites and a manifest of 100 files per copy, then
claim (add + lease an entry), renew, register (entry transferred + its manifest saved), a query
(one run by number) and an idle pass of every task at one site are timed.  The last line is
the 100k/1k ratio of the per-write cost (claim + renew + register), the anchor being the
1,000-run store measured by the same script on the same machine.

    .venv/bin/python bench/runsdb.py [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SITES = ("daq", "lab")
FILES_PER_RUN = 100
OPS = 30
T0 = dt.datetime(2017, 1, 1, tzinfo=dt.timezone.utc)


def run_doc(n: int) -> dict:
    entries = [{"host": site, "type": "raw", "status": "transferred",
                "location": f"/data/{site}/raw/r{n:06d}", "checksum": f"adler32:{n:08x}",
                "size": FILES_PER_RUN * 1000, "file_count": FILES_PER_RUN,
                "creation_time": T0, "verified_time": T0,
                **({"compared_checksum": f"adler32:{n:08x}|adler32:{n:08x}"}
                   if site == "lab" else {})} for site in SITES]
    return {"number": n, "name": f"r{n:06d}", "detector": "tpc",
            "start": T0 + dt.timedelta(minutes=n), "tags": [], "data": entries,
            "raw_size_byte": FILES_PER_RUN * 1000}


def manifest_doc(run_id: object, n: int, site: str) -> dict:
    files = [[f"r{n:06d}/file{i:03d}.zip", 1000, f"{(n * 131 + i) & 0xffffffff:08x}"]
             for i in range(FILES_PER_RUN)]
    return {"_id": f"{run_id}/{site}/raw/", "run": run_id, "host": site, "type": "raw",
            "pax_version": None, "checksum": f"adler32:{n:08x}", "time": T0, "files": files}


def write_config(root: Path, uri: str) -> Path:
    sites = [{"name": name, "method": "local", "dir_raw": str(root / name / "raw"),
              "data_type": ["raw"], **opts}
             for name, opts in (("daq", {"upload_options": ["lab"], "reference_for": ["raw"]}),
                                ("lab", {"download_options": ["daq"]}))]
    for site in sites:
        Path(site["dir_raw"]).mkdir(parents=True, exist_ok=True)
    path = root / "cax.json"
    path.write_text(json.dumps({"sites": sites, "runs_db": uri, "runs_db_name": "run"}))
    return path


def seed(uri: str, count: int) -> tuple[float, float]:
    """Insert the runs, then their manifests, each in one transaction; return both times."""
    from cax.runsdb import open_runsdb

    db = open_runsdb(uri, create=True)
    start = time.perf_counter()
    ids = db.runs.insert_many(run_doc(n) for n in range(count)).inserted_ids
    runs_s = time.perf_counter() - start
    start = time.perf_counter()
    db.manifests.insert_many(manifest_doc(run_id, n, site)
                             for n, run_id in enumerate(ids) for site in SITES)
    db.close()
    return runs_s, time.perf_counter() - start


def measure(uri: str, config: Path, count: int) -> dict:
    """Time the operations in this process (a fresh client, as a daemon would have)."""
    from cax.cli import make_owner, run_selector
    from cax.config import load_config
    from cax.daemon import Daemon
    from cax.runsdb import TRANSFERRING, EntryKey, open_runsdb
    from cax.tasks import TASKS, Context
    from cax.workers import Background

    db = open_runsdb(uri)
    numbers = [count * i // OPS for i in range(OPS)]
    ids = [db.find_runs({"number": n}, projection={"_id": 1})[0]["_id"] for n in numbers]
    key = EntryKey("tape", "raw")
    files = {f"file{i:03d}.zip": (1000, f"{i:08x}") for i in range(FILES_PER_RUN)}
    timings: dict[str, float] = {}
    claims: dict = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        for run_id in ids:
            assert fn(run_id), name
        timings[name] = (time.perf_counter() - start) / len(ids) * 1000

    def claim(run_id) -> bool:
        claims[run_id] = db.claim(run_id, key, owner="bench", lease_s=600,
                                  new_entry={"status": TRANSFERRING})
        return claims[run_id] is not None

    def register(run_id) -> bool:
        db.save_manifest(run_id, key, files, "adler32:x", db.now())
        return db.register_verified(claims[run_id], {"checksum": "adler32:x"})

    timed("claim", claim)
    timed("renew", lambda run_id: db.renew(claims[run_id], 600))
    timed("register", register)
    timed("query", lambda run_id: len(db.find_runs({"number": numbers[0]})) == 1)
    cfg = load_config(config, "lab")
    ctx = Context(config=cfg, runsdb=db, owner=make_owner("lab"),
                  selector=run_selector(None, None, cfg.datasets_wanted),
                  background=Background(cfg.site.max_transfers), once=True)
    Daemon(ctx, list(TASKS)).run_pass(wait_background=True)  # warm
    start, trips = time.perf_counter(), db.round_trips
    Daemon(ctx, list(TASKS)).run_pass(wait_background=True)
    timings["idle pass"] = (time.perf_counter() - start) * 1000
    timings["idle round trips"] = db.round_trips - trips
    timings["write"] = (timings["claim"] + timings["renew"] + timings["register"]) / 3
    db.close()
    return timings


def child(count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="cax-bench-runsdb-") as tmp:
        root = Path(tmp)
        uri = f"file:{root / 'runsdb'}"
        config = write_config(root, uri)
        runs_s, manifests_s = seed(uri, count)
        seed_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = measure(uri, config, count)
        size = sum(f.stat().st_size for f in (root / "runsdb").iterdir()) / 2**20
        result.update(seed_runs_s=runs_s, seed_manifests_s=manifests_s, seed_rss_mb=seed_rss,
                      store_mb=size,
                      rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--child", type=int)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    rows = {}
    for count in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--child", str(count)], check=True,
                             capture_output=True, text=True, timeout=600).stdout
        rows[count] = json.loads(out.strip().splitlines()[-1])
    columns = ("claim", "renew", "register", "query", "idle pass", "idle round trips",
               "seed_runs_s", "seed_manifests_s", "store_mb", "rss_mb")
    print(f"{'runs':>8} " + " ".join(f"{c:>16}" for c in columns))
    print(f"{'':>8} " + " ".join(f"{u:>16}" for u in ("ms", "ms", "ms", "ms", "ms", "",
                                                       "s", "s", "MB", "peak MB")))
    for count, row in rows.items():
        print(f"{count:>8} " + " ".join(f"{row[c]:>16.1f}" for c in columns))
    small, large = min(rows), max(rows)
    print(f"per-write cost ratio {large // 1000}k/{small // 1000}k: "
          f"{rows[large]['write'] / rows[small]['write']:.2f}")


if __name__ == "__main__":
    main()
