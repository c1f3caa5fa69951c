"""AddSize and SetPermission: done once per copy, selective queries, config validation."""

from __future__ import annotations

import grp
import json
import logging
import os
import stat
import sys

import pytest

from cax.config import load_config
from cax.daemon import Daemon
from cax.errors import ConfigError
from cax.runsdb import EntryKey, find_entry, open_runsdb
from cax.tasks.filesystem import AddSize, SetPermission, settings_digest, split_mode
from tests.conftest import make_context, make_run
from tests.unit.housekeeping import copy_entry, make_dataset, make_sites


def insert(runsdb, number, *entries, **fields):
    runsdb.insert_runs([make_run(number, name=f"run{number}", data=list(entries), **fields)])
    return runsdb.find_runs({"number": number})[0]["_id"]


def mode_of(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- AddSize ------------------------------------------------------------------------------------

@pytest.fixture
def site_a(tmp_path, runsdb_uri):
    return make_sites(tmp_path, runsdb_uri, a={})


def test_add_size_legacy_copies_get_size_count_and_raw_size_once(site_a, runsdb, tmp_path):
    raw = make_dataset(tmp_path / "a/raw/run1", files=3, size=1000)  # 1000 + 1001 + 1002
    proc_file = tmp_path / "a/processed/pax_v1/run1.root"
    proc_file.parent.mkdir(parents=True)
    proc_file.write_bytes(b"p" * 77)
    run_id = insert(runsdb, 1, copy_entry("a", raw),
                    copy_entry("a", proc_file, data_type="processed", version="v1"),
                    copy_entry("b", "/b/raw/run1", size=1, file_count=1))
    ctx = make_context(site_a, "a", runsdb)
    assert Daemon(ctx, [AddSize]).run_pass().failed == 0
    run = runsdb.runs.find_one({"_id": run_id})
    raw_entry = find_entry(run, EntryKey("a", "raw"))
    assert (raw_entry["size"], raw_entry["file_count"]) == (3003, 3)
    processed = find_entry(run, EntryKey("a", "processed", "v1"))
    assert (processed["size"], processed["file_count"]) == (77, 1)
    assert run["raw_size_byte"] == 3003
    assert find_entry(run, EntryKey("b", "raw"))["size"] == 1  # not ours: untouched
    assert runsdb.find_runs(AddSize(ctx).query()) == []  # the next pass fetches nothing


def test_add_size_raw_size_byte_already_set_is_kept(site_a, runsdb, tmp_path):
    raw = make_dataset(tmp_path / "a/raw/run1")
    run_id = insert(runsdb, 1, copy_entry("a", raw), raw_size_byte=42)
    Daemon(make_context(site_a, "a", runsdb), [AddSize]).run_pass()
    run = runsdb.runs.find_one({"_id": run_id})
    assert run["raw_size_byte"] == 42 and find_entry(run, EntryKey("a", "raw"))["size"] > 42


def test_add_size_missing_data_fails_that_run_only(site_a, runsdb, tmp_path):
    raw = make_dataset(tmp_path / "a/raw/run2")
    insert(runsdb, 1, copy_entry("a", tmp_path / "a/raw/gone"))
    run_id = insert(runsdb, 2, copy_entry("a", raw))
    result = Daemon(make_context(site_a, "a", runsdb), [AddSize]).run_pass()
    assert result.failed == 1
    assert find_entry(runsdb.find_run(run_id), EntryKey("a", "raw"))["file_count"] == 3


def test_add_size_dry_run_records_nothing(site_a, runsdb, runsdb_uri, tmp_path, caplog):
    run_id = insert(runsdb, 1, copy_entry("a", make_dataset(tmp_path / "a/raw/run1")))
    before = runsdb.runs.find_one({"_id": run_id})
    read_only = open_runsdb(*runsdb_uri, read_only=True)
    caplog.set_level(logging.INFO)
    try:
        Daemon(make_context(site_a, "a", read_only, dry_run=True), [AddSize]).run_pass()
    finally:
        read_only.close()
    assert runsdb.runs.find_one({"_id": run_id}) == before
    assert "dry run: would record raw at a: 3003 bytes in 3 file(s)" in caplog.text


def test_add_size_records_an_import_in_batches_and_leaves_changed_copies(site_a, runsdb,
                                                                          tmp_path):
    """1,200 legacy copies cost a few writes, not 2,400 (one per copy and one per run before
    record_sizes); a copy that stopped being ``transferred`` after the query is left alone."""
    sparse = tmp_path / "a/raw"
    sparse.mkdir(parents=True, exist_ok=True)
    for n in range(1200):
        (sparse / f"run{n}").mkdir()
        (sparse / f"run{n}" / "f.zip").write_bytes(b"x" * (n % 7 + 1))
    runsdb.insert_runs([make_run(n, name=f"run{n}", data=[copy_entry("a", sparse / f"run{n}")])
                        for n in range(1200)])
    ctx = make_context(site_a, "a", runsdb)
    task = AddSize(ctx)
    runs = runsdb.find_runs(task.query())
    gone = runs[0]
    assert runsdb.runs.update_one({"_id": gone["_id"]},
                                  {"$set": {"data.0.status": "error"}}).modified_count == 1
    before = runsdb.round_trips
    for run in runs:
        task.each_run(run)
    task.finish()
    assert runsdb.round_trips - before <= 3  # 500, 500, 200
    run = runsdb.runs.find_one({"_id": runs[1]["_id"]})
    entry = find_entry(run, EntryKey("a", "raw"))
    n = run["number"]
    assert (entry["size"], entry["file_count"], run["raw_size_byte"]) == (n % 7 + 1, 1, n % 7 + 1)
    untouched = runsdb.runs.find_one({"_id": gone["_id"]})
    assert "size" not in untouched["data"][0] and "raw_size_byte" not in untouched
    assert runsdb.count_runs(task.query()) == 0  # and the changed one is not AddSize's


# -- SetPermission ------------------------------------------------------------------------------

def other_group() -> str:
    """A group this process may give files: any group as root, else its own."""
    if os.geteuid() == 0:
        for group in grp.getgrall():
            if group.gr_gid != os.getegid():
                return group.gr_name
    return grp.getgrgid(os.getegid()).gr_name


def permission_sites(tmp_path, runsdb_uri, raw, processed=None):
    permissions = {"raw": raw, **({"processed": processed} if processed else {})}
    return make_sites(tmp_path, runsdb_uri, a={"permissions": permissions})


def test_split_mode_directories_get_x_where_r_and_keep_special_bits():
    assert split_mode("0640") == (0o640, 0o750)
    assert split_mode("2750") == (0o750, 0o2750)
    assert split_mode("604") == (0o604, 0o705)


def test_set_permission_applied_once_recursively_and_again_on_change(
        tmp_path, runsdb_uri, runsdb):
    group = other_group()
    settings = {"mode": "0640", "group": group}
    config = permission_sites(tmp_path, runsdb_uri, settings)
    raw = make_dataset(tmp_path / "a/raw/run1")
    run_id = insert(runsdb, 1, copy_entry("a", raw))
    ctx = make_context(config, "a", runsdb)
    assert Daemon(ctx, [SetPermission]).run_pass().failed == 0
    gid = grp.getgrnam(group).gr_gid
    for path in (raw, raw / "sub", raw / "f001.zip", raw / "sub/f000.zip"):
        assert mode_of(path) == (0o750 if path.is_dir() else 0o640)
        assert os.lstat(path).st_gid == gid
    entry = find_entry(runsdb.find_run(run_id), EntryKey("a", "raw"))
    assert entry["permissions_applied"] == settings_digest(settings)
    assert runsdb.find_runs(SetPermission(ctx).query()) == []  # done once
    os.chmod(raw / "f001.zip", 0o600)
    config = permission_sites(tmp_path, runsdb_uri, {**settings, "mode": "0644"})
    Daemon(make_context(config, "a", runsdb), [SetPermission]).run_pass()
    assert mode_of(raw / "f001.zip") == 0o644 and mode_of(raw / "sub") == 0o755


def test_set_permission_acl_command_gets_path_as_one_argument(tmp_path, runsdb_uri, runsdb):
    base = tmp_path / "with space"
    base.mkdir()
    out = tmp_path / "argv.json"
    script = "import json, sys; json.dump(sys.argv[1:], open(sys.argv[1], 'w'))"
    acl = [sys.executable, "-c", script, str(out), "-M", "{path}"]
    config = make_sites(base, runsdb_uri, a={"permissions": {"raw": {"acl_command": acl}}})
    raw = make_dataset(base / "a/raw/run1")
    insert(runsdb, 1, copy_entry("a", raw))
    assert Daemon(make_context(config, "a", runsdb), [SetPermission]).run_pass().failed == 0
    assert json.loads(out.read_text()) == [str(out), "-M", str(raw)]


def test_set_permission_symlink_in_dataset_not_followed(tmp_path, runsdb_uri, runsdb):
    outside = tmp_path / "outside.txt"
    outside.write_text("not data")
    os.chmod(outside, 0o600)
    config = permission_sites(tmp_path, runsdb_uri, {"mode": "0644"})
    raw = make_dataset(tmp_path / "a/raw/run1")
    (raw / "link").symlink_to(outside)
    insert(runsdb, 1, copy_entry("a", raw, checksum="x"))
    assert Daemon(make_context(config, "a", runsdb), [SetPermission]).run_pass().failed == 0
    assert mode_of(outside) == 0o600 and mode_of(raw / "f001.zip") == 0o644


def test_set_permission_unknown_group_fails_that_run_not_the_daemon(
        tmp_path, runsdb_uri, runsdb):
    config = permission_sites(tmp_path, runsdb_uri, {"mode": "0640"},
                              processed={"group": "no-such-group-cax"})
    raw = make_dataset(tmp_path / "a/raw/run1")
    processed = tmp_path / "a/processed/pax_v1/run2.root"
    processed.parent.mkdir(parents=True)
    processed.write_bytes(b"x")
    insert(runsdb, 1, copy_entry("a", raw))
    insert(runsdb, 2, copy_entry("a", processed, data_type="processed", version="v1"))
    result = Daemon(make_context(config, "a", runsdb), [SetPermission]).run_pass()
    outcome = next(o for o in result.outcomes if o.task == "SetPermission")
    assert (outcome.done, outcome.failed) == (1, 1)
    assert "unknown group 'no-such-group-cax'" in outcome.errors[0]
    assert mode_of(raw / "f001.zip") == 0o640


def test_set_permission_dry_run_changes_nothing(tmp_path, runsdb_uri, runsdb, caplog):
    config = permission_sites(tmp_path, runsdb_uri, {"mode": "0600"})
    raw = make_dataset(tmp_path / "a/raw/run1")
    insert(runsdb, 1, copy_entry("a", raw))
    before = mode_of(raw / "f001.zip")
    caplog.set_level(logging.INFO)
    Daemon(make_context(config, "a", runsdb, dry_run=True), [SetPermission]).run_pass()
    assert mode_of(raw / "f001.zip") == before
    assert "dry run: would set permissions" in caplog.text


# -- validation of the permissions key ----------------------------------------------------------

@pytest.mark.parametrize("permissions, expected", [
    ({"rwa": {"mode": "0750"}}, "key 'permissions.rwa': unknown data type"),
    ({"raw": {"mode": "rwxr-x---"}}, "key 'permissions.raw.mode': expected an octal string"),
    ({"raw": {"mode": 750}}, "key 'permissions.raw.mode': expected an octal string"),
    ({"raw": {"group": ["xenon"]}}, "key 'permissions.raw.group': expected a group name"),
    ({"raw": {"acl_command": "setfacl -R {path}"}}, "'permissions.raw.acl_command': expected"),
    ({"raw": {"acl_command": ["setfacl", 3]}}, "'permissions.raw.acl_command': expected"),
    ({"raw": {"acl_command": ["setfacl", "-R"]}}, 'with a "{path}" argument'),
    ({"raw": {"mdoe": "0750"}}, "key 'permissions.raw': unknown key 'mdoe'"),
    ({"raw": {}}, "key 'permissions.raw': expected an object with mode, group or acl_command"),
])
def test_config_bad_permissions_one_line_error(tmp_path, permissions, expected):
    path = tmp_path / "cax.json"
    path.write_text(json.dumps([{"name": "a", "method": "local", "dir_raw": "/data/raw",
                                 "permissions": permissions}]))
    with pytest.raises(ConfigError) as info:
        load_config(path, "a")
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("cax.json: site 'a' key 'permissions")
    assert expected in info.value.problems[0]


def test_config_good_permissions_loaded(tmp_path):
    path = tmp_path / "cax.json"
    permissions = {"raw": {"mode": "0750", "group": "xenon",
                           "acl_command": ["setfacl", "-R", "-M", "/etc/acl", "{path}"]},
                   "processed": {"mode": "2755"}}
    path.write_text(json.dumps([{"name": "a", "method": "local", "dir_raw": "/data/raw",
                                 "permissions": permissions}]))
    assert load_config(path, "a", "embedded:/unused").site.permissions == permissions
