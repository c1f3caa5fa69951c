"""The embedded store's directory disappearing is an outage, never an empty runs DB."""

from __future__ import annotations

import shutil

import pytest

from cax.errors import RunsDBError
from cax.runsdb import open_runsdb
from tests.conftest import make_run


def test_vanished_store_is_an_outage(tmp_path):
    db = open_runsdb(f"file:{tmp_path / 'store'}", create=True)
    db.insert_runs([make_run(1)])
    assert db.count_runs({}) == 1
    shutil.rmtree(tmp_path / "store")
    with pytest.raises(RunsDBError, match="unavailable"):
        db.find_runs({})
    db.close()
