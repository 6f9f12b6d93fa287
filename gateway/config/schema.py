"""Typed loading of gatewayd's YAML configuration, with errors people can act on.

(About 700 lines, on purpose: most of it is one walker over the YAML nodes, each conversion beside the message
it gives; the field types and the rules that read them are in gateway/config/fields.py, the errors in
gateway/config/errors.py, the configuration reference in gateway/config/reference.py.)

A configuration schema is a tree of frozen dataclasses. ``load(path, Schema)`` reads the file, walks the
YAML *nodes* (``yaml.compose`` with the SafeLoader, so every value keeps its line and column), converts
each value to the field's type and returns a ``Schema`` instance. Nothing is raised until the whole file
has been checked: ``ConfigError.issues`` then lists every problem, each as ``file:line:column: key: message``
with the dotted key path (list items as ``[i]``), e.g.::

    /etc/gatewayd/gatewayd.yaml:14:7: platforms[1].certificate_subject: missing required key ...

Field types
-----------
``str``, ``int``, ``float``, ``bool``, ``Optional[T]`` (``T | None``), ``list[T]``, ``dict[str, T]``,
``Literal[...]``, ``Enum`` subclasses (by value), nested dataclasses, ``pathlib.Path`` (resolved against
the config file's directory, not checked), the NewTypes ``ReadableFile``, ``DirPath``, ``Duration`` and
``Percent`` (gateway/config/fields.py), and ``typing.Annotated[T, Range(...)]`` / ``Annotated[str,
Pattern(...)]``. A field's documentation goes in ``field(metadata={'doc': '...'})`` (``fields.doc``);
``reference.describe(Schema)`` lists every key for the README's configuration reference.

Decisions about YAML's surprises (YAML 1.1, as implemented by PyYAML's SafeLoader)
-------------------------------------------------------------------------------------
* Scalars are resolved exactly as ``yaml.safe_load`` would resolve them, with these deliberate exceptions:

  - A **text** field (``str``, paths, patterns) takes any scalar *as written*: ``version: 2.10`` is the
    text ``'2.10'`` (not the float 2.1), ``country: NO`` is ``'NO'`` (not ``False``), ``code: 007`` is
    ``'007'``. Only an empty value (``~``, ``null`` or nothing) and lists/sections are refused.
  - A **true/false** field accepts only ``true`` or ``false`` (any capitalisation). ``yes``/``no``/``on``/
    ``off`` are refused with a message saying what to write, because people misread them.
  - A **number** field refuses YAML 1.1's ambiguous forms: a leading zero (``010`` would be the octal
    number 8) and base-60 (``1:30`` would be 90). A quoted number (``"2575"``) is text, not a number.
    An unquoted float in exponent form without a dot (``1e3``; text for PyYAML) is accepted as a number.
* Anchors and aliases (``&name`` / ``*name``) are allowed, and so are merge keys (``<<: *defaults``),
  with YAML's rule that the section's own keys win over merged ones.
* A key written twice in the same section is an error (``safe_load`` would silently keep the last one).
* Lists or sections nested deeper than PyYAML's recursive reader takes (some hundreds of levels) are one
  issue where the reader got to, not a RecursionError.
* Relative paths are resolved against the config file's directory, including a path field's default
  (``DirPath(Path('chamber.sqlite3'))`` becomes ``<config dir>/chamber.sqlite3``); a ``ReadableFile``
  default is checked like a written value.
* An empty value for a key that has a default is an error, not "use the default": to get the default,
  leave the key out. Optional keys (``Optional[T]``) accept an empty value as "none".

Cross-field checks
------------------
A schema dataclass may define ``__post_validate__(self) -> list[tuple[str, str]]`` returning
``(relative key, message)`` pairs; each becomes an issue located at that key's line (the key is relative to
the dataclass's own section, e.g. ``'platforms[1].certificate_subject'``; ``''`` means the section
itself). It runs only for sections whose own fields were all valid, so cross-section problems appear once
the per-field ones are fixed. A ``ValueError`` raised by the dataclass's ``__post_init__`` is reported as an
issue at the section too.
"""


