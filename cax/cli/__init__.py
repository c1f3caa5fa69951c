"""Command-line entry points.  The only package that sets up logging, prints and exits.

Exit codes: 0 success (also after a warm stop); 1 a task or item failed (``--once``); 2 usage
or configuration invalid; 3 runs DB unreachable at start; 4 internal error; 5 another daemon of
the same site runs on this machine; 128+N killed by a second signal N.

``root`` is the ``cax`` group and the daemon; ``runs``, ``views`` and ``admin`` add its
subcommands; ``tools`` holds the original's one-shot tools (cax-mv, cax-rm, cax-stray,
cax-status); ``massive_cax`` and ``massive_tsm`` drive batch processing and tape over many
runs; ``base`` is what they share.
"""

from __future__ import annotations

from cax.cli import admin, runs, views  # noqa: F401 - each adds its subcommands to ``cli``
from cax.cli.base import (
    EXIT_DB,
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_RUNNING,
    EXIT_USAGE,
    build_context,
    guarded,
    make_owner,
    run_selector,
    setup_logging,
)
from cax.cli.massive_cax import massive_cax
from cax.cli.massive_tsm import massive_tsm
from cax.cli.root import cli, main
from cax.cli.tools import cax_mv, cax_rm, cax_status, cax_stray

__all__ = ["EXIT_DB", "EXIT_FAILED", "EXIT_INTERNAL", "EXIT_RUNNING", "EXIT_USAGE",
           "build_context", "cax_mv", "cax_rm", "cax_status", "cax_stray", "cli", "guarded",
           "main", "make_owner", "massive_cax", "massive_tsm", "run_selector", "setup_logging"]
