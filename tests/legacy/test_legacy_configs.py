"""The original cax's configuration files, 1.x to 6.x, load unchanged for every site.

Fixtures in ``configs/`` follow the shapes of the original's cax.json across its history
(list form, pre-5.0 files without ``data_type``, grid endpoints, tape and ruciax configs);
``refused/`` holds files the original itself could not have run.  Each site of each file runs
one ``--dry-run`` pass of the real CLI in-process, on an embedded store named by CAX_RUNS_DB
(list-form files cannot name a runs DB).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from cax.cli import cli
from cax.config import load_config
from cax.runsdb import open_runsdb

HERE = Path(__file__).resolve().parent
CONFIGS = sorted((HERE / "configs").glob("*.json"))
REFUSED = {
    "unknown-method.json": "key 'method': 'ftp' is not one of",
    "unknown-upload-site.json": "key 'upload_options': unknown site 'nowhere'",
    "processed-without-dir.json": "'processed' needs 'dir_processed'",
    "data-type-string.json": "key 'data_type': expected list",
}
CASES = [(path, site["name"]) for path in CONFIGS for site in json.loads(path.read_text())]


@pytest.fixture()
def runs_db(tmp_path, monkeypatch):
    uri = f"embedded:{tmp_path / 'runsdb'}"
    open_runsdb("file:" + uri[len("embedded:"):], create=True).close()  # an existing, empty runs DB
    monkeypatch.setenv("CAX_RUNS_DB", uri)
    monkeypatch.delenv("HOSTNAME", raising=False)
    monkeypatch.delenv("CAX_HOST", raising=False)
    return uri


def run_cax(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, [line for line in result.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("path,site", CASES, ids=[f"{p.stem}:{s}" for p, s in CASES])
def test_original_config_dry_run_for_every_site(runs_db, path, site):
    code, lines = run_cax("--once", "--dry-run", "--config", str(path), "--host", site)
    assert code == 0, lines
    assert not [line for line in lines if " ERROR " in line], lines


def test_versions_5_and_6_are_among_the_fixtures():
    stems = {p.stem.split("-")[0] for p in CONFIGS}
    assert {"v1.2", "v2.2", "v3.0", "v4.11", "v5.2.1", "v6.0"} <= stems


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_config_the_original_could_not_run_is_refused_naming_the_key(runs_db, name):
    code, lines = run_cax("--once", "--dry-run", "--config", str(HERE / "refused" / name),
                          "--host", "a")
    assert code == 2
    assert len(lines) == 1 and REFUSED[name] in lines[0], lines


def test_original_keys_and_tasks_are_ignored_with_one_line_each(runs_db, caplog):
    path = HERE / "configs" / "v6.0-head.json"
    config = load_config(path, "xe1t-datamanager")
    assert ("v6.0-head.json: site 'xe1t-datamanager': ignoring key 'rucio_upload_rse' of the "
            "original cax (not used by this release)") in config.notes
    assert len(config.notes) == 2  # that one and midway-login1's dir_minitrees
    caplog.set_level(logging.INFO)
    from cax.tasks import select_tasks

    tasks = select_tasks(load_config(path, "midway-login1").tasks_wanted)
    assert "CopyPush" in [t.name for t in tasks]
    ignored = [r.getMessage() for r in caplog.records if "original cax" in r.getMessage()]
    assert len(ignored) == 1 and "AddGains" in ignored[0] and "ProcessBatchQueue" in ignored[0]


def test_list_form_without_a_runs_db_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("CAX_RUNS_DB", raising=False)
    code, lines = run_cax("--once", "--config", str(HERE / "configs" / "v5.2.1-list.json"),
                          "--host", "midway-login1")
    assert code == 2
    assert len(lines) == 1 and "no runs DB configured" in lines[0], lines
    assert not (Path.cwd() / "cax-runsdb").exists()


def test_runs_db_option_wins_and_hostname_names_the_site(tmp_path, monkeypatch):
    monkeypatch.delenv("CAX_RUNS_DB", raising=False)
    monkeypatch.delenv("CAX_HOST", raising=False)
    monkeypatch.setenv("HOSTNAME", "midway-login1")  # the original's batch scripts
    store = tmp_path / "store"
    open_runsdb(f"file:{store}", create=True).close()
    code, lines = run_cax("--once", "--dry-run", "--ncpu", "1", "--run", "6123", "--config",
                          str(HERE / "configs" / "v5.2.1-list.json"), "--runs-db",
                          f"embedded:{store}")
    assert code == 0, lines
    assert any("for site midway-login1" in line for line in lines), lines


def test_hostname_that_names_no_site_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTNAME", "some-node-17")
    monkeypatch.delenv("CAX_HOST", raising=False)
    monkeypatch.setenv("CAX_RUNS_DB", f"embedded:{tmp_path}")
    with pytest.raises(Exception, match="not a site in the configuration"):
        load_config(HERE / "configs" / "v5.2.1-list.json")


def test_default_reference_sites_follow_the_originals_masters():
    config = load_config(HERE / "configs" / "v5.2.1-list.json", "midway-login1", "embedded:/x")
    assert [s.name for s in config.reference_sites("raw")] == ["xe1t-datamanager", "tsm-server"]
    assert [s.name for s in config.reference_sites("processed")] == ["midway-login1", "login"]
    assert [s.name for s in config.reference_sites("raw", exclude="xe1t-datamanager")] == [
        "tsm-server"]


def test_default_reference_sites_without_original_names_are_the_daq_sites(tmp_path):
    path = tmp_path / "cax.json"
    sites = [
        {"name": "lab", "method": "local", "dir_raw": "/l", "data_type": ["raw"],
         "download_options": ["daq"]},
        {"name": "daq", "method": "rsync", "hostname": "d", "dir_raw": "/d",
         "data_type": ["raw"], "upload_options": ["lab"]},
    ]
    path.write_text(json.dumps(sites))
    assert [s.name for s in load_config(path, "lab", "embedded:/x").reference_sites("raw")] == [
        "daq"]
    # explicit reference_for wins, ordered by priority, then name -- never by file position
    sites[0]["reference_for"] = ["raw"]
    sites[1]["reference_for"] = ["raw"]
    sites[0]["reference_priority"] = 5
    path.write_text(json.dumps(sites))
    assert [s.name for s in load_config(path, "lab", "embedded:/x").reference_sites("raw")] == [
        "lab", "daq"]
    del sites[0]["reference_priority"]
    path.write_text(json.dumps(list(reversed(sites))))
    assert [s.name for s in load_config(path, "lab", "embedded:/x").reference_sites("raw")] == [
        "daq", "lab"]


def test_silent_no_ops_are_named_with_the_key_to_set():
    config = load_config(HERE / "configs" / "v5.2.1-list.json", "tegner-login-1", "embedded:/x")
    assert any("'data_type'" in line for line in config.silent_noops())
    config = load_config(HERE / "configs" / "v3.0-grid.json", "xe1t-datamanager", "embedded:/x")
    lines = config.silent_noops()
    assert any("nikhef-srm (method gfal-copy)" in line for line in lines), lines
    config = load_config(HERE / "configs" / "v5.2.1-list.json", "midway-login1", "embedded:/x")
    assert any("'processor_version'" in line for line in config.silent_noops())
