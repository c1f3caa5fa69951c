"""Load and validate cax.json into frozen dataclasses.

Validation happens once, at start-up, before anything is written anywhere, and reports every
problem at once (one line each, naming the file, the site and the key), as borgmatic does.
Two forms are accepted: the original's JSON list of site sections, and an object with
``sites`` plus top-level options.
"""

from __future__ import annotations

import difflib
import json
import os
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
    LEGACY_METHODS,
    LEGACY_SITE_KEYS,
    PROCESSING_KEYS,
    PROCESSING_PLACEHOLDERS,
    SITE_KEYS,
    TAPE_METHODS,
    TOP_KEYS,
    Key,
)
from cax.tape.dsmc import setup_problems

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
    dir_raw: str | None
    dir_processed: str | None
    dir_tsm: str | None
    tsm: Mapping[str, Any] | None
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


def short_hostname() -> str:
    """Return this machine's host name without its domain, as the original cax did."""
    return socket.gethostname().split(".", 1)[0]


def load_config(path: str | os.PathLike, host: str | None = None) -> Config:
    """Read, validate and return the configuration at ``path`` for site ``host``.

    ``host`` defaults to $CAX_HOST, then the short host name.  Raises ConfigError listing every
    problem found.
    """
    path = Path(path)
    label = path.name
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{label}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}") from None
    if isinstance(raw, list):
        raw = {"sites": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a list of sites or an object with 'sites'")

    problems: list[str] = []
    top = _check_section(raw, TOP_KEYS, (), f"{label}:", problems)
    sites = []
    for i, section in enumerate(raw.get("sites") or []):
        if not isinstance(section, dict):
            problems.append(f"{label}: sites[{i}]: expected an object, got {_show(section)}")
            continue
        name = section.get("name")
        where = f"{label}: site {name!r}" if isinstance(name, str) else f"{label}: sites[{i}]"
        values = _check_section(section, SITE_KEYS, LEGACY_SITE_KEYS, where, problems)
        _check_permissions(values.get("permissions"), where, problems)
        problems.extend(f"{where} key 'tsm{p}" for p in setup_problems(values.get("tsm")))
        values["processing"] = _check_processing(values.get("processing"), name, where, path,
                                                 problems)
        if "name" in values and not SAFE_NAME.match(values["name"]):
            problems.append(f"{where} key 'name': {values['name']!r} is not a safe site name")
        sites.append(values)
    _check_site_links(sites, label, problems)
    if problems:
        raise ConfigError(problems)

    site_objs = tuple(_make_site(values) for values in sites)
    names = [s.name for s in site_objs]
    host = host or os.environ.get("CAX_HOST") or short_hostname()
    if host not in names:
        raise ConfigError(
            f"{label}: this site is {host!r}, which is not a site in the configuration "
            f"(known: {', '.join(names) or 'none'}); choose one with --host")
    return Config(
        path=path.resolve(),
        sites=site_objs,
        site=site_objs[names.index(host)],
        runs_db=_resolve_runs_db(top["runs_db"], path),
        runs_db_name=top["runs_db_name"],
        runs_collection=top["runs_collection"],
        sleep_seconds=float(top["sleep_seconds"]),
        lease_seconds=float(top["lease_seconds"]),
        task_list=_tuple(top["task_list"]),
        dataset_list=_tuple(top["dataset_list"]),
    )


def _resolve_runs_db(value: str | None, config_path: Path) -> str | None:
    """Make a relative ``file:`` runs DB path relative to the config file, not the cwd."""
    if value and value.startswith("file:") and not Path(value[5:]).is_absolute():
        return "file:" + str((config_path.resolve().parent / value[5:]).resolve())
    return value


def _tuple(value: list | None) -> tuple | None:
    return None if value is None else tuple(value)


def _check_processing(value: Any, site: Any, where: str, config_path: Path,
                      problems: list[str]) -> Processing | None:
    """Validate a site's ``processing`` section; return it (None if absent or invalid)."""
    if not isinstance(value, dict):
        return None  # null, or a wrong type already reported
    at = f"{where} key 'processing'"
    found = len(problems)
    values = _check_section(value, PROCESSING_KEYS, (), at, problems)
    command = values.get("command")
    if isinstance(command, list) and all(isinstance(a, str) for a in command):
        fields_used = set()
        for arg in command:
            try:
                fields_used |= {f for _, f, _, _ in string.Formatter().parse(arg) if f is not None}
            except ValueError as exc:
                problems.append(f"{at}.command: {arg!r}: {exc}")
        unknown = sorted(fields_used - set(PROCESSING_PLACEHOLDERS))
        if unknown:
            problems.append(f"{at}.command: unknown placeholder(s) {', '.join(unknown)} "
                            f"(known: {', '.join(PROCESSING_PLACEHOLDERS)})")
        if not command:
            problems.append(f"{at}.command: empty")
        elif "output" not in fields_used:
            problems.append(f"{at}.command: must name {{output}}, where the processor writes")
    if len(problems) > found:
        return None
    jobs_dir = values["jobs_dir"] or str(config_path.resolve().parent / "cax-jobs" / str(site))
    return Processing(**{**values, "jobs_dir": jobs_dir, "command": tuple(command),
                         "required_fields": tuple(values["required_fields"]),
                         "timeout": float(values["timeout"])})


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


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_ok(value: Any, types: tuple[str, ...]) -> bool:
    for t in types:
        if t == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t not in ("number", "int") and isinstance(value, _JSON_TYPES[t]):
            return True
    return False


def _check_value(key: Key, value: Any, where: str, problems: list[str]) -> None:
    """Append a line to ``problems`` for each way ``value`` breaks ``key``'s rules."""
    at = f"{where} key {key.name!r}"
    if not _type_ok(value, key.types):
        wanted = " or ".join(key.types).replace("str", "a string").replace("dict", "an object")
        problems.append(f"{at}: expected {wanted}, got {_show(value)}")
        return
    if value is None:
        return
    if key.minimum is not None and not isinstance(value, (list, dict, str, bool)) \
            and value < key.minimum:
        problems.append(f"{at}: must be at least {key.minimum:g}, got {value}")
    elements = value if isinstance(value, list) else [value]
    for element in elements:
        if key.items and isinstance(value, list) and not _type_ok(element, (key.items,)):
            problems.append(f"{at}: expected a list of {key.items}, found {_show(element)}")
        elif key.choices and isinstance(element, str) and element not in key.choices:
            problems.append(f"{at}: {element!r} is not one of {', '.join(key.choices)}")
    if key.absolute_path and isinstance(value, str) and not value.startswith("/"):
        problems.append(f"{at}: must be an absolute path, got {value!r}")


def _check_section(section: dict, keys: tuple[Key, ...], ignored: tuple[str, ...], where: str,
                   problems: list[str]) -> dict[str, Any]:
    """Validate one JSON object against ``keys``; return its values with defaults filled in."""
    known = {k.name: k for k in keys}
    values: dict[str, Any] = {}
    for name in section:
        if name not in known and name not in ignored:
            hint = difflib.get_close_matches(name, list(known), n=1)
            maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"{where}: unknown key {name!r}{maybe}")
    for key in keys:
        if key.name not in section:
            if key.required:
                problems.append(f"{where}: missing required key {key.name!r}")
            else:
                values[key.name] = key.default
            continue
        _check_value(key, section[key.name], where, problems)
        values[key.name] = section[key.name]
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


def _check_site_links(sites: list[dict], label: str, problems: list[str]) -> None:
    """Cross-site checks: unique names, and upload/download options that name real sites."""
    names = [s.get("name") for s in sites if isinstance(s.get("name"), str)]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{label}: site {name!r}: duplicate site name")
    if not sites:
        problems.append(f"{label}: key 'sites': no sites configured")
    for site in sites:
        if "processed" in (site.get("data_type") or []) and not site.get("processor_version") \
                and not site.get("processing"):
            problems.append(f"{label}: site {site.get('name')!r} key 'processor_version': "
                            "required when data_type includes 'processed'")
        for option in ("upload_options", "download_options"):
            targets = site.get(option)
            if not isinstance(targets, list):
                continue
            for target in targets:
                if isinstance(target, str) and target not in names:
                    problems.append(
                        f"{label}: site {site.get('name')!r} key {option!r}: unknown site "
                        f"{target!r} (known: {', '.join(dict.fromkeys(names))})")
                elif target == site.get("name"):
                    problems.append(
                        f"{label}: site {target!r} key {option!r}: a site cannot copy to itself")
