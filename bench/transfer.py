"""Benchmark cax's verified copies against OpenSSH scp, rsync and plain paramiko on loopback.

Starts its own sshd on 127.0.0.1 (tests/sshd.py), writes two runs into a scratch directory:
"1GiB" (20 x 50 MiB of os.urandom) and "1000files" (1,000 x 100 kB), and times, in one process
and in alternating rounds (median reported):

  openssh-scp     scp -r -c aes128-gcm@openssh.com          (unverified anchor)
  openssh-rsync   rsync -a over ssh with the same cipher     (unverified)
  paramiko-sftp   SFTPClient.put per file, gcm, big window   (unverified)
  cax-<method>    Transport.put + manifest() at the destination compared with the source
                  manifest: the one put returned, else scan_dataset of the source ("scan"),
                  which runs while the site computes its manifest (they are independent).
                  "sequential" adds put + scan + manifest as if nothing overlapped.
  cax-openssh (source manifest recorded)
                  put + destination manifest compared with the source manifest computed
                  before the timing, as in production, where the runs DB already holds it

cax transports are opened once per method and reused across rounds, as the daemon does; the
first connection (cold) is timed separately.  paramiko-sftp uses cax's paramiko settings
(TCP_NODELAY, aes128-gcm, 2^27 window).  Every ssh command on a site pays that site's login
shell start-up; the anchors log in as the same user as cax (tests/sshd.py's site login, /bin/sh:
root's ~/.bashrc here runs ``pyenv init``, 80 ms a command); cax-rsync pays it three times per
verified copy (prepare, rsync, manifest), the anchors once.  The destination is emptied between
runs, outside the timing (see ``empty``).

  rsync-mux       plain rsync -a over an OpenSSH ControlMaster started once (the anchor for
                  the many-small-files target)
  ssh-channel floor
                  the same bytes through that connection into cat > /dev/null: no files, no
                  checksums; the bound for any method over it (printed as a ratio to rsync-mux)
  ssh-channel into tar x
                  the same bytes as one tar into tar x at the site: the files written, nothing
                  checksummed (what writing the files adds to the floor)
  cax-stream, cax-auto
                  put + destination manifest re-read, against the recorded manifest
  cax-auto (streamed manifest)
                  put, verified against the manifest put returned (computed at the site from
                  the bytes as they were written); rsync's re-read where auto chose rsync

Every timing also gives ``cpu``: the core-seconds the whole machine was busy during it (both
ssh ends, both copies' processes, the kernel; /proc/stat).  The line ``cpu (...)`` compares
rsync-mux, the floor and cax on the many-files run: a method near 100 % of the cores is bound
by the work it does, not by waiting, so it can only get faster by doing less.

The last line is ``ratio cax/rsync <R>``: "cax-auto (streamed manifest)" over rsync-mux for
1,000 x 100 kB (target <= 0.5); the line before gives the same for the 1 GiB run (must not get
worse), and an earlier line the old ``ratio cax/scp`` of the fastest method on 1 GiB.

    .venv/bin/python bench/transfer.py [--rounds 3] [--dir /var/tmp] [--keep]
        [--remote-python /usr/bin/python3] [--methods cax-rsync,cax-auto] [--delete-between]
        [--steady-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paramiko  # noqa: E402 - after the sys.path line, like the rest

from cax import proc  # noqa: E402
from cax.checksum import scan_dataset  # noqa: E402
from cax.transport import ssh as cax_ssh  # noqa: E402
from cax.transport.base import Transport, open_transport  # noqa: E402
from tests.sshd import Sshd  # noqa: E402

CIPHER = "aes128-gcm@openssh.com"
RECORDED = "cax-openssh (source manifest recorded)"
WRITE_BYTES = 8 << 20


def say(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - a benchmark reports on stdout


def make_run(root: Path, files: int, file_bytes: int, nested: bool = False) -> Path:
    """Write ``files`` random files of ``file_bytes`` under ``root`` (in 10 dirs if nested)."""
    for i in range(files):
        path = root / (f"d{i % 10}" if nested else "") / f"xe1t_{i:04d}.zip"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            left = file_bytes
            while left:
                f.write(os.urandom(min(WRITE_BYTES, left)))
                left -= min(WRITE_BYTES, left)
    return root


def busy_cpu_s() -> float:
    """Core-seconds this machine has spent busy since boot (every process and the kernel:
    both ssh ends, both copies' writers), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def empty(path: Path, trash: Path | None = None) -> None:
    """Clear the destination between timings, so that each copy meets the disk and the memory
    of a server in steady state, whichever method made the copy before.

    With ``trash``, move the copy aside instead of deleting it: on ext4 without a journal (this
    machine's disk) a new inode skips every inode freed in the last 60 s (300 s while its table
    block is dirty; perf shows the time in ``recently_deleted``), so deleting 1,000 files right
    before a copy of 1,000 files slowed that copy by up to 2x; the trash goes after the run.
    The moved copy's page cache is then given back (written out, ``POSIX_FADV_DONTNEED``): in
    this VM the first touch of a guest page costs a fault in the host (touching 4 GB once took
    11 s), so a copy whose page cache came from never-touched memory wrote 1,000 x 100 kB in
    0.26-0.30 s, one reusing the pages the previous copy gave back in 0.05-0.07 s
    (docs/benchmarks.rst).  A site's server recycles its page cache the same way.
    """
    if trash is not None and path.exists():
        trash.mkdir(exist_ok=True)
        moved = trash / f"{len(os.listdir(trash))}"
        path.rename(moved)
        os.sync()
        release_page_cache(moved)
    else:
        shutil.rmtree(path, ignore_errors=True)
        os.sync()


PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/page_reporting_order")
NO_REPORTING = "11"  # above the largest page order: no free block is reported
WARM_BYTES = 2 << 30


@contextmanager
def steady_memory(enabled: bool) -> Iterator[None]:
    """Keep the memory a copy frees for the next one, like a server in steady state.

    This VM's balloon reports every free 2 MiB block to its host (free page reporting), which
    takes the memory back; the next touch of such a page is a fault in the host.  So a copy's
    page cache is often built from memory the host must hand over again (writing 1 GiB cost
    cax 2.2-3.3 s and 3.6-5.3 core-s, the same copy 1.5-1.8 s and 2.7-3.0 core-s once freed
    memory stayed), whichever method made it, and the floor, which writes nothing, never pays
    it.  With ``enabled`` (root), reporting is off for the run (the previous order restored
    after) and 2 GiB are touched once first; without, a line says the figures include it.
    """
    reported = PAGE_REPORTING.with_name("reported_kib")
    if not reported.exists() or reported.read_text().strip() in ("", "0"):
        yield  # nothing is given back to a host here
        return
    if not enabled:
        say("note: this machine returns freed memory to its host (free page reporting); "
            "copies that write pay faults in the host: --steady-memory (root) measures without")
        yield
        return
    old = PAGE_REPORTING.read_text().strip()
    try:
        PAGE_REPORTING.write_text(NO_REPORTING)
    except OSError as exc:
        raise SystemExit(f"--steady-memory: cannot write {PAGE_REPORTING}: {exc}") from exc
    try:
        warm = b"\x01" * WARM_BYTES  # every page written once, then freed and kept
        del warm
        yield
    finally:
        PAGE_REPORTING.write_text(old)


def release_page_cache(root: Path) -> None:
    """Drop the (written out) page cache of every file under ``root``."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Bench:
    """The methods under test for one sshd; each returns a dict of timed parts (s)."""

    def __init__(self, sshd: Sshd, dest: Path, remote_python: str):
        self.sshd, self.dest, self.remote_python = sshd, dest, remote_python
        self.login = f"{sshd.user}@127.0.0.1"  # the anchors log in as cax does
        self.transports: dict[str, Transport] = {}
        self.pool = ThreadPoolExecutor(1)
        self.cold: dict[str, float] = {}
        self.sftp = None
        self.mux = None
        self.mux_rsh = ""
        self.stack = ExitStack()
        self.churn = False  # delete each copy right before the next (see empty)

    def openssh_scp(self, src: Path) -> dict:
        opts = self.sshd.ssh_argv()[1:]  # the ssh options, minus "ssh"
        opts[opts.index("-p")] = "-P"
        argv = ["scp", "-q", "-r", "-c", CIPHER, *opts, str(src), f"{self.login}:{self.dest}"]
        t0 = time.monotonic()
        proc.run(argv, timeout=600)
        return {"wall": time.monotonic() - t0}

    def openssh_rsync(self, src: Path) -> dict:
        rsh = shlex.join([*self.sshd.ssh_argv(), "-c", CIPHER])
        argv = ["rsync", "-a", "-e", rsh, f"{src}/", f"{self.login}:{self.dest}/"]
        t0 = time.monotonic()
        proc.run(argv, timeout=600)
        return {"wall": time.monotonic() - t0}

    def rsync_mux(self, src: Path) -> dict:
        """Plain rsync over an OpenSSH ControlMaster started once (the small-files anchor)."""
        if self.mux is None:
            control = str(self.dest.parent.parent / "anchor-cm")
            opts = [*self.sshd.ssh_argv(), "-c", CIPHER, "-o", f"ControlPath={control}"]
            self.mux = self.stack.enter_context(
                proc.popen([*opts, "-o", "ControlMaster=yes", "-N", self.login]))
            while not os.path.exists(control):
                if self.mux.poll() is not None:
                    raise SystemExit("the anchor's ControlMaster did not start")
                time.sleep(0.01)
            self.mux_rsh = shlex.join([*opts, "-o", "ControlMaster=no"])
        argv = ["rsync", "-a", "-e", self.mux_rsh, f"{src}/", f"{self.login}:{self.dest}/"]
        t0 = time.monotonic()
        proc.run(argv, timeout=600)
        return {"wall": time.monotonic() - t0}

    def _connected(self, src: Path) -> None:
        """Start the anchors' ControlMaster if no rsync-mux copy did (one, thrown away, also
        warms like the others)."""
        if self.mux is None:
            self.rsync_mux(src)
            empty(self.dest)

    def channel_floor(self, src: Path) -> dict:
        """The dataset's bytes through the same multiplexed connection into ``cat > /dev/null``:
        no file written, no checksum, one command.  No method over this connection can be
        faster; it bounds what ``ratio cax/rsync`` can reach on this machine."""
        self._connected(src)
        with tempfile.TemporaryFile(dir=self.dest.parent.parent) as blob:
            for path in sorted(p for p in src.rglob("*") if p.is_file()):
                with path.open("rb") as f:
                    shutil.copyfileobj(f, blob, 1 << 20)
            blob.seek(0)
            t0 = time.monotonic()
            subprocess.run([*shlex.split(self.mux_rsh), self.login, "cat > /dev/null"],
                           stdin=blob, timeout=600, check=True)
            return {"wall": time.monotonic() - t0}

    def tar_floor(self, src: Path) -> dict:
        """The dataset as one tar (made before the timing) through the same connection into
        ``tar x`` at the site: the files written, nothing checksummed, one command.  What
        writing the files adds to the channel floor on this machine; cax adds the checksums."""
        self._connected(src)
        with tempfile.TemporaryFile(dir=self.dest.parent.parent) as blob:
            subprocess.run(["tar", "cf", "-", "-C", str(src), "."], stdout=blob, timeout=600,
                           check=True)
            blob.seek(0)
            dest = shlex.quote(str(self.dest))
            t0 = time.monotonic()
            subprocess.run([*shlex.split(self.mux_rsh), self.login,
                            f"mkdir {dest} && tar xf - -C {dest}"],
                           stdin=blob, timeout=600, check=True)
            return {"wall": time.monotonic() - t0}

    def paramiko_sftp(self, src: Path) -> dict:
        if self.sftp is None:
            client = cax_ssh.connect_paramiko(self.sshd.endpoint("scp"))  # gcm, 2^27 window
            self.sftp = client.open_sftp()
        t0 = time.monotonic()
        self.sftp.mkdir(str(self.dest))
        for root, dirs, files in os.walk(src):
            target = self.dest / Path(root).relative_to(src)
            for d in dirs:
                self.sftp.mkdir(str(target / d))
            for f in files:
                self.sftp.put(os.path.join(root, f), str(target / f))
        return {"wall": time.monotonic() - t0}

    def cax(self, method: str, recorded: dict | None = None,
            streamed: bool = False) -> Callable[[Path], dict]:
        """Time a verified cax copy; with ``recorded``, verify against it without a scan.

        With ``streamed``, the destination manifest is the one put returned (computed at the
        site from the bytes as they were written: methods stream/auto), not a re-read.
        """

        def run(src: Path) -> dict:
            if method not in self.transports:
                t0 = time.monotonic()
                ep = self.sshd.endpoint(method, remote_python=self.remote_python)
                transport = open_transport(ep)
                transport.exists("/")  # connect
                self.cold[method] = time.monotonic() - t0
                self.transports[method] = transport
            transport = self.transports[method]
            t0 = time.monotonic()
            read = transport.put(src, str(self.dest))
            t1 = time.monotonic()
            returned = read
            if recorded is not None:
                read = recorded  # the runs DB holds the source manifest already
            scan = self.pool.submit(_timed_scan, src) if read is None else None
            if streamed and returned is not None:
                got = returned
            else:
                got = transport.manifest(str(self.dest))  # the source scan runs meanwhile
            t2 = time.monotonic()
            expected, scan_s = scan.result() if scan else (read, 0.0)
            t3 = time.monotonic()
            if got != expected:
                raise SystemExit(f"cax-{method}: verification FAILED")
            return {
                "wall": t3 - t0,
                "put": t1 - t0,
                "scan": scan_s,
                "manifest": t2 - t1,
                "sequential": (t1 - t0) + scan_s + (t2 - t1),
            }

        return run

    def close(self) -> None:
        for transport in self.transports.values():
            transport.close()
        self.pool.shutdown()
        self.stack.close()


def _timed_scan(src: Path) -> tuple[dict, float]:
    t0 = time.monotonic()
    return scan_dataset(src), time.monotonic() - t0


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        "?",
    )
    versions = {"python": platform.python_version(), "paramiko": paramiko.__version__}
    for tool, argv in (("openssh", ["ssh", "-V"]), ("rsync", ["rsync", "--version"])):
        out = proc.run(argv, timeout=10, check=False)
        versions[tool] = (out.stderr or out.stdout).splitlines()[0].strip()
    return {
        "loadavg_1_5_15": os.getloadavg(),  # other work on the machine skews the figures
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "versions": versions,
    }


STREAMED = "cax-auto (streamed manifest)"
FLOOR = "ssh-channel floor"
TAR_FLOOR = "ssh-channel into tar x"
ANCHORS = ("openssh-scp", "rsync-mux", FLOOR, TAR_FLOOR)


def bench_run(bench: Bench, name: str, src: Path, rounds: int,
              only: set[str] | None = None) -> dict:
    """Time every method on ``src`` in alternating rounds; print and return medians."""
    manifest = scan_dataset(src)  # also warms the page cache
    nbytes, nfiles = sum(s for s, _ in manifest.values()), len(manifest)
    methods = {
        "openssh-scp": bench.openssh_scp,
        "openssh-rsync": bench.openssh_rsync,
        "rsync-mux": bench.rsync_mux,
        FLOOR: bench.channel_floor,
        TAR_FLOOR: bench.tar_floor,
        "paramiko-sftp": bench.paramiko_sftp,
        "cax-scp": bench.cax("scp"),
        "cax-rsync": bench.cax("rsync"),
        "cax-openssh": bench.cax("openssh"),
        RECORDED: bench.cax("openssh", recorded=manifest),
        "cax-local": bench.cax("local"),
        "cax-stream": bench.cax("stream", recorded=manifest),
        "cax-auto": bench.cax("auto", recorded=manifest),
        STREAMED: bench.cax("auto", recorded=manifest, streamed=True),
    }
    if only:
        methods = {m: fn for m, fn in methods.items() if m in only or m in ANCHORS}
    times: dict[str, list[dict]] = {m: [] for m in methods}
    trash = bench.dest.parent.parent / "trash" if nfiles >= 100 and not bench.churn else None
    for _ in range(rounds):
        for method, fn in methods.items():
            empty(bench.dest, trash)
            cpu0 = busy_cpu_s()
            timed = fn(src)
            timed["cpu"] = busy_cpu_s() - cpu0  # over the whole call, a little beyond "wall"
            times[method].append(timed)
    empty(bench.dest)
    if trash is not None:
        shutil.rmtree(trash)
    say(f"\n== {name}: {nfiles} files, {nbytes / 1e6:.0f} MB, median of {rounds} rounds")
    results = {}
    anchor = statistics.median(r["wall"] for r in times["openssh-scp"])
    for method, runs in times.items():
        parts = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        wall = parts["wall"]
        results[method] = {
            **{k: round(v, 3) for k, v in parts.items()},
            "MB/s": round(nbytes / 1e6 / wall, 1),
            "files/s": round(nfiles / wall),
            "ratio_to_scp": round(wall / anchor, 2),
            "walls": [round(r["wall"], 3) for r in runs],
        }
        detail = "  ".join(f"{k} {v:.2f}" for k, v in parts.items() if k != "wall")
        say(
            f"{method:38s} wall {wall:6.2f} s  {nbytes / 1e6 / wall:7.1f} MB/s  "
            f"{nfiles / wall:7.0f} files/s  cax/scp {wall / anchor:5.2f}  {detail}"
        )
    return {"files": nfiles, "bytes": nbytes, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp", help="scratch parent directory")  # noqa: S108
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--remote-python",
        default="/usr/bin/python3",
        help="the site's remote_python (here a bare python3 over ssh finds the "
        "pyenv shim first in root's PATH, +60 ms per call)",
    )
    parser.add_argument("--delete-between", action="store_true",
                        help="delete each copy of the many-files run right before the next "
                        "timing (a disk that has just freed as many inodes; see empty())")
    parser.add_argument("--methods", default="", help="comma-separated subset of the methods "
                        f"(the anchors {', '.join(ANCHORS)} always run)")
    parser.add_argument("--steady-memory", action="store_true",
                        help="as root: keep freed memory in this VM for the run (see "
                        "steady_memory in bench/transfer.py)")
    args = parser.parse_args()
    with steady_memory(args.steady_memory):
        run(args)


def run(args: argparse.Namespace) -> None:
    only = {m.strip() for m in args.methods.split(",") if m.strip()} or None
    work = Path(tempfile.mkdtemp(prefix="cax-bench-", dir=args.dir))
    sshd = Sshd(work / "sshd")
    try:
        t0 = time.monotonic()
        runs = {
            "1GiB": make_run(work / "src" / "1GiB", 20, 50 * 2**20),
            "1000files": make_run(work / "src" / "1000files", 1000, 100_000, nested=True),
        }
        say(f"made test data in {time.monotonic() - t0:.1f} s under {work}")
        sshd.start()
        bench = Bench(sshd, work / "dst" / "run", args.remote_python)
        bench.churn = args.delete_between
        (work / "dst").mkdir()
        try:
            report = {name: bench_run(bench, name, src, args.rounds, only)
                      for name, src in runs.items()}
        finally:
            bench.close()
        say(f"\ncold connect (s): {json.dumps({k: round(v, 3) for k, v in bench.cold.items()})}")
        big = report["1GiB"]["results"]
        small = report["1000files"]["results"]
        say(json.dumps({"bench": "transfer",
                        "inputs": {"rounds": args.rounds, "cipher": CIPHER,
                                   "remote_python": args.remote_python,
                                   "runs": {k: {"files": v["files"], "bytes": v["bytes"]}
                                            for k, v in report.items()}},
                        "machine": machine(), "results": report,
                        "cold_connect_s": bench.cold}))
        candidates = [m for m in ("cax-scp", "cax-rsync", RECORDED) if m in big]
        if candidates:
            best = min(candidates, key=lambda m: big[m]["wall"])
            say(f"fastest verified cax method (1GiB): {best} "
                f"ratio cax/scp {big[best]['ratio_to_scp']:.2f} (<= 1.25)")
        for name, res in (("1GiB", big), ("1000files", small)):
            for method in ("cax-rsync", "cax-stream", "cax-auto", STREAMED):
                if method in res:
                    say(f"{name} {method}: {res[method]['wall']:.3f} s, "
                        f"ratio to rsync-mux {res[method]['wall'] / res['rsync-mux']['wall']:.2f}"
                        f" (cax-rsync {res['cax-rsync']['wall'] / res['rsync-mux']['wall']:.2f})"
                        if "cax-rsync" in res else "")
        chosen = STREAMED if STREAMED in small else "cax-auto"
        ratio = big[chosen]['wall'] / big['rsync-mux']['wall']
        say(f"large files (1GiB) {chosen}: {big[chosen]['wall']:.3f} s vs rsync-mux "
            f"{big['rsync-mux']['wall']:.3f} s (ratio {ratio:.2f})")
        cores = os.cpu_count() or 1
        say("cpu (1000 x 100 kB, busy core-seconds of the whole machine per copy, and the "
            f"share of its {cores} cores): " + ", ".join(
                f"{m} {small[m]['cpu']:.2f} ({small[m]['cpu'] / small[m]['wall'] / cores:.0%})"
                for m in ("rsync-mux", FLOOR, chosen)))
        say(f"floor: {FLOOR} / rsync-mux {small[FLOOR]['wall'] / small['rsync-mux']['wall']:.2f}"
            " (1000 x 100 kB: the bytes alone through the same connection, no files)")
        say(f"ratio cax/rsync {small[chosen]['wall'] / small['rsync-mux']['wall']:.2f} "
            f"(1000 x 100 kB, {chosen} verified vs rsync over a multiplexed connection; "
            "target <= 0.5)")
    finally:
        sshd.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
