"""End to end, in subprocesses: demo-like runs go to the emulated tape with massive-tsm (the
original's cax_tsm_upload.json), are purged locally (the tape copy counts), and come back by
``cax --once --run N`` and massive-tsm with cax_tsm_download.json, checksums intact; a muon-veto
(``_MV``) dataset keeps its names."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cax.checksum import scan_dataset
from cax.clock import utcnow
from cax.demo import FILES_PER_RUN
from cax.runsdb import TRANSFERRED, VERIFYING, EntryKey, find_entry, open_runsdb

CONFIGS = Path(__file__).parent / "configs"
SITE = "xe1t-datamanager"
pytestmark = pytest.mark.slow


def command(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = f"import sys; from cax.cli import {name}; sys.argv[0] = {name!r}; {name}()"
    if name == "main":
        code = "import sys; from cax.cli import main; main()"
    # list-form configs name no runs DB (issue 11): the environment does
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "CAX_RUNS_DB": f"embedded:{cwd}/cax-runsdb"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=env)


def original_config(name: str, root: Path) -> Path:
    target = root / name
    target.write_text((CONFIGS / name).read_text().replace("@ROOT@", str(root)))
    return target


def demo_runs(root: Path) -> dict[str, Path]:
    """Three TPC runs and one muon-veto run at the datamanager, as the DAQ registers them."""
    raw = root / "data/xenon/raw"
    (root / "data/xenon/tsm").mkdir(parents=True)
    db = open_runsdb("file:" + str(root / "cax-runsdb"), create=True)
    start = utcnow() - dt.timedelta(days=10)
    docs, paths = [], {}
    for number, suffix, detector in ((1, "", "tpc"), (2, "", "tpc"), (3, "", "tpc"),
                                     (3, "_MV", "muon_veto")):
        when = start + dt.timedelta(days=number)
        name = when.strftime("%y%m%d_%H%M")  # a muon-veto run's dataset adds "_MV"
        location = raw / (name + suffix)
        location.mkdir(parents=True)
        for i in range(FILES_PER_RUN):
            (location / f"XENON1T-{number}-{i:09d}.zip").write_bytes(os.urandom(200_000))
        paths[name + suffix] = location
        docs.append({"number": number, "name": name, "detector": detector, "start": when,
                     "tags": [], "data": [{"host": SITE, "type": "raw", "status": VERIFYING,
                                           "location": str(location), "checksum": None,
                                           "creation_time": when}]})
    db.insert_runs(docs)
    db.close()
    return paths


def test_demo_runs_round_trip_through_tape(tmp_path, fake_tape):
    paths = demo_runs(tmp_path)
    sites = json.loads(original_config("cax_tsm_upload.json", tmp_path).read_text())
    daemon = tmp_path / "cax.json"  # the site's daemon: checksums new data, purges old data
    sites[0].update(task_list=["AddChecksum", "BufferPurger"], purge=0, min_copies=1)
    daemon.write_text(json.dumps(sites))
    ok = command("main", "--once", "--config", str(daemon), "--host", SITE, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert all(p.exists() for p in paths.values())  # no verified copy elsewhere: kept
    before = {name: scan_dataset(p) for name, p in paths.items()}

    result = command("massive_tsm", "--once", "--config", "cax_tsm_upload.json", "--host",
                     SITE, "--log-dir", "logs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summaries = [line for line in result.stdout.splitlines() if "tape upload" in line]
    assert len(summaries) == 4 and all(": ok (log " in line for line in summaries), \
        result.stdout
    logs = sorted(os.listdir(tmp_path / "logs"))
    assert len(logs) == 4 and all(re.fullmatch(r"tsm_log_\w+_\d{6}_\d{6}\.txt", n) for n in logs)
    veto = next(n for n in paths if n.endswith("_MV"))[:-len("_MV")]
    assert any(n.startswith(f"tsm_log_{veto}_") for n in logs)  # a muon-veto run, by name
    assert "Upload to tape: [succcessful]" in (tmp_path / "logs" / logs[0]).read_text()
    assert os.listdir(tmp_path / "data/xenon/tsm") == []

    calls = len(fake_tape.calls())
    again = command("massive_tsm", "--once", "--config", "cax_tsm_upload.json", "--host",
                    SITE, "--log-dir", "logs", cwd=tmp_path)
    assert again.returncode == 0 and len(fake_tape.calls()) == calls  # nothing started
    assert len(os.listdir(tmp_path / "logs")) == 4

    purged = command("main", "--once", "--config", str(daemon), "--host", SITE, cwd=tmp_path)
    assert purged.returncode == 0, purged.stderr
    assert not any(p.exists() for p in paths.values())  # the tape copy counted

    download = original_config("cax_tsm_download.json", tmp_path)
    one = command("main", "--once", "--config", str(download), "--host", SITE, "--run", "1",
                  cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    first = next(iter(paths))
    assert paths[first].exists() and sum(p.exists() for p in paths.values()) == 1
    rest = command("massive_tsm", "--once", "--config", str(download), "--host", SITE,
                   "--log-dir", "logs", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    for name, path in paths.items():
        assert scan_dataset(path) == before[name], name  # same names, same bytes
    db = open_runsdb("file:" + str(tmp_path / "cax-runsdb"))
    for run in db.find_runs({}):
        here = find_entry(run, EntryKey(SITE, "raw"))
        tape = find_entry(run, EntryKey("tsm-server", "raw"))
        assert here["status"] == tape["status"] == TRANSFERRED
        assert here["checksum"] == tape["checksum"]
    db.close()
