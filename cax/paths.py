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


def partial_path(final: str) -> str:
    """Return the temporary name a copy is written under before it is verified.

    Stable (not random), so that an interrupted rsync can resume into it; hidden (leading
    dot), so that users and the stray finder do not mistake it for a dataset.
    """
    head, tail = posixpath.split(final)
    return posixpath.join(head, f".{tail}{PARTIAL_SUFFIX}")


def checked_location(site: Site, data_type: str, location: object) -> str:
    """Return ``location`` if it is a dataset inside ``site``'s directory for ``data_type``.

    Raises UnsafeNameError for anything else (relative, with ``..``, outside the directory),
    so a corrupt or hostile runs-DB entry can never make cax read or delete elsewhere.
    """
    base = site.data_dir(data_type)
    if not isinstance(location, str) or not location.startswith("/") or not base:
        raise UnsafeNameError(f"refusing {data_type} location {location!r} at site {site.name}")
    norm = posixpath.normpath(location)
    base = posixpath.normpath(base)
    if norm != location.rstrip("/") or not norm.startswith(base + "/"):
        raise UnsafeNameError(f"refusing {data_type} location {location!r} at site {site.name}: "
                              f"not inside {base}")
    safe_component(posixpath.basename(norm), "dataset")
    return norm
