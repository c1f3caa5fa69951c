"""Per-file repair over real SSH transports: only the bad file crosses the network."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cax.clock import utcnow
from cax.daemon import Daemon
from cax.runsdb import TRANSFERRED, EntryKey, find_entry
from cax.tasks.repair import RetryBadChecksumTransfer
from cax.tasks.scrub import Scrub
from cax.transport.rsync import RsyncTransport
from cax.transport.scp import ScpTransport
from tests.conftest import make_context, skip_or_fail, write_config
from tests.sshd import Sshd, SshdUnavailableError
from tests.unit.test_checksum_tasks import add_run, copied, flip_byte, produced, write_dataset


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    try:
        server = Sshd(tmp_path_factory.mktemp("sshd"))
        server.start()
    except (SshdUnavailableError, FileNotFoundError, OSError) as exc:
        skip_or_fail(f"sshd fixture unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("method", ["rsync", "scp"])
def test_repair_over_ssh_fetches_only_the_bad_file(sshd, method, tmp_path, runsdb_uri, runsdb,
                                                   monkeypatch):
    for d in ("daq/raw", "lab/raw"):
        (tmp_path / d).mkdir(parents=True)
    daq_site = {"name": "daq", "method": method, "hostname": sshd.host, "port": sshd.port,
                "username": sshd.user, "key_file": sshd.key_file,
                "known_hosts": sshd.known_hosts, "dir_raw": str(tmp_path / "daq/raw"),
                "data_type": ["raw"], "reference_for": ["raw"]}
    lab_site = {"name": "lab", "method": "local", "dir_raw": str(tmp_path / "lab/raw"),
                "data_type": ["raw"], "download_options": ["daq"]}
    cfg = write_config(tmp_path / "cax.json", [daq_site, lab_site], runs_db=runsdb_uri[0],
                       runs_db_name=runsdb_uri[1], lease_seconds=30)
    daq = write_dataset(tmp_path / "daq/raw/170101_0000", files=30, size=5000)
    lab = write_dataset(tmp_path / "lab/raw/170101_0000", files=30, size=5000)
    run_id = add_run(runsdb, 1, [])
    runsdb.add_entry(run_id, produced(runsdb, run_id, "daq", daq))
    runsdb.add_entry(run_id, copied(runsdb, run_id, "lab", lab,
                                    verified_time=utcnow() - dt.timedelta(days=40)))
    flip_byte(lab / "sub2/file_017.bin", offset=4000)  # rotted since it was verified
    untouched = {p.name: os.stat(p).st_ino for p in lab.rglob("*.bin")
                 if p.name != "file_017.bin"}
    fetched: list[str] = []
    cls = {"rsync": RsyncTransport, "scp": ScpTransport}[method]
    real_get = cls.get
    monkeypatch.setattr(cls, "get", lambda self, remote, local, progress=None: (
        fetched.append(remote), real_get(self, remote, local, progress))[1])
    ctx = make_context(cfg, "lab", runsdb)
    try:
        Daemon(ctx, [Scrub, RetryBadChecksumTransfer]).run_pass(wait_background=True)
    finally:
        if ctx.transports is not None:
            ctx.transports.close_all()
    entry = find_entry(runsdb.find_run(run_id), EntryKey("lab", "raw"))
    assert entry["status"] == TRANSFERRED, entry.get("error")
    assert fetched == [str(daq / "sub2/file_017.bin")]
    assert entry["checksum"] == find_entry(runsdb.find_run(run_id),
                                           EntryKey("daq", "raw"))["checksum"]
    assert (lab / "sub2/file_017.bin").read_bytes() == (daq / "sub2/file_017.bin").read_bytes()
    assert {p.name: os.stat(p).st_ino for p in lab.rglob("*.bin")
            if p.name != "file_017.bin"} == untouched
    assert sorted(p.name for p in Path(tmp_path / "lab/raw").iterdir()) == ["170101_0000"]
