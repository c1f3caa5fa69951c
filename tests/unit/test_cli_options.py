"""What a person types: options before a subcommand act on it or are refused; ordinary
mistakes get one line and exit 2, never a traceback (issue 18 items 1-3)."""

from __future__ import annotations

import json
import shlex
import socket

import pytest

from cax.runsdb import ERROR, TRANSFERRED, EntryKey, find_entry, open_runsdb
from tests.cli_world import cax, make_world, without_site_env
from tests.conftest import make_run


@pytest.fixture
def world(tmp_path):
    return make_world(tmp_path / "w")


def base(world, *args):
    return ["--config", str(world.config), "--host", "daq", *args]


def one_line(result):
    """The whole of stderr is one ``cax:`` line."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cax: "), result.stderr
    return lines[0]


@pytest.fixture
def other_db(tmp_path):
    """A second runs DB, holding only run 77 (stuck at lab)."""
    uri = f"file:{tmp_path / 'other'}"
    db = open_runsdb(uri, create=True)
    db.insert_runs([make_run(77, name="170107_0000", data=[
        {"host": "daq", "type": "raw", "status": TRANSFERRED, "location": "/x/170107_0000"},
        {"host": "lab", "type": "raw", "status": ERROR, "attempts": 9, "error": "boom",
         "source": "daq", "location": str(tmp_path / "w/lab/raw/170107_0000")}])])
    db.close()
    return uri


def test_runs_db_before_status_retry_run_add_and_config_check_is_used(world, other_db,
                                                                     tmp_path):
    """Item 1: ``cax --runs-db URI status | retry | run add | config check`` used the file's
    runs DB."""
    shown = cax(*base(world, "--runs-db", other_db, "status", "--run", "77"), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "run 77 (170107_0000" in shown.stdout
    before = world.generation()
    retried = cax(*base(world, "--runs-db", other_db, "retry", "--run", "77", "--site", "lab"),
                  cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr
    assert "retryable at the next pass: run 77" in retried.stdout
    fresh = tmp_path / "w/daq/raw/170108_0000"
    fresh.mkdir()
    (fresh / "f").write_bytes(b"x")
    added = cax(*base(world, "--runs-db", other_db, "run", "add", "--number", "78",
                      "--location", str(fresh)), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    assert world.generation() == before  # the file's runs DB was not touched
    db = open_runsdb(other_db)
    try:
        assert db.count_runs({"number": 78}) == 1
        lab = find_entry(db.find_runs({"number": 77})[0], EntryKey("lab", "raw"))
        assert lab["attempts"] == 0
    finally:
        db.close()
    checked = cax(*base(world, "--runs-db", f"file:{tmp_path / 'gone'}", "config", "check"),
                  cwd=tmp_path)
    assert checked.returncode == 2
    assert f"key 'runs_db' (file:{tmp_path / 'gone'})" in checked.stderr


def test_dry_run_before_retry_run_add_and_remove_changes_nothing(world, tmp_path):
    """Item 1: ``cax --dry-run retry --all-stuck`` really retried."""
    before = world.generation()
    retried = cax(*base(world, "--dry-run", "retry", "--all-stuck"), cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr
    assert "would retry run 3" in retried.stdout
    fresh = tmp_path / "w/daq/raw/170108_0000"
    fresh.mkdir()
    (fresh / "f").write_bytes(b"x")
    added = cax(*base(world, "--dry-run", "run", "add", "--number", "8", "--location",
                      str(fresh)), cwd=tmp_path)
    assert added.returncode == 0 and "would register run 8" in added.stdout, added.stderr
    removed = cax(*base(world, "--dry-run", "run", "remove", "--run", "2"), cwd=tmp_path)
    assert removed.returncode == 0 and "would unregister" in removed.stdout, removed.stderr
    assert world.generation() == before


@pytest.mark.parametrize(("given", "command"), [
    (["--once"], ["status"]),
    (["--run", "3"], ["status"]),
    (["--name", "170103_0000"], ["retry", "--all-stuck"]),
    (["--dry-run"], ["status", "--stuck"]),
    (["--disable-database-update"], ["run", "remove", "--run", "2"]),
    (["--metrics-port", "0"], ["retry", "--all-stuck"]),
    (["--metrics-file", "m.prom"], ["status"]),
    (["--ncpu", "2"], ["config", "check"]),
    (["--once", "--dry-run"], ["config", "check"]),
])
def test_options_a_subcommand_does_not_act_on_are_refused(world, tmp_path, given, command):
    """Item 1: every option given before a subcommand acts on it or is refused -- exit 2, one
    line naming it, nothing written -- never silently ignored."""
    before, data = world.generation(), world.data()
    result = cax(*base(world, *given, *command), cwd=tmp_path)
    assert result.returncode == 2
    line = one_line(result)
    assert given[0] in line and f"`cax {command[0]}`" in line
    assert world.generation() == before and world.data() == data


def test_demo_refuses_a_configuration(world, tmp_path):
    result = cax("--config", str(world.config), "demo", "--dir", str(tmp_path / "d"),
                 cwd=tmp_path)
    assert result.returncode == 2 and "--config" in one_line(result)
    assert not (tmp_path / "d").exists()


def test_location_without_number_is_one_line_not_a_traceback(world, tmp_path):
    """Item 2: exit 4 with a traceback before."""
    before = world.generation()
    result = cax(*base(world, "run", "add", "--location", str(tmp_path / "w/daq/raw/x")),
                 cwd=tmp_path)
    assert result.returncode == 2
    assert one_line(result) == "cax: --number is required with --location"
    assert world.generation() == before


def test_log_file_in_a_missing_directory_is_one_line(world, tmp_path):
    """Item 2: exit 4 with a traceback before."""
    for command in (["status"], ["--once"]):
        result = cax(*base(world, "--log-file", str(tmp_path / "no/such/dir/cax.log"),
                           *command), cwd=tmp_path)
        assert result.returncode == 2, command
        assert "--log-file" in one_line(result) and "No such file or directory" in result.stderr


def test_metrics_port_in_use_is_one_line(world, tmp_path):
    """Item 2: exit 4 with a traceback before; nothing is written (checked before the pass)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        before, data = world.generation(), world.data()
        result = cax(*base(world, "--once", "--metrics-port", str(port)), cwd=tmp_path)
    assert result.returncode == 2
    line = one_line(result)
    assert f"--metrics-port: cannot listen on 127.0.0.1:{port}" in line
    assert world.generation() == before and world.data() == data


