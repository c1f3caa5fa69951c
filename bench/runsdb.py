"""Benchmark: the embedded runs DB at 1,000, 10,000 and 100,000 runs.

Each size and case runs in its own process (so its peak RSS and its 600 s limit are its own).

``ops``: the runs are seeded in one transaction, each with a raw copy at two sites and a
manifest of 100 files per copy, then timed:

* at a site holding no entry ("tape"): claim (add + lease an entry), renew, register (entry
  transferred + its manifest saved);
* at a site holding a copy of every run ("lab"), as Scrub and CompareChecksums do it: claim of
  the existing ``transferred`` entry, renew, register (verified again);
* a query (one run by number) and an idle pass of every task at one site (every copy
  verified at seeding: nothing is due).

``legacy``: the first pass after importing the original cax's runs: every run has a raw copy
at "daq" and "lab" as the original registered them (sha512 dirhash checksum, no size, no
``verified_time``, never compared), and "lab" holds the bytes (one sparse 100 kB file per
run, so the disk holds nothing).  One pass of every task at "lab" is timed, and the time
spent inside runs-DB operations ("db") apart: the runs DB's share is what must stay small;
the rest is reading bytes (bounded by ``scrub_bytes_per_pass``) and walking directories.

The last line is the worst 100k/1k ratio of the per-write cost over all cases (claim + renew +
register at each site; the legacy pass's runs-DB time per copy it wrote -- sized or scrubbed --
as its writes are bulk writes of many copies each), the anchor being the 1,000-run store
measured by the same script on the same machine.

    .venv/bin/python bench/runsdb.py [--sizes 1000,10000,100000] [--cases ops,legacy]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SITES = ("daq", "lab")
FILES_PER_RUN = 100
OPS = 100
T0 = dt.datetime(2017, 1, 1, tzinfo=dt.timezone.utc)
#: The ``ops`` copies were verified at seeding: nothing is due for Scrub, so the idle pass is
#: idle (a store where every copy is due is the ``legacy`` case).
VERIFIED = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def run_doc(n: int) -> dict:
    entries = [{"host": site, "type": "raw", "status": "transferred",
                "location": f"/data/{site}/raw/r{n:06d}", "checksum": f"adler32:{n:08x}",
                "size": FILES_PER_RUN * 1000, "file_count": FILES_PER_RUN,
                "creation_time": T0, "verified_time": VERIFIED,
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


#: One legacy copy: one file of this many bytes, sparse (reads as zeros, holds no blocks).
LEGACY_BYTES = FILES_PER_RUN * 1000
#: The original's checksum of such a copy: sha512 of the sorted per-file sha512 hex digests.
LEGACY_SUM = hashlib.sha512(hashlib.sha512(bytes(LEGACY_BYTES)).hexdigest().encode()).hexdigest()


def legacy_doc(n: int, root: Path) -> dict:
    """A run as the original cax left it: copies with a sha512 dirhash, no size, unverified."""
    name = f"r{n:06d}"
    entries = [{"host": site, "type": "raw", "status": "transferred",
                "location": str(root / site / "raw" / name), "checksum": LEGACY_SUM,
                "creation_time": T0} for site in SITES]
    return {"number": n, "name": name, "detector": "tpc",
            "start": T0 + dt.timedelta(minutes=n), "tags": [], "data": entries}


def legacy_data(root: Path, count: int) -> None:
    """The bytes of every run at "lab": one sparse file per run's directory."""
    for n in range(count):
        run = root / "lab" / "raw" / f"r{n:06d}"
        run.mkdir()
        with open(run / f"XENON1T-{n:06d}-000000000.zip", "wb") as f:
            f.truncate(LEGACY_BYTES)


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


def daemon_context(db, config: Path):
    from cax.cli import make_owner, run_selector
    from cax.config import load_config
    from cax.tasks import Context
    from cax.workers import Background

    cfg = load_config(config, "lab")
    return Context(config=cfg, runsdb=db, owner=make_owner("lab"),
                   selector=run_selector(None, None, cfg.datasets_wanted),
                   background=Background(cfg.site.max_transfers), once=True)


