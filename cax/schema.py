"""Every key cax.json may hold: its type, default and meaning.

One table is the single source for validation (``cax.config``) and for the configuration
reference in docs/configuration.rst, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import textwrap
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
    maximum: float | None = None
    #: Whose section a daemon reads the key from (a column of the reference): "own", "peer",
    #: "all" or "top", as explained above SITE_KEYS.
    read_from: str = "own"


DAY_S = 86_400
SCRUB_BYTES_DEFAULT = 1 << 30
"""1 GiB per pass: at the default 60 s pause about 1.4 TB a day, a small share of a disk's
read rate, and every copy is re-read within ``scrub_after_days`` + data/(1.4 TB/day) days."""

# ``read_from`` says whose section a daemon reads the key from: "own" (the daemon's own site),
# "peer" (the site at the other end of a copy, read by the daemon that reaches it), "all"
# (every daemon reads every site's value), "top" (the top level).
SITE_KEYS: tuple[Key, ...] = (
    Key("name", ("str",), None, "Site name; stored as `host` in data entries.", required=True,
        read_from="all"),
    Key("method", ("str",), None, "How other sites move data to and from this site.",
        required=True, choices=METHODS, read_from="peer"),
    Key("hostname", ("str", "null"), None, "SSH host name or address of the site.",
        read_from="peer"),
    Key("username", ("str", "null"), None, "SSH login at the site.", read_from="peer"),
    Key("port", ("int",), 22, "SSH port of the site.", minimum=1, maximum=65535,
        read_from="peer"),
    Key("key_file", ("str", "null"), None, "Private key used to reach the site (default: ssh's); "
        "not for a local site.", absolute_path=True, read_from="peer"),
    Key("known_hosts", ("str", "null"), None, "known_hosts file holding the site's host key "
        "(default ~/.ssh/known_hosts); not for a local site.", absolute_path=True,
        read_from="peer"),
    Key("accept_new_host_keys", ("bool",), False, "Accept and remember an unknown host key "
        "(a changed key is always refused).", read_from="peer"),
    Key("remote_python", ("str",), "python3", "Python 3 on the site, used to checksum there.",
        read_from="peer"),
    Key("streams", ("int", "null"), None, "Parallel SSH connections per copy to and from this "
        "site (methods stream and auto), each moving its share of the files and ranges of the "
        "large ones. null: automatic, from the round trip measured through the connection "
        "(one on a LAN, up to 16 across an ocean); 1: one stream.", minimum=1, maximum=64,
        read_from="peer"),
    Key("dir_raw", ("str", "null"), None, "Directory holding raw datasets (normalised; no "
        "`..`; must not overlap another site's directories on the same host).",
        absolute_path=True, read_from="all"),
    Key("dir_processed", ("str", "null"), None, "Directory holding processed data "
        "(under pax_<version>/).", absolute_path=True, read_from="all"),
    Key("dir_tsm", ("str", "null"), None, "Staging directory for tape backup.",
        absolute_path=True, read_from="all"),
    Key("tsm", ("dict", "null"), None, "How this site runs the tape client: {dsmc, env, "
        "init_script, optfile, virtualnodename, asnode, password_env, options, timeout, "
        "seconds_per_gb, backup, rename, subdirs, description} (see Tape)."),
    Key("legacy_dirs", ("list",), [], "Former data directories of this site (a moved "
        "`dir_raw`): copies registered there are valid sources and may be verified, moved or "
        "purged.", items="str", absolute_path=True, read_from="all"),
    Key("data_type", ("list", "null"), [], "Data types this site's daemon handles (each needs "
        "its `dir_` key; empty: the daemon copies nothing and says so each pass).", items="str",
        choices=DATA_TYPES),
    Key("upload_options", ("list", "null"), [], "Sites this site pushes to.", items="str"),
    Key("download_options", ("list", "null"), [], "Sites this site pulls from, in order of "
        "preference.", items="str"),
    Key("processor_version", ("str", "null"), None, "Processed-data version this site handles, "
        "e.g. v6.8.0 (stored as `pax_version`); default: the top-level `processor_version`; "
        "without either, processed data are not copied and each pass warns so."),
    Key("max_transfers", ("int",), 2, "Transfers this site's daemon runs at once.", minimum=1,
        maximum=1000),
    Key("max_attempts", ("int",), 5, "Attempts before a failing copy is left in error as stuck.",
        minimum=1, maximum=1000),
    Key("retry_backoff", ("number",), 60, "Seconds before the first retry; doubles per attempt "
        "(capped at 6 h).", minimum=0, maximum=DAY_S),
    Key("stall_timeout", ("number",), 60, "Seconds without byte progress before a transfer is "
        "aborted (the daemon's own value, for pushes and pulls alike).", minimum=1,
        maximum=DAY_S),
    Key("purge", ("number", "null"), None, "Days after a run's start when local raw data may be "
        "purged; pulls of older raw data are skipped. null: BufferPurger is off.", minimum=0,
        maximum=36_500),
    Key("reference_for", ("list",), [], "Data types for which this site holds the reference "
        "copy that others are compared with (default: see Reference copies).", items="str",
        choices=DATA_TYPES, read_from="all"),
    Key("reference_priority", ("int",), 100, "Order among reference sites of one data type: "
        "lower first; ties by site name, never by position in the file.", minimum=0,
        maximum=1_000_000, read_from="all"),
    Key("min_copies", ("int",), 2, "Verified copies elsewhere that must exist before local raw "
        "data is purged.", minimum=1, maximum=100),
    Key("purge_free_below", ("number", "null"), None, "Purge only while the raw disk has less "
        "than this fraction free (0-1), oldest runs first.", minimum=0, maximum=1),
    Key("pax_version_purge", ("str", "null"), None, "Processed version whose local copies are "
        "deleted once a newer version exists."),
    Key("permissions", ("dict", "null"), None, "Per data type: {mode, group, acl_command} applied "
        "once to each new local copy."),
    Key("scrub_bytes_per_pass", ("int",), SCRUB_BYTES_DEFAULT, "Bytes of old verified copies "
        "re-checksummed per pass (0: no scrubbing; see Detection bound).", minimum=0,
        maximum=1 << 50),
    Key("scrub_after_days", ("number",), 7, "Days after its last verification when a copy is "
        "re-checksummed from disk by Scrub.", minimum=0, maximum=3650),
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
    Key("validate", ("list", "null"), None, "A validator run on each finished output before it "
        "is registered, as an argument list with the same placeholders; exit 0 accepts it "
        "(the reference processor's: [\"{python}\", \"-m\", \"cax.processors.reference\", "
        "\"--validate\", \"{output}\"]).", items="str"),
    Key("validate_timeout", ("number",), 3600, "Seconds the validator may run.", minimum=1),
    Key("allow_empty", ("bool",), False, "Accept an output without any bytes (else a job that "
        "exits 0 but writes nothing has failed)."),
)

#: Keys of the original cax.json that are accepted and ignored with one log line (grid, rucio,
#: old pax options); any other ``rucio_*`` key is treated the same way.
LEGACY_SITE_KEYS = (
    "nstreams", "grid_cert", "dir_minitrees", "rucio_upload_rse", "rucio_download_rse",
    "rucio_account", "rucio_transfer", "rucio_config_p2", "rucio_config_p3", "rucio_rule",
    "pax_processing_versions", "pax_versions",
)
LEGACY_KEY_PREFIXES = ("rucio_",)

#: Task names of the original cax (1.x-6.x) that this release does not implement: a
#: ``task_list`` naming them is accepted and they are skipped with one log line.
ORIGINAL_TASKS = (
    "AddElectronLifetime", "AddGains", "AddDriftVelocity", "SetNeuralNetwork",
    "ProcessBatchQueueHax", "AddTSMChecksum", "ClearDAQBuffer",
    "SCPPush", "SCPPull", "RetryStalled", "RetryBadChecksum", "RucioPurge", "TSMDatabaseCheck",
    "TSMLogFileCheck", "RenameSingle", "RemoveSingle", "RemoveTSMEntry", "FindStrays",
    "StatusSingle", "RemoveRucioEntry",
)

#: The original's hard-coded master checksum sites (its ``get_main_checksum``), by data type,
#: in priority order: the default reference sites when no site sets ``reference_for``.
ORIGINAL_MASTERS = {
    "raw": ("xe1t-datamanager", "tsm-server"),
    "processed": ("midway-login1", "login"),
}

TOP_KEYS: tuple[Key, ...] = (
    Key("sites", ("list",), None, "The site sections.", required=True, items="dict",
        read_from="top"),
    Key("runs_db", ("str", "null"), None, "mongodb:// URI of the runs DB (password from "
        "MONGODB_PASSWORD or MONGO_PASSWORD), or embedded:PATH (file:PATH) for the embedded "
        "store. --runs-db and $CAX_RUNS_DB win over it; with none of the three cax refuses to "
        "start.", read_from="top"),
    Key("runs_db_name", ("str",), "run", "Database name in the runs DB.", read_from="top"),
    Key("runs_collection", ("str",), "runs_new", "Collection holding the run documents.",
        read_from="top"),
    Key("sleep_seconds", ("number",), 60, "Pause between passes of the daemon.", minimum=0,
        maximum=DAY_S, read_from="top"),
    Key("lease_seconds", ("number",), 120, "Lifetime of a claim; renewed while work goes on, "
        "taken over by any daemon once expired.", minimum=5, maximum=DAY_S, read_from="top"),
    Key("task_list", ("list", "null"), None, "Only these tasks run (a site's own list wins).",
        items="str", read_from="top"),
    Key("dataset_list", ("list", "null"), None, "Only these run names are handled.", items="str",
        read_from="top"),
    Key("processor_version", ("str", "null"), None, "Default processed-data version of sites "
        "that name none.", read_from="top"),
    Key("legacy_checksums", ("bool",), False, "Mixed operation with the original cax: also "
        "record the original's sha512 dirhash of each new raw and processed copy, computed from "
        "the same read, so old daemons count the copy as good (list form: CAX_LEGACY_CHECKSUMS=1).",
        read_from="top"),
)

def _bounds(key: Key) -> str:
    if key.minimum is None and key.maximum is None:
        return ""
    low = "" if key.minimum is None else f"{key.minimum:g}"
    high = "" if key.maximum is None else f"{key.maximum:g}"
    return f" Range: {low}..{high}."


def _rst_keys(keys: tuple[Key, ...]) -> str:
    """One definition per key: its name, then its type, default, range and reader, then its
    meaning, every line at most 100 characters wide."""
    out = []
    for key in keys:
        doc = key.doc.replace("`", "``")
        if key.choices:
            doc += " One of: " + ", ".join(key.choices) + "."
        default = "required" if key.required else f"default ``{json.dumps(key.default)}``"
        facts = [" or ".join(key.types), default]
        bounds = _bounds(key).strip().removeprefix("Range: ").removesuffix(".")
        if bounds:
            facts.append(f"range {bounds}")
        facts.append(f"read from: {key.read_from}")
        out += [f"``{key.name}``", _indent("; ".join(facts) + "."), "", _indent(doc), ""]
    return "\n".join(out).rstrip("\n")


def _indent(text: str) -> str:
    return textwrap.fill(text, width=100, initial_indent="    ", subsequent_indent="    ",
                         break_long_words=False, break_on_hyphens=False)


def reference_rst() -> str:
    """Return the configuration reference of docs/configuration.rst (a test keeps the two
    identical: ``python tests/unit/test_docs.py`` rewrites it)."""
    return ("*Read from* says whose section a daemon reads the key from: ``own``: the daemon\n"
            "reads its own site's section; ``peer``: the daemon that reaches a site (push, pull,\n"
            "checksum there) reads that site's section; ``all``: every daemon reads every site's\n"
            "value; ``top``: the top level.\n\n"
            f"Top-level keys\n^^^^^^^^^^^^^^\n\nIn the object form.\n\n{_rst_keys(TOP_KEYS)}\n\n"
            f"Site keys\n^^^^^^^^^\n\n{_rst_keys(SITE_KEYS)}\n\n"
            "Processing keys\n^^^^^^^^^^^^^^^\n\nKeys of a site's ``processing`` section.\n\n"
            f"{_rst_keys(PROCESSING_KEYS)}\n")
