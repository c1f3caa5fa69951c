"""Provenance: what a dataset's bytes must be, and how sure cax is of it.

Every dataset of a run -- its raw data, its processed data of one version -- has an *origin*:
the checksum (and per-file manifest) its producer recorded, once, in the write that registered
the producer's copy.  The DAQ site's first verified read (or the checksum the DAQ handed to
``cax run add``, verified against the bytes) is the origin of raw data; a processing job's
validated output is the origin of its version.  It is kept in the run document, ``origins``::

    {"type": "raw", "checksum": "adler32:...", "host": "daq", "evidence": "producer",
     "time": ..., "size": ..., "file_count": ...}

Every copy everywhere is judged against the origin; a site holding a copy is only ever a
*source* of good bytes, never the judge (a reference site included).  This is Rucio's rule:
the catalogue's checksum is the truth and each replica is checked against it.

Runs registered before cax (the original cax, 2016-2017) have no stored origin.  Their copies'
recorded checksums are ranked by the evidence behind each (the entry's ``evidence`` field):

* strong -- ``producer``, ``origin`` (verified against the origin when registered), ``self``
  (its own recorded checksum verified on its disk by cax);
* recorded -- no ``evidence``: recorded by the original or the DAQ, not yet verified by cax;
* weak -- ``disk``: computed by cax from the bytes as they were found, with nothing to compare.

The judgement of such a dataset is derived, not stored, from the strongest class that has
copies: if they agree, that is the origin ("copies that agree settle it"); if strong copies
disagree, the dataset is *disputed* -- no repair in any direction, no copy, no purge, listed
for a person; if weaker copies disagree, it is *unsettled* until their daemons have read them.
A copy whose own recorded checksum verifies on disk is never overwritten by a repair.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from cax.checksum import verifiable_kind
from cax.runsdb.entries import TRANSFERRED, EntryKey

#: ``evidence`` of an entry: the dataset's origin itself.
PRODUCER = "producer"
#: ``evidence``: verified against the origin when it was registered.
ORIGIN = "origin"
#: ``evidence``: its own recorded checksum (the original's or the DAQ's) verified on its disk.
SELF = "self"
#: ``evidence``: computed from the bytes as found, with nothing to compare (weakest).
DISK = "disk"
STRONG = (PRODUCER, ORIGIN, SELF)
#: Fields of an entry (or origin) that hold a checksum of some kind.
CHECKSUM_FIELDS = ("checksum", "adler32_checksum", "legacy_checksum")


def dataset_match(data_type: str, version: str | None) -> dict[str, Any]:
    """Conditions (inside ``$elemMatch``) selecting the ``origins`` element of one dataset."""
    return {"type": data_type, "pax_version": version} if data_type != "raw" else \
        {"type": data_type}


def checksums(doc: dict[str, Any]) -> dict[str, str]:
    """The checksums ``doc`` (an entry or an origin) records, by kind (adler32, sha512)."""
    found: dict[str, str] = {}
    for name in CHECKSUM_FIELDS:
        value = doc.get(name)
        kind = verifiable_kind(value)
        if kind and kind not in found and isinstance(value, str):  # a known kind is a str
            found[kind] = value
    return found


def differs(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether the recorded checksums of ``a`` and ``b`` differ; None if they share no kind
    (only reading the bytes with the other's algorithm can tell)."""
    ours, theirs = checksums(a), checksums(b)
    common = ours.keys() & theirs.keys()
    if not common:
        return None
    return any(ours[kind] != theirs[kind] for kind in common)


def preferred(doc: dict[str, Any]) -> str | None:
    """The checksum to verify bytes against: adler32 (per file) where known, else sha512."""
    found = checksums(doc)
    return found.get("adler32") or found.get("sha512-dirhash")


def rank(entry: dict[str, Any]) -> int:
    """2: strong evidence, 1: recorded by someone else, 0: read from disk with nothing to
    compare."""
    evidence = entry.get("evidence")
    return 2 if evidence in STRONG else 0 if evidence == DISK else 1


def stored_origin(run: dict[str, Any], data_type: str, version: str | None) -> dict | None:
    """The origin recorded in the run document for a dataset, or None."""
    want = dataset_match(data_type, version)
    for origin in run.get("origins") or ():
        if isinstance(origin, dict) and all(origin.get(k) == v for k, v in want.items()):
            return origin
    return None


