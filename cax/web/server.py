"""Run ``cax web``: open the runs DB read-only, check who may connect, serve with waitress.

The start-up is where the safety decisions are made and said: a bind address that is not
loopback needs a secret from the environment (``cax.web.auth``), and the first lines printed
say where the website is and who may read it.  waitress serves a few threads; the runs DB
connection is shared by them (pymongo's client is thread-safe, the embedded store serialises
its operations).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping

from waitress.server import BaseWSGIServer, MultiSocketServer, create_server

from cax.config import Config
from cax.errors import ConfigError
from cax.runsdb import RunsDB, open_runsdb
from cax.runsdb.connect import redact
from cax.web import views
from cax.web.app import create_app
from cax.web.auth import Credentials, check_bind, is_loopback

log = logging.getLogger(__name__)

THREADS = 4


def url_of(bind: str, port: int) -> str:
    host = f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind
    return f"http://{host}:{port}/"


def listening(server: MultiSocketServer | BaseWSGIServer) -> list[tuple[str, int]]:
    """(host, port) of each socket ``server`` listens on: several where the bind name has
    several addresses (``localhost``: 127.0.0.1 and ::1 on most machines)."""
    if isinstance(server, MultiSocketServer):
        return list(server.effective_listen)
    # waitress sets these on every single server; types-waitress does not declare them
    return [(server.effective_host, server.effective_port)]  # type: ignore[attr-defined]


def urls_of(bind: str, sockets: list[tuple[str, int]]) -> str:
    """Where to browse: ``bind`` and the port, or each address when their ports differ."""
    ports = {port for _, port in sockets}
    if len(ports) == 1:
        return url_of(bind, ports.pop())
    return " and ".join(url_of(host, port) for host, port in sockets)


def warm(db: RunsDB) -> float:
    """Ask the throughput query once before serving, so the first visitor does not wait for
    the embedded store to read every run (it remembers what the query did not match, for the
    rest of the day); return the seconds it took."""
    t0 = time.monotonic()
    views.throughput(db)
    return time.monotonic() - t0


class DailyWarmer(threading.Thread):
    """Warm the throughput query again just after each midnight (UTC), when its window moves
    and the store's memory of the old one no longer serves: the day's first visitor then
    finds it warm too."""

    #: Seconds after midnight to warm at (the runs DB's clock may be a little behind ours).
    AFTER_MIDNIGHT_S = 5.0

    def __init__(self, db: RunsDB,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)):
        super().__init__(name="cax-web-warmer", daemon=True)
        self.db = db
        self.clock = clock
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            now = self.clock()
            midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(),
                                           dt.timezone.utc)
            if self.stopped.wait((midnight - now).total_seconds() + self.AFTER_MIDNIGHT_S):
                return
            try:
                log.info("throughput query warmed for the new day in %.1f s", warm(self.db))
            except Exception as exc:  # a runs-DB outage: the page reports it when asked
                log.warning("throughput query not warmed: %s", exc)


def serve(config: Config, *, bind: str, port: int, announce: Callable[[str], None],
          env: Mapping[str, str] | None = None, threads: int = THREADS) -> int:
    """Serve the website until interrupted; return the exit status (0).

    Raises ConfigError when it must not or cannot listen (a network address without a secret,
    a port in use), RunsDBError when the runs DB cannot be opened.
    """
    credentials = Credentials.from_env(os.environ if env is None else env)
    check_bind(bind, credentials)
    db = open_runsdb(config.runs_db, config.runs_db_name, config.runs_collection,
                     read_only=True)
    slow_db = None
    try:
        slow_db = open_runsdb(config.runs_db, config.runs_db_name, config.runs_collection,
                              read_only=True)
        took = warm(db)
        log.info("runs DB %s read for the throughput page in %.1f s", redact(config.runs_db),
                 took)
        app = create_app(config, db, credentials, slow_db=slow_db,
                         loopback_only=is_loopback(bind))
        try:
            server = create_server(app, host=bind, port=port, threads=threads,
                                   ident="cax", clear_untrusted_proxy_headers=True)
        except OSError as exc:
            raise ConfigError(f"--bind {bind} --port {port}: cannot listen there: "
                              f"{exc.strerror or exc}") from None
        announce(f"cax web: serving the runs DB {redact(config.runs_db)} read-only on "
                 f"{urls_of(bind, listening(server))}")
        announce(f"cax web: {credentials.describe()}")
        warmer = DailyWarmer(db)
        warmer.start()
        try:
            server.run()
        except KeyboardInterrupt:
            log.info("cax web: interrupted, stopping")
        finally:
            warmer.stopped.set()
            server.close()
    finally:
        db.close()
        if slow_db is not None:
            slow_db.close()
    return 0
