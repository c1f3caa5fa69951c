"""BufferPurger and PurgeProcessed: free local disk only while enough good copies remain.

The decision is a pure function of the run document (``decide_raw_purge``,
``decide_processed_purge``), so it can be property-tested.  Carrying it out keeps the runs DB
truthful at every instant and is race-free between sites:

1. one atomic claim (``RunsDB.claim_purge``) turns our ``transferred`` entry into ``purging``
   with a lease, and only while every other copy the decision counted is still
   ``transferred`` -- so two sites each counting the other's copy cannot both win;
2. the data are deleted (a ``purging`` entry no longer counts as a copy anywhere);
3. the manifest and then the entry are removed.

A crash in step 2 leaves a ``purging`` entry whose lease expires; the next pass of either task
claims it again and finishes steps 2 and 3.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any

from cax.checksum import verifiable_kind
from cax.claimed import Keeper
from cax.clock import as_utc
from cax.config import Config
from cax.errors import CaxError, LeaseLostError
from cax.logcontext import log_context
from cax.paths import entry_location
from cax.runsdb import PURGING, TRANSFERRED, EntryKey, find_entry, run_label
from cax.runsdb.judgement import is_good
from cax.runsdb.ledger import Claim
from cax.runsdb.origins import Judgement, dataset_match, judge
from cax.tasks.base import Context, Task
from cax.transport import siteops

log = logging.getLogger(__name__)

Keep = tuple[tuple[EntryKey, dict[str, Any]], ...]


@dataclass(frozen=True)
class PurgePolicy:
    """What decides a raw purge at one site (a plain value, so tests can make any)."""

    site: str
    min_copies: int
    purge_days: float | None
    reference_sites: frozenset[str]  # sites that hold reference copies of raw data
    known_sites: frozenset[str]  # only copies at configured sites count

    @classmethod
    def of(cls, config: Config) -> PurgePolicy:
        return cls(config.site.name, config.site.min_copies, config.site.purge,
                   frozenset(s.name for s in config.reference_sites("raw")),
                   frozenset(s.name for s in config.sites))


@dataclass(frozen=True)
class PurgeDecision:
    """Whether to purge, why (for the log), and the other copies the claim must re-check."""

    purge: bool
    reason: str
    keep: Keep = ()
    #: Run conditions the claim re-checks: the origin judged by is still the one.
    where: tuple[dict[str, Any], ...] = ()


def _no(reason: str) -> PurgeDecision:
    return PurgeDecision(False, reason)


def _keep(entry: dict[str, Any]) -> tuple[EntryKey, dict[str, Any]]:
    extra = {"checksum": entry["checksum"]} if entry.get("checksum") else {}
    return EntryKey.of(entry), extra


#: A copy counts as verified only with a checksum cax can verify: a ``transferred`` entry
#: without one, or with ``n/a``, ``ADLER32:...`` or a ruciax ``:a:b:c``, proves nothing.
verifiable = verifiable_kind


def verified_others(run: dict[str, Any], policy: PurgePolicy,
                    judgement: Judgement | None = None) -> list[dict[str, Any]]:
    """Return one good raw copy (its bytes the dataset's origin) per other configured site."""
    judgement = judgement or judge(run, "raw", None)
    found: dict[str, dict[str, Any]] = {}
    for entry in run.get("data") or ():
        host = entry.get("host")
        if entry.get("type") != "raw" or host == policy.site or host not in \
                policy.known_sites or host in found or entry.get("status") != TRANSFERRED:
            continue
        if is_good(judgement, entry):
            found[host] = entry
        else:
            log.info("%s: the raw copy at %s is not known to be its dataset's origin (%s); it "
                     "does not count as a copy", run_label(run), host, judgement.describe())
    return [found[host] for host in sorted(found)]


def origin_unchanged(judgement: Judgement, data_type: str,
                     version: str | None) -> tuple[dict[str, Any], ...]:
    """Run conditions of a purge claim: the origin the decision judged by is still the one."""
    checksum = judgement.stored_checksum
    if checksum is None:
        return ({"origins": {"$not": {"$elemMatch": dataset_match(data_type, version)}}},)
    return ({"origins": {"$elemMatch": {**dataset_match(data_type, version),
                                        "checksum": checksum}}},)


def decide_raw_purge(run: dict[str, Any], policy: PurgePolicy,
                     now: dt.datetime) -> PurgeDecision:
    """Decide whether this site may delete its raw copy of ``run``.

    All must hold: our copy is a good copy (its dataset's origin); the run started more than
    ``purge_days`` ago; at least ``min_copies`` other configured sites hold a good copy; and
    if this site is a reference site, one of those is another reference site.  A disputed or
    unsettled dataset is never purged.
    """
    here = find_entry(run, EntryKey(policy.site, "raw"))
    if not here or here.get("status") != TRANSFERRED:
        return _no("no verified copy here")
    if policy.purge_days is None:
        return _no("purging is not configured here")
    start = run.get("start")
    if not isinstance(start, dt.datetime):
        return _no("the run has no start time")
    if as_utc(start) > now - dt.timedelta(days=policy.purge_days):
        return _no(f"younger than {policy.purge_days:g} days")
    judgement = judge(run, "raw", None)
    if not is_good(judgement, here):
        return _no(f"the copy here is not known to be its dataset's origin "
                   f"({judgement.describe()})")
    others = verified_others(run, policy, judgement)
    if len(others) < policy.min_copies:
        return _no(f"{len(others)} verified copies elsewhere, {policy.min_copies} needed")
    if policy.site in policy.reference_sites:
        refs = [e for e in others if e["host"] in policy.reference_sites]
        if not refs:
            return _no("this is the last reference copy")
        others = [refs[0]] + [e for e in others if e is not refs[0]]
    chosen = others[:policy.min_copies]
    hosts = ", ".join(e["host"] for e in chosen)
    return PurgeDecision(True, f"verified copies at {hosts}", tuple(map(_keep, chosen)),
                         origin_unchanged(judgement, "raw", None))


def parse_version(version: Any) -> tuple[int, ...] | None:
    """Return ``v6.10.0`` as (6, 10, 0) so versions compare numerically; None if not a version."""
    match = re.fullmatch(r"v?(\d+(?:\.\d+)*)", version) if isinstance(version, str) else None
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def decide_processed_purge(run: dict[str, Any], site: str, version: str) -> PurgeDecision:
    """Decide whether to drop our processed ``version``: only if a newer one is here and good
    (its bytes that version's origin)."""
    here = find_entry(run, EntryKey(site, "processed", version))
    old = parse_version(version)
    if not here or here.get("status") != TRANSFERRED or old is None:
        return _no("no verified copy of that version here")
    newer = [e for e in run.get("data") or ()
             if e.get("host") == site and e.get("type") == "processed"
             and (parse_version(e.get("pax_version")) or ()) > old
             and is_good(judge(run, "processed", e.get("pax_version")), e)]
    if not newer:
        return _no("no newer version here")
    best = max(newer, key=lambda e: parse_version(e["pax_version"]) or ())  # each has one
    return PurgeDecision(True, f"{best['pax_version']} is here", (_keep(best),),
                         origin_unchanged(judge(run, "processed", best["pax_version"]),
                                          "processed", best["pax_version"]))


class Purger:
    """Carries out purges at this site: claim, delete, pull; and resumes interrupted ones."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.db = ctx.runsdb

    def purge(self, run: dict[str, Any], key: EntryKey, decision: PurgeDecision) -> bool:
        """Purge our copy ``key`` of ``run`` as ``decision`` allows; return whether it went."""
        entry = find_entry(run, key) or {}
        path = entry_location(self.ctx.site, entry)
        if self.db.read_only and not self.ctx.dry_run:
            log.warning("not purging %s: runs DB updates are disabled", path)
            return False
        if self.ctx.dry_run:
            log.info("dry run: would purge %s %s at %s (%s)", run_label(run), key.type, path,
                     decision.reason)
            return False
        granted = time.monotonic()
        claim = self.db.claim_purge(run["_id"], key, keep=decision.keep, owner=self.ctx.owner,
                                    lease_s=self.ctx.config.lease_seconds, where=decision.where)
        if not claim:
            log.info("not purged: the copies changed since the decision, or a transfer is "
                     "reading it; the next pass decides again")
            return False
        log.info("purging %s %s at %s (%s)", run_label(run), key, path, decision.reason)
        delete_and_pull(self.ctx, claim, path, granted)
        return True

    def resume(self, run: dict[str, Any], key: EntryKey) -> bool:
        """Finish a purge whose daemon died (its ``purging`` entry's lease has expired)."""
        entry = find_entry(run, key) or {}
        path = entry_location(self.ctx.site, entry)
        if self.ctx.dry_run:
            log.info("dry run: would finish purging %s at %s", key, path)
            return False
        if self.db.read_only:
            log.warning("not finishing the purge of %s: runs DB updates are disabled", path)
            return False
        granted = time.monotonic()
        claim = self.db.claim(run["_id"], key, owner=self.ctx.owner, statuses=[PURGING],
                              lease_s=self.ctx.config.lease_seconds, count_attempt=False)
        if not claim:
            return False
        log.info("finishing the interrupted purge of %s at %s", key, path)
        delete_and_pull(self.ctx, claim, path, granted)
        return True


def delete_and_pull(ctx: Context, claim: Claim, path: str, granted: float) -> None:
    """Delete the data of a copy we hold as ``purging``; then remove its manifest and entry.

    If the deletion fails the entry stays ``purging`` (the data are no longer whole) with its
    lease dropped, so the next pass finishes the job.
    """
    try:
        with Keeper(ctx.runsdb, claim, ctx.config.lease_seconds, granted) as keeper:
            siteops.remove(path)
            keeper.check()
    except OSError:
        ctx.runsdb.release(claim)
        raise
    ctx.runsdb.remove_manifest(claim.run_id, claim.key)
    if not ctx.runsdb.remove_claimed(claim, PURGING):
        raise LeaseLostError(f"{claim.key}: data deleted, but the entry changed hands before "
                             "removal")


def _stale_purge(host: str, data_type: str, now: dt.datetime) -> dict[str, Any]:
    return {"data": {"$elemMatch": {"host": host, "type": data_type, "status": PURGING,
                                    "lease_expires": {"$not": {"$gt": now}}}}}


def _stale_keys(run: dict[str, Any], host: str, data_type: str,
                now: dt.datetime) -> list[EntryKey]:
    return [EntryKey.of(e) for e in run.get("data") or ()
            if e.get("host") == host and e.get("type") == data_type
            and e.get("status") == PURGING and not (
                e.get("lease_expires") and as_utc(e["lease_expires"]) > now)]


class BufferPurger(Task):
    """Delete local raw data of old runs that enough other sites hold verified copies of.

    With ``purge_free_below``, purges only while the raw disk's free fraction is below it,
    oldest runs first.  Candidates are collected per run and purged in ``finish`` for that
    order.  Also finishes interrupted purges of raw data at this site.
    """

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.policy = PurgePolicy.of(ctx.config)
        self.purger = Purger(ctx)
        self.candidates: list[tuple[dt.datetime, dict[str, Any], PurgeDecision]] = []

    def query(self) -> dict[str, Any] | None:
        now, site = self.ctx.now(), self.site
        resume = _stale_purge(site.name, "raw", now)
        if site.purge is None or not site.dir_raw or self.enough_free():
            return resume
        parts = [
            {"data": {"$elemMatch": {"host": site.name, "type": "raw", "status": TRANSFERRED}}},
            {"start": {"$lte": now - dt.timedelta(days=site.purge)}},
            {f"data.{site.min_copies}": {"$exists": True}},  # ours + min_copies others
        ]
        if site.name in self.policy.reference_sites:
            refs = sorted(self.policy.reference_sites - {site.name})
            if not refs:
                return resume
            parts.append({"data": {"$elemMatch": {"host": {"$in": refs}, "type": "raw",
                                                  "status": TRANSFERRED}}})
        return {"$or": [resume, {"$and": parts}]}

    def enough_free(self) -> bool:
        """Whether the raw disk already has the free fraction ``purge_free_below`` asks for."""
        limit, raw_dir = self.site.purge_free_below, self.site.dir_raw
        if limit is None or not raw_dir:  # without a raw directory query() purges nothing
            return False
        usage = shutil.disk_usage(raw_dir)
        return usage.free / usage.total >= limit

    def each_run(self, run: dict[str, Any]) -> None:
        now = self.ctx.now()
        for key in _stale_keys(run, self.site.name, "raw", now):
            self.purger.resume(run, key)
        decision = decide_raw_purge(run, self.policy, now)
        if decision.purge:
            self.candidates.append((as_utc(run["start"]), run, decision))
        elif find_entry(run, EntryKey(self.site.name, "raw")):
            log.debug("keeping raw data: %s", decision.reason)

    def finish(self) -> None:
        failed = []
        for _start, run, decision in sorted(self.candidates, key=lambda c: c[0]):
            if self.ctx.stop.is_set():
                break
            if self.enough_free():
                log.info("raw disk has enough free space; purging stops")
                break
            with log_context(run_label(run)):
                try:
                    self.purger.purge(run, EntryKey(self.site.name, "raw"), decision)
                except (CaxError, OSError) as exc:
                    log.error("purge failed: %s", exc)
                    failed.append(run_label(run))
        if failed:
            raise CaxError(f"purge failed for {len(failed)} run(s): {', '.join(failed[:5])}")


class PurgeProcessed(Task):
    """Delete local processed data of ``pax_version_purge`` once a newer version is here.

    Also finishes interrupted purges of processed data at this site.
    """

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.purger = Purger(ctx)

    def query(self) -> dict[str, Any] | None:
        site, version = self.site, self.site.pax_version_purge
        resume = _stale_purge(site.name, "processed", self.ctx.now())
        if not version or not site.dir_processed:
            return resume
        old = EntryKey(site.name, "processed", version).match()
        newer = {"host": site.name, "type": "processed", "status": TRANSFERRED,
                 "pax_version": {"$ne": version}}
        candidates = {"$and": [{"data": {"$elemMatch": {**old, "status": TRANSFERRED}}},
                               {"data": {"$elemMatch": newer}}]}
        return {"$or": [resume, candidates]}

    def each_run(self, run: dict[str, Any]) -> None:
        for key in _stale_keys(run, self.site.name, "processed", self.ctx.now()):
            self.purger.resume(run, key)
        version = self.site.pax_version_purge
        if not version:
            return
        decision = decide_processed_purge(run, self.site.name, version)
        if decision.purge:
            self.purger.purge(run, EntryKey(self.site.name, "processed", version), decision)
        else:
            log.debug("keeping processed %s: %s", version, decision.reason)
