"""What a configuration that loads still needs from the machine: one code path for the daemon's
start-up and for ``cax config check``.

The static part (types, ranges, links between sites) is ``cax.config.load_config``.  The
checks here look at what only the machine can tell, each returning a ``Finding``: what was
looked at (``cax config check`` lists it on success) and one line per problem, naming the
site and the key.  ``startup_findings`` are the checks both run:

* the task list names known tasks;
* the data directories of this site, and of every ``local`` site, exist and are writable
  (cax never creates a site's top data directory: a typo must not become a new directory);
* the key and known_hosts files of the SSH sites exist and are readable, and their host
  names resolve;
* the commands this site's tasks run are there: the tape client (``dsmc`` with the site's
  ``tsm`` setup, after its init script), the SLURM commands of a ``slurm`` processing
  backend, ``ssh`` and ``rsync`` for the transfer methods that use them;
* the metrics file's directory is writable and the metrics port can be bound.

The daemon refuses to start (exit 2) on a mistake in what it was given -- a task list naming an
unknown task, a metrics file or port it cannot use -- and logs every other problem once, as a
warning, at start: a missing data directory, a peer's missing key or a missing tape client
fails the work that needs them, which then says so, and a dry run still shows what it would
do.  ``cax config check`` reports every problem (exit 2), and also asks the runs DB and, with
``network``, reaches every SSH site the way a copy does: the login works, ``remote_python``
runs and its data directories exist there.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from cax.config import Config, Site
from cax.errors import CaxError, ConfigError
from cax.runsdb import open_runsdb
from cax.runsdb.connect import redact
from cax.schema import TAPE_METHODS, TRANSFER_METHODS
from cax.tasks import Task, select_tasks
from cax.transport.base import open_transport
from cax.transport.pool import endpoint_for

DIR_KEYS = ("dir_raw", "dir_processed", "dir_tsm")
SSH_METHODS = tuple(m for m in TRANSFER_METHODS if m != "local")
#: The commands a transfer method runs on this machine (scp is paramiko: none).
METHOD_COMMANDS = {"rsync": ("rsync", "ssh"), "openssh": ("ssh",), "stream": ("ssh",),
                   "auto": ("rsync", "ssh")}


@dataclass(frozen=True)
class Finding:
    """One check: what it looked at, and one line per problem it found."""

    what: str
    checked: str
    problems: tuple[str, ...] = ()
    #: Whether the daemon refuses to start on these problems (else it logs them as warnings).
    blocks_start: bool = False


@dataclass(frozen=True)
class StartOptions:
    """The daemon's command-line options the checks look at."""

    metrics_file: str | None = None
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    #: ``--ncpu``: inside a batch job, processing runs here (no batch commands needed).
    ncpu: int | None = None


def select_site_tasks(config: Config) -> list[type[Task]]:
    """The tasks of this site; ConfigError naming the file, the site and the unknown task."""
    try:
        return select_tasks(config.tasks_wanted)
    except ConfigError as exc:
        where = f"site {config.site.name!r} key" if config.site.task_list is not None else "key"
        raise ConfigError([f"{config.path.name}: {where} 'task_list': "
                           f"{p.removeprefix('task_list: ')}" for p in exc.problems]) from None


def local_sites(config: Config) -> list[Site]:
    """The sites whose data directories are on this machine: this one and the ``local`` ones."""
    return [s for s in config.sites if s is config.site or s.method == "local"]


def _dirs(site: Site) -> Iterator[tuple[str, str]]:
    for key in DIR_KEYS:
        value = getattr(site, key)
        if value:
            yield key, value


def _dir_problem(path: str) -> str | None:
    if not os.path.exists(path):
        return f"{path} does not exist (cax does not create a site's data directory: create " \
               "it if the path is right)"
    if not os.path.isdir(path):
        return f"{path} is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable by this account (uid {os.getuid()})"
    return None


