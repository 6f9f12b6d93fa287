"""What the outer gate takes in from a FHIR request, for the handlers: the method (405), the query string (400:
not UTF-8, more than MAX_QUERY_FIELDS parameters), the body's media type (415: JSON only, XML refused) and its
JSON within :class:`JsonLimits` (400), and the body exactly as received (kept in the chamber with what it
created).  Each refusal is a FhirError (adapters/outer/errors.py).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import parse_qs

from adapters.outer.errors import FhirError
from adapters.outer.negotiation import fhir_version_of

MAX_QUERY_FIELDS = 100
MAX_SAFE_INTEGER = 2 ** 53
JSON_TYPES = (b"application/fhir+json", b"application/json", b"application/json-patch+json",
              b"application/merge-patch+json")


def require_method(method: str, *allowed: str) -> None:
    """405 (with Allow) unless ``method`` is one of ``allowed``."""
    if method not in allowed:
        raise FhirError(405, "not-supported", f"{method} is not allowed here (allowed: {', '.join(allowed)})",
                        headers={"Allow": ", ".join(allowed)})


def parse_query(request) -> dict[str, list[str]]:
    """The query string's parameters, each with every value given (400: not UTF-8, too many)."""
    raw = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
    try:
        return parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                        max_num_fields=MAX_QUERY_FIELDS)
    except UnicodeDecodeError:
        raise FhirError(400, "invalid", "the query string is not UTF-8") from None
    except ValueError:
        raise FhirError(400, "too-costly", f"more than {MAX_QUERY_FIELDS} query parameters") from None


def refuse_write_query(query) -> None:
    """A create, update, patch or operation by POST takes no query parameter (``_format``/``_pretty`` aside): one
    it would not honour is refused (400), never dropped — fhirpy's ``get_or_create`` sends
    ``POST /Appointment?identifier=...`` expecting a conditional create, which is ``If-None-Exist`` here."""
    given = sorted(set(query) - {"_format", "_pretty"})
    if given:
        raise FhirError(400, "not-supported", f"a POST, PUT or PATCH takes no query parameter ({', '.join(given)[:200]}"
                                              f"); for a conditional create send If-None-Exist: identifier=[system|]"
                                              f"value", expression=given[0][:64])


def json_body(request, limits: JsonLimits) -> Any:
    """The request's body: JSON (415 for another media type), parsed within ``limits``."""
    ctype, *params = (request.getHeader(b"content-type") or b"").decode("latin-1").split(";")
    ctype = ctype.strip().lower().encode("latin-1")
    if ctype not in JSON_TYPES:
        what = "XML is not accepted" if b"xml" in ctype else "this media type is not accepted"
        raise FhirError(415, "not-supported", f"{what}: send application/fhir+json")
    fhir_version_of(params, "Content-Type", 415)
    request.content.seek(0)
    return limits.parse(request.content.read())


def raw_body(request) -> bytes | None:
    """The request body exactly as received (kept in the chamber with what it created)."""
    content = request.content
    return content.getvalue() if hasattr(content, "getvalue") else None


class _RepeatedKey(dict):
    """A JSON object whose text names ``key`` more than once (refused by :meth:`JsonLimits._check`, which
    knows where the object is)."""

    key: str


