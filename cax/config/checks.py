"""The rules of cax.json: every value checked against its key, then the links between sites.

Each function appends one readable line per problem to ``problems`` (naming the file, the site
and the key) instead of raising, so that every problem is reported at once.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import string
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from cax.config.model import LOOPBACK, Processing
from cax.schema import (
    DATA_TYPES,
    LEGACY_KEY_PREFIXES,
    LEGACY_SITE_KEYS,
    PROCESSING_KEYS,
    PROCESSING_PLACEHOLDERS,
    Key,
)

SHOWN_CHARS = 40
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
OCTAL_MODE = re.compile(r"0?[0-7]{3,4}")
PERMISSION_KEYS = ("mode", "group", "acl_command")

_JSON_TYPES = {
    "str": str, "int": int, "bool": bool, "list": list, "dict": dict, "null": type(None),
}


def tuple_or_none(value: list | None) -> tuple | None:
    return None if value is None else tuple(value)


def short(text: str, limit: int = SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def show(value: Any) -> str:
    """Return ``value`` as short JSON for a message: never more than SHOWN_CHARS characters."""
    if isinstance(value, (dict, list)):
        value = value if len(value) <= 8 else type(value)()  # no deep or long walk
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError, TypeError):
        text = f"a {type(value).__name__}"
    return short(text)


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
        problems.append(f"{at}: expected {wanted}, got {show(value)}")
        return False
    if value is None:
        return True
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{at}: must be a finite number, got {show(value)}")
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if key.minimum is not None and value < key.minimum:
            problems.append(f"{at}: must be at least {key.minimum:g}, got {show(value)}")
        elif key.maximum is not None and value > key.maximum:
            problems.append(f"{at}: must be at most {key.maximum:g}, got {show(value)}")
    elements = value if isinstance(value, list) else [value]
    for element in elements:
        if key.items and isinstance(value, list) and not _type_ok(element, (key.items,)):
            problems.append(f"{at}: expected a list of {key.items}, found {show(element)}")
        elif key.choices and isinstance(element, str) and element not in key.choices:
            problems.append(f"{at}: {short(element)!r} is not one of {', '.join(key.choices)}")
        elif key.absolute_path and isinstance(element, str):
            _check_path(element, at, problems)
    return len(problems) == before


def _check_path(value: str, at: str, problems: list[str]) -> None:
    if not value.startswith("/"):
        problems.append(f"{at}: must be an absolute path, got {show(value)}")
    elif ".." in value.split("/"):
        problems.append(f"{at}: must not contain '..', got {show(value)}")
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


def check_section(section: dict, keys: tuple[Key, ...], ignored: tuple[str, ...], where: str,
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
        hint = get_close_matches(name, list(known), n=1) if len(name) < 100 else []
        maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
        problems.append(f"{where}: unknown key {short(name)!r}{maybe}")
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


def check_permissions(value: Any, where: str, problems: list[str]) -> None:
    """Check a site's ``permissions``: {data type: {mode, group, acl_command}}."""
    if not isinstance(value, dict):
        return  # null, or a wrong type already reported
    for data_type, settings in value.items():
        at = f"{where} key 'permissions.{data_type}"
        if data_type not in DATA_TYPES:
            problems.append(f"{at}': unknown data type (known: {', '.join(DATA_TYPES)})")
        elif not isinstance(settings, dict) or not settings:
            problems.append(f"{at}': expected an object with mode, group or acl_command, "
                            f"got {show(settings)}")
        else:
            problems.extend(f"{at}{problem}" for problem in _permission_problems(settings))


def _permission_problems(settings: dict[str, Any]) -> list[str]:
    problems = [f"': unknown key {name!r} (known: {', '.join(PERMISSION_KEYS)})"
                for name in settings if name not in PERMISSION_KEYS]
    mode, group, command = (settings.get(k) for k in PERMISSION_KEYS)
    if "mode" in settings and not (isinstance(mode, str) and OCTAL_MODE.fullmatch(mode)):
        problems.append(f".mode': expected an octal string such as \"0750\", got {show(mode)}")
    if "group" in settings and not (isinstance(group, str) and group):
        problems.append(f".group': expected a group name, got {show(group)}")
    if "acl_command" in settings and not (
            isinstance(command, list) and command and all(isinstance(a, str) for a in command)
            and any("{path}" in a for a in command)):
        problems.append(".acl_command': expected a list of strings with a \"{path}\" "
                        f"argument, got {show(command)}")
    return problems


SSH_ONLY_KEYS = ("key_file", "known_hosts", "username")


def check_site(values: dict[str, Any], where: str, problems: list[str]) -> None:
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


def check_overlaps(sites: list[dict], label: str, problems: list[str]) -> None:
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
                    f"{short(machine)}: {key} {short(directory, 60)} and {other_key} "
                    f"{short(other_dir, 60)} (each site needs its own)")


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def check_site_links(sites: list[dict], label: str, problems: list[str]) -> None:
    """Cross-site checks: unique names, and upload/download options that name real sites."""
    names = [n for n in (s.get("name") for s in sites) if isinstance(n, str)]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{label}: site {short(name)!r}: duplicate site name")
    for site in sites:
        for option in ("upload_options", "download_options"):
            targets = site.get(option)
            if not isinstance(targets, list):
                continue
            for target in targets:
                if isinstance(target, str) and target not in names:
                    problems.append(
                        f"{label}: site {site.get('name')!r} key {option!r}: unknown site "
                        f"{short(target)!r} (known: "
                        f"{short(', '.join(dict.fromkeys(names)), 200)})")
                elif target == site.get("name"):
                    problems.append(
                        f"{label}: site {target!r} key {option!r}: a site cannot copy to itself")


def check_processing(value: Any, site: Any, where: str, config_path: Path,
                      problems: list[str]) -> Processing | None:
    """Validate a site's ``processing`` section; return it (None if absent or invalid)."""
    if not isinstance(value, dict):
        return None  # null, or a wrong type already reported
    at = f"{where} key 'processing'"
    found = len(problems)
    values = check_section(value, PROCESSING_KEYS, (), at, problems, [])
    command = values["command"]  # check_section gives every key a value
    for name, argv in (("command", command), ("validate", values["validate"])):
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
                         "validate": tuple_or_none(values["validate"]),
                         "validate_timeout": float(values["validate_timeout"])})
