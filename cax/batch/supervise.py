"""The wrapper every batch job runs: ``python -m cax.batch.supervise [options] -- ARGV...``.

It runs the processor in its own process group and records how it ended in a small JSON
status file beside the job's output (``<output>.status``), written atomically.  That file is
how a daemon that did not start the job (it took over from one that crashed) learns the truth
after the batch system has forgotten the job.

Under the local backend it also ties the job's life to the daemon's: with ``--parent`` it asks
the kernel for SIGTERM when the daemon dies (``PR_SET_PDEATHSIG``), and then kills the whole
processor group, so no processor outlives a ``kill -9`` of its daemon.  ``--timeout`` kills a
hung processor (TERM, then KILL after a grace period) with its group.

Standard library only; it must start fast and run on batch nodes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
KILL_GRACE_S = 5.0

log = logging.getLogger("cax.batch.supervise")


def _log_to_stderr() -> None:
    """The job's stderr is its log, read back by cax: this program's lines go there."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cax: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def set_parent_death_signal(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def write_status(path: str, status: dict) -> None:
    """Write ``status`` to ``path`` atomically (a reader sees all of it or nothing)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(status, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _end(proc: subprocess.Popen) -> None:
    """TERM the processor's group, give it a grace period, then KILL what is left."""
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _child_setup() -> None:
    # Runs in the forked child of this single-threaded wrapper: die with the wrapper too.
    set_parent_death_signal(signal.SIGKILL)


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cax.batch.supervise")
    parser.add_argument("--status", required=True, help="Where to record how the job ended.")
    parser.add_argument("--timeout", type=float, default=None, help="Seconds before a kill.")
    parser.add_argument("--parent", type=int, default=None,
                        help="PID of the daemon: end the job when that process dies.")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    opts = parser.parse_args(args)
    _log_to_stderr()
    argv = opts.argv[1:] if opts.argv[:1] == ["--"] else opts.argv
    if not argv:
        parser.error("no command given after --")
    if opts.parent is not None:
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != opts.parent:  # the daemon died before the line above
            return 143
    start = time.time()
    ended_by: list[str] = []

    def on_term(signum: int, frame: object) -> None:
        ended_by.append(signal.Signals(signum).name)
        if proc is not None:
            _kill_group(proc.pid, signal.SIGKILL)

    proc: subprocess.Popen | None = None
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_child_setup)
    except OSError as exc:
        log.error("cannot start %s: %s", argv[0], exc.strerror)
        write_status(opts.status, {"state": "failed", "exit_code": 127, "start": start,
                                   "end": time.time(), "detail": f"cannot start {argv[0]}"})
        return 127
    state, detail = None, ""
    try:
        code = proc.wait(opts.timeout)
    except subprocess.TimeoutExpired:
        log.warning("killing %s after its timeout of %g s", argv[0], opts.timeout)
        _end(proc)
        code, state, detail = proc.returncode, "timeout", f"killed after {opts.timeout:g} s"
    _kill_group(proc.pid, signal.SIGKILL)  # leftovers of the processor's group
    if ended_by:
        state, detail = "cancelled", f"ended by {ended_by[0]}"
    elif state is None:
        state = "completed" if code == 0 else "failed"
        if code < 0:
            detail = f"killed by {signal.Signals(-code).name}"
    write_status(opts.status, {"state": state, "exit_code": code, "start": start,
                               "end": time.time(), "detail": detail})
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
