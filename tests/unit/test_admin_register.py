"""cax run add: one run, --from-dir, --json; duplicates refused with one line naming both."""

from __future__ import annotations

import datetime as dt
import json

from click.testing import CliRunner

from cax.cli import cli
from cax.runsdb import VERIFYING


def cax(config, *args):
    return CliRunner().invoke(cli, ["--config", str(config), "--host", "daq", "run", "add",
                                    *args])


def run_dir(path, files=2):
    """A raw run directory as the DAQ writes it: a few files."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (path / f"XENON1T-{i:06d}.zip").write_bytes(bytes([i]) * 100)
    return path


def test_add_one_run_verifying_then_duplicates_refused(two_sites, runsdb, tmp_path):
    raw = run_dir(tmp_path / "daq/raw/170131_1200")
    result = cax(two_sites, "--number", "7", "--location", str(raw), "--tag", "blind")
    assert result.exit_code == 0, result.output
    run = runsdb.find_runs({"number": 7})[0]
    assert run["name"] == "170131_1200" and run["detector"] == "tpc"
    assert run["start"] == dt.datetime(2017, 1, 31, 12, tzinfo=dt.timezone.utc)
    assert run["tags"] == [{"name": "blind"}]
    assert run["data"][0]["status"] == VERIFYING and run["data"][0]["host"] == "daq"
    other = run_dir(tmp_path / "daq/raw/170131_1300")
    same_number = cax(two_sites, "--number", "7", "--location", str(other))
    assert same_number.exit_code == 1
    assert same_number.stderr == ("cax: run 7 (170131_1300, tpc) not registered: the runs DB "
                                  "already has run 7 (170131_1200, tpc), started 2017-01-31 "
                                  "12:00:00 UTC\n")
    same_place = cax(two_sites, "--number", "8", "--location", str(raw))
    assert same_place.exit_code == 2
    assert "is already the location of run 7 (170131_1200)" in same_place.stderr
    muon_veto = run_dir(tmp_path / "daq/raw/170131_1300_MV")
    veto = cax(two_sites, "--number", "7", "--location", str(muon_veto), "--name",
               "170131_1300", "--detector", "muon_veto")
    assert veto.exit_code == 0, veto.output  # numbers are per detector
    assert runsdb.count_runs({}) == 2


def test_add_with_the_daqs_checksum_is_verified_first_and_refusals(two_sites, runsdb, tmp_path):
    raw = run_dir(tmp_path / "daq/raw/170131_1400")
    checksum = "adler32:" + "0" * 64
    result = cax(two_sites, "--number", "1", "--location", str(raw), "--checksum", checksum)
    assert result.exit_code == 0, result.output
    entry = runsdb.find_runs({"number": 1})[0]["data"][0]
    assert entry["status"] == VERIFYING and entry["checksum"] == checksum  # nothing taken on trust
    bad = cax(two_sites, "--number", "2", "--location", str(raw), "--checksum", "abc")
    assert bad.exit_code == 2 and "is not a cax checksum" in bad.stderr
    outside = cax(two_sites, "--number", "2", "--location", str(tmp_path))
    assert outside.exit_code == 2 and "not inside" in outside.stderr


def test_from_dir_registers_new_run_directories_once(two_sites, runsdb, tmp_path):
    for name in ("170201_0000", "170202_0000", "170203_0000_MV"):
        run_dir(tmp_path / "daq/raw" / name)
    result = cax(two_sites, "--from-dir", str(tmp_path / "daq/raw"))
    assert result.exit_code == 0, result.output
    assert sorted(r["number"] for r in runsdb.find_runs({})) == [0, 1, 2]
    run_dir(tmp_path / "daq/raw/170204_0000")
    again = cax(two_sites, "--from-dir", str(tmp_path / "daq/raw"))
    assert again.exit_code == 0, again.output
    assert again.stdout.count("skipped") == 3
    assert runsdb.find_runs({"name": "170204_0000"})[0]["number"] == 3



def test_from_dir_relative_to_the_working_directory(two_sites, runsdb, tmp_path, monkeypatch):
    """A relative DIR (the README's quick start) means the working directory's, not refused."""
    run_dir(tmp_path / "daq/raw/170201_0000")
    monkeypatch.chdir(tmp_path)
    result = cax(two_sites, "--from-dir", "daq/raw")
    assert result.exit_code == 0, result.output
    assert "registered run 0 (170201_0000, tpc)" in result.stdout, result.stdout
    assert runsdb.find_runs({})[0]["data"][0]["location"] == str(tmp_path / "daq/raw/170201_0000")

def test_json_documents_as_the_daq_wrote_them(two_sites, runsdb, tmp_path):
    docs = [{"number": 5, "name": "170301_0000", "detector": "tpc",
             "start": {"$date": "2017-03-01T00:00:00Z"}, "reader": {"self_trigger": True},
             "tags": [{"name": "_sciencerun0"}],
             "data": [{"host": "daq", "type": "raw", "status": "verifying", "checksum": None,
                       "location": str(tmp_path / "daq/raw/170301_0000")}]},
            {"number": 6, "name": "170302_0000", "start": "2017-03-02T00:00:00",
             "data": []}]
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(docs))
    result = cax(two_sites, "--json", str(path))
    assert result.exit_code == 0, result.output
    run = runsdb.runs.find_one({"number": 5})
    assert run["reader"] == {"self_trigger": True}  # the DAQ's fields are kept
    assert run["start"] == dt.datetime(2017, 3, 1, tzinfo=dt.timezone.utc)
    assert runsdb.find_runs({"number": 6})[0]["detector"] == "tpc"
    path.write_text('[{"number": 9, "name": "../etc", "start": "2017-03-02T00:00:00"}]')
    unsafe = cax(two_sites, "--json", str(path))
    assert unsafe.exit_code == 2 and "unsafe run name" in unsafe.stderr
