"""Typed settings from plain dicts, the one way every config dataclass of the project is built from a
preset file, a command line, a checkpoint's or a manifest's record (jobs/config.py, model/, geometry).

`from_dict(cls, values)` builds `cls` from the keys given, the class's defaults for the rest:
- an unknown key is a `ConfigError` naming where it was and the known keys;
- a field typed as a dataclass takes a dict of its own keys, built the same way on top of the field's
  default (so `{"model": {"num_layers": 4}}` changes one size of the default model);
- a class with named sizes (`SIZES`, see `Sized`) takes `"size": NAME` among its keys: the other keys
  then apply on top of that size instead of the field's default; a size name alone stands for
  `{"size": NAME}` (`"model": "paper"`);
- lists become tuples where the field is a tuple (JSON has no tuples);
- `RENAMED` maps keys a class used to have to their names now (configs saved in older checkpoints).
- a value of the wrong type for a plain field (int, float, str, bool, list, dict) is a ConfigError naming
  the field ("steps must be an integer, got 'ten'"); an integral float counts as an int (JSON writes 4.0).
A value the class refuses in `__post_init__` (a ValueError) becomes a ConfigError naming where it was;
`require` and `at_least` are the checks those `__post_init__`s share.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import ClassVar

from pipeline.errors import ConfigError

__all__ = ["ConfigError", "Sized", "at_least", "dataclass_type", "field_types", "from_dict", "require", "to_dict"]


def _unwrap_optional(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


@functools.cache
def field_types(cls) -> dict:
    """{field name: its type, Optional unwrapped} of a dataclass's init fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: _unwrap_optional(hints[f.name]) for f in dataclasses.fields(cls) if f.init}


@functools.cache
def _nullable(cls) -> frozenset:
    """Names of the init fields whose type admits None."""
    hints = typing.get_type_hints(cls)
    return frozenset(f.name for f in dataclasses.fields(cls) if f.init and type(None) in typing.get_args(hints[f.name]))


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object"}


def _typed(cls, name: str, tp, value):
    """`value` as field `name` of type `tp` takes it (an integral float as an int); ValueError naming the
    field when it is of another type. Types other than the plain ones are left to the class."""
    if value is None:
        if name in _nullable(cls):
            return None
        raise ValueError(f"{name} must not be null")
    if dataclass_type(tp):  # a nested config arrives built (from a dict or a size name)
        if not isinstance(value, tp):
            raise ValueError(f"{name} must be an object, got {value!r}")
        return value
    origin = typing.get_origin(tp) or tp
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return value
    if origin not in _KINDS:
        return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    ok = isinstance(value, bool) if tp is bool else isinstance(value, origin) and not isinstance(value, bool)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ValueError(f"{name} must be {_KINDS[origin]}, got {value!r}")
    return value


def require(ok: bool, name: str, rule: str, value) -> None:
    """A ValueError "NAME must be RULE, got VALUE" unless `ok` (from_dict names where it was)."""
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def at_least(obj, minimum: float, *names: str) -> None:
    """Each named field of `obj` (None allowed) is a finite number >= minimum."""
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            require(math.isfinite(value) and value >= minimum, name, f">= {minimum:g}", value)


def dataclass_type(tp):
    """`tp` when it is a dataclass type (a nested config), else None."""
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def from_dict(cls, values, where: str | None = None):
    """`cls` built from `values` (module docstring); `where` names the source in errors."""
    where = where or cls.__name__
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be an object, got {type(values).__name__}: {values!r}")
    values = dict(values)
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in values and new not in values:
            values[new] = values.pop(old)
    types_ = field_types(cls)
    sizes = getattr(cls, "SIZES", None)
    known = set(types_) | ({"size"} if sizes else set())
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{where} has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    if sizes and "size" in values:
        size = values.pop("size")
        if size not in sizes:
            raise ConfigError(f"{where}.size must be one of {', '.join(sizes)}, got {size!r}")
        values = {**sizes[size], **values}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        sub = dataclass_type(types_[name])
        if sub and isinstance(value, str) and getattr(sub, "SIZES", None):
            value = {"size": value}  # a size name alone: "model": "paper"
        if sub and isinstance(value, dict):
            base = _default(fields[name])
            sized = getattr(sub, "SIZES", None) and "size" in value
            if isinstance(base, sub) and not sized:
                value = {**to_dict(base), **value}
            values[name] = from_dict(sub, value, f"{where}.{name}")
        elif typing.get_origin(types_[name]) is tuple and isinstance(value, list):
            values[name] = tuple(value)
    try:
        for name, value in values.items():
            values[name] = _typed(cls, name, types_[name], value)
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as e:  # named once: a message that starts with the thing's name keeps its words
        raise ConfigError(str(e) if str(e).startswith(where.rsplit(".", 1)[-1]) else f"{where}: {e}") from e


def to_dict(obj) -> dict:
    """A config dataclass as JSON-ready values (tuples as lists, nested configs as dicts)."""

    def plain(v):
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}


class Sized:
    """Named sizes of a model config: `SIZES` maps a name to the fields that differ from the class's
    defaults (the paper's). One vocabulary for every model: tiny (CPU demo and tests), paper, and
    paper_large where the paper has one (Baseline-Large's DiT)."""

    SIZES: ClassVar[dict[str, dict]] = {"paper": {}}

    @classmethod
    def sized(cls, size: str, **values):
        return from_dict(cls, {**values, "size": size}, f"{cls.__name__} {size!r}")

    @classmethod
    def tiny(cls, **values):
        return cls.sized("tiny", **values)

    @classmethod
    def paper(cls, **values):
        return cls.sized("paper", **values)

    @classmethod
    def from_dict(cls, values, where: str | None = None):
        return from_dict(cls, values, where)

    def to_dict(self) -> dict:
        return to_dict(self)
