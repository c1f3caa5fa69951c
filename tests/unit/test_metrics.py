"""Metrics: the textfile parses back with prometheus_client's parser; the endpoint serves it."""

from __future__ import annotations

import datetime as dt
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from cax.clock import utcnow
from cax.metrics import DaemonMetrics
from tests.admin_seed import seed, set_entry


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_textfile_and_endpoint(runsdb, tmp_path):
    now = seed(runsdb)
    # one copy finished from daq since the daemon started: 3 MB in 10 s
    run_id = runsdb.find_runs({"number": 1})[0]["_id"]
    from cax.runsdb import EntryKey
    set_entry(runsdb, run_id, EntryKey("lab", "raw"), {
        "transfer_start": now - dt.timedelta(seconds=10), "transfer_end": now})
    metrics = DaemonMetrics("daq", now - dt.timedelta(minutes=1))
    metrics.observe(runsdb, now=now, pass_start=now - dt.timedelta(seconds=4),
                    failed_by_task={"CopyPush": 2, "AddChecksum": 0},
                    max_attempts={"daq": 5, "lab": 5})
    path = tmp_path / "cax.prom"
    metrics.write(path)
    got = samples(path.read_text())
    assert not list(tmp_path.glob("*.tmp*"))  # written under a temporary name, renamed
    assert got[("cax_copies", (("site", "lab"), ("status", "error"), ("type", "raw")))] == 5
    assert got[("cax_moved_bytes_total", (("site", "daq"),))] == 3_000_000
    assert got[("cax_moved_files_total", (("site", "daq"),))] == 3
    assert got[("cax_transfer_rate_bytes_per_second", (("site", "daq"),))] == 300_000
    assert got[("cax_pass_duration_seconds", (("site", "daq"),))] == 4
    assert got[("cax_task_errors_total", (("site", "daq"), ("task", "CopyPush")))] == 2
    assert got[("cax_stuck_entries", (("site", "daq"),))] == 6
    assert got[("cax_last_pass_timestamp_seconds", (("site", "daq"),))] == now.timestamp()
    ages = {labels: v for (name, labels), v in got.items() if name == "cax_heartbeat_age_seconds"}
    assert sorted(round(v) for v in ages.values()) == [10, 300, 2 * 86400]

    # the next pass: the copy is not counted twice
    later = utcnow() + dt.timedelta(seconds=1)
    metrics.observe(runsdb, now=later, pass_start=later, failed_by_task={"CopyPush": 1},
                    max_attempts={})
    port = metrics.serve(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            served = samples(reply.read().decode())
    finally:
        metrics.close()
    assert served[("cax_moved_bytes_total", (("site", "daq"),))] == 3_000_000
    assert served[("cax_task_errors_total", (("site", "daq"), ("task", "CopyPush")))] == 3
    assert served[("cax_passes_total", (("site", "daq"),))] == 2


def test_heartbeat_age_is_one_series_per_site_and_machine(runsdb, tmp_path):
    """Issue 18 item 7: a label naming the process left a new series at every restart (and
    every ``--once``), which never went away."""
    now = utcnow()
    for owner, pid, age in (("daq@vm:1:1", 1, 7200), ("daq@vm:2:2", 2, 30),
                            ("lab@vm:3:3", 3, 600)):
        runsdb.write_heartbeat(owner, {"site": owner.split("@")[0], "host": "vm", "pid": pid,
                                       "updated": now - dt.timedelta(seconds=age)})
    metrics = DaemonMetrics("daq", now)
    metrics.observe(runsdb, now=now, pass_start=now, failed_by_task={}, max_attempts={})
    metrics.write(tmp_path / "cax.prom")
    ages = {labels: v for (name, labels), v in samples((tmp_path / "cax.prom").read_text()).items()
            if name == "cax_heartbeat_age_seconds"}
    assert ages == {(("host", "vm"), ("site", "daq")): 30, (("host", "vm"), ("site", "lab")): 600}


def test_contrib_alert_rules_use_only_metrics_cax_exports(runsdb, tmp_path):
    """The example rules of contrib/prometheus name series a daemon really exports, and the
    scrape example's job."""
    import re
    from pathlib import Path

    now = seed(runsdb)
    metrics = DaemonMetrics("daq", now)
    metrics.observe(runsdb, now=now, pass_start=now, failed_by_task={"CopyPush": 1},
                    max_attempts={"daq": 5, "lab": 5})
    metrics.write(tmp_path / "cax.prom")
    exported = {name for name, _ in samples((tmp_path / "cax.prom").read_text())}
    contrib = Path(__file__).resolve().parents[2] / "contrib/prometheus"
    rules = (contrib / "cax-alerts.yml").read_text()
    exprs = re.findall(r"^\s+expr: (.+)$", rules, re.MULTILINE)
    assert len(exprs) == len(re.findall(r"^\s+- alert: Cax\w+$", rules, re.MULTILINE)) >= 4
    used = {name for expr in exprs for name in re.findall(r"\bcax_\w+", expr)}
    assert used and used <= exported, used - exported
    job = re.search(r"job_name: (\w+)", (contrib / "cax-scrape.yml").read_text()).group(1)
    assert f'up{{job="{job}"}}' in rules
