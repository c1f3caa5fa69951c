"""The one place cax starts external programs.

Every command is an argument list (never a shell string), has a timeout, gets no stdin, and runs
in its own process group so that a timeout or a cold stop can kill it with all its children.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from cax.errors import CommandError, CommandTimeoutError

log = logging.getLogger(__name__)

KILL_GRACE_S = 5.0
STDERR_TAIL_LINES = 25
SECRET_FLAGS = ("--password", "-password", "--passwd")

_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()


def mask(argv: Sequence[str]) -> str:
    """Return ``argv`` as one loggable line, secret values replaced by ``***``."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
        elif any(arg.startswith(flag + "=") for flag in SECRET_FLAGS):
            out.append(arg.split("=", 1)[0] + "=***")
        else:
            hide_next = arg in SECRET_FLAGS
            out.append(arg)
    return " ".join(out)[:1000]


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-STDERR_TAIL_LINES:])


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate(proc: subprocess.Popen) -> None:
    """TERM the process group, wait a grace period, then KILL it."""
    _kill_group(proc, signal.SIGTERM)
    try:
        proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc, signal.SIGKILL)
        proc.wait()


def kill_all() -> None:
    """KILL every command still running (used by a cold stop; safe in a signal handler)."""
    for proc in list(_live):
        _kill_group(proc, signal.SIGKILL)


@contextmanager
def popen(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: int | None = subprocess.DEVNULL,
    merge_stderr: bool = False,
    binary: bool = False,
) -> Iterator[subprocess.Popen]:
    """Start ``argv`` with text pipes (bytes with ``binary``) and yield it; on leaving, kill
    whatever is left of it.

    For callers that watch output as it comes (progress, stalls); ``run`` is the simple case.
    """
    argv = [str(a) for a in argv]
    log.debug("run: %s", mask(argv))
    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("LC_ALL", "C")
    try:
        proc = subprocess.Popen(  # an argv list, never a shell
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            text=not binary,
            errors=None if binary else "replace",
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from exc
    with _live_lock:
        _live.add(proc)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _terminate(proc)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream:
                try:
                    stream.close()
                except OSError:  # unflushed input to a process that is gone
                    pass
        with _live_lock:
            _live.discard(proc)


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    input: str | None = None,
    check: bool = True,
    host: str = "",
    ok_codes: Sequence[int] = (0,),
) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion and return its CompletedProcess (text stdout and stderr).

    Raises CommandTimeoutError after ``timeout`` seconds (the process group is killed), and
    CommandError when ``check`` is set and the exit status is not in ``ok_codes``.
    """
    stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
    with popen(argv, env=env, cwd=cwd, stdin=stdin) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _terminate(proc)
            out, err = proc.communicate()
            raise CommandTimeoutError(proc.args, timeout, _tail(err or ""), host) from None
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and proc.returncode not in ok_codes:
        raise CommandError(proc.args, proc.returncode, _tail(err or out or ""), host)
    return result

