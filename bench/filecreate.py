"""Benchmark the stream receiver's writer threads against one writer, on a disk that has just
freed as many files (the case a site that purges and receives at once is in).

Writes 1,000 files of 100 kB the way ``cax.transport.streamproto`` writes a small file (create,
write, chmod, set mtime, close) into 10 directories, right after deleting 1,000 such files,
once with one thread (the anchor) and once with ``WRITERS`` threads, in alternating rounds;
prints the medians and, last, ``ratio threads/one R`` (below 1: the threads are faster).

    .venv/bin/python bench/filecreate.py [--rounds 5] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cax.transport.streamproto import WRITERS  # noqa: E402 - after the sys.path line

FILES, SIZE = 1000, 100_000


def say(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - a benchmark reports on stdout


def fresh(base: Path, data: bytes) -> Path:
    """Write and delete FILES files under ``base``, then return an empty tree to write into."""
    old = base / "old"
    for i in range(FILES):
        (old / f"d{i % 10}").mkdir(parents=True, exist_ok=True)
        (old / f"d{i % 10}" / f"f{i:04d}").write_bytes(data)
    os.sync()
    shutil.rmtree(old)
    new = base / "new"
    shutil.rmtree(new, ignore_errors=True)
    for d in range(10):
        (new / f"d{d}").mkdir(parents=True)
    os.sync()
    return new


def write_all(tree: Path, data: bytes, threads: int) -> float:
    def one(i: int) -> None:
        fd = os.open(tree / f"d{i % 10}" / f"f{i:04d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o600)
        try:
            os.write(fd, data)
            os.fchmod(fd, 0o644)
            os.utime(fd, ns=(1_500_000_000 * 10**9,) * 2)
        finally:
            os.close(fd)

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(FILES)))
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/var/tmp", help="scratch parent directory")  # noqa: S108
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cax-bench-create-", dir=args.dir))
    data = os.urandom(SIZE)
    times: dict[int, list[float]] = {1: [], WRITERS: []}
    try:
        for _ in range(args.rounds):
            for threads in times:
                times[threads].append(write_all(fresh(base, data), data, threads))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    one, many = (statistics.median(times[t]) for t in (1, WRITERS))
    say(f"{FILES} x {SIZE // 1000} kB after as many were deleted, median of {args.rounds}:")
    say(f"1 writer          {one:.3f} s")
    say(f"{WRITERS} writers         {many:.3f} s")
    say(f"ratio threads/one {many / one:.2f}")


if __name__ == "__main__":
    main()
