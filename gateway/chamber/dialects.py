"""The few SQL fragments that cannot be written once for both backends (JSON, integer division), by dialect.
Everything else Txn and Reader say runs on SQLite and PostgreSQL alike; a connection names its dialect
(``conn.dialect``; a plain ``sqlite3.Connection`` is SQLite's: :func:`of`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass(frozen=True)
class Dialect:
    name: str
    #: slots hidden from a platform past its quota: one parameter, a JSON array of [schedule, day, cutoff|null]
    hidden_slots: str
    #: an appointment whose patient has one of these identifiers: one parameter, a JSON array of [system|null, value]
    patient_has_identifier: str
    #: the bucket number of a message's commit time: parameters since, bucket size
    time_bucket: str
    #: patient_has_identifier's parameter: the JSON text of (system or None, value) pairs
    identifiers_param: Callable[[Iterable[tuple]], str] = lambda pairs: json.dumps(list(pairs))


def _without_nul(pairs: Iterable[tuple]) -> str:
    """PostgreSQL's jsonb cannot hold a NUL (\\u0000): a pair with one cannot match a patient there (a patient whose
    JSON has one is not searched: see POSTGRESQL.patient_has_identifier), so it is left out."""
    return json.dumps([p for p in pairs if not any(isinstance(v, str) and "\x00" in v for v in p)])


SQLITE = Dialect(
    name="sqlite",
    hidden_slots=(
        "NOT (held_by IS NULL AND his_status = 'free' AND EXISTS (SELECT 1 FROM json_each(?) h"
        " WHERE json_extract(h.value, '$[0]') = slots.schedule_id"
        " AND json_extract(h.value, '$[1]') = substr(slots.start_local, 1, 8)"
        " AND (json_extract(h.value, '$[2]') IS NULL OR slots.start_ts > json_extract(h.value, '$[2]'))))"),
    patient_has_identifier=(
        "EXISTS (SELECT 1 FROM json_each(a.patient, '$.identifiers') i, json_each(?) t"
        " WHERE json_extract(i.value, '$.value') = json_extract(t.value, '$[1]')"
        " AND (json_extract(t.value, '$[0]') IS NULL"
        " OR json_extract(i.value, '$.system') = json_extract(t.value, '$[0]')))"),
    time_bucket="CAST((created - ?) / ? AS INTEGER)",
)

POSTGRESQL = Dialect(
    name="postgresql",
    hidden_slots=(
        "NOT (held_by IS NULL AND his_status = 'free' AND EXISTS (SELECT 1 FROM jsonb_array_elements(?::jsonb) h"
        " WHERE h ->> 0 = slots.schedule_id AND h ->> 1 = substr(slots.start_local, 1, 8)"
        " AND (h ->> 2 IS NULL OR slots.start_ts > (h ->> 2)::double precision)))"),
    patient_has_identifier=(
        "EXISTS (SELECT 1 FROM jsonb_array_elements(CASE WHEN strpos(a.patient, '\\u0000') > 0 THEN '[]'::jsonb"
        " WHEN jsonb_typeof(a.patient::jsonb -> 'identifiers') = 'array' THEN a.patient::jsonb -> 'identifiers'"
        " ELSE '[]'::jsonb END) i, jsonb_array_elements(?::jsonb) t"
        " WHERE i ->> 'value' = t ->> 1 AND (t ->> 0 IS NULL OR i ->> 'system' = t ->> 0))"),
    time_bucket="CAST(floor((created - ?) / ?) AS BIGINT)",
    identifiers_param=_without_nul,
)


def of(conn) -> Dialect:
    """The dialect of a connection Txn or Reader was given."""
    return getattr(conn, "dialect", SQLITE)
