"""Benchmark verified copies across an emulated WAN: round trips of 0, 30 and 120 ms, and a
100 MB/s bottleneck (issue 21).

The loopback sshd of tests/sshd.py sits behind tests/wanproxy.py (an asyncio TCP proxy in its
own process that holds each chunk back by RTT/2 per direction and, with ``--cap``, shares a
token bucket per direction among all connections; it does not model loss or TCP's window, see
its docstring).  At 0 ms there is no proxy: the figures are bench/transfer.py's setting.
Methods, as in bench/transfer.py (one process, alternating rounds, medians):

  openssh-scp       scp -r, aes128-gcm (unverified anchor)
  rsync-mux         rsync -a over one OpenSSH ControlMaster (the anchor of the ratio)
  ssh-channel floor the bytes through that connection into cat > /dev/null (0 ms only)
  cax-scp, cax-rsync, cax-openssh
                    Transport.put + site manifest, verified against the source's (one stream)
  cax-stream        put, verified by re-reading the destination's manifest (streams automatic)
  cax-auto (streamed manifest)
                    put, verified against the manifest the receiver computed as it wrote
  cax-auto 1 file   the same bytes as one file (1,000 x 100 kB run only: the per-file cost)

Runs: "1GiB" (20 x 50 MiB) and "1000files" (1,000 x 100 kB).  Methods that pay round trips
per file (scp -r and cax-openssh: SFTP; cax-scp: the scp protocol's per-file acks) would take
1,000 x several round trips on the small files through a long round trip: there they copy a
50-file sample and the figure is that time x 20, marked ``(x20)``.

The last line is ``ratio cax/rsync at 120 ms <R>``: cax-auto (streamed manifest) over
rsync-mux for 1 GiB at 120 ms (target <= 0.25).

    .venv/bin/python bench/wan.py [--rounds 3] [--rtts 0,30,120] [--cap-mbs 100]
        [--methods cax-auto,...] [--runs 1GiB,1000files] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.transfer import (  # noqa: E402 - after the sys.path line
    FLOOR,
    STREAMED,
    TAR_FLOOR,
    Bench,
    busy_cpu_s,
    empty,
    machine,
    make_run,
    say,
    steady_memory,
)
from cax.checksum import scan_dataset  # noqa: E402
from tests.sshd import Sshd  # noqa: E402
from tests.wanproxy import WanProxy  # noqa: E402

ONE_FILE = "cax-auto 1 file (streamed manifest)"
PER_FILE_ROUND_TRIPS = ("openssh-scp", "cax-scp", "cax-openssh")
SAMPLE_FILES = 50


def methods_for(bench: Bench, manifest: dict, rtt_ms: float) -> dict:
    methods = {
        "openssh-scp": bench.openssh_scp,
        "rsync-mux": bench.rsync_mux,
        "cax-scp": bench.cax("scp"),
        "cax-rsync": bench.cax("rsync"),
        "cax-openssh": bench.cax("openssh"),
        "cax-stream": bench.cax("stream", recorded=manifest),
        STREAMED: bench.cax("auto", recorded=manifest, streamed=True),
    }
    if rtt_ms == 0:
        methods[FLOOR] = bench.channel_floor
        methods[TAR_FLOOR] = bench.tar_floor
    return methods


def time_runs(bench: Bench, name: str, src: Path, rounds: int, rtt_ms: float,
              only: set[str] | None, sample: Path | None, one_file: Path | None) -> dict:
    """Time every method on ``src`` in alternating rounds; print and return medians."""
    manifest = scan_dataset(src)
    nbytes, nfiles = sum(s for s, _ in manifest.values()), len(manifest)
    methods = methods_for(bench, manifest, rtt_ms)
    scale = {m: 1 for m in methods}
    inputs = {m: src for m in methods}
    if sample is not None:  # the small files through a long round trip
        for m in PER_FILE_ROUND_TRIPS:
            inputs[m], scale[m] = sample, nfiles // SAMPLE_FILES
    if one_file is not None:
        methods[ONE_FILE] = bench.cax("auto", recorded=scan_dataset(one_file), streamed=True)
        inputs[ONE_FILE], scale[ONE_FILE] = one_file, 1
    if only:
        methods = {m: fn for m, fn in methods.items() if m in only or m == "rsync-mux"}
    times: dict[str, list[dict]] = {m: [] for m in methods}
    trash = bench.dest.parent.parent / "trash" if nfiles >= 100 else None
    for _ in range(rounds):
        for method, fn in methods.items():
            empty(bench.dest, trash)
            cpu0 = busy_cpu_s()
            timed = fn(inputs[method])
            timed["cpu"] = busy_cpu_s() - cpu0
            timed["wall"] *= scale[method]
            times[method].append(timed)
    empty(bench.dest)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    say(f"\n== {name} at {rtt_ms:g} ms: {nfiles} files, {nbytes / 1e6:.0f} MB, "
        f"median of {rounds} rounds")
    results = {}
    for method, runs in times.items():
        wall = statistics.median(r["wall"] for r in runs)
        streams = getattr(bench.transports.get(_method_of(method)), "last_streams", 1)
        results[method] = {"wall": round(wall, 3), "MB/s": round(nbytes / 1e6 / wall, 1),
                           "walls": [round(r["wall"], 3) for r in runs],
                           "cpu": round(statistics.median(r["cpu"] for r in runs), 2),
                           "streams": streams, "x": scale[method]}
        mark = f" (x{scale[method]})" if scale[method] > 1 else ""
        say(f"{method:38s} wall {wall:7.2f} s{mark:6s} {nbytes / 1e6 / wall:7.1f} MB/s  "
            f"streams {streams:2d}  cpu {results[method]['cpu']:.1f} core-s")
    return {"files": nfiles, "bytes": nbytes, "results": results}


def _method_of(name: str) -> str:
    if name in (STREAMED, ONE_FILE):
        return "auto"
    return name[4:] if name.startswith("cax-") else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rtts", default="0,30,120", help="round trips in ms")
    parser.add_argument("--cap-mbs", type=float, default=100.0,
                        help="the bottleneck of the capped run at the longest round trip "
                        "(MB/s; 0: no capped run)")
    parser.add_argument("--runs", default="1GiB,1000files")
    parser.add_argument("--methods", default="", help="comma-separated subset (rsync-mux "
                        "always runs)")
    parser.add_argument("--dir", default="/var/tmp", help="scratch parent directory")  # noqa: S108
    parser.add_argument("--remote-python", default="/usr/bin/python3")
    parser.add_argument("--steady-memory", action="store_true",
                        help="as root: keep freed memory in this VM for the run (see "
                        "steady_memory in bench/transfer.py)")
    args = parser.parse_args()
    with steady_memory(args.steady_memory):
        run(args)


def run(args: argparse.Namespace) -> None:
    only = {m.strip() for m in args.methods.split(",") if m.strip()} or None
    rtts = [float(x) for x in args.rtts.split(",")]
    wanted = set(args.runs.split(","))
    work = Path(tempfile.mkdtemp(prefix="cax-wan-", dir=args.dir))
    sshd = Sshd(work / "sshd")
    report: dict = {}
    try:
        t0 = time.monotonic()
        runs = {}
        if "1GiB" in wanted:
            runs["1GiB"] = make_run(work / "src" / "1GiB", 20, 50 * 2**20)
        if "1000files" in wanted:
            runs["1000files"] = make_run(work / "src" / "1000files", 1000, 100_000,
                                         nested=True)
            sample = make_run(work / "src" / "sample", SAMPLE_FILES, 100_000, nested=True)
            one = work / "src" / "onefile"
            one.mkdir(parents=True)
            with open(one / "all.dat", "wb") as f:  # the same bytes as one file
                for path in sorted(runs["1000files"].rglob("*.zip")):
                    f.write(path.read_bytes())
        say(f"made test data in {time.monotonic() - t0:.1f} s under {work}")
        sshd.start()
        (work / "dst").mkdir()
        cases = [(rtt, None) for rtt in rtts]
        if args.cap_mbs:
            cases.append((max(rtts), args.cap_mbs * 1e6))
        for rtt, cap in cases:
            label = f"{rtt:g}ms" + (f"-cap{cap / 1e6:g}MBs" if cap else "")
            proxy = WanProxy(sshd.port, rtt, cap) if rtt or cap else None
            view = sshd
            if proxy is not None:
                proxy.start()
                sshd.trust_port(proxy.port)
                view = copy.copy(sshd)
                view.port = proxy.port
            bench = Bench(view, work / "dst" / "run", args.remote_python)
            try:
                say(f"\n#### round trip {rtt:g} ms" + (f", cap {cap / 1e6:g} MB/s" if cap
                                                      else ""))
                report[label] = {}
                for name, src in runs.items():
                    small = name == "1000files"
                    report[label][name] = time_runs(
                        bench, name, src, args.rounds, rtt,
                        only if not cap else {STREAMED, "rsync-mux", "cax-stream"},
                        sample if small and rtt > 0 else None,
                        one if small else None)
                say(f"cold connect (s): "
                    f"{json.dumps({k: round(v, 3) for k, v in bench.cold.items()})}")
            finally:
                bench.close()
                if proxy is not None:
                    proxy.stop()
        say(json.dumps({"bench": "wan", "inputs": {"rounds": args.rounds, "rtts_ms": rtts,
                                                   "cap_MBs": args.cap_mbs},
                        "machine": machine(), "results": report}))
        summary(report, rtts, args.cap_mbs)
    finally:
        sshd.stop()
        shutil.rmtree(work, ignore_errors=True)


def summary(report: dict, rtts: list[float], cap_mbs: float) -> None:
    """The targets of issue 21, each with its figure."""
    longest = f"{max(rtts):g}ms"
    for label, runs in report.items():
        small = runs.get("1000files", {}).get("results", {})
        if STREAMED in small and ONE_FILE in small:
            say(f"{label} 1000 x 100 kB / the same bytes as one file: "
                f"{small[STREAMED]['wall'] / small[ONE_FILE]['wall']:.2f} (target <= 1.5)")
        if label == "0ms" and FLOOR in small and STREAMED in small:
            say(f"0ms 1000 x 100 kB cax-auto / {FLOOR}: "
                f"{small[STREAMED]['wall'] / small[FLOOR]['wall']:.2f} (target <= 1.25)")
        if label == "0ms" and TAR_FLOOR in small and STREAMED in small:
            say(f"0ms 1000 x 100 kB cax-auto / {TAR_FLOOR}: "
                f"{small[STREAMED]['wall'] / small[TAR_FLOOR]['wall']:.2f} (the files written)")
    capped = next((r for label, r in report.items() if "cap" in label), None)
    if capped and "1GiB" in capped:
        got = capped["1GiB"]["results"][STREAMED]["MB/s"]
        say(f"capped at {cap_mbs:g} MB/s, {longest}: cax-auto {got:.1f} MB/s = "
            f"{got / cap_mbs:.0%} of the cap (target >= 70 %)")
    big = report.get(longest, {}).get("1GiB", {}).get("results", {})
    if STREAMED in big:
        say(f"ratio cax/rsync at {max(rtts):g} ms "
            f"{big[STREAMED]['wall'] / big['rsync-mux']['wall']:.2f}")


if __name__ == "__main__":
    main()
