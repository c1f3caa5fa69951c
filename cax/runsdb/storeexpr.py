"""``$expr`` for the embedded store, compiled once per query instead of interpreted by mongomock
for every document.

CompareChecksums asks, in one ``$expr``, for the runs whose copy here was not yet judged in
its present state; mongomock evaluated it at about 0.3 ms a run, 34 s for the first pass after
importing 100,000 runs.  The expression is compiled here into Python closures once, and each
run is evaluated in microseconds.

Only a subset is compiled: the operators cax's queries use, on the values they meet (strings,
numbers, null, arrays and objects of them).  An operator outside it makes the whole query
mongomock's; a value outside it met while evaluating one run (a missing field compared, a
date, an array where an object was expected...) raises ``Unsupported`` and that run alone is
evaluated by mongomock.  So the answer is mongomock's wherever the two could differ; the
tests compare them on random runs (tests/unit/test_store_expr.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mongomock.filtering

Scope = dict[str, Any]
Compiled = Callable[[dict[str, Any], Scope], Any]


class Unsupported(Exception):
    """A value this evaluator leaves to mongomock (raised while evaluating one document)."""


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: A field that is not there (MongoDB's "missing", which differs from null).
MISSING = _Missing()


def _rank(value: Any) -> int:
    """MongoDB's order of the types compared here: null, numbers, strings, booleans."""
    if value is None:
        return 1
    if isinstance(value, bool):
        return 8
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            raise Unsupported("NaN")
        return 2
    if isinstance(value, str):
        return 3
    raise Unsupported(type(value).__name__)


def _cmp(a: Any, b: Any) -> int:
    ra, rb = _rank(a), _rank(b)
    if ra != rb:
        return -1 if ra < rb else 1
    if a == b:
        return 0
    return -1 if a < b else 1


def truthy(value: Any) -> bool:
    """MongoDB's truth: false, null, zero and missing are false; everything else is true."""
    if value is MISSING or value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    return True


def _path(value: Any, parts: list[str]) -> Any:
    for part in parts:
        if value is MISSING or value is None:
            return MISSING
        if not isinstance(value, dict):
            raise Unsupported("a path through a non-object")  # arrays map: mongomock's
        value = value.get(part, MISSING)
    return value


def _field(reference: str) -> Compiled | None:
    if reference.startswith("$$"):
        name, *parts = reference[2:].split(".")
        if name in ("ROOT", "CURRENT"):
            return lambda doc, scope: _path(doc, parts)
        if not name or not name[0].islower():  # $$NOW and the other system variables
            return None
        return lambda doc, scope: _path(scope[name], parts) if name in scope \
            else _undefined(name)
    parts = reference[1:].split(".")
    if not all(parts):
        return None
    return lambda doc, scope: _path(doc, parts)


def _undefined(name: str) -> Any:
    raise Unsupported(f"undefined variable {name}")


def compile_expr(expr: Any) -> Compiled | None:
    """The expression as a function of (document, variables), or None if it uses anything
    outside the compiled subset."""
    if isinstance(expr, str):
        return _field(expr) if expr.startswith("$") else (lambda doc, scope: expr)
    if expr is None or isinstance(expr, (bool, int, float)):
        return lambda doc, scope: expr
    if isinstance(expr, list):
        items = [compile_expr(e) for e in expr]
        if any(i is None for i in items):
            return None
        return lambda doc, scope: [i(doc, scope) for i in items]  # type: ignore[misc]
    if not isinstance(expr, dict) or len(expr) != 1:
        return None
    (op, arg), = expr.items()
    make = OPERATORS.get(op)
    return make(arg) if make else None


def _args(arg: Any, count: int | None = None) -> list[Compiled] | None:
    args = arg if isinstance(arg, list) else [arg]
    if count is not None and len(args) != count:
        return None
    compiled = [compile_expr(a) for a in args]
    return None if any(c is None for c in compiled) else compiled  # type: ignore[return-value]


def _operator(build: Callable[[list[Compiled]], Compiled], count: int | None = None,
              least: int = 0) -> Callable[[Any], Compiled | None]:
    """An operator whose argument is its operands (``count`` of them, or at least ``least``):
    ``build`` gets them compiled; None if they are not ``count`` or do not compile."""
    def make(arg: Any) -> Compiled | None:
        args = _args(arg, count)
        return None if args is None or len(args) < least else build(args)
    return make


def _logical(args: list[Compiled], want: bool) -> Compiled:
    def run(doc: dict[str, Any], scope: Scope) -> bool:
        for a in args:  # stops at the first that decides, as the server may
            if truthy(a(doc, scope)) != want:
                return not want
        return want
    return run


def _not(args: list[Compiled]) -> Compiled:
    (a,) = args
    return lambda doc, scope: not truthy(a(doc, scope))


def _comparison(test: Callable[[int], bool]) -> Callable[[Any], Compiled | None]:
    def build(args: list[Compiled]) -> Compiled:
        a, b = args

        def run(doc: dict[str, Any], scope: Scope) -> bool:
            x, y = a(doc, scope), b(doc, scope)
            if x is MISSING or y is MISSING:
                raise Unsupported("a missing field compared")
            return test(_cmp(x, y))
        return run
    return _operator(build, 2)