def _object(pairs: list) -> dict:
    """json's object_pairs_hook: the object, or a _RepeatedKey saying which key came twice."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        repeated = _RepeatedKey(obj)
        repeated.key = next(k for k, _ in pairs if k in seen or seen.add(k))
        return repeated
    return obj


#: text a FHIR string may not hold (characters below U+0020 other than TAB, LF and CR), and lone UTF-16
#: surrogates (JSON can write one as an escape; it is no character, cannot be stored nor encoded)
_UNFIT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
_MEMBER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _expression(path: tuple) -> str:
    """Where in the body ``path`` (keys and indexes from the root) is, FHIRPath style:
    ``Appointment.contained[0].name[0].family``.  Stops before a key that is no plain element name (it
    could be anything the client wrote)."""
    out = ""
    for step in path:
        if isinstance(step, int):
            out += f"[{step}]"
        elif _MEMBER_NAME.match(step):
            out += f".{step}" if out else step
        else:
            break
    return out


class JsonLimits:
    """Parse a JSON body, refusing what would cost too much to hold or to pass on: nesting deeper than
    ``max_depth``, strings (values or keys) longer than ``max_chars``, integers beyond 2^53 (not exact in
    JavaScript or a double), numbers written with more than 64 characters, NaN/Infinity; and what the
    gateway could not keep or pass on faithfully: a key named twice in one object (which one counts?),
    lone surrogates, NUL and the other control characters FHIR strings may not hold.  Refusals name the
    element (``expression``) where the body says what it is."""

    def __init__(self, max_depth: int = 32, max_chars: int = 65536):
        self.max_depth = max_depth
        self.max_chars = max_chars

    @staticmethod
    def _number(text: str):
        if len(text) > 64:
            raise FhirError(400, "too-long", "a number in the body is written with more than 64 characters")
        if any(c in text for c in ".eE"):
            value = float(text)
            if not math.isfinite(value) or abs(value) > MAX_SAFE_INTEGER:
                raise FhirError(400, "invalid", "a number in the body is beyond 2^53")
            return value
        value = int(text)
        if abs(value) > MAX_SAFE_INTEGER:
            raise FhirError(400, "invalid", "an integer in the body is beyond 2^53")
        return value

    @staticmethod
    def _constant(text: str):
        raise FhirError(400, "structure", f"the body is not valid JSON: {text} is not a JSON value")

    def parse(self, data: bytes) -> Any:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise FhirError(400, "structure", "the body is not UTF-8") from None
        try:
            value = json.loads(text, parse_int=self._number, parse_float=self._number,
                               parse_constant=self._constant, object_pairs_hook=_object)
        except RecursionError:
            raise FhirError(400, "too-costly", f"the body is nested deeper than {self.max_depth} levels") from None
        except json.JSONDecodeError as e:
            raise FhirError(400, "structure", f"the body is not valid JSON: {e}") from None
        self._check(value)
        return value

    def _check(self, value) -> None:
        root = value.get("resourceType") if isinstance(value, dict) else None
        stack = [(value, 1, (None, root) if isinstance(root, str) else None)]  # path: (parent path, step)
        while stack:
            item, depth, path = stack.pop()
            if isinstance(item, str):
                self._check_text(item, "a string", path)
            elif isinstance(item, (dict, list)):
                if depth > self.max_depth:
                    raise FhirError(400, "too-costly", f"the body is nested deeper than {self.max_depth} levels")
                if isinstance(item, _RepeatedKey):
                    raise FhirError(400, "invalid", f"the body names the key {item.key[:64]!r} more than once in "
                                                    f"one object", self._where(path))
                if isinstance(item, dict):
                    for k, v in item.items():
                        self._check_text(k, "a key", path)
                        stack.append((v, depth + 1, (path, k)))
                else:
                    stack.extend((v, depth + 1, (path, i)) for i, v in enumerate(item))

    def _check_text(self, text: str, what: str, path) -> None:
        if len(text) > self.max_chars:
            raise FhirError(400, "too-long", f"{what} in the body is longer than {self.max_chars} characters")
        unfit = _UNFIT_TEXT.search(text)
        if unfit is not None:
            code = ord(unfit.group())
            why = ("a lone UTF-16 surrogate, which is no character" if 0xD800 <= code <= 0xDFFF else
                   "a control character FHIR strings may not hold (below U+0020, only TAB, LF and CR are text)")
            raise FhirError(400, "invalid", f"{what} in the body holds U+{code:04X}: {why}", self._where(path))

    @staticmethod
    def _where(path) -> str | None:
        steps = []
        while path is not None:
            path, step = path
            steps.append(step)
        return _expression(tuple(reversed(steps))) or None
