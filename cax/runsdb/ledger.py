"""The ledger: every change of a ``data[]`` entry, each a named transition.

Every writer -- the tasks, processing, tape, ``run add``, ``retry``, ``cax-mv``, ``cax-rm``,
``cax-stray`` -- changes entries only through these functions, which check the ledger's
invariants in the same atomic write (or under the claim):

a. a (host, location) is named by at most one entry of all runs (the unique index of places,
   and ``check_place_free`` for a clear message first);
b. a location's last component is its run's dataset name (``entries.check_dataset_name``);
c. an entry becomes ``transferred`` only with checksums equal to its dataset's origin, or as
   the origin with its producer's evidence (``register_verified`` and its ``Proof``).

A claim is one atomic ``find_one_and_update`` that sets a lease (owner, token, expiry) which
any daemon may take over once it has expired; later writes match the entry by its identity
and by owner *and* token, so a daemon that lost its lease can change nothing.

Entries are addressed by MongoDB's filtered positional operator (``data.$[e]`` with
``arrayFilters`` naming the entry's identity, MongoDB 3.6+, which pymongo 4 requires anyway),
never by the positional ``$``: the writes combine conditions on several arrays (the entry, the
copies it requires, the run's ``origins``), where the manual calls ``$`` ambiguous.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pymongo import ReturnDocument

from cax.runsdb.base import LocationTakenError, db_call
from cax.runsdb.entries import (
    ERROR,
    PURGING,
    TRANSFERRED,
    TRANSFERRING,
    VERIFYING,
    EntryKey,
    at_entry,
    check_dataset_name,
    entry_filter,
    find_entry,
    place_key,
    run_label,
)
from cax.runsdb.judgement import good_entry
from cax.runsdb.manifests import Manifests
from cax.runsdb.origins import Proof, dataset_match

log = logging.getLogger(__name__)

#: Events kept in an entry's ``history`` (claims taken over, failures, resets by a person).
HISTORY_KEPT = 20
#: Fields of a lease; dropped together when work ends.
LEASE_FIELDS = ("lease_owner", "lease_expires", "lease_token")
#: Fields describing a failure; dropped when the entry is registered good.
FAILURE_FIELDS = ("error", "error_kind", "next_attempt", "config_hash")
#: Kinds of failure: ``transient`` is retried with backoff up to ``max_attempts``;
#: ``permanent`` (retrying alone cannot fix it) and ``config`` (the configuration is wrong)
#: are retried once the configuration changed (its hash differs from ``config_hash``), or
#: when a person retries them (``cax retry``).
FAILURE_KINDS = ("transient", "permanent", "config")


def lease_free(now: dt.datetime) -> dict[str, Any]:
    """Condition inside ``$elemMatch``: no lease, or one that has expired."""
    return {"$not": {"$gt": now}}


@dataclass
class Claim:
    """A lease on one entry, held by ``owner`` for one attempt, named by ``token``.

    Every later write of the work (renew, register, failure, release) matches the entry by
    owner *and* token, so a daemon whose lease was taken over -- even by another thread of the
    same process -- can change nothing.  Scratch paths derive from the token, so two owners
    never write the same bytes.
    """

    run_id: Any
    key: EntryKey
    owner: str
    token: str
    attempts: int
    entry: dict[str, Any]
    #: The entry before this claim (None: this claim added it).
    previous: dict[str, Any] | None = None

    @property
    def takeover(self) -> bool:
        """Whether this claim took over work whose owner let its lease expire."""
        return bool(self.previous and self.previous.get("lease_owner")
                    and self.previous.get("status") in (TRANSFERRING, PURGING))


def good_elsewhere(run: dict[str, Any], key: EntryKey) -> bool:
    """Whether another site holds a good copy of ``key``'s dataset (one to repair from)."""
    return any(good_entry(run, EntryKey.of(e)) for e in run.get("data") or ()
               if isinstance(e, dict) and e.get("host") != key.host and e.get("type") == key.type
               and "host" in e and (key.version is None or e.get("pax_version") == key.version))


