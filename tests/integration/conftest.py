"""Integration fixtures: the real loopback sshd, and sites reached through it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from cax.checksum import dataset_checksum, scan_dataset
from cax.clock import utcnow
from cax.runsdb import TRANSFERRED, EntryKey
from tests.conformance.conftest import sshd  # noqa: F401 - re-exported fixture
from tests.conftest import make_run, write_config


def make_dataset(path: Path, files: int = 3, size: int = 100_000) -> None:
    """Write ``files`` random files (one nested) under ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        target = path / ("sub" if i == 0 else "") / f"f{i:03d}.zip"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(os.urandom(size))


def scratches(final: Path) -> list[Path]:
    """The scratch copies (any owner, any attempt) of the dataset that belongs at ``final``."""
    return sorted(final.parent.glob(f".{final.name}.*.cax-partial"))


def wait_for_partial_bytes(final: Path, timeout: float = 30) -> Path:
    """Wait until a copy to ``final`` has written at least one file under a scratch name;
    return that scratch path."""
    deadline = time.monotonic() + timeout
    while True:
        for partial in scratches(final):
            if any(p.is_file() for p in partial.rglob("*")):
                return partial
        assert time.monotonic() < deadline, "timed out waiting for bytes at the partial copy"
        time.sleep(0.02)


def register(runsdb: Any, number: int, site: str, location: Path, *, data_type: str = "raw",
             version: str | None = None, manifest: bool = True, **run_fields: Any) -> Any:
    """Insert a run whose only copy is a verified one at ``site``; return the run id."""
    files = scan_dataset(location)
    entry = {"host": site, "type": data_type, "status": TRANSFERRED, "location": str(location),
             "checksum": dataset_checksum(files), "creation_time": utcnow()}
    if version:
        entry["pax_version"] = version
    runsdb.insert_runs([make_run(number, name=location.name.split(".")[0], data=[entry],
                                 **run_fields)])
    run_id = runsdb.find_runs({"number": number})[0]["_id"]
    if manifest:
        runsdb.save_manifest(run_id, EntryKey(site, data_type, version), files,
                             entry["checksum"], utcnow())
    return run_id


@pytest.fixture
def ssh_sites(tmp_path: Path, sshd: Any,  # noqa: F811 - the fixture imported above
              runsdb_uri: tuple[str, str]) -> Any:
    """Write a config with local sites ``daq`` and ``lab`` and an SSH site ``remote``.

    Returns a function ``(method, **remote_overrides) -> config path``; ``daq`` pushes to
    ``remote``, ``lab`` pulls from it.
    """

    def build(method: str, **remote: Any) -> Path:
        dirs = {}
        for site in ("daq", "lab", "remote"):
            for kind in ("raw", "processed"):
                dirs[site, kind] = tmp_path / site / kind
                dirs[site, kind].mkdir(parents=True, exist_ok=True)
        common = {"data_type": ["raw", "processed"], "processor_version": "v1"}
        sites = [
            {"name": "daq", "method": "local", "dir_raw": str(dirs["daq", "raw"]),
             "dir_processed": str(dirs["daq", "processed"]), "upload_options": ["remote"],
             "reference_for": ["raw"], **common},
            {"name": "lab", "method": "local", "dir_raw": str(dirs["lab", "raw"]),
             "dir_processed": str(dirs["lab", "processed"]), "download_options": ["remote"],
             "retry_backoff": 1, **common},
            {"name": "remote", "method": method, "hostname": sshd.host, "port": sshd.port,
             "username": sshd.user, "key_file": sshd.key_file,
             "known_hosts": sshd.known_hosts, "dir_raw": str(dirs["remote", "raw"]),
             "dir_processed": str(dirs["remote", "processed"]), **common, **remote},
        ]
        return write_config(tmp_path / "cax.json", sites, runs_db=runsdb_uri[0],
                            runs_db_name=runsdb_uri[1], sleep_seconds=0.1, lease_seconds=6)

    return build
