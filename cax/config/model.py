"""The validated configuration: frozen dataclasses, passed explicitly (no global config).

``Sites`` is the whole file; ``Config`` is the file as seen by one site, the one this daemon
(or command) works for.  Views over the whole runs DB (``cax status``) need only ``Sites``.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cax.errors import ConfigError
from cax.schema import LEGACY_METHODS, ORIGINAL_MASTERS, TAPE_METHODS

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})


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
class Sites:
    """The whole validated configuration file: every site and the top-level options."""

    path: Path
    sites: tuple[Site, ...]
    runs_db: str  # the loader picks one or refuses (_choose_runs_db)
    runs_db_name: str
    runs_collection: str
    sleep_seconds: float
    lease_seconds: float
    task_list: tuple[str, ...] | None
    dataset_list: tuple[str, ...] | None
    processor_version: str | None
    legacy_checksums: bool
    #: Lines to log once at start (ignored legacy keys), after logging is set up.
    notes: tuple[str, ...]

    def get_site(self, name: str) -> Site:
        """Return the site called ``name``; raises ConfigError naming the known sites."""
        for site in self.sites:
            if site.name == name:
                return site
        raise ConfigError(f"{self.path.name}: unknown site {name!r} (known: {self.site_names})")

    @property
    def site_names(self) -> str:
        return ", ".join(s.name for s in self.sites)

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


@dataclass(frozen=True)
class Config(Sites):
    """The configuration as one site sees it; ``site`` is the site this daemon works for."""

    site: Site

    @property
    def tasks_wanted(self) -> tuple[str, ...] | None:
        """The task list in force: the site's own, else the top-level one, else None (all)."""
        return self.site.task_list if self.site.task_list is not None else self.task_list

    @property
    def datasets_wanted(self) -> tuple[str, ...] | None:
        return self.site.dataset_list if self.site.dataset_list is not None else self.dataset_list

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
