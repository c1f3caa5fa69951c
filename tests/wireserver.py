"""The wire tier's runs DB: a MongoDB-compatible server from PyPI (SecantusDB), started on
loopback like the test sshd and SLURM, so that cax's queries, updates, index definitions and
BSON values go over the wire protocol to a server.

SecantusDB is an emulator, not MongoDB: where the two differ, the MongoDB manual is the judge.
Each divergence cax's tests meet is reproduced with plain pymongo in
``tests/wire/test_divergences.py`` and marked expected-to-fail there; cax itself never asks
which server it talks to.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pymongo
from pymongo.errors import PyMongoError

#: The server's launcher, installed with the test dependencies (``secantusdb``).
LAUNCHER = "secantusd-py"
START_TIMEOUT_S = 60.0


class WireServerUnavailable(RuntimeError):
    """The wire server cannot be started here."""


def launcher() -> str:
    found = shutil.which(LAUNCHER) or str(Path(sys.executable).parent / LAUNCHER)
    if not Path(found).exists():
        raise WireServerUnavailable(f"{LAUNCHER} is not installed (pip install secantusdb)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WireServer:
    """One server process on 127.0.0.1: in memory, or on ``storage`` (kept across restarts),
    optionally under ``faketime`` (its clock ``skew_s`` off) or with ``auth``."""

    def __init__(self, storage: Path | None = None, *, port: int | None = None,
                 skew_s: int = 0, auth: bool = False, log: Path | None = None):
        self.storage = storage
        self.port = port or free_port()
        self.skew_s = skew_s
        self.auth = auth
        self.log = log
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def start(self) -> WireServer:
        argv = [launcher(), "--host", "127.0.0.1", "--port", str(self.port), "--standalone",
                "--storage-path", str(self.storage) if self.storage else ":memory:",
                "--log-level", "WARNING"]
        if self.auth:
            argv.append("--auth")
        if self.skew_s:
            if not shutil.which("faketime"):
                raise WireServerUnavailable("faketime is not installed")
            argv = ["faketime", "-f", f"{self.skew_s:+d}s", *argv]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise WireServerUnavailable(f"{LAUNCHER} exited with {self.process.returncode}")
            try:
                with pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=500) as client:
                    client.admin.command("ping")
                return self
            except PyMongoError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise WireServerUnavailable(f"{LAUNCHER} did not answer in "
                                                f"{START_TIMEOUT_S:g} s") from None
                time.sleep(0.1)

    def kill(self) -> None:
        """kill -9: the server is gone mid-operation."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
