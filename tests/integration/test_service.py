"""The daemon as a service, with real processes: the instance lock, SIGHUP, sd_notify."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest


def start(config, tmp_path, *extra, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "cax", "--config", str(config), "--host", "daq",
         "--log-file", str(tmp_path / "cax.log"), *extra],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CAX_RUNTIME_DIR": str(tmp_path / "run"), **(env or {})})


def wait_for(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def log_has(tmp_path, text):
    path = tmp_path / "cax.log"
    return path.exists() and text in path.read_text()


@pytest.fixture
def daemon(two_sites, tmp_path):
    proc = start(two_sites, tmp_path)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=60)


@pytest.mark.slow
def test_second_daemon_of_a_site_exits_with_its_own_code(daemon, two_sites, tmp_path):
    wait_for(lambda: log_has(tmp_path, "pass 1: done"), "the first pass")
    second = start(two_sites, tmp_path)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 5
    assert err == (f"cax: another cax daemon for site daq runs on this machine (pid "
                   f"{daemon.pid}, lock {tmp_path / 'run/cax-daq.lock'}); not starting a "
                   "second one\n")
    once = start(two_sites, tmp_path, "--once")  # a one-off pass is not a second daemon
    assert once.wait(timeout=120) == 0
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) == 0
    third = start(two_sites, tmp_path)  # the lock died with its holder
    wait_for(lambda: log_has(tmp_path, f"{third.pid} cax.daemon: pass 1: done"), "third")
    third.send_signal(signal.SIGTERM)
    assert third.wait(timeout=60) == 0


@pytest.mark.slow
def test_sighup_reopens_the_log_file(daemon, tmp_path):
    wait_for(lambda: log_has(tmp_path, "sleeping"), "the first pause")
    (tmp_path / "cax.log").rename(tmp_path / "cax.log.1")  # what logrotate does
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: log_has(tmp_path, "log file reopened (SIGHUP)"), "the reopened log")
    assert daemon.poll() is None  # SIGHUP no longer kills it
    assert "log file reopened" not in (tmp_path / "cax.log.1").read_text()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) == 0


@pytest.mark.slow
def test_sd_notify_ready_watchdog_and_stopping(two_sites, tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    proc = start(two_sites, tmp_path, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    try:
        got = []
        while not any("WATCHDOG=1" in m for m in got):
            got.append(sock.recv(4096).decode())
        assert got[0].startswith("READY=1\nSTATUS=site daq")
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in got[-1]:
            got.append(sock.recv(4096).decode())
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)
        sock.close()
