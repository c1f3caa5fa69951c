"""Unique indexes of the embedded store, with the keys and errors MongoDB gives them.

The provenance rule "a (host, location) is named by at most one entry of all runs" is a unique
index ``[("data.host", 1), ("data.location", 1)]`` on MongoDB; the embedded store must enforce
the same rule, or a site without a server would accept what production refuses.  The rules
followed here are the MongoDB manual's (Unique Indexes; Multikey Indexes):

* a compound index whose fields lie under the same array gets one key *per array element*
  (``data.host`` and ``data.location`` of the same entry), not the product of all hosts and
  all locations;
* a missing field is indexed as null, so only one document may lack it (an entry without a
  ``location`` at one host is the key (host, null)); a path through an empty array is null
  too, and an empty array indexed itself is ``undefined``, a key of its own;
* the constraint holds *between* documents: one document may repeat a key in its array;
* numbers are compared by value (``1`` and ``1.0`` are the same key), everything else by its
  BSON value;
* a document with arrays in two indexed fields that do not lie under one array cannot be
  indexed ("cannot index parallel arrays", code 171).

Supported key paths are a top-level field or one field below one (``a`` or ``a.b``), with
direction 1 or -1: what cax declares.  Others are refused when the index is created, never
silently enforced differently.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import bson
from bson import ObjectId
from mongomock.filtering import filter_applies
from pymongo.errors import DuplicateKeyError, OperationFailure

#: Stands for an empty array indexed as such (MongoDB's ``undefined`` key), never stored.
UNDEFINED = {"$undefined": True}
MISSING = object()
#: MongoDB's error codes for what this module refuses.
DUPLICATE_KEY = 11000
PARALLEL_ARRAYS = 171
CANNOT_CREATE_INDEX = 67
INDEX_OPTIONS_CONFLICT = 85
INDEX_KEY_SPECS_CONFLICT = 86


@dataclass(frozen=True)
class IndexSpec:
    """One declared index of a collection: its name, key pattern, whether it is unique, and
    its ``partialFilterExpression`` as JSON (only the documents it matches are indexed)."""

    name: str
    keys: tuple[tuple[str, int], ...]
    unique: bool
    partial: str | None = None

    def to_json(self) -> str:
        spec: dict[str, Any] = {"key": [list(k) for k in self.keys], "unique": self.unique}
        if self.partial:
            spec["partialFilterExpression"] = json.loads(self.partial)
        return json.dumps(spec)

    @classmethod
    def from_json(cls, name: str, text: str) -> IndexSpec:
        spec = json.loads(text)
        partial = spec.get("partialFilterExpression")
        return cls(name, tuple((path, direction) for path, direction in spec["key"]),
                   bool(spec["unique"]), json.dumps(partial, sort_keys=True) if partial else None)

    def indexes(self, doc: dict[str, Any]) -> bool:
        """Whether ``doc`` is in the index (its partial filter, if any, matches it)."""
        return not self.partial or filter_applies(json.loads(self.partial), doc)


def index_name(keys: Sequence[tuple[str, Any]]) -> str:
    """MongoDB's default index name: ``data.host_1_data.location_1``."""
    return "_".join(f"{path}_{direction}" for path, direction in keys)


#: ``create_index`` options that change what a unique index enforces: refused, never ignored.
UNSUPPORTED_UNIQUE = ("sparse", "collation", "hidden")
#: Conditions a partial filter may use here (a subset of MongoDB's, which also allows
#: equality, ranges and ``$and``): ``$exists: true``, ``$type: "string"``.
PARTIAL_OPERATORS = ({"$exists": True}, {"$type": "string"})


