"""Fixtures shared by every test: a runs DB, configurations, run documents.

The runs DB is the embedded store in a temporary directory, or a server (a fresh database,
dropped afterwards) when CAX_TEST_MONGODB_URI is set -- or, when CAX_TEST_WIRE=1, the
MongoDB-compatible server the session starts itself (tests/wireserver.py) -- so every query
the tests exercise is also sent over the wire.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cax.config import load_config
from cax.runsdb import open_runsdb
from cax.tasks import Context

REAL_MONGODB = os.environ.get("CAX_TEST_MONGODB_URI")
#: ``CAX_TEST_WIRE=1``: the runs-DB tests run against a MongoDB-compatible server that the test
#: session starts itself (tests/wireserver.py), as CI's wire tier does.
WIRE = os.environ.get("CAX_TEST_WIRE") == "1"
_WIRE_SERVER: Any = None
#: pyenv's rehash lock.  The test sshd logs in as root, whose .bashrc here runs ``pyenv init``
#: and so ``pyenv rehash`` at every login; a login killed mid-rehash (the kill -9 tests) leaves
#: the lock behind, and every later login then waits for it to time out.
PYENV_LOCK = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "shims/.pyenv-shim"
REQUIRE_FIXTURES = os.environ.get("CAX_REQUIRE_FIXTURES") == "1"


def pytest_configure(config: pytest.Config) -> None:
    """Start the wire tier's server before any test module reads ``REAL_MONGODB``."""
    global REAL_MONGODB, _WIRE_SERVER
    if not WIRE or REAL_MONGODB:
        return
    from tests.wireserver import WireServer, WireServerUnavailable

    try:
        _WIRE_SERVER = WireServer(log=Path(os.environ.get("TMPDIR", "/tmp")) /
                                  f"cax-wire-{os.getpid()}.log").start()
    except WireServerUnavailable as exc:
        if REQUIRE_FIXTURES:
            raise pytest.UsageError(f"required fixture missing: wire server: {exc}") from None
        return  # the runs-DB tests run on the embedded store instead
    REAL_MONGODB = os.environ["CAX_TEST_MONGODB_URI"] = _WIRE_SERVER.uri


