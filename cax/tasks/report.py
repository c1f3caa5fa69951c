"""The report task: this daemon's heartbeat in the runs DB, written at the end of every pass.

Site admins and monitoring read ``cax_daemons`` to see that every daemon is alive, what its
last pass did and what went wrong, instead of grepping log files on every site.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import cax
from cax.tasks.base import Task

log = logging.getLogger(__name__)


class Report(Task):
    """Write the heartbeat document of this daemon (one per process)."""

    def heartbeat(self, pass_info: dict[str, Any]) -> None:
        """Record ``pass_info`` (pass number, times, per-task counts, last error)."""
        doc = {
            "site": self.site.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": cax.__version__,
            "updated": self.ctx.now(),
            **pass_info,
        }
        self.db.write_heartbeat(self.ctx.owner, doc)
        log.debug("heartbeat written for pass %s", pass_info.get("pass"))
