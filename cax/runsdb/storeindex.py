"""The embedded store's index: which documents a query may match, found without decoding any.

The store evaluates every query with mongomock, so that each stays valid MongoDB; this module
only narrows the documents it is evaluated on.  Each document gets a few index values (its
``number``, ``name`` and ``start``, and one row per ``data[]`` entry with host, type, status
and processor version), and a query is turned into a set of candidate documents that is always
a *superset* of its matches: a condition the index cannot judge selects everything, so a
wrong answer is impossible, only a slower one.

Negative conditions matter as much as positive ones: a copy task asks for runs that have a
copy at the peer but *no* entry here, and in steady state every run has both.  ``$not
$elemMatch`` whose conditions the index holds exactly is answered as a complement, so such a
pass decodes no document at all.

Documents whose indexed fields are not plain values (an array for ``number``, an entry that
is not an object, a host that is a list, a NaN, a ``start`` that is not a date) are marked
irregular: they are candidates for every
query and never counted as certain matches.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

#: Entry fields held by the index, and their column names.
ENTRY_COLUMNS = {"host": "host", "type": "type", "status": "status", "pax_version": "version"}
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
    entries: list[tuple[Any, Any, Any, Any]]
    irregular: bool


def _plain(value: Any) -> bool:
    """A value SQLite orders and compares as MongoDB does (NaN would become NULL there)."""
    if isinstance(value, float):
        return not math.isnan(value)
    return value is None or (isinstance(value, Scalar) and not isinstance(value, bool))


def _epoch_ms(value: Any) -> int | None:
    """``start`` as the store sorts it: BSON dates are milliseconds since the epoch."""
    if not isinstance(value, dt.datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return (value - EPOCH) // dt.timedelta(milliseconds=1)


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def index_values(doc: dict[str, Any]) -> IndexValues:
    """Return the index values of ``doc``; irregular if any field is not a plain value."""
    number, name, data = doc.get("number"), doc.get("name"), doc.get("data")
    start = doc.get("start")
    irregular = not (_plain(number) and _plain(name)) \
        or not (start is None or isinstance(start, dt.datetime))
    entries: list[tuple[Any, Any, Any, Any]] = []
    if data is not None and not isinstance(data, list):
        irregular = True
    for entry in data or ():
        if not isinstance(entry, dict):
            irregular = True
            continue
        values = tuple(entry.get(field) for field in ENTRY_COLUMNS)
        if not all(_plain(v) for v in values):
            irregular = True
        entries.append(values)  # type: ignore[arg-type]
    if irregular:  # a candidate for every query: its columns are never consulted
        return IndexValues(None, None, None, [], True)
    return IndexValues(number, name, _epoch_ms(start), entries, False)


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


def _values(condition: Any) -> list[Any] | None:
    """The plain values an equality or ``$in`` condition accepts, or None if it is neither."""
    if isinstance(condition, dict):
        if set(condition) == {"$eq"}:
            condition = condition["$eq"]
        elif set(condition) == {"$in"} and isinstance(condition["$in"], list):
            values = condition["$in"]
            return values if all(_plain(v) and v is not None for v in values) else None
        else:
            return None
    return [condition] if _plain(condition) and condition is not None else None


def _id_values(condition: Any) -> list[Any] | None:
    """The ``_id`` values an equality or ``$in`` accepts (any BSON value), or None."""
    if isinstance(condition, dict) and condition and all(k.startswith("$") for k in condition):
        if set(condition) == {"$eq"}:
            return [condition["$eq"]]
        if set(condition) == {"$in"} and isinstance(condition["$in"], list):
            return [v for v in condition["$in"] if not isinstance(v, (dict, list))] \
                if all(not isinstance(v, (dict, list)) for v in condition["$in"]) else None
        return None
    return None if isinstance(condition, (list, type(None))) else [condition]


#: Comparisons on ``start`` the index answers, as SQL operators on ``docs.start``.
START_OPERATORS = {"$lt": "<", "$lte": "<=", "$gt": ">", "$gte": ">=", "$eq": "="}


@dataclass(frozen=True)
class Compare:
    """Conditions on ``docs.start`` (epoch ms), all to hold: ``(SQL operator, value)`` pairs;
    none at all means the column is NULL (``start`` null or missing)."""

    terms: tuple[tuple[str, int], ...]


def _start_compare(condition: Any) -> Compare | None:
    """``start``'s condition as a Compare, if it is one the index answers exactly for regular
    documents (whose ``start`` is a date or null): a date, null, or date comparisons."""
    if condition is None:
        return Compare(())
    if isinstance(condition, dt.datetime):
        return Compare((("=", _epoch_ms(condition)),))
    if isinstance(condition, dict) and condition and all(
            op in START_OPERATORS and isinstance(value, dt.datetime)
            for op, value in condition.items()):
        return Compare(tuple((START_OPERATORS[op], _epoch_ms(value))
                             for op, value in condition.items()))
    return None


class Planner:
    """Turns one query into candidates, asking ``lookup`` for the row ids of index matches.

    ``lookup(table_conditions)`` gets ``("doc", {column: values})`` or ``("entry", {column:
    values})`` and returns the row ids of regular documents matching all of them (the
    irregular ones are added once, at the end, by the caller).  Values are a list (equal to
    one of them) or, for ``start`` when the store has that column (``start_column``), a
    Compare: the keyset pages of ``cax web`` ask for the runs that started before a time.
    """

    def __init__(self, lookup: Any, start_column: bool = True):
        self.lookup = lookup
        self.start_column = start_column

    def plan(self, query: dict[str, Any]) -> Candidates:
        result = EVERYTHING
        for key, condition in query.items():
            result = intersect(result, self._field(key, condition))
        return result

    def _field(self, key: str, condition: Any) -> Candidates:
        if key in ("$and", "$or") and isinstance(condition, list) and condition:
            parts = [self.plan(q) if isinstance(q, dict) else EVERYTHING for q in condition]
            combine = intersect if key == "$and" else union
            result = parts[0]
            for part in parts[1:]:
                result = combine(result, part)
            return result
        if key == "_id":
            values = _id_values(condition)
            return EVERYTHING if values is None else self._rows("doc", {"_id": values})
        if key in DOC_COLUMNS:
            values = _values(condition)
            return EVERYTHING if values is None else self._rows("doc", {key: values})
        if key == "start" and self.start_column:
            compare = _start_compare(condition)
            return EVERYTHING if compare is None else self._rows("doc", {"start": compare})
        if key.startswith("data.") and key[5:] in ENTRY_COLUMNS:
            values = _values(condition)
            return EVERYTHING if values is None else self._rows(
                "entry", {ENTRY_COLUMNS[key[5:]]: values})
        if key == "data" and isinstance(condition, dict):
            return self._data(condition)
        return EVERYTHING

    def _data(self, condition: dict[str, Any]) -> Candidates:
        result = EVERYTHING
        for op, arg in condition.items():
            if op == "$elemMatch" and isinstance(arg, dict):
                columns, _ = self._entry_columns(arg)
                if columns:
                    result = intersect(result, self._rows("entry", columns))
            elif op == "$not" and isinstance(arg, dict) and set(arg) == {"$elemMatch"} \
                    and isinstance(arg["$elemMatch"], dict):
                columns, exact = self._entry_columns(arg["$elemMatch"])
                if columns and exact:
                    result = intersect(result, Candidates(self._rows("entry", columns).rows, True))
        return result

    @staticmethod
    def _entry_columns(match: dict[str, Any]) -> tuple[dict[str, list[Any]], bool]:
        """The index columns ``match`` restricts, and whether they are all it asks."""
        columns: dict[str, list[Any]] = {}
        exact = True
        for field, condition in match.items():
            values = _values(condition) if field in ENTRY_COLUMNS else None
            if values is None:
                exact = False
            else:
                columns[ENTRY_COLUMNS[field]] = values
        return columns, exact

    def _rows(self, table: str, columns: dict[str, Any]) -> Candidates:
        return Candidates(frozenset(self.lookup(table, columns)), False)


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
