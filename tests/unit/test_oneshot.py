"""cax-mv, cax-rm and cax-stray: safe order, rollback, refusal of foreign paths, exit codes."""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest
from click.testing import CliRunner

from cax import oneshot
from cax.cli import cax_mv, cax_rm, cax_stray
from cax.daemon import Daemon
from cax.errors import RunsDBError
from cax.runsdb import PURGING, TRANSFERRED, TRANSFERRING, EntryKey, RunsDB, find_entry
from cax.tasks.purge import BufferPurger
from tests.conftest import make_context, make_run
from tests.unit.housekeeping import copy_entry, make_dataset, make_sites

RAW_A = EntryKey("a", "raw")


@pytest.fixture(autouse=True)
def _restore_logging():
    """The commands set up logging on CliRunner's streams; put the test's handlers back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def config(tmp_path, runsdb_uri):
    return make_sites(tmp_path, runsdb_uri, a={}, b={})


def run_cmd(command, config, *args, input=None):
    result = CliRunner().invoke(command, [*args, "--config", str(config), "--host", "a"],
                                input=input)
    return result.exit_code, result.stdout, result.stderr


def insert(runsdb, number, *entries):
    runsdb.insert_runs([make_run(number, name=f"run{number}", data=list(entries))])
    return runsdb.find_runs({"number": number})[0]["_id"]


def entry_at(runsdb, run_id, key=RAW_A):
    return find_entry(runsdb.find_run(run_id), key)


@pytest.fixture
def raw(tmp_path, runsdb):
    path = make_dataset(tmp_path / "a/raw/run1")
    run_id = insert(runsdb, 1, copy_entry("a", path), copy_entry("b", "/b/raw/run1", like=path))
    return path, run_id


# -- cax-mv -------------------------------------------------------------------------------------

def test_cax_mv_moves_data_and_records_location(config, runsdb, raw, tmp_path):
    path, run_id = raw
    target = tmp_path / "a/raw/moved/run1"
    code, out, err = run_cmd(cax_mv, config, "--input", str(path), "--output", str(target))
    assert code == 0, err
    assert f"moved run 1 (run1): {path} -> {target}" in out
    assert target.is_dir() and not path.exists()
    entry = entry_at(runsdb, run_id)
    assert entry["location"] == str(target) and entry["status"] == TRANSFERRED
    assert "lease_owner" not in entry


def test_cax_mv_db_update_failure_moves_data_back(config, runsdb, raw, tmp_path, monkeypatch):
    path, run_id = raw
    target = tmp_path / "a/raw/elsewhere/run1"
    def failing(self, claim, run, location):
        raise RunsDBError("runs DB: relocate: connection reset")

    monkeypatch.setattr(RunsDB, "relocate", failing)
    ctx = make_context(config, "a", runsdb)
    with pytest.raises(RunsDBError):
        oneshot.move_dataset(ctx, str(path), str(target))
    assert path.is_dir() and not target.exists()
    entry = entry_at(runsdb, run_id)
    assert entry["location"] == str(path) and "lease_owner" not in entry


def test_cax_mv_failing_rename_changes_nothing(config, runsdb, raw, tmp_path, monkeypatch):
    path, run_id = raw

    def refuse(source, target):
        raise PermissionError(errno.EACCES, "Permission denied", target)

    monkeypatch.setattr(oneshot, "_rename", refuse)
    code, _, err = run_cmd(cax_mv, config, "--input", str(path), "--output",
                           str(tmp_path / "a/raw/elsewhere/run1"))
    assert code == 1 and "Permission denied" in err
    assert path.is_dir()
    entry = entry_at(runsdb, run_id)
    assert entry["location"] == str(path) and "lease_owner" not in entry


@pytest.mark.parametrize("db_fails", [False, True])
def test_cax_mv_across_filesystems_copies_verifies_and_rolls_back(
        config, runsdb, raw, tmp_path, monkeypatch, db_fails):
    path, run_id = raw
    target = tmp_path / "a/raw/other/run1"

    def cross_device(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link", target)

    monkeypatch.setattr(oneshot, "_rename", cross_device)
    if db_fails:
        monkeypatch.setattr(RunsDB, "relocate", lambda *a, **k: False)
    ctx = make_context(config, "a", runsdb)
    if db_fails:
        with pytest.raises(oneshot.LeaseLostError):
            oneshot.move_dataset(ctx, str(path), str(target))
        assert path.is_dir() and not target.exists()
        assert entry_at(runsdb, run_id)["location"] == str(path)
    else:
        result = oneshot.move_dataset(ctx, str(path), str(target))
        assert result.copied and not result.leftover
        assert target.is_dir() and not path.exists()
        assert entry_at(runsdb, run_id)["location"] == str(target)
    assert not list(target.parent.glob(".*cax-partial"))


@pytest.mark.parametrize("output, message", [
    ("/etc/run1", "not inside"),
    ("{tmp}/b/raw/run1", "not inside"),
    ("{tmp}/a/processed/pax_v1/run1", "not inside"),
    ("{tmp}/a/raw/../../b/raw/run1", "not inside"),
])
def test_cax_mv_target_outside_data_dir_refused(config, runsdb, raw, tmp_path, output, message):
    path, run_id = raw
    code, _, err = run_cmd(cax_mv, config, "--input", str(path),
                           "--output", output.format(tmp=tmp_path))
    assert code == 2 and message in err
    assert path.is_dir() and entry_at(runsdb, run_id)["location"] == str(path)


def test_cax_mv_bad_input_exit_2(config, runsdb, raw, tmp_path):
    path, _ = raw
    (tmp_path / "a/raw/taken/run1").mkdir(parents=True)
    unknown = make_dataset(tmp_path / "a/raw/unregistered")
    cases = [(path, tmp_path / "a/raw/taken/run1", "exists"),
             (unknown, tmp_path / "a/raw/x", "no raw entry of site a"),
             (path, path, "the same"),
             (path, tmp_path / "a/raw/run2", "does not belong to run 1")]
    for source, target, message in cases:
        code, _, err = run_cmd(cax_mv, config, "--input", str(source), "--output", str(target))
        assert (code, message in err) == (2, True), err
    code, _, err = run_cmd(cax_mv, config, "--input", str(path), "--output",
                           str(tmp_path / "a/raw/run9"), "--disable-database-update")
    assert code == 2 and "nothing done" in err and path.is_dir()


# -- cax-rm -------------------------------------------------------------------------------------

def test_cax_rm_deletes_data_then_entry(config, runsdb, raw):
    path, run_id = raw
    runsdb.save_manifest(run_id, RAW_A, {}, "x", runsdb.find_run(run_id)["start"])
    code, out, err = run_cmd(cax_rm, config, "--location", str(path), "--run", "1")
    assert code == 0, err
    assert "removed run 1 (run1)" in out and "other sites: 1" in out
    assert not path.exists() and entry_at(runsdb, run_id) is None
    assert entry_at(runsdb, run_id, EntryKey("b", "raw")) is not None
    assert runsdb.find_manifest(run_id, RAW_A) is None


@pytest.mark.parametrize("location", [
    "/etc", "{tmp}/a/raw", "{tmp}/a/raw/../../b/raw/run1", "{tmp}/elsewhere/run1",
])
def test_cax_rm_location_outside_data_dirs_refused(config, runsdb, raw, tmp_path, location):
    path, run_id = raw
    (tmp_path / "elsewhere/run1").mkdir(parents=True)
    code, _, err = run_cmd(cax_rm, config, "--location", location.format(tmp=tmp_path),
                           "--run", "1")
    assert code == 2
    assert "not a dataset inside the data directories of site a" in err
    assert path.is_dir() and (tmp_path / "elsewhere/run1").is_dir()
    assert entry_at(runsdb, run_id)["status"] == TRANSFERRED


def test_cax_rm_unknown_run_or_wrong_run_exit_2(config, runsdb, raw):
    path, _ = raw
    insert(runsdb, 2)
    for location, run, message in ((path, "7", "unknown run 7"),
                                   (path, "2", "no raw entry of site a"),
                                   (path / "sub", "1", "no raw entry of site a")):
        code, _, err = run_cmd(cax_rm, config, "--location", str(location), "--run", run)
        assert code == 2 and message in err
    assert path.is_dir()


def test_cax_rm_interrupted_delete_keeps_purging_and_is_finished_later(
        config, runsdb, raw, monkeypatch):
    path, run_id = raw

    def broken(target):
        raise OSError(errno.EIO, "Input/output error", target)

    monkeypatch.setattr("cax.tasks.purge.siteops.remove", broken)
    code, _, err = run_cmd(cax_rm, config, "--location", str(path), "--run", "1")
    assert code == 1 and "Input/output error" in err
    entry = entry_at(runsdb, run_id)
    assert entry["status"] == PURGING and "lease_owner" not in entry  # counts as no copy
    monkeypatch.undo()
    assert Daemon(make_context(config, "a", runsdb), [BufferPurger]).run_pass().failed == 0
    assert not path.exists() and entry_at(runsdb, run_id) is None


def test_cax_rm_unreachable_runs_db_exit_3(tmp_path, raw):
    path, _ = raw
    bad = make_sites(tmp_path, ("file:" + str(tmp_path / "a/raw/run1/f001.zip/db"), "run"),
                     a={})
    code, _, err = run_cmd(cax_rm, bad, "--location", str(path), "--run", "1")
    assert code == 3 and "runs DB" in err and path.is_dir()


# -- cax-stray ----------------------------------------------------------------------------------

@pytest.fixture
def layout(tmp_path, runsdb):
    """Referenced and unreferenced files at site a; returns the expected strays."""
    raw, processed = tmp_path / "a/raw", tmp_path / "a/processed"
    used = [make_dataset(raw / "run1"), make_dataset(raw / "sub/run2"),
            make_dataset(raw / "run3"), processed / "pax_v1/run1.root"]
    used[3].parent.mkdir(parents=True)
    used[3].write_bytes(b"x")
    in_progress = make_dataset(raw / ".run4.cax-partial")
    strays = [make_dataset(raw / "old"), raw / "notes.txt", make_dataset(raw / ".run5.cax-partial"),
              processed / "pax_v1/run9.root", processed / "junk.txt",
              make_dataset(raw / "run6")]
    for path in strays[1:5]:
        if not path.exists():
            path.write_text("stray")
    insert(runsdb, 1, copy_entry("a", used[0]),
           copy_entry("a", used[3], data_type="processed", version="v1"))
    insert(runsdb, 2, copy_entry("a", used[1]))
    insert(runsdb, 3, copy_entry("a", used[2], status=PURGING))
    insert(runsdb, 4, copy_entry("a", raw / "run4", status=TRANSFERRING))
    insert(runsdb, 5, copy_entry("a", raw / "run5"))  # transferred: its partial is a leftover
    insert(runsdb, 6, copy_entry("b", raw / "run6"))  # another site's entry does not count
    return sorted(map(str, strays)), [*used, in_progress]


def test_cax_stray_lists_exactly_the_unreferenced_paths(config, runsdb, layout):
    strays, _ = layout
    code, out, err = run_cmd(cax_stray, config)
    assert code == 0, err
    assert sorted(out.split()) == strays


def test_cax_stray_delete_yes_deletes_exactly_the_strays(config, runsdb, layout, tmp_path):
    strays, used = layout
    code, out, err = run_cmd(cax_stray, config, "--delete", "--yes")
    assert code == 0, err
    assert not any(os.path.lexists(p) for p in strays)
    assert all(path.exists() for path in used)
    assert sorted(line.split()[1] for line in out.splitlines() if line.startswith("deleted")) \
        == strays


def test_cax_stray_delete_asks_and_declining_deletes_nothing(config, runsdb, layout):
    strays, _ = layout
    code, _, err = run_cmd(cax_stray, config, "--delete", input="n\n")
    assert code == 1 and "nothing deleted" in err
    assert all(os.path.lexists(p) for p in strays)
    code, _, _ = run_cmd(cax_stray, config, "--delete", input="y\n")
    assert code == 0 and not any(os.path.lexists(p) for p in strays)


def test_delete_strays_path_used_since_listing_is_kept(config, runsdb, layout, tmp_path):
    strays, _ = layout
    ctx = make_context(config, "a", runsdb)
    listed = oneshot.find_strays(ctx)
    insert(runsdb, 7, copy_entry("a", tmp_path / "a/raw/old", status=TRANSFERRING))
    result = oneshot.delete_strays(ctx, listed)
    assert result.kept == [str(tmp_path / "a/raw/old")]
    assert sorted(result.deleted) == sorted(set(strays) - set(result.kept))


def test_find_site_locations_fetches_only_locations_of_the_site(runsdb, tmp_path):
    insert(runsdb, 1, copy_entry("a", "/x/a"), copy_entry("b", "/x/b"))
    assert runsdb.find_site_locations("a") == [{"location": "/x/a", "status": TRANSFERRED}]
    assert json.dumps(runsdb.find_site_locations("c")) == "[]"
