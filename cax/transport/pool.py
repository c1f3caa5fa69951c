"""Open transports, reused: one connection per remote site and worker thread.

A pass copies many datasets to the same few sites; setting up SSH for each would dominate the
time of small copies.  Transports are not thread-safe, so each worker thread keeps its own.
"""

from __future__ import annotations

import logging
import threading

from cax.config import Site
from cax.transport.base import Endpoint, Transport, open_transport

log = logging.getLogger(__name__)


def endpoint_for(site: Site, method: str | None = None) -> Endpoint:
    """Return how to reach ``site`` (by its own method unless ``method`` is given)."""
    return Endpoint(site=site.name, method=method or site.method, hostname=site.hostname,
                    port=site.port, username=site.username, key_file=site.key_file,
                    known_hosts=site.known_hosts, accept_new_host_keys=site.accept_new_host_keys,
                    remote_python=site.remote_python, streams=site.streams)


class TransportPool:
    """Transports by (thread, site); ``close_all`` at shutdown."""

    def __init__(self, stall_timeout_s: float):
        self.stall_timeout_s = stall_timeout_s
        self._local = threading.local()
        self._all: list[Transport] = []
        self._lock = threading.Lock()

    def _cache(self) -> dict[tuple[str, str], Transport]:
        if not hasattr(self._local, "cache"):
            self._local.cache = {}
        return self._local.cache

    def _open(self, site: Site, method: str) -> Transport:
        """This thread's transport for ``(site, method)``; a new one in place of one that was
        aborted (a keeper stopped its copy): an aborted transport refuses every later call
        until closed, and the worker thread would fail every copy to that site after it."""
        key = (site.name, method)
        cache = self._cache()
        if key in cache and cache[key].aborted:
            self._drop(cache.pop(key))
        if key not in cache:
            transport = open_transport(endpoint_for(site, method),
                                       stall_timeout_s=self.stall_timeout_s)
            cache[key] = transport
            with self._lock:
                self._all.append(transport)
        return cache[key]

    def get(self, site: Site) -> Transport:
        """Return this thread's transport to ``site``, opening it on first use."""
        return self._open(site, site.method)

    def local(self, site: Site) -> Transport:
        """Return filesystem operations on this machine (for pulls, the destination)."""
        return self._open(site, "local")

    def _drop(self, transport: Transport) -> None:
        with self._lock:
            if transport in self._all:
                self._all.remove(transport)
        try:
            transport.close()
        except Exception as exc:  # noqa: BLE001 - a broken transport must not stop the next
            log.debug("closing %r: %s", transport, exc)

    def close_all(self) -> None:
        with self._lock:
            transports, self._all = self._all, []
        for transport in transports:
            try:
                transport.close()
            except Exception as exc:  # noqa: BLE001 - closing must not stop a shutdown
                log.debug("closing %r: %s", transport, exc)
