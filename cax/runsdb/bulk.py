"""The ledger's transitions for many entries in one round trip each.

A pass after importing the original's runs DB has 100,000 copies to size and 10,000 to scrub;
one write each (a commit and its fsyncs on the embedded store, a round trip on a server) made
the runs DB the bottleneck of that pass.  These are the same transitions as the ledger's
single ones, sent as one ``bulk_write`` of conditional updates, whose answer says how many
matched, not which.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from pymongo import UpdateOne

from cax.runsdb.base import db_call
from cax.runsdb.entries import TRANSFERRED, EntryKey, at_entry, entry_filter, find_entry
from cax.runsdb.ledger import LEASE_FIELDS, Claim, Ledger, lease_free


def entry_update(query: dict[str, Any], update: dict[str, Any], key: EntryKey) -> UpdateOne:
    """One conditional update of the entry ``key`` (its paths ``data.$[e]``), for bulk_write."""
    filters: list[Mapping[str, Any]] = list(entry_filter(key))
    return UpdateOne(query, update, array_filters=filters)


class BulkLedger(Ledger):
    """The ledger, with its transitions for many entries at once."""

    @db_call
    def record_sizes(self, sizes: Sequence[tuple[Any, EntryKey, int, int, bool]]) -> int:
        """Set ``size`` and ``file_count`` of copies still ``transferred`` -- ``(run id, key,
        size, file_count, raw_size)``, ``raw_size`` True to also set a raw copy's size as its
        run's unset ``raw_size_byte`` (if another writer set it first, the copy waits for the
        next pass) -- one request each, all in one round trip (AddSize after an import:
        100,000 copies).  Returns how many changed something; a batch that failed is sent
        again whole at the next pass."""
        if not sizes or self._skip("sizes of", len(sizes), "copies"):
            return 0
        requests = []
        for run_id, key, size, file_count, raw_size in sizes:
            query = {"_id": run_id, "data": key.elem_match(status=TRANSFERRED),
                     **({"raw_size_byte": {"$exists": False}} if raw_size else {})}
            update = at_entry({"$set": {"size": size, "file_count": file_count}})
            if raw_size:
                update["$set"]["raw_size_byte"] = size
            requests.append(entry_update(query, update, key))
        return int(self.runs.bulk_write(requests, ordered=False).modified_count)

    @db_call
    def claim_each(self, wanted: Sequence[tuple[Any, EntryKey, dict[str, Any]]], *, owner: str,
                   lease_s: float, statuses: Sequence[str]) -> list[Claim | None]:
        """``claim`` of many existing entries ``(run id, key, conditions)`` -- no attempt
        counted, no fields set -- in two round trips, not one each: the conditional writes in
        one bulk, then one read of which leases carry our tokens.  For work on many small
        copies (Scrub after an import: 10,000 of them in a pass).  ``previous`` of such a
        claim is the entry without its lease (any lease it had had expired)."""
        if self.read_only:
            return [self.claim(run_id, key, owner=owner, lease_s=lease_s, statuses=statuses,
                               conditions=conditions, count_attempt=False)
                    for run_id, key, conditions in wanted]
        now = self.now()
        tokens = [secrets.token_hex(4) for _ in wanted]
        requests = [entry_update(
            {"_id": run_id, "data": key.elem_match(status={"$in": list(statuses)},
                                                   lease_expires=lease_free(now), **conditions)},
            at_entry({"$set": {"lease_owner": owner, "lease_token": token, "modified_time": now,
                               "lease_expires": now + dt.timedelta(seconds=lease_s)}}), key)
            for (run_id, key, conditions), token in zip(wanted, tokens, strict=True)]
        if not requests or not self.runs.bulk_write(requests, ordered=False).modified_count:
            return [None] * len(wanted)
        runs = {run["_id"]: run for run in self.runs.find(
            {"_id": {"$in": list({run_id for run_id, _, _ in wanted})}}, {"data": 1})}
        claims: list[Claim | None] = []
        for (run_id, key, _), token in zip(wanted, tokens, strict=True):
            run = runs.get(run_id)
            entry = find_entry(run, key) if run is not None else None
            if entry is None or entry.get("lease_token") != token:
                claims.append(None)
                continue
            previous = {k: v for k, v in entry.items() if k not in LEASE_FIELDS}
            claims.append(Claim(run_id, key, owner, token, int(entry.get("attempts") or 0),
                                entry, previous))
        return claims

    @db_call
    def release_each(self, releases: Sequence[tuple[Claim, dict[str, Any]]]) -> int:
        """``release`` of many claims with their fields, in one round trip; returns how many
        were still ours (a bulk write tells how many, not which)."""
        if not releases or self._skip("release", len(releases), "claims"):
            return len(releases)
        now = self.now()
        requests = [entry_update(
            {"_id": claim.run_id, "data": claim.key.elem_match(**self._ours(claim))},
            at_entry({"$set": {"modified_time": now, **fields},
                      "$unset": {name: "" for name in LEASE_FIELDS if name not in fields}}),
            claim.key) for claim, fields in releases]
        return int(self.runs.bulk_write(requests, ordered=False).matched_count)
