"""What a config schema is written with: the field types beyond Python's own (`ReadableFile`, `DirPath`,
`Duration`, `Percent`), their bounds (`Range`, `Pattern`), a documented field (`doc`), and the rules that read a
schema's types, shared by the loader (gateway/config/schema.py) and the reference (gateway/config/reference.py).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NewType, Union

ReadableFile = NewType('ReadableFile', Path)
"""A file path, resolved against the config file's directory; the file must exist and be readable."""
DirPath = NewType('DirPath', Path)
"""A directory path, resolved against the config file's directory; not checked (it may be created later)."""
Duration = NewType('Duration', float)
"""Seconds: a number, or text such as '500ms', '30s', '5m', '2h', '1d' (or '1h30m'); never negative."""
Percent = NewType('Percent', float)
"""A fraction between 0 and 1: '5%' or 0.05 both give 0.05."""


@dataclass(frozen=True)
class Range:
    """Bounds (inclusive) for a number, a Duration (in seconds) or a Percent (as a fraction)."""
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Pattern:
    """A regular expression the whole text must match; ``hint`` says in plain words what is expected
    ('a host:port'), and is used in the error message."""
    regex: str
    hint: str



def doc(text: str, **kw):
    """A schema field documented with ``text`` (``describe`` lists it in the configuration reference)."""
    return field(metadata={"doc": text}, **kw)


Port = Annotated[int, Range(1, 65535)]
#: a short name (a HIS endpoint, a platform), as logs and the chamber show it
Name = Annotated[str, Pattern(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", "letters, digits, '.', '_' or '-'")]


# --------------------------------------------------------------------------------------------------
# Type introspection
# --------------------------------------------------------------------------------------------------

_NONE_TYPE = type(None)
_SPECIAL_NEWTYPES = (ReadableFile, DirPath, Duration, Percent)


def split_annotated(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(tp) is Annotated:
        return typing.get_args(tp)[0], tuple(tp.__metadata__)
    return tp, ()


def optional_inner(tp: Any) -> Any | None:
    """T for Optional[T] / T | None, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not _NONE_TYPE]
        if len(rest) == 1 and len(args) == 2:
            return rest[0]
    return None


def is_optional(tp: Any) -> bool:
    base, _ = split_annotated(tp)
    return optional_inner(base) is not None


def is_newtype(tp: Any) -> bool:
    return hasattr(tp, '__supertype__') and callable(tp)


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def section_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """The init fields of a dataclass with their resolved types."""
    hints = _HINTS_CACHE.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        _HINTS_CACHE[cls] = hints
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def check_type(tp: Any, seen: set[Any]) -> None:
    """Raise TypeError (a programming error, not a config error) for a type the loader cannot handle."""
    base, metadata = split_annotated(tp)
    for meta in metadata:
        if isinstance(meta, Pattern):
            re.compile(meta.regex)
        if isinstance(meta, Range):
            numeric = optional_inner(base) or base
            while is_newtype(numeric) and numeric not in _SPECIAL_NEWTYPES:
                numeric = numeric.__supertype__
            if numeric not in (int, float, Duration, Percent):
                raise TypeError(f"confschema: Range applies to numbers, durations and percentages, "
                                f"not {base!r}")
    if base in (str, int, float, bool, Path) or base in _SPECIAL_NEWTYPES:
        return
    inner = optional_inner(base)
    if inner is not None:
        return check_type(inner, seen)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is list and len(args) == 1:
        return check_type(args[0], seen)
    if origin is dict and len(args) == 2:
        if args[0] is not str:
            raise TypeError(f"confschema: mapping keys must be str, not {args[0]!r}")
        return check_type(args[1], seen)
    if origin is Literal:
        return
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return
    if is_newtype(base):
        return check_type(base.__supertype__, seen)
    if is_section(base):
        if base in seen:
            return
        seen.add(base)
        for _f, ftype in section_fields(base):
            check_type(ftype, seen)
        return
    raise TypeError(f"confschema: unsupported field type {tp!r}")



# --------------------------------------------------------------------------------------------------
# Numbers and durations, read and written
# --------------------------------------------------------------------------------------------------

def format_number(kind: Any, value: float) -> str:
    if kind is Duration:
        return _format_duration(value)
    if kind is Percent:
        return f"{value * 100:g}%"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:g}"


_DURATION_UNITS_OUT = (('d', 86400.0), ('h', 3600.0), ('m', 60.0), ('s', 1.0))


def _format_duration(seconds: float) -> str:
    if seconds == 0:
        return '0s'
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in _DURATION_UNITS_OUT:
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


_DURATION_UNITS_IN = {
    'ms': 0.001, 'msec': 0.001, 'millisecond': 0.001, 'milliseconds': 0.001,
    's': 1.0, 'sec': 1.0, 'secs': 1.0, 'second': 1.0, 'seconds': 1.0,
    'm': 60.0, 'min': 60.0, 'mins': 60.0, 'minute': 60.0, 'minutes': 60.0,
    'h': 3600.0, 'hr': 3600.0, 'hrs': 3600.0, 'hour': 3600.0, 'hours': 3600.0,
    'd': 86400.0, 'day': 86400.0, 'days': 86400.0,
}
_DURATION_PART = re.compile(r'\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*')
_PLAIN_NUMBER = re.compile(r'\s*[+]?(\d+(?:\.\d*)?|\.\d+)\s*')


def parse_duration_text(text: str) -> float | None:
    """'1h30m' -> 5400.0; a bare number is seconds; None if not a duration."""
    if _PLAIN_NUMBER.fullmatch(text):
        return float(text)
    pos, total, parts = 0, 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if not match:
            return None
        unit = _DURATION_UNITS_IN.get(match.group(2).lower())
        if unit is None:
            return None
        total += float(match.group(1)) * unit
        pos, parts = match.end(), parts + 1
    return total if parts else None


def parse_duration(text: str) -> float:
    """A duration as written in the config ('30s', '5m', '1h30m', '30d', a bare number of seconds) in
    seconds; ValueError if it is not one (used by the CLI's --older-than and similar options)."""
    seconds = parse_duration_text(text.strip())
    if seconds is None or seconds < 0:
        raise ValueError(f"{text!r} is not a duration (write e.g. 30s, 5m, 2h, 30d)")
    return seconds



def yaml_text(value: Any) -> str:
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return str(value)
