"""Fuzz harness: the FHIR JSON intake (`JsonLimits.parse`, adapters/outer/intake.py) and what a booking's body
becomes (`booking_from_appointment`, `patient_from_resource`: adapters/maps/fhir_scheduling.py).

Input: a request body, as a platform sends it.

Invariants (anything else is a crash, i.e. a 500 for the platform):

* `JsonLimits.parse` (the outer gate's limits: depth 32, strings of 65,536 characters) returns a value or
  raises FhirError 400 with an issue code of its own (``structure``, ``too-costly``, ``too-long``,
  ``invalid``) and a diagnostics text; nothing else. A value it returns is within the limits it enforces
  (nesting, string length, numbers within ±2^53 and finite), holds only text the gateway can store and pass
  on (no lone surrogate, no control character but TAB, LF and CR, in values and keys), came from a body
  that named no key twice in one object, and is plain JSON: it is written back and read back as the same
  value.
* `booking_from_appointment` returns a BookingRequest or raises InvalidResource (400 or 422) with at least
  one (code, diagnostics, expression) issue; nothing else. Reading the plain shape without the model gives
  exactly what the model gives (``strict=True``): the same BookingRequest, or InvalidResource with the same
  status.
* `patient_from_resource` (IHE ``patient-resource``) on each contained resource returns a Patient or raises
  InvalidResource; nothing else.
"""

from __future__ import annotations

import json
import math
import re

import atheris

with atheris.instrument_imports(include=["adapters.maps.fhir_scheduling"]):
    from adapters.maps.fhir_scheduling import InvalidResource, booking_from_appointment, patient_from_resource

with atheris.instrument_imports(include=["adapters.outer.intake", "adapters.outer.errors"]):
    from adapters.outer.errors import FhirError
    from adapters.outer.intake import MAX_SAFE_INTEGER, JsonLimits

from tests.fuzz.campaign import main

LIMITS = JsonLimits(max_depth=32, max_chars=65536)  # OuterConfig's defaults
PARSE_CODES = frozenset({"structure", "too-costly", "too-long", "invalid"})
UNFIT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    assert len({k for k, _ in pairs}) == len(pairs), f"a key named twice: {[k for k, _ in pairs]}"
    return dict(pairs)


def within_limits(value, depth: int = 1) -> None:
    if isinstance(value, str):
        assert len(value) <= LIMITS.max_chars and not UNFIT_TEXT.search(value), ascii(value[:80])
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, (int, float)):
        assert math.isfinite(value) and abs(value) <= MAX_SAFE_INTEGER, value
    elif isinstance(value, dict):
        assert depth <= LIMITS.max_depth
        for k, v in value.items():
            assert isinstance(k, str) and len(k) <= LIMITS.max_chars and not UNFIT_TEXT.search(k), ascii(k[:80])
            within_limits(v, depth + 1)
    else:
        assert isinstance(value, list), type(value)
        assert depth <= LIMITS.max_depth
        for v in value:
            within_limits(v, depth + 1)


def outcome(body, strict: bool):
    try:
        return booking_from_appointment(body, strict=strict)
    except InvalidResource as e:
        assert e.status in (400, 422) and e.issues, (e.status, e.issues)
        for code, diagnostics, expression in e.issues:
            assert isinstance(code, str) and code and isinstance(diagnostics, str) and diagnostics
            assert expression is None or isinstance(expression, str)
        return e.status


def check(data: bytes) -> None:
    try:
        body = LIMITS.parse(data)
    except FhirError as e:
        assert e.status == 400 and e.issues, (e.status, e.issues)
        assert e.issues[0][0] in PARSE_CODES and e.issues[0][1], e.issues
        return
    within_limits(body)
    json.loads(data, object_pairs_hook=unique_keys)
    assert json.loads(json.dumps(body, allow_nan=False)) == body
    assert outcome(body, strict=False) == outcome(body, strict=True)
    if isinstance(body, dict) and isinstance(body.get("contained"), list):
        for resource in body["contained"]:
            try:
                patient_from_resource(resource)
            except InvalidResource as e:
                assert e.issues, e


if __name__ == "__main__":
    main(check)
