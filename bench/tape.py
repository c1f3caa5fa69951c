"""Bytes read from the site's disk per byte backed up to tape and proven readable.

Both pipelines run in this process against the dsmc emulator (tests/tape/fake_dsmc.py) on a
fresh dataset: the anchor is the original cax's ``copy_tsm`` (crc32 duplicate test, sha512
dirhash of the raw data, ``shutil.copy2`` staging, dirhash of the staging copy, ``dsmc incr``,
``dsmc rest``, dirhash of the restore: about 6 reads per byte), and cax's
``backup_and_verify`` (copy and checksum in one read, the client's read, the verification
scan: 3).  Reads are this process's ``rchar`` (/proc/self/io, which includes the reaped dsmc
children), less what the emulator read from *tape* during restores: that is the tape server's
read, not the site's disk.

    python bench/tape.py [--files 10] [--mib 10]

Last line: ``ratio cax/original reads R`` (lower is better; target <= 0.5).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cax import proc  # noqa: E402
from cax.checksum import legacy_dirhash, scan_dataset  # noqa: E402
from cax.tape.dsmc import Dsmc, TsmSetup  # noqa: E402
from cax.tape.roundtrip import backup_and_verify  # noqa: E402

FAKE = Path(__file__).resolve().parents[1] / "tests" / "tape" / "fake_dsmc.py"


def rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def tape_reads(tape: Path) -> int:
    f = tape / "tape_reads"
    return int(f.read_text()) if f.exists() else 0


def crc32_by_lines(path: Path) -> str:
    """The original's duplicate test: crc32 over the file iterated by lines."""
    value = 0
    with open(path, "rb") as f:
        for line in f:
            value = zlib.crc32(line, value)
    return f"{value & 0xFFFFFFFF:X}"


def original_copy_tsm(dsmc: str, raw: Path, dir_tsm: Path) -> None:
    """The original's upload steps, minus the runs DB (§9.2 of cax-behaviour.md)."""
    name = raw.name
    crcs = [crc32_by_lines(p) for p in sorted(raw.iterdir())]
    assert len(set(crcs)) == len(crcs)
    before_raw = legacy_dirhash(raw)
    staging = dir_tsm / name
    staging.mkdir()
    for p in sorted(raw.iterdir()):
        shutil.copy2(p, staging / f"{name}_{p.name}")
    before_tsm = legacy_dirhash(staging)
    assert before_tsm == before_raw
    proc.run([dsmc, "incr", f"{staging}/"], timeout=600)
    verify = dir_tsm / "tsm_verify_download"
    verify.mkdir()
    proc.run([dsmc, "rest", f"{staging}/", f"{verify}/", "-followsymbolic=yes"], timeout=600)
    after = legacy_dirhash(verify / name)
    assert after == before_tsm
    shutil.rmtree(staging)
    shutil.rmtree(verify)


def measure(label: str, fn, tape: Path, nbytes: int) -> tuple[float, float]:
    start_r, start_tape, start_t = rchar(), tape_reads(tape), time.monotonic()
    fn()
    wall = time.monotonic() - start_t
    read = rchar() - start_r - (tape_reads(tape) - start_tape)
    per_byte = read / nbytes
    print(f"{label:<34} {per_byte:5.2f} reads/byte  {wall:6.2f} s")
    return per_byte, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--mib", type=int, default=10, help="MiB per file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cax-bench-tape-") as tmp:
        root = Path(tmp)
        bindir, tape = root / "bin", root / "tape"
        bindir.mkdir()
        tape.mkdir()
        dsmc = bindir / "dsmc"
        dsmc.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
        dsmc.chmod(0o755)
        os.environ["FAKE_DSMC_TAPE"] = str(tape)
        raw = root / "raw" / "170101_0000_MV"
        raw.mkdir(parents=True)
        for i in range(args.files):
            (raw / f"XENON1T-0-{i:09d}.zip").write_bytes(os.urandom(args.mib << 20))
        nbytes = args.files * args.mib << 20
        manifest = scan_dataset(raw)
        print(f"dataset: {args.files} x {args.mib} MiB = {nbytes / 2**20:.0f} MiB; "
              f"load average {os.getloadavg()[0]:.2f}")
        orig_tsm, cax_tsm = root / "tsm-original", root / "tsm-cax"
        orig_tsm.mkdir()
        cax_tsm.mkdir()
        original, _ = measure("original cax copy_tsm", lambda: original_copy_tsm(
            str(dsmc), raw, orig_tsm), tape, nbytes)
        shutil.rmtree(tape / "store")
        client = Dsmc(TsmSetup.of({"dsmc": str(dsmc), "timeout": 600}))
        ours, _ = measure("cax backup_and_verify", lambda: backup_and_verify(
            client, str(raw), str(cax_tsm), raw.name, "bench", recorded=manifest), tape, nbytes)
    print(f"ratio cax/original reads {ours / original:.2f}")


if __name__ == "__main__":
    main()
