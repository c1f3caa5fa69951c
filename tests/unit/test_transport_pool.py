"""The transport pool never hands out a transport that a keeper aborted."""

from __future__ import annotations

import json

from cax.config import load_config
from cax.transport.pool import TransportPool


def test_a_thread_gets_a_new_transport_after_its_last_copy_was_aborted(tmp_path):
    """A keeper that cannot renew its lease (a runs-DB outage longer than the lease) aborts the
    copy's transport, which then refuses every call until closed; the worker thread's next
    copy to that site must get a new one, or it fails every copy after the outage ("aborted")
    until the daemon restarts -- what the wire test of a killed server found."""
    (tmp_path / "cax.json").write_text(json.dumps({"runs_db": "file:db", "sites": [
        {"name": "lab", "method": "local", "dir_raw": str(tmp_path)}]}))
    site = load_config(tmp_path / "cax.json", "lab").site
    pool = TransportPool(stall_timeout_s=60)
    first = pool.get(site)
    assert pool.get(site) is first
    first.abort()
    second = pool.get(site)
    assert second is not first and not second.aborted
    (tmp_path / "a").write_bytes(b"x")
    second.put(tmp_path / "a", str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == b"x"
    pool.close_all()