#: The wire tier: the tests whose subject is the runs DB -- its queries, updates, indexes,
#: leases and the commands that read or write it.  The transport, sshd, SLURM and soak tests
#: run once, on the embedded store; tests/wire starts servers of its own in either tier.
WIRE_TIER = ("tests/unit/", "tests/web/", "tests/legacy/", "tests/batch/test_process_local.py",
             "tests/tape/test_tasks.py", "tests/integration/test_crash_and_race.py",
             "tests/integration/test_lease_safety.py", "tests/integration/test_claim_race.py",
             "tests/integration/test_admin_retry.py", "tests/integration/test_truth.py",
             "tests/integration/test_cli_end_to_end.py", "tests/integration/test_repair.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under CAX_TEST_WIRE=1, keep only the wire tier's tests."""
    if not WIRE:
        return
    root = Path(__file__).parent.parent
    keep, drop = [], []
    for item in items:
        path = Path(item.fspath).relative_to(root).as_posix()
        (keep if path.startswith(WIRE_TIER) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_unconfigure(config: pytest.Config) -> None:
    if _WIRE_SERVER is not None:
        _WIRE_SERVER.stop()


@pytest.fixture(autouse=True)
def no_stale_pyenv_lock() -> Any:
    """Remove a rehash lock older than any live rehash, after each test (see PYENV_LOCK)."""
    yield
    try:
        if time.time() - PYENV_LOCK.stat().st_mtime > 20:
            PYENV_LOCK.unlink()
    except FileNotFoundError:
        pass


def skip_or_fail(reason: str) -> None:
    """Skip a test whose real component is missing, unless CI requires every fixture."""
    if REQUIRE_FIXTURES:
        pytest.fail(f"required fixture missing: {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def tiny_disk(path: Path, size: str) -> Iterator[Path]:
    """Mount a real filesystem of ``size`` (a tmpfs) at ``path``, for full-disk tests."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    if done.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def runsdb_uri(tmp_path: Path) -> Any:
    """The runs DB location for one test, and its database name."""
    if REAL_MONGODB:
        name = f"cax_test_{uuid.uuid4().hex[:12]}"
        yield REAL_MONGODB, name
        db = open_runsdb(REAL_MONGODB, name)
        db.client.drop_database(name)
        db.close()
    else:
        uri = f"file:{tmp_path / 'runsdb'}"
        open_runsdb(uri, create=True).close()  # made by the test's set-up, as by `cax demo`
        yield uri, "run"


@pytest.fixture
def runsdb(runsdb_uri: tuple[str, str]) -> Any:
    db = open_runsdb(*runsdb_uri)
    yield db
    db.close()


def make_run(number: int, *, name: str | None = None, start: dt.datetime | None = None,
             data: list[dict] | None = None, **extra: Any) -> dict[str, Any]:
    """A run document in the shape the DAQ writes."""
    start = start or dt.datetime(2017, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(hours=number)
    return {"number": number, "name": name or start.strftime("%y%m%d_%H%M"), "detector": "tpc",
            "start": start, "tags": [], "data": data or [], **extra}


def write_config(path: Path, sites: list[dict[str, Any]], **top: Any) -> Path:
    """Write a cax.json in the object form and return its path."""
    path.write_text(json.dumps({"sites": sites, **top}, indent=1))
    return path


def edit_site(config: Path, name: str, **fields: Any) -> Path:
    """Change keys of one site in a cax.json written by ``write_config``."""
    data = json.loads(config.read_text())
    for site in data["sites"]:
        if site["name"] == name:
            site.update(fields)
    config.write_text(json.dumps(data, indent=1))
    return config


@pytest.fixture
def two_sites(tmp_path: Path, runsdb_uri: tuple[str, str]) -> Path:
    """A config with two local sites, ``daq`` (holds raw data, pushes) and ``lab`` (pulls)."""
    for d in ("daq/raw", "lab/raw", "lab/processed", "daq/processed"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    sites = [
        {"name": "daq", "method": "local", "dir_raw": str(tmp_path / "daq/raw"),
         "dir_processed": str(tmp_path / "daq/processed"), "data_type": ["raw"],
         "upload_options": ["lab"], "reference_for": ["raw"]},
        {"name": "lab", "method": "local", "dir_raw": str(tmp_path / "lab/raw"),
         "dir_processed": str(tmp_path / "lab/processed"), "data_type": ["raw"],
         "download_options": ["daq"]},
    ]
    return write_config(tmp_path / "cax.json", sites, runs_db=runsdb_uri[0],
                        runs_db_name=runsdb_uri[1], sleep_seconds=0.1, lease_seconds=30)


def make_context(config_path: Path, host: str, runsdb: Any, **kwargs: Any) -> Context:
    """A task context for ``host``, sharing the test's runs DB connection."""
    config = load_config(config_path, host)
    from cax.cli import make_owner, run_selector
    from cax.workers import Background

    return Context(config=config, runsdb=runsdb, owner=make_owner(host),
                   selector=run_selector(kwargs.pop("run", None), kwargs.pop("name", None),
                                         config.datasets_wanted),
                   background=Background(config.site.max_transfers), **kwargs)


def advance_clock(runsdb: Any, seconds: float) -> None:
    """Make the runs DB's clock run ``seconds`` ahead: time passing, as every lease sees it."""
    real = runsdb.clock.server_time
    runsdb.clock.server_time = lambda: real() + dt.timedelta(seconds=seconds)
    runsdb.clock.sync()


def set_entry(runsdb: Any, run_id: Any, key: Any, fields: dict[str, Any]) -> None:
    """Set fields of an entry directly, as another program (or a test) would."""
    runsdb.runs.update_one({"_id": run_id, "data": key.elem_match()},
                           {"$set": {f"data.$.{k}": v for k, v in fields.items()}})
