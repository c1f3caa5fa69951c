"""Every key cax.json may hold: its type, default and meaning.

One table is the single source for validation (``cax.config``) and for the configuration
reference in README.rst, so the two cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TRANSFER_METHODS = ("local", "scp", "rsync", "openssh", "stream", "auto")
TAPE_METHODS = ("tsm",)
#: Methods of the original cax that this release accepts in cax.json but cannot drive.
LEGACY_METHODS = ("gfal-copy", "lcg-cp", "rucio")
METHODS = TRANSFER_METHODS + TAPE_METHODS + LEGACY_METHODS
DATA_TYPES = ("raw", "processed")


@dataclass(frozen=True)
class Key:
    """One configuration key: accepted JSON types, default, and a one-line description."""

    name: str
    types: tuple[str, ...]
    default: Any
    doc: str
    required: bool = False
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    items: str | None = None  # element type of a list
    absolute_path: bool = False


SITE_KEYS: tuple[Key, ...] = (
    Key("name", ("str",), None, "Site name; stored as `host` in data entries.", required=True),
    Key("method", ("str",), None, "How other sites move data to and from this site.",
        required=True, choices=METHODS),
    Key("hostname", ("str", "null"), None, "SSH host name or address of the site."),
    Key("username", ("str", "null"), None, "SSH login at the site."),
    Key("port", ("int",), 22, "SSH port of the site.", minimum=1),
    Key("key_file", ("str", "null"), None, "Private key used to reach the site (default: ssh's).",
        absolute_path=True),
    Key("known_hosts", ("str", "null"), None, "known_hosts file holding the site's host key "
        "(default ~/.ssh/known_hosts).", absolute_path=True),
    Key("accept_new_host_keys", ("bool",), False, "Accept and remember an unknown host key "
        "(a changed key is always refused)."),
    Key("remote_python", ("str",), "python3", "Python 3 on the site, used to checksum there."),
    Key("dir_raw", ("str", "null"), None, "Directory holding raw datasets.", absolute_path=True),
    Key("dir_processed", ("str", "null"), None, "Directory holding processed data "
        "(under pax_<version>/).", absolute_path=True),
    Key("dir_tsm", ("str", "null"), None, "Staging directory for tape backup.",
        absolute_path=True),
    Key("tsm", ("dict", "null"), None, "How this site runs the tape client: {dsmc, env, "
        "init_script, optfile, virtualnodename, asnode, password_env, options, timeout, "
        "seconds_per_gb, backup, rename, subdirs, description} (see Tape)."),
    Key("data_type", ("list", "null"), [], "Data types this site's daemon handles.", items="str",
        choices=DATA_TYPES),
    Key("upload_options", ("list", "null"), [], "Sites this site pushes to.", items="str"),
    Key("download_options", ("list", "null"), [], "Sites this site pulls from, in order of "
        "preference.", items="str"),
    Key("processor_version", ("str", "null"), None, "Processed-data version this site handles, "
        "e.g. v6.8.0 (stored as `pax_version`); required with data type processed."),
    Key("max_transfers", ("int",), 2, "Transfers this site's daemon runs at once.", minimum=1),
    Key("max_attempts", ("int",), 5, "Attempts before a failing copy is left in error as stuck.",
        minimum=1),
    Key("retry_backoff", ("number",), 60, "Seconds before the first retry; doubles per attempt "
        "(capped at 6 h).", minimum=0),
    Key("stall_timeout", ("number",), 60, "Seconds without byte progress before a transfer is "
        "aborted.", minimum=1),
    Key("purge", ("number", "null"), None, "Days after a run's start when local raw data may be "
        "purged; pulls of older raw data are skipped.", minimum=0),
    Key("reference_for", ("list",), [], "Data types for which this site holds the reference "
        "copy that others are compared with.", items="str", choices=DATA_TYPES),
    Key("min_copies", ("int",), 2, "Verified copies elsewhere that must exist before local raw "
        "data is purged.", minimum=1),
    Key("purge_free_below", ("number", "null"), None, "Purge only while the raw disk has less "
        "than this fraction free (0-1), oldest runs first.", minimum=0),
    Key("pax_version_purge", ("str", "null"), None, "Processed version whose local copies are "
        "deleted once a newer version exists."),
    Key("permissions", ("dict", "null"), None, "Per data type: {mode, group, acl_command} applied "
        "once to each new local copy."),
    Key("scrub_bytes_per_pass", ("int",), 0, "Bytes of old verified copies re-checksummed per "
        "pass (0: no scrubbing).", minimum=0),
    Key("scrub_after_days", ("number",), 30, "Days after its last verification when a copy is "
        "re-checksummed from disk by Scrub.", minimum=0),
    Key("processing", ("dict", "null"), None, "Process raw into processed data at this site: "
        "{command, version, ...}; keys in the processing table below."),
    Key("task_list", ("list", "null"), None, "Only these tasks run at this site.", items="str"),
    Key("dataset_list", ("list", "null"), None, "Only these run names are handled at this site.",
        items="str"),
)

BATCH_BACKENDS = ("local", "slurm")
#: Placeholders a processing command may use; each argument is filled in, never run by a shell.
PROCESSING_PLACEHOLDERS = ("input", "output", "name", "number", "detector", "ncpus", "version",
                           "site", "python", "mem_per_cpu")

PROCESSING_KEYS: tuple[Key, ...] = (
    Key("command", ("list",), None, "The processor as an argument list with placeholders "
        "{input} {output} {name} {number} {detector} {ncpus} {version} {site} {python} "
        "{mem_per_cpu}; never a shell string.", required=True, items="str"),
    Key("version", ("str",), None, "Version of the processed data it makes (stored as "
        "`pax_version`), e.g. v6.8.0.", required=True),
    Key("pax_hash", ("str",), "n/a", "Processor build id recorded as `pax_hash`."),
    Key("prefix", ("str",), "pax_", "Output directory under dir_processed: <prefix><version>/."),
    Key("suffix", ("str",), ".root", "Appended to the run name to make the output file name."),
    Key("required_fields", ("list",), [], "Run-document fields (dotted paths) that must be "
        "present before a run is processed.", items="str"),
    Key("backend", ("str",), "local", "Where jobs run.", choices=BATCH_BACKENDS),
    Key("max_jobs", ("int",), 2, "Own jobs queued or running at once.", minimum=1),
    Key("timeout", ("number",), 172800, "Seconds a job may run (the SLURM time limit).",
        minimum=1),
    Key("ncpus", ("int",), 1, "CPUs per job.", minimum=1),
    Key("mem_per_cpu", ("int",), 2000, "Memory per CPU in MB (SLURM).", minimum=1),
    Key("partition", ("str", "null"), None, "SLURM partition."),
    Key("qos", ("str", "null"), None, "SLURM quality of service."),
    Key("reservation", ("str", "null"), None, "SLURM reservation."),
    Key("account", ("str", "null"), None, "SLURM account."),
    Key("accounting", ("str",), "completion", "How finished SLURM jobs are looked up: sacct "
        "(slurmdbd), completion (the job-completion file), none.",
        choices=("sacct", "completion", "none")),
    Key("jobs_dir", ("str", "null"), None, "Job scripts and logs (shared with the batch nodes); "
        "default cax-jobs/<site> beside the configuration file.", absolute_path=True),
    Key("python", ("str", "null"), None, "Python that runs job scripts on batch nodes "
        "(default: the one running cax)."),
)

#: Keys of the original cax.json that are accepted and ignored (grid, rucio, old pax options).
LEGACY_SITE_KEYS = (
    "nstreams", "grid_cert", "dir_minitrees", "rucio_upload_rse", "rucio_account",
    "rucio_transfer", "rucio_config_p2", "rucio_config_p3", "pax_processing_versions",
    "pax_versions",
)

TOP_KEYS: tuple[Key, ...] = (
    Key("sites", ("list",), None, "The site sections.", required=True, items="dict"),
    Key("runs_db", ("str", "null"), None, "mongodb:// URI of the runs DB (password from "
        "MONGODB_PASSWORD), or file:PATH for the embedded store; default file:cax-runsdb in "
        "the working directory."),
    Key("runs_db_name", ("str",), "run", "Database name in the runs DB."),
    Key("runs_collection", ("str",), "runs_new", "Collection holding the run documents."),
    Key("sleep_seconds", ("number",), 60, "Pause between passes of the daemon.", minimum=0),
    Key("lease_seconds", ("number",), 120, "Lifetime of a claim; renewed while work goes on, "
        "taken over by any daemon once expired.", minimum=5),
    Key("task_list", ("list", "null"), None, "Only these tasks run (a site's own list wins).",
        items="str"),
    Key("dataset_list", ("list", "null"), None, "Only these run names are handled.", items="str"),
)


def _rst_table(keys: tuple[Key, ...]) -> str:
    header = ("Key", "Type", "Default", "Meaning")
    rows = []
    for key in keys:
        doc = key.doc.replace("`", "``")
        if key.choices:
            doc += " One of: " + ", ".join(key.choices) + "."
        default = "required" if key.required else json.dumps(key.default)
        rows.append((f"``{key.name}``", " or ".join(key.types), default, doc))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
             rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    return "\n".join([*lines, rule])


def reference_rst() -> str:
    """Return the configuration reference of README.rst (a test keeps the two identical)."""
    return (f"Top-level keys (object form):\n\n{_rst_table(TOP_KEYS)}\n\n"
            f"Site keys:\n\n{_rst_table(SITE_KEYS)}\n\n"
            f"Keys of a site's ``processing`` section:\n\n{_rst_table(PROCESSING_KEYS)}\n")
