"""The embedded store's query planner: which documents to decode for a query, found by starting
from its most selective indexed condition.

A query is turned into a tree of *terms* the index can judge (``_id``, ``number`` or ``name``
equal to one of some values; a ``data[]`` entry whose indexed fields equal some values; no
such entry), joined by and/or; a condition the index cannot judge is ``ALL``.  The answer is
always a superset of the matches: mongomock evaluates the query on it afterwards.

Why the order matters: a claim names one run by ``_id`` *and* its entry at a site that holds
a copy of nearly every run.  Looking both up and intersecting costs a whole site's rows per
claim (30 ms at 50,000 runs); starting from ``_id`` costs one row.  So, in a conjunction, the
planner

* estimates each term with a *capped* count (``SELECT count(*) ... LIMIT cap``), the cap being
  the best estimate so far, so estimating never costs more than the driver it finds, and an
  ``_id`` term (at most one row per value) is never counted at all;
* resolves the most selective term (the *driver*), and stops there if it left a handful of
  candidates: mongomock judges the other conditions on those documents;
* otherwise judges each other term on the candidates alone (``probe``: their own index rows),
  unless the term itself is smaller than the candidates, when it is looked up.

Nothing about the counts is stored: an estimate is a bounded walk of a SQLite index, so it is
never stale and costs nothing on writes.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from bson.regex import Regex

from cax.runsdb.storeindex import (
    DOC_COLUMNS,
    ENTRY_COLUMNS,
    EVERYTHING,
    RANGE_COLUMNS,
    Candidates,
    condition_compare,
    intersect,
    plain,
    start_compare,
    union,
)

#: Candidates left by the driver below which the other terms are left to mongomock.
EVALUATE_BELOW = 8
#: A term counted up to this many rows is "large": the first such term drives if none is smaller.
LARGE = 4096
INFINITE = float("inf")


@dataclass(frozen=True)
class Term:
    """Documents with index rows matching ``columns`` (column -> accepted values), all in the
    same row: one document row (``table`` "doc"), one entry row ("entry") or one tag ("tag").
    ``negated``: the documents with *no* such row."""

    table: str
    columns: tuple[tuple[str, Any], ...]  # values: a tuple, or a Compare for ``start``
    negated: bool = False

    def positive(self) -> Term:
        return Term(self.table, self.columns) if self.negated else self

    @property
    def by_id(self) -> bool:
        return self.table == "doc" and any(column == "_id" for column, _ in self.columns)


@dataclass(frozen=True)
class And:
    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    parts: tuple[Node, ...]


class _All:
    """A condition the index cannot judge: every document is a candidate."""

    def __repr__(self) -> str:
        return "ALL"


ALL = _All()
Node = Term | And | Or | _All


class IndexReader(Protocol):
    """What the planner asks of the store's file (regular documents only)."""

    def rows(self, term: Term) -> Collection[int]:
        """The documents with a row matching ``term`` (its ``negated`` is ignored)."""

    def count(self, term: Term, cap: int) -> int:
        """The number of index rows matching ``term``, counted up to ``cap``."""

    def probe(self, term: Term, rows: Collection[int]) -> Collection[int]:
        """Those of ``rows`` with a row matching ``term``, found through their own rows."""


def values_of(condition: Any) -> tuple[Any, ...] | None:
    """The plain values an equality or ``$in`` condition accepts, or None if it is neither.

    None is never one: ``{field: None}`` also matches a missing field, which the index stores
    as NULL and SQL never finds equal.
    """
    if isinstance(condition, dict):
        if set(condition) == {"$eq"}:
            condition = condition["$eq"]
        elif set(condition) == {"$in"} and isinstance(condition["$in"], list):
            values = condition["$in"]
            return tuple(values) if all(plain(v) and v is not None for v in values) else None
        else:
            return None
    return (condition,) if plain(condition) and condition is not None else None


def id_values(condition: Any) -> tuple[Any, ...] | None:
    """The ``_id`` values an equality or ``$in`` accepts (any BSON value), or None.

    A regular expression is not a value: ``{_id: /^a/}`` matches by pattern.
    """
    if isinstance(condition, dict) and condition and all(k.startswith("$") for k in condition):
        if set(condition) == {"$eq"}:
            values = (condition["$eq"],)
        elif set(condition) == {"$in"} and isinstance(condition["$in"], list):
            values = tuple(condition["$in"])
        else:
            return None
    else:
        values = (condition,)
    if any(isinstance(v, (dict, list, type(None), re.Pattern, Regex)) for v in values):
        return None
    return values


