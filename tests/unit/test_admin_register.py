"""cax run add: one run, --from-dir, --json; duplicates refused with one line naming both."""

from __future__ import annotations

import datetime as dt
import json

from click.testing import CliRunner

from cax.cli import cli
from cax.runsdb import TRANSFERRED, VERIFYING


def cax(config, *args):
    return CliRunner().invoke(cli, ["--config", str(config), "--host", "daq", "run", "add",
                                    *args])


def test_add_one_run_verifying_then_duplicates_refused(two_sites, runsdb, tmp_path):
    raw = tmp_path / "daq/raw/170131_1200"
    raw.mkdir()
    result = cax(two_sites, "--number", "7", "--location", str(raw), "--tag", "blind")
    assert result.exit_code == 0, result.output
    run = runsdb.find_runs({"number": 7})[0]
    assert run["name"] == "170131_1200" and run["detector"] == "tpc"
    assert run["start"] == dt.datetime(2017, 1, 31, 12, tzinfo=dt.timezone.utc)
    assert run["tags"] == [{"name": "blind"}]
    assert run["data"][0]["status"] == VERIFYING and run["data"][0]["host"] == "daq"
    other = tmp_path / "daq/raw/170131_1300"
    other.mkdir()
    same_number = cax(two_sites, "--number", "7", "--location", str(other))
    assert same_number.exit_code == 1
    assert same_number.stderr == ("cax: run 7 (170131_1300, tpc) not registered: the runs DB "
                                  "already has run 7 (170131_1200, tpc), started 2017-01-31 "
                                  "12:00:00 UTC\n")
    same_name = cax(two_sites, "--number", "8", "--location", str(raw))
    assert same_name.exit_code == 1 and "already has run 7 (170131_1200, tpc)" in same_name.stderr
    muon_veto = cax(two_sites, "--number", "7", "--location", str(other), "--detector",
                    "muon_veto")
    assert muon_veto.exit_code == 0, muon_veto.output  # numbers are per detector
    assert runsdb.count_runs({}) == 2


def test_add_transferred_with_checksum_and_refusals(two_sites, runsdb, tmp_path):
    raw = tmp_path / "daq/raw/170131_1400"
    raw.mkdir()
    checksum = "adler32:" + "0" * 64
    result = cax(two_sites, "--number", "1", "--location", str(raw), "--checksum", checksum)
    assert result.exit_code == 0, result.output
    entry = runsdb.find_runs({"number": 1})[0]["data"][0]
    assert entry["status"] == TRANSFERRED and entry["checksum"] == checksum
    bad = cax(two_sites, "--number", "2", "--location", str(raw), "--checksum", "abc")
    assert bad.exit_code == 2 and "is not a cax checksum" in bad.stderr
    outside = cax(two_sites, "--number", "2", "--location", str(tmp_path))
    assert outside.exit_code == 2 and "not inside" in outside.stderr


def test_from_dir_registers_new_run_directories_once(two_sites, runsdb, tmp_path):
    for name in ("170201_0000", "170202_0000", "170203_0000_MV"):
        (tmp_path / "daq/raw" / name).mkdir()
    result = cax(two_sites, "--from-dir", str(tmp_path / "daq/raw"))
    assert result.exit_code == 0, result.output
    assert sorted(r["number"] for r in runsdb.find_runs({})) == [0, 1, 2]
    (tmp_path / "daq/raw/170204_0000").mkdir()
    again = cax(two_sites, "--from-dir", str(tmp_path / "daq/raw"))
    assert again.exit_code == 0, again.output
    assert again.stdout.count("skipped") == 3
    assert runsdb.find_runs({"name": "170204_0000"})[0]["number"] == 3


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
