"""SSH plumbing shared by the scp (paramiko) and rsync (OpenSSH) backends.

Both backends must refuse unknown host keys unless the site opted in, never compress, prefer
AES-GCM (the biggest throughput lever on these machines), bound every wait, and run site-side
helper scripts with the request on stdin so that no path from the runs DB passes through a
remote shell.  This module builds those settings once from an ``Endpoint`` and turns SSH
failures into ``TransferError`` with a one-line reason.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shlex
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import paramiko
from scp import SCPException

from cax.checksum import REMOTE_MANIFEST_SCRIPT, Manifest, parse_remote_manifest
from cax.errors import ConfigError, TransferError
from cax.transport import siteops
from cax.transport.base import MANIFEST_TIMEOUT_S, REMOTE_OP_TIMEOUT_S, Endpoint

log = logging.getLogger(__name__)

SERVER_ALIVE_INTERVAL_S = 15
SERVER_ALIVE_COUNT = 4
WINDOW_BYTES = 2**27  # paramiko: a big window keeps reads streaming (feasibility §2)
MAX_PACKET_BYTES = 2**18
SITEOPS_SOURCE = Path(siteops.__file__).read_text()


def destination_host(ep: Endpoint) -> str:
    """Return the endpoint's hostname, refusing values ssh would read as options."""
    if not ep.hostname or ep.hostname.startswith("-") or any(c.isspace() for c in ep.hostname):
        raise ConfigError(f"site {ep.site}: invalid hostname {ep.hostname!r} for {ep.method}")
    return ep.hostname


def _file_value(ep: Endpoint, path: str) -> str:
    """Return ``path`` as a ``-o`` value: ``%`` starts a token there, whitespace separates."""
    if '"' in path:
        raise ConfigError(f"site {ep.site}: ssh cannot take a path with a double quote: {path!r}")
    path = path.replace("%", "%%")
    return f'"{path}"' if any(c.isspace() for c in path) else path


def openssh_options(
    ep: Endpoint, control_path: str | None = None, master: bool = False
) -> list[str]:
    """Return OpenSSH client options (everything between ``ssh`` and the host).

    With ``control_path``, share the connection of the ControlMaster listening there (or be it,
    with ``master``); clients fall back to a direct connection when the master is gone.
    """
    opts = ["-p", str(ep.port)]
    if ep.username:
        opts += ["-l", ep.username]
    if ep.key_file:
        # -o, not -i: -i takes the name literally but later expands % tokens in it
        opts += ["-o", f"IdentityFile={_file_value(ep, ep.key_file)}", "-o", "IdentitiesOnly=yes"]
    checking = "accept-new" if ep.accept_new_host_keys else "yes"
    for option in (
        "BatchMode=yes",
        f"StrictHostKeyChecking={checking}",
        f"UserKnownHostsFile={_file_value(ep, ep.known_hosts_path)}",
        f"ConnectTimeout={max(1, round(ep.connect_timeout_s))}",
        f"ServerAliveInterval={SERVER_ALIVE_INTERVAL_S}",
        f"ServerAliveCountMax={SERVER_ALIVE_COUNT}",
        "Compression=no",
        "LogLevel=ERROR",
    ):
        opts += ["-o", option]
    if ep.ciphers:
        opts += ["-c", ",".join(ep.ciphers)]
    if control_path:
        opts += ["-o", f"ControlPath={_file_value(ep, control_path)}"]
        opts += (
            ["-o", "ControlMaster=yes", "-o", "ControlPersist=no"]
            if master
            else ["-o", "ControlMaster=no"]
        )
    return opts


BOOTSTRAP = ("import sys;b=sys.stdin.buffer;"
             "exec(compile(b.read(int(b.readline())),'cax-site-script','exec'))")
"""The one command line every site-side script runs under: it reads the script itself from
stdin (a length line, then the source) and leaves the rest of stdin to the script.  One line,
no newline, no ``!``: csh and tcsh take it in single quotes like any Bourne shell does."""


