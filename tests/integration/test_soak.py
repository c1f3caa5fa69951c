"""Soak: three daemons of one site push and process 200 runs through chaos, while the DAQ keeps
registering new ones, and nothing is lost or lied about.

Random kill -9 of daemons (restarted at once), sshd restarts and runs-DB outages (the embedded
store's directory moved away and back) while ``daq`` pushes every run to ``remote`` with rsync,
processes each (local batch backend, validated outputs) and pushes the processed data too, and
``cax run add --from-dir`` registers the runs a DAQ thread keeps writing.  At the end every
``transferred`` copy must be its dataset's origin byte for byte, every processed output valid,
no source lost, every run directory registered exactly once, and every copy registered
exactly once; a copy attempted more than once says why in its history.  The figures are printed
(``pytest -s``).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from cax.checksum import dataset_checksum, scan_dataset
from cax.processors.reference import validate
from cax.runsdb import TRANSFERRED, EntryKey, find_entry
from cax.runsdb.origins import differs, judge
from tests.conftest import edit_site
from tests.integration.conftest import make_dataset, register, scratches

RUNS = 200
CHAOS_S = 45
SETTLE_S = 180
REFERENCE = ["{python}", "-m", "cax.processors.reference", "{input}", "{output}"]


def start(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "cax", "--config", str(config), "--host",
                                 "daq", "--log", "info"], stdout=out, stderr=out,
                                start_new_session=True)


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def run_add(config: Path) -> int:
    """The DAQ's registration of what it wrote, as a person or its script types it."""
    done = subprocess.run([sys.executable, "-m", "cax", "--config", str(config), "--host",
                           "daq", "run", "add", "--from-dir", str(config.parent / "daq/raw"),
                           "--match", "170106_*"], capture_output=True, text=True, timeout=120)
    return done.returncode


