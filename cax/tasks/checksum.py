"""AddChecksum and CompareChecksums: know that every ``transferred`` copy is its dataset's origin.

* AddChecksum checksums copies at this site that wait in ``verifying`` (the DAQ registers new
  raw data that way) and registers them ``transferred``: verified against the checksum the
  entry carries (the DAQ's, or a legacy sha512 dirhash) and against the dataset's origin.  The
  DAQ's first verified read of a new run *is* the origin of its raw data, recorded in the same
  write.
* CompareChecksums judges each local copy against its dataset's origin (``runsdb.origins``),
  once per state of the evidence (``compared_checksum`` records it, and the query selects only
  copies whose evidence changed, so an idle pass fetches no runs).  For runs of the original cax,
  which have no recorded origin, it reads the local copy when the copies disagree: a copy whose
  own recorded checksum verifies on disk is trusted (evidence ``self``); one that does not is
  bad.  Strong copies that disagree make the dataset *disputed*, for a person.
* Scrub (cax/tasks/scrub.py) re-reads old copies from disk, within a byte budget per pass.

A copy found bad leaves ``transferred`` at once (``repair.mark_bad_copy``); a copy whose data
is missing becomes ``error`` so the copy tasks fetch it again.  Work that reads data holds a
lease on the entry, so two daemons never read the same copy and no purge deletes it meanwhile.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cax.checksum import (
    Manifest,
    dataset_checksum,
    diff_manifests,
    legacy_dirhash,
    scan_dataset,
    scan_with_dirhash,
    verifiable_kind,
)
from cax.claimed import FINAL_STEP_LEFT, Keeper
from cax.errors import DatasetError, LeaseLostError, UnsafeNameError
from cax.paths import entry_location
from cax.runsdb import TRANSFERRED, VERIFYING, EntryKey, run_label
from cax.runsdb.judgement import PROBLEM_FIELDS
from cax.runsdb.ledger import Claim
from cax.runsdb.origins import (
    DISK,
    ORIGIN,
    PRODUCER,
    SELF,
    Judgement,
    Proof,
    checksums,
    copies_of,
    differs,
    judge,
    origin_record,
    preferred,
    rank,
)
from cax.schema import DATA_TYPES
from cax.tasks.base import Task
from cax.tasks.repair import FILES_SHOWN, compare_token, mark_bad_copy, record_unreadable

log = logging.getLogger(__name__)

#: Failures reading a copy that mean "this copy is not good", not "this daemon has a bug".
UNREADABLE = (OSError, ValueError, UnsafeNameError)

kind_of = verifiable_kind


def describe_files(files: list[str] | None) -> str:
    """Say which files differ, for a log line."""
    if files is None:
        return "files unknown (no per-file checksums recorded)"
    if not files:
        return "the recorded per-file checksums do not show which files"
    more = " ..." if len(files) > FILES_SHOWN else ""
    return f"{len(files)} file(s): {', '.join(files[:FILES_SHOWN])}{more}"


class Reading:
    """One read of a copy: its manifest, and its sha512 dirhash when that kind was asked for.

    A dataset of the original's with a symlink inside has no manifest (cax copies and
    checksums regular files only), but its sha512 is computed as the original did, following
    the link, so its recorded checksum still verifies.
    """

    def __init__(self, manifest: Manifest | None, sha512: str | None):
        self.manifest, self.sha512 = manifest, sha512

    def value(self, kind: str | None) -> str | None:
        """The copy's checksum of ``kind`` (adler32 when None); None if not read."""
        if kind == "sha512-dirhash":
            return self.sha512
        return dataset_checksum(self.manifest) if self.manifest is not None else None

    def matches(self, doc: dict[str, Any]) -> bool | None:
        """Whether the bytes read equal ``doc``'s recorded checksum (an entry's or an origin's);
        None if ``doc`` records none this reading computed."""
        found = {kind: self.value(kind) for kind in checksums(doc)}
        found = {k: v for k, v in found.items() if v is not None}
        if not found:
            return None
        return all(checksums(doc)[kind] == value for kind, value in found.items())


