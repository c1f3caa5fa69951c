"""Cost of one processing pass with 1,000 runs needing processing and 500 jobs queued.

Starts the one-node SLURM of the tests (munged, slurmctld, slurmd as root) with its partition
down, so every job stays pending; registers 1,500 runs with a verified raw copy at site
``lab``, 500 of them with a processed entry claimed by the daemon whose job was submitted
(pending) -- what a first pass leaves, made directly because the embedded store's writes would
take minutes. The measured pass finds 1,000 runs that need processing and 500 queued jobs, and
counts its runs-DB round trips and batch-system calls (squeue, sacct, sbatch).

Anchor, in the same process: the original's pattern of one runs-DB query per run per pass
(``find`` then ``find_one`` per run) on the same runs DB. Last line: ``ratio cax/original R``
(round trips per pass). ``--runs`` and ``--queued`` change the sizes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cax.batch import JobSpec, Resources  # noqa: E402
from cax.daemon import Daemon  # noqa: E402 - after the sys.path line
from cax.runsdb import TRANSFERRED, TRANSFERRING, open_runsdb  # noqa: E402
from cax.tasks import ProcessBatchQueue  # noqa: E402
from cax.tasks.process import make_backend  # noqa: E402
from tests.batch.slurm import SlurmCluster  # noqa: E402
from tests.conftest import make_context, write_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs left needing processing")
    parser.add_argument("--queued", type=int, default=500, help="jobs queued")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cax-bench-processing-") as tmp:
        root = Path(tmp)
        cluster = SlurmCluster(root / "slurm")
        cluster.start()
        try:
            return bench(root, cluster, args.runs, args.queued)
        finally:
            cluster.stop()


def bench(root: Path, cluster: SlurmCluster, needing: int, queued: int) -> int:
    os.environ["SLURM_CONF"] = str(cluster.conf)
    for sub in ("raw", "processed", "jobs"):
        (root / sub).mkdir()
    processing = {"command": ["{python}", "-m", "cax.processors.reference", "{input}",
                              "{output}"], "version": "v1.0", "backend": "slurm",
                  "max_jobs": queued, "mem_per_cpu": 100, "jobs_dir": str(root / "jobs")}
    config = write_config(root / "cax.json", [
        {"name": "lab", "method": "local", "dir_raw": str(root / "raw"),
         "dir_processed": str(root / "processed"), "data_type": ["raw"],
         "processing": processing}], runs_db=f"file:{root / 'runsdb'}", lease_seconds=3600)
    db = open_runsdb(f"file:{root / 'runsdb'}", create=True)
    start = dt.datetime(2017, 1, 1, tzinfo=dt.timezone.utc)
    total = needing + queued
    cluster.run("scontrol", "update", "PartitionName=debug", "State=DOWN")
    ctx = make_context(config, "lab", db)
    backend = ctx.batch = make_backend(ctx.site.processing)
    t0 = time.monotonic()
    docs = []
    for n in range(1, total + 1):
        data = [{"host": "lab", "type": "raw", "status": TRANSFERRED,
                 "location": str(root / "raw" / f"run{n:05d}"),
                 "checksum": "adler32:" + "0" * 64}]
        if n <= queued:
            name = f"cax_{n}_v1.0"
            job = backend.submit(JobSpec(name, ("true",), str(root / "jobs" / f"{name}.log"),
                                         Resources(mem_per_cpu_mb=100)))
            data.append({"host": "lab", "type": "processed", "pax_version": "v1.0",
                         "status": TRANSFERRING, "lease_owner": ctx.owner,
                         "lease_token": "0" * 8, "attempts": 1, "job_id": job,
                         "job_name": name, "job_token": "1" * 8, "job_backend": "slurm",
                         "lease_expires": ctx.now() + dt.timedelta(hours=1)})
        docs.append({"number": n, "name": f"run{n:05d}", "detector": "tpc",
                     "start": start + dt.timedelta(hours=n), "tags": [], "data": data})
    db.insert_runs(docs)
    print(f"set-up: {queued} jobs submitted and {total} runs registered in "
          f"{time.monotonic() - t0:.1f} s")
    daemon = Daemon(ctx, [ProcessBatchQueue])
    trips, calls, squeues = db.round_trips, backend.calls, backend.squeue_calls
    t0 = time.monotonic()
    daemon.run_pass()
    pass_s = time.monotonic() - t0
    trips = db.round_trips - trips - 1  # the heartbeat is the daemon's, not the task's
    calls, squeues = backend.calls - calls, backend.squeue_calls - squeues
    print(f"pass with {needing} runs needing processing and {backend.active_jobs()} jobs "
          f"queued: {trips} runs-DB round trips, {calls} batch-system call(s) "
          f"({squeues} squeue), {pass_s:.2f} s")
    anchor = db.round_trips
    for run in db.find_runs({}, projection={"_id": 1}):  # the original: N+1 per task per pass
        db.find_run(run["_id"])
    anchor = db.round_trips - anchor
    print(f"anchor (original pattern, one query per run): {anchor} runs-DB round trips per pass")
    cluster.cancel_all()
    ctx.batch.close()
    db.close()
    print(f"ratio cax/original {trips / anchor:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