def directory_findings(config: Config) -> list[Finding]:
    """This site's data directories, then those of the other sites on this machine."""
    found = []
    for own in (True, False):
        sites = [s for s in local_sites(config) if (s is config.site) == own]
        looked, problems = [], []
        for site in sites:
            for key, path in _dirs(site):
                looked.append(f"{site.name} {key}")
                problem = _dir_problem(path)
                if problem:
                    problems.append(f"site {site.name!r} key {key!r}: {problem}")
        what = "this site's data directories" if own else "data directories of local sites"
        found.append(Finding(what, f"{', '.join(looked) or 'none'} (exist, writable)",
                             tuple(problems)))
    return found


def _file_problem(path: str) -> str | None:
    if not os.path.exists(path):
        return f"{path} is missing"
    if not os.path.isfile(path):
        return f"{path} is not a file"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable by this account (uid {os.getuid()})"
    return None


def ssh_sites(config: Config) -> list[Site]:
    return [s for s in config.sites if s.method in SSH_METHODS and s is not config.site]


def key_file_finding(config: Config) -> Finding:
    """Key files and known_hosts files of the SSH sites that are missing or unreadable."""
    problems = []
    for site in ssh_sites(config):
        if site.key_file:
            problem = _file_problem(site.key_file)
            if problem:
                problems.append(f"site {site.name!r} key 'key_file': {problem}")
        known = site.known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        problem = _file_problem(known)
        if problem and not (site.accept_new_host_keys and not os.path.exists(known)):
            key = "known_hosts" if site.known_hosts else "known_hosts (default)"
            problems.append(f"site {site.name!r} key {key!r}: {problem}")
    names = ", ".join(s.name for s in ssh_sites(config)) or "no SSH sites"
    return Finding("SSH key and known_hosts files", names, tuple(problems))