def python_command(ep: Endpoint) -> str:
    """Return the remote command string that runs a site script sent by ``script_input``.

    The remote side hands this string to the user's login shell (sh, bash, csh, tcsh...), so
    it is one short quoted line; the script and the data it works on travel on stdin.
    ``-I -S``: ignore PYTHON* variables and user/site packages (the scripts need only the
    standard library) and start faster.
    """
    return shlex.join([*shlex.split(ep.remote_python), "-I", "-S", "-c", BOOTSTRAP])


def script_input(script: str, request: str = "") -> str:
    """Return the stdin for ``python_command``: the script's length, the script, the request.

    The scripts are ASCII (checked), so their length in characters is their length in bytes
    whatever text encoding the pipe uses.
    """
    if not script.isascii():
        raise ValueError("site scripts must be ASCII")
    return f"{len(script)}\n{script}{request}"


def siteops_request(*ops: list) -> str:
    """Return the stdin line for a siteops request made of ``ops``."""
    return json.dumps({"ops": list(ops)}) + "\n"


def siteops_purpose(ops: Sequence[list]) -> str:
    """What a siteops request does, for the debug log: ``stat /a; rename /a /b``."""
    return "; ".join(" ".join(str(arg) for arg in op) for op in ops)[:300]


def siteops_results(stdout: str) -> list:
    """Return the results of a siteops reply; raise the OSError of a failed operation."""
    reply = json.loads(stdout.strip().splitlines()[-1])
    if "errno" in reply:
        code = reply["errno"]
        raise OSError(code, reply["error"]) if code else OSError(reply["error"])
    return reply["results"]


def oserror_to_transfer(ep: Endpoint, what: str, path: str, exc: OSError) -> TransferError:
    """Wrap a filesystem error at the site: permissions and the like do not go away by
    retrying; a file that vanished (ENOENT) or appeared (EEXIST) was a race, which does."""
    race = exc.errno in (errno.ENOENT, errno.EEXIST)
    return TransferError(f"{what} site {ep.site} ({ep.address}) {path}: {exc}", retryable=race)


def host_key_message(ep: Endpoint, changed: bool = False) -> str:
    """Return the one-line explanation for a refused host key."""
    if changed:
        return (
            f"host key of {ep.address} CHANGED (site {ep.site}); it does not match "
            f"{ep.known_hosts_path}: check the server, then fix the entry"
        )
    if not os.path.exists(ep.known_hosts_path):
        return (f"known_hosts file {ep.known_hosts_path} of site {ep.site} is missing; create "
                "it with the host key, or set accept_new_host_keys")
    return (
        f"host key of {ep.address} is not in {ep.known_hosts_path} (site {ep.site}); "
        "add it or set accept_new_host_keys"
    )


_HOST_KEY_UNKNOWN = re.compile(r"Host key verification failed|No \S+ host key is known")
_HOST_KEY_CHANGED = re.compile(
    r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for .* has changed"
)
_UNRESOLVED = re.compile(r"Could not resolve hostname|Name or service not known|"
                         r"Temporary failure in name resolution")
_AUTH_FAILED = re.compile(
    r"Permission denied \((publickey|password|keyboard)|Too many authentication"
)


def classify_ssh_stderr(ep: Endpoint, stderr: str) -> tuple[str, bool] | None:
    """Return (message, retryable) when OpenSSH's stderr names a connection-level failure."""
    if _HOST_KEY_CHANGED.search(stderr):
        return host_key_message(ep, changed=True), False
    if _HOST_KEY_UNKNOWN.search(stderr):
        return host_key_message(ep), False
    if _AUTH_FAILED.search(stderr):
        return auth_message(ep), False
    if _UNRESOLVED.search(stderr):
        return resolve_message(ep), True
    return None


def resolve_message(ep: Endpoint) -> str:
    """Return the one-line explanation for a host name that does not resolve.

    Retryable (DNS may be down for a while), so each copy is retried up to its attempts and
    then listed as stuck; ``cax config check`` and the daemon's start-up say it once.
    """
    return (f"host name {ep.hostname} of site {ep.site} does not resolve (DNS): check the "
            "site's 'hostname' in the configuration")


def auth_message(ep: Endpoint) -> str:
    """Return the one-line explanation for a refused login (or a key file that is not there)."""
    if ep.key_file and not os.path.exists(ep.key_file):
        return f"key_file {ep.key_file} of site {ep.site} is missing"
    key = ep.key_file or "the default keys/agent"
    user = ep.username or "the default user"
    return f"authentication as {user} to {ep.address} failed (site {ep.site}) with {key}"


