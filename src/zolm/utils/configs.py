"""Typed config dataclasses from plain mappings (YAML, JSON, CLI): one-line errors naming the key.

A config dataclass declares each field with :func:`option` (default, help text, the command-line flag it is
known by, the valid choices). :func:`build` turns a mapping into an instance, recursing into nested config
dataclasses, and refuses unknown keys and wrong types (``steps: 2.5``, ``steps: "10"``, a string for a list,
``"no"`` for a boolean) with the dotted path of the key, before any ``__post_init__`` range check runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from zolm.errors import ZolmError, unknown


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           choices: tuple[str, ...] | None = None, group: str | None = None) -> Any:
    """A dataclass field with its help text, CLI flag name (default: the field name), choices and CLI group.

    A list default is copied per instance.
    """
    meta = {"help": help, "flag": flag, "choices": choices, "group": group}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, str(item))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, getattr(tp, "__name__",
                                                                                                   str(tp)))


def check_value(value: Any, tp: Any, where: str) -> Any:
    """``value`` if it has type ``tp`` (an int is accepted for a float and converted), else a ZolmError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return check_value(value, arg, where)
            except ZolmError:
                continue
        raise ZolmError(f"{where}: expected {_describe(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ZolmError(f"{where}: expected {_describe(tp)}, got {value!r}")
        item = typing.get_args(tp)[0]
        return [check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    ok = {type(None): value is None, bool: isinstance(value, bool), str: isinstance(value, str),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, int | float) and not isinstance(value, bool)}.get(tp)
    if ok is None:
        return value
    if not ok:
        raise ZolmError(f"{where}: expected {_describe(tp)}, got {value!r}")
    return float(value) if tp is float else value


def build(cls: type, data: Mapping[str, Any] | Any, where: str = "") -> Any:
    """An instance of config dataclass ``cls`` from ``data`` (a mapping, or already an instance)."""
    if isinstance(data, cls):
        return data
    label = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ZolmError(f"{label}: expected a mapping of keys to values, got {data!r}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    bad = sorted(set(data) - set(names))
    if bad:
        raise ZolmError(f"{label}: unknown key(s) {', '.join(map(str, bad))}; valid: {', '.join(sorted(names))}")
    types_ = hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        tp = types_[key]
        if is_config(tp):
            kwargs[key] = build(tp, value, path)
            continue
        kwargs[key] = check_value(value, tp, path)
    return cls(**kwargs)


def check_choices(obj: Any, where: str = "") -> None:
    """A one-line error for any field of config ``obj`` whose value is not among its declared choices."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices and value is not None and value not in choices:
            raise unknown(f.metadata.get("flag") or f.name, value, choices)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """Every non-config field of ``cls`` and its nested configs: (path, field, type), in declaration order."""
    out = []
    types_ = hints(cls)
    for f in dataclasses.fields(cls):
        if is_config(types_[f.name]):
            out += leaves(types_[f.name], prefix + (f.name,))
        else:
            out.append((prefix + (f.name,), f, types_[f.name]))
    return out


def flag_name(path: tuple[str, ...], f: dataclasses.Field) -> str:
    """The flat name of a leaf (its ``flag`` metadata, else its field name)."""
    return f.metadata.get("flag") or f.name


def set_path(data: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        data = data.setdefault(key, {})
    data[path[-1]] = value


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over``, recursively for nested mappings (neither is modified)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out
