"""Fill a site's processor command: each argument is formatted on its own, never joined into
a shell string, so a run name with spaces or quotes stays one argument."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from cax.config import Processing


def placeholders(processing: Processing, *, run: Mapping[str, Any], site: str, input: str,
                 output: str, ncpus: int | None = None) -> dict[str, str]:
    """Return the values of every placeholder a processing command may use."""
    return {
        "input": input, "output": output, "name": str(run.get("name", "")),
        "number": str(run.get("number", "")), "detector": str(run.get("detector", "")),
        "ncpus": str(ncpus or processing.ncpus), "version": processing.version, "site": site,
        "python": processing.python or sys.executable,
        "mem_per_cpu": str(processing.mem_per_cpu),
    }


def fill_command(processing: Processing, values: Mapping[str, str]) -> tuple[str, ...]:
    """Return the processor's argument list with the placeholders filled in."""
    return tuple(arg.format_map(values) for arg in processing.command)