class ChecksumTask(Task):
    """What the checksum tasks share: local entries, claims with a lease, reads, writes."""

    def __init__(self, ctx: Any):
        super().__init__(ctx)
        self.held: dict[tuple[Any, EntryKey], Claim] = {}
        self._granted = 0.0

    def local_entries(self, run: dict[str, Any], status: str) -> list[dict[str, Any]]:
        return [e for e in list(run.get("data") or ()) if e.get("host") == self.site.name
                and e.get("status") == status and self.site.data_dir(e.get("type", ""))]

    def claim(self, run: dict[str, Any], entry: dict[str, Any], status: str) -> Claim | None:
        """Lease ``entry`` while it is still in ``status`` with the checksum we saw."""
        conditions = {} if status == VERIFYING else {"checksum": entry.get("checksum")}
        key = EntryKey.of(entry)
        asked = time.monotonic()
        claim = self.db.claim(run["_id"], key, owner=self.ctx.owner,
                              lease_s=self.ctx.config.lease_seconds, statuses=[status],
                              conditions=conditions, count_attempt=False)
        if claim:
            self.hold(claim, asked)
        return claim

    def hold(self, claim: Claim, asked: float) -> None:
        """Keep ``claim`` for the work on its entry; ``asked``: when it was requested (its
        lease is no younger than that, which is what the Keeper must assume)."""
        self._granted = asked
        self.held[(claim.run_id, claim.key)] = claim

    def take(self, run: dict[str, Any], entry: dict[str, Any]) -> Claim:
        return self.held.pop((run["_id"], EntryKey.of(entry)))

    def release(self, run: dict[str, Any], entry: dict[str, Any], fields: dict[str, Any],
                unset: tuple[str, ...] = ()) -> None:
        """Set fields of our claimed entry (its status unchanged) and release it."""
        if not self.db.release(self.take(run, entry), fields, unset):
            raise LeaseLostError(f"entry {EntryKey.of(entry)} is no longer ours")

    def register(self, run: dict[str, Any], entry: dict[str, Any], fields: dict[str, Any],
                 proof: Proof, unset: tuple[str, ...] = ()) -> None:
        """Register our claimed entry ``transferred``; the write re-checks ``proof``."""
        if not self.db.register_verified(self.take(run, entry), fields, unset, proof=proof):
            raise LeaseLostError(f"entry {EntryKey.of(entry)} is no longer ours, or its "
                                 "dataset's origin changed meanwhile")

    def path(self, entry: dict[str, Any]) -> str:
        return entry_location(self.site, entry)

    def read(self, run: dict[str, Any], entry: dict[str, Any], *kinds: str | None
             ) -> Reading | None:
        """Read our claimed local copy once (holding the lease while it reads): its manifest,
        and its sha512 dirhash when one of ``kinds`` (or mixed operation) needs it.

        Returns None when the data is missing or unreadable, which is then recorded on the entry.
        """
        claim = self.held[(run["_id"], EntryKey.of(entry))]
        sha = "sha512-dirhash" in kinds or self.ctx.config.legacy_checksums
        try:
            with Keeper(self.db, claim, self.ctx.config.lease_seconds, self._granted) as keeper:
                path = self.path(entry)
                try:
                    reading = Reading(*scan_with_dirhash(path)) if sha \
                        else Reading(scan_dataset(path), None)
                except DatasetError:
                    if not sha:
                        raise
                    reading = Reading(None, legacy_dirhash(path))
                keeper.check(FINAL_STEP_LEFT)
        except UNREADABLE as exc:
            record_unreadable(self.ctx, self.take(run, entry), exc)
            return None
        return reading

    def mark_bad(self, run: dict[str, Any], entry: dict[str, Any], judgement: Judgement,
                 reason: str) -> None:
        mark_bad_copy(self.ctx, run, self.take(run, entry), entry, judgement, reason)

    def good_fields(self, run: dict[str, Any], entry: dict[str, Any], reading: Reading,
                    evidence: str, recorded: str | None = None) -> dict[str, Any]:
        """Save the manifest; return the fields of a verified copy.

        ``recorded`` is the checksum the entry already carries (kept: it is what others know
        the copy by); otherwise the adler32 one, with the original's sha512 in mixed operation.
        """
        if reading.manifest is None:  # the original's dataset with a symlink: its sha512
            return {"checksum": recorded or reading.sha512, "evidence": evidence}
        checksum = dataset_checksum(reading.manifest)
        self.db.save_manifest(run["_id"], EntryKey.of(entry), reading.manifest, checksum,
                              self.ctx.now())
        fields: dict[str, Any] = {"checksum": recorded or checksum, "evidence": evidence,
                                  "size": sum(size for size, _ in reading.manifest.values()),
                                  "file_count": len(reading.manifest)}
        if kind_of(fields["checksum"]) == "sha512-dirhash":
            fields["adler32_checksum"] = checksum
        elif reading.sha512 and self.ctx.config.legacy_checksums and not recorded:
            fields.update(checksum=reading.sha512, adler32_checksum=checksum)
        return fields