def name_finding(config: Config) -> Finding:
    """The host names of the SSH sites resolve (a typo would otherwise fail every copy)."""
    problems, looked = [], []
    for site in ssh_sites(config):
        if not site.hostname:
            continue
        looked.append(site.hostname)
        try:
            socket.getaddrinfo(site.hostname, site.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            problems.append(f"site {site.name!r} key 'hostname': {site.hostname} does not "
                            f"resolve ({reason}); every copy to or from the site fails "
                            "until it does")
    return Finding("host names", ", ".join(looked) or "none", tuple(problems))


def _peers(config: Config) -> list[Site]:
    names = dict.fromkeys((*config.site.upload_options, *config.site.download_options))
    return [config.get_site(n) for n in names]


def tape_finding(config: Config, tasks: list[type[Task]]) -> Finding:
    """The tape client of every tape site this site backs up to or restores from."""
    from cax.tape.dsmc import Dsmc, TsmSetup

    tapes = [s for s in _peers(config) if s.method in TAPE_METHODS]
    if not tapes or not {"TapeUpload", "TapeRestore"} & {t.name for t in tasks}:
        return Finding("tape client", "not used by this site's tasks")
    looked, problems = [], []
    for site in tapes:
        setup = TsmSetup.of(site.tsm)
        try:
            path = Dsmc(setup).environment().get("PATH")
        except CaxError as exc:
            problems.append(f"site {site.name!r} key 'tsm.init_script': {exc}")
            continue
        found = shutil.which(setup.dsmc, path=path)
        looked.append(f"{setup.dsmc} for {site.name} ({found or 'missing'})")
        if not found:
            problems.append(f"site {site.name!r} key 'tsm.dsmc': the tape client {setup.dsmc!r} "
                            "is not on PATH or not executable; tape work will fail")
    return Finding("tape client", ", ".join(looked) or "none", tuple(problems))


def command_finding(config: Config, tasks: list[type[Task]], ncpu: int | None) -> Finding:
    """The SLURM commands of a ``slurm`` processing backend, ``ssh``/``rsync`` of transfers."""
    wanted: dict[str, str] = {}
    processing = config.site.processing
    if processing is not None and processing.backend == "slurm" and ncpu is None \
            and "ProcessBatchQueue" in {t.name for t in tasks}:
        for name in ("sbatch", "squeue", "scancel"):
            wanted[name] = "processing.backend"
        if processing.accounting != "none":
            wanted["sacct"] = "processing.accounting"
    for peer in _peers(config):
        for name in METHOD_COMMANDS.get(peer.method, ()):
            wanted.setdefault(name, f"site {peer.name!r} method {peer.method}")
    problems = [f"site {config.site.name!r}: {name} (for {why}) is not on PATH"
                for name, why in wanted.items() if not shutil.which(name)]
    return Finding("commands", ", ".join(wanted) or "none needed", tuple(problems))


def metrics_finding(options: StartOptions) -> Finding:
    """The metrics file's directory is writable; the metrics port can be bound."""
    looked, problems = [], []
    if options.metrics_file:
        folder = os.path.dirname(os.path.abspath(options.metrics_file))
        looked.append(f"{options.metrics_file} (directory writable)")
        if not os.path.isdir(folder):
            problems.append(f"--metrics-file: directory {folder} does not exist")
        elif not os.access(folder, os.W_OK | os.X_OK):
            problems.append(f"--metrics-file: directory {folder} is not writable by this "
                            f"account (uid {os.getuid()})")
    if options.metrics_port is not None:
        looked.append(f"{options.metrics_bind}:{options.metrics_port} (free)")
        problem = bind_problem(options.metrics_bind, options.metrics_port)
        if problem:
            problems.append(f"--metrics-port: {problem}")
    return Finding("metrics", ", ".join(looked) or "none asked for", tuple(problems),
                   blocks_start=True)


def bind_problem(address: str, port: int) -> str | None:
    """Why ``address:port`` cannot be listened on (None: it can); the test socket is closed."""
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        return f"cannot listen on {address}:{port}: {getattr(exc, 'strerror', None) or exc}"
    family, kind, proto, _, where = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(where)
        except OSError as exc:
            return f"cannot listen on {address}:{port}: {exc.strerror or exc}"
    return None


def startup_findings(config: Config, options: StartOptions | None = None) -> list[Finding]:
    """Every check the daemon runs at start-up (and ``cax config check`` too).

    Raises ConfigError for a task list naming an unknown task (nothing else can be checked
    without knowing the tasks).
    """
    options = options or StartOptions()
    tasks = select_site_tasks(config)
    return [Finding("tasks", f"{len(tasks)} ({', '.join(t.name for t in tasks)})"),
            *directory_findings(config), key_file_finding(config), name_finding(config),
            tape_finding(config, tasks), command_finding(config, tasks, options.ncpu),
            metrics_finding(options)]


def runsdb_finding(config: Config) -> Finding:
    """Whether the runs DB answers (read-only: the check writes nothing)."""
    uri = config.runs_db or ""
    shown = redact(uri)
    try:
        db = open_runsdb(uri, config.runs_db_name, config.runs_collection, read_only=True)
    except CaxError as exc:
        return Finding("runs DB", shown, (f"key 'runs_db' ({shown}): {exc}",))
    try:
        db.count_runs({"number": -1})
    except CaxError as exc:
        return Finding("runs DB", shown, (f"key 'runs_db' ({shown}): {exc}",))
    finally:
        db.close()
    return Finding("runs DB", f"{shown} (answers)")


def network_finding(config: Config) -> Finding:
    """Reach every SSH site as a copy would; its data directories must exist there."""
    problems = []
    for site in ssh_sites(config):
        try:
            with open_transport(endpoint_for(site), stall_timeout_s=site.stall_timeout) as t:
                for key, path in _dirs(site):
                    if key != "dir_tsm" and not t.exists(path):
                        problems.append(f"site {site.name!r} key {key!r}: {path} does not exist "
                                        "there (cax does not create it: create it if the path "
                                        "is right)")
        except (CaxError, OSError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            problems.append(f"site {site.name!r}: cannot reach it with {site.method}: "
                            f"{first[:200]}")
    names = ", ".join(s.name for s in ssh_sites(config)) or "no SSH sites"
    return Finding("SSH sites", f"{names} (login, remote_python, data directories)",
                   tuple(problems))


def check(config: Config, options: StartOptions | None = None, *,
          network: bool = False) -> list[Finding]:
    """Every check of ``cax config check``: the start-up's, the runs DB, the network."""
    findings = [*startup_findings(config, options), runsdb_finding(config)]
    if network:
        findings.append(network_finding(config))
    else:
        findings.append(Finding("SSH sites", "not reached (add --network)"))
    return findings
