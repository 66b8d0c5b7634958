"""Metadata filters of a search: ``{"width": {"gte": 100}, "caption": {"in": ["a", "b"]}, "key": "x"}``
(a bare value is equality; operators eq, ne, gt, gte, lt, lte, in; all predicates must hold).

On FAISS the filter is a boolean mask over the metadata table (pyarrow compute, one pass, cached
per filter) and the search over-fetches: ``4k`` candidates, then 4x more until ``k`` of them pass
or the whole index was fetched; the response reports how many were fetched. On a flat index that
is exact filtered search; on IVF it is as good as the index's recall at that depth.
:func:`milvus_expr` writes the same filter as a Milvus boolean expression (for push-down).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class FilterError(ValueError):
    """A filter the caller got wrong (the service answers 422)."""


OPS = ("eq", "ne", "gt", "gte", "lt", "lte", "in")
HIDDEN = ("image_path", "member", "shard", "id")  # server paths and internals: never filterable
MAX_IN = 1000


@dataclass(frozen=True)
class Predicate:
    column: str
    op: str
    value: Any


def filterable_columns(schema: pa.Schema) -> dict[str, str]:
    """column -> JSON type ("number" | "string" | "boolean") of the columns a filter may name."""
    out = {}
    for f in schema:
        if f.name in HIDDEN:
            continue
        t = f.type
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            out[f.name] = "number"
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            out[f.name] = "string"
        elif pa.types.is_boolean(t):
            out[f.name] = "boolean"
    return out


def _scalar_ok(v: Any, kind: str) -> bool:
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, str) if kind == "string" else isinstance(v, bool)


def parse_filter(spec: Any, columns: dict[str, str]) -> list[Predicate]:
    """Validated predicates of ``spec``; every mistake is a 422 naming the column and operator."""
    if not isinstance(spec, dict) or not spec:
        raise FilterError('filter must be a non-empty object like {"width": {"gte": 100}}')
    preds = []
    for col, cond in spec.items():
        if col not in columns:
            raise FilterError(f"filter: unknown column {col!r}; filterable columns: {sorted(columns)}")
        kind = columns[col]
        conds = cond if isinstance(cond, dict) else {"eq": cond}
        if not conds:
            raise FilterError(f"filter: {col}: give a value or operators {list(OPS)}")
        for op, v in conds.items():
            if op not in OPS:
                raise FilterError(f"filter: {col}: unknown operator {op!r}; use {list(OPS)}")
            if op in ("gt", "gte", "lt", "lte") and kind == "boolean":
                raise FilterError(f"filter: {col}: {op} needs a number or string column")
            values = v if op == "in" else [v]
            if op == "in" and (not isinstance(v, list) or not 1 <= len(v) <= MAX_IN):
                raise FilterError(f"filter: {col}: 'in' needs a list of 1 to {MAX_IN} values")
            for x in values:
                if not _scalar_ok(x, kind):
                    raise FilterError(f"filter: {col}: {op} needs {kind} values, got {json.dumps(x)[:60]}")
            if kind == "number":  # integers beyond int64 compare as floats
                values = [float(x) if isinstance(x, int) and abs(x) >= 2**63 else x for x in values]
            preds.append(Predicate(col, op, tuple(values) if op == "in" else values[0]))
    return preds


def mask(table: pa.Table, preds: list[Predicate]) -> np.ndarray:
    """bool [rows]: where every predicate holds (a null never matches)."""
    keep = np.ones(table.num_rows, dtype=bool)
    for p in preds:
        col = table.column(p.column)
        if p.op == "in":
            if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
                col = col.cast(pa.float64())  # one numeric type for the column and the values
                value_set = pa.array([float(v) for v in p.value], pa.float64())
            else:
                value_set = pa.array(list(p.value), type=col.type)
            m = pc.is_in(col, value_set=value_set)
        else:
            fn = {"eq": pc.equal, "ne": pc.not_equal, "gt": pc.greater, "gte": pc.greater_equal,
                  "lt": pc.less, "lte": pc.less_equal}[p.op]
            m = fn(col, p.value)
        keep &= np.asarray(pc.fill_null(m, False).to_numpy(zero_copy_only=False), dtype=bool)
    return keep


def milvus_expr(preds: list[Predicate]) -> str:
    """The filter as a Milvus boolean expression (``width >= 100 and caption in ["a", "b"]``)."""
    sym = {"eq": "==", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}

    def lit(v: Any) -> str:
        return "true" if v is True else "false" if v is False else json.dumps(v)

    return " and ".join(f"{p.column} in [{', '.join(lit(v) for v in p.value)}]" if p.op == "in"
                        else f"{p.column} {sym[p.op]} {lit(p.value)}" for p in preds)


def filter_schema(columns: dict[str, str]) -> dict[str, Any]:
    """The JSON schema of a filter over ``columns`` (for the OpenAPI document)."""
    props = {}
    for col, kind in sorted(columns.items()):
        scalar = {"type": kind}
        ops: dict[str, Any] = {op: scalar for op in ("eq", "ne")}
        if kind != "boolean":
            ops.update({op: scalar for op in ("gt", "gte", "lt", "lte")})
        ops["in"] = {"type": "array", "items": scalar, "minItems": 1, "maxItems": MAX_IN}
        props[col] = {"anyOf": [scalar, {"type": "object", "properties": ops, "additionalProperties": False,
                                         "minProperties": 1}]}
    return {"type": "object", "properties": props, "additionalProperties": False, "minProperties": 1,
            "description": "metadata predicates, all must hold: a value (equality) or operators "
                           "eq, ne, gt, gte, lt, lte, in"}