def copies_of(run: dict[str, Any], data_type: str, version: str | None) -> list[dict]:
    """The ``transferred`` entries of a dataset with a checksum cax can verify."""
    key_version = version if data_type != "raw" else None
    return [e for e in run.get("data") or () if isinstance(e, dict)
            and e.get("type") == data_type and e.get("status") == TRANSFERRED
            and (key_version is None or e.get("pax_version") == key_version)
            and checksums(e)]


@dataclass
class Judgement:
    """What a dataset's bytes must be: its ``origin`` (stored or derived), or why none can be
    said: ``disputed`` (strong copies disagree: host -> checksum) or unsettled (neither)."""

    origin: dict[str, Any] | None
    stored: bool = False
    disputed: dict[str, str] = field(default_factory=dict)

    @property
    def settled(self) -> bool:
        return self.origin is not None

    def agrees(self, entry: dict[str, Any]) -> bool:
        """Whether ``entry``'s recorded checksum is known to equal the origin's."""
        return self.origin is not None and differs(entry, self.origin) is False

    def describe(self) -> str:
        if self.disputed:
            return "disputed: " + ", ".join(f"{host} has {value[:20]}..."
                                            for host, value in sorted(self.disputed.items()))
        if self.origin is None:
            return "no origin yet"
        how = "recorded by its producer" if self.stored else "settled by its copies"
        # a stored origin may record a checksum of a kind cax cannot verify (written by hand)
        shown = preferred(self.origin) or str(self.origin.get("checksum"))
        return f"origin {shown[:20]}... at {self.origin.get('host')} ({how})"

    @property
    def stored_checksum(self) -> str | None:
        """The checksum of the stored origin; None when the origin is not a stored one."""
        return self.origin["checksum"] if self.stored and self.origin is not None else None


def judge(run: dict[str, Any], data_type: str, version: str | None) -> Judgement:
    """Judge a dataset of ``run``: its stored origin, else what its copies' evidence settles."""
    stored = stored_origin(run, data_type, version)
    if stored is not None:
        return Judgement(stored, stored=True)
    copies = copies_of(run, data_type, version)
    for level in (2, 1, 0):
        group = [e for e in copies if rank(e) == level]
        if not group:
            continue
        pairs = [differs(a, b) for i, a in enumerate(group) for b in group[i + 1:]]
        if any(pairs):
            if level == 2:
                return Judgement(None, disputed={e["host"]: preferred(e) or "" for e in group})
            return Judgement(None)
        if None in pairs:  # copies of different kinds: reading tells
            return Judgement(None)
        merged: dict[str, Any] = {"host": group[0].get("host"), "evidence": "copies agree"}
        for entry in group:
            for kind, value in checksums(entry).items():
                name = "checksum" if kind == "adler32" else "legacy_checksum"
                merged.setdefault(name, value)
        if "checksum" not in merged:
            merged["checksum"] = merged.pop("legacy_checksum")
        return Judgement(merged)
    return Judgement(None)


def judge_key(run: dict[str, Any], key: EntryKey) -> Judgement:
    return judge(run, key.type, key.version)


def origin_record(checksum: str, *, host: str, evidence: str, now: dt.datetime,
                  key: EntryKey, size: int | None = None, file_count: int | None = None,
                  legacy_checksum: str | None = None) -> dict[str, Any]:
    """The ``origins`` element a producer's registration writes, once."""
    record: dict[str, Any] = {**dataset_match(key.type, key.version), "checksum": checksum,
                              "host": host, "evidence": evidence, "time": now}
    if legacy_checksum:
        record["legacy_checksum"] = legacy_checksum
    if size is not None:
        record.update(size=size, file_count=file_count)
    return record


@dataclass(frozen=True)
class Proof:
    """How a registration's verified checksum relates to its dataset's origin; the registering
    write checks it in the same atomic update (invariant (c) of the ledger):

    * ``matches``: the stored origin, which the bytes were verified against -- it must still be
      the run's origin;
    * ``establishes``: the origin this registration records (the producer) -- the run must not
      have one yet;
    * neither (``unsettled``): a dataset of the original's with no stored origin, whose bytes
      were verified against a recorded checksum -- still no stored origin.
    """

    matches: dict[str, Any] | None = None
    establishes: dict[str, Any] | None = None

    @classmethod
    def against(cls, judgement: Judgement) -> Proof:
        """The proof of bytes verified against ``judgement``'s origin."""
        return cls(matches=judgement.origin if judgement.stored else None)
