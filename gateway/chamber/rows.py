"""The chamber's row types: one frozen dataclass per table a caller reads, with the table's columns as
they are stored (the gateway's own values, no FHIR or HL7 meaning added)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass


@dataclass(frozen=True)
class MessageRow:
    id: int
    direction: str
    peer: str
    sender: str  # inbound: MSH-3 and MSH-4 as sent (with control_id, the message's identity); outbound: ''
    control_id: str
    type: str
    state: str
    body: bytes
    charset: str
    subject: str | None
    order_key: str | None
    attempts: int
    next_attempt: float | None
    answer_code: str | None
    answer_text: str | None
    last_error: str | None
    created: float
    updated: float


@dataclass(frozen=True)
class ScheduleRow:
    id: str
    display: str
    practitioner_id: str
    practitioner_name: str
    department_code: str
    department_name: str
    updated: float
    facility: str = ""  # MSH-4.1 of the message that published it (schema v3)


@dataclass(frozen=True)
class SlotRow:
    id: str
    schedule_id: str
    start_local: str
    start_ts: float
    end_ts: float
    minutes: int
    service_code: str
    service_text: str
    his_status: str
    his_appointment: str | None
    held_by: str | None
    booked_by: str | None
    updated: float
    z_segments: str | None = None  # the HIS's Z-segments of its last publication, CR-separated ER7 (schema v3)


@dataclass(frozen=True)
class AppointmentRow:
    id: str
    platform: str
    slot_id: str
    status: str
    patient: dict
    description: str | None
    his_appointment: str | None
    hold_expires: float | None
    outcome: str | None
    pending_change: str | None
    version: int
    created: float
    updated: float
    replaces: str | None = None  # the booked appointment this one moves (rescheduling: cancel + new)


@dataclass(frozen=True)
class AuditRow:
    """One audit record (see gateway/domain/audit.py for what it means and how it is chained)."""

    seq: int
    at_us: int
    platform: str | None
    subject: str | None
    serial: str | None
    source: str | None
    action: str
    resource_type: str | None
    resource_id: str | None
    outcome: int
    detail: str | None
    hash: str


@dataclass(frozen=True)
class AuditChain:
    """The chain's ends: the anchor (last pruned record, or seq 0 and the genesis hash) and the head."""

    anchor_seq: int
    anchor_hash: str
    head_seq: int
    head_hash: str


@dataclass(frozen=True)
class PrescriptionRow:
    id: str
    direction: str  # to_his | released
    platform: str
    number: str
    status: str
    outcome: str | None
    payload: bytes
    jws: str | None
    signature: str | None
    message_id: int | None
    claimed_by: str | None
    claimed_at: float | None
    version: int
    created: float
    updated: float
    record: str | None  # to_his: the gateway's own record of it (JSON), what its order is written from


@dataclass(frozen=True)
class MedicationRequestRow:
    id: str
    prescription_id: str
    seq: int
    his_order: str | None
    status: str
    resource: str
    updated: float


@dataclass(frozen=True)
class DispenseRow:
    id: str
    medication_request: str
    prescription_id: str
    his_dispense: str
    resource: str
    control_id: str
    created: float


@dataclass(frozen=True)
class HisLinkRow:
    """What the inner gate's probe last found of a HIS endpoint: up or down, since when, and why it is down."""
    peer: str
    up: bool
    since: float
    detail: str | None


def load(cls, row: sqlite3.Row | None):
    """The row type ``cls`` of a table's row as sqlite3 gives it (None for None)."""
    if row is None:
        return None
    values = dict(row)
    if cls is AppointmentRow:
        values["patient"] = json.loads(values["patient"])
    elif cls is HisLinkRow:
        values["up"] = bool(values["up"])
    return cls(**values)


@dataclass(frozen=True)
class SubscriptionRow:
    id: str
    platform: str
    topic: str
    payload: str
    status: str
    events: int
    heartbeat: float | None
    created: float
    updated: float


@dataclass(frozen=True)
class NotificationRow:
    subscription_id: str
    event: int
    platform: str
    focus: str
    what: str
    state: str
    attempts: int
    next_attempt: float
    last_error: str | None
    created: float
    updated: float
