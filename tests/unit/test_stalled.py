"""RetryStalledTransfer: UTC ages, daemon-less push targets, partial leftovers, stuck report."""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from cax.clock import UTC, utcnow
from cax.daemon import Daemon
from cax.paths import scratch_path
from cax.runsdb import ERROR, TRANSFERRED, TRANSFERRING, VERIFYING, EntryKey, find_entry
from cax.tasks.stalled import RetryStalledTransfer, creation_time
from tests.conftest import edit_site, make_context, make_run, write_config


@pytest.fixture
def config(tmp_path: Path, runsdb_uri: tuple[str, str]) -> Path:
    """``daq`` pushes to ``lab`` and to ``tape`` (no daemon); ``lab`` pushes nowhere."""
    for d in ("daq/raw", "lab/raw", "lab/processed/pax_v1", "tape/raw"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    sites = [
        {"name": "daq", "method": "local", "dir_raw": str(tmp_path / "daq/raw"),
         "data_type": ["raw"], "upload_options": ["lab", "tape"], "max_attempts": 3},
        {"name": "lab", "method": "local", "dir_raw": str(tmp_path / "lab/raw"),
         "dir_processed": str(tmp_path / "lab/processed"), "data_type": ["raw"],
         "download_options": ["daq"], "max_attempts": 3},
        {"name": "tape", "method": "tsm", "dir_raw": str(tmp_path / "tape/raw")},
    ]
    return write_config(tmp_path / "cax.json", sites, runs_db=runsdb_uri[0],
                        runs_db_name=runsdb_uri[1], sleep_seconds=0.1, lease_seconds=30)


@pytest.fixture
def chicago(monkeypatch):
    """Local time six (or five) hours behind UTC, where the original misjudged ages."""
    monkeypatch.setenv("TZ", "America/Chicago")
    time.tzset()
    assert time.localtime().tm_gmtoff != 0
    yield
    monkeypatch.undo()
    time.tzset()


def transferring(host: str, location: Path | str, created: Any, **extra: Any) -> dict:
    return {"host": host, "type": "raw", "status": TRANSFERRING, "location": str(location),
            "creation_time": created, **extra}


def add_run(runsdb, number: int, entries: list[dict]) -> Any:
    located = [e["location"] for e in entries if isinstance(e.get("location"), str)]
    name = Path(located[0]).name.split(".")[0] if located else None
    runsdb.insert_runs([make_run(number, name=name, data=entries)])
    return runsdb.find_runs({"number": number})[0]["_id"]


def entry_of(runsdb, run_id, host: str) -> dict:
    return find_entry(runsdb.find_run(run_id), EntryKey(host, "raw"))


def one_pass(ctx) -> None:
    Daemon(ctx, [RetryStalledTransfer]).run_pass(wait_background=True)


def test_stalled_legacy_entries_over_24h_utc_reset_younger_kept(config, runsdb, tmp_path,
                                                                chicago):
    now = utcnow()
    naive = (now - dt.timedelta(hours=25)).replace(tzinfo=None)  # as the original wrote it
    alive = tmp_path / "lab/raw/run4"
    alive.mkdir()
    recent = (now - dt.timedelta(hours=20)).timestamp()  # the original saw it 5-6 h older
    os.utime(alive, (recent, recent))
    eastern = dt.timezone(dt.timedelta(hours=-5))
    ids = {
        "old": add_run(runsdb, 1, [transferring("lab", tmp_path / "lab/raw/r1", naive)]),
        "young": add_run(runsdb, 2, [transferring(
            "lab", tmp_path / "lab/raw/r2", (now - dt.timedelta(hours=23)).astimezone(eastern))]),
        "listed": add_run(runsdb, 3, [transferring(
            "lab", tmp_path / "lab/raw/r3", [now - dt.timedelta(hours=30)])]),
        "alive": add_run(runsdb, 4, [transferring("lab", alive, now - dt.timedelta(hours=30))]),
        "leased": add_run(runsdb, 5, [transferring(
            "lab", tmp_path / "lab/raw/r5", now - dt.timedelta(days=3), lease_owner="x",
            lease_expires=now - dt.timedelta(days=2))]),
    }
    one_pass(make_context(config, "lab", runsdb))
    status = {name: entry_of(runsdb, i, "lab")["status"] for name, i in ids.items()}
    assert status == {"old": ERROR, "young": TRANSFERRING, "listed": ERROR,
                      "alive": TRANSFERRING, "leased": TRANSFERRING}
    reset = entry_of(runsdb, ids["old"], "lab")
    assert reset["attempts"] == 0 and abs(reset["next_attempt"] - now) < dt.timedelta(minutes=1)
    assert "lease_owner" not in reset and reset["error"].startswith("stalled")


def test_stalled_entry_at_daemonless_push_target_reset_by_pusher_only(config, runsdb, tmp_path):
    old = utcnow() - dt.timedelta(days=2)
    run_id = add_run(runsdb, 1, [transferring("tape", tmp_path / "tape/raw/r1", old),
                                 transferring("lab", tmp_path / "lab/raw/r1", old)])
    one_pass(make_context(config, "lab", runsdb))  # lab pushes nowhere
    assert entry_of(runsdb, run_id, "tape")["status"] == TRANSFERRING
    one_pass(make_context(config, "daq", runsdb))
    assert entry_of(runsdb, run_id, "tape")["status"] == ERROR
    assert entry_of(runsdb, run_id, "lab")["status"] == ERROR  # lab's own daemon reset it


TOKEN = "0badf00d"


def _partial(tmp_path: Path, name: str, sub: str = "lab/raw", token: str | None = TOKEN) -> Path:
    partial = tmp_path / sub / (scratch_path(name, token) if token else f".{name}.cax-partial")
    (partial / "sub").mkdir(parents=True)
    (partial / "sub/f.bin").write_bytes(b"x")
    return partial


def _seed_scratch_states(runsdb, tmp_path: Path, raw: Path) -> dict[str, Path]:
    """One scratch per state of its entry; returns name -> scratch path."""
    now = utcnow()
    live = {"lease_owner": "x", "lease_expires": now + dt.timedelta(minutes=1),
            "lease_token": TOKEN}
    scratch = {name: _partial(tmp_path, name) for name in
               ("done", "stuck", "retry", "live", "checking", "expired", "orphan")}
    scratch["legacy"] = _partial(tmp_path, "legacy", token=None)
    scratch["orphan_v1"] = _partial(tmp_path, "orphan_v1", "lab/processed/pax_v1")
    states = {
        "done": {"status": TRANSFERRED},
        "stuck": {"status": ERROR, "attempts": 3, "next_attempt": None,
                  "partial": str(scratch["stuck"])},
        "retry": {"status": ERROR, "attempts": 1, "next_attempt": now + dt.timedelta(hours=1),
                  "partial": str(scratch["retry"])},
        "live": {"status": TRANSFERRING, **live},
        "checking": {"status": VERIFYING, **live},
        # its owner died: the next owner may resume from it
        "expired": {"status": TRANSFERRING, **live,
                    "lease_expires": now - dt.timedelta(minutes=1)},
        "legacy": {"status": TRANSFERRED},
    }
    for number, (name, fields) in enumerate(states.items()):
        add_run(runsdb, number, [{"host": "lab", "type": "raw", "location": str(raw / name),
                                  "creation_time": now, **fields}])
    return scratch


def test_stalled_partials_removed_only_when_safe(config, runsdb, tmp_path):
    scratch = _seed_scratch_states(runsdb, tmp_path, tmp_path / "lab/raw")
    keep = tmp_path / "lab/raw/.hidden_but_not_partial"
    keep.mkdir()
    ctx = make_context(config, "lab", runsdb, dry_run=True)
    one_pass(ctx)
    assert all(p.exists() for p in scratch.values())  # a dry run removes nothing
    one_pass(make_context(config, "lab", runsdb))
    left = sorted(name for name, p in scratch.items() if p.exists())
    assert left == ["checking", "expired", "live", "retry"]
    assert keep.exists()


def test_stalled_scratch_of_running_copy_kept_with_unnormalised_dir(config, runsdb, tmp_path):
    """Issue 7 item 5: a data directory written ``/x//raw`` must not hide a live copy."""
    edit_site(config, "lab", dir_raw=str(tmp_path / "lab") + "//raw/")
    scratch = _seed_scratch_states(runsdb, tmp_path, tmp_path / "lab/raw")
    one_pass(make_context(config, "lab", runsdb))
    assert scratch["live"].exists() and scratch["retry"].exists()
    assert not scratch["orphan"].exists()


def test_stalled_stuck_errors_reported_in_one_warning_not_retried(config, runsdb, tmp_path,
                                                                   caplog):
    now = utcnow()
    add_run(runsdb, 1, [{"host": "lab", "type": "raw", "status": ERROR, "attempts": 3,
                         "error": "permission denied", "location": "/x"}])
    add_run(runsdb, 2, [{"host": "tape", "type": "raw", "status": ERROR, "attempts": 7,
                         "error": "dsmc failed", "location": "n/a"},
                        {"host": "daq", "type": "raw", "status": ERROR, "attempts": 1,
                         "error": "disk full", "next_attempt": now, "location": "/z"}])
    due = add_run(runsdb, 3, [{"host": "lab", "type": "raw", "status": ERROR, "attempts": 1,
                               "error": "timeout", "next_attempt": now, "location": "/y"}])
    with caplog.at_level(logging.WARNING, logger="cax.tasks.stalled"):
        one_pass(make_context(config, "daq", runsdb))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "run 2" in warnings[0] and "tape" in warnings[0] and "dsmc failed" in warnings[0]
    assert "lab" not in warnings[0]  # daq reports its daemon-less targets, not lab's entries
    assert "disk full" not in warnings[0]  # due for a retry: not stuck
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cax.tasks.stalled"):
        one_pass(make_context(config, "lab", runsdb))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "run 1" in warnings[0] and "permission denied" in warnings[0]
    assert "timeout" not in warnings[0]
    assert entry_of(runsdb, due, "lab")["attempts"] == 1  # reported, never retried here


def test_stalled_creation_time_list_and_aware_values_read_as_utc():
    moment = dt.datetime(2017, 3, 1, 12, tzinfo=UTC)
    assert creation_time({"creation_time": [moment.replace(tzinfo=None)]}) == moment
    plus_two = dt.timezone(dt.timedelta(hours=2))
    assert creation_time({"creation_time": moment.astimezone(plus_two)}) == moment
    assert creation_time({"creation_time": []}) is None
    assert creation_time({}) is None
