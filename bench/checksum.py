"""Benchmark cax.checksum.scan_dataset against a bare zlib.adler32 loop and coreutils sha256sum.

Creates a run of os.urandom data (20 x 50 MiB by default, as in feasibility.md) in a temporary
directory, reads it once to warm the page cache, then times the methods in alternating rounds and
reports medians.
The last line is ``ratio cax/adler32 <R>``: cax's throughput over the bare loop's (target >= 0.9).

    python bench/checksum.py [--size-mib 1000] [--files 20] [--rounds 3] [--dir /scratch]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from cax.checksum import SCAN_THREADS, scan_dataset
from cax.proc import run

READ_BYTES = 1 << 20
WRITE_BYTES = 8 << 20


def say(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - a benchmark reports on stdout


def make_run(root: Path, files: int, file_bytes: int) -> list[Path]:
    """Write ``files`` files of ``file_bytes`` random bytes each under ``root``; return them."""
    paths = []
    for i in range(files):
        path = root / f"xe1t_run_{i:03d}.zip"
        with path.open("wb") as f:
            left = file_bytes
            while left:
                f.write(os.urandom(min(WRITE_BYTES, left)))
                left -= min(WRITE_BYTES, left)
        paths.append(path)
    return paths


def bare_adler32(paths: list[Path]) -> dict[str, str]:
    """The reference: a plain read loop with 1 MiB reads, as anyone would write it."""
    out = {}
    for path in paths:
        value = 1
        with path.open("rb") as f:
            while block := f.read(READ_BYTES):
                value = zlib.adler32(block, value)
        out[path.name] = f"{value & 0xFFFFFFFF:08x}"
    return out


def sha256sum(paths: list[Path], timeout_s: float) -> None:
    run(["sha256sum", "--", *map(str, paths)], timeout=timeout_s)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1000, help="total run size in MiB")
    parser.add_argument("--files", type=int, default=20, help="number of files in the run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--dir", help="parent of the temporary run directory (default: $TMPDIR)")
    args = parser.parse_args()

    file_bytes = args.size_mib * 2**20 // args.files
    total = file_bytes * args.files
    tmp = Path(tempfile.mkdtemp(prefix="cax-bench-checksum-", dir=args.dir))
    try:
        say(f"creating {args.files} x {file_bytes / 2**20:.1f} MiB in {tmp}")
        paths = make_run(tmp, args.files, file_bytes)
        bare_adler32(paths)  # warm the page cache
        timeout_s = 60 + total / 50e6
        methods: dict[str, Callable[[], object]] = {
            "cax": lambda: scan_dataset(tmp),
            "adler32": lambda: bare_adler32(paths),
            "sha256sum": lambda: sha256sum(paths, timeout_s),
            "cax_threads1": lambda: scan_dataset(tmp, threads=1),
        }
        runs: dict[str, list[float]] = {name: [] for name in methods}
        for i in range(args.rounds):
            for name, fn in methods.items():
                wall, result = timed(fn)
                runs[name].append(wall)
                say(f"round {i + 1} {name:<13} {wall:7.3f} s {total / wall / 1e6:8.0f} MB/s")
                if name == "cax":
                    reference = bare_adler32(paths)
                    if {rel: adler for rel, (_, adler) in result.items()} != reference:
                        raise SystemExit("cax and the bare loop disagree on a checksum")
    finally:
        shutil.rmtree(tmp)

    median = {name: statistics.median(walls) for name, walls in runs.items()}
    mb_s = {name: total / wall / 1e6 for name, wall in median.items()}
    for name in methods:
        say(f"median {name:<13} {median[name]:7.3f} s {mb_s[name]:8.0f} MB/s")
    ratios = {
        "cax/adler32": round(mb_s["cax"] / mb_s["adler32"], 2),
        "cax_threads1/adler32": round(mb_s["cax_threads1"] / mb_s["adler32"], 2),
        "cax/sha256sum": round(mb_s["cax"] / mb_s["sha256sum"], 2),
    }
    for name, value in ratios.items():
        if name != "cax/adler32":  # printed last, on its own
            say(f"ratio {name} {value:.2f}")
    say(
        json.dumps(
            {
                "bench": "checksum",
                "inputs": {"size_bytes": total, "files": args.files, "rounds": args.rounds},
                "machine": {
                    "nproc": len(os.sched_getaffinity(0)),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                    "scan_threads": SCAN_THREADS,
                },
                "results": {
                    name: {
                        "median_s": round(median[name], 4),
                        "mb_s": round(mb_s[name], 1),
                        "runs_s": [round(w, 4) for w in runs[name]],
                    }
                    for name in methods
                },
                "ratios": ratios,
            }
        )
    )
    say(f"ratio cax/adler32 {ratios['cax/adler32']:.2f}")


if __name__ == "__main__":
    main()
