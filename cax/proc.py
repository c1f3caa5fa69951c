"""The one place cax starts external programs.

Every command is an argument list (never a shell string), has a timeout, gets no stdin, and runs
in its own process group so that a timeout or a cold stop can kill it with all its children.

Its own process group also means a kill -9 of cax does not reach it, so every command is
started with ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills it when cax dies.  That
signal fires when the *thread* that forked exits, not the process, so all commands are forked
by one long-lived spawner thread, never by a worker thread that may end before its command.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import IO, Any, AnyStr

from cax.errors import CommandError, CommandTimeoutError

log = logging.getLogger(__name__)

KILL_GRACE_S = 5.0
STDERR_TAIL_LINES = 25
SECRET_FLAGS = ("--password", "-password", "--passwd")

_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()

PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent(parent: int) -> Callable[[], None]:
    """Return a preexec_fn that has the child killed when ``parent`` dies."""

    def arm() -> None:
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the signal was armed
                os._exit(1)

    return arm


class _Spawner:
    """One daemon thread that forks every command, so PDEATHSIG lasts as long as cax does."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="cax-spawner",
                                                daemon=True)
                self._thread.start()
        done: Future = Future()
        self._jobs.put((argv, kwargs, done))
        return done.result()

    def _run(self) -> None:
        while True:
            argv, kwargs, done = self._jobs.get()
            try:
                done.set_result(subprocess.Popen(  # an argv list, never a shell
                    argv, preexec_fn=_die_with_parent(os.getpid()), **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)


_spawner = _Spawner()


#: Arguments longer than this (or with a newline) are logged as their size only.
SCRIPT_SHOWN = 160


def mask(argv: Sequence[str]) -> str:
    """Return ``argv`` as one loggable line, secret values replaced by ``***``."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
        elif any(arg.startswith(flag + "=") for flag in SECRET_FLAGS):
            out.append(arg.split("=", 1)[0] + "=***")
        elif "\n" in arg or len(arg) > SCRIPT_SHOWN:
            # an inlined script (python3 -c ..., or the remote command ssh runs): its first
            # word and size, not its text, which would bury the line that matters
            out.append(f"<{arg.split()[0] if arg.split() else 'script'} ... "
                       f"({len(arg)} bytes)>")
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
    purpose: str = "",
) -> Iterator[subprocess.Popen]:
    """Start ``argv`` with text pipes (bytes with ``binary``) and yield it; on leaving, kill
    whatever is left of it.

    For callers that watch output as it comes (progress, stalls); ``run`` is the simple case.
    ``purpose`` says in the debug log what a command is for when its words do not (a
    site-side script reads its program from stdin).
    """
    argv = [str(a) for a in argv]
    log.debug("run%s: %s", f" ({purpose})" if purpose else "", mask(argv))
    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("LC_ALL", "C")
    try:
        proc = _spawner.popen(
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


def pipe(stream: IO[AnyStr] | None) -> IO[AnyStr]:
    """A pipe of a child ``popen`` started, which is never None: its stdout, its stderr
    unless ``merge_stderr``, its stdin when given ``stdin=subprocess.PIPE``."""
    assert stream is not None, "popen opened no such pipe"
    return stream


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
    purpose: str = "",
) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion and return its CompletedProcess (text stdout and stderr).

    Raises CommandTimeoutError after ``timeout`` seconds (the process group is killed), and
    CommandError when ``check`` is set and the exit status is not in ``ok_codes``.
    """
    stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
    args = [str(a) for a in argv]  # what popen runs
    with popen(args, env=env, cwd=cwd, stdin=stdin, purpose=purpose) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _terminate(proc)
            out, err = proc.communicate()
            raise CommandTimeoutError(args, timeout, _tail(err or ""), host) from None
    result = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check and proc.returncode not in ok_codes:
        raise CommandError(args, proc.returncode, _tail(err or out or ""), host)
    return result