class UnknownHostKeyError(paramiko.SSHException):
    """The server's host key is not in known_hosts and the site did not opt in to new keys."""


class _RefuseUnknownHostKey(paramiko.RejectPolicy):
    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise UnknownHostKeyError(f"{hostname} {key.get_name()} not in known_hosts")


class _AcceptNewHostKey(paramiko.MissingHostKeyPolicy):
    """OpenSSH's ``accept-new`` for sites that opted in: remember an unknown key, say so.

    A key that differs from the one on record is still refused (paramiko raises
    BadHostKeyException before asking this policy).  New keys are saved to ``known_hosts``,
    the file the client loaded its keys from.
    """

    def __init__(self, known_hosts: str):
        self.known_hosts = known_hosts

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        client.save_host_keys(self.known_hosts)
        log.warning("accepted new host key of %s: %s %s", hostname, key.get_name(),
                    key.fingerprint)


def _transport_factory(ep: Endpoint):
    def make(sock: socket.socket, **kwargs: Any) -> paramiko.Transport:
        t = paramiko.Transport(
            sock,
            default_window_size=WINDOW_BYTES,
            default_max_packet_size=MAX_PACKET_BYTES,
            **kwargs,
        )
        options = t.get_security_options()
        wanted = tuple(c for c in ep.ciphers if c in options.ciphers)
        if not wanted:
            raise ConfigError(
                f"site {ep.site}: none of the ciphers {ep.ciphers} work with paramiko"
            )
        options.ciphers = wanted
        return t

    return make


def connect_paramiko(ep: Endpoint) -> paramiko.SSHClient:
    """Open an authenticated paramiko connection to ``ep``; raise TransferError on failure."""
    if ep.key_file and not os.path.exists(ep.key_file):
        raise TransferError(auth_message(ep), retryable=False)
    client = paramiko.SSHClient()
    known_hosts = ep.known_hosts_path
    if ep.accept_new_host_keys:
        if not os.path.exists(known_hosts):
            os.makedirs(os.path.dirname(known_hosts) or ".", mode=0o700, exist_ok=True)
            Path(known_hosts).touch(mode=0o600)
        client.load_host_keys(known_hosts)  # new keys are saved back to this file
        client.set_missing_host_key_policy(_AcceptNewHostKey(known_hosts))
    else:
        if os.path.exists(known_hosts):
            client.load_host_keys(known_hosts)
        client.set_missing_host_key_policy(_RefuseUnknownHostKey())
    timeout = ep.connect_timeout_s
    try:
        client.connect(
            destination_host(ep),
            port=ep.port,
            username=ep.username,
            key_filename=ep.key_file,
            look_for_keys=ep.key_file is None,
            allow_agent=ep.key_file is None,
            compress=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            transport_factory=_transport_factory(ep),
        )
    except Exception as exc:
        client.close()
        raise paramiko_error(ep, "connect to", "", exc) from exc
    transport = client.get_transport()
    assert transport is not None  # connect() returned: the client is connected
    transport.set_keepalive(SERVER_ALIVE_INTERVAL_S)
    # paramiko leaves Nagle on: every small request (scp's per-file headers and acks, command
    # start and exit) then waits for a delayed ACK; OpenSSH sets TCP_NODELAY too.  (Its sock
    # is the TCP socket connect() opened: cax passes no proxy channel.)
    if isinstance(transport.sock, socket.socket):
        transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def paramiko_error(
    ep: Endpoint, what: str, path: str, exc: BaseException
) -> TransferError | BaseException:
    """Translate a paramiko/socket exception into TransferError (others are returned as is)."""
    where = f"site {ep.site} ({ep.address}) {path}".rstrip()
    if isinstance(exc, TransferError | ConfigError):
        return exc
    if isinstance(exc, UnknownHostKeyError):
        return TransferError(host_key_message(ep), retryable=False)
    if isinstance(exc, paramiko.BadHostKeyException):
        return TransferError(host_key_message(ep, changed=True), retryable=False)
    if isinstance(exc, paramiko.AuthenticationException) and not _login_cut(exc):
        return TransferError(auth_message(ep), retryable=False)
    if isinstance(exc, paramiko.AuthenticationException | SCPException):
        # a connection lost during login ("transport shut down or saw EOF", a timeout), or the
        # site's scp going away mid-copy ("No response from server"): try again later
        return TransferError(f"{what} {where}: {exc}", retryable=True)
    if isinstance(exc, socket.gaierror):
        return TransferError(resolve_message(ep), retryable=True)
    if isinstance(exc, paramiko.SSHException | OSError | EOFError):
        reason = str(exc) or type(exc).__name__
        return TransferError(f"{what} {where}: {reason}", retryable=True)
    return exc