def runs_db_outage(store: Path, seconds: float) -> None:
    """The runs DB goes away: its directory vanishes (an unmounted disk), then comes back."""
    away = store.with_name(store.name + ".away")
    store.rename(away)
    time.sleep(seconds)
    away.rename(store)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_three_daemons_kill9_sshd_restarts_db_outages(ssh_sites, runsdb, runsdb_uri,
                                                           sshd, tmp_path):
    config = edit_site(ssh_sites("rsync"), "daq", max_transfers=2, max_attempts=20,
                       retry_backoff=0.2,  # retries soon: the test waits for all
                       processing={"command": REFERENCE, "version": "v1", "max_jobs": 2,
                                   "jobs_dir": str(tmp_path / "jobs"), "timeout": 120,
                                   "validate": ["{python}", "-m", "cax.processors.reference",
                                                "--validate", "{output}"]})
    sources = {}
    for n in range(RUNS):
        path = tmp_path / f"daq/raw/170105_{n:04d}"
        make_dataset(path, files=2, size=20_000 + n)
        sources[register(runsdb, 1000 + n, "daq", path)] = path
    written: list[Path] = []  # run directories the DAQ writes during the chaos
    store = Path(runsdb_uri[0][len("file:"):]) if runsdb_uri[0].startswith("file:") else None
    rng = random.Random(7)
    logs = [tmp_path / f"daemon{i}.log" for i in range(3)]
    daemons = [start(config, log) for log in logs]
    events = Counter()
    deadline = time.monotonic() + CHAOS_S
    try:
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 2.5))
            what = rng.choice(["kill", "kill", "sshd", "db", "daq", "daq"] if store
                              else ["kill", "sshd", "daq", "daq"])
            if what == "daq":  # a new run is written and registered (refused in an outage)
                path = tmp_path / f"daq/raw/170106_{len(written):04d}"
                make_dataset(path, files=2, size=10_000)
                written.append(path)
                events[f"run add exit {run_add(config)}"] += 1
            elif what == "kill":
                i = rng.randrange(3)
                kill(daemons[i])
                daemons[i] = start(config, logs[i])
            elif what == "sshd":
                sshd.stop()
                time.sleep(rng.uniform(0.2, 2))
                sshd.start()
            else:
                runs_db_outage(store, rng.uniform(0.5, 3))
            events[what] += 1
        assert run_add(config) == 0  # whatever an outage refused is registered now
        settle = time.monotonic() + SETTLE_S
        while time.monotonic() < settle:
            if all(complete(run) for run in runsdb.find_runs({})):
                break
            time.sleep(1)
    finally:
        for daemon in daemons:
            kill(daemon)
    for run in runsdb.find_runs({}):  # every copy is its dataset's origin, byte for byte
        for entry in run.get("data") or ():
            if entry.get("status") == TRANSFERRED:
                key = EntryKey.of(entry)
                place = Path(entry["location"])
                found = {"checksum": dataset_checksum(scan_dataset(place))}
                assert not differs(found, judge(run, key.type, key.version).origin), (run, key)
                if key.type == "processed":
                    validate(str(place))
    names = Counter(run["name"] for run in runsdb.find_runs({}))
    assert not [n for n, count in names.items() if count > 1]
    assert {p.name for p in written} <= set(names)  # each written run registered, once
    text = "".join(log.read_text() for log in logs)
    registered = Counter(re.findall(r"\[CopyPush run \d+ \((170105_\d+)\)\].*raw daq -> remote: "
                                    r"transferred and verified", text) + re.findall(
        r"run \d+ \((170105_\d+)\) raw daq -> remote: transferred and verified", text))
    corrupt = lost = redone = unexplained = 0
    for run in runsdb.find_runs({"_id": {"$in": list(sources)}}):
        source = sources[run["_id"]]
        entry = find_entry(run, EntryKey("remote", "raw")) or {}
        if not source.is_dir() or scan_dataset(source) is None:
            lost += 1
        if entry.get("status") != TRANSFERRED:
            continue
        if scan_dataset(Path(entry["location"])) != scan_dataset(source):
            corrupt += 1
        attempts = int(entry.get("attempts") or 1)
        if attempts > 1:
            redone += 1
            reasons = [h for h in entry.get("history") or ()
                       if h.get("event") in ("failed", "takeover")]
            if len(reasons) < min(attempts - 1, 20):
                unexplained += 1
    done = sum(1 for run in runsdb.find_runs({}) if (find_entry(
        run, EntryKey("remote", "raw")) or {}).get("status") == TRANSFERRED)
    twice = sorted(name for name, count in registered.items() if count > 1)
    left = sum(len(scratches(Path(p).parent.parent / "remote/raw" / Path(p).name))
               for p in map(str, sources.values()))
    print(f"\nsoak: {RUNS} runs, chaos {CHAOS_S} s: {dict(events)}; transferred {done}, "
          f"corrupt {corrupt}, lost {lost}, registered twice {len(twice)}, redone {redone} "
          f"(unexplained {unexplained}), scratch dirs left {left}")
    assert corrupt == 0 and lost == 0 and not twice and unexplained == 0
    states = Counter((e.get("status"), e.get("error_kind"), e.get("attempts"),
                      (e.get("error") or "")[-90:])
                     for run in runsdb.find_runs({})
                     for e in [find_entry(run, EntryKey("remote", "raw")) or {}]
                     if e.get("status") != TRANSFERRED)
    assert done == RUNS + len(written), states
    unfinished = [run["name"] for run in runsdb.find_runs({}) if not complete(run)]
    assert not unfinished, unfinished[:10]


def complete(run: dict) -> bool:
    """Raw data at the DAQ and at ``remote``, processed data at both: all verified."""
    keys = (EntryKey("daq", "raw"), EntryKey("remote", "raw"),
            EntryKey("daq", "processed", "v1"), EntryKey("remote", "processed", "v1"))
    return all((find_entry(run, key) or {}).get("status") == TRANSFERRED for key in keys)