def measure(uri: str, config: Path, count: int) -> dict:
    """Time the operations in this process (a fresh client, as a daemon would have)."""
    from cax.daemon import Daemon
    from cax.runsdb import TRANSFERRED, TRANSFERRING, EntryKey, open_runsdb
    from cax.runsdb.origins import Proof
    from cax.tasks import TASKS

    db = open_runsdb(uri)
    numbers = [count * i // OPS for i in range(OPS)]
    ids = [db.find_runs({"number": n}, projection={"_id": 1})[0]["_id"] for n in numbers]
    checksums = {run_id: f"adler32:{n:08x}" for run_id, n in zip(ids, numbers, strict=True)}
    tape, lab = EntryKey("tape", "raw"), EntryKey("lab", "raw")
    files = {f"file{i:03d}.zip": (1000, f"{i:08x}") for i in range(FILES_PER_RUN)}
    timings: dict[str, float] = {}
    claims: dict = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        for run_id in ids:
            assert fn(run_id), name
        timings[name] = (time.perf_counter() - start) / len(ids) * 1000

    def claim(run_id) -> bool:
        claims[run_id] = db.claim(run_id, tape, owner="bench", lease_s=600,
                                  new_entry={"status": TRANSFERRING})
        return claims[run_id] is not None

    def register(run_id) -> bool:
        db.save_manifest(run_id, tape, files, "adler32:x", db.now())
        return db.register_verified(claims[run_id], {"checksum": "adler32:x"}, proof=Proof())

    def claim_lab(run_id) -> bool:  # as the checksum tasks claim a verified copy
        claims[run_id] = db.claim(run_id, lab, owner="bench", lease_s=600,
                                  statuses=[TRANSFERRED],
                                  conditions={"checksum": checksums[run_id]},
                                  count_attempt=False)
        return claims[run_id] is not None

    timed("claim", claim)
    timed("renew", lambda run_id: db.renew(claims[run_id], 600))
    timed("register", register)
    timed("claim@lab", claim_lab)
    timed("renew@lab", lambda run_id: db.renew(claims[run_id], 600))
    timed("register@lab", lambda run_id: db.register_verified(
        claims[run_id], {"checksum": checksums[run_id]}, proof=Proof()))
    timed("query", lambda run_id: len(db.find_runs({"number": numbers[0]})) == 1)
    ctx = daemon_context(db, config)
    Daemon(ctx, list(TASKS)).run_pass(wait_background=True)  # warm
    start, trips = time.perf_counter(), db.round_trips
    Daemon(ctx, list(TASKS)).run_pass(wait_background=True)
    timings["idle pass"] = (time.perf_counter() - start) * 1000
    timings["idle round trips"] = db.round_trips - trips
    timings["write"] = (timings["claim"] + timings["renew"] + timings["register"]) / 3
    timings["write@lab"] = (timings["claim@lab"] + timings["renew@lab"]
                            + timings["register@lab"]) / 3
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


class DBTimer:
    """Adds up the wall time spent inside the embedded store's operations."""

    def __init__(self) -> None:
        from contextlib import contextmanager

        from cax.runsdb import store

        self.seconds = 0.0
        self.operations = 0
        real = store.EmbeddedCollection._op.__wrapped__
        timer = self

        @contextmanager
        def timed_op(collection, command, write):
            start = time.perf_counter()
            try:
                yield from real(collection, command, write)
            finally:
                timer.seconds += time.perf_counter() - start
                timer.operations += 1

        store.EmbeddedCollection._op = timed_op


def legacy_child(count: int) -> None:
    """Seed ``count`` legacy runs and their bytes at "lab", then time one pass there."""
    from cax.daemon import Daemon
    from cax.runsdb import open_runsdb
    from cax.tasks import TASKS

    with tempfile.TemporaryDirectory(prefix="cax-bench-runsdb-") as tmp:
        root = Path(tmp)
        uri = f"file:{root / 'runsdb'}"
        config = write_config(root, uri)
        start = time.perf_counter()
        legacy_data(root, count)
        db = open_runsdb(uri, create=True)
        db.runs.insert_many(legacy_doc(n, root) for n in range(count))
        db.close()
        seed_s = time.perf_counter() - start
        timer = DBTimer()
        db = open_runsdb(uri)
        ctx = daemon_context(db, config)
        start, trips, before = time.perf_counter(), db.round_trips, os.times()
        result = Daemon(ctx, list(TASKS)).run_pass(wait_background=True)
        wall = time.perf_counter() - start
        after = os.times()
        verified = db.count_runs({"data": {"$elemMatch": {"host": "lab",
                                                           "verified_time": {"$exists": True}}}})
        compared = db.count_runs({"data": {"$elemMatch": {
            "host": "lab", "compared_checksum": {"$exists": True}}}})
        sized = db.count_runs({"data": {"$elemMatch": {"host": "lab",
                                                       "size": {"$exists": True}}}})
        db.close()
        print(json.dumps({
            "legacy pass s": wall, "legacy db s": timer.seconds,
            "legacy cpu s": (after.user - before.user) + (after.system - before.system),
            "legacy db ops": timer.operations, "legacy round trips": db.round_trips - trips,
            "legacy db per op ms": timer.seconds / max(timer.operations, 1) * 1000,
            "legacy db per copy ms": timer.seconds / max(sized + verified, 1) * 1000,
            "sized": sized, "scrubbed": verified, "compared": compared, "failed": sum(
                o.failed for o in result.outcomes), "legacy seed s": seed_s,
            "legacy rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


OPS_COLUMNS = (("claim", "ms"), ("renew", "ms"), ("register", "ms"), ("claim@lab", "ms"),
               ("renew@lab", "ms"), ("register@lab", "ms"), ("query", "ms"), ("idle pass", "ms"),
               ("idle round trips", ""), ("seed_runs_s", "s"), ("store_mb", "MB"),
               ("rss_mb", "peak MB"))
LEGACY_COLUMNS = (("legacy pass s", "s"), ("legacy db s", "s"), ("legacy cpu s", "s"),
                  ("legacy db ops", ""), ("legacy db per op ms", "ms"),
                  ("legacy db per copy ms", "ms"), ("sized", "copies"), ("scrubbed", "copies"),
                  ("compared", "copies"), ("failed", "runs"), ("legacy rss_mb", "peak MB"))
#: The per-write costs whose 100k/1k ratio the last line reports, and the case of each.
WRITE_COSTS = (("write", "claim+renew+register at an empty site"),
               ("write@lab", "claim+renew+register at a populated site"),
               ("legacy db per copy ms", "the legacy pass's runs-DB time per copy it wrote"))


def table(rows: dict[int, dict], columns: tuple[tuple[str, str], ...]) -> None:
    width = max(16, *(len(c) + 1 for c, _ in columns))
    print(f"{'runs':>8} " + " ".join(f"{c:>{width}}" for c, _ in columns))
    print(f"{'':>8} " + " ".join(f"{u:>{width}}" for _, u in columns))
    for count, row in rows.items():
        print(f"{count:>8} " + " ".join(f"{row[c]:>{width}.1f}" if c in row else
                                        f"{'-':>{width}}" for c, _ in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--cases", default="ops,legacy")
    parser.add_argument("--child", type=int)
    parser.add_argument("--case", default="ops")
    args = parser.parse_args()
    if args.child:
        (legacy_child if args.case == "legacy" else child)(args.child)
        return
    rows: dict[int, dict] = {}
    cases = args.cases.split(",")
    for count in (int(s) for s in args.sizes.split(",")):
        rows[count] = {}
        for case in cases:
            out = subprocess.run([sys.executable, __file__, "--child", str(count), "--case", case],
                                 check=True, capture_output=True, text=True, timeout=600).stdout
            rows[count].update(json.loads(out.strip().splitlines()[-1]))
    if "ops" in cases:
        table(rows, OPS_COLUMNS)
    if "legacy" in cases:
        table(rows, LEGACY_COLUMNS)
    small, large = min(rows), max(rows)
    ratios = [(rows[large][key] / rows[small][key], what) for key, what in WRITE_COSTS
              if key in rows[small] and key in rows[large]]
    for ratio, what in ratios:
        print(f"per-write cost ratio {large // 1000}k/{small // 1000}k, {what}: {ratio:.2f}")
    worst, what = max(ratios)
    print(f"worst per-write cost ratio {large // 1000}k/{small // 1000}k: {worst:.2f} ({what})")


if __name__ == "__main__":
    main()
