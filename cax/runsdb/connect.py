"""Open the runs DB named in the configuration: a MongoDB server, or the embedded store."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlsplit

import pymongo
from pymongo import MongoClient, monitoring
from pymongo.errors import PyMongoError

from cax.errors import ConfigError, RunsDBError
from cax.runsdb.runs import RunsDB
from cax.runsdb.store import EmbeddedClient
from cax.runsdb.storefile import FILE_NAME

log = logging.getLogger(__name__)

PASSWORD_VARIABLES = ("MONGODB_PASSWORD", "MONGO_PASSWORD")  # the second is the original's name
SERVER_TIMEOUT_MS = 10_000
#: The start-up check of a server: an unreachable runs DB is reported within seconds.
START_CHECK_S = 3.0


class _RoundTripCounter(monitoring.CommandListener):
    """Counts every command pymongo sends, getMore included: the real round-trip count, and
    the documents the replies carry (a count's one-document reply is not a document fetched)."""

    def __init__(self) -> None:
        self.runsdb: RunsDB | None = None
        self._counts: set[int] = set()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.runsdb:
            self.runsdb.count_round_trip(event.command_name)
            pipeline = event.command.get("pipeline") if event.command_name == "aggregate" \
                else None
            if pipeline and "$group" in pipeline[-1]:
                self._counts.add(event.request_id)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if self.runsdb is None:
            return
        if event.request_id in self._counts:
            self._counts.discard(event.request_id)
            return
        reply = event.reply or {}
        cursor = reply.get("cursor") or {}
        batch = cursor.get("firstBatch", cursor.get("nextBatch"))
        if batch is not None:
            self.runsdb.count_documents_returned(len(batch))
        elif event.command_name.lower() == "findandmodify" and reply.get("value") is not None:
            self.runsdb.count_documents_returned(1)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._counts.discard(event.request_id)


def short_cause(exc: Exception) -> str:
    """The cause in a driver error, without its timeouts and topology dump."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for cut in (" (configured timeouts", ", Timeout:", ", Topology Description"):
        text = text.split(cut, 1)[0]
    return text[:200]


def redact(uri: str) -> str:
    """Return ``uri`` with any password replaced, for logs and messages."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", uri)


def with_password(uri: str) -> str:
    """Insert the password from the environment into a URI that names a user but no password.

    The password is URL-escaped (the original interpolated it raw, which broke on '@' or '/').
    """
    match = re.match(r"^(mongodb(?:\+srv)?://)([^:/@]+)@(.*)$", uri)
    if not match:
        return uri
    for name in PASSWORD_VARIABLES:
        password = os.environ.get(name)
        if password:
            return f"{match.group(1)}{match.group(2)}:{quote_plus(password)}@{match.group(3)}"
    raise ConfigError(f"runs DB URI {uri!r} names user {match.group(2)!r} but no password: "
                      f"set {PASSWORD_VARIABLES[0]}")


def embedded_store_exists(path: Path) -> bool:
    """Whether ``path`` holds an embedded store (its SQLite file, or an older cax's files).

    An empty directory is no store: it is what an unmounted disk's mount point looks like.
    """
    return (path / FILE_NAME).is_file() or any(path.glob("*.*.bson"))


def open_runsdb(uri: str | None, db_name: str = "run", runs_collection: str = "runs_new", *,
                read_only: bool = False, check: bool = True, create: bool = False) -> RunsDB:
    """Connect to the runs DB at ``uri`` and return it, its indexes ensured.

    ``uri`` is ``mongodb://...`` (or ``mongodb+srv://``) for a server, ``embedded:PATH`` or
    ``file:PATH`` for the embedded store.  None is refused: the embedded store is used only
    when asked for, never as a silent fallback.  With ``check`` the server
    is pinged, so an unreachable DB fails here with RunsDBError rather than mid-pass.

    An embedded store that does not exist is an outage (RunsDBError), never an empty runs DB:
    a moved folder or an unmounted disk must not make a registration land in a new, empty
    store, nor a status view show an empty, healthy world.  Only ``create`` (``cax demo``,
    ``cax run add --create-runs-db``) makes a new one.
    """
    if not uri:
        raise ConfigError("no runs DB configured: give --runs-db, set CAX_RUNS_DB, or set "
                          "'runs_db' (embedded:PATH for the embedded store)")
    if uri.startswith(("mongodb://", "mongodb+srv://")):
        return _open_server(uri, db_name, runs_collection, read_only, check)
    if uri.startswith("embedded:"):
        uri = "file:" + uri[len("embedded:"):]
    if not uri.startswith("file:"):
        raise ConfigError(f"runs DB {uri[:60]!r}: expected mongodb://, mongodb+srv://, "
                          "embedded:PATH or file:PATH")
    path = Path(uri[5:])
    if not embedded_store_exists(path):
        if not create or read_only:
            raise RunsDBError(f"no embedded runs DB at {path} (moved, deleted or on a disk that "
                              "is not mounted?); cax creates one only when asked "
                              "(cax run add --create-runs-db)")
        log.warning("creating a new, empty embedded runs DB at %s", path)
    try:
        client = EmbeddedClient(path, read_only=read_only)
        client.admin_ping()
    except (OSError, PyMongoError) as exc:  # PyMongoError: the store's file is unusable
        raise RunsDBError(f"embedded runs DB at {path}: {exc}") from exc
    runsdb = RunsDB(client[db_name], runs_collection, read_only=read_only,
                    server_time=client.server_time)
    client.listener = runsdb.count_round_trip
    client.documents_listener = runsdb.count_documents_returned
    runsdb.client = client
    runsdb.ensure_indexes()
    log.debug("runs DB: embedded store at %s", path.resolve())
    return runsdb


#: A claim or registration acknowledged by a primary that then fails over must not be lost
#: (w=majority, journaled); a write cut by a failover is retried once by the driver, and the
#: server answers the retry with the first attempt's result (retryable writes), so a claim is
#: never made twice; reads go to the primary, where the leases are written.
DURABILITY = {"retryWrites": True, "retryReads": True, "w": "majority", "journal": True,
              "readPreference": "primary"}


def durability_defaults(uri: str) -> dict[str, Any]:
    """DURABILITY, less what the URI sets itself: pymongo lets a keyword argument win over the
    URI, and a site's URI (``?w=1``, ``?readPreference=nearest``) is the site's choice."""
    query = urlsplit(uri).query
    named = {name.lower() for name, _ in parse_qsl(query)}
    return {name: value for name, value in DURABILITY.items() if name.lower() not in named}


def _open_server(uri: str, db_name: str, runs_collection: str, read_only: bool,
                 check: bool) -> RunsDB:
    full = with_password(uri)
    counter = _RoundTripCounter()
    client = MongoClient(full, tz_aware=True, serverSelectionTimeoutMS=SERVER_TIMEOUT_MS,
                         connectTimeoutMS=SERVER_TIMEOUT_MS, socketTimeoutMS=120_000,
                         event_listeners=[counter], appname="cax",
                         **durability_defaults(uri))
    runsdb = RunsDB(client[db_name], runs_collection, read_only=read_only,
                    server_time=lambda: client.admin.command("hello")["localTime"])
    counter.runsdb = runsdb
    runsdb.client = client
    if check:
        try:
            with pymongo.timeout(START_CHECK_S):
                client.admin.command("ping")
        except PyMongoError as exc:
            client.close()
            raise RunsDBError(f"runs DB {redact(uri)} (key 'runs_db') is unreachable: "
                              f"{short_cause(exc)}") from None
    runsdb.ensure_indexes()
    log.debug("runs DB: %s database %s", redact(uri), db_name)
    return runsdb
