"""No ssh master, rsync, scp or stream process outlives a kill -9 of cax (issue 7 item 11).

A small script copies a large file with a transport over the real sshd and is killed with
SIGKILL mid-copy.  Every process it started carries its socket dir in its command line (the
ControlPath); none may be left, and the next start removes the socket dir.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cax.transport.rsync import SOCKET_DIR_PREFIX, reap_socket_dirs

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
COPIER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.sshd import Sshd
from cax.transport.base import Endpoint, open_transport
ep = Endpoint(**{endpoint!r})
t = open_transport(ep)
print(t._dir, flush=True)
t.put(Path({src!r}), {dst!r}, lambda n: time.sleep(0.01))
"""


def _with_marker(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


@pytest.mark.parametrize("method", ["rsync", "openssh", "stream"])
def test_kill_9_leaves_no_processes_and_next_start_reaps_socket_dir(sshd, method, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big.dat", "wb") as f:
        f.truncate(512 * 2**20)  # sparse; the slow progress callback keeps the copy going
    dst = tmp_path / "dst"
    ep = sshd.endpoint(method)
    fields = {k: getattr(ep, k) for k in ("site", "method", "hostname", "port", "username",
                                          "key_file", "known_hosts", "connect_timeout_s")}
    script = COPIER.format(root=str(ROOT), endpoint=fields, src=str(src), dst=str(dst / "run"))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        socket_dir = child.stdout.readline().strip()
        assert Path(socket_dir).name.startswith(f"{SOCKET_DIR_PREFIX}{child.pid}-")
        deadline = time.monotonic() + 30
        while not _with_marker(socket_dir) or not dst.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the copy did not start"
            time.sleep(0.05)
        time.sleep(0.5)  # mid-copy
        assert _with_marker(socket_dir), "nothing was running to be orphaned"
        os.kill(child.pid, signal.SIGKILL)  # only the script: its commands have own sessions
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    deadline = time.monotonic() + 10
    while _with_marker(socket_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _with_marker(socket_dir) == [], "processes outlived kill -9 of cax"
    assert Path(socket_dir).exists()  # a kill -9 cannot clean up...
    assert socket_dir in reap_socket_dirs(str(Path(socket_dir).parent))  # ...the next start does
    assert not Path(socket_dir).exists()
