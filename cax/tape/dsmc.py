"""Run IBM Spectrum Protect's command-line client ``dsmc`` for one site, and parse what it says.

The original cax wrote a bash script per command (a per-host ``source init_tsm.sh`` hard-coded
in Python), ran it with no timeout and ignored the exit status. Here every command is an argument
list with a timeout and no stdin, in its own process group (``cax.proc``). The site's setup comes
from its ``tsm`` section in cax.json:

``dsmc``             path of the client (default ``dsmc`` on PATH)
``env``              environment variables to set, e.g.
                     ``{"DSM_DIR": "/opt/tivoli/tsm/client/ba/bin"}``
``init_script``      a shell script that *exports* the client's variables (the original's
                     ``init_tsm.sh``); it is sourced once, by a fixed command, and its environment
                     is kept; its path is an argument, never part of a command string
``optfile``          ``-optfile=``; ``virtualnodename``, ``asnode``: the node options
``password_env``     name of an environment variable holding the node password (``-password=``,
                     masked in logs), for ``-virtualnodename`` without a stored password
``options``          further client options, appended to every command
``timeout``          seconds allowed for any command, plus ``seconds_per_gb`` per GiB of data
``backup``           ``incremental`` (the original's) or ``archive`` (with ``-description``)
``rename``           stage files as ``<dataset>_<file>`` so generic names are unique on tape
``subdirs``          accept datasets with sub-folders (the original refused them)

``-replace=yes`` on restores and a closed stdin make sure the client never waits on a prompt;
a question that still appears at the end of the output kills the client at once and is
reported (permanent: retrying cannot answer it).
"""

from __future__ import annotations

import codecs
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cax import proc
from cax.config.tsm import setup_problems
from cax.errors import CommandError, ConfigError, TapeError
from cax.tape import output
from cax.tape.output import DsmcOutput

log = logging.getLogger(__name__)

INIT_TIMEOUT_S = 60
POLL_S = 0.2


@dataclass(frozen=True)
class TsmSetup:
    """How one site runs its tape client (see the module docstring for each key)."""

    dsmc: str = "dsmc"
    env: Mapping[str, str] = field(default_factory=dict)
    init_script: str | None = None
    optfile: str | None = None
    virtualnodename: str | None = None
    asnode: str | None = None
    password_env: str | None = None
    options: tuple[str, ...] = ()
    timeout: float = 3600.0
    seconds_per_gb: float = 120.0
    backup: str = "incremental"
    rename: bool = True
    subdirs: bool = False
    description: str = "cax"

    @classmethod
    def of(cls, section: Mapping[str, Any] | None) -> TsmSetup:
        """Return the setup of a site's ``tsm`` section (None: the defaults).

        Raises ConfigError for an invalid section.
        """
        problems = setup_problems(dict(section) if section is not None else None)
        if problems:
            raise ConfigError([f"key 'tsm{p}" for p in problems])
        values = dict(section or {})
        if "options" in values:
            values["options"] = tuple(values["options"])
        return cls(**values)

    def timeout_for(self, nbytes: int = 0) -> float:
        """Seconds one command may take for ``nbytes`` of data (a hang is killed after it)."""
        return self.timeout + self.seconds_per_gb * nbytes / (1 << 30)


@dataclass
class DsmcRun:
    """One finished dsmc command: its argv (password masked), parsed output and wall time."""

    argv: list[str]
    output: DsmcOutput
    seconds: float
    timed_out: bool = False
    stopped: bool = False
    prompted: bool = False  # killed because it asked a question


