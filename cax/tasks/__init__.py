"""The tasks a cax daemon runs, in the order of one pass."""

from __future__ import annotations

import logging

from cax.errors import ConfigError
from cax.schema import ORIGINAL_TASKS
from cax.tasks.base import Context, Outcome, Task, run_task
from cax.tasks.checksum import AddChecksum, CompareChecksums
from cax.tasks.copy import CopyPull, CopyPush
from cax.tasks.filesystem import AddSize, SetPermission
from cax.tasks.process import ProcessBatchQueue
from cax.tasks.purge import BufferPurger, PurgeProcessed
from cax.tasks.repair import RetryBadChecksumTransfer
from cax.tasks.report import Report
from cax.tasks.scrub import Scrub
from cax.tasks.stalled import RetryStalledTransfer
from cax.tasks.tape import TapeRestore, TapeUpload

#: Every work task, in pass order.  Report always runs last and is not listed here.
#: New data is checksummed first so it can be pushed in the same pass; bad copies are found
#: and repaired before anything is copied from them; scrubbing comes after purging, so it
#: does not read data about to be deleted.  Tape work follows the copies, before purging.
TASKS: list[type[Task]] = [
    AddChecksum, CompareChecksums, RetryStalledTransfer, RetryBadChecksumTransfer,
    CopyPush, CopyPull, ProcessBatchQueue, TapeUpload, TapeRestore, SetPermission, AddSize,
    PurgeProcessed,
    BufferPurger, Scrub,
]


def select_tasks(wanted: tuple[str, ...] | None) -> list[type[Task]]:
    """Return the registered tasks named in ``wanted`` (all when None), in pass order."""
    if wanted is None:
        return list(TASKS)
    known = {t.name for t in TASKS}
    original = [name for name in wanted if name not in known and name in ORIGINAL_TASKS]
    if original:
        logging.getLogger(__name__).info(
            "task_list: ignoring task %s of the original cax (not in this release)",
            ", ".join(original))
    unknown = [name for name in wanted if name not in known and name not in ORIGINAL_TASKS]
    if unknown:
        raise ConfigError(f"task_list: unknown task {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(t.name for t in TASKS)})")
    # A task also runs under the original's name for its step (tape: CopyPush, CopyPull).
    return [t for t in TASKS
            if t.name in wanted or set(getattr(t, "aliases", ())) & set(wanted)]


__all__ = ["TASKS", "Context", "Outcome", "Report", "Task", "run_task", "select_tasks"]
