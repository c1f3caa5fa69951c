"""``cax web`` as a command: it serves over HTTP with waitress, says where and for whom at start,
takes the runs DB from --runs-db like every command, and refuses what it cannot do (exit 2)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.web.conftest import HOSTILE_NAME


def start(config: Any, *args: str, env: dict[str, str] | None = None,
          options: tuple[str, ...] = ()) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CAX_WEB_")}
    return subprocess.Popen([sys.executable, "-m", "cax", "--config", str(config), "--host",
                             "daq", *options, "web", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**clean, **(env or {})})


@pytest.fixture
def served(world):
    server = start(world, "--port", "0")
    lines = [server.stdout.readline(), server.stdout.readline()]
    yield server, lines
    server.terminate()
    server.wait(timeout=30)


def test_cax_web_serves_the_runs_db_and_says_so(served):
    server, lines = served
    assert lines[0].startswith("cax web: serving the runs DB ")
    assert " read-only on " in lines[0]
    assert "no authentication (loopback only" in lines[1]
    url = lines[0].rsplit(" on ", 1)[1].strip()
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=30) as page:
        body = page.read().decode()
        assert page.status == 200 and page.headers["Server"] == "cax"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body and HOSTILE_NAME not in body
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"), timeout=30)
    assert refused.value.code == 405


def test_cax_web_with_a_secret_asks_for_it(world):
    server = start(world, "--port", "0", env={"CAX_WEB_TOKEN": "tok-123"})
    try:
        lines = [server.stdout.readline(), server.stdout.readline()]
        assert "CAX_WEB_TOKEN" in lines[1] and "tok-123" not in "".join(lines)
        url = lines[0].rsplit(" on ", 1)[1].strip()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=30)
        assert refused.value.code == 401
        request = urllib.request.Request(url, headers={"Authorization": "Bearer tok-123"})
        with urllib.request.urlopen(request, timeout=30) as page:
            assert page.status == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_cax_web_takes_the_runs_db_option(world, tmp_path):
    from cax.runsdb import open_runsdb

    other = tmp_path / "other-store"
    open_runsdb(f"file:{other}", create=True).close()
    server = start(world, "--port", "0", options=("--runs-db", f"file:{other}"))
    try:
        assert f"serving the runs DB file:{other} " in server.stdout.readline()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_port_in_use_is_a_usage_error(world):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = subprocess.run([sys.executable, "-m", "cax", "--config", str(world), "--host",
                               "daq", "web", "--port", str(busy.getsockname()[1])],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "cannot listen there" in done.stderr and "Traceback" not in done.stderr


def test_the_throughput_query_is_warmed_again_after_midnight(monkeypatch):
    """The store remembers one day's query; at midnight the window moves, and the warmer asks
    the new one before any visitor does."""
    import datetime as dt
    import threading

    from cax.web import server

    warmed = threading.Event()
    monkeypatch.setattr(server, "warm", lambda db: warmed.set() or 0.0)
    almost = dt.datetime(2026, 3, 1, 23, 59, 59, 900_000, tzinfo=dt.timezone.utc)
    warmer = server.DailyWarmer(db=None, clock=lambda: almost)
    warmer.AFTER_MIDNIGHT_S = 0.0
    warmer.start()
    try:
        assert warmed.wait(10)
    finally:
        warmer.stopped.set()
        warmer.join(10)
    assert not warmer.is_alive()
    late = server.DailyWarmer(db=None, clock=lambda: almost.replace(hour=0))  # a day to wait
    late.start()
    late.stopped.set()
    late.join(10)
    assert not late.is_alive()


def test_a_missing_runs_db_is_an_outage_not_an_empty_world(world, tmp_path):
    done = subprocess.run([sys.executable, "-m", "cax", "--config", str(world), "--host", "daq",
                           "--runs-db", f"file:{tmp_path / 'nowhere'}", "web", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "Traceback" not in done.stderr
    assert not (tmp_path / "nowhere").exists()


def test_a_bind_name_of_two_addresses_is_served_on_both_and_said(world, monkeypatch):
    """``--bind localhost`` where localhost is 127.0.0.1 and ::1 (most machines' /etc/hosts):
    waitress listens on each address, and cax web says where (it raised AttributeError)."""
    import waitress.server

    from cax.config import load_config
    from cax.web.server import serve

    real_getaddrinfo = socket.getaddrinfo

    def two_addresses(host, *args, **kwargs):
        if host != "localhost":
            return real_getaddrinfo(host, *args, **kwargs)
        return real_getaddrinfo("127.0.0.1", *args, **kwargs) + \
            real_getaddrinfo("127.0.0.2", *args, **kwargs)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    monkeypatch.setattr(waitress.server.MultiSocketServer, "run", interrupted)
    said: list[str] = []
    assert serve(load_config(world, "daq"), bind="localhost", port=0, announce=said.append,
                 env={}) == 0
    where = said[0].rsplit(" read-only on ", 1)[1]
    first, second = where.split(" and ")
    assert first.startswith("http://127.0.0.1:") and second.startswith("http://127.0.0.2:")
