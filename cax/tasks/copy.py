"""CopyPush and CopyPull: distribute raw and processed data between sites.

For each data type this site handles, CopyPush sends this site's good copies to the sites in
``upload_options``, and CopyPull fetches good copies from the sites in ``download_options``
(the first, in config order, that has one).  Good means agreeing with the dataset's origin
(``runsdb.judgement``): a dataset whose copies are disputed, or not yet settled, is not
copied.  A destination needs a copy when it has no entry, an ``error`` entry whose retry is
due, or a ``transferring`` entry whose lease expired.  The same conditions are the runs-DB
query, so an idle pass fetches no runs.

Copies run in the background workers (``max_transfers`` at once); the task only claims and
schedules them, so a slow copy never holds up the other tasks.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, ClassVar

from cax.claimed import schedule
from cax.clock import as_utc
from cax.config import Site
from cax.errors import UnsafeNameError
from cax.progress import ProgressBoard
from cax.runsdb import TRANSFERRED, EntryKey, find_entry, run_label
from cax.runsdb.judgement import (
    is_good,
    needs_copy,
    needs_copy_query,
    repair_conditions,
    repair_due,
)
from cax.runsdb.origins import judge
from cax.schema import TRANSFER_METHODS
from cax.tasks.base import Task
from cax.tasks.copyjob import CopyJob, CopyPlan, make_plan
from cax.tasks.repair import repair_plan
from cax.transport.pool import TransportPool

log = logging.getLogger(__name__)


class CopyBase(Task):
    """What CopyPush and CopyPull share: per-type keys, the "needs a copy" test, scheduling."""

    push: ClassVar[bool]

    def peers(self) -> list[Site]:
        names = self.site.upload_options if self.push else self.site.download_options
        peers = [self.ctx.config.get_site(name) for name in names]
        return [p for p in peers if p.method in TRANSFER_METHODS]

    def kinds(self) -> list[tuple[str, str | None]]:
        """The (data type, version) pairs this site copies."""
        version = self.ctx.config.version_of(self.site)
        return [(data_type, version if data_type == "processed" else None)
                for data_type in self.site.data_type
                if data_type != "processed" or version]  # no version: warned per pass

    def query(self) -> dict[str, Any] | None:
        """Runs where one of this site's (data type, version) pairs has copying to do with a
        peer (``kind_query``); None without peers."""
        peers = self.peers()
        parts = [self.kind_query(peers, data_type, version)
                 for data_type, version in self.kinds()] if peers else []
        return {"$or": parts} if parts else None

    def kind_query(self, peers: list[Site], data_type: str,
                   version: str | None) -> dict[str, Any]:
        raise NotImplementedError  # push's and pull's own

    def needs_copy(self, key: EntryKey) -> list[dict[str, Any]]:
        """Query parts: the destination ``key`` has no entry, a due retry, or a dead lease."""
        return needs_copy_query(key, self.site.max_attempts, self.ctx.now())

    def entry_needs_copy(self, entry: dict[str, Any] | None) -> bool:
        """The same test as ``needs_copy``, on an entry already fetched."""
        return needs_copy(entry, self.site.max_attempts, self.ctx.now())

    def too_old_to_keep(self, data_type: str) -> dict[str, Any] | None:
        """Query part excluding raw runs this site would purge at once (pull only)."""
        if self.push or data_type != "raw" or self.site.purge is None:
            return None
        return {"start": {"$gt": self.ctx.now() - dt.timedelta(days=self.site.purge)}}

    def schedule(self, plan: CopyPlan) -> None:
        """Claim the destination entry and hand the copy to a background worker."""
        if self.ctx.transports is None:
            self.ctx.transports = TransportPool(self.site.stall_timeout)
        if self.ctx.board is None:
            self.ctx.board = ProgressBoard(self.ctx.console)
        job = CopyJob(self.ctx, plan, self.ctx.transports, self.ctx.board)
        schedule(self.ctx, f"{plan.run_id}/{plan.dest_key}", job, f"copy {plan.describe()}")

    def plan(self, run: dict[str, Any], data_type: str, version: str | None, source: Site,
             source_entry: dict[str, Any], dest: Site) -> CopyPlan:
        refuse_duplicates(self.db, run)
        return make_plan(run, run_label(run), data_type, version, source, source_entry, dest,
                         self.push)


def refuse_duplicates(db: Any, run: dict[str, Any]) -> None:
    """Refuse to copy a run whose name and detector, or number, another run document has:
    their datasets would share one path at every site."""
    others = db.find_runs({"_id": {"$ne": run["_id"]}, "$or": [
        {"name": run.get("name"), "detector": run.get("detector")},
        {"number": run.get("number"), "detector": run.get("detector")}]},
        projection={"number": 1, "name": 1, "detector": 1}, limit=1)
    if others:
        other = others[0]
        raise UnsafeNameError(f"{run_label(run)} and run document {other['_id']} "
                              f"(run {other.get('number', '?')}, {other.get('name', '?')}) "
                              "are duplicates (same name and detector, or same number); "
                              "not copying either until one is removed")


class CopyPush(CopyBase):
    """Push this site's verified copies to the sites in ``upload_options``."""

    push = True

    def kind_query(self, peers: list[Site], data_type: str,
                   version: str | None) -> dict[str, Any]:
        """A verified copy here, and a peer that needs it or whose copy is due for repair."""
        here = EntryKey(self.site.name, data_type, version)
        wanted = [q for p in peers for q in self.needs_copy(EntryKey(p.name, data_type,
                                                                     version))]
        wanted += [{"data": EntryKey(p.name, data_type, version).elem_match(
            **repair_conditions(self.site.max_attempts, self.ctx.now()))} for p in peers]
        return {"$and": [{"data": here.elem_match(status=TRANSFERRED)}, {"$or": wanted}]}

    def each_run(self, run: dict[str, Any]) -> None:
        for data_type, version in self.kinds():
            here = find_entry(run, EntryKey(self.site.name, data_type, version))
            if not here or here.get("status") != TRANSFERRED:
                continue
            judgement = judge(run, data_type, version)
            good = is_good(judgement, here)
            for peer in self.peers():
                there = find_entry(run, EntryKey(peer.name, data_type, version))
                if self.entry_needs_copy(there):
                    plan = self.plan(run, data_type, version, self.site, here, peer)
                    if good:
                        self.schedule(plan)
                    else:  # the location is checked all the same (above): loudly
                        log.info("%s is not known to be its dataset's origin (%s); not pushed "
                                 "to %s", EntryKey.of(here), judgement.describe(), peer.name)
                elif good and there and repair_due(there, self.site.max_attempts,
                                                   self.ctx.now()):
                    job = repair_plan(self.ctx, run, there, self.site, here, peer, push=True)
                    schedule(self.ctx, f"{run['_id']}/{job.key}", job, job.label)