class AddChecksum(ChecksumTask):
    """Checksum the ``verifying`` copies at this site and register them ``transferred``."""

    def query(self) -> dict[str, Any] | None:
        types = [t for t in DATA_TYPES if self.site.data_dir(t)]
        if not types:
            return None
        return {"data": {"$elemMatch": {"host": self.site.name, "status": VERIFYING,
                                        "type": {"$in": types}}}}

    def each_run(self, run: dict[str, Any]) -> None:
        for entry in self.local_entries(run, VERIFYING):
            if self.ctx.dry_run:
                log.info("dry run: would checksum %s", EntryKey.of(entry))
            elif self.claim(run, entry, VERIFYING):
                self.verify(run, entry)
            else:  # a copy job verifies it, or another daemon checksums it
                log.debug("%s is leased by another worker", EntryKey.of(entry))

    def verify(self, run: dict[str, Any], entry: dict[str, Any]) -> None:
        """Checksum our claimed entry against what it records and against its origin; register
        it, or take it out with the reason."""
        key = EntryKey.of(entry)
        judgement = judge(run, key.type, key.version)
        recorded = entry.get("checksum") if kind_of(entry.get("checksum")) else None
        origin = judgement.origin
        reading = self.read(run, entry, kind_of(recorded),
                            kind_of(preferred(origin)) if origin else None)
        if reading is None:
            return
        if recorded and reading.value(kind_of(recorded)) != recorded:
            log.error("%s: %s: the data do not match the checksum registered with them",
                      run_label(run), key)
            self.mark_bad(run, entry, judgement, "data do not match the registered checksum")
            return
        if origin is not None:
            self.against_origin(run, entry, judgement, reading, recorded)
        elif judgement.disputed:
            self.fail(run, entry, f"not registered: its dataset is {judgement.describe()}",
                      disputed=judgement.describe())
        elif self.is_first_read(run, entry):
            self.as_origin(run, entry, reading, recorded)
        elif recorded or copies_of(run, key.type, key.version):
            evidence = SELF if recorded else DISK
            fields = self.good_fields(run, entry, reading, evidence, recorded)
            self.register(run, entry, fields, Proof(), unset=("compared_checksum", "disputed",
                                                             *PROBLEM_FIELDS))
            log.info("%s: %s: verifying -> transferred (%s; its dataset's copies are not "
                     "settled yet)", run_label(run), key,
                     "its recorded checksum verified" if recorded else "as found")
        else:
            self.fail(run, entry, "no checksum recorded and no origin to verify against: "
                      "processed data are registered by the job that made them")

    def fail(self, run: dict[str, Any], entry: dict[str, Any], reason: str,
             **fields: Any) -> None:
        """Leave our claimed entry in ``error`` for a person, data kept."""
        self.db.record_failure(self.take(run, entry), reason, kind="permanent", retry_at=None,
                               fields=fields)
        log.error("%s: %s: %s; data kept", run_label(run), EntryKey.of(entry), reason)

    def is_first_read(self, run: dict[str, Any], entry: dict[str, Any]) -> bool:
        """Whether this read makes the origin: raw data the DAQ put here (no ``source``; with
        the checksum the DAQ handed over, if any), of a run no other copy of which records a
        checksum."""
        key = EntryKey.of(entry)
        return key.type == "raw" and "source" not in entry \
            and not copies_of(run, key.type, key.version)

    def against_origin(self, run: dict[str, Any], entry: dict[str, Any], judgement: Judgement,
                       reading: Reading, recorded: str | None) -> None:
        key, origin = EntryKey.of(entry), judgement.origin
        assert origin is not None
        if reading.matches(origin):
            fields = self.good_fields(run, entry, reading, ORIGIN, recorded)
            self.register(run, entry, fields, Proof.against(judgement),
                          unset=("compared_checksum", "disputed", *PROBLEM_FIELDS))
            log.info("%s: %s: verifying -> transferred, its origin's bytes (%s)",
                     run_label(run), key, fields["checksum"][:20])
        elif recorded:  # its own checksum verified: vouched-for bytes that are not the origin
            self.fail(run, entry, "its recorded checksum verifies, but differs from its "
                      "dataset's origin: disputed", evidence=SELF,
                      disputed=judgement.describe())
        else:
            self.mark_bad(run, entry, judgement, "data differ from the dataset's origin")

    def as_origin(self, run: dict[str, Any], entry: dict[str, Any], reading: Reading,
                  recorded: str | None) -> None:
        """Register the producer's copy and record its checksum as the dataset's origin."""
        key, now = EntryKey.of(entry), self.ctx.now()
        fields = self.good_fields(run, entry, reading, PRODUCER, recorded)
        adler = reading.value("adler32")
        if adler is not None and reading.manifest is not None:
            self.db.save_origin_manifest(run["_id"], key, reading.manifest, adler, now)
        origin = origin_record(adler or fields["checksum"], host=self.site.name, now=now,
                               key=key, evidence="checksum given" if recorded else "first read",
                               size=fields.get("size"), file_count=fields.get("file_count"),
                               legacy_checksum=reading.sha512 if adler and kind_of(
                                   fields["checksum"]) == "sha512-dirhash" else None)
        self.register(run, entry, fields, Proof(establishes=origin),
                      unset=("compared_checksum", "disputed", *PROBLEM_FIELDS))
        log.info("%s: %s: verifying -> transferred, the dataset's origin (%s)",
                 run_label(run), key, origin["checksum"][:20])


