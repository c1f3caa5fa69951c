"""cax.json validation and site detection, through the real CLI entry point."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from cax.cli import cli
from cax.config import load_config
from cax.config import model as config_model
from cax.errors import ConfigError

GOOD_SITE = {"name": "a", "method": "local", "dir_raw": "/data/raw"}
OTHER_SITE = {"name": "b", "method": "rsync", "hostname": "b.example.org"}


@pytest.fixture(autouse=True)
def runs_db_from_environment(tmp_path, monkeypatch):
    """List-form configs name no runs DB: these tests give it as the original's users would."""
    monkeypatch.setenv("CAX_RUNS_DB", f"embedded:{tmp_path / 'runsdb'}")
    monkeypatch.delenv("HOSTNAME", raising=False)


def run_cax(tmp_path: Path, config: object, *args: str) -> tuple[int, list[str], set[str]]:
    """Run ``cax --once`` in ``tmp_path`` with ``config``; return code, stderr lines, new files."""
    path = tmp_path / "cax.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    before = set(os.listdir(tmp_path))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(cli, ["--once", "--config", str(path), *args])
    finally:
        os.chdir(cwd)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.exit_code, lines, set(os.listdir(tmp_path)) - before


BAD_CONFIGS = [
    ("unknown key", [{**GOOD_SITE, "colour": "red"}], ["cax.json", "site 'a'", "'colour'"]),
    ("mistyped key", [{**GOOD_SITE, "uplaod_options": []}],
     ["site 'a'", "'uplaod_options'", "did you mean 'upload_options'"]),
    ("missing name", [{"method": "local"}], ["sites[0]", "missing required key 'name'"]),
    ("missing method", [{"name": "a"}], ["site 'a'", "missing required key 'method'"]),
    ("wrong type", [{**GOOD_SITE, "port": "22"}], ["site 'a' key 'port'", "expected int"]),
    ("bad list element", [{**GOOD_SITE, "data_type": ["raw", 3]}], ["'data_type'", "3"]),
    ("bad choice", [{**GOOD_SITE, "data_type": ["rwa"]}], ["'data_type'", "'rwa'"]),
    ("unknown method", [{**GOOD_SITE, "method": "ftp"}], ["'method'", "'ftp'"]),
    ("unknown upload site", [{**GOOD_SITE, "upload_options": ["nowhere"]}],
     ["site 'a' key 'upload_options'", "unknown site 'nowhere'", "known: a"]),
    ("unknown download site", [GOOD_SITE, {**OTHER_SITE, "download_options": ["c"]}],
     ["site 'b' key 'download_options'", "unknown site 'c'"]),
    ("duplicate site", [GOOD_SITE, dict(GOOD_SITE)], ["site 'a'", "duplicate site name"]),
    ("relative path", [{**GOOD_SITE, "dir_raw": "data/raw"}], ["'dir_raw'", "absolute path"]),
    ("below minimum", [{**GOOD_SITE, "max_transfers": 0}], ["'max_transfers'", "at least 1"]),
    ("top-level type", {"sites": [GOOD_SITE], "sleep_seconds": "60"},
     ["key 'sleep_seconds'", "expected number"]),
    ("not a list or object", "42", ["cax.json", "expected a list of sites"]),
    ("broken JSON", '{"sites": [', ["cax.json", "line", "invalid JSON"]),
    ("no sites", {"sites": []}, ["no sites configured"]),
    ("processed without its directory", [{**GOOD_SITE, "data_type": ["raw", "processed"]}],
     ["site 'a' key 'data_type'", "'processed' needs 'dir_processed'"]),
]


@pytest.mark.parametrize("config", [c for _, c, _ in BAD_CONFIGS],
                         ids=[name for name, _, _ in BAD_CONFIGS])
def test_config_bad_input_gives_one_line_and_exit_2(tmp_path, config):
    expected = dict((json.dumps(c), e) for _, c, e in BAD_CONFIGS)[json.dumps(config)]
    code, lines, new_files = run_cax(tmp_path, config, "--host", "a")
    assert code == 2
    assert len(lines) == 1, lines
    assert all(fragment in lines[0] for fragment in expected), lines[0]
    assert "Traceback" not in lines[0]
    assert new_files == set()


def test_config_reports_every_problem_at_once(tmp_path):
    config = [{**GOOD_SITE, "colour": 1, "port": "x", "upload_options": ["zz"]}]
    code, lines, new_files = run_cax(tmp_path, config, "--host", "a")
    assert code == 2
    assert len(lines) == 3
    assert new_files == set()


def test_config_missing_file_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["--once", "--config", str(tmp_path / "nope.json")])
    assert result.exit_code == 2
    assert result.stderr.strip().endswith("configuration file not found")


def test_config_original_list_form_with_legacy_keys_is_accepted(tmp_path):
    path = tmp_path / "cax.json"
    path.write_text(json.dumps([
        {**GOOD_SITE, "task_list": ["AddChecksum"], "dataset_list": ["170101_0000"],
         "nstreams": 2, "grid_cert": "/x", "rucio_account": "x"},
        {"name": "tsm-server", "method": "tsm", "hostname": None, "dir_raw": None},
    ]))
    config = load_config(path, "a")
    assert config.tasks_wanted == ("AddChecksum",)
    assert config.datasets_wanted == ("170101_0000",)
    assert not config.get_site("tsm-server").runs_daemon


def test_config_site_from_host_option_env_and_hostname(tmp_path, monkeypatch):
    path = tmp_path / "cax.json"
    path.write_text(json.dumps([GOOD_SITE, OTHER_SITE]))
    assert load_config(path, "b").site.name == "b"
    monkeypatch.setenv("CAX_HOST", "b")
    assert load_config(path).site.name == "b"
    monkeypatch.delenv("CAX_HOST")
    monkeypatch.setattr(config_model.socket, "gethostname", lambda: "a.lngs.infn.it")
    assert load_config(path).site.name == "a"


def test_config_unknown_site_lists_known_ones(tmp_path):
    code, lines, new_files = run_cax(tmp_path, [GOOD_SITE, OTHER_SITE], "--host", "zz")
    assert code == 2
    assert "'zz'" in lines[0] and "known: a, b" in lines[0]
    assert new_files == set()


def test_config_unknown_task_lists_known_ones(tmp_path):
    code, lines, new_files = run_cax(tmp_path, {"sites": [GOOD_SITE], "task_list": ["Nope"]},
                                     "--host", "a")
    assert code == 2
    assert "unknown task 'Nope'" in lines[0]
    assert new_files == set()


@pytest.mark.parametrize("name", ["../..", "a/b", "..", ".hidden", "x;rm -rf /", ""])
def test_cli_hostile_run_name_refused(tmp_path, name):
    code, lines, new_files = run_cax(tmp_path, [GOOD_SITE], "--host", "a", "--name", name)
    assert code == 2
    assert len(lines) == 1 and "unsafe run name" in lines[0]
    assert new_files == set()


def test_cli_run_and_name_together_is_a_usage_error(tmp_path):
    code, lines, _ = run_cax(tmp_path, [GOOD_SITE], "--host", "a", "--run", "1", "--name", "x")
    assert code == 2
    assert any("not both" in line for line in lines)


def test_config_example_in_repository_is_valid_for_every_site():
    path = Path(__file__).resolve().parents[2] / "cax.json"
    names = [site["name"] for site in json.loads(path.read_text())["sites"]]
    for name in names:
        assert load_config(path, name).site.name == name


def test_config_error_keeps_problem_lines():
    error = ConfigError(["one", "two"])
    assert error.problems == ["one", "two"]
