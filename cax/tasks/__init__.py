"""The tasks a cax daemon runs, in the order of one pass."""

from __future__ import annotations

from cax.errors import ConfigError
from cax.tasks.base import Context, Outcome, Task, run_task
from cax.tasks.copy import CopyPull, CopyPush
from cax.tasks.filesystem import AddSize, SetPermission
from cax.tasks.purge import BufferPurger, PurgeProcessed
from cax.tasks.report import Report

#: Every work task, in pass order.  Report always runs last and is not listed here.
TASKS: list[type[Task]] = [CopyPush, CopyPull, SetPermission, AddSize, PurgeProcessed,
                           BufferPurger]


def select_tasks(wanted: tuple[str, ...] | None) -> list[type[Task]]:
    """Return the registered tasks named in ``wanted`` (all when None), in pass order."""
    if wanted is None:
        return list(TASKS)
    known = {t.name for t in TASKS}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ConfigError(f"task_list: unknown task {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(t.name for t in TASKS)})")
    return [t for t in TASKS if t.name in wanted]


__all__ = ["TASKS", "Context", "Outcome", "Report", "Task", "run_task", "select_tasks"]
