"""Load and validate cax.json into frozen dataclasses.

Validation happens once, at start-up, before anything is written anywhere, and reports every
problem at once (one line each, naming the file, the site and the key), as borgmatic does.
Two forms are accepted: the original's JSON list of site sections, and an object with
``sites`` plus top-level options.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import posixpath
import re
import socket
import string
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cax.errors import ConfigError
from cax.schema import (
    DATA_TYPES,
    LEGACY_KEY_PREFIXES,
    LEGACY_METHODS,
    LEGACY_SITE_KEYS,
    ORIGINAL_MASTERS,
    PROCESSING_KEYS,
    PROCESSING_PLACEHOLDERS,
    SITE_KEYS,
    TAPE_METHODS,
    TOP_KEYS,
    Key,
)
from cax.tape.dsmc import setup_problems

MAX_CONFIG_BYTES = 1 << 20
"""A cax.json is a few kB; anything past 1 MiB is refused unread (no parse, nothing echoed)."""
SHOWN_CHARS = 40
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})
EMBEDDED_PREFIXES = ("embedded:", "file:")

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
OCTAL_MODE = re.compile(r"0?[0-7]{3,4}")
PERMISSION_KEYS = ("mode", "group", "acl_command")

_JSON_TYPES = {
    "str": str, "int": int, "bool": bool, "list": list, "dict": dict, "null": type(None),
}


@dataclass(frozen=True)
class Processing:
    """A site's ``processing`` section: the processor, its version, where its jobs run."""

    command: tuple[str, ...]
    version: str
    pax_hash: str
    prefix: str
    suffix: str
    required_fields: tuple[str, ...]
    backend: str
    max_jobs: int
    timeout: float
    ncpus: int
    mem_per_cpu: int
    partition: str | None
    qos: str | None
    reservation: str | None
    account: str | None
    accounting: str
    jobs_dir: str
    python: str | None
    validate: tuple[str, ...] | None = None
    validate_timeout: float = 3600.0
    allow_empty: bool = False


@dataclass(frozen=True)
class Site:
    """One site section of cax.json; field names are the config keys."""

    name: str
    method: str
    hostname: str | None
    username: str | None
    port: int
    key_file: str | None
    known_hosts: str | None
    accept_new_host_keys: bool
    remote_python: str
    streams: int | None
    dir_raw: str | None
    dir_processed: str | None
    dir_tsm: str | None
    tsm: Mapping[str, Any] | None
    legacy_dirs: tuple[str, ...]
    data_type: tuple[str, ...]
    upload_options: tuple[str, ...]
    download_options: tuple[str, ...]
    processor_version: str | None
    max_transfers: int
    max_attempts: int
    retry_backoff: float
    stall_timeout: float
    purge: float | None
    reference_for: tuple[str, ...]
    reference_priority: int
    min_copies: int
    purge_free_below: float | None
    pax_version_purge: str | None
    permissions: Mapping[str, Any] | None
    scrub_bytes_per_pass: int
    scrub_after_days: float
    processing: Processing | None
    task_list: tuple[str, ...] | None
    dataset_list: tuple[str, ...] | None

    @property
    def runs_daemon(self) -> bool:
        """Whether a cax daemon works at this site (tape and grid endpoints have none)."""
        return self.method not in (*TAPE_METHODS, *LEGACY_METHODS)

    def data_dir(self, data_type: str) -> str | None:
        """Return the base directory of ``data_type`` at this site, or None."""
        return self.dir_raw if data_type == "raw" else self.dir_processed

    def data_dirs(self) -> dict[str, str]:
        """Return every directory cax writes or reads at this site, by the key naming it."""
        named = {"dir_raw": self.dir_raw, "dir_processed": self.dir_processed,
                 "dir_tsm": self.dir_tsm}
        named.update({f"legacy_dirs[{i}]": d for i, d in enumerate(self.legacy_dirs)})
        return {key: d for key, d in named.items() if d}

    @property
    def machine(self) -> str:
        """The host name at which this site's directories live (loopback names are one)."""
        if self.method == "local" or not self.hostname:
            return "localhost"
        name = self.hostname.lower().rstrip(".")
        return "localhost" if name in LOOPBACK else name


