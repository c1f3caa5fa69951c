"""cax status: every view, as text and JSON, on a runs DB seeded with copies in every state."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from click.testing import CliRunner

from cax.admin import status as st
from cax.cli import cli
from cax.config import load_config
from cax.runsdb.stuck import find_stuck
from tests.admin_seed import ALIVE, DEAD, LATE, STUCK_AT_DAQ, STUCK_AT_LAB, heartbeats, seed

EXPECTED_SUMMARY = """\
   run name        daq lab
    11 170101_1100 !   .
    10 170101_1000 =   e
     9 170101_0900 x   .
     8 170101_0800 =   >
     7 170101_0700 =   !
     6 170101_0600 =   !
     5 170101_0500 =   !
     4 170101_0400 =   e
     3 170101_0300 =   >
     2 170101_0200 v   .
     1 170101_0100 =   =
= transferred  v verifying  > transferring  e error (retried)  ! stuck  x purging  . none"""


def cax(config, *args):
    result = CliRunner().invoke(cli, ["--config", str(config), "--host", "daq", *args])
    return result


@pytest.fixture
def seeded(two_sites, runsdb):
    seed(runsdb)
    return two_sites


def test_daemons_judged_alive_late_dead_from_their_interval():
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    beats = heartbeats(now)
    assert st.daemon_state(beats[ALIVE], now) == "alive"
    assert st.daemon_state(beats[LATE], now) == "late"
    assert st.daemon_state(beats[DEAD], now) == "dead"
    slow = {**beats[LATE], "sleep_seconds": 600}  # a long pause makes 300 s normal
    assert st.daemon_state(slow, now) == "alive"
    assert st.daemon_state({**beats[ALIVE], "stopped": now}, now) == "stopped"


def test_default_view_daemons_counts_and_stuck(seeded):
    result = cax(seeded, "status")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("daemons (at 20")  # times carry their date
    daemon_lines = {line.split()[0] + line.split()[1]: line for line in lines[2:5]}
    assert "alive" in daemon_lines["daqvm"] and "late" in daemon_lines["labvm"]
    assert "dead" in daemon_lines["labold"] and "run 3: ssh: timeout" in daemon_lines["labold"]
    assert any(line.split() == ["lab", "raw", "error", "5"] for line in lines)
    assert any(line.split() == ["midway-login1", "raw", "transferring", "1"] for line in lines)
    stuck = len(STUCK_AT_DAQ) + len(STUCK_AT_LAB)  # lab's failures are copies from daq
    assert lines[-1].startswith(f"stuck: {stuck} entries (see: ")
    view = json.loads(cax(seeded, "status", "--json").stdout)
    assert view["stuck"] == stuck
    assert {d["state"] for d in view["daemons"]} == {"alive", "late", "dead"}


def test_run_view_shows_every_copy_with_details(seeded):
    result = cax(seeded, "status", "--run", "8")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "raw at lab: transferring" in text
    assert f"lease {DEAD} until 20" in text
    assert "copied from daq" in text
    runs = json.loads(cax(seeded, "status", "--name", "170101_1000", "--json").stdout)
    assert [e["site"] for e in runs[0]["data"]] == ["daq", "lab", "midway-login1"]
    assert runs[0]["data"][0]["checksum"].startswith("0f0f")  # the original's sha512
    missing = cax(seeded, "status", "--run", "999")
    assert missing.exit_code == 2 and missing.stderr == "cax: no run 999 in the runs DB\n"


def test_stuck_view_reasons_and_commands(seeded):
    result = cax(seeded, "status", "--stuck")
    assert result.exit_code == 1, result.output  # something is stuck: cron and monitoring see it
    text = result.stdout
    assert "run 5 (170101_0500) raw at lab: error, copied from daq" in text
    assert "5 attempt(s), none left (max_attempts 5): rsync: No space left" in text
    assert "permanent error, not retried: Permission denied" in text
    assert f"transferring under a lease of {DEAD} (dead) that expired 20" in text
    assert f"purging under a lease of {ALIVE} (alive) that expired" in text
    assert f"--config {seeded.resolve()} --host daq retry --run 5 --site lab --type raw" in text
    listed = json.loads(cax(seeded, "status", "--stuck", "--json").stdout)
    got = {(e["run"], e["site"]): e["kind"] for e in listed}
    want = {**{(n, "lab"): k for n, k in STUCK_AT_LAB.items()},
            **{(n, "daq"): k for n, k in STUCK_AT_DAQ.items()}}
    assert got == want  # the original's error (run 10) and live leases are not stuck


def test_stuck_of_another_site_excludes_what_does_not_concern_it(seeded, runsdb):
    config = load_config(seeded, "lab")
    entries = st.stuck(runsdb, config, st.now_of(runsdb), "lab")
    assert {(e.number, e.key.host) for e in entries} == {(n, "lab") for n in STUCK_AT_LAB}


def test_summary_matches_the_expected_rendering(seeded):
    result = cax(seeded, "status", "--summary")
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == EXPECTED_SUMMARY
    coloured = cax(seeded, "status", "--summary", "--color").stdout
    assert "\x1b[31;1m!\x1b[0m" in coloured and "\x1b[32m=\x1b[0m" in coloured
    table = json.loads(cax(seeded, "status", "--summary", "--json", "--newest", "2").stdout)
    assert [r["number"] for r in table["runs"]] == [11, 10]
    assert table["runs"][0]["cells"]["daq"]["raw"] == "stuck"


def test_stuck_queries_are_few_and_indexed(seeded, runsdb):
    before = runsdb.round_trips
    find_stuck(runsdb, st.now_of(runsdb), max_attempts={"daq": 5, "lab": 5})
    assert runsdb.round_trips - before <= 3


def test_daemons_gone_for_over_a_week_are_left_out_of_the_text(seeded, runsdb):
    old = heartbeats(st.now_of(runsdb) - dt.timedelta(days=10))[DEAD]
    runsdb.write_heartbeat("lab@older:1:1", old)
    text = cax(seeded, "status").stdout
    assert "older" not in text
    assert "(1 daemon(s) stopped or dead for over a week not shown; --json lists them)" in text
    assert len(json.loads(cax(seeded, "status", "--json").stdout)["daemons"]) == 4


def test_original_cax_status_lists_entries_of_a_site_with_a_status(seeded, runsdb):
    """``cax-status --host H --status S``, as the original's batch and admin scripts call it."""
    from cax.cli import cax_status

    want = [(r["number"], e["type"]) for r in runsdb.find_runs({}) for e in r["data"]
            if e.get("host") == "lab" and e.get("status") == "error"]
    result = CliRunner().invoke(cax_status, ["--host", "lab", "--status", "error", "--config",
                                             str(seeded), "--disable_database_update"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert want and len(lines) == len(want)
    assert all(" at lab: error, " in line for line in lines)
    assert result.stderr.startswith(f"{len(want)} entr")
    unknown = CliRunner().invoke(cax_status, ["--host", "nowhere", "--status", "error",
                                              "--config", str(seeded)])
    assert unknown.exit_code == 2 and "nowhere" in unknown.stderr and not unknown.stdout


# -- issue 18: failures no view showed, exit codes, the summary's processed copies and cut ----


def test_run_registered_at_a_wrong_location_is_listed_as_stuck(two_sites, runsdb, tmp_path):
    """Item 6: its first read finds nothing, so it is ``error`` with 0 attempts, and with no
    other copy to fetch it from, nothing will ever retry it: it waits for a person."""
    from cax.daemon import Daemon
    from cax.tasks import AddChecksum
    from tests.conftest import make_context, make_run

    wrong = tmp_path / "lab/raw/170101_0500"  # never written: a typo in the registration
    runsdb.insert_runs([make_run(5, name=wrong.name, data=[
        {"host": "lab", "type": "raw", "status": "verifying", "location": str(wrong)}])])
    ctx = make_context(two_sites, "lab", runsdb, once=True)
    Daemon(ctx, [AddChecksum]).run_pass()
    entry = runsdb.find_runs({"number": 5})[0]["data"][0]
    assert entry["status"] == "error" and not entry.get("attempts")
    result = CliRunner().invoke(cli, ["--config", str(two_sites), "--host", "lab", "status",
                                      "--stuck"])
    assert result.exit_code == 1, result.output
    assert "run 5 (170101_0500) raw at lab: error" in result.stdout
    assert "no verified copy of these raw data elsewhere to fetch them from: data missing" \
        in result.stdout
    assert "retry: " in result.stdout


def test_stuck_view_exits_0_when_nothing_is_stuck(two_sites, runsdb):
    result = cax(two_sites, "status", "--stuck")
    assert result.exit_code == 0 and result.stdout == "nothing is stuck for site daq\n"


def test_summary_shows_the_processed_copies_a_site_makes(two_sites, runsdb):
    """Item 9: lab processes (a processing section) without listing ``processed`` in its
    ``data_type`` (the demo's site): its copies of its own version show, others do not."""
    from tests.conftest import edit_site, make_run

    edit_site(two_sites, "lab", processing={
        "command": ["{python}", "-m", "cax.processors.reference", "{input}", "{output}"],
        "version": "v2"})
    raw = {"type": "raw", "status": "transferred", "location": "/x"}
    runsdb.insert_runs([
        make_run(1, data=[{**raw, "host": "daq"}, {**raw, "host": "lab"},
                          {"host": "lab", "type": "processed", "pax_version": "v2",
                           "status": "transferred", "location": "/y"}]),
        make_run(2, data=[{**raw, "host": "daq"},
                          {"host": "lab", "type": "processed", "pax_version": "v1",
                           "status": "error", "location": "/z"}])])
    table = json.loads(cax(two_sites, "status", "--summary", "--json").stdout)
    assert table["types"] == ["raw", "processed"]
    cells = {r["number"]: r["cells"] for r in table["runs"]}
    assert cells[1]["lab"] == {"raw": "transferred", "processed": "transferred"}
    assert cells[2]["lab"] == {"raw": None, "processed": None}  # v1 is not lab's version


def test_summary_says_when_it_left_older_runs_out(seeded):
    """Item 9: ``--newest`` cut the list, and neither the JSON nor the text said so."""
    cut = json.loads(cax(seeded, "status", "--summary", "--json", "--newest", "3").stdout)
    assert (len(cut["runs"]), cut["newest"], cut["more"]) == (3, 3, True)
    whole = json.loads(cax(seeded, "status", "--summary", "--json", "--newest", "11").stdout)
    assert (len(whole["runs"]), whole["more"]) == (11, False)
    text = cax(seeded, "status", "--summary", "--newest", "3").stdout
    assert text.splitlines()[-1] == "(the newest 3 runs; --newest N shows more)"
