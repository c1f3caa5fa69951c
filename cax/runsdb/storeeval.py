"""What the embedded store evaluates on documents in memory, beside mongomock: the filtered
positional operator (``$[e]`` with ``arrayFilters``, which mongomock lacks), entry counts the
index answers, plain projections, and values as a client gets them back."""

from __future__ import annotations

import copy
import datetime as dt
import sys
from collections.abc import Iterable
from typing import Any

import bson
import mongomock.filtering
import mongomock.helpers
from pymongo.errors import OperationFailure

from cax.runsdb.storeindex import ENTRY_COLUMNS


def resolve_array_filters(doc: dict, update: dict, array_filters: list[dict]) -> dict:
    """``update`` with each ``array.$[identifier].rest`` path replaced by the paths of the
    elements of ``doc[array]`` that the identifier's filter selects (MongoDB 3.6's filtered
    positional operator; mongomock has none).  Only a top-level array is supported, as cax
    uses it; an identifier without a filter is refused, as by MongoDB."""
    filters: dict[str, dict] = {}
    for spec in array_filters:
        for path, condition in spec.items():
            ident, _, rest = path.partition(".")
            filters.setdefault(ident, {})[rest or "$self"] = condition
    resolved: dict[str, dict] = {}
    for op, fields in update.items():
        out: dict[str, Any] = {}
        for path, value in fields.items():
            head, marker, tail = path.partition(".$[")
            if not marker:
                out[path] = value
                continue
            ident, _, rest = tail.partition("]")
            if ident not in filters or "." in head or "$[" in rest:
                raise OperationFailure(f"the embedded runs DB cannot resolve {path!r}")
            condition = mongomock.helpers.patch_datetime_awareness_in_document(filters[ident])
            for index, element in enumerate(doc.get(head) or ()):
                if isinstance(element, dict) and mongomock.filtering.filter_applies(condition,
                                                                                   element):
                    out[f"{head}.{index}{rest}"] = value
        if out:
            resolved[op] = out
    return resolved


def entry_count(pipeline: list[dict], columns: dict[str, str] = ENTRY_COLUMNS
                 ) -> tuple[dict[str, str], str] | None:
    """Recognise a count of ``data[]`` entries grouped by index fields, else None.

    The shape is ``[$project of data.* fields (optional), $unwind "$data", $group {_id:
    {name: "$data.<field>", ...}, total: {$sum: 1}}]``, with every field one the index holds:
    the index then answers it exactly, without decoding run documents.  Returns the group
    names mapped to index columns, and the name of the total.
    """
    stages = list(pipeline)
    if stages and set(stages[0]) == {"$project"} and all(
            key == "_id" or key.startswith("data.") for key in stages[0]["$project"]):
        projected = {key[5:] for key, keep in stages[0]["$project"].items()
                     if key != "_id" and keep}
        stages = stages[1:]
    else:
        projected = None
    if len(stages) != 2 or stages[0] != {"$unwind": "$data"} or set(stages[1]) != {"$group"}:
        return None
    group = dict(stages[1]["$group"])
    key = group.pop("_id", None)
    if not isinstance(key, dict) or not key or len(group) != 1:
        return None
    (total, accumulator), = group.items()
    if accumulator != {"$sum": 1}:
        return None
    names = {}
    for name, path in key.items():
        field = path[6:] if isinstance(path, str) and path.startswith("$data.") else None
        if field not in columns or (projected is not None and field not in projected):
            return None
        names[name] = columns[field]
    return names, total


def merge_counts(found: list[dict], extra: Iterable[dict], total: str) -> list[dict]:
    """Add ``extra``'s counts to equal groups of ``found``; return the groups it lacks."""
    by_id = {bson.encode(row["_id"]): row for row in found}
    new = []
    for row in extra:
        same = by_id.get(bson.encode(row["_id"]))
        if same is None:
            new.append(row)
        else:
            same[total] += row[total]
    return new