from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.config.errors import ConfigError, ConfigIssue
from gateway.config.fields import (DirPath, Duration, Pattern, Percent, Range, ReadableFile, check_type,
                                   format_number, is_newtype, is_optional, is_section, optional_inner,
                                   parse_duration_text, section_fields, split_annotated, yaml_text)

__all__ = ['load', 'load_text']

T = TypeVar('T')


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------

def load(path: str | os.PathLike[str], schema: type[T]) -> T:
    """Read, parse and validate the YAML file at ``path`` against ``schema``.

    Relative paths inside the file are resolved against the file's directory. Raises ``ConfigError``
    listing every problem found.
    """
    path = Path(path)
    filename = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([ConfigIssue(filename, 1, 1, '',
                                       f"cannot read the configuration file: {reason}")]) from None
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError as exc:
        line = data.count(b'\n', 0, exc.start) + 1
        column = exc.start - (data.rfind(b'\n', 0, exc.start) + 1) + 1
        raise ConfigError([ConfigIssue(
            filename, line, column, '',
            f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} cannot be read); "
            f"save it with UTF-8 encoding")]) from None
    return load_text(text, schema, filename=filename, base_dir=path.absolute().parent)


def load_text(text: str, schema: type[T], *, filename: str, base_dir: Path) -> T:
    """Parse and validate YAML ``text`` against ``schema``. ``filename`` is used in messages only;
    relative paths are resolved against ``base_dir``. Raises ``ConfigError`` listing every problem."""
    check_type(schema, set())
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
        except RecursionError:  # PyYAML composes nested nodes recursively
            mark = loader.get_mark()
            raise ConfigError([ConfigIssue(filename, mark.line + 1, mark.column + 1, '', "lists or sections are "
                                           "nested too deeply here for a configuration file")]) from None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_syntax_issue(exc, filename)]) from None
    except yaml.reader.ReaderError as exc:
        line, column = _line_col(text, exc.position)
        raise ConfigError([ConfigIssue(
            filename, line, column, '',
            f"the file contains a character that YAML does not allow ({_char_name(exc.character)}); "
            f"remove it")]) from None
    if root is None:
        raise ConfigError([ConfigIssue(filename, 1, 1, '', "the file is empty")])
    walker = _Walker(loader, filename, Path(base_dir))
    result = walker.convert(schema, root, '')
    if walker.issues or result is _INVALID:
        raise ConfigError(sorted(walker.issues, key=lambda i: (i.line, i.column)))
    return typing.cast(T, result)


# --------------------------------------------------------------------------------------------------
# Small helpers for messages
# --------------------------------------------------------------------------------------------------

_PLAIN_KEY = re.compile(r'[A-Za-z0-9_-]+')
_NULL_TAG = 'tag:yaml.org,2002:null'
_STR_TAG = 'tag:yaml.org,2002:str'
_INT_TAG = 'tag:yaml.org,2002:int'
_FLOAT_TAG = 'tag:yaml.org,2002:float'
_BOOL_TAG = 'tag:yaml.org,2002:bool'
_MERGE_TAG = 'tag:yaml.org,2002:merge'
_TEXT_LIKE_TAGS = {_STR_TAG, _INT_TAG, _FLOAT_TAG, _BOOL_TAG, 'tag:yaml.org,2002:timestamp'}
_EXPONENT_FLOAT = re.compile(r'[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+')
_LEADING_ZERO = re.compile(r'[-+]?0[0-9_]+')


class _Invalid:
    def __repr__(self) -> str:
        return '<invalid>'


_INVALID: Any = _Invalid()


def _child_key(path: str, name: str) -> str:
    if _PLAIN_KEY.fullmatch(name):
        return f"{path}.{name}" if path else name
    return f"{path}[{name!r}]"


def _item_key(path: str, index: int) -> str:
    return f"{path}[{index}]"


def _line_col(text: str, position: int) -> tuple[int, int]:
    line = text.count('\n', 0, position) + 1
    column = position - (text.rfind('\n', 0, position) + 1) + 1
    return line, column


def _char_name(char: Any) -> str:
    if isinstance(char, str) and len(char) == 1:
        char = ord(char)
    if isinstance(char, int):
        return f"U+{char:04X}"
    return repr(char)


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + '...'


