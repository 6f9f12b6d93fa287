"""The configuration reference: every key of a schema with its type, default and meaning (:func:`describe`),
as ``gatewayd config-reference`` writes it into the README."""

from __future__ import annotations

import dataclasses
import enum
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.config.fields import (DirPath, Duration, Pattern, Percent, Range, ReadableFile, check_type,
                                   format_number, is_newtype, is_optional, is_section, optional_inner,
                                   section_fields, split_annotated, yaml_text)


def describe(schema: Any) -> list[tuple[str, str, str, str]]:
    """Every key of ``schema`` as ``(key path, type, default or 'required', doc)`` rows, for the README's
    configuration reference. Items of a list of sections appear as ``name[].key``; entries of a mapping of
    sections as ``name.<name>.key``."""
    check_type(schema, set())
    rows: list[tuple[str, str, str, str]] = []
    _describe_into(schema, '', rows)
    return rows


def _type_name(tp: Any) -> str:
    base, metadata = split_annotated(tp)
    name = _base_type_name(base)
    for meta in metadata:
        if isinstance(meta, Pattern):
            name = f"{name}: {meta.hint}"
        elif isinstance(meta, Range):
            kind = base
            fmt = lambda v: format_number(kind, v)  # noqa: E731
            if meta.min is not None and meta.max is not None:
                name = f"{name}, {fmt(meta.min)} to {fmt(meta.max)}"
            elif meta.min is not None:
                name = f"{name}, at least {fmt(meta.min)}"
            elif meta.max is not None:
                name = f"{name}, at most {fmt(meta.max)}"
    return name


def _base_type_name(tp: Any) -> str:
    inner = optional_inner(tp)
    if inner is not None:
        return _type_name(inner)
    simple = {
        str: 'text', int: 'integer', float: 'number', bool: 'true/false', Path: 'path',
        Duration: 'duration (e.g. 30s, 5m, 2h)', Percent: 'percentage (e.g. 5%)',
        ReadableFile: 'path of a readable file', DirPath: 'directory path',
    }
    if tp in simple:
        return simple[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        item = args[0]
        return 'list of sections' if is_section(item) else f"list of {_type_name(item)}"
    if origin is dict:
        value = args[1]
        return ('mapping of names to sections' if is_section(value)
                else f"mapping of names to {_type_name(value)}")
    if origin is Literal:
        return 'one of ' + ', '.join(yaml_text(v) for v in args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return 'one of ' + ', '.join(yaml_text(m.value) for m in tp)
    if is_newtype(tp):
        return _type_name(tp.__supertype__)
    if is_section(tp):
        return 'section'
    return str(tp)  # pragma: no cover - check_type refuses the rest


def _section_type(tp: Any) -> tuple[str, Any] | None:
    """('', cls) for a section, ('[]', cls) for a list of sections, ('.<name>', cls) for a mapping."""
    base, _ = split_annotated(tp)
    inner = optional_inner(base)
    if inner is not None:
        return _section_type(inner)
    if is_section(base):
        return '', base
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is list and is_section(split_annotated(args[0])[0]):
        return '[]', split_annotated(args[0])[0]
    if origin is dict and is_section(split_annotated(args[1])[0]):
        return '.<name>', split_annotated(args[1])[0]
    return None


def _format_default(f: dataclasses.Field[Any], tp: Any) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    elif is_optional(tp):
        return 'null'
    else:
        return 'required'
    base, _ = split_annotated(tp)
    base = optional_inner(base) or base
    base, _ = split_annotated(base)
    if value is None:
        return 'null'
    if dataclasses.is_dataclass(value):
        return '(see the keys below)'
    if base in (Duration, Percent):
        return format_number(base, value)
    if isinstance(value, enum.Enum):
        return yaml_text(value.value)
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(_plain(value), default_flow_style=True, allow_unicode=True).strip()
    if isinstance(value, str):
        return value if value else "''"
    return yaml_text(value)


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    return value


def _describe_into(schema: Any, prefix: str, rows: list[tuple[str, str, str, str]]) -> None:
    base, _ = split_annotated(schema)
    if not is_section(base):
        return
    for f, ftype in section_fields(base):
        key = f"{prefix}.{f.name}" if prefix else f.name
        rows.append((key, _type_name(ftype), _format_default(f, ftype), f.metadata.get('doc', '')))
        section = _section_type(ftype)
        if section is not None:
            suffix, cls = section
            _describe_into(cls, key + suffix, rows)