def inclusion(projection: Any) -> tuple[set[str], bool] | None:
    """(fields kept, whether ``_id`` is) of a plain inclusion projection of top-level
    fields (None: all of them), or None for anything else (mongomock applies those)."""
    if projection is None:
        return None
    if not isinstance(projection, dict) or not projection:
        return None
    keep = set()
    with_id = True
    for key, value in projection.items():
        if not isinstance(key, str) or "." in key or key.startswith("$"):
            return None
        if key == "_id" and value in (0, False) and not isinstance(value, float):
            with_id = False
        elif value in (1, True) and not isinstance(value, float):
            keep.add(key)
        else:
            return None
    return (keep, with_id) if keep or with_id else None


def settled(value: Any) -> Any:
    """A decoded value as a client returns it (datetimes aware, in UTC, as mongomock's
    ``tz_aware`` client gives them), its field names interned: every run's ``host`` is then
    one string, and 100,000 runs held by a pass take 40% less memory."""
    if isinstance(value, dict):
        return {sys.intern(k): settled(v) for k, v in value.items()}
    if isinstance(value, list):
        return [settled(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.timezone.utc)
    return value


def sql_order(value: Any) -> tuple[int, Any]:
    """A regular document's sort column as SQLite (and MongoDB) orders it: null, numbers,
    strings."""
    if value is None:
        return 0, 0
    if isinstance(value, str):
        return 2, value
    return 1, value


def project(doc: dict, projection: Any) -> dict:
    """Apply a simple inclusion projection to a document already in memory."""
    if not projection:
        return doc
    keep = set(projection) | {"_id"}
    return {k: v for k, v in doc.items() if k in keep}


def set_paths(doc: dict, update: dict) -> bool:
    """Apply ``update`` to ``doc`` in place, if it is only ``$set``/``$unset`` of plain paths
    through objects and existing array elements, as MongoDB applies those; return False,
    having changed nothing, for anything else (mongomock applies it then).

    Every entry write of cax has this shape once its ``$[e]`` paths are resolved, and
    mongomock's general update (a deep copy of the run, the filter evaluated again) was most
    of the cost of a write, and of AddSize's 100,000 after an import.
    """
    if not update or not set(update) <= {"$set", "$unset"} \
            or any(not isinstance(fields, dict) or not fields for fields in update.values()):
        return False
    paths = [(op, path, value) for op, fields in update.items() for path, value in fields.items()]
    if any(not isinstance(path, str) for _, path, _ in paths):
        return False
    names = sorted(path for _, path, _ in paths)
    if any(b.startswith(a + ".") for a, b in zip(names, names[1:], strict=False)):
        return False  # conflicting paths: the server refuses the update
    steps = []
    for op, path, value in paths:
        parts = path.split(".")
        if parts[0] == "_id" or any(not p or p.startswith("$") for p in parts):
            return False
        found = _walk(doc, parts)
        if found is None:
            return False
        steps.append((op, *found, value))
    for op, parent, missing, last, value in steps:
        if op == "$unset":
            if missing:  # nothing there to unset
                continue
            if isinstance(parent, list):
                parent[int(last)] = None  # an array element unset is set to null
            else:
                parent.pop(last, None)
            continue
        for part in missing:
            parent = parent.setdefault(part, {})
        parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(value)
    return True


def _walk(doc: dict, parts: list[str]) -> tuple[Any, list[str], str] | None:
    """(the deepest existing object on the path to ``parts[-1]``, the parts missing below it,
    the last part), or None where the path meets a value that is neither an object nor an
    existing element of an array (left to mongomock: the server refuses, or pads an array)."""
    current: Any = doc
    for depth, part in enumerate(parts[:-1]):
        if isinstance(current, dict):
            if part not in current:
                return current, parts[depth:-1], parts[-1]
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return None
    last = parts[-1]
    if isinstance(current, dict):
        return current, [], last
    if isinstance(current, list) and last.isdigit() and int(last) < len(current):
        return current, [], last
    return None
