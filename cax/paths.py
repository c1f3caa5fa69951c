"""Where datasets live at a site, and the checks that keep runs-DB strings inside those places.

Run names and locations come from the runs DB.  Before any of them touches a filesystem they
are checked here: a name must be one safe path component, and a location must be a normalised
absolute path inside the site's directory for its data type.
"""

from __future__ import annotations

import posixpath

from cax.config import Site
from cax.errors import UnsafeNameError
from cax.runsdb import safe_component
from cax.runsdb.entries import check_dataset_name

PARTIAL_SUFFIX = ".cax-partial"


def base_dir(site: Site, data_type: str, version: str | None = None) -> str:
    """Return the directory holding ``data_type`` datasets (of ``version``) at ``site``.

    Raises UnsafeNameError if the site has no such directory configured.
    """
    base = site.data_dir(data_type)
    if not base:
        raise UnsafeNameError(f"site {site.name} has no directory for {data_type} data")
    base = posixpath.normpath(base)
    if data_type == "processed" and version:
        base = posixpath.join(base, "pax_" + safe_component(version, "processor version"))
    return base


def dataset_path(site: Site, data_type: str, dataset: str, version: str | None = None) -> str:
    """Return where ``dataset`` (a checked file or directory name) belongs at ``site``."""
    return posixpath.join(base_dir(site, data_type, version), safe_component(dataset, "dataset"))


def scratch_path(final: str, token: str) -> str:
    """Return where one claim writes before its result is verified: beside ``final``, hidden
    (users and the stray finder do not take it for a dataset), and named by the claim's token,
    so no other owner or attempt ever writes there.  A later attempt that resumes the bytes
    (rsync) renames the previous attempt's scratch to its own first."""
    head, tail = posixpath.split(final)
    return posixpath.join(head, f".{tail}.{token}{PARTIAL_SUFFIX}")


def parse_scratch(name: str) -> tuple[str, str | None] | None:
    """Return (final name, token) of a scratch name -- token None for the previous release's
    ``.NAME.cax-partial`` -- or None if ``name`` is no scratch name."""
    if not (name.startswith(".") and name.endswith(PARTIAL_SUFFIX)):
        return None
    stem = name[1:-len(PARTIAL_SUFFIX)]
    final, _, token = stem.rpartition(".")
    if final and len(token) == 8 and all(c in "0123456789abcdef" for c in token):
        return final, token
    return (stem, None) if stem else None


def checked_location(site: Site, data_type: str, location: object,
                     version: str | None = None) -> str:
    """Return ``location`` if it is a dataset inside ``site``'s folder for ``data_type`` (for
    processed data of a ``version``: directly in that version's folder).

    A location in one of the site's ``legacy_dirs`` (a former directory, same layout) is
    accepted too: copies the original registered there are valid sources.

    Raises UnsafeNameError for anything else (relative, with ``..``, elsewhere, in another
    version's folder), so a corrupt or hostile runs-DB entry can never make cax read or delete
    elsewhere -- nor PurgeProcessed delete a newer version's data through an old entry.
    """
    base = site.data_dir(data_type)
    if not isinstance(location, str) or not location.startswith("/") or not base:
        raise UnsafeNameError(f"refusing {data_type} location {location!r} at site {site.name}")
    norm = posixpath.normpath(location)
    folder = base_dir(site, data_type, version)
    folders = [folder]  # and the site's former directories (legacy_dirs), laid out alike
    for legacy in site.legacy_dirs:
        old = posixpath.normpath(legacy)
        if data_type != "raw" and version:
            old = posixpath.join(old, posixpath.basename(folder))
        folders.append(old)
    if version is not None and data_type != "raw":
        inside = posixpath.dirname(norm) in folders  # not a sub-folder named like a version
    else:
        inside = any(norm.startswith(f + "/") for f in folders)
    if norm != location.rstrip("/") or not inside:
        raise UnsafeNameError(f"refusing {data_type} location {location!r} at site {site.name}: "
                              f"not inside {folder}")
    safe_component(posixpath.basename(norm), "dataset")
    return norm


def dataset_name(run: dict, data_type: str, source_path: str) -> str:
    """Return the name ``run``'s dataset has at every site, checked against its source.

    The name derives from the run's identity (``entries.check_dataset_name``); a source named
    otherwise does not belong to this run, so copying it would put one run's data where
    another's belongs.
    """
    try:
        return check_dataset_name(run, source_path)
    except UnsafeNameError as exc:
        raise UnsafeNameError(f"{data_type} {exc}") from None


def entry_location(site: Site, entry: dict) -> str:
    """Return the checked location of a data entry: in the folder of its type and version."""
    data_type = entry.get("type", "")
    version = entry.get("pax_version") if data_type != "raw" else None
    return checked_location(site, data_type, entry.get("location"), version)