# -- CompareChecksums ---------------------------------------------------------------------------

def _string(expr: Any) -> dict[str, Any]:
    """Aggregation: a checksum, or "" if it is null or missing."""
    return {"$ifNull": [expr, ""]}


def _same_dataset(var: str) -> dict[str, Any]:
    """Aggregation: ``$$<var>`` is of the same dataset as ``$$o``."""
    return {"$and": [{"$eq": [f"$${var}.type", "$$o.type"]},
                     {"$or": [{"$eq": ["$$o.type", "raw"]},
                              {"$eq": [f"$${var}.pax_version", "$$o.pax_version"]}]}]}


def _others(here: str) -> dict[str, Any]:
    """Aggregation: the other sites' ``transferred`` entries of ``$$o``'s dataset."""
    return {"$filter": {"input": "$data", "as": "r", "cond": {"$and": [
        {"$ne": ["$$r.host", here]}, {"$eq": ["$$r.status", TRANSFERRED]},
        _same_dataset("r")]}}}


def judge_state(entry: dict[str, Any], judgement: Judgement,
                others: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """What a copy was judged against, recorded as ``compared_checksum`` and ``compared_with``:
    its own checksum with its stored origin's, and the other copies' checksums.  The Python twin
    of the state ``compare_query`` compares; a change of either selects the copy again."""
    origin = judgement.stored_checksum if judgement.stored_checksum is not None else ""
    return compare_token(entry.get("checksum"), origin), \
        sorted({e.get("checksum") or "" for e in others})


def compare_query(here: str, types: list[str]) -> dict[str, Any] | None:
    """Select runs where a transferred copy at ``here`` needs judging against its origin.

    A copy needs it when it has no checksum, when it differs from its stored origin, or (no
    stored origin) when another copy's checksum differs from its own, or when it is marked
    disputed -- and it was not judged in that state before (``judge_state``).  The same test
    as ``CompareChecksums.needs_compare``, evaluated by the server: an idle pass fetches nothing.
    """
    if not types:
        return None
    origins = {"$filter": {"input": {"$ifNull": ["$origins", []]}, "as": "g",
                           "cond": _same_dataset("g")}}
    origin = {"$ifNull": [{"$arrayElemAt": [{"$map": {"input": origins, "as": "g",
                                                      "in": "$$g.checksum"}}, 0]}, ""]}
    others = {"$map": {"input": _others(here), "as": "r", "in": _string("$$r.checksum")}}
    ours = _string("$$o.checksum")
    needs = {"$or": [
        {"$eq": [ours, ""]},
        {"$ne": [{"$ifNull": ["$$o.disputed", None]}, None]},
        {"$and": [{"$ne": [origin, ""]}, {"$ne": [ours, origin]}]},
        {"$and": [{"$eq": [origin, ""]},
                  {"$gt": [{"$size": {"$filter": {"input": others, "as": "x",
                                                  "cond": {"$ne": ["$$x", ours]}}}}, 0]}]}]}
    judged = {"$and": [
        {"$eq": [_string("$$o.compared_checksum"), {"$concat": [ours, "|", origin]}]},
        {"$setEquals": [{"$ifNull": ["$$o.compared_with", []]}, others]}]}
    # ``$not`` takes its one argument bare (valid on MongoDB): mongomock misreads ``[judged]``
    mine = {"$and": [{"$eq": ["$$o.host", here]}, {"$eq": ["$$o.status", TRANSFERRED]},
                     {"$in": ["$$o.type", types]}, needs, {"$not": judged}]}
    pending = {"$filter": {"input": "$data", "as": "o", "cond": mine}}
    return {"$and": [
        {"data": {"$elemMatch": {"host": here, "status": TRANSFERRED, "type": {"$in": types}}}},
        {"$expr": {"$gt": [{"$size": pending}, 0]}}]}


class CompareChecksums(ChecksumTask):
    """Judge each local copy against its dataset's origin, once per state of the evidence."""

    def query(self) -> dict[str, Any] | None:
        return compare_query(self.site.name, [t for t in DATA_TYPES if self.site.data_dir(t)])

    def each_run(self, run: dict[str, Any]) -> None:
        for entry in self.local_entries(run, TRANSFERRED):
            key = EntryKey.of(entry)
            judgement = judge(run, key.type, key.version)
            others = [e for e in run.get("data") or () if e.get("host") != self.site.name
                      and e.get("status") == TRANSFERRED and e.get("type") == key.type
                      and (key.type == "raw" or e.get("pax_version") == key.version)]
            if self.needs_compare(entry, judgement, others):
                self.compare(run, entry, judgement, others)

    def needs_compare(self, entry: dict[str, Any], judgement: Judgement,
                      others: list[dict[str, Any]]) -> bool:
        """The Python twin of ``compare_query``'s test."""
        ours = entry.get("checksum") or ""
        stored = judgement.stored_checksum
        if stored is not None:
            need = ours != stored
        else:
            need = any((e.get("checksum") or "") != ours for e in others)
        need = need or not ours or entry.get("disputed") is not None
        token, compared = judge_state(entry, judgement, others)
        return need and (entry.get("compared_checksum") != token
                         or sorted(set(entry.get("compared_with") or ())) != compared)

    def compare(self, run: dict[str, Any], entry: dict[str, Any], judgement: Judgement,
                others: list[dict[str, Any]]) -> None:
        key = EntryKey.of(entry)
        state = judge_state(entry, judgement, others)
        if judgement.origin is not None and differs(entry, judgement.origin) is False:
            self.db.record_compared(run["_id"], key, *state)
            log.debug("%s: %s is its dataset's origin", run_label(run), key)
            return
        if judgement.disputed:
            self.db.record_compared(run["_id"], key, *state, disputed=judgement.describe())
            log.error("%s: %s: its dataset is %s; nothing repaired, purged or copied until a "
                      "person decides", run_label(run), key, judgement.describe())
            return
        if judgement.origin is None and rank(entry) == 2:
            self.db.record_compared(run["_id"], key, *state)
            return  # its own evidence is settled; the other copies' daemons read theirs
        if self.ctx.dry_run:
            log.info("dry run: would read %s to judge it (%s)", key, judgement.describe())
            return
        if not self.claim(run, entry, TRANSFERRED):
            return
        own = kind_of(entry.get("checksum"))
        origin_kind = kind_of(preferred(judgement.origin)) if judgement.origin else None
        reading = self.read(run, entry, own, origin_kind)
        if reading is None:
            return
        compared = {"compared_checksum": state[0], "compared_with": state[1]}
        vouched = rank(entry) == 1 and reading.matches(entry)  # its own record verifies
        if judgement.origin is not None and reading.matches(judgement.origin):
            fields = dict(compared)
            if not entry.get("checksum"):
                fields = self.good_fields(run, entry, reading, ORIGIN)
                fields = {**fields, **compared,
                          "compared_checksum": judge_state(fields, judgement, others)[0]}
            self.release(run, entry, fields, unset=("disputed", "checksum_failures"))
            return
        if judgement.origin is None:  # unsettled: what this copy's own evidence says
            if vouched:
                self.release(run, entry, {"evidence": SELF, **compared})
                log.info("%s: %s: its recorded checksum verifies on disk", run_label(run), key)
            elif entry.get("checksum") and rank(entry) == 1:
                self.changed(run, entry, judgement, reading, "data do not match their "
                             "recorded checksum")
            else:  # nothing recorded (or only what cax found): what is there now
                fields = self.good_fields(run, entry, reading, DISK)
                self.release(run, entry, {**fields, "compared_with": state[1],
                                          "compared_checksum": judge_state(
                                              fields, judgement, others)[0]})
            return
        if vouched or (rank(entry) == 2 and reading.matches(entry)):
            self.release(run, entry, {"evidence": entry.get("evidence") or SELF,
                                      "disputed": judgement.describe(), **compared})
            log.error("%s: %s: its recorded checksum verifies on disk but differs from the "
                      "dataset's origin (%s): disputed, nothing repaired", run_label(run), key,
                      judgement.describe())
            return
        self.changed(run, entry, judgement, reading, "differs from its dataset's origin")

    def changed(self, run: dict[str, Any], entry: dict[str, Any], judgement: Judgement,
                reading: Reading, reason: str) -> None:
        """Report which files differ; take the copy out of ``transferred``."""
        key = EntryKey.of(entry)
        theirs = self.db.find_origin_manifest(run["_id"], key, judgement.origin) \
            if judgement.stored else None
        files = diff_manifests(theirs, reading.manifest) if theirs and reading.manifest \
            else None
        log.error("%s: %s %s: %s", run_label(run), key, reason, describe_files(files))
        self.mark_bad(run, entry, judgement, reason)
