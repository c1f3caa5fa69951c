"""What an operator meets at an SSH site: a typo in its data directory, a full disk, a config
check that reaches it (issue 18 items 4 and 8), over the real loopback sshd."""

from __future__ import annotations

import os
import re

import pytest
from click.testing import CliRunner

from cax.admin import status as st
from cax.cli import cli
from cax.config import load_config
from cax.daemon import Daemon
from cax.runsdb import ERROR, EntryKey, find_entry
from cax.tasks import CopyPush
from tests.conftest import make_context, tiny_disk
from tests.integration.conftest import make_dataset, register, scratches


def push(config, runsdb):
    ctx = make_context(config, "daq", runsdb, once=True)
    try:
        return Daemon(ctx, [CopyPush]).run_pass(wait_background=True)
    finally:
        if ctx.transports:
            ctx.transports.close_all()


@pytest.mark.parametrize("method", ["rsync", "scp"])
def test_typo_in_a_remote_data_directory_is_not_created(method, ssh_sites, runsdb, tmp_path):
    """A copy never creates a site's top data directory: the typo is a configuration error,
    listed by ``cax status --stuck`` with its retry command, and nothing appears there."""
    typo = tmp_path / "remote/raww"
    config = ssh_sites(method, dir_raw=str(typo))
    raw = tmp_path / "daq/raw/170101_0100"
    make_dataset(raw, files=2)
    run_id = register(runsdb, 1, "daq", raw)
    assert push(config, runsdb).failed == 1
    entry = find_entry(runsdb.find_run(run_id), EntryKey("remote", "raw"))
    assert entry["status"] == ERROR and entry["error_kind"] == "config"
    assert f"{typo} does not exist (site remote key 'dir_raw')" in entry["error"]
    assert not typo.exists()
    stuck = st.stuck(runsdb, load_config(config, "daq"), st.now_of(runsdb), "daq")
    assert [(e.number, e.key.host, e.kind) for e in stuck] == [(1, "remote", "config")]


@pytest.fixture
def small_remote(tmp_path):
    with tiny_disk(tmp_path / "small", "1m") as mount:
        (mount / "raw").mkdir()
        yield mount / "raw"


def test_full_remote_disk_keeps_no_partial_copy(ssh_sites, runsdb, tmp_path, small_remote):
    """rsync keeps a failed attempt's bytes to resume from, but not after the disk filled
    up: they would keep it full for good."""
    config = ssh_sites("rsync", dir_raw=str(small_remote))
    raw = tmp_path / "daq/raw/170101_0200"
    raw.mkdir(parents=True)
    for i in range(4):
        (raw / f"f{i}.dat").write_bytes(os.urandom(400_000))
    run_id = register(runsdb, 2, "daq", raw)
    assert push(config, runsdb).failed == 1
    entry = find_entry(runsdb.find_run(run_id), EntryKey("remote", "raw"))
    assert entry["status"] == ERROR
    assert re.search("No space left|not enough space|the disk is full", entry["error"])
    assert "partial" not in entry
    assert scratches(small_remote / raw.name) == []
    assert list(small_remote.iterdir()) == []


def test_config_check_network_names_a_missing_remote_directory(ssh_sites, tmp_path):
    config = ssh_sites("rsync", dir_processed=str(tmp_path / "remote/processd"))
    result = CliRunner().invoke(cli, ["--config", str(config), "--host", "daq", "config",
                                      "check", "--network"])
    assert result.exit_code == 2, result.output
    assert (f"cax: cax.json: site 'remote' key 'dir_processed': {tmp_path / 'remote/processd'}"
            " does not exist there") in result.stderr
