"""Helpers shared by the size/permission, purge and one-shot command tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cax.checksum import dataset_checksum, scan_dataset
from cax.clock import utcnow
from cax.runsdb import TRANSFERRED
from tests.conftest import write_config


def make_sites(tmp_path: Path, runsdb_uri: tuple[str, str], **sites: dict[str, Any]) -> Path:
    """Write a cax.json with local sites ``name -> extra keys`` (dirs under tmp_path/name)."""
    sections = []
    for name, extra in sites.items():
        base = tmp_path / name
        for sub in ("raw", "processed"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        sections.append({"name": name, "method": "local", "dir_raw": str(base / "raw"),
                         "dir_processed": str(base / "processed"), **extra})
    return write_config(tmp_path / "cax.json", sections, runs_db=runsdb_uri[0],
                        runs_db_name=runsdb_uri[1], sleep_seconds=0.1, lease_seconds=30)


def make_dataset(path: Path, files: int = 3, size: int = 1000) -> Path:
    """Write a raw-like directory of ``files`` files (one in a subdirectory) at ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        target = path / ("sub" if i == 0 else "") / f"f{i:03d}.zip"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bytes([i % 256]) * (size + i))
    return path


def copy_entry(host: str, location: Path | str, *, data_type: str = "raw",
               version: str | None = None, status: str = TRANSFERRED,
               like: Path | None = None, **fields: Any) -> dict[str, Any]:
    """A data entry; its checksum is computed when ``location`` exists here (or, for a copy
    elsewhere, from the local dataset it is ``like``)."""
    entry = {"host": host, "type": data_type, "status": status, "location": str(location),
             "creation_time": utcnow(), **fields}
    model = Path(location) if Path(location).exists() else like
    if model is not None and "checksum" not in fields:
        entry["checksum"] = dataset_checksum(scan_dataset(model))
    if version:
        entry["pax_version"] = version
    return entry
