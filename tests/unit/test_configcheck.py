"""cax config check: each machine problem found, one line each."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from cax.cli import cli
from tests.conftest import edit_site, write_config


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


# -- one code path for config check and the daemon's start-up (issue 18 item 4) --------------


def both(config, *global_args, env=None, tmp_path):
    """``cax config check`` and the daemon's start-up (``--once``) on the same options."""
    from tests.cli_world import cax

    head = ["--config", str(config), "--host", "daq", *global_args]
    return (cax(*head, "config", "check", cwd=tmp_path, env=env),
            cax(*head, "--once", cwd=tmp_path, env=env))


def problem_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("cax: ")]


def test_task_list_typo_fails_config_check_as_it_fails_the_daemon(two_sites, tmp_path):
    edit_site(two_sites, "daq", task_list=["CopyPush", "Copypull"])
    checked, started = both(two_sites, tmp_path=tmp_path)
    assert checked.returncode == started.returncode == 2
    assert problem_lines(checked) == problem_lines(started)
    assert problem_lines(checked)[0].startswith(
        "cax: cax.json: site 'daq' key 'task_list': unknown task 'Copypull'")


def test_own_data_directory_missing_is_named_by_both(two_sites, tmp_path):
    """config check fails; the daemon says it once at start, as a warning (the work that
    needs the directory fails, saying so; a dry run still shows what it would do)."""
    (tmp_path / "daq/processed").rmdir()
    checked, started = both(two_sites, tmp_path=tmp_path)
    want = f"site 'daq' key 'dir_processed': {tmp_path / 'daq/processed'} does not exist"
    assert checked.returncode == 2
    assert any(line.startswith(f"cax: cax.json: {want}") for line in problem_lines(checked))
    assert started.returncode == 0, started.stderr
    assert started.stderr.count(f"WARNING cax.json: {want}") == 1
    assert not (tmp_path / "daq/processed").exists()  # nobody created it


def test_metrics_file_directory_checked_by_both(two_sites, tmp_path):
    missing = tmp_path / "no/such/dir/cax.prom"
    checked, started = both(two_sites, "--metrics-file", str(missing), tmp_path=tmp_path)
    assert checked.returncode == started.returncode == 2
    want = f"cax: cax.json: --metrics-file: directory {missing.parent} does not exist"
    assert want in problem_lines(checked) and want in problem_lines(started)


def tape_config(tmp_path, two_sites, dsmc):
    edit_site(two_sites, "daq", upload_options=["lab", "tape"])
    data = json.loads(two_sites.read_text())
    data["sites"].append({"name": "tape", "method": "tsm", "dir_raw": "/archive/raw",
                          "data_type": ["raw"], "tsm": {"dsmc": dsmc}})
    two_sites.write_text(json.dumps(data))
    return two_sites


def test_missing_tape_client_fails_config_check_and_warns_the_daemon(two_sites, tmp_path):
    missing = str(tmp_path / "no-dsmc")
    checked, started = both(tape_config(tmp_path, two_sites, missing), tmp_path=tmp_path)
    want = f"site 'tape' key 'tsm.dsmc': the tape client {missing!r} is not on PATH"
    assert checked.returncode == 2 and want in checked.stderr
    assert started.returncode == 0, started.stderr  # only tape work fails: the daemon runs
    assert f"WARNING cax.json: {want}" in started.stderr


def test_missing_batch_commands_are_named(two_sites, tmp_path, monkeypatch):
    edit_site(two_sites, "daq", processing={
        "command": ["{python}", "-m", "cax.processors.reference", "{input}", "{output}"],
        "version": "v1", "backend": "slurm"})
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch, squeue, scancel, sacct
    result = check(two_sites)
    assert result.exit_code == 2
    for name in ("sbatch", "squeue", "scancel", "sacct"):
        assert f"site 'daq': {name} (for processing." in result.stderr, name


def test_unresolvable_host_name_is_named_once(two_sites, tmp_path):
    """Item 8: a host name that does not resolve gets one clear line, not silent retries."""
    edit_site(two_sites, "daq", upload_options=["far"])
    data = json.loads(two_sites.read_text())
    data["sites"].append({"name": "far", "method": "rsync", "hostname": "no-such-host.invalid",
                          "dir_raw": "/data/raw", "data_type": ["raw"],
                          "accept_new_host_keys": True})
    two_sites.write_text(json.dumps(data))
    checked, started = both(two_sites, tmp_path=tmp_path)
    want = "site 'far' key 'hostname': no-such-host.invalid does not resolve"
    assert checked.returncode == 2 and want in checked.stderr
    assert started.stderr.count(want) == 1


def test_success_says_what_was_checked(two_sites):
    result = check(two_sites)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].endswith("site daq: no problems found; checked:")
    checked = {line.split(":")[0].strip() for line in lines[1:]}
    assert {"tasks", "this site's data directories", "data directories of local sites",
            "SSH key and known_hosts files", "host names", "tape client", "commands",
            "metrics", "runs DB", "SSH sites"} <= checked
    assert "  tasks: 14 (AddChecksum, " in result.stdout
    assert "  SSH sites: not reached (add --network)" in lines
