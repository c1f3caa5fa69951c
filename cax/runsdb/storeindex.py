"""The embedded store's index: which documents a query may match, found without decoding any.

The store evaluates every query with mongomock, so that each stays valid MongoDB; this module
only narrows the documents it is evaluated on.  Each document gets a few index values (its
``number``, ``name`` and ``start``, and one row per ``data[]`` entry with host, type, status,
processor version and location), and a query is turned into a set of candidate documents
(``storeplan``) that is always a *superset* of its matches: a condition the index cannot judge
selects everything, so a wrong answer is impossible, only a slower one.

Negative conditions matter as much as positive ones: a copy task asks for runs that have a
copy at the peer but *no* entry here, and in steady state every run has both.  ``$not
$elemMatch`` whose conditions the index holds exactly is answered as a complement, so such a
pass decodes no document at all.

Documents whose indexed fields are not plain values (an array for ``number``, an entry that
is not an object, a host that is a list, a NaN, a ``start`` that is not a date) are marked
irregular: they are candidates for every query and never counted as certain matches.
"""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import bson

if TYPE_CHECKING:
    from cax.runsdb.storeplan import Term

#: Entry fields held by the index, and their column names.
ENTRY_COLUMNS = {"host": "host", "type": "type", "status": "status", "pax_version": "version",
                 "location": "location"}
#: Entry fields held by the index for one kind of condition each, never equality or grouping
#: (``condition_compare``), and their columns.  ``verified``: ``verified_time`` as epoch
#: milliseconds, ``NEVER`` for anything else -- Scrub asks for the copies not verified since a
#: time that moves with every pass, so no remembered answer serves it; an index range does.
#: ``disputed``: 1 where the entry has the field, else NULL -- ``cax status --stuck`` and the
#: website's Stuck page ask for disputed copies, which are few among 100,000 runs.
RANGE_COLUMNS = {"verified_time": "verified", "disputed": "disputed"}
#: ``verified`` of an entry whose ``verified_time`` is missing, null or not a date: below every
#: date MongoDB can hold, so "not verified since T" is one range (``verified < T``).
NEVER = -(2 ** 62)
#: Top-level fields held by the index (columns of the document table) that queries select on.
DOC_COLUMNS = ("number", "name")
#: Top-level fields a sort may be answered from the index on (``start`` as epoch milliseconds).
SORT_COLUMNS = ("start", "number", "name")

Scalar = (str, int, float)


@dataclass
class IndexValues:
    """What the index holds for one document."""

    number: Any
    name: Any
    start: int | None
    entries: list[tuple[Any, ...]]
    irregular: bool
    tags: list[Any]


def plain(value: Any) -> bool:
    """A value SQLite orders and compares as MongoDB does (NaN would become NULL there)."""
    if isinstance(value, float):
        return not math.isnan(value)
    return value is None or (isinstance(value, Scalar) and not isinstance(value, bool))


