"""The rules of a site's ``tsm`` section (how it runs IBM's tape client, ``dsmc``).

Part of the configuration's validation; ``cax.tape.dsmc`` reads the same section into its
``TsmSetup``.  Kept here so the configuration never imports the tape layer.
"""

from __future__ import annotations

from typing import Any

BACKUP_MODES = ("incremental", "archive")
SETUP_KEYS = ("dsmc", "env", "init_script", "optfile", "virtualnodename", "asnode",
              "password_env", "options", "timeout", "seconds_per_gb", "backup", "rename",
              "subdirs", "description")


def setup_problems(value: Any) -> list[str]:
    """Return one line per problem of a site's ``tsm`` section (empty if it is valid)."""
    if value is None:
        return []
    if not isinstance(value, dict):
        return [f"': expected an object, got {type(value).__name__}"]
    problems = [f".{name}': unknown key (known: {', '.join(SETUP_KEYS)})"
                for name in value if name not in SETUP_KEYS]
    for name in ("dsmc", "init_script", "optfile", "virtualnodename", "asnode", "password_env",
                 "description"):
        if name in value and not (isinstance(value[name], str) and value[name]):
            problems.append(f".{name}': expected a non-empty string")
    for name in ("init_script", "optfile"):
        if isinstance(value.get(name), str) and not value[name].startswith("/"):
            problems.append(f".{name}': must be an absolute path")
    env = value.get("env", {})
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str)
                                          for k, v in env.items())):
        problems.append(".env': expected an object of strings")
    options = value.get("options", [])
    if not (isinstance(options, list) and all(isinstance(o, str) and o.startswith("-")
                                              for o in options)):
        problems.append(".options': expected a list of strings starting with '-'")
    for name in ("timeout", "seconds_per_gb"):
        number = value.get(name, 1)
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number <= 0:
            problems.append(f".{name}': expected a positive number")
    if value.get("backup", "incremental") not in BACKUP_MODES:
        problems.append(f".backup': one of {', '.join(BACKUP_MODES)}")
    for name in ("rename", "subdirs"):
        if not isinstance(value.get(name, True), bool):
            problems.append(f".{name}': expected true or false")
    return problems