def _login_cut(exc: paramiko.AuthenticationException) -> bool:
    """Return whether paramiko reports a lost connection or timeout as an auth failure.

    paramiko raises AuthenticationException both when the server refuses the key and when the
    connection dies during login; only the first is a permanent configuration problem.
    """
    if isinstance(exc, paramiko.BadAuthenticationType):
        return False  # the server does not offer publickey at all
    text = str(exc).lower()
    return "transport shut down" in text or "saw eof" in text or "timeout" in text


class SiteScripts:
    """``manifest``, ``rename``, ``remove`` and ``exists`` done by the site-side scripts.

    The SSH backends differ only in how a script runs on the site, which they provide as
    ``_run_script(script, stdin, timeout_s, path, purpose) -> (status, stdout, stderr)``
    (``purpose`` names the work in the debug log), and in how a
    failed run becomes an error, ``_script_error(what, path, status, stderr)``.
    """

    endpoint: Endpoint

    def _run_script(self, script: str, stdin: str, timeout_s: float, path: str,
                    purpose: str) -> tuple[int, str, str]:
        raise NotImplementedError  # the backend's

    def _script_error(self, what: str, path: str, status: int, err: str) -> TransferError:
        raise NotImplementedError  # the backend's

    def manifest(self, remote: str) -> Manifest:
        request = json.dumps({"path": remote}) + "\n"
        status, out, err = self._run_script(REMOTE_MANIFEST_SCRIPT, request, MANIFEST_TIMEOUT_S,
                                            remote, f"checksums of {remote}")
        if status not in (0, 1) or not out.strip():
            raise self._script_error("manifest of", remote, status, err)
        return parse_remote_manifest(out)

    def rename(self, src: str, dst: str) -> None:
        self._siteops(["rename", src, dst], path=src)

    def remove(self, remote: str) -> None:
        self._siteops(["remove", remote], path=remote)

    def link_tree(self, src: str, dst: str) -> None:
        self._siteops(["link_tree", src, dst], path=src)

    def exists(self, remote: str) -> bool:
        return self._siteops(["exists", remote], path=remote)[0]

    def free_space(self, remote: str) -> dict:
        return self._siteops(["free", remote], path=remote)[0]

    def _prepare_get(self, remote: str, local: Path, replace: bool) -> tuple[Path, dict]:
        """Stat ``remote`` on the site and make ``local`` ready to receive it.

        An earlier partial copy at ``local`` is removed when ``replace``, kept otherwise (for a
        method that resumes).  Returns the absolute local path and the site's stat of remote.
        """
        local = Path(local).absolute()
        (info,) = self._siteop("get", remote, ["stat", remote])
        try:
            siteops.prepare(str(local), info["kind"], replace)
        except OSError as exc:
            raise oserror_to_transfer(self.endpoint, "get to", str(local), exc) from exc
        return local, info

    def _siteop(self, what: str, path: str, *ops: list) -> list:
        """Run site operations for a copy; filesystem errors there are not retryable."""
        try:
            return self._siteops(*ops, path=path)
        except OSError as exc:
            raise oserror_to_transfer(self.endpoint, what, path, exc) from exc

    def _siteops(self, *ops: list, path: str) -> list:
        status, out, err = self._run_script(SITEOPS_SOURCE, siteops_request(*ops),
                                            REMOTE_OP_TIMEOUT_S, path, siteops_purpose(ops))
        if status != 0 or not out.strip():
            raise self._script_error(ops[0][0], path, status, err)
        return siteops_results(out)