class CopyPull(CopyBase):
    """Pull verified copies from the sites in ``download_options`` (first one that has it)."""

    push = False

    def kind_query(self, peers: list[Site], data_type: str,
                   version: str | None) -> dict[str, Any]:
        """A verified copy at a peer, a copy needed here, and no run this site would purge."""
        have = [{"data": EntryKey(p.name, data_type, version).elem_match(status=TRANSFERRED)}
                for p in peers]
        here = EntryKey(self.site.name, data_type, version)
        conditions = [{"$or": have}, {"$or": self.needs_copy(here)}]
        age = self.too_old_to_keep(data_type)
        return {"$and": conditions + ([age] if age else [])}

    def each_run(self, run: dict[str, Any]) -> None:
        for data_type, version in self.kinds():
            here = find_entry(run, EntryKey(self.site.name, data_type, version))
            if not self.entry_needs_copy(here):
                continue
            age = self.too_old_to_keep(data_type)
            if age and as_utc(run["start"]) <= age["start"]["$gt"]:
                log.info("skipping download of raw data that would be purged at once")
                continue
            judgement = judge(run, data_type, version)
            for peer in self.peers():
                there = find_entry(run, EntryKey(peer.name, data_type, version))
                if there is not None and is_good(judgement, there):
                    self.schedule(self.plan(run, data_type, version, peer, there, self.site))
                    break
            else:
                if not judgement.settled:
                    log.info("%s: not fetched: %s", EntryKey(self.site.name, data_type, version),
                             judgement.describe())