class Dsmc:
    """The tape client of one site.  Thread-safe: each call runs its own process."""

    def __init__(self, setup: TsmSetup):
        self.setup = setup
        self._env: dict[str, str] | None = None
        self._env_lock = threading.Lock()

    # -- environment ----------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """Return the environment dsmc runs in: ours, the init script's exports, then ``env``."""
        with self._env_lock:
            if self._env is None:
                env = dict(os.environ)
                if self.setup.init_script:
                    env.update(self._sourced(self.setup.init_script))
                env.update(self.setup.env)
                self._env = env
            return dict(self._env)

    @staticmethod
    def _sourced(script: str) -> dict[str, str]:
        """Return the environment after sourcing ``script`` in a clean bash.

        The command is a constant; the script's path is passed as ``$1``.  Raises TapeError.
        """
        argv = ["bash", "--noprofile", "--norc", "-c", '. "$1" >/dev/null && env -0', "cax",
                script]
        try:
            result = proc.run(argv, timeout=INIT_TIMEOUT_S)
        except CommandError as exc:
            raise TapeError(f"tape client init script {script} failed: {exc}") from None
        env = {}
        for item in result.stdout.split("\0"):
            name, sep, value = item.partition("=")
            if sep and name and name not in ("_", "SHLVL", "PWD", "OLDPWD"):
                env[name] = value
        return env

    # -- commands -------------------------------------------------------------------------

    def common_options(self) -> list[str]:
        """Options every command gets: option file, node, password, the site's extras."""
        opts = []
        if self.setup.optfile:
            opts.append(f"-optfile={self.setup.optfile}")
        if self.setup.virtualnodename:
            opts.append(f"-virtualnodename={self.setup.virtualnodename}")
        if self.setup.asnode:
            opts.append(f"-asnode={self.setup.asnode}")
        if self.setup.password_env:
            password = self.environment().get(self.setup.password_env)
            if not password:
                raise TapeError(f"tape node password variable {self.setup.password_env} "
                                "is not set")
            opts.append(f"-password={password}")
        return opts + list(self.setup.options)

    def backup_argv(self, directory: str) -> list[str]:
        """``dsmc incremental DIR/ -subdir=yes`` or ``dsmc archive DIR/ -subdir=yes -desc=``."""
        spec = directory.rstrip("/") + "/"
        if self.setup.backup == "archive":
            return [self.setup.dsmc, "archive", spec, "-subdir=yes",
                    f"-description={self.setup.description}", *self.common_options()]
        return [self.setup.dsmc, "incremental", spec, "-subdir=yes", *self.common_options()]

    def restore_argv(self, tape_dir: str, dest_dir: str) -> list[str]:
        """``dsmc restore TAPE/ DEST/ -subdir=yes -replace=yes`` (or ``retrieve`` for archives)."""
        verb = "retrieve" if self.setup.backup == "archive" else "restore"
        argv = [self.setup.dsmc, verb, tape_dir.rstrip("/") + "/", dest_dir.rstrip("/") + "/",
                "-subdir=yes", "-replace=yes", "-followsymbolic=yes"]
        if verb == "retrieve":
            argv.append(f"-description={self.setup.description}")
        else:
            argv.append("-latest")  # active or not: a later incremental may have expired it
        return argv + self.common_options()

    def query_argv(self, tape_dir: str) -> list[str]:
        """``dsmc query backup TAPE/* -subdir=yes`` (or ``query archive``)."""
        what = "archive" if self.setup.backup == "archive" else "backup"
        return [self.setup.dsmc, "query", what, tape_dir.rstrip("/") + "/*", "-subdir=yes",
                *self.common_options()]

    def backup(self, directory: str, nbytes: int = 0, *, keeper: Any = None) -> DsmcRun:
        return self.run(self.backup_argv(directory), self.setup.timeout_for(nbytes),
                        keeper=keeper)

    def restore(self, tape_dir: str, dest_dir: str, nbytes: int = 0, *,
                keeper: Any = None) -> DsmcRun:
        return self.run(self.restore_argv(tape_dir, dest_dir), self.setup.timeout_for(nbytes),
                        keeper=keeper)

    def query(self, tape_dir: str) -> DsmcRun:
        return self.run(self.query_argv(tape_dir), self.setup.timeout)

    @property
    def verb(self) -> tuple[str, str]:
        """The summary counters of a backup and of a restore in this setup's mode."""
        if self.setup.backup == "archive":
            return "archived", "retrieved"
        return "backed_up", "restored"

    def run(self, argv: Sequence[str], timeout: float, *, keeper: Any = None) -> DsmcRun:
        """Run one dsmc command to its end, its timeout, or until the claim's ``keeper``
        (cax.claimed.Keeper) stops it: a lost lease kills the command at once.

        Output is read as it comes (a prompt without a newline is still seen), stdin is closed.
        A timeout or a stop leaves ``returncode`` None.  Raises TapeError if dsmc cannot start.
        """
        shown = proc.mask(argv).split(" ")
        start = time.monotonic()
        chunks: list[str] = []
        try:
            with proc.popen(argv, env=self.environment(), merge_stderr=True,
                            stdin=subprocess.DEVNULL) as child:
                reader = threading.Thread(target=_drain, args=(child.stdout, chunks),
                                          daemon=True, name="cax-dsmc-out")
                reader.start()
                stop_flag = threading.Event()

                def stopper() -> None:
                    stop_flag.set()
                    if child.returncode is None:
                        _kill(child)

                if keeper is not None:
                    keeper.add_stopper(stopper)
                try:
                    timed_out = prompted = False
                    while child.poll() is None and not stop_flag.is_set():
                        if time.monotonic() - start > timeout:
                            timed_out = True
                            _kill(child)
                            break
                        if _asks(chunks):  # nobody will answer: stdin is closed
                            prompted = True
                            _kill(child)
                            break
                        time.sleep(POLL_S)
                    child.wait()
                finally:
                    if keeper is not None:
                        keeper.remove_stopper(stopper)
                reader.join(5)
                stopped = stop_flag.is_set()
                rc = None if timed_out or stopped or prompted else child.returncode
        except CommandError as exc:
            raise TapeError(f"tape client cannot start: {exc}") from None
        seconds = time.monotonic() - start
        parsed = output.parse("".join(chunks), rc)
        log.debug("%s: status %s in %.1f s, %d line(s)", " ".join(shown[:3]), rc, seconds,
                  len(parsed.lines))
        return DsmcRun(shown, parsed, seconds, timed_out, stopped, prompted)


