"""What every command of the command line shares: logging, exit codes, contexts.

The cli package is the only place that sets up logging, prints and exits.  ``guarded`` turns
the named errors of ``cax.errors`` into one line on stderr and an exit code (see
``cax.cli``'s docstring for the codes).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from cax.config import Config, load_config
from cax.errors import (
    AlreadyRunningError,
    CaxError,
    ConfigError,
    RunsDBError,
    UnsafeNameError,
)
from cax.logcontext import ContextFilter
from cax.runsdb import open_runsdb, safe_component
from cax.tasks import Context, select_tasks
from cax.workers import Background

log = logging.getLogger("cax")

EXIT_FAILED, EXIT_USAGE, EXIT_DB, EXIT_INTERNAL, EXIT_RUNNING = 1, 2, 3, 4, 5
LOG_FORMAT = "%(asctime)sZ %(levelname)-7s %(ctx)s%(message)s"
FILE_FORMAT = "%(asctime)sZ %(levelname)-7s %(process)d %(name)s: %(ctx)s%(message)s"


def setup_logging(level: str, log_file: str | None) -> None:
    """Human-readable records on stderr, and in ``log_file`` too when given; times in UTC."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
    if log_file:
        handlers.append(logging.FileHandler(log_file))
        handlers[1].setFormatter(logging.Formatter(FILE_FORMAT, "%Y-%m-%d %H:%M:%S"))
    for handler in handlers:
        handler.formatter.converter = time.gmtime
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
    logging.getLogger("paramiko").setLevel(max(root.level, logging.WARNING))


def guarded(fn: Callable[..., int]) -> Callable[..., None]:
    """Run a command body; turn its errors into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs)
        except ConfigError as exc:
            for problem in exc.problems:
                click.echo(f"cax: {problem}", err=True)
            code = EXIT_USAGE
        except UnsafeNameError as exc:
            click.echo(f"cax: {exc}", err=True)
            code = EXIT_USAGE
        except RunsDBError as exc:
            click.echo(f"cax: {exc}", err=True)
            code = EXIT_DB
        except AlreadyRunningError as exc:
            click.echo(f"cax: {exc}", err=True)
            code = EXIT_RUNNING
        except CaxError as exc:
            click.echo(f"cax: {exc}", err=True)
            code = EXIT_FAILED
        except Exception as exc:  # the one place that must not let anything out
            log.exception("internal error")
            click.echo(f"cax: internal error: {exc!r} (details in the log)", err=True)
            code = EXIT_INTERNAL
        sys.exit(code)

    return wrapper


def default_config_path() -> str:
    return os.environ.get("CAX_CONFIG", "cax.json")


def make_owner(site: str) -> str:
    """Identify this daemon process in leases and heartbeats: site@host:pid:start."""
    return f"{site}@{socket.gethostname()}:{os.getpid()}:{int(time.time())}"


def run_selector(run: int | None, name: str | None, datasets: tuple[str, ...] | None) -> dict:
    """Turn ``--run``/``--name``/``dataset_list`` into a runs-DB filter."""
    parts: list[dict[str, Any]] = []
    if run is not None:
        parts.append({"number": run})
    if name is not None:
        parts.append({"name": safe_component(name)})
    if datasets is not None:
        parts.append({"name": {"$in": list(datasets)}})
    return parts[0] if len(parts) == 1 else ({"$and": parts} if parts else {})


def terminal_line(text: str) -> None:
    """Redraw the one live progress line on stderr (a terminal only)."""
    width = shutil.get_terminal_size().columns - 1
    click.echo("\r\x1b[K" + text[:width], err=True, nl=False)


def tasks_of(config: Config) -> list:
    """The tasks of this site; an unknown name is reported with the file and the section."""
    try:
        return select_tasks(config.tasks_wanted)
    except ConfigError as exc:
        where = f"site {config.site.name!r} key" if config.site.task_list is not None else "key"
        raise ConfigError([f"{config.path.name}: {where} 'task_list': "
                           f"{p.removeprefix('task_list: ')}" for p in exc.problems]) from None


def build_context(config: Config, *, dry_run: bool = False, no_db_update: bool = False,
                  run: int | None = None, name: str | None = None,
                  once: bool = False) -> Context:
    """Connect to the runs DB and assemble what the tasks need for this site."""
    runsdb = open_runsdb(config.runs_db, config.runs_db_name, config.runs_collection,
                         read_only=dry_run or no_db_update)
    return Context(
        config=config,
        runsdb=runsdb,
        owner=make_owner(config.site.name),
        dry_run=dry_run,
        selector=run_selector(run, name, config.datasets_wanted),
        background=Background(config.site.max_transfers),
        once=once,
        console=terminal_line if sys.stderr.isatty() else None,
    )





def admin_config(obj: dict[str, Any]) -> Config:
    config = load_config(obj["config_path"], obj["host"])
    setup_logging(obj["log_level"], obj["log_file"])
    return config


def open_db(config: Config, read_only: bool = False, create: bool = False) -> Any:
    return open_runsdb(config.runs_db, config.runs_db_name, config.runs_collection,
                       read_only=read_only, create=create)


def echo_json(value: Any) -> None:
    import json

    def plain(item: Any) -> Any:
        return item.isoformat() if hasattr(item, "isoformat") else str(item)

    click.echo(json.dumps(value, indent=1, default=plain))


def retry_prefix(config: Config) -> str:
    """How the printed commands call cax: the name on PATH, else its full path, and the config."""
    from cax.admin import cax_command

    return f"{cax_command()} --config {config.path}"
