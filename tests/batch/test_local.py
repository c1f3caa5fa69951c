"""The local backend's own promises: timeouts kill the group, jobs die with their daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from cax.batch import JobSpec, JobState, LocalBackend, recorded_status
from cax.batch.local import process_start_ticks
from tests.batch.test_backends import wait_final

WAIT_S = 60.0


def alive(pid: int) -> bool:
    return process_start_ticks(pid) is not None


def wait_for_file(path: Path, timeout: float = WAIT_S) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def sleeper_with_child(pidfile: Path) -> tuple[str, ...]:
    """A processor that starts a grandchild and hangs: writes 'its_pid child_pid'."""
    code = textwrap.dedent(f"""
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "600"])
        open({str(pidfile)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(600)
    """)
    return (sys.executable, "-c", code)


def test_hung_processor_is_killed_with_its_group_at_the_timeout(tmp_path):
    backend = LocalBackend(2, timeout_s=1.5)
    pidfile = tmp_path / "pids"
    spec = JobSpec("cax_1_v1", sleeper_with_child(pidfile), str(tmp_path / "job.log"))
    job_id = backend.submit(spec)
    pids = [int(p) for p in wait_for_file(pidfile).split()]
    status = wait_final(backend, job_id)
    assert status.state == JobState.TIMEOUT
    assert "timeout" in status.reason(spec.output)
    deadline = time.monotonic() + WAIT_S
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, "processor or its child survived the timeout"
        time.sleep(0.05)
    backend.close()


DAEMON = """
import sys, time
from cax.batch import JobSpec, LocalBackend
backend = LocalBackend(1)
job = backend.submit(JobSpec("cax_1_v1", tuple(sys.argv[2:]), sys.argv[1]))
print(job, flush=True)
time.sleep(600)
"""


def test_processor_dies_with_a_kill_9_of_its_daemon_and_others_see_it_run(tmp_path):
    pidfile = tmp_path / "pids"
    output = str(tmp_path / "job.log")
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON, output,
                               *sleeper_with_child(pidfile)], stdout=subprocess.PIPE, text=True)
    try:
        job_id = daemon.stdout.readline().strip()
        pids = [int(p) for p in wait_for_file(pidfile).split()]
        other = LocalBackend(1)  # another daemon on this machine, asking about the job
        assert other.poll([job_id])[job_id].state == JobState.RUNNING
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait()
        deadline = time.monotonic() + WAIT_S
        while any(alive(p) for p in pids) or other.poll([job_id])[job_id].active:
            assert time.monotonic() < deadline, "the job outlived its daemon"
            time.sleep(0.05)
        assert other.poll([job_id])[job_id].state == JobState.LOST
        assert recorded_status(job_id, output).state == JobState.CANCELLED
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_a_processor_that_cannot_start_fails_with_127(tmp_path):
    backend = LocalBackend(1)
    spec = JobSpec("cax_1_v1", ("/nonexistent/processor",), str(tmp_path / "job.log"))
    status = wait_final(backend, backend.submit(spec))
    assert status.state == JobState.FAILED and status.exit_code == 127
    assert "cannot start" in status.reason(spec.output)
    backend.close()