def _show(node: Node) -> str:
    """How a value is named in a message: 'abc', nothing, a list, a section."""
    if isinstance(node, ScalarNode):
        if node.tag == _NULL_TAG:
            return "nothing (the value is empty)"
        return repr(_shorten(node.value))
    if isinstance(node, SequenceNode):
        return "a list"
    return "a section of keys"


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL_TAG


def _is_quoted(node: ScalarNode) -> bool:
    return node.style in ("'", '"')
_PERCENT_TEXT = re.compile(r'\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*%\s*')


def _suggest(word: str, choices: typing.Iterable[str]) -> str | None:
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return lowered[word.lower()]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


# --------------------------------------------------------------------------------------------------
# The walker: node tree + schema -> value, collecting issues
# --------------------------------------------------------------------------------------------------

class _Walker:
    def __init__(self, loader: yaml.SafeLoader, filename: str, base_dir: Path):
        self.loader = loader
        self.filename = filename
        self.base_dir = base_dir
        self.issues: list[ConfigIssue] = []
        # id(mapping node) -> (node, {key text: (key node, value node)}); the node is kept to pin the id.
        self._mappings: dict[int, tuple[MappingNode, dict[str, tuple[Node, Node]]]] = {}

    # -- recording -------------------------------------------------------------------------------

    def issue(self, node: Node | None, key: str, message: str) -> None:
        if node is None:
            line, column = 1, 1
        else:
            line, column = node.start_mark.line + 1, node.start_mark.column + 1
        self.issues.append(ConfigIssue(self.filename, line, column, key, message))

    def _construct(self, node: ScalarNode, path: str) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            self.issue(node, path, f"this value cannot be read: {exc.problem or exc}")
            return _INVALID
        except (ValueError, OverflowError) as exc:  # e.g. a date-like value such as 2024-13-45
            self.issue(node, path, f"this value cannot be read: {exc}")
            return _INVALID

    # -- dispatch --------------------------------------------------------------------------------

    def convert(self, tp: Any, node: Node, path: str) -> Any:
        base, metadata = split_annotated(tp)
        value = self._convert_base(base, node, path)
        if value is _INVALID or value is None:
            return value
        for meta in metadata:
            if isinstance(meta, Range) and not self._check_range(base, meta, value, node, path):
                return _INVALID
            if isinstance(meta, Pattern) and not re.fullmatch(meta.regex, str(value)):
                self.issue(node, path, f"expected {meta.hint}, got {_show(node)}")
                return _INVALID
        return value

    def _convert_base(self, tp: Any, node: Node, path: str) -> Any:
        inner = optional_inner(tp)
        if inner is not None:
            if _is_null(node):
                return None
            return self.convert(inner, node, path)
        if isinstance(node, ScalarNode) and node.tag.startswith('!'):
            self.issue(node, path, f"YAML tags such as {node.tag!r} are not supported here; "
                                   f"remove the tag")
            return _INVALID
        if tp is str:
            return self._text(node, path, "text")
        if tp is bool:
            return self._bool(node, path)
        if tp is int:
            return self._int(node, path)
        if tp is float:
            return self._float(node, path)
        if tp is Duration:
            return self._duration(node, path)
        if tp is Percent:
            return self._percent(node, path)
        if tp is ReadableFile:
            return self._readable_file(node, path)
        if tp is DirPath or tp is Path:
            text = self._text(node, path, "a directory path" if tp is DirPath else "a path")
            return _INVALID if text is _INVALID else self._resolve_written(text, node, path)
        origin = typing.get_origin(tp)
        if origin is list:
            return self._list(typing.get_args(tp)[0], node, path)
        if origin is dict:
            return self._dict(typing.get_args(tp)[1], node, path)
        if origin is Literal:
            return self._choice(list(typing.get_args(tp)), node, path, lambda v: v)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            members = list(tp)
            value = self._choice([m.value for m in members], node, path, lambda v: v)
            return value if value is _INVALID else tp(value)
        if is_newtype(tp):
            return self.convert(tp.__supertype__, node, path)
        if is_section(tp):
            return self._dataclass(tp, node, path)
        raise TypeError(f"confschema: unsupported field type {tp!r}")  # pragma: no cover

    # -- scalars ---------------------------------------------------------------------------------

    def _text(self, node: Node, path: str, what: str) -> Any:
        if isinstance(node, ScalarNode) and node.tag in _TEXT_LIKE_TAGS:
            return node.value
        self.issue(node, path, f"expected {what}, got {_show(node)}")
        return _INVALID

    def _bool(self, node: Node, path: str) -> Any:
        if isinstance(node, ScalarNode) and node.tag == _BOOL_TAG:
            if node.value.lower() in ('true', 'false'):
                return node.value.lower() == 'true'
            self.issue(node, path, f"expected true or false, got {_show(node)}; write true or false "
                                   f"(yes/no/on/off are not accepted, as they are easy to misread)")
            return _INVALID
        self.issue(node, path, f"expected true or false, got {_show(node)}")
        return _INVALID

    def _number(self, node: Node, path: str, what: str, allow_float: bool) -> Any:
        """int (or float if allowed) from a scalar, refusing bools, quoted numbers and YAML 1.1's
        octal and base-60 forms."""
        if isinstance(node, ScalarNode):
            plain = not _is_quoted(node)
            if plain and node.tag in (_INT_TAG, _FLOAT_TAG):
                if ':' in node.value:
                    self.issue(node, path, f"expected {what}, got {_show(node)} (YAML would read it as a "
                                           f"base-60 number); write a single number")
                    return _INVALID
                if _LEADING_ZERO.fullmatch(node.value):
                    self.issue(node, path, f"expected {what}, got {_show(node)}; write the number without "
                                           f"the leading zero (YAML would read it as an octal number)")
                    return _INVALID
                if node.tag == _FLOAT_TAG and not allow_float:
                    self.issue(node, path, f"expected {what}, got {_show(node)}")
                    return _INVALID
                value = self._construct(node, path)
                if value is not _INVALID and node.tag == _FLOAT_TAG:
                    value = float(value)
                return value
            if plain and allow_float and node.tag == _STR_TAG and _EXPONENT_FLOAT.fullmatch(node.value):
                return float(node.value)
            if node.tag == _STR_TAG and _is_quoted(node):
                try:
                    float(node.value)
                except ValueError:
                    pass
                else:
                    self.issue(node, path, f"expected {what}, got the text {_show(node)} in quotes; "
                                           f"remove the quotes")
                    return _INVALID
        self.issue(node, path, f"expected {what}, got {_show(node)}")
        return _INVALID

    def _int(self, node: Node, path: str) -> Any:
        return self._number(node, path, "an integer (a whole number)", allow_float=False)

    def _float(self, node: Node, path: str) -> Any:
        value = self._number(node, path, "a number", allow_float=True)
        return value if value is _INVALID else float(value)

    def _duration(self, node: Node, path: str) -> Any:
        what = "a duration such as 30s, 5m, 2h or 500ms"
        if isinstance(node, ScalarNode) and node.tag == _STR_TAG:
            text = node.value.strip()
            if text.startswith('-'):
                self.issue(node, path, f"a duration cannot be negative, got {_show(node)}")
                return _INVALID
            seconds = parse_duration_text(text)
            if seconds is None:
                self.issue(node, path, f"expected {what}, got {_show(node)}")
                return _INVALID
            return seconds
        value = self._number(node, path, what, allow_float=True)
        if value is _INVALID:
            return value
        value = float(value)
        if not math.isfinite(value):
            self.issue(node, path, f"expected {what}, got {_show(node)}")
            return _INVALID
        if value < 0:
            self.issue(node, path, f"a duration cannot be negative, got {_show(node)}")
            return _INVALID
        return value

    def _percent(self, node: Node, path: str) -> Any:
        what = "a percentage such as 5% (or a fraction such as 0.05)"
        with_sign = False
        if isinstance(node, ScalarNode) and node.tag == _STR_TAG:
            match = _PERCENT_TEXT.fullmatch(node.value)
            if match:
                value, with_sign = float(match.group(1)) / 100, True
            else:
                try:
                    value = float(node.value)
                except ValueError:
                    self.issue(node, path, f"expected {what}, got {_show(node)}")
                    return _INVALID
        else:
            value = self._number(node, path, what, allow_float=True)
            if value is _INVALID:
                return value
            value = float(value)
        if not 0 <= value <= 1:  # also refuses nan
            if with_sign or value < 0 or not math.isfinite(value):
                self.issue(node, path, f"must be between 0% and 100%, got {_show(node)}")
            else:
                self.issue(node, path, f"must be between 0% and 100%, got {_show(node)}; "
                                       f"for {value:g} percent write '{value:g}%'")
            return _INVALID
        return value

    def _check_range(self, kind: Any, bounds: Range, value: Any, node: Node, path: str) -> bool:
        low, high = bounds.min, bounds.max
        fmt = lambda v: format_number(kind, v)  # noqa: E731
        too_low = low is not None and not value >= low
        too_high = high is not None and not value <= high
        if not (too_low or too_high):
            return True
        if low is not None and high is not None:
            message = f"must be between {fmt(low)} and {fmt(high)}"
        elif low is not None:
            message = f"must be at least {fmt(low)}"
        else:
            message = f"must be at most {fmt(high)}"
        self.issue(node, path, f"{message}, got {_show(node)}")
        return False

    def _choice(self, allowed: list[Any], node: Node, path: str, wrap: Any) -> Any:
        listing = ', '.join(repr(v) if isinstance(v, str) else yaml_text(v) for v in allowed)
        if isinstance(node, ScalarNode) and not _is_null(node):
            text_choices = [v for v in allowed if isinstance(v, str)]
            if node.value in text_choices and node.tag in _TEXT_LIKE_TAGS:
                return wrap(node.value)
            others = [v for v in allowed if not isinstance(v, str)]
            if others and not node.tag.startswith('!') and node.tag != _STR_TAG:
                value = self._construct(node, path)
                for candidate in others:
                    if type(candidate) is type(value) and candidate == value:
                        return wrap(candidate)
            message = f"expected one of {listing}, got {_show(node)}"
            guess = _suggest(node.value, text_choices) if text_choices else None
            if guess is not None:
                message += f"; did you mean {guess!r}?"
            self.issue(node, path, message)
            return _INVALID
        self.issue(node, path, f"expected one of {listing}, got {_show(node)}")
        return _INVALID

    # -- paths -----------------------------------------------------------------------------------

    def _resolve(self, text: str) -> Path:
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.base_dir / path
        return Path(os.path.abspath(path))

    def _resolve_written(self, text: str, node: Node, path: str) -> Any:
        """`_resolve` for a path written in the file: one no system call takes (a NUL in it, or a ``~user``
        of no such user) is an issue at its key, not a ValueError or RuntimeError later."""
        if '\0' in text:
            self.issue(node, path, f"{_shorten(text)!r} is not a path: it contains a NUL character")
            return _INVALID
        try:
            return self._resolve(text)
        except RuntimeError:  # expanduser: no such user (or no home directory at all)
            user = text.split('/', 1)[0][1:]
            why = (f"there is no user {user!r} whose home directory ~ could name" if user
                   else "this process has no home directory for ~")
            self.issue(node, path, f"{_shorten(text)!r} is not a path: {why}")
            return _INVALID

    def _readable_file(self, node: Node, path: str) -> Any:
        text = self._text(node, path, "the path of a file")
        if text is _INVALID:
            return text
        if not text.strip():
            self.issue(node, path, "expected the path of a file, got an empty text")
            return _INVALID
        return self._check_readable(text, node, path)

    def _check_readable(self, text: str, node: Node, path: str, default: bool = False) -> Any:
        resolved = self._resolve_written(text, node, path)
        if resolved is _INVALID:
            return resolved
        notes = ['the default for this key'] if default else []
        if str(resolved) != text:
            notes.append(f"looked for {resolved}")
        shown = f"{text!r} ({'; '.join(notes)})" if notes else repr(text)
        try:
            with open(resolved, 'rb'):
                pass
        except FileNotFoundError:
            self.issue(node, path, f"file {shown} does not exist")
        except IsADirectoryError:
            self.issue(node, path, f"{shown} is a directory, not a file")
        except PermissionError:
            self.issue(node, path, f"file {shown} cannot be read: permission denied "
                                   f"(check the file's owner and permissions)")
        except OSError as exc:
            self.issue(node, path, f"file {shown} cannot be read: {exc.strerror or exc}")
        else:
            return resolved
        return _INVALID

    # -- collections -----------------------------------------------------------------------------

    def _list(self, item_type: Any, node: Node, path: str) -> Any:
        if not isinstance(node, SequenceNode):
            hint = "; write [] for an empty list" if _is_null(node) else ""
            self.issue(node, path, f"expected a list (one '- item' per line), got {_show(node)}{hint}")
            return _INVALID
        items, ok = [], True
        for index, item_node in enumerate(node.value):
            value = self.convert(item_type, item_node, _item_key(path, index))
            ok = ok and value is not _INVALID
            items.append(value)
        return items if ok else _INVALID

    def _dict(self, value_type: Any, node: Node, path: str) -> Any:
        if not isinstance(node, MappingNode):
            hint = "; write {} for an empty mapping" if _is_null(node) else ""
            self.issue(node, path, f"expected a mapping of names to values, got {_show(node)}{hint}")
            return _INVALID
        result, ok = {}, True
        for key, (_key_node, value_node) in self.mapping_pairs(node, path).items():
            value = self.convert(value_type, value_node, _child_key(path, key))
            ok = ok and value is not _INVALID
            result[key] = value
        return result if ok else _INVALID

    def mapping_pairs(self, node: MappingNode, path: str) -> dict[str, tuple[Node, Node]]:
        """The node's entries by key text, merge keys applied (own keys win). Duplicate keys, non-text
        keys and bad merges are reported the first time a node is seen."""
        known = self._mappings.get(id(node))
        if known is not None:
            return known[1]
        pairs: dict[str, tuple[Node, Node]] = {}
        first_line: dict[str, int] = {}
        for key_node, _value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, ScalarNode):
                self.issue(key_node, path, "a key must be a plain name, not a list or a section")
                continue
            key = key_node.value
            if key in first_line:
                self.issue(key_node, _child_key(path, key),
                           f"key {key!r} appears more than once in this section "
                           f"(first on line {first_line[key]}); keep only one")
            else:
                first_line[key] = key_node.start_mark.line + 1
        try:
            self.loader.flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or node.start_mark
            self.issues.append(ConfigIssue(self.filename, mark.line + 1, mark.column + 1, path,
                                           f"this merge ('<<') is not valid: {exc.problem}"))
            node.value = [(k, v) for k, v in node.value if k.tag != _MERGE_TAG]
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode):
                pairs[key_node.value] = (key_node, value_node)
        self._mappings[id(node)] = (node, pairs)
        return pairs

    # -- sections --------------------------------------------------------------------------------

    def _dataclass(self, cls: type, node: Node, path: str) -> Any:
        if not isinstance(node, MappingNode):
            self.issue(node, path, f"expected a section of settings ('key: value' lines), "
                                   f"got {_show(node)}")
            return _INVALID
        pairs = self.mapping_pairs(node, path)
        fields = section_fields(cls)
        names = [f.name for f, _t in fields]
        for key, (key_node, _v) in pairs.items():
            if key not in names:
                guess = _suggest(key, names)
                if guess is not None:
                    message = f"unknown key {key!r}; did you mean {guess!r}?"
                else:
                    message = f"unknown key {key!r}; the keys allowed here are: {', '.join(names)}"
                self.issue(key_node, _child_key(path, key), message)
        kwargs: dict[str, Any] = {}
        ok = True
        for f, ftype in fields:
            key_path = _child_key(path, f.name)
            has_default = (f.default is not dataclasses.MISSING
                           or f.default_factory is not dataclasses.MISSING)
            if f.name in pairs:
                value_node = pairs[f.name][1]
                if _is_null(value_node) and has_default and not is_optional(ftype):
                    self.issue(value_node, key_path, "the value is empty; give a value, or remove "
                                                     "the line to use the default")
                    ok = False
                    continue
                value = self.convert(ftype, value_node, key_path)
                if value is _INVALID:
                    ok = False
                else:
                    kwargs[f.name] = value
            elif has_default:
                default = self._default_path(f, ftype, node, key_path)
                if default is _INVALID:
                    ok = False
                elif default is not None:
                    kwargs[f.name] = default
            elif is_optional(ftype):
                kwargs[f.name] = None
            else:
                self.issue(node, key_path, f"missing required key {f.name!r}")
                ok = False
        if not ok:
            return _INVALID
        try:
            obj = cls(**kwargs)
        except ValueError as exc:
            self.issue(node, path, str(exc))
            return _INVALID
        post_validate = getattr(obj, '__post_validate__', None)
        if post_validate is not None:
            for relative, message in post_validate() or ():
                target = self._locate(node, path, relative)
                full = _join_relative(path, relative)
                self.issue(target, full, message)
        return obj

    def _default_path(self, f: dataclasses.Field[Any], ftype: Any, node: Node, path: str) -> Any:
        """A path field left at its default: a relative default is resolved against the config file's
        directory too (and a ReadableFile default checked). None when there is nothing to do."""
        base, _ = split_annotated(ftype)
        base, _ = split_annotated(optional_inner(base) or base)
        if base not in (ReadableFile, DirPath, Path) or f.default is dataclasses.MISSING:
            return None
        if not isinstance(f.default, (str, os.PathLike)):
            return None
        text = os.fspath(f.default)
        if base is ReadableFile:
            return self._check_readable(text, node, path, default=True)
        return self._resolve(text)

    def _locate(self, node: Node, path: str, relative: str) -> Node:
        """The node a relative key ('platforms[1].name') points at: the key's own node for a name,
        the item for an index; the deepest node found if the key is absent."""
        current: Node = node
        for name, index in _parse_relative(relative):
            if name is not None:
                if not isinstance(current, MappingNode):
                    break
                entry = self.mapping_pairs(current, path).get(name)
                if entry is None:
                    break
                key_node, value_node = entry
                current = value_node
                target = key_node
            else:
                if not isinstance(current, SequenceNode) or not 0 <= index < len(current.value):
                    break
                current = current.value[index]
                target = current
            node = target
        return node


