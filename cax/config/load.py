"""Read cax.json: parse it, validate every key, choose this machine's site and the runs DB.

Validation happens once, at start-up, before anything is written anywhere, and reports every
problem at once (one line each, naming the file, the site and the key), as borgmatic does.
Two forms are accepted: the original's JSON list of site sections, and an object with
``sites`` plus top-level options.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cax.config.checks import (
    SAFE_NAME,
    check_overlaps,
    check_permissions,
    check_processing,
    check_section,
    check_site,
    check_site_links,
    short,
    show,
    tuple_or_none,
)
from cax.config.model import Config, Site, Sites, short_hostname
from cax.config.tsm import setup_problems
from cax.errors import ConfigError
from cax.schema import LEGACY_SITE_KEYS, SITE_KEYS, TOP_KEYS

MAX_CONFIG_BYTES = 1 << 20
"""A cax.json is a few kB; anything past 1 MiB is refused unread (no parse, nothing echoed)."""
EMBEDDED_PREFIXES = ("embedded:", "file:")


def load_config(path: str | os.PathLike, host: str | None = None,
                runs_db: str | None = None) -> Config:
    """Read, validate and return the configuration at ``path`` for site ``host``.

    ``host`` defaults to $CAX_HOST, then $HOSTNAME when it names a configured site (the
    original's batch scripts set it), then the short host name.  The runs DB is ``runs_db``
    (``--runs-db``), else $CAX_RUNS_DB, else the file's ``runs_db``; with none cax refuses to
    start rather than work on a new, empty store.  Raises ConfigError listing every problem.
    """
    parsed = _parse(Path(path))
    site = choose_site(parsed.sites, host, parsed.label)
    return Config(site=site, **_sites_fields(parsed, runs_db))


def load_sites(path: str | os.PathLike, runs_db: str | None = None) -> Sites:
    """Read and validate the configuration at ``path`` without choosing a site.

    For the views over the whole runs DB (``cax status``), which need no site of their own.
    Raises ConfigError listing every problem.
    """
    return Sites(**_sites_fields(_parse(Path(path)), runs_db))


def guess_site(sites: Sites, host: str | None = None) -> Site | None:
    """Return the site named by ``host``, $CAX_HOST or $HOSTNAME, or by this machine's short
    host name; None when none of them names a configured site (an explicit ``host`` or
    $CAX_HOST that names none is still an error: a typo must not widen a view silently)."""
    names = [s.name for s in sites.sites]
    explicit = host or os.environ.get("CAX_HOST")
    if explicit:
        return choose_site(sites.sites, explicit, sites.path.name)
    guess = _hostname_site(names) or short_hostname()
    return sites.sites[names.index(guess)] if guess in names else None


def choose_site(sites: tuple[Site, ...], host: str | None, label: str) -> Site:
    """Return the site this machine works for (see ``load_config``); ConfigError if unknown."""
    names = [s.name for s in sites]
    host = host or os.environ.get("CAX_HOST") or _hostname_site(names) or short_hostname()
    if host not in names:
        raise ConfigError(
            f"{label}: this site is {short(host)!r}, which is not a site in the configuration "
            f"(known: {short(', '.join(names) or 'none', 200)}); choose one with --host")
    return sites[names.index(host)]


@dataclass(frozen=True)
class _Parsed:
    """A validated file before a site and a runs DB are chosen."""

    path: Path
    label: str
    top: dict[str, Any]
    sites: tuple[Site, ...]
    notes: tuple[str, ...]


def _parse(path: Path) -> _Parsed:
    """Read and validate the file; raise ConfigError listing every problem."""
    label = path.name
    raw = _read_json(path, label)
    if isinstance(raw, list):
        raw = {"sites": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a list of sites or an object with 'sites'")

    problems: list[str] = []
    notes: list[str] = []
    top = check_section(raw, TOP_KEYS, (), f"{label}:", problems, notes)
    sites = []
    for i, section in enumerate(top["sites"] or []):
        if not isinstance(section, dict):
            problems.append(f"{label}: sites[{i}]: expected an object, got {show(section)}")
            continue
        name = section.get("name")
        where = (f"{label}: site {name!r}" if isinstance(name, str) and len(name) < 100
                 and SAFE_NAME.match(name) else f"{label}: sites[{i}]")
        values = check_section(section, SITE_KEYS, LEGACY_SITE_KEYS, where, problems, notes)
        check_permissions(values.get("permissions"), where, problems)
        problems.extend(f"{where} key 'tsm{p}" for p in setup_problems(values.get("tsm")))
        values["processing"] = check_processing(values.get("processing"), name, where, path,
                                                problems)
        if values.get("name") is not None and not SAFE_NAME.match(values["name"]):
            problems.append(f"{where} key 'name': {short(values['name'])!r} is not a safe site "
                            "name")
        check_site(values, where, problems)
        sites.append(values)
    if top["sites"] == []:
        problems.append(f"{label}: key 'sites': no sites configured")
    check_site_links(sites, label, problems)
    check_overlaps(sites, label, problems)
    if problems:
        raise ConfigError(problems)
    return _Parsed(path, label, top, tuple(_make_site(values) for values in sites),
                   tuple(dict.fromkeys(notes)))


def _sites_fields(parsed: _Parsed, runs_db: str | None) -> dict[str, Any]:
    top = parsed.top
    return {
        "path": parsed.path.resolve(),
        "sites": parsed.sites,
        "runs_db": _choose_runs_db(runs_db, top["runs_db"], parsed.path, parsed.label),
        "runs_db_name": top["runs_db_name"],
        "runs_collection": top["runs_collection"],
        "sleep_seconds": float(top["sleep_seconds"]),
        "lease_seconds": float(top["lease_seconds"]),
        "task_list": tuple_or_none(top["task_list"]),
        "dataset_list": tuple_or_none(top["dataset_list"]),
        "processor_version": top["processor_version"],
        "legacy_checksums": bool(top["legacy_checksums"]
                                 or os.environ.get("CAX_LEGACY_CHECKSUMS") == "1"),
        "notes": parsed.notes,
    }


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
        raise ConfigError(f"{label}: invalid JSON: {short(str(exc), 80)}") from None


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
