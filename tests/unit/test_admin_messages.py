"""Operator-facing messages: short, true, and naming what to fix."""

from __future__ import annotations

import json
import subprocess
import sys
import time


def test_unreachable_runs_db_is_one_short_line_within_seconds(tmp_path):
    config = tmp_path / "cax.json"
    config.write_text(json.dumps({"runs_db": "mongodb://eb:secret@127.0.0.1:1/run", "sites": [
        {"name": "daq", "method": "local", "dir_raw": str(tmp_path), "data_type": ["raw"]}]}))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "cax", "--config", str(config), "--host",
                             "daq", "--once"], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60  # a few seconds; generous for a loaded machine
    assert result.returncode == 3
    assert result.stderr == ("cax: runs DB mongodb://eb:***@127.0.0.1:1/run (key 'runs_db') is "
                             "unreachable: 127.0.0.1:1: [Errno 111] Connection refused\n")


def test_missing_embedded_store_is_an_outage_for_every_command(tmp_path):
    """Issue 17.10: with the store's folder moved away, a dry run, ``status`` and ``run add``
    each exit 3 with one line, and nothing is created at the store's path."""
    config = tmp_path / "cax.json"
    raw = tmp_path / "raw"
    (raw / "170101_0000").mkdir(parents=True)
    (raw / "170101_0000" / "f").write_bytes(b"x")
    config.write_text(json.dumps({"runs_db": "file:store", "sites": [
        {"name": "daq", "method": "local", "dir_raw": str(raw), "data_type": ["raw"]}]}))
    cax = [sys.executable, "-m", "cax", "--config", str(config), "--host", "daq"]
    for argv in (["--once", "--dry-run"], ["status"], ["status", "--stuck"],
                 ["run", "add", "--number", "27", "--location", str(raw / "170101_0000")]):
        result = subprocess.run(cax + argv, capture_output=True, text=True, timeout=120)
        assert result.returncode == 3, (argv, result.stderr)
        assert "no embedded runs DB at" in result.stderr, argv
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "store").exists(), argv
    result = subprocess.run(cax + ["run", "add", "--create-runs-db", "--number", "27",
                                   "--location", str(raw / "170101_0000")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "creating a new, empty embedded runs DB" in result.stderr
    assert (tmp_path / "store" / "runsdb.sqlite").exists()


def test_task_list_error_names_the_file_and_site(tmp_path):
    config = tmp_path / "cax.json"
    config.write_text(json.dumps({"runs_db": "file:db", "sites": [
        {"name": "daq", "method": "local", "dir_raw": str(tmp_path), "data_type": ["raw"],
         "task_list": ["CopyPush", "Copypull"]}]}))
    result = subprocess.run([sys.executable, "-m", "cax", "--config", str(config), "--host",
                             "daq", "--once"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("cax: cax.json: site 'daq' key 'task_list': unknown task "
                                    "'Copypull' (known: AddChecksum, ")
    assert "::" not in result.stderr


def test_debug_log_of_a_command_does_not_inline_its_script():
    from cax.proc import mask

    script = "import os\n" + "x = 1\n" * 100
    line = mask(["ssh", "-p", "22", "host", f"python3 -I -S -c {script!r}"])
    assert line.startswith("ssh -p 22 host <python3 ... (")
    assert "import os" not in line
