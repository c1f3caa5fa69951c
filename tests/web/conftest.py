"""Fixtures of the website's tests: a runs DB with copies in every state and hostile texts, and
the application over it, opened read-only as ``cax web`` opens it."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from cax.config import load_config
from cax.runsdb import open_runsdb
from cax.web.app import create_app
from cax.web.auth import Credentials
from tests.admin_seed import copy, seed
from tests.conftest import make_run

#: A run name, a location and an error text that would do harm if a page did not escape them.
HOSTILE_NAME = "<script>alert(1)</script>"
HOSTILE_LOCATION = """/data/lab/raw/it's a "quoted" <dir> & more"""
HOSTILE_ERROR = """<img src=x onerror=alert(2)> rsync: "disk" & 'full'"""
HOSTILE_NUMBER = 12


def hostile_run(now: dt.datetime) -> dict[str, Any]:
    """Run 12, named like a script, with a stuck copy at lab whose location and error are
    hostile too."""
    return make_run(HOSTILE_NUMBER, name=HOSTILE_NAME, start=now - dt.timedelta(hours=1),
                    tags=[{"name": "<b>tag</b>"}],
                    data=[copy("daq", "transferred", transfer_end=now - dt.timedelta(hours=1)),
                          copy("lab", "error", source="daq", attempts=5, next_attempt=None,
                               error=HOSTILE_ERROR, location=HOSTILE_LOCATION)])


@pytest.fixture
def world(two_sites: Any, runsdb: Any) -> Any:
    """The status tests' runs DB (tests/admin_seed.py) and the hostile run; its config path."""
    now = seed(runsdb)
    runsdb.insert_runs([hostile_run(now)])
    runsdb.write_heartbeat("lab@<i>evil</i>:1:1", {
        "site": "lab", "host": "<i>evil</i>", "pid": 1, "version": "6", "updated": now,
        "pass": 1, "sleep_seconds": 60, "last_error": HOSTILE_ERROR})
    return two_sites


def make_client(config_path: Any, credentials: Credentials | None = None,
                loopback_only: bool = False, **config: Any) -> Any:
    """A test client of the website over the runs DB of ``config_path``, opened read-only."""
    cfg = load_config(config_path, "daq")
    db = open_runsdb(cfg.runs_db, cfg.runs_db_name, cfg.runs_collection, read_only=True)
    if config:
        import dataclasses

        cfg = dataclasses.replace(cfg, **config)
    app = create_app(cfg, db, credentials, loopback_only=loopback_only)
    client = app.test_client()
    client.db = db
    return client


@pytest.fixture
def client(world: Any) -> Any:
    client = make_client(world)
    yield client
    client.db.close()
