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


def test_dry_run_on_a_new_embedded_store_has_nothing_to_do(tmp_path):
    config = tmp_path / "cax.json"
    config.write_text(json.dumps({"runs_db": "file:new-store", "sites": [
        {"name": "daq", "method": "local", "dir_raw": str(tmp_path), "data_type": ["raw"]}]}))
    result = subprocess.run([sys.executable, "-m", "cax", "--config", str(config), "--host",
                             "daq", "--once", "--dry-run"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pass 1: done, 0 item(s) done, 0 failed" in result.stderr
    assert not (tmp_path / "new-store").exists()  # a dry run creates nothing


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
