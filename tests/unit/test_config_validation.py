"""Start-up validation of cax.json: hostile and malformed files get one short line, exit 2.

The CLI is invoked in-process (click's runner) so that each case costs milliseconds; a fuzzer
throws random JSON shapes at the loader and checks it never lets anything but ConfigError out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cax.cli import cli
from cax.config import load_config
from cax.errors import ConfigError

SITE = {"name": "a", "method": "local", "dir_raw": "/data/a/raw"}
SSH = {"name": "b", "method": "rsync", "hostname": "b.example.org", "dir_raw": "/data/b/raw"}
MAX_LINE = 300


@pytest.fixture(autouse=True)
def runs_db_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CAX_RUNS_DB", f"embedded:{tmp_path / 'runsdb'}")
    monkeypatch.delenv("HOSTNAME", raising=False)


def run_cax(tmp_path: Path, content: bytes | str | object, *args: str) -> tuple[int, list[str]]:
    path = tmp_path / "cax.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    result = CliRunner().invoke(cli, ["--once", "--dry-run", "--config", str(path), "--host", "a",
                                      *args])
    return result.exit_code, [line for line in result.stderr.splitlines() if line.strip()]


def one_line(tmp_path: Path, content: bytes | str | object, *fragments: str) -> str:
    code, lines = run_cax(tmp_path, content)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert len(lines[0]) < MAX_LINE and "Traceback" not in lines[0], lines[0][:MAX_LINE]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


HOSTILE_FILES = [
    ("not UTF-8", b'[{"name": "a", "method": "local", "dir_raw": "/d\xff\xfe"}]', ["not UTF-8"]),
    ("1000 levels deep", "[" * 1000 + "]" * 1000, ["nested too deeply"]),
    ("100000 levels deep", "[" * 100_000, ["nested too deeply"]),
    ("10 MB of garbage", b"\x00garbage" * 1_300_000, ["larger than 1 MiB"]),
    ("1 MB of JSON garbage", "x" * 900_000, ["invalid JSON"]),
    ("huge integer", '{"sites": [], "sleep_seconds": ' + "9" * 5000 + "}", ["invalid JSON"]),
    ("site name of the wrong type", [{**SITE, "name": ["a"]}], ["sites[0] key 'name'"]),
    ("data_type a number", [{**SITE, "data_type": 5}], ["key 'data_type'", "expected list"]),
    ("data_type an object", [{**SITE, "data_type": {"raw": 1}}], ["key 'data_type'"]),
    ("sites an object", {"sites": {"a": SITE}}, ["key 'sites'", "expected list"]),
    ("sites a number", {"sites": 5}, ["key 'sites'"]),
]


@pytest.mark.parametrize("content,fragments", [(c, f) for _, c, f in HOSTILE_FILES],
                         ids=[n for n, _, _ in HOSTILE_FILES])
def test_hostile_file_gets_one_short_line(tmp_path, content, fragments):
    line = one_line(tmp_path, content, *fragments)
    assert "garbage" not in line and "xxxxxxxxxx" not in line  # the file is never echoed


BAD_VALUES = [
    ("Infinity lease", {"sites": [SITE], "lease_seconds": float("inf")}, "'lease_seconds'",
     "finite"),
    ("NaN pause", {"sites": [SITE], "sleep_seconds": float("nan")}, "'sleep_seconds'", "finite"),
    ("1e308 lease", {"sites": [SITE], "lease_seconds": 1e308}, "'lease_seconds'", "at most"),
    ("1e400 (overflows to inf)", '{"sites": [{"name": "a", "method": "local"}], '
     '"sleep_seconds": 1e400}', "'sleep_seconds'", "finite"),
    ("port 70000", [{**SITE, "method": "rsync", "hostname": "h", "port": 70000}], "'port'",
     "at most 65535"),
    ("purge_free_below 1.5", [{**SITE, "purge_free_below": 1.5}], "'purge_free_below'",
     "at most 1"),
    ("purge_free_below -0.1", [{**SITE, "purge_free_below": -0.1}], "'purge_free_below'",
     "at least 0"),
    ("raw without dir_raw", [{"name": "a", "method": "local", "data_type": ["raw"]}],
     "'data_type'", "needs 'dir_raw'"),
    ("SSH key on a local site", [{**SITE, "key_file": "/k/id"}], "'key_file'",
     "local site"),
    ("known_hosts on a local site", [{**SITE, "known_hosts": "/k/kh"}], "'known_hosts'",
     "local site"),
    ("'..' in a path", [{**SITE, "dir_raw": "/data/../etc"}], "'dir_raw'", "'..'"),
    ("'..' in legacy_dirs", [{**SITE, "legacy_dirs": ["/old/../raw"]}], "'legacy_dirs'", "'..'"),
    ("same dir_raw on one host", [SITE, {**SITE, "name": "c"}], "sites 'a' and 'c'",
     "dir_raw /data/a/raw and dir_raw /data/a/raw"),
    ("nested dirs on one host", [SITE, {**SSH, "hostname": "127.0.0.1",
                                        "dir_raw": "/data/a/raw/sub"}],
     "sites 'a' and 'b'", "share data directories"),
    ("processed inside another site's raw", [
        {**SSH, "name": "a"}, {**SSH, "dir_raw": None, "dir_processed": "/data/b/raw/p/"}],
     "sites 'a' and 'b'", "dir_processed /data/b/raw/p"),
    ("legacy dir inside another site's dir", [SITE, {**SITE, "name": "c", "dir_raw": "/c",
                                                     "legacy_dirs": ["/data/a"]}],
     "sites 'a' and 'c'", "legacy_dirs[0] /data/a"),
    ("long value shortened", [{**SITE, "method": "x" * 5000}], "'method'", "...'"),
    ("long unknown key shortened", [{**SITE, "k" * 5000: 1}], "unknown key", "...'"),
]


@pytest.mark.parametrize("content,key,fragment", [(c, k, f) for _, c, k, f in BAD_VALUES],
                         ids=[n for n, *_ in BAD_VALUES])
def test_bad_value_refused_with_one_line_naming_the_key(tmp_path, content, key, fragment):
    one_line(tmp_path, content, key, fragment)


def test_paths_are_normalised_at_load(tmp_path):
    path = tmp_path / "cax.json"
    path.write_text(json.dumps([{**SITE, "dir_raw": "/data//a/raw/", "legacy_dirs": ["//old/"]}]))
    site = load_config(path, "a").site
    assert site.dir_raw == "/data/a/raw"
    assert site.legacy_dirs == ("/old",)


def test_same_directory_on_different_hosts_is_fine(tmp_path):
    path = tmp_path / "cax.json"
    path.write_text(json.dumps([SITE, {**SSH, "dir_raw": "/data/a/raw"}]))
    assert load_config(path, "a").get_site("b").dir_raw == "/data/a/raw"


# ---- the fuzzer ---------------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
           | st.text(max_size=30))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
KEYS = st.sampled_from(["name", "method", "hostname", "port", "dir_raw", "dir_processed",
                        "data_type", "upload_options", "download_options", "legacy_dirs",
                        "purge_free_below", "permissions", "key_file", "reference_for",
                        "task_list", "rucio_account", "max_transfers", "scrub_bytes_per_pass"])
SITE_SHAPE = st.dictionaries(KEYS, JSON, max_size=8).map(lambda d: {**SITE, **d})
TOP_SHAPE = st.fixed_dictionaries(
    {"sites": st.lists(SITE_SHAPE, max_size=3) | JSON},
    optional={"lease_seconds": JSON, "sleep_seconds": JSON, "runs_db": JSON,
              "task_list": JSON, "legacy_checksums": JSON})
SHAPES = TOP_SHAPE | st.lists(SITE_SHAPE | JSON, max_size=3) | JSON


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(config=SHAPES)
def test_fuzzed_config_loads_or_gives_short_config_errors(tmp_path, config):
    """Any JSON shape: a Config, or ConfigError lines that are short; never another exception."""
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(config))
    try:
        loaded = load_config(path, "a")
    except ConfigError as exc:
        assert exc.problems
        for line in exc.problems:
            assert len(line) < MAX_LINE, line
        return
    assert loaded.site.name == "a"
    for site in loaded.sites:
        for directory in site.data_dirs().values():
            assert directory.startswith("/") and "//" not in directory and ".." not in directory