def make_spec(keys: Any, name: str | None, unique: bool,
              options: dict[str, Any] | None = None) -> IndexSpec:
    """Check a ``create_index`` request the store can hold; OperationFailure if not.

    Options that only matter to a server's index (``background``) are accepted; those that
    change what a unique index enforces are refused, so the embedded store never enforces a
    rule other than the one asked for.
    """
    unsupported = [o for o in UNSUPPORTED_UNIQUE if (options or {}).get(o)]
    if unique and unsupported:
        raise OperationFailure(f"the embedded runs DB does not keep unique indexes with "
                               f"{', '.join(unsupported)}", CANNOT_CREATE_INDEX)
    partial = (options or {}).get("partialFilterExpression")
    if partial is not None and (not isinstance(partial, dict) or not partial or any(
            condition not in PARTIAL_OPERATORS for condition in partial.values())):
        raise OperationFailure(f"the embedded runs DB keeps partial indexes of "
                               f"{{field: {{$exists: true}}}} or {{$type: 'string'}} only, not "
                               f"{partial!r}", CANNOT_CREATE_INDEX)
    if isinstance(keys, str):
        keys = [(keys, 1)]
    keys = tuple((str(path), direction) for path, direction in keys)
    if not keys:
        raise OperationFailure("Index keys cannot be empty", CANNOT_CREATE_INDEX)
    for path, direction in keys:
        if unique and (direction not in (1, -1) or isinstance(direction, bool)):
            raise OperationFailure(f"the embedded runs DB keeps unique indexes with "
                                   f"directions 1 and -1 only, not {direction!r}",
                                   CANNOT_CREATE_INDEX)
        if unique and (path == "_id" or path.count(".") > 1 or not all(path.split("."))
                       or path.startswith("$")):
            raise OperationFailure(f"the embedded runs DB keeps unique indexes on a field or "
                                   f"a field of a field only, not {path!r}", CANNOT_CREATE_INDEX)
    return IndexSpec(name or index_name(keys), keys, unique,
                     json.dumps(partial, sort_keys=True) if partial else None)


def conflict(existing: IndexSpec, wanted: IndexSpec) -> OperationFailure | None:
    """The error MongoDB gives for ``wanted`` beside ``existing``, or None if compatible."""
    if existing.name == wanted.name:
        if existing.keys != wanted.keys:
            return OperationFailure(
                f"An existing index has the same name as the requested index. Requested index: "
                f"{wanted.keys}, existing index: {existing.keys}", INDEX_KEY_SPECS_CONFLICT)
        if existing.unique != wanted.unique or existing.partial != wanted.partial:
            return OperationFailure(
                f"An existing index has the same name as the requested index. When index "
                f"names are not specified, they are auto generated and can cause conflicts. "
                f"Index {existing.name} has unique {existing.unique} and partial filter "
                f"{existing.partial}, requested {wanted.unique} and {wanted.partial}",
                INDEX_OPTIONS_CONFLICT)
        return None
    if (existing.keys, existing.unique, existing.partial) == (wanted.keys, wanted.unique,
                                                              wanted.partial):
        return OperationFailure(f"Index already exists with a different name: {existing.name}",
                                INDEX_OPTIONS_CONFLICT)
    return None


# -- keys ----------------------------------------------------------------------------------

def _expand(value: Any) -> list[Any]:
    """The keys of one indexed value: each element of an array (an empty one: undefined)."""
    if isinstance(value, list):
        return list(value) if value else [UNDEFINED]
    return [None if value is MISSING else value]


def _below(value: Any, field: str) -> Any:
    """``value.field`` as a dotted path reads it in an index (not through a nested array)."""
    return value.get(field, MISSING) if isinstance(value, dict) else MISSING


def _parallel(paths: Iterable[str]) -> OperationFailure:
    names = " ".join(f"[{p}]" for p in paths)
    return OperationFailure(f"cannot index parallel arrays {names}", PARALLEL_ARRAYS)


def key_values(doc: dict[str, Any], keys: Sequence[tuple[str, int]]) -> list[tuple[Any, ...]]:
    """The index keys of ``doc`` (one value per key path each), without repeats.

    OperationFailure (code 171) if two indexed fields are arrays not under one array.
    """
    groups: dict[str, list[tuple[int, str | None]]] = {}
    for i, (path, _) in enumerate(keys):
        top, _, rest = path.partition(".")
        groups.setdefault(top, []).append((i, rest or None))
    per_group: list[list[dict[int, Any]]] = []
    arrays: list[str] = []
    for top, paths in groups.items():
        value = doc.get(top, MISSING)
        if isinstance(value, list):
            arrays.append(top)
            if not value:  # [] itself is undefined; a path through it is null
                per_group.append([{i: UNDEFINED if rest is None else None for i, rest in paths}])
                continue
            per_group.append([partial for element in value
                              for partial in _element_keys(element, paths, top)])
        else:
            inner = [rest for _, rest in paths if rest is not None
                     and isinstance(_below(value, rest), list)]
            arrays.extend(f"{top}.{rest}" for rest in inner)
            per_group.append(_element_keys(value, paths, top, whole=False))
    if len(arrays) > 1 and not _one_array(arrays):
        raise _parallel(arrays)
    found: dict[bytes, tuple[Any, ...]] = {}
    combos: list[dict[int, Any]] = [{}]
    for partials in per_group:
        combos = [{**c, **p} for c in combos for p in partials]
    for combo in combos:
        values = tuple(combo[i] for i in range(len(keys)))
        found.setdefault(canonical(values), values)
    return list(found.values())