def test_printed_retry_command_works_when_pasted(world, tmp_path):
    """Item 3: the retry line of ``status --stuck`` had no --host (and pasted elsewhere, it
    needs the configuration's full path)."""
    if socket.gethostname().split(".")[0] in ("daq", "lab"):
        pytest.skip("this machine's name is a site of the test world")
    env = without_site_env()
    shown = cax("--config", str(world.config), "--host", "daq", "status", "--stuck",
                cwd=tmp_path, env=env)
    line = next(x for x in shown.stdout.splitlines() if x.strip().startswith("retry: "))
    argv = shlex.split(line.split("retry: ", 1)[1])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pasted = cax(*argv[1:], cwd=elsewhere, env=env)
    assert pasted.returncode == 0, (line, pasted.stderr)
    assert "retryable at the next pass: run 3 (170103_0000) raw at lab" in pasted.stdout


def test_status_needs_no_site(world, tmp_path):
    """Item 3: ``cax status`` needed --host although it reads the whole runs DB."""
    if socket.gethostname().split(".")[0] in ("daq", "lab"):
        pytest.skip("this machine's name is a site of the test world")
    env = without_site_env()
    overview = cax("--config", str(world.config), "status", cwd=tmp_path, env=env)
    assert overview.returncode == 0, overview.stderr
    assert "stuck: 1 entry" in overview.stdout
    stuck = cax("--config", str(world.config), "status", "--stuck", "--json", cwd=tmp_path,
                env=env)
    assert stuck.returncode == 1, stuck.stderr
    entries = json.loads(stuck.stdout)
    assert [(e["run"], e["site"]) for e in entries] == [(3, "lab")]
    # with no site of its own, the printed command acts as the entry's site
    assert f"--config {world.config} --host lab retry --run 3" in entries[0]["command"]
    typo = cax("--config", str(world.config), "--host", "dqa", "status", cwd=tmp_path, env=env)
    assert typo.returncode == 2 and "'dqa'" in one_line(typo)  # a typo is still an error
