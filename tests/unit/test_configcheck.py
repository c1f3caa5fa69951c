"""cax config check: each machine problem found, one line each."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from cax.cli import cli
from tests.conftest import write_config


def check(config, *args):
    return CliRunner().invoke(cli, ["--config", str(config), "--host", "daq", "config",
                                    "check", *args])


def test_good_config_passes(two_sites):
    result = check(two_sites)
    assert result.exit_code == 0, result.output
    assert "site daq: no problems found" in result.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_dir_is_named(two_sites, tmp_path):
    (tmp_path / "lab/raw").chmod(0o500)
    try:
        result = check(two_sites)
    finally:
        (tmp_path / "lab/raw").chmod(0o700)
    assert "site 'lab' key 'dir_raw'" in result.stderr and "not writable" in result.stderr


def test_each_problem_one_line(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "afile").write_text("")
    sites = [
        {"name": "daq", "method": "local", "dir_raw": str(tmp_path / "raw"),
         "dir_processed": str(tmp_path / "afile"), "data_type": ["raw"],
         "upload_options": ["far"]},
        {"name": "lab", "method": "local", "dir_raw": str(tmp_path / "gone"),
         "data_type": ["raw"]},
        {"name": "far", "method": "rsync", "hostname": "127.0.0.1", "port": 1,
         "key_file": str(tmp_path / "no_key"), "known_hosts": str(tmp_path / "no_hosts"),
         "dir_raw": "/data/raw", "data_type": ["raw"]},
    ]
    (tmp_path / "db").write_text("not a directory")
    config = write_config(tmp_path / "cax.json", sites, runs_db=f"file:{tmp_path / 'db'}")
    result = check(config, "--network")
    assert result.exit_code == 2
    # log records (e.g. of the ssh attempt) may go to stderr too; the problems are the cax: lines
    lines = [line for line in result.stderr.splitlines() if line.startswith("cax: ")]
    assert all(line.startswith("cax: cax.json: ") for line in lines), lines
    text = "\n".join(lines)
    assert f"site 'daq' key 'dir_processed': {tmp_path / 'afile'} is not a directory" in text
    assert f"site 'lab' key 'dir_raw': {tmp_path / 'gone'} does not exist" in text
    assert f"site 'far' key 'key_file': {tmp_path / 'no_key'} is missing" in text
    assert f"site 'far' key 'known_hosts': {tmp_path / 'no_hosts'} is missing" in text
    assert "key 'runs_db' (file:" in text
    assert "site 'far': cannot reach it with rsync" in text
    assert len(lines) == 6
