"""``cax config check``: what only the machine can tell about a configuration that loads.

The static part (types, ranges, links between sites) is ``cax.config.load_config``; this adds
the checks of the machine: the data directories of the sites on this machine (this site and
every ``local`` one) exist and are writable, the key and known_hosts files of the SSH sites
exist and are readable, and the runs DB answers.  With ``network`` each SSH site is reached
the way a copy reaches it: the login works, ``remote_python`` runs there and its data
directories exist.  Each problem is one line naming the site and the key.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from cax.config import Config, Site
from cax.errors import CaxError
from cax.runsdb import open_runsdb
from cax.runsdb.connect import redact
from cax.schema import TRANSFER_METHODS
from cax.transport.base import open_transport
from cax.transport.pool import endpoint_for

DIR_KEYS = ("dir_raw", "dir_processed", "dir_tsm")
SSH_METHODS = tuple(m for m in TRANSFER_METHODS if m != "local")


def _dirs(site: Site) -> Iterator[tuple[str, str]]:
    for key in DIR_KEYS:
        value = getattr(site, key)
        if value:
            yield key, value


def local_sites(config: Config) -> list[Site]:
    """The sites whose data directories are on this machine: this one and the ``local`` ones."""
    return [s for s in config.sites if s is config.site or s.method == "local"]


def directory_problems(config: Config) -> Iterator[str]:
    """Data directories of the sites on this machine that are missing or not writable."""
    for site in local_sites(config):
        for key, path in _dirs(site):
            where = f"site {site.name!r} key {key!r}"
            if not os.path.exists(path):
                yield f"{where}: {path} does not exist"
            elif not os.path.isdir(path):
                yield f"{where}: {path} is not a directory"
            elif not os.access(path, os.W_OK | os.X_OK):
                yield f"{where}: {path} is not writable by this account (uid {os.getuid()})"


def _file_problem(path: str) -> str | None:
    if not os.path.exists(path):
        return f"{path} is missing"
    if not os.path.isfile(path):
        return f"{path} is not a file"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable by this account (uid {os.getuid()})"
    return None


def file_problems(config: Config) -> Iterator[str]:
    """Key files and known_hosts files of the SSH sites that are missing or unreadable."""
    for site in config.sites:
        if site.method not in SSH_METHODS or site is config.site:
            continue
        if site.key_file:
            problem = _file_problem(site.key_file)
            if problem:
                yield f"site {site.name!r} key 'key_file': {problem}"
        known = site.known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        problem = _file_problem(known)
        if problem and not (site.accept_new_host_keys and not os.path.exists(known)):
            key = "known_hosts" if site.known_hosts else "known_hosts (default)"
            yield f"site {site.name!r} key {key!r}: {problem}"


def runsdb_problem(config: Config) -> str | None:
    """Whether the runs DB answers (read-only: the check writes nothing)."""
    uri = config.runs_db
    if uri and uri.startswith("file:") and not os.path.exists(uri[5:]):
        return None  # a new embedded store: created by the first daemon
    try:
        db = open_runsdb(uri, config.runs_db_name, config.runs_collection, read_only=True)
    except CaxError as exc:
        return f"key 'runs_db' ({redact(uri or 'file:cax-runsdb')}): {exc}"
    try:
        db.count_runs({"number": -1})
    except CaxError as exc:
        return f"key 'runs_db' ({redact(uri or 'file:cax-runsdb')}): {exc}"
    finally:
        db.close()
    return None


def network_problems(config: Config) -> Iterator[str]:
    """Reach every SSH site as a copy would; its data directories must exist there."""
    for site in config.sites:
        if site.method not in SSH_METHODS or site is config.site:
            continue
        try:
            with open_transport(endpoint_for(site), stall_timeout_s=site.stall_timeout) as t:
                for key, path in _dirs(site):
                    if key != "dir_tsm" and not t.exists(path):
                        yield f"site {site.name!r} key {key!r}: {path} does not exist there"
        except (CaxError, OSError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            yield f"site {site.name!r}: cannot reach it with {site.method}: {first[:200]}"


def check(config: Config, network: bool = False) -> list[str]:
    """Return one line per problem the machine shows (empty: all good)."""
    problems = [*directory_problems(config), *file_problems(config)]
    db = runsdb_problem(config)
    if db:
        problems.append(db)
    if network:
        problems += list(network_problems(config))
    return problems
