"""The demo's suggested next commands work exactly as printed and have something to do."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_next_commands_work_as_printed(tmp_path):
    world = tmp_path / "my demo"  # a space: the printed commands must quote it
    demo = subprocess.run([sys.executable, "-m", "cax", "demo", "--dir", str(world),
                           "--runs", "1"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    lines = demo.stdout.splitlines()
    first = lines.index("Try it yourself:") + 1
    commands = [line.strip() for line in lines[first:lines.index("", first)]]
    assert len(commands) == 6
    web = lines[lines.index("", first) + 2].strip()  # a server: tests/web/test_browser.py runs it
    assert web == commands[-1].replace(" status", " web")
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "cax" or argv[0].startswith("/"), command
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                                cwd=world)
        assert result.returncode == 0, (command, result.stderr)
        outputs.append(result.stdout + result.stderr)
    assert "registered run 2 " in outputs[0]  # the run left for the user
    assert "dry run: would checksum" in outputs[1]
    assert "raw daq -> lab: transferred and verified" in outputs[2]
    summary = outputs[4].splitlines()
    # raw and processed per site: lab processes (its data_type lists only raw), daq does not
    assert summary[1].split()[-2:] == ["=.", "=="] and summary[2].split()[-2:] == ["=.", "=="]