def _in(args: list[Compiled]) -> Compiled:
    a, b = args

    def run(doc: dict[str, Any], scope: Scope) -> bool:
        x, values = a(doc, scope), b(doc, scope)
        if x is MISSING or not isinstance(values, list):
            raise Unsupported("$in of a missing value or not an array")
        return any(y is not MISSING and _cmp(x, y) == 0 for y in values)
    return run


def _size(args: list[Compiled]) -> Compiled:
    (a,) = args

    def run(doc: dict[str, Any], scope: Scope) -> int:
        value = a(doc, scope)
        if not isinstance(value, list):
            raise Unsupported("$size of a non-array")  # the server refuses it
        return len(value)
    return run


def _if_null(args: list[Compiled]) -> Compiled:
    def run(doc: dict[str, Any], scope: Scope) -> Any:
        for a in args[:-1]:
            value = a(doc, scope)
            if value is not None and value is not MISSING:
                return value
        return args[-1](doc, scope)
    return run


def _elements(value: Any) -> list[Any] | None:
    if value is None or value is MISSING:
        return None
    if not isinstance(value, list):
        raise Unsupported("not an array")
    return value


def _over_array(arg: Any, body_key: str, filtering: bool) -> Compiled | None:
    """``$filter`` (``cond``: the elements it holds true for) or ``$map`` (``in``: its value
    for each element); null for a null or missing input."""
    if not isinstance(arg, dict) or set(arg) != {"input", "as", body_key} \
            or not isinstance(arg["as"], str):
        return None
    name = arg["as"]
    source, body = compile_expr(arg["input"]), compile_expr(arg[body_key])
    if source is None or body is None:
        return None

    def run(doc: dict[str, Any], scope: Scope) -> list[Any] | None:
        items = _elements(source(doc, scope))
        if items is None:
            return None
        values = [(item, body(doc, {**scope, name: item})) for item in items]
        if filtering:
            return [item for item, value in values if truthy(value)]
        return [value for _, value in values]
    return run


def _array_elem_at(args: list[Compiled]) -> Compiled:
    a, b = args

    def run(doc: dict[str, Any], scope: Scope) -> Any:
        items, index = _elements(a(doc, scope)), b(doc, scope)
        if items is None:
            return None
        if not isinstance(index, int) or isinstance(index, bool):
            raise Unsupported("an index that is not an integer")
        return items[index] if -len(items) <= index < len(items) else MISSING
    return run


def _concat(args: list[Compiled]) -> Compiled:
    def run(doc: dict[str, Any], scope: Scope) -> str | None:
        values = [a(doc, scope) for a in args]
        if any(v is None or v is MISSING for v in values):
            return None
        if not all(isinstance(v, str) for v in values):
            raise Unsupported("$concat of a non-string")
        return "".join(values)
    return run


def _set_equals(args: list[Compiled]) -> Compiled:
    def key(value: Any) -> frozenset[tuple[int, Any]]:
        if not isinstance(value, list):
            raise Unsupported("$setEquals of a non-array")
        return frozenset((_rank(v), v) for v in value)

    def run(doc: dict[str, Any], scope: Scope) -> bool:
        first = key(args[0](doc, scope))
        return all(key(a(doc, scope)) == first for a in args[1:])
    return run


OPERATORS: dict[str, Callable[[Any], Compiled | None]] = {
    "$and": _operator(lambda args: _logical(args, True)),
    "$or": _operator(lambda args: _logical(args, False)),
    "$not": _operator(_not, 1), "$in": _operator(_in, 2), "$size": _operator(_size, 1),
    "$ifNull": _operator(_if_null, least=2),
    "$filter": lambda arg: _over_array(arg, "cond", True),
    "$map": lambda arg: _over_array(arg, "in", False),
    "$arrayElemAt": _operator(_array_elem_at, 2), "$concat": _operator(_concat),
    "$setEquals": _operator(_set_equals, least=2),
    "$eq": _comparison(lambda c: c == 0), "$ne": _comparison(lambda c: c != 0),
    "$gt": _comparison(lambda c: c > 0), "$gte": _comparison(lambda c: c >= 0),
    "$lt": _comparison(lambda c: c < 0), "$lte": _comparison(lambda c: c <= 0),
}


def matcher(query: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """A test of documents against ``query`` (already in mongomock's naive form): mongomock's,
    with the ``$expr`` conditions at its top (or in its top ``$and``) compiled where they can
    be; a document the compiled form cannot judge is judged by mongomock whole."""
    exprs: list[Compiled] = []
    rest: dict[str, Any] = {}
    for key, value in query.items():
        if key == "$expr" and (compiled := compile_expr(value)) is not None:
            exprs.append(compiled)
        elif key == "$and" and isinstance(value, list):
            kept = []
            for part in value:
                if isinstance(part, dict) and set(part) == {"$expr"} \
                        and (compiled := compile_expr(part["$expr"])) is not None:
                    exprs.append(compiled)
                else:
                    kept.append(part)
            if kept:
                rest[key] = kept
        else:
            rest[key] = value
    applies = mongomock.filtering.filter_applies
    if not exprs:
        return lambda doc: applies(query, doc)

    def test(doc: dict[str, Any]) -> bool:
        if not applies(rest, doc):
            return False
        try:
            return all(truthy(e(doc, {})) for e in exprs)
        except Unsupported:
            return applies(query, doc)
    return test
