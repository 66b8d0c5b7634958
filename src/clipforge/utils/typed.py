"""Values from config files converted to the types a dataclass or function declares.

YAML reads ``lr: 5e-4`` as the *string* ``"5e-4"`` (YAML 1.1 needs a dot for a float) and JSON
users write ``"steps": "1000"``; without conversion such a value fails much later with an error
that names no option. :func:`coerce_fields` converts every value to its declared type up front,
and refuses what cannot be converted with a ``ValueError`` naming the source and the key.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class _Mismatch(Exception):
    pass


def _split_list(value: Any) -> Any:
    """A comma-separated string as a list (the CLI's one list syntax); other values unchanged."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def coerce_value(value: Any, tp: Any) -> Any:
    """``value`` converted to the annotation ``tp`` (raises ``_Mismatch`` when it cannot be)."""
    if tp is Any or tp is typing.Any or isinstance(tp, (str, typing.TypeVar)):
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce_value(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in args:
            return value
        for a in args:  # a number written as a string, e.g. "1" for Literal[1]
            if not isinstance(a, str) and isinstance(value, str) and str(a) == value.strip():
                return a
        raise _Mismatch
    if origin in (tuple,):
        seq = _split_list(value)
        if not isinstance(seq, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce_value(v, args[0]) for v in seq)
        if args and len(args) != len(seq):
            raise _Mismatch
        return tuple(coerce_value(v, a) for v, a in zip(seq, args)) if args else tuple(seq)
    if origin in (list, set, frozenset, typing.Sequence, collections.abc.Sequence):
        seq = _split_list(value)
        if not isinstance(seq, (list, tuple)):
            raise _Mismatch
        items = [coerce_value(v, args[0]) for v in seq] if args else list(seq)
        return items if origin is not set else set(items)
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.strip().replace("_", ""))
            except ValueError:
                raise _Mismatch from None
            if f.is_integer():
                return int(f)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip().replace("_", ""))
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if tp is Path or (isinstance(tp, type) and issubclass(tp, Path)):
        if isinstance(value, (str, Path)):
            return value
        raise _Mismatch
    return value  # other classes (callables, datasets, ...): passed through unchecked


def type_name(tp: Any) -> str:
    """A readable name for an annotation (``float``, ``int or null``, ``one of fp32, bf16``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is tuple:
        return f"{len(args)} values ({', '.join(type_name(a) for a in args)})" if args and args[-1] is not Ellipsis \
            else "a list"
    if origin is not None:
        inner = f" of {type_name(args[0])}" if args else ""
        return f"a list{inner}" if origin is not dict else "a mapping"
    return getattr(tp, "__name__", str(tp))


def declared_types(target: type | Callable[..., Any]) -> dict[str, Any]:
    """Field (dataclass) or parameter (function) name -> resolved annotation."""
    hints = typing.get_type_hints(target)
    if dataclasses.is_dataclass(target):
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(target)}
    return {k: v for k, v in hints.items() if k != "return"}


def coerce_fields(target: type | Callable[..., Any], values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with each known key converted to ``target``'s declared type; keys it does not
    declare are left as they are (the caller reports unknown keys). A value that cannot be
    converted is a ``ValueError``: ``"{where}: lr: expected float, got 'fast'"``."""
    hints = declared_types(target)
    out = dict(values)
    for key, value in values.items():
        tp = hints.get(key)
        if tp is None:
            continue
        try:
            out[key] = coerce_value(value, tp)
        except _Mismatch:
            raise ValueError(f"{where}: {key}: expected {type_name(tp)}, got {value!r}") from None
    return out


__all__ = ["coerce_fields", "coerce_value", "declared_types", "type_name"]