@dataclass(frozen=True)
class Config:
    """The whole validated configuration; ``site`` is the site this daemon works for."""

    path: Path
    sites: tuple[Site, ...]
    site: Site
    runs_db: str | None
    runs_db_name: str
    runs_collection: str
    sleep_seconds: float
    lease_seconds: float
    task_list: tuple[str, ...] | None
    dataset_list: tuple[str, ...] | None
    processor_version: str | None = None
    legacy_checksums: bool = False
    #: Lines to log once at start (ignored legacy keys), after logging is set up.
    notes: tuple[str, ...] = ()

    def get_site(self, name: str) -> Site:
        """Return the site called ``name``; raises ConfigError naming the known sites."""
        for site in self.sites:
            if site.name == name:
                return site
        raise ConfigError(f"{self.path.name}: unknown site {name!r} (known: {self.site_names})")

    @property
    def site_names(self) -> str:
        return ", ".join(s.name for s in self.sites)

    @property
    def tasks_wanted(self) -> tuple[str, ...] | None:
        """The task list in force: the site's own, else the top-level one, else None (all)."""
        return self.site.task_list if self.site.task_list is not None else self.task_list

    @property
    def datasets_wanted(self) -> tuple[str, ...] | None:
        return self.site.dataset_list if self.site.dataset_list is not None else self.dataset_list

    def version_of(self, site: Site) -> str | None:
        """The processed version ``site`` handles: its own, else the top-level default.

        None means "every version offered": a site copying processed data without a version
        copies each version another site holds (the original took the installed pax's).
        """
        processing = getattr(site, "processing", None)  # the processing section, when present
        if isinstance(processing, Mapping) and isinstance(processing.get("version"), str):
            return processing["version"]
        return site.processor_version or self.processor_version

    def reference_sites(self, data_type: str, exclude: str | None = None) -> list[Site]:
        """Return the sites whose copies of ``data_type`` others are compared with, best first.

        Explicit ``reference_for`` wins; without any, the original's master sites (its
        hard-coded table) when the configuration has them, else the sites that receive
        ``data_type`` first hand: for raw, sites that pull raw data from nobody (the DAQ
        writes there); for processed, sites with a processing version. Ordered by
        ``reference_priority``, then by name: never by position in the file. ``exclude``
        (usually this site) is left out, so a copy is never compared with itself.
        """
        chosen = [s for s in self.sites if data_type in s.reference_for]
        if not chosen:
            by_name = {s.name: s for s in self.sites}
            chosen = [by_name[n] for n in ORIGINAL_MASTERS.get(data_type, ()) if n in by_name]
            if chosen:
                rank = {s.name: i for i, s in enumerate(chosen)}
                chosen.sort(key=lambda s: (s.reference_priority, rank[s.name]))
                return [s for s in chosen if s.name != exclude]
            chosen = [s for s in self.sites if self._first_hand(s, data_type)]
        chosen.sort(key=lambda s: (s.reference_priority, s.name))
        return [s for s in chosen if s.name != exclude]

    def _first_hand(self, site: Site, data_type: str) -> bool:
        if data_type not in site.data_type or not site.data_dir(data_type):
            return False
        if data_type == "raw":
            return not site.download_options
        return self.version_of(site) is not None

    def silent_noops(self) -> list[str]:
        """Lines to warn once per pass: settings under which this daemon quietly does nothing."""
        lines = []
        site = self.site
        if site.runs_daemon and not site.data_type and (site.upload_options
                                                        or site.download_options):
            lines.append(f"site {site.name}: no 'data_type' set, so nothing is copied; set "
                         "\"data_type\": [\"raw\"] (or [\"raw\", \"processed\"]) in its section")
        if "processed" in site.data_type and self.version_of(site) is None:
            lines.append(f"site {site.name}: processed data are not copied: no version named; "
                         "set 'processor_version' in its section or at the top level")
        for name in site.upload_options:
            other = next((s for s in self.sites if s.name == name), None)
            if other is not None and other.method in LEGACY_METHODS:
                lines.append(f"site {site.name}: pushes to {name} (method {other.method}) are "
                             "skipped: cax cannot drive that method; remove it from "
                             "'upload_options' or use the original's tools for it")
        return lines