def _drain(stream: Any, chunks: list[str]) -> None:
    """Collect everything ``stream`` yields until EOF, in blocks as they come (not lines, so a
    prompt that ends without a newline is kept too)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    raw = stream.buffer
    try:
        while True:
            block = raw.read1(65536)
            if not block:
                chunks.append(decoder.decode(b"", final=True))
                return
            chunks.append(decoder.decode(block))
    except (OSError, ValueError):
        return


def _asks(chunks: list[str]) -> bool:
    """Whether the output so far ends in a question (a prompt waiting for an answer)."""
    tail = "".join(chunks[-4:])[-300:]
    last = tail.rstrip("\n").rsplit("\n", 1)[-1]
    return bool(last) and not tail.endswith("\n") and output.asks(last)


def _kill(child: subprocess.Popen) -> None:
    """KILL the command's process group (it runs in its own session: pgid == pid)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def check_finished(run: DsmcRun, what: str) -> None:
    """Raise TapeOutcomeError for a command that timed out or was stopped, keeping its output."""
    if run.prompted:
        raise output.TapeOutcomeError(f"dsmc {what} waited for an answer "
                                      f"({run.output.prompt!r}) and was killed; check the "
                                      "client options (-replace, passwordaccess)", run.output,
                                      permanent=True)
    if run.timed_out:
        prompt = f"; its last words: {run.output.prompt!r}" if run.output.prompt else ""
        raise output.TapeOutcomeError(f"dsmc {what} timed out and was killed{prompt}",
                                      run.output, permanent=bool(run.output.prompt))
    if run.stopped:
        raise output.TapeOutcomeError(f"dsmc {what} was stopped", run.output)