def history_event(now: dt.datetime, event: str, by: str, detail: str | None = None
                  ) -> dict[str, Any]:
    """Return one ``history`` record: what happened to an entry, when, by whom."""
    record = {"time": now, "event": event, "by": by}
    if detail:
        record["detail"] = detail[:300]
    return record


class Ledger(Manifests):
    """The entry transitions of the runs DB."""

    @db_call
    def check_place_free(self, host: Any, location: str, run_id: Any = None,
                         key: EntryKey | None = None) -> None:
        """Raise LocationTakenError if an entry of any run (but entry ``key`` of ``run_id``)
        names ``location`` at ``host`` -- with or without the final slash the original kept."""
        for run in self.find_runs_with_location(host, location.rstrip("/")):
            for entry in run.get("data") or ():
                if entry.get("host") != host or not isinstance(entry.get("location"), str) \
                        or entry["location"].rstrip("/") != location.rstrip("/"):
                    continue
                if run["_id"] == run_id and key is not None and EntryKey.of(entry) == key:
                    continue
                raise LocationTakenError(
                    f"{location} at {host} is already the location of {run_label(run)}'s "
                    f"{entry.get('type')} entry ({entry.get('status')}); one place holds one "
                    "dataset")

    @db_call
    def find_runs_with_location(self, host: str, location: str,
                                number: int | None = None) -> list[dict[str, Any]]:
        """Return the runs (with ``number`` if given) with an entry at ``host`` at ``location``."""
        places = [location, location + "/"]  # the original cax sometimes kept a final slash
        query: dict[str, Any] = {"data": {"$elemMatch": {"host": host,
                                                         "location": {"$in": places}}}}
        if number is not None:
            query["number"] = number
        return self.find_runs(query)

    @db_call
    def add_entry(self, run_id: Any, entry: dict[str, Any]) -> bool:
        """Add ``entry`` to the run unless an entry with its identity exists; say if added."""
        key = EntryKey.of(entry)
        query = {"_id": run_id, "data": {"$not": key.elem_match()}}
        if self._skip("add entry", run_id, key):
            return self.runs.count_documents(query) == 1
        return self.runs.update_one(query, {"$push": {"data": entry}}).modified_count == 1

    @db_call
    def claim_purge(self, run_id: Any, key: EntryKey, *, keep: Sequence[tuple[EntryKey, dict]],
                    owner: str, lease_s: float,
                    where: Sequence[dict[str, Any]] = ()) -> Claim | None:
        """Atomically turn our verified copy into ``purging`` (leased) while ``keep`` holds
        and nobody reads it.

        ``keep`` names the other copies the purge decision counted, each with extra conditions
        (e.g. its checksum); every one must still be ``transferred`` in the same write, so two
        sites purging each other's "other copy" at the same instant cannot both win.  No entry
        of the run may be at work (``transferring`` under a live lease) ``reading`` our copy:
        a push, pull, repair, processing job or tape backup still reading it.  Returns the
        claim, or None if anything changed.
        """
        now = self.now()
        reader = {f"reading.{name}": value for name, value in key.match().items()}
        requires = [(other, {"status": TRANSFERRED, **extra}) for other, extra in keep]
        token = secrets.token_hex(4)
        values = {"status": PURGING, "lease_owner": owner, "lease_token": token,
                  "lease_expires": now + dt.timedelta(seconds=lease_s), "modified_time": now}
        if self._skip("claim purge", run_id, key, owner):
            return None
        before = self._update_entry(
            run_id, key, {"status": TRANSFERRED, "lease_expires": lease_free(now)},
            {"$set": values}, requires,
            excludes=[{"status": TRANSFERRING, **reader, "lease_expires": {"$gt": now}}],
            where=where)
        if before is None:
            return None
        return Claim(run_id, key, owner, token, int(before.get("attempts") or 0),
                     {**copy.deepcopy(before), **values}, before)

    # -- claimed work: the transitions of an entry under a lease -----------------------------

    def _update_entry(self, run_id: Any, key: EntryKey, conditions: dict[str, Any],
                      update: dict[str, dict[str, Any]],
                      requires: Sequence[tuple[EntryKey, dict[str, Any]]] = (),
                      excludes: Sequence[dict[str, Any]] = (),
                      where: Sequence[dict[str, Any]] = (),
                      run_update: dict[str, dict[str, Any]] | None = None
                      ) -> dict[str, Any] | None:
        """Atomically apply ``update`` (paths relative to the entry) to the entry ``key`` if it
        meets ``conditions``, every ``requires`` entry meets its own, no entry of the run
        matches any of ``excludes`` and the run meets every ``where`` (conditions on other
        fields, e.g. its ``origins``); ``run_update`` (paths relative to the run) goes into the
        same write.  Return the entry as it was before, or None."""
        query = {"_id": run_id, "$and": [{"data": key.elem_match(**conditions)}] + [
            {"data": other.elem_match(**extra)} for other, extra in requires] + [
            {"data": {"$not": {"$elemMatch": cond}}} for cond in excludes] + list(where)}
        body = at_entry(update)
        for op, fields in (run_update or {}).items():
            body.setdefault(op, {}).update(fields)
        before = self.runs.find_one_and_update(query, body, {"data": 1},
                                               return_document=ReturnDocument.BEFORE,
                                               array_filters=entry_filter(key))
        return find_entry(before, key) if before is not None else None

    @db_call
    def claim(self, run_id: Any, key: EntryKey, *, owner: str, lease_s: float,
              statuses: Iterable[str] = (), conditions: dict[str, Any] | None = None,
              fields: dict[str, Any] | None = None, new_entry: dict[str, Any] | None = None,
              requires: Sequence[tuple[EntryKey, dict[str, Any]]] = (),
              where: Sequence[dict[str, Any]] = (), run: dict[str, Any] | None = None,
              count_attempt: bool = True) -> Claim | None:
        """Lease the entry ``key`` for one attempt of work; None if another daemon has it.

        With ``new_entry`` the entry is added (with ``fields`` and the lease) when the run has
        none with its identity.  Otherwise, or if one exists, it is taken when its status is in
        ``statuses``, its lease (if any) has expired by the runs DB's clock and it meets
        ``conditions``; ``count_attempt`` counts the claim in ``attempts`` (a takeover of an
        expired lease is an attempt too).  Every ``requires`` entry must meet its conditions,
        and the run every ``where`` condition, in the same atomic write (e.g. the source copy
        is still ``transferred``).

        A claim that sets a ``location`` must name ``run`` (its name and detector): the place
        must name the run's dataset (invariant (b), UnsafeNameError), and no other entry of any
        run may name it (invariant (a): the unique index of places refuses it in the write,
        LocationTakenError).
        """
        now = self.now()
        token = secrets.token_hex(4)
        lease = {"lease_owner": owner, "lease_expires": now + dt.timedelta(seconds=lease_s),
                 "lease_token": token, "modified_time": now}
        fields = dict(fields or {})
        location = fields.get("location", (new_entry or {}).get("location"))
        if location is not None:
            if run is None:
                raise ValueError("a claim that sets a location must name its run")
            check_dataset_name(run, location)
        required = [{"data": other.elem_match(**extra)} for other, extra in requires]
        required += list(where)
        if new_entry is not None:
            entry = {**key.match(), "creation_time": now, "attempts": 1, **new_entry, **fields,
                     **lease}
            query = {"_id": run_id, "$and": [{"data": {"$not": key.elem_match()}}, *required]}
            if self._skip("add entry", run_id, key):
                added = self.runs.count_documents(query) == 1
            else:
                push: dict[str, dict[str, Any]] = {"$push": {"data": entry}}
                if location is not None:
                    push["$addToSet"] = {"places": place_key(key.host, location)}
                added = self.runs.update_one(query, push).modified_count == 1
            if added:
                return Claim(run_id, key, owner, token, 1, entry, None)
        statuses = list(statuses)
        if not statuses:
            return None
        match = {"status": {"$in": statuses}, "lease_expires": lease_free(now),
                 **(conditions or {})}
        if self._skip("claim", run_id, key, owner):
            found = self.runs.find_one({"_id": run_id, "$and": [
                {"data": key.elem_match(**match)}, *required]}, {"data": 1})
            before = find_entry(found, key) if found else None
        else:
            update: dict[str, dict[str, Any]] = {"$set": {**fields, **lease}}
            if count_attempt:
                update["$inc"] = {"attempts": 1}
            if {TRANSFERRING, PURGING} & set(statuses):  # only an expired lease lets us in
                # first: the embedded engine applies operators in order, and $set changes
                # fields the filter matched on
                update = {"$push": {"history": {
                    "$each": [history_event(now, "takeover", owner, "the previous lease expired")],
                    "$slice": -HISTORY_KEPT}}, **update}
            before = self._update_entry(
                run_id, key, match, update, requires, where=where,
                run_update={"$addToSet": {"places": place_key(key.host, location)}}
                if location is not None else None)
        if before is None:
            return None
        attempts = int(before.get("attempts") or 0) + (1 if count_attempt else 0)
        entry = {**copy.deepcopy(before), **fields, **lease, "attempts": attempts}
        return Claim(run_id, key, owner, token, attempts, entry, before)

    def _ours(self, claim: Claim) -> dict[str, Any]:
        return {"lease_owner": claim.owner, "lease_token": claim.token}

    @db_call
    def renew(self, claim: Claim, lease_s: float) -> bool:
        """Extend the lease; False means it was taken over and the work must stop."""
        if self._skip("renew lease", claim.run_id, claim.key):
            return True
        now = self.now()
        result = self.runs.update_one(
            {"_id": claim.run_id, "data": claim.key.elem_match(**self._ours(claim))},
            at_entry({"$set": {"lease_expires": now + dt.timedelta(seconds=lease_s),
                               "modified_time": now}}),
            array_filters=entry_filter(claim.key))
        return result.matched_count == 1

    def _finish(self, claim: Claim, what: str, fields: dict[str, Any], unset: Iterable[str],
                event: dict[str, Any] | None = None, where: Sequence[dict[str, Any]] = (),
                run_update: dict[str, dict[str, Any]] | None = None) -> bool:
        """One write that ends (or changes) claimed work, only while the claim is ours (and
        the run meets ``where``; ``run_update`` changes run fields in the same write)."""
        if self._skip(what, claim.run_id, claim.key, fields):
            return True
        update: dict[str, Any] = {"$set": dict(fields)}
        if event:
            update["$push"] = {"history": {"$each": [event], "$slice": -HISTORY_KEPT}}
        to_unset = [name for name in unset if name not in fields]
        if to_unset:
            update["$unset"] = {name: "" for name in to_unset}
        before = self._update_entry(claim.run_id, claim.key, self._ours(claim), update,
                                    where=where, run_update=run_update)
        return before is not None

    @db_call
    def renew_leases(self, key: EntryKey, owner: str, lease_s: float) -> int:
        """Extend, in one write, every lease ``owner`` holds on an entry ``key``; return how
        many runs' leases were renewed."""
        if self._skip("renew leases", key, owner):
            return 0
        now = self.now()
        result = self.runs.update_many(
            {"data": key.elem_match(lease_owner=owner)},
            at_entry({"$set": {"lease_expires": now + dt.timedelta(seconds=lease_s),
                               "modified_time": now}}),
            array_filters=[{**entry_filter(key)[0], "e.lease_owner": owner}])
        return result.modified_count

    @db_call
    def give_back(self, claim: Claim) -> bool:
        """Undo a claim whose work never started (the batch queue was full): the entry as it
        was before the claim (``claim.previous``: status, attempts, failure), without a lease;
        an entry the claim added is removed."""
        if claim.previous is None:
            return self.remove_claimed(claim, TRANSFERRING)
        kept = {k: v for k, v in claim.previous.items()
                if k not in (*LEASE_FIELDS, "history", *claim.key.match())}
        added = [k for k in claim.entry if k not in claim.previous]
        return self._finish(claim, "give back", kept, [*LEASE_FIELDS, *added])

    @db_call
    def update_claimed(self, claim: Claim, fields: dict[str, Any]) -> bool:
        """Set fields of an entry we hold (e.g. a batch job id), keeping the lease."""
        return self._finish(claim, "update", {**fields, "modified_time": self.now()}, ())

    @db_call
    def register_verified(self, claim: Claim, fields: dict[str, Any],
                          unset: Iterable[str] = (), *, proof: Proof) -> bool:
        """Mark the work's result good (``transferred``) -- only if the claim is still ours and
        ``proof`` still holds in the same write (invariant (c) of the ledger).

        The caller has verified every checksum; ``fields`` carry them (checksum, size, ...) and
        ``evidence`` (how it was verified, see ``origins``).  A producer's registration
        (``proof.establishes``) records the dataset's origin in this same write, once.
        False means the claim was lost, or the origin changed, and nothing was written.
        """
        now = self.now()
        fields = {"status": TRANSFERRED, "verified_time": now, "modified_time": now, **fields}
        dataset = dataset_match(claim.key.type, claim.key.version)
        run_update = None
        if proof.establishes is not None:
            where = [{"origins": {"$not": {"$elemMatch": dataset}}}]
            run_update = {"$push": {"origins": proof.establishes}}
        elif proof.matches is not None:
            where = [{"origins": {"$elemMatch": {**dataset,
                                                 "checksum": proof.matches["checksum"]}}}]
        else:
            where = [{"origins": {"$not": {"$elemMatch": dataset}}}]
        return self._finish(claim, "register", fields,
                            [*LEASE_FIELDS, *FAILURE_FIELDS, *unset], where=where,
                            run_update=run_update)

    @db_call
    def record_failure(self, claim: Claim, reason: str, *, kind: str,
                       retry_at: dt.datetime | None, config_hash: str | None = None,
                       fields: dict[str, Any] | None = None, unset: Iterable[str] = ()) -> bool:
        """Mark the attempt failed (``error``) and drop the lease, only if still ours.

        ``retry_at`` None means no automatic retry: the entry waits for a person, or (kind
        ``config``) for the configuration to change.
        """
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}")
        now = self.now()
        values = {"status": ERROR, "error": reason, "error_kind": kind, "next_attempt": retry_at,
                  "modified_time": now, **(fields or {})}
        if config_hash:
            values["config_hash"] = config_hash
        return self._finish(claim, "failure", values, [*LEASE_FIELDS, *unset],
                            history_event(now, "failed", claim.owner, reason))

    @db_call
    def release(self, claim: Claim, fields: dict[str, Any] | None = None,
                unset: Iterable[str] = ()) -> bool:
        """Drop the lease (keeping the status), only if still ours."""
        return self._finish(claim, "release", {"modified_time": self.now(), **(fields or {})},
                            [*LEASE_FIELDS, *unset])

    @db_call
    def relocate(self, claim: Claim, run: dict[str, Any], location: str) -> bool:
        """Record the new location of a copy we hold (``cax-mv``) and release it.

        The new place must name the run's dataset and be named by no other entry (invariants
        (a) and (b); the unique index of places re-checks the second in the write).  The old
        place is given up after the new one is recorded.
        """
        check_dataset_name(run, location)
        self.check_place_free(claim.key.host, location, claim.run_id, claim.key)
        old = (claim.entry or {}).get("location")
        done = self._finish(claim, "relocate", {"location": location,
                                                "modified_time": self.now()}, LEASE_FIELDS,
                            run_update={"$addToSet": {"places": place_key(claim.key.host,
                                                                          location)}})
        if done and isinstance(old, str) and not self.read_only:
            self.runs.update_one({"_id": claim.run_id},
                                 {"$pull": {"places": place_key(claim.key.host, old)}})
        return done

    @db_call
    def remove_entry(self, run_id: Any, key: EntryKey, *, by: str) -> dict[str, Any] | None:
        """Unregister the entry ``key`` of a run without touching its data (``cax run remove``).

        Refused (None) while a live lease holds it.  If the entry was its dataset's producer
        (the origin is recorded at its site) and no other copy agrees with that origin, the
        origin goes with it: a mistaken registration must not stay the truth.  Returns the
        removed entry.
        """
        now = self.now()
        run = self.runs.find_one({"_id": run_id}, {"data": 1, "origins": 1, "number": 1,
                                                   "name": 1})
        entry = find_entry(run, key) if run else None
        if entry is None:
            return None
        if self._skip("remove entry", run_id, key, by):
            return entry
        cond = {**key.match(), "lease_expires": lease_free(now)}
        pull: dict[str, Any] = {"data": cond}
        if isinstance(entry.get("location"), str):
            pull["places"] = place_key(key.host, entry["location"])
        done = self.runs.update_one({"_id": run_id, "data": key.elem_match(
            lease_expires=lease_free(now))}, {"$pull": pull}).modified_count == 1
        if not done:
            return None
        self.remove_manifest(run_id, key)
        dataset = dataset_match(key.type, key.version)
        alike = {**dataset, "status": TRANSFERRED}
        self.runs.update_one(
            {"_id": run_id, "origins": {"$elemMatch": {**dataset, "host": key.host}},
             "data": {"$not": {"$elemMatch": alike}}},
            {"$pull": {"origins": dataset}})
        log.info("%s: %s unregistered by %s (data left in place)", run_label(run), key, by)
        return entry

    @db_call
    def remove_claimed(self, claim: Claim, status: str) -> bool:
        """Remove the entry we hold in ``status`` (a finished purge)."""
        if self._skip("remove entry", claim.run_id, claim.key):
            return True
        cond = {**claim.key.match(), **self._ours(claim), "status": status}
        pull: dict[str, Any] = {"data": cond}
        location = (claim.entry or {}).get("location")
        if isinstance(location, str):
            pull["places"] = place_key(claim.key.host, location)
        return self.runs.update_one({"_id": claim.run_id, "data": {"$elemMatch": cond}},
                                    {"$pull": pull}).modified_count == 1

    @db_call
    def flag_bad_copy(self, claim: Claim, *, reference: str, expected: str | None, reason: str,
                      failures: int, retry_at: dt.datetime | None) -> bool:
        """Take a copy found to differ from its dataset's origin out of ``transferred``.

        ``retry_at``: when a repair is due (now, if a good copy exists; later, if the dataset's
        origin is not settled yet); None: no good copy exists, so the copy is flagged and kept
        (nothing deleted: it may be the last copy of those bytes) and waits for a person.
        """
        now = self.now()
        fields = {"status": ERROR, "checksum_problem": reference, "expected_checksum": expected,
                  "checksum_failures": failures, "error": reason, "modified_time": now,
                  "error_kind": "transient" if retry_at else "permanent",
                  "attempts": 0, "next_attempt": retry_at}
        return self._finish(claim, "flag bad copy", fields, [*LEASE_FIELDS, "compared_checksum"],
                            history_event(now, "bad copy", claim.owner, reason))

    @db_call
    def record_permissions(self, run_id: Any, key: EntryKey, digest: str) -> bool:
        """Record which permission settings were applied to a copy (SetPermission)."""
        if self._skip("permissions", run_id, key, digest):
            return True
        return self.runs.update_one({"_id": run_id, "data": key.elem_match()},
                                    at_entry({"$set": {"permissions_applied": digest}}),
                                    array_filters=entry_filter(key)).matched_count == 1

    @db_call
    def record_compared(self, run_id: Any, key: EntryKey, token: str, compared_with: list[str],
                        *, disputed: str | None = None) -> bool:
        """Record that a copy was judged against its dataset's origin in the state ``token``
        and ``compared_with`` name (its checksum and its origin's, the other copies'), so it
        needs no lease: a stale write cannot hide a change.  ``disputed`` marks the copy as
        part of a dispute; None clears the mark."""
        if self._skip("compared", run_id, key, token):
            return True
        values: dict[str, Any] = {"compared_checksum": token, "compared_with": compared_with}
        if disputed:
            values["disputed"] = disputed
        unset = {"checksum_failures": "", **({} if disputed else {"disputed": ""})}
        return self.runs.update_one({"_id": run_id, "data": key.elem_match()},
                                    at_entry({"$set": values, "$unset": unset}),
                                    array_filters=entry_filter(key)).matched_count == 1

    @db_call
    def reset_entry(self, run_id: Any, key: EntryKey, *, by: str,
                    now: dt.datetime | None = None) -> bool:
        """Make a stuck entry retryable at the next pass (``cax retry``); deletes nothing.

        * ``error`` (attempts used up, a permanent or configuration error, a bad copy flagged
          and kept): attempts and failure kind are cleared and the retry is due now -- a copy
          is copied (or repaired) again, a processed entry gets a new job; raw data the DAQ put
          at this site (no ``source``, not a bad copy) goes back to ``verifying``, so AddChecksum
          checks it again against its recorded checksum and its dataset's origin;
        * ``transferring`` whose lease expired (its daemon died), or a lease-less one of the
          original cax: becomes a due ``error``, so the tasks take it up again;
        * ``purging`` whose lease expired: the lease is dropped, so the purge is finished.

        An entry under a live lease is not touched.  Who and when go into ``history``.
        Returns whether the entry was reset.
        """
        now = now or self.now()
        run = self.runs.find_one({"_id": run_id}, {"data": 1, "origins": 1})
        entry = find_entry(run, key) if run else None
        if entry is None:
            return False
        status = entry.get("status")
        event = history_event(now, "retry", by, f"was {status}")
        unset: list[str] = list(LEASE_FIELDS)
        if status == ERROR:
            cond: dict[str, Any] = {"status": ERROR, "lease_expires": lease_free(now)}
            fields: dict[str, Any] = {"attempts": 0, "next_attempt": now,
                                      "checksum_failures": 0, "modified_time": now}
            if entry.get("type") == "raw" and "source" not in entry \
                    and not (entry.get("checksum_problem") and good_elsewhere(run, key)):
                fields["status"] = VERIFYING  # nothing to repair from: read what is there
                del fields["next_attempt"]
                unset += ["next_attempt", "checksum_problem", "expected_checksum"]
            unset += ["error_kind", "config_hash"]
        elif status in (TRANSFERRING, PURGING) and entry.get("lease_expires") is not None:
            cond = {"status": status, "lease_expires": {"$lt": now}}
            fields = {"modified_time": now}
            if status == TRANSFERRING:
                owner = entry.get("lease_owner") or "a daemon"
                fields.update(status=ERROR, attempts=0, next_attempt=now, error_kind="transient",
                              error=f"lease of {owner} expired; reset by {by}")
        elif status == TRANSFERRING and "lease_owner" not in entry:  # the original's, stalled
            cond = {"status": status, "lease_owner": {"$exists": False},
                    "lease_expires": {"$exists": False}}
            fields = {"modified_time": now, "status": ERROR, "attempts": 0, "next_attempt": now,
                      "error_kind": "transient",
                      "error": f"a stalled transfer of the original cax; reset by {by}"}
        else:
            return False
        query = {"_id": run_id, "data": key.elem_match(**cond)}
        update = at_entry({"$set": fields, "$unset": {k: "" for k in unset if k not in fields},
                           "$push": {"history": {"$each": [event], "$slice": -HISTORY_KEPT}}})
        if self._skip("reset", run_id, key, by):
            return self.runs.count_documents(query) == 1
        return self.runs.update_one(query, update,
                                    array_filters=entry_filter(key)).matched_count == 1
