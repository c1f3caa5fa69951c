"""What every command of the command line shares: logging, exit codes, contexts.

The cli package is the only place that sets up logging, prints and exits.  ``guarded`` turns
the named errors of ``cax.errors`` into one line on stderr and an exit code (see
``cax.cli``'s docstring for the codes).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from cax.config import Config, Sites, load_config
from cax.errors import (
    AlreadyRunningError,
    CaxError,
    ConfigError,
    RunsDBError,
    UnsafeNameError,
)
from cax.logcontext import ContextFilter
from cax.runsdb import open_runsdb, safe_component
from cax.tasks import Context
from cax.workers import Background

log = logging.getLogger("cax")

EXIT_FAILED, EXIT_USAGE, EXIT_DB, EXIT_INTERNAL, EXIT_RUNNING = 1, 2, 3, 4, 5
#: The exit code of each error said in one line (the first that matches: CaxError last).
_ONE_LINE_ERRORS: tuple[tuple[type[CaxError], int], ...] = (
    (UnsafeNameError, EXIT_USAGE), (RunsDBError, EXIT_DB), (AlreadyRunningError, EXIT_RUNNING),
    (CaxError, EXIT_FAILED))
#: Run numbers are stored as 64-bit integers (BSON): a larger one cannot name a run.
MAX_RUN_NUMBER = 2 ** 63 - 1


class FiniteFloat(click.FloatRange):
    """A number within a range; NaN and the infinities are refused (FloatRange lets NaN by)."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


RUN_NUMBER = click.IntRange(0, MAX_RUN_NUMBER)
LOG_FORMAT = "%(asctime)sZ %(levelname)-7s %(ctx)s%(message)s"
FILE_FORMAT = "%(asctime)sZ %(levelname)-7s %(process)d %(name)s: %(ctx)s%(message)s"


#: ``--host SITE`` of the commands that act as one site (the daemon's says more).
host_option = click.option("--host", metavar="SITE", help="Act as this site [default: "
                           "$CAX_HOST, $HOSTNAME if it names a site, else the short host "
                           "name].")
#: ``--log LEVEL``, as every command spells it.
log_level_option = click.option(
    "--log", "log_level", default="info", show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))


def utc_formatter(fmt: str) -> logging.Formatter:
    """A log formatter of ``fmt`` whose times are UTC."""
    formatter = logging.Formatter(fmt, "%Y-%m-%d %H:%M:%S")
    formatter.converter = time.gmtime
    return formatter


def setup_logging(level: str, log_file: str | None) -> None:
    """Human-readable records on stderr, and in ``log_file`` too when given; times in UTC."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setFormatter(utc_formatter(LOG_FORMAT))
    if log_file:
        try:
            handlers.append(logging.FileHandler(log_file))
        except OSError as exc:
            raise ConfigError(f"--log-file {log_file}: cannot open it: "
                              f"{exc.strerror or exc}") from None
        handlers[1].setFormatter(utc_formatter(FILE_FORMAT))
    for handler in handlers:
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
    logging.getLogger("paramiko").setLevel(max(root.level, logging.WARNING))


def guarded(fn: Callable[..., int]) -> Callable[..., None]:
    """Run a command body; turn its errors into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs)
        except click.UsageError as exc:  # a refused combination of options: one line
            click.echo(f"cax: {exc.format_message()}", err=True)
            code = EXIT_USAGE
        except click.ClickException as exc:
            exc.show()
            code = exc.exit_code
        except click.Abort:
            click.echo("cax: aborted", err=True)
            code = EXIT_FAILED
        except OSError as exc:  # the machine's answer (a full disk, a permission): not a bug
            where = f": {exc.filename}" if exc.filename else ""
            click.echo(f"cax: {exc.strerror or exc}{where}", err=True)
            code = EXIT_FAILED
        except ConfigError as exc:
            for problem in exc.problems:
                click.echo(f"cax: {problem}", err=True)
            code = EXIT_USAGE
        except CaxError as exc:
            click.echo(f"cax: {exc}", err=True)
            code = next(c for kind, c in _ONE_LINE_ERRORS if isinstance(exc, kind))
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





@dataclass(frozen=True)
class Globals:
    """The options of ``cax`` given before a subcommand, which the subcommand acts on."""

    config_path: str
    host: str | None = None
    runs_db: str | None = None
    log_level: str = "info"
    log_file: str | None = None
    dry_run: bool = False
    metrics_file: str | None = None
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"

    def config(self) -> Config:
        """Load the configuration for this site, then set up logging."""
        config = load_config(self.config_path, self.host, self.runs_db)
        setup_logging(self.log_level, self.log_file)
        return config

    def command(self, sites: Sites, host: str | None) -> str:
        """How a printed command calls cax to act as ``host`` with the same configuration and
        runs DB: it must work when pasted into a shell.  Every value is quoted; the runs DB is
        named only when it was given with --runs-db (resolved, as the file's is), and never
        with a password, which then comes from $MONGODB_PASSWORD.
        """
        from cax.admin import cax_command

        words = [cax_command(), "--config", shlex.quote(str(sites.path))]
        if host:
            words += ["--host", shlex.quote(host)]
        if self.runs_db and sites.runs_db:
            uri = re.sub(r"^([a-z+]+://[^:/@]+):[^@]*@", r"\1@", sites.runs_db)
            words += ["--runs-db", shlex.quote(uri)]
        return " ".join(words)


def open_db(config: Sites, read_only: bool = False, create: bool = False) -> Any:
    """Open the runs DB of ``config`` (RunsDBError, exit 3, when it does not answer)."""
    return open_runsdb(config.runs_db, config.runs_db_name, config.runs_collection,
                       read_only=read_only, create=create)


def echo_json(value: Any) -> None:
    """Print a view as JSON: times in ISO 8601, anything else JSON cannot hold as text."""
    import json

    def plain(item: Any) -> Any:
        return item.isoformat() if hasattr(item, "isoformat") else str(item)

    click.echo(json.dumps(value, indent=1, default=plain))
