"""The operator's side of cax: registering runs, status views, retries, machine checks.

Each module returns plain values and raises the named errors of ``cax.errors``; only
the ``cax.cli`` package prints them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys


def cax_command() -> str:
    """How a printed command should call cax: ``cax`` when that is on PATH, else a full path.

    A command that works only when copied into a shell with the right PATH is no help.
    """
    found = shutil.which("cax")
    if found:
        return "cax"
    beside = os.path.join(os.path.dirname(sys.executable), "cax")
    if os.access(beside, os.X_OK):
        return shlex.quote(beside)
    return f"{shlex.quote(sys.executable)} -m cax"
