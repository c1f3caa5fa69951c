"""The exception tree of cax.

Lower layers raise these with host, path and run in the message; only the task runner (per work
item) and ``cli`` (exit codes) catch them.  Filesystem outcomes use the built-in OSError family.
"""

from __future__ import annotations

from collections.abc import Sequence


class CaxError(Exception):
    """Base class of every error cax raises on purpose."""


class ConfigError(CaxError):
    """The configuration (file, site choice, command-line options) is invalid.

    ``problems`` holds one readable line per problem, so all of them can be shown at once.
    """

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class RunsDBError(CaxError):
    """The runs database could not be reached or refused an operation."""


class CommandError(CaxError):
    """An external command exited with a failure status."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr_tail: str = "", host: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.host = host
        where = f" on {host}" if host else ""
        detail = f": {stderr_tail.strip().splitlines()[-1]}" if stderr_tail.strip() else ""
        super().__init__(f"{self.argv[0]}{where} exited with status {returncode}{detail}")


class CommandTimeoutError(CommandError):
    """An external command ran past its timeout and was killed."""

    def __init__(self, argv: Sequence[str], timeout_s: float, stderr_tail: str = "",
                 host: str = ""):
        super().__init__(argv, -9, stderr_tail, host)
        self.timeout_s = timeout_s
        self.args = (f"{self.argv[0]} timed out after {timeout_s:g} s",)


class TransferError(CaxError):
    """A copy between sites failed.  ``retryable`` says whether trying again may help;
    ``disk_full`` that the destination's filesystem had no room left."""

    def __init__(self, message: str, retryable: bool = True, *, disk_full: bool = False):
        super().__init__(message)
        self.retryable = retryable
        self.disk_full = disk_full


class ChecksumMismatchError(CaxError):
    """Data read back does not match the checksum it must have.  ``files`` names the bad files."""

    def __init__(self, message: str, files: Sequence[str] = ()):
        super().__init__(message)
        self.files = list(files)


class DatasetError(CaxError, ValueError):
    """A dataset holds what cax cannot copy or checksum file by file (a symlink, a FIFO): a
    permanent error until a person changes the dataset."""

    retryable = False


class LeaseLostError(CaxError):
    """Another daemon took over work whose lease this daemon let expire; stop touching it."""


class UnsafeNameError(CaxError):
    """A run name or location from the runs DB would escape the site's data directories."""


class BatchError(CaxError):
    """The batch queue (local runner or SLURM) refused or lost a job."""


class BatchFullError(BatchError):
    """The batch queue holds ``max_jobs`` own jobs already: nothing failed, it is just full."""


class TapeError(CaxError):
    """The tape client (IBM TSM ``dsmc``) failed or reported failed objects."""


class AlreadyRunningError(CaxError):
    """Another cax daemon of the same site runs on this machine (it holds the instance lock)."""
