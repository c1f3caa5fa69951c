"""A real OpenSSH server on 127.0.0.1 for tests and benchmarks.

Used by the ``sshd`` fixture (tests/conformance/conftest.py) and by bench/transfer.py, so both
exercise the same server.  The server runs in the foreground (``sshd -D -e``) with its log in a
file, on a free port, with freshly generated host and client keys.  ``stop()`` also kills the
per-connection sshd processes, so it really looks like the server went away; ``start()`` brings
it back on the same port with the same host key.

This is test code, not part of cax: it starts processes with ``subprocess`` directly, because
sshd must log to a file that nobody reads (a pipe would fill up and block it).
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SSHD_BIN = "/usr/sbin/sshd"
START_TIMEOUT_S = 10.0


class SshdUnavailableError(RuntimeError):
    """This machine cannot run the loopback sshd (binary missing, or it would not start)."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Return every descendant of ``pid`` (read from /proc; no psutil needed)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces and parentheses; the ppid follows the last ")"
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


SITE_USER = "caxsite"
"""The login the tests use: uid 0 (the tests' temp dirs are root's, mode 0700, and chattr
works as for root) with /bin/sh and an empty home, so no login runs root's start-up files.
On these machines root's .bashrc runs ``pyenv init``, which rehashes under a lock at every
login: 80 ms per command, logins serialised, and a login killed mid-rehash (the kill -9 tests)
leaves the lock to stall every later login for a minute."""
TCSH_USER = "cax-tcsh"
"""A second uid-0 login whose login shell is tcsh (issue 7 item 10)."""


def ensure_login(name: str, shell: str, home: str) -> str:
    """Return ``name``, a uid-0 login with ``shell``, creating it if needed (as root).

    Raises SshdUnavailableError when the shell is missing or the user cannot be created.
    """
    if not os.access(shell, os.X_OK):
        raise SshdUnavailableError(f"{shell} is not installed")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        Path(home).mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["useradd", "-o", "-u", "0", "-g", "0", "-M", "-d", home, "-s", shell, name],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        if result.returncode != 0 and "already exists" not in result.stderr:
            raise SshdUnavailableError(
                f"cannot add user {name}: {result.stderr.strip()}") from None
        entry = pwd.getpwnam(name)
    # useradd locks the new account ("!" password), and sshd refuses locked accounts even for
    # keys; "*" is "no password" without the lock
    subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True, timeout=30,
                   stdin=subprocess.DEVNULL)
    if entry.pw_shell != shell:
        raise SshdUnavailableError(f"user {name} has shell {entry.pw_shell}, not {shell}")
    return name


def site_user() -> str:
    """SITE_USER where it can be had, else root (not running as root)."""
    try:
        return ensure_login(SITE_USER, "/bin/sh", "/var/lib/cax-test-site")
    except (SshdUnavailableError, OSError, subprocess.CalledProcessError):
        return "root"


def ensure_tcsh_user() -> str:
    """Return TCSH_USER (tests/run installs tcsh)."""
    return ensure_login(TCSH_USER, "/bin/tcsh", "/root")


class Sshd:
    """One loopback sshd: its keys, known_hosts, config and process."""

    host = "127.0.0.1"
    user = "root"

    def __init__(self, root: Path, port: int | None = None):
        if not os.access(SSHD_BIN, os.X_OK):
            raise SshdUnavailableError(
                f"{SSHD_BIN} is not installed (apt-get install openssh-server)"
            )
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.user = site_user()
        self.port = port or free_port()
        self.key_file = str(self.root / "client_ed25519")
        self.known_hosts = str(self.root / "known_hosts")
        self.log = self.root / "sshd.log"
        self.config = self.root / "sshd_config"
        self.proc: subprocess.Popen | None = None
        self._setup()

    def _setup(self) -> None:
        host_key = self.root / "host_ed25519"
        for key in (host_key, Path(self.key_file)):
            if not key.exists():
                subprocess.run(
                    [
                        "ssh-keygen",
                        "-q",
                        "-t",
                        "ed25519",
                        "-N",
                        "",
                        "-C",
                        "cax-test",
                        "-f",
                        str(key),
                    ],
                    check=True,
                    timeout=30,
                    stdin=subprocess.DEVNULL,
                )
        authorized = self.root / "authorized_keys"
        authorized.write_text(Path(self.key_file + ".pub").read_text())
        authorized.chmod(0o600)
        self.config.write_text(
            f"Port {self.port}\nListenAddress {self.host}\nHostKey {host_key}\n"
            f"PidFile {self.root / 'sshd.pid'}\nAuthorizedKeysFile {authorized}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "Subsystem sftp internal-sftp\nLogLevel VERBOSE\nMaxStartups 50\nMaxSessions 50\n"
        )
        host_pub = (self.root / "host_ed25519.pub").read_text().split()
        Path(self.known_hosts).write_text(
            f"[{self.host}]:{self.port} {host_pub[0]} {host_pub[1]}\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privsep dir, tmpfs

    def start(self) -> None:
        """Start sshd (again) on the same port and wait until it sends its banner."""
        if self.proc and self.proc.poll() is None:
            return
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(  # absolute path: sshd refuses to re-exec otherwise
                [SSHD_BIN, "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SshdUnavailableError(
                    f"sshd exited with {self.proc.returncode}; see {self.log}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise SshdUnavailableError(
            f"sshd did not answer on {self.host}:{self.port}; see {self.log}"
        )

    def session_pids(self) -> list[int]:
        """Return the per-connection processes (sshd children and the commands they run)."""
        return _children(self.proc.pid) if self.proc else []

    def stop(self) -> None:
        """Kill the listener and every open session, as if the server went away."""
        if not self.proc:
            return
        _signal(self.session_pids(), signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @contextmanager
    def frozen_sessions(self) -> Iterator[None]:
        """SIGSTOP the open sessions for the duration (a stalled peer), SIGCONT them afterwards."""
        pids = self.session_pids()
        _signal(pids, signal.SIGSTOP)
        try:
            yield
        finally:
            _signal(pids, signal.SIGCONT)

    def endpoint(self, method: str, **overrides):
        """Return a cax Endpoint for this server with ``method`` ("scp", "rsync", "local")."""
        from cax.transport.base import Endpoint

        fields = dict(
            site="testsite",
            method=method,
            hostname=self.host,
            port=self.port,
            username=self.user,
            key_file=self.key_file,
            known_hosts=self.known_hosts,
            connect_timeout_s=5,
        )
        fields.update(overrides)
        return Endpoint(**fields)

    def trust_port(self, port: int) -> None:
        """Let clients of ``port`` (a proxy in front of this server, tests/wanproxy.py) find
        the server's host key: known_hosts entries name the port."""
        host_pub = (self.root / "host_ed25519.pub").read_text().split()
        with open(self.known_hosts, "a") as f:
            f.write(f"[{self.host}]:{port} {host_pub[0]} {host_pub[1]}\n")

    def ssh_argv(self) -> list[str]:
        """Return an OpenSSH client argv prefix (for benchmarks and anchors)."""
        return [
            "ssh",
            "-p",
            str(self.port),
            "-i",
            self.key_file,
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
        ]


@contextmanager
def running_sshd(root: Path) -> Iterator[Sshd]:
    """Start a loopback sshd under ``root``, yield it, and always stop it (the log stays)."""
    server = Sshd(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