def _ms(value: dt.datetime) -> int:
    """A date as the index holds it: BSON dates are milliseconds since the epoch."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return (value - EPOCH) // dt.timedelta(milliseconds=1)


def _epoch_ms(value: Any) -> int | None:
    """``start`` (or ``verified_time``) as the store sorts it, None if it is not a date."""
    return _ms(value) if isinstance(value, dt.datetime) else None


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def index_values(doc: dict[str, Any]) -> IndexValues:
    """Return the index values of ``doc``; irregular if any field is not a plain value."""
    number, name, data = doc.get("number"), doc.get("name"), doc.get("data")
    start = doc.get("start")
    irregular = not (plain(number) and plain(name)) \
        or not (start is None or isinstance(start, dt.datetime))
    entries: list[tuple[Any, ...]] = []
    if data is not None and not isinstance(data, list):
        irregular = True
    for entry in data or ():
        if not isinstance(entry, dict):
            irregular = True
            continue
        values = tuple(entry.get(field) for field in ENTRY_COLUMNS)
        if not all(plain(v) for v in values):
            irregular = True
        verified = _epoch_ms(entry.get("verified_time"))
        entries.append((*values, NEVER if verified is None else verified,
                        1 if "disputed" in entry else None))
    tags, names = doc.get("tags"), []
    for tag in tags if isinstance(tags, list) else ():
        if isinstance(tag, dict) and plain(tag.get("name")):
            if tag.get("name") is not None:
                names.append(tag["name"])
        else:
            irregular = True
    if tags is not None and not isinstance(tags, list):
        irregular = True
    if irregular:  # a candidate for every query: its columns are never consulted
        return IndexValues(None, None, None, [], True, [])
    return IndexValues(number, name, _epoch_ms(start), entries, False, names)


@dataclass(frozen=True)
class Candidates:
    """A set of document row ids, or (``complement``) every document except those."""

    rows: frozenset[int]
    complement: bool

    @property
    def everything(self) -> bool:
        return self.complement and not self.rows


EVERYTHING = Candidates(frozenset(), True)


def intersect(a: Candidates, b: Candidates) -> Candidates:
    if not a.complement and not b.complement:
        return Candidates(a.rows & b.rows, False)
    if a.complement and b.complement:
        return Candidates(a.rows | b.rows, True)
    pos, neg = (a, b) if not a.complement else (b, a)
    return Candidates(pos.rows - neg.rows, False)


def union(a: Candidates, b: Candidates) -> Candidates:
    if not a.complement and not b.complement:
        return Candidates(a.rows | b.rows, False)
    if a.complement and b.complement:
        return Candidates(a.rows & b.rows, True)
    pos, neg = (a, b) if not a.complement else (b, a)
    return Candidates(neg.rows - pos.rows, True)


#: Comparisons on a date the index answers (``start``, ``verified_time``), as SQL operators.
START_OPERATORS = {"$lt": "<", "$lte": "<=", "$gt": ">", "$gte": ">=", "$eq": "="}


@dataclass(frozen=True)
class Compare:
    """Conditions on ``docs.start`` (epoch ms), all to hold: ``(SQL operator, value)`` pairs;
    none at all means the column is NULL (``start`` null or missing)."""

    terms: tuple[tuple[str, int | None], ...]


#: Conditions on ``verified_time`` are answered by a range of ``entries.verified`` that holds
#: every match (START_OPERATORS, and these negations): a non-date, stored as NEVER, satisfies
#: ``$lt`` (and ``$not $gte``) there and not on MongoDB, so the answer is a superset, never
#: exact (mongomock judges the candidates).
VERIFIED_NEGATIONS = {"$gte": "<", "$gt": "<="}


def verified_compare(condition: Any) -> Compare | None:
    """``verified_time``'s condition as a range of ``entries.verified`` holding every match
    (see VERIFIED_NEGATIONS), or None if it is not one: a date, date comparisons, or ``$not``
    of one ``$gte``/``$gt`` a date (Scrub's "not verified since")."""
    if isinstance(condition, dt.datetime):
        condition = {"$eq": condition}
    if not isinstance(condition, dict) or not condition:
        return None
    terms = []
    for op, value in condition.items():
        if op == "$not" and isinstance(value, dict) and len(value) == 1:
            (inner, value), = value.items()
            sql = VERIFIED_NEGATIONS.get(inner)
        else:
            sql = START_OPERATORS.get(op)
        if sql is None or not isinstance(value, dt.datetime):
            return None
        terms.append((sql, _ms(value)))
    return Compare(tuple(terms))


def condition_compare(field: str, condition: Any) -> tuple[Compare | None, bool]:
    """The condition on the RANGE_COLUMNS ``field`` as a Compare of its column (None: not one
    the column answers), and whether the column answers it exactly."""
    if field == "verified_time":
        return verified_compare(condition), False
    if isinstance(condition, dict) and set(condition) == {"$exists"} \
            and isinstance(condition["$exists"], (bool, int)):
        # ``x IS NOT ?`` with NULL: SQLite's null-safe "is not null"
        return (Compare((("IS NOT", None),)) if condition["$exists"] else Compare(())), True
    return None, False


def start_compare(condition: Any) -> Compare | None:
    """``start``'s condition as a Compare, if it is one the index answers exactly for regular
    documents (whose ``start`` is a date or null): a date, null, or date comparisons."""
    if condition is None:
        return Compare(())
    if isinstance(condition, dt.datetime):
        return Compare((("=", _ms(condition)),))
    if isinstance(condition, dict) and condition and all(
            op in START_OPERATORS and isinstance(value, dt.datetime)
            for op, value in condition.items()):
        return Compare(tuple((START_OPERATORS[op], _ms(value))
                             for op, value in condition.items()))
    return None


def sql_conditions(columns: dict[str, Any]) -> tuple[str, list[Any]]:
    """Return ``col IN (?, ...) AND ...`` (``col < ?``, ``col IS NULL`` for a Compare) and its
    parameters."""
    parts, params = [], []
    for column, values in columns.items():
        if isinstance(values, Compare):
            parts += [f"{column} {op} ?" for op, _ in values.terms] or [f"{column} IS NULL"]
            params += [value for _, value in values.terms]
            continue
        values = list(values)
        parts.append(f"{column} IN ({', '.join('?' * len(values))})")
        params.extend(values)
    return " AND ".join(parts), params


def id_key(value: Any) -> bytes:
    """The stored key of an ``_id``: its BSON encoding, so ObjectId("..") and ".." differ."""
    return bson.encode({"": value})


def store_generation(conn: sqlite3.Connection) -> int:
    """The store's generation: ``meta.seq``, bumped by every writing transaction."""
    row = conn.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()
    return int(row[0]) if row else 0


def written_since(conn: sqlite3.Connection, coll: str, generation: int) -> set[int]:
    """The documents of ``coll`` written after ``generation`` (an index range on
    ``docs (coll, seq)``: the few rows an idle pass finds changed, not the collection)."""
    return {r for (r,) in conn.execute("SELECT row FROM docs WHERE coll = ? AND seq > ?",
                                       (coll, generation))}


#: Looked-up terms with more rows than this are remembered (``SqlIndexReader.rows``), this many.
REMEMBER_ABOVE = 1000
REMEMBERED_TERMS = 16
Remembered = OrderedDict[tuple[str, Any], tuple[int, frozenset[int]]]


class SqlIndexReader:
    """The planner's view of one collection's index rows (see ``storeplan.IndexReader``).

    The documents of a large term (every run with a copy at a site) are remembered in
    ``remembered`` with the store's generation, and brought up to date from the documents
    written since: a copy task's query, which names the time and so is planned anew every
    pass, then costs the rows that changed, not four lookups of 100,000 rows (130 ms).
    """

    def __init__(self, conn: sqlite3.Connection, coll: str,
                 remembered: Remembered | None = None, generation: int | None = None):
        self.conn = conn
        self.coll = coll
        self.remembered = remembered
        self._generation = generation

    def generation(self) -> int:
        if self._generation is None:
            self._generation = store_generation(self.conn)
        return self._generation

    @staticmethod
    def _where(term: Term) -> tuple[str, str, str, list[Any]]:
        """(table, its document id column, conditions, parameters) of ``term``."""
        columns = {("key" if column == "_id" else column):
                   ([id_key(v) for v in values] if column == "_id" else values)
                   for column, values in term.columns}
        where, params = sql_conditions(columns)
        if term.table == "doc":
            return "docs", "row", where, params
        return ("tags" if term.table == "tag" else "entries"), "doc", where, params

    def rows(self, term: Term) -> frozenset[int]:
        # a term with a time in it is new each pass: not worth remembering
        remembered = None if any(isinstance(values, Compare) for _, values in term.columns) \
            else self.remembered
        key = (self.coll, term)
        known = remembered.get(key) if remembered is not None else None
        if known is not None:
            since, rows = known
            if since != self.generation():
                changed = written_since(self.conn, self.coll, since)
                rows = (rows - changed) | frozenset(self.probe(term, changed))
        else:
            table, ident, where, params = self._where(term)
            rows = frozenset(r for (r,) in self.conn.execute(
                f"SELECT {ident} FROM {table} WHERE coll = ? AND {where}", [self.coll, *params]))
        if remembered is not None and len(rows) > REMEMBER_ABOVE:
            remembered[key] = (self.generation(), rows)
            remembered.move_to_end(key)
            while len(remembered) > REMEMBERED_TERMS:
                remembered.popitem(last=False)
        return rows

    def count(self, term: Term, cap: int) -> int:
        table, _, where, params = self._where(term)
        (n,) = self.conn.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE coll = ? AND {where} LIMIT ?)",
            [self.coll, *params, cap]).fetchone()
        return int(n)

    def probe(self, term: Term, rows: Iterable[int]) -> set[int]:
        table, ident, where, params = self._where(term)
        rows, found = sorted(rows), set[int]()
        for start in range(0, len(rows), 500):
            chunk = rows[start:start + 500]
            found.update(r for (r,) in self.conn.execute(
                f"SELECT {ident} FROM {table} WHERE {ident} IN ({', '.join('?' * len(chunk))}) "
                f"AND {where}", [*chunk, *params]))
        return found