def parse(query: dict[str, Any], entry_columns: Mapping[str, str] = ENTRY_COLUMNS,
          start_column: bool = True, tag_column: bool = True) -> Node:
    """The tree of index terms of ``query`` (``entry_columns``: the entry fields indexed, with
    those of RANGE_COLUMNS the store has; ``start_column``: whether ``docs.start`` holds every
    document's start, for the keyset pages of ``cax web``, which ask for the runs that started
    before a time; ``tag_column``: whether the names of ``tags`` are indexed)."""
    parts = [_field(key, condition, entry_columns, start_column, tag_column)
             for key, condition in query.items()]
    parts = [p for p in parts if p is not ALL]
    if not parts:
        return ALL
    return parts[0] if len(parts) == 1 else And(tuple(parts))


def _field(key: str, condition: Any, entry_columns: Mapping[str, str],
           start_column: bool, tag_column: bool) -> Node:
    if key in ("$and", "$or") and isinstance(condition, list) and condition:
        parts = tuple(parse(q, entry_columns, start_column, tag_column)
                      if isinstance(q, dict) else ALL for q in condition)
        if key == "$or":
            return ALL if any(p is ALL for p in parts) else Or(parts)
        parts = tuple(p for p in parts if p is not ALL)
        return And(parts) if parts else ALL
    if key == "_id":
        values = id_values(condition)
        return ALL if values is None else Term("doc", (("_id", values),))
    if key in DOC_COLUMNS:
        values = values_of(condition)
        return ALL if values is None else Term("doc", ((key, values),))
    if key == "start" and start_column:
        compare = start_compare(condition)
        return ALL if compare is None else Term("doc", (("start", compare),))
    if key.startswith("data.") and key[5:] in entry_columns and key[5:] not in RANGE_COLUMNS:
        values = values_of(condition)
        return ALL if values is None else Term("entry", ((entry_columns[key[5:]], values),))
    if key == "tags.name" and tag_column:
        values = values_of(condition)
        return ALL if values is None else Term("tag", (("name", values),))
    if key == "data" and isinstance(condition, dict):
        return _data(condition, entry_columns)
    return ALL


def _data(condition: dict[str, Any], entry_columns: Mapping[str, str]) -> Node:
    parts: list[Node] = []
    for op, arg in condition.items():
        if op == "$elemMatch" and isinstance(arg, dict):
            columns, _ = _entry_columns(arg, entry_columns)
            if columns:
                parts.append(Term("entry", columns))
        elif op == "$not" and isinstance(arg, dict) and set(arg) == {"$elemMatch"} \
                and isinstance(arg["$elemMatch"], dict):
            columns, exact = _entry_columns(arg["$elemMatch"], entry_columns)
            if columns and exact:
                parts.append(Term("entry", columns, negated=True))
    if not parts:
        return ALL
    return parts[0] if len(parts) == 1 else And(tuple(parts))


def _entry_columns(match: dict[str, Any], entry_columns: Mapping[str, str]
                   ) -> tuple[tuple[tuple[str, Any], ...], bool]:
    """The index columns ``match`` restricts, and whether they are all it asks (a range
    column's answer is exact only where ``condition_compare`` says so)."""
    columns: list[tuple[str, Any]] = []
    exact = True
    for field, condition in match.items():
        if field in RANGE_COLUMNS and field in entry_columns:
            compare, answered = condition_compare(field, condition)
            if compare is not None:
                columns.append((entry_columns[field], compare))
            exact = exact and answered and compare is not None
            continue
        values = values_of(condition) if field in entry_columns else None
        if values is None:
            exact = False
        else:
            columns.append((entry_columns[field], values))
    return tuple(columns), exact


def _priority(node: Node) -> tuple[int, int]:
    """The order in which terms are considered: ``_id`` first, negations and ALL last."""
    if isinstance(node, Term):
        if node.negated:
            return 4, 0
        return (0 if node.by_id else 1 if node.table == "doc" else 2), -len(node.columns)
    return (5, 0) if node is ALL else (3, 0)