def short_hostname() -> str:
    """Return this machine's host name without its domain, as the original cax did."""
    return socket.gethostname().split(".", 1)[0]


def load_config(path: str | os.PathLike, host: str | None = None,
                runs_db: str | None = None) -> Config:
    """Read, validate and return the configuration at ``path`` for site ``host``.

    ``host`` defaults to $CAX_HOST, then $HOSTNAME when it names a configured site (the
    original's batch scripts set it), then the short host name.  The runs DB is ``runs_db``
    (``--runs-db``), else $CAX_RUNS_DB, else the file's ``runs_db``; with none cax refuses to
    start rather than work on a new, empty store.  Raises ConfigError listing every problem.
    """
    path = Path(path)
    label = path.name
    raw = _read_json(path, label)
    if isinstance(raw, list):
        raw = {"sites": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a list of sites or an object with 'sites'")

    problems: list[str] = []
    notes: list[str] = []
    top = _check_section(raw, TOP_KEYS, (), f"{label}:", problems, notes)
    sites = []
    for i, section in enumerate(top["sites"] or []):
        if not isinstance(section, dict):
            problems.append(f"{label}: sites[{i}]: expected an object, got {_show(section)}")
            continue
        name = section.get("name")
        where = (f"{label}: site {name!r}" if isinstance(name, str) and len(name) < 100
                 and SAFE_NAME.match(name) else f"{label}: sites[{i}]")
        values = _check_section(section, SITE_KEYS, LEGACY_SITE_KEYS, where, problems, notes)
        _check_permissions(values.get("permissions"), where, problems)
        problems.extend(f"{where} key 'tsm{p}" for p in setup_problems(values.get("tsm")))
        values["processing"] = _check_processing(values.get("processing"), name, where, path,
                                                 problems)
        if values.get("name") is not None and not SAFE_NAME.match(values["name"]):
            problems.append(f"{where} key 'name': {_short(values['name'])!r} is not a safe site "
                            "name")
        _check_site(values, where, problems)
        sites.append(values)
    if top["sites"] == []:
        problems.append(f"{label}: key 'sites': no sites configured")
    _check_site_links(sites, label, problems)
    _check_overlaps(sites, label, problems)
    if problems:
        raise ConfigError(problems)

    site_objs = tuple(_make_site(values) for values in sites)
    names = [s.name for s in site_objs]
    host = host or os.environ.get("CAX_HOST") or _hostname_site(names) or short_hostname()
    if host not in names:
        raise ConfigError(
            f"{label}: this site is {_short(host)!r}, which is not a site in the configuration "
            f"(known: {_short(', '.join(names) or 'none', 200)}); choose one with --host")
    return Config(
        path=path.resolve(),
        sites=site_objs,
        site=site_objs[names.index(host)],
        runs_db=_choose_runs_db(runs_db, top["runs_db"], path, label),
        runs_db_name=top["runs_db_name"],
        runs_collection=top["runs_collection"],
        sleep_seconds=float(top["sleep_seconds"]),
        lease_seconds=float(top["lease_seconds"]),
        task_list=_tuple(top["task_list"]),
        dataset_list=_tuple(top["dataset_list"]),
        processor_version=top["processor_version"],
        legacy_checksums=bool(top["legacy_checksums"]
                              or os.environ.get("CAX_LEGACY_CHECKSUMS") == "1"),
        notes=tuple(dict.fromkeys(notes)),
    )


def _read_json(path: Path, label: str) -> Any:
    """Return the parsed JSON at ``path``; one short ConfigError line for anything unreadable.

    Never echoes the file's bytes: a wrong file (a binary, a log) must not flood the terminal.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{label}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a cax.json")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not UTF-8 text (byte {exc.start}); save it as UTF-8 "
                          "JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{label}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise ConfigError(f"{label}: nested too deeply to be a cax.json") from None
    except ValueError as exc:  # e.g. an integer literal with thousands of digits
        raise ConfigError(f"{label}: invalid JSON: {_short(str(exc), 80)}") from None


def _hostname_site(names: list[str]) -> str | None:
    """$HOSTNAME when it names a configured site: the original's batch jobs chose sites so."""
    value = os.environ.get("HOSTNAME")
    return value if value in names else None


def _choose_runs_db(option: str | None, key: str | None, config_path: Path,
                    label: str) -> str:
    """Pick the runs DB: --runs-db, then $CAX_RUNS_DB, then the file's ``runs_db``.

    An embedded store is used only when asked for (``embedded:PATH``, ``file:PATH`` or a plain
    path): a production daemon must never fall back to a new, empty store on its own.
    """
    for value, base in ((option, Path.cwd()), (os.environ.get("CAX_RUNS_DB"), Path.cwd()),
                        (key, config_path.resolve().parent)):
        if value:
            return _resolve_runs_db(value, base)
    raise ConfigError(f"{label}: no runs DB configured: give --runs-db, set CAX_RUNS_DB, or "
                      "set 'runs_db' in the object form (embedded:PATH for the embedded store)")


def _resolve_runs_db(value: str, base: Path) -> str:
    """Return ``value`` as a connect URI; a relative embedded path is relative to ``base``."""
    if value.startswith(("mongodb://", "mongodb+srv://")):
        return value
    for prefix in EMBEDDED_PREFIXES:
        if value.startswith(prefix):
            value = value[len(prefix):]
            break
    else:
        if "://" in value:
            return value  # connect refuses it with the accepted forms
    return "file:" + str((base / value).resolve())


def _tuple(value: list | None) -> tuple | None:
    return None if value is None else tuple(value)


def _check_processing(value: Any, site: Any, where: str, config_path: Path,
                      problems: list[str]) -> Processing | None:
    """Validate a site's ``processing`` section; return it (None if absent or invalid)."""
    if not isinstance(value, dict):
        return None  # null, or a wrong type already reported
    at = f"{where} key 'processing'"
    found = len(problems)
    values = _check_section(value, PROCESSING_KEYS, (), at, problems, [])
    command = values.get("command")
    for name, argv in (("command", command), ("validate", values.get("validate"))):
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            continue
        fields_used = set()
        for arg in argv:
            try:
                fields_used |= {f for _, f, _, _ in string.Formatter().parse(arg) if f is not None}
            except ValueError as exc:
                problems.append(f"{at}.{name}: {arg!r}: {exc}")
        unknown = sorted(fields_used - set(PROCESSING_PLACEHOLDERS))
        if unknown:
            problems.append(f"{at}.{name}: unknown placeholder(s) {', '.join(unknown)} "
                            f"(known: {', '.join(PROCESSING_PLACEHOLDERS)})")
        if not argv:
            problems.append(f"{at}.{name}: empty")
        elif "output" not in fields_used:
            what = "where the processor writes" if name == "command" else "what it checks"
            problems.append(f"{at}.{name}: must name {{output}}, {what}")
    if len(problems) > found:
        return None
    jobs_dir = values["jobs_dir"] or str(config_path.resolve().parent / "cax-jobs" / str(site))
    return Processing(**{**values, "jobs_dir": jobs_dir, "command": tuple(command),
                         "required_fields": tuple(values["required_fields"]),
                         "timeout": float(values["timeout"]),
                         "validate": _tuple(values["validate"]),
                         "validate_timeout": float(values["validate_timeout"])})


def _make_site(values: dict[str, Any]) -> Site:
    kwargs = {}
    for f in fields(Site):
        value = values[f.name]
        if isinstance(value, list):
            value = tuple(value)
        if f.name in ("upload_options", "download_options", "data_type") and value is None:
            value = ()
        kwargs[f.name] = value
    if kwargs["processing"] and not kwargs["processor_version"]:
        kwargs["processor_version"] = kwargs["processing"].version  # the version it makes
    return Site(**kwargs)


def _short(text: str, limit: int = SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _show(value: Any) -> str:
    """Return ``value`` as short JSON for a message: never more than SHOWN_CHARS characters."""
    if isinstance(value, (dict, list)):
        value = value if len(value) <= 8 else type(value)()  # no deep or long walk
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError, TypeError):
        text = f"a {type(value).__name__}"
    return _short(text)


def _type_ok(value: Any, types: tuple[str, ...]) -> bool:
    for t in types:
        if t == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t not in ("number", "int") and isinstance(value, _JSON_TYPES[t]):
            return True
    return False


def _check_value(key: Key, value: Any, where: str, problems: list[str]) -> bool:
    """Append a line to ``problems`` for each way ``value`` breaks ``key``'s rules.

    Returns whether the value is valid (an invalid one is replaced by the default, so later
    cross-checks never see a value of the wrong type).
    """
    at = f"{where} key {key.name!r}"
    before = len(problems)
    if not _type_ok(value, key.types):
        wanted = " or ".join(key.types).replace("str", "a string").replace("dict", "an object")
        problems.append(f"{at}: expected {wanted}, got {_show(value)}")
        return False
    if value is None:
        return True
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{at}: must be a finite number, got {_show(value)}")
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if key.minimum is not None and value < key.minimum:
            problems.append(f"{at}: must be at least {key.minimum:g}, got {_show(value)}")
        elif key.maximum is not None and value > key.maximum:
            problems.append(f"{at}: must be at most {key.maximum:g}, got {_show(value)}")
    elements = value if isinstance(value, list) else [value]
    for element in elements:
        if key.items and isinstance(value, list) and not _type_ok(element, (key.items,)):
            problems.append(f"{at}: expected a list of {key.items}, found {_show(element)}")
        elif key.choices and isinstance(element, str) and element not in key.choices:
            problems.append(f"{at}: {_short(element)!r} is not one of {', '.join(key.choices)}")
        elif key.absolute_path and isinstance(element, str):
            _check_path(element, at, problems)
    return len(problems) == before


def _check_path(value: str, at: str, problems: list[str]) -> None:
    if not value.startswith("/"):
        problems.append(f"{at}: must be an absolute path, got {_show(value)}")
    elif ".." in value.split("/"):
        problems.append(f"{at}: must not contain '..', got {_show(value)}")
    elif "\0" in value:
        problems.append(f"{at}: must not contain a NUL character")


def _normal_path(value: Any) -> Any:
    """``/data//raw/`` -> ``/data/raw``: every path from cax.json in one spelling."""
    if isinstance(value, str) and value.startswith("/"):
        norm = posixpath.normpath(value)
        return "/" + norm.lstrip("/")  # normpath keeps a leading '//'
    return value


def _is_legacy_key(name: str) -> bool:
    return name in LEGACY_SITE_KEYS or name.startswith(LEGACY_KEY_PREFIXES)


def _check_section(section: dict, keys: tuple[Key, ...], ignored: tuple[str, ...], where: str,
                   problems: list[str], notes: list[str]) -> dict[str, Any]:
    """Validate one JSON object against ``keys``; return its values with defaults filled in."""
    known = {k.name: k for k in keys}
    values: dict[str, Any] = {}
    for name in section:
        if name in known:
            continue
        if ignored and _is_legacy_key(name):
            notes.append(f"{where.rstrip(':')}: ignoring key {name!r} of the original cax "
                         "(not used by this release)")
            continue
        hint = difflib.get_close_matches(name, list(known), n=1) if len(name) < 100 else []
        maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
        problems.append(f"{where}: unknown key {_short(name)!r}{maybe}")
    for key in keys:
        if key.name not in section:
            if key.required:
                problems.append(f"{where}: missing required key {key.name!r}")
            values[key.name] = key.default
            continue
        value = section[key.name]
        if _check_value(key, value, where, problems):
            if key.absolute_path:
                value = ([_normal_path(v) for v in value] if isinstance(value, list)
                         else _normal_path(value))
            values[key.name] = value
        else:
            values[key.name] = key.default
    return values


def _check_permissions(value: Any, where: str, problems: list[str]) -> None:
    """Check a site's ``permissions``: {data type: {mode, group, acl_command}}."""
    if not isinstance(value, dict):
        return  # null, or a wrong type already reported
    for data_type, settings in value.items():
        at = f"{where} key 'permissions.{data_type}"
        if data_type not in DATA_TYPES:
            problems.append(f"{at}': unknown data type (known: {', '.join(DATA_TYPES)})")
        elif not isinstance(settings, dict) or not settings:
            problems.append(f"{at}': expected an object with mode, group or acl_command, "
                            f"got {_show(settings)}")
        else:
            problems.extend(f"{at}{problem}" for problem in _permission_problems(settings))


def _permission_problems(settings: dict[str, Any]) -> list[str]:
    problems = [f"': unknown key {name!r} (known: {', '.join(PERMISSION_KEYS)})"
                for name in settings if name not in PERMISSION_KEYS]
    mode, group, command = (settings.get(k) for k in PERMISSION_KEYS)
    if "mode" in settings and not (isinstance(mode, str) and OCTAL_MODE.fullmatch(mode)):
        problems.append(f".mode': expected an octal string such as \"0750\", got {_show(mode)}")
    if "group" in settings and not (isinstance(group, str) and group):
        problems.append(f".group': expected a group name, got {_show(group)}")
    if "acl_command" in settings and not (
            isinstance(command, list) and command and all(isinstance(a, str) for a in command)
            and any("{path}" in a for a in command)):
        problems.append(".acl_command': expected a list of strings with a \"{path}\" "
                        f"argument, got {_show(command)}")
    return problems


SSH_ONLY_KEYS = ("key_file", "known_hosts", "username")


def _check_site(values: dict[str, Any], where: str, problems: list[str]) -> None:
    """Checks within one site: each data type has its directory; no SSH keys on a local site."""
    for data_type in values.get("data_type") or []:
        key = "dir_raw" if data_type == "raw" else "dir_processed"
        if data_type in DATA_TYPES and not values.get(key):
            problems.append(f"{where} key 'data_type': {data_type!r} needs {key!r}, which is "
                            "not set")
    if values.get("method") == "local":
        for key in SSH_ONLY_KEYS:
            if values.get(key):
                problems.append(f"{where} key {key!r}: a local site is not reached by SSH; "
                                "remove it or change 'method'")


def _check_overlaps(sites: list[dict], label: str, problems: list[str]) -> None:
    """Refuse data directories that are the same or nested, across sites on one host.

    Two such sites would see each other's data as their own: a push would remove its own
    source as leftovers at the destination.
    """
    placed = []
    for values in sites:
        name = values.get("name")
        if not isinstance(name, str):
            continue
        method, hostname = values.get("method"), values.get("hostname")
        machine = ("localhost" if method == "local" or not hostname
                   else hostname.lower().rstrip("."))
        machine = "localhost" if machine in LOOPBACK else machine
        for key in ("dir_raw", "dir_processed", "dir_tsm"):
            if values.get(key):
                placed.append((machine, name, key, values[key]))
        for i, directory in enumerate(values.get("legacy_dirs") or []):
            placed.append((machine, name, f"legacy_dirs[{i}]", directory))
    reported = set()
    for i, (machine, site, key, directory) in enumerate(placed):
        for other_machine, other, other_key, other_dir in placed[i + 1:]:
            if other == site or other_machine != machine or (site, other) in reported:
                continue
            if _nested(directory, other_dir):
                reported.add((site, other))
                problems.append(
                    f"{label}: sites {site!r} and {other!r} share data directories on "
                    f"{_short(machine)}: {key} {_short(directory, 60)} and {other_key} "
                    f"{_short(other_dir, 60)} (each site needs its own)")


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _check_site_links(sites: list[dict], label: str, problems: list[str]) -> None:
    """Cross-site checks: unique names, and upload/download options that name real sites."""
    names = [s.get("name") for s in sites if isinstance(s.get("name"), str)]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{label}: site {_short(name)!r}: duplicate site name")
    for site in sites:
        for option in ("upload_options", "download_options"):
            targets = site.get(option)
            if not isinstance(targets, list):
                continue
            for target in targets:
                if isinstance(target, str) and target not in names:
                    problems.append(
                        f"{label}: site {site.get('name')!r} key {option!r}: unknown site "
                        f"{_short(target)!r} (known: "
                        f"{_short(', '.join(dict.fromkeys(names)), 200)})")
                elif target == site.get("name"):
                    problems.append(
                        f"{label}: site {target!r} key {option!r}: a site cannot copy to itself")
