"""massive-tsm's run selection and log names, and its options on the command line."""

from __future__ import annotations

import datetime as dt

import pytest

from cax.cli.massive_tsm import MassiveOptions, log_name, selection
from cax.errors import ConfigError

NOW = dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("opts, expected", [
    (MassiveOptions(), {}),
    (MassiveOptions(run=7), {"number": 7}),
    (MassiveOptions(from_run=3, to_run=9), {"number": {"$gte": 3, "$lte": 9}}),
    (MassiveOptions(from_run=3, to_run=-1), {"number": {"$gte": 3}}),
    (MassiveOptions(from_run=3), {"number": {"$gte": 3}}),  # the original ignored one bound
    (MassiveOptions(to_run=9), {"number": {"$lte": 9}}),
    (MassiveOptions(from_run=5, to_run=5), {"number": {"$gte": 5, "$lte": 5}}),
    (MassiveOptions(last_days=2), {"start": {"$gt": NOW - dt.timedelta(days=2)}}),
    (MassiveOptions(name="170101_0000_MV", last_days=1),
     {"$and": [{"name": "170101_0000_MV"}, {"start": {"$gt": NOW - dt.timedelta(days=1)}}]}),
])
def test_selection(opts, expected):
    assert selection(opts, NOW) == expected


def test_from_above_to_is_a_usage_error():
    with pytest.raises(ConfigError, match="above"):
        selection(MassiveOptions(from_run=9, to_run=3), NOW)


def test_log_names_use_the_number_for_tpc_and_the_name_for_muon_veto():
    assert log_name({"number": 12, "name": "170101_0000", "detector": "tpc"}, NOW) == \
        "tsm_log_12_261203_100000.txt"
    assert log_name({"number": 12, "name": "170101_0000_MV", "detector": "muon_veto"}, NOW) \
        == "tsm_log_170101_0000_MV_261203_100000.txt"


def test_cli_refuses_bad_ranges_and_sites_without_tape_in_one_line(tmp_path):
    import json

    from click.testing import CliRunner

    from cax.cli import massive_tsm

    config = tmp_path / "cax.json"
    config.write_text(json.dumps({"runs_db": f"file:{tmp_path / 'db'}", "sites": [
        {"name": "a", "method": "local", "dir_raw": str(tmp_path)},
        {"name": "tsm-server", "method": "tsm"}]}))
    runner = CliRunner()
    bad = runner.invoke(massive_tsm, ["--once", "--config", str(config), "--host", "a",
                                      "--from-run", "9", "--to-run", "3"])
    assert bad.exit_code == 2 and "above" in bad.output
    none = runner.invoke(massive_tsm, ["--once", "--config", str(config), "--host", "a",
                                       "--log-dir", str(tmp_path / "logs")])
    assert none.exit_code == 2 and "names no tape site" in none.output
    assert "Traceback" not in bad.output + none.output