def _size(found: Candidates | None) -> float:
    return len(found.rows) if found is not None and not found.complement else INFINITE


class Planner:
    """Turns one query into candidates through ``reader`` (see the module's docstring)."""

    def __init__(self, reader: IndexReader, entry_columns: Mapping[str, str] = ENTRY_COLUMNS,
                 start_column: bool = True, tag_column: bool = True):
        self.reader = reader
        self.entry_columns = entry_columns
        self.start_column = start_column
        self.tag_column = tag_column
        self._counts: dict[Term, tuple[int, int]] = {}

    def plan(self, query: dict[str, Any]) -> Candidates:
        found = self.resolve(parse(query, self.entry_columns, self.start_column,
                                   self.tag_column), None)
        return EVERYTHING if found is None else found

    # -- estimates ------------------------------------------------------------------------

    def _count(self, term: Term, cap: int) -> int:
        """Index rows matching ``term``, counted up to ``cap`` (remembered within the plan)."""
        known = self._counts.get(term)
        if known and (known[0] < known[1] or known[1] >= cap):
            return min(known[0], cap)
        value = self.reader.count(term, cap)
        self._counts[term] = (value, cap)
        return value

    def estimate(self, node: Node, cap: int) -> float:
        """At most how many documents ``node`` leaves, if fewer than ``cap``; else >= cap.

        Negations and ALL cannot drive: they leave nearly everything (``INFINITE``).
        """
        if isinstance(node, Term):
            if node.negated:
                return INFINITE
            if node.by_id:
                return min(len(values) for column, values in node.columns if column == "_id")
            return self._count(node, cap)
        if isinstance(node, And):
            best = INFINITE
            for part in sorted(node.parts, key=_priority):
                best = min(best, self.estimate(part, int(min(cap, best))))
            return best
        if isinstance(node, Or):
            total = 0.0
            for part in node.parts:
                total += self.estimate(part, int(max(cap - total, 1)))
                if total >= cap:
                    break
            return total
        return INFINITE

    # -- resolution -----------------------------------------------------------------------

    def resolve(self, node: Node, within: Candidates | None) -> Candidates | None:
        """The candidates of ``node`` among ``within`` (None: among all documents)."""
        if isinstance(node, Term):
            return self._term(node, within)
        if isinstance(node, Or):
            found: Candidates | None = None
            for part in node.parts:
                got = self.resolve(part, within)
                if got is None or got.everything:
                    return within
                found = got if found is None else union(found, got)
            return found
        if isinstance(node, And):
            return self._and(node, within)
        return within

    def _and(self, node: And, within: Candidates | None) -> Candidates | None:
        parts = sorted(node.parts, key=_priority)
        size = _size(within)
        best, driver = min(size, LARGE), None
        for part in parts:
            if best <= 1:  # nothing beats one row (an ``_id``): the rest is not even counted
                break
            estimate = self.estimate(part, int(best))
            if estimate < best:
                best, driver = estimate, part
        if driver is None and within is None:
            driver = next((p for p in parts if _priority(p)[0] < 4), None)
        found = within
        if driver is not None:
            found = self.resolve(driver, found)
            parts.remove(driver)
        for part in parts:
            if _size(found) <= EVALUATE_BELOW:  # mongomock judges the rest on these few
                break
            found = self.resolve(part, found)
        return found

    def _term(self, term: Term, within: Candidates | None) -> Candidates:
        base = term.positive()
        size = _size(within)
        if within is not None and size < INFINITE and self._cheaper_to_probe(base, int(size)):
            matches = frozenset(self.reader.probe(base, within.rows)) if within.rows \
                else frozenset()
            return Candidates(within.rows - matches if term.negated else matches, False)
        rows = Candidates(frozenset(self.reader.rows(base)), term.negated)
        return rows if within is None else intersect(within, rows)

    def _cheaper_to_probe(self, term: Term, size: int) -> bool:
        """Whether judging ``size`` candidates beats looking ``term`` up (more rows than they)."""
        if term.by_id:
            return False
        return self._count(term, size + 1) > size