def _one_array(arrays: list[str]) -> bool:
    """Whether the arrays met are all one array (a top-level one met by several paths)."""
    return len(set(arrays)) == 1


def _element_keys(element: Any, paths: list[tuple[int, str | None]], top: str,
                  whole: bool = True) -> list[dict[int, Any]]:
    """The partial keys (path index -> value) one array element (or a plain value) gives."""
    columns: dict[int, list[Any]] = {}
    nested = []
    for i, rest in paths:
        if rest is None:
            # an array element that is itself an array is indexed as that array
            columns[i] = [element] if whole else _expand(element)
        else:
            value = _below(element, rest)
            if isinstance(value, list):
                nested.append(f"{top}.{rest}")
            columns[i] = _expand(value)
    if whole and len(nested) > 1:
        raise _parallel(nested)
    partials: list[dict[int, Any]] = [{}]
    for i, values in columns.items():
        partials = [{**p, i: v} for p in partials for v in values]
    return partials


def _normal(value: Any) -> Any:
    """A value as the index compares it: numbers by value, NaN as one NaN."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return {"$nan": True}
        if value.is_integer() and abs(value) < 2 ** 63:
            return int(value)
    if isinstance(value, dict) and value is not UNDEFINED:
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def canonical(values: tuple[Any, ...]) -> bytes:
    """The stored form of one key: equal for keys MongoDB's index holds equal."""
    return bson.encode({"k": [_normal(v) for v in values]})


# -- errors --------------------------------------------------------------------------------

def _shell(value: Any) -> str:
    """A value as the server's error messages print it (BSONObj::toString)."""
    if value is UNDEFINED:
        return "undefined"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, ObjectId):
        return f"ObjectId('{value}')"
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return f"new Date({int(value.timestamp() * 1000)})"
    if isinstance(value, float) and math.isnan(value):
        return "nan.0"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k}: {_shell(v)}" for k, v in value.items()) + " }" \
            if value else "{}"
    if isinstance(value, list):
        return "[ " + ", ".join(_shell(v) for v in value) + " ]" if value else "[]"
    if isinstance(value, re.Pattern):
        return f"/{value.pattern}/"
    return str(value)


def duplicate_key(namespace: str, spec: IndexSpec, values: tuple[Any, ...]
                  ) -> DuplicateKeyError:
    """The error a MongoDB server returns for a write that would repeat a unique key."""
    shown = ", ".join(f"{path}: {_shell(v)}" for (path, _), v in zip(spec.keys, values,
                                                                     strict=True))
    message = (f"E11000 duplicate key error collection: {namespace} index: {spec.name} "
               f"dup key: {{ {shown} }}")
    details = {"code": DUPLICATE_KEY, "errmsg": message,
               "keyPattern": {path: direction for path, direction in spec.keys},
               "keyValue": {path: (None if v is UNDEFINED else v)
                            for (path, _), v in zip(spec.keys, values, strict=True)}}
    return DuplicateKeyError(message, DUPLICATE_KEY, details)


ID_INDEX = IndexSpec("_id_", (("_id", 1),), True)


def unique_rows(coll: str, row: int, doc: dict[str, Any], uniques: list[IndexSpec]
                 ) -> list[tuple[str, str, bytes, int]]:
    """The ``index_keys`` rows of one document: its distinct keys in each unique index."""
    return [(coll, spec.name, canonical(values), row)
            for spec in uniques if spec.indexes(doc) for values in key_values(doc, spec.keys)]


def decode_key(key: bytes) -> list[Any]:
    """The values of a stored key, for an error message (numbers as the index holds them)."""
    return [UNDEFINED if v == UNDEFINED else math.nan if v == {"$nan": True} else v
            for v in bson.decode(key)["k"]]