_RELATIVE_PART = re.compile(r"\[(\d+)\]|\['((?:[^'\\]|\\.)*)'\]|\[\"((?:[^\"\\]|\\.)*)\"\]|\.?([^.\[\]]+)")


def _parse_relative(relative: str) -> list[tuple[str | None, int]]:
    parts: list[tuple[str | None, int]] = []
    pos = 0
    while pos < len(relative):
        match = _RELATIVE_PART.match(relative, pos)
        if not match:
            break
        if match.group(1) is not None:
            parts.append((None, int(match.group(1))))
        else:
            name = next(g for g in match.groups()[1:] if g is not None)
            parts.append((name, 0))
        pos = match.end()
    return parts


def _join_relative(path: str, relative: str) -> str:
    if not relative:
        return path
    if not path or relative.startswith('['):
        return path + relative
    return f"{path}.{relative}"


# --------------------------------------------------------------------------------------------------
# YAML syntax errors
# --------------------------------------------------------------------------------------------------

def _syntax_issue(exc: yaml.MarkedYAMLError, filename: str) -> ConfigIssue:
    mark = exc.problem_mark or exc.context_mark
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    problem = exc.problem or 'the text cannot be read'
    if isinstance(exc, yaml.composer.ComposerError) and 'single document' in (exc.context or ''):
        return ConfigIssue(filename, line, column, '',
                           "the file holds more than one YAML document (a second '---' line); "
                           "keep only one")
    message = f"this is not valid YAML: {problem}"
    if exc.context and exc.context_mark is not None and exc.context_mark is not mark:
        message += f" ({exc.context} on line {exc.context_mark.line + 1})"
    if "'\\t'" in problem:
        message += "; indent with spaces, not tab characters"
    elif 'mapping values are not allowed' in problem:
        message += ("; check the indentation, and put quotes around a value that contains ': '")
    elif "could not find expected ':'" in problem:
        message += "; check the indentation and that each setting is written as 'key: value'"
    elif '<stream end>' in problem:
        message += "; a bracket or a quote may have been opened and never closed"
    elif 'found undefined alias' in problem:
        message += "; an alias (*name) must refer to an anchor (&name) defined earlier in the file"
    return ConfigIssue(filename, line, column, '', message)
