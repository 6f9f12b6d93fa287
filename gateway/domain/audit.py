"""The audit trail: who saw and did what, kept in the chamber, append-only and hash-chained.

What is recorded (docs/security.md): every access to patient data (an Appointment read, searched,
booked or cancelled) and every refusal the outer gate gives (any 4xx/5xx answer), plus the HIS's answer to
a booking or cancellation.  A record says who (platform, client certificate subject and serial), what
(action, resource type and id), when (microseconds, UTC), the outcome (the HTTP status) and from where
(the client's address).  Records carry ids only: never patient names, identifiers or request bodies.

A resource is named by its id when the chamber holds it (an id the gateway issued, or a slot or schedule
the HIS published).  Anything else a request named — an id a platform put in a URL that the chamber does
not know, which may be a patient's identifier — is recorded only as its *keyed name* (:func:`keyed_name`):
``hmac:`` and HMAC-SHA256 of the id under the chamber's own key, cut to 32 hex digits.  The same id always
gets the same name in one chamber, so ``gatewayd audit find ID`` can still answer "was this id asked for",
while the trail alone (an export, a copy of the records) does not give the id back.

Where a record describes a change, it is written in the same chamber transaction as the change (a
booking's hold, a cancellation, the HIS's answer): no booking exists without its record and no record
without its booking.  Otherwise it is its own transaction unit (group-committed with whatever else is
written in that reactor turn).  A read of patient data is answered only after its record is committed.

The chain: records are numbered (``seq``) without gaps, and each carries
``hash = sha256(previous hash + canonical content)`` where the previous hash of the first record is the
*anchor* (64 zeros, or the hash of the last record removed by :func:`prune`) and the canonical content is
the record's fields (seq included) as compact JSON with sorted keys, UTF-8.  The chamber keeps the chain's
head (last seq and hash) next to the anchor.  :func:`verify` recomputes everything and names the first
record that does not fit: an edited record fails its own hash; a deleted one leaves a gap; a deleted
tail no longer reaches the head.  (Someone able to rewrite the whole file can recompute every hash:
record the head that ``gatewayd audit verify`` prints somewhere else, see docs/security.md.)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable
from zoneinfo import ZoneInfo

import structlog

from gateway.chamber.rows import AuditRow

log = structlog.get_logger("gateway.domain.audit")

GENESIS = "0" * 64
HASH_EXTENSION = "urn:gatewayd:audit:chain-hash"
PLATFORM_SYSTEM = "urn:gatewayd:platform"
KEYED_PREFIX = "hmac:"
KEYED_NAME_SYSTEM = "urn:gatewayd:audit:keyed-name"


@dataclass(frozen=True)
class AuditEntry:
    """What the caller knows about an event; the trail adds seq, time and hash."""

    action: str  # read | search | book | cancel | update | access | book.settled | cancel.settled | audit.prune
    # | notify (a full-resource notification sent to a platform's endpoint)
    outcome: int  # the HTTP status answered (or implied)
    platform: str | None = None
    subject: str | None = None
    serial: str | None = None
    source: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    detail: str | None = None


_FIELDS = ("seq", "at_us", "platform", "subject", "serial", "source", "action", "resource_type", "resource_id",
           "outcome", "detail")


def canonical(row) -> bytes:
    """The bytes a record's hash covers: its fields (not the hash) as sorted, compact JSON in UTF-8."""
    return json.dumps({f: getattr(row, f) for f in _FIELDS}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def chain_hash(previous: str, row) -> str:
    return hashlib.sha256(previous.encode("ascii") + canonical(row)).hexdigest()


def append(tx, entry: AuditEntry) -> AuditRow:
    """Append ``entry`` inside the chamber transaction ``tx`` (so it commits with what it describes)."""
    chain = tx.audit_chain()
    draft = AuditRow(seq=chain.head_seq + 1, at_us=round(tx.now * 1_000_000), platform=entry.platform,
                     subject=entry.subject, serial=entry.serial, source=entry.source, action=entry.action,
                     resource_type=entry.resource_type, resource_id=entry.resource_id, outcome=int(entry.outcome),
                     detail=entry.detail, hash="")
    row = AuditRow(**{**draft.__dict__, "hash": chain_hash(chain.head_hash, draft)})
    tx.append_audit(row)
    return row


class AuditTrail:
    """Writes records as their own transaction units (for events that change nothing in the chamber)."""

    def __init__(self, chamber):
        self.chamber = chamber

    def record(self, entry: AuditEntry):
        """Fires with the AuditRow after COMMIT (or fails as the chamber's write failed)."""
        return self.chamber.transact(lambda tx: append(tx, entry))


def keyed_name(key: bytes, resource_id: str) -> str:
    """How the audit names an id the gateway did not issue: ``hmac:`` and the first 32 hex digits of
    HMAC-SHA256(``key``, the id as UTF-8), ``key`` being the chamber's (Txn.audit_key)."""
    return KEYED_PREFIX + hmac.new(key, resource_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


class ResourceNames:
    """Names the resource a request was about for its audit record: the id when the chamber holds a
    resource of that type with it, else its keyed name.  ``reader`` gives a chamber Reader."""

    def __init__(self, reader):
        self._reader = reader
        self._key: bytes | None = None  # read once: a chamber's key never changes

    def __call__(self, resource_type: str | None, resource_id: str | None) -> str | None:
        if resource_id is None:
            return None
        reader = self._reader()
        if resource_type is not None and reader.holds(resource_type, resource_id):
            return resource_id
        if self._key is None:
            self._key = reader.audit_key()
        return keyed_name(self._key, resource_id)


# -- verification -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int  # records whose hash was recomputed
    anchor_seq: int
    head_seq: int
    head_hash: str
    broken_at: int | None = None  # the first record (seq) that does not fit
    reason: str = ""


def verify(reader) -> Verdict:
    """Walk the chain from the anchor to the head; the first record that does not fit ends the walk."""
    chain = reader.audit_chain()
    prev_seq, prev_hash, checked = chain.anchor_seq, chain.anchor_hash, 0

    def broken(seq, reason):
        return Verdict(False, checked, chain.anchor_seq, chain.head_seq, chain.head_hash, seq, reason)

    for row in reader.audit_records(after_seq=0):
        if row.seq <= chain.anchor_seq:
            return broken(row.seq, f"record {row.seq} is older than the anchor (record {chain.anchor_seq}, the "
                                   f"last one pruned) but is still there: it was put back or the anchor moved")
        if row.seq != prev_seq + 1:
            missing = prev_seq + 1 if row.seq - prev_seq == 2 else f"{prev_seq + 1}-{row.seq - 1}"
            return broken(prev_seq + 1, f"record {missing} is missing: after record {prev_seq} comes {row.seq}")
        expected = chain_hash(prev_hash, row)
        if expected != row.hash:
            after = (f" (or record {prev_seq} was changed together with its hash)"
                     if prev_seq > chain.anchor_seq else "")
            return broken(row.seq, f"record {row.seq} was changed: its content and hash do not follow the "
                                   f"chain{after}")
        checked += 1
        prev_seq, prev_hash = row.seq, row.hash
    if prev_seq != chain.head_seq:
        if prev_seq < chain.head_seq:
            return broken(prev_seq + 1, f"records {prev_seq + 1}-{chain.head_seq} are missing: the chain ends at "
                                        f"record {prev_seq} but its head is record {chain.head_seq}")
        return broken(chain.head_seq + 1, f"records after the head (record {chain.head_seq}) were added")
    if prev_hash != chain.head_hash:
        return broken(prev_seq, f"record {prev_seq}'s hash is not the head's hash")
    return Verdict(True, checked, chain.anchor_seq, chain.head_seq, chain.head_hash)


# -- retention ----------------------------------------------------------------------------------------------


def prunable(reader, before: float) -> int:
    """How many records :func:`prune` would remove for ``before``."""
    chain = reader.audit_chain()
    first_kept = reader.first_audit_seq_from(round(before * 1_000_000))
    through = chain.head_seq if first_kept is None else first_kept - 1
    return max(0, through - chain.anchor_seq)


def prune(tx, before: float, who: str) -> tuple[int, int]:
    """Remove the records written before ``before`` (a timestamp), oldest first and without gaps: the
    longest run from the anchor whose records are all older.  The last one removed becomes the anchor, so
    the rest still verifies.  The pruning itself is recorded.  Returns (records removed, new anchor seq)."""
    chain = tx.audit_chain()
    first_kept = tx.first_audit_seq_from(round(before * 1_000_000))
    through = chain.head_seq if first_kept is None else first_kept - 1
    if through <= chain.anchor_seq:
        return 0, chain.anchor_seq
    last = tx.audit_record(through)
    if last is None:
        raise ValueError(f"audit record {through} is missing: run `gatewayd audit verify`")
    removed = tx.prune_audit(through, last.hash)
    cutoff = datetime.fromtimestamp(before, timezone.utc).isoformat(timespec="seconds")
    append(tx, AuditEntry(action="audit.prune", outcome=200, subject=who, source="local",
                          detail=f"removed records {chain.anchor_seq + 1}-{through} written before {cutoff}"))
    return removed, through


# -- FHIR AuditEvent (R4B) ----------------------------------------------------------------------------------

_INTERACTION = "http://hl7.org/fhir/restful-interaction"
_SUBTYPE = {"read": "read", "search": "search-type", "book": "create", "cancel": "update", "update": "update",
            "book.settled": "create", "cancel.settled": "update"}
_ACTION = {"read": "R", "search": "E", "book": "C", "cancel": "U", "update": "U", "book.settled": "C",
           "cancel.settled": "U", "access": "E", "audit.prune": "D", "notify": "R"}


def _is_ip(text: str | None) -> bool:
    try:
        ipaddress.ip_address(text or "")
    except ValueError:
        return False
    return True


def _outcome(status: int) -> str:
    if status < 400:
        return "0"  # success
    if status < 500:
        return "4"  # minor failure: the request was refused
    return "8"  # serious failure


def audit_event(row: AuditRow, tz: ZoneInfo) -> dict:
    """One record as a FHIR R4B AuditEvent (its chain hash in an extension)."""
    recorded = datetime.fromtimestamp(row.at_us / 1_000_000, tz).isoformat(timespec="microseconds")
    if row.action == "audit.prune":
        event_type = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110101",
                      "display": "Audit Log Used"}
    else:
        event_type = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                      "display": "RESTful Operation"}
    on_behalf = (row.source or "").startswith("his:") or row.source == "gateway"
    agent: dict = {"requestor": not on_behalf}
    if row.platform:
        agent["who"] = {"identifier": {"system": PLATFORM_SYSTEM, "value": row.platform}, "display": row.platform}
    else:
        agent["who"] = {"display": row.subject or "unknown"}
    if row.subject:
        agent["altId"] = row.subject
    if row.serial:
        agent["name"] = f"certificate serial {row.serial}"
    if _is_ip(row.source):
        agent["network"] = {"address": row.source, "type": "2"}
    agents = [agent]
    if on_behalf:  # the HIS answered, or the gateway itself released a hold
        agents.append({"who": {"display": row.source}, "requestor": False})
    event: dict = {
        "resourceType": "AuditEvent",
        "id": f"audit-{row.seq}",
        "extension": [{"url": HASH_EXTENSION, "valueString": row.hash}],
        "type": event_type,
        "recorded": recorded,
        "outcome": _outcome(row.outcome),
        "outcomeDesc": f"HTTP {row.outcome}" + (f": {row.detail}" if row.detail else ""),
        "agent": agents,
        "source": {"site": "gatewayd", "observer": {"display": "gatewayd outer gate"},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "3",
                             "display": "Web Server"}]},
    }
    if row.action in _SUBTYPE:
        event["subtype"] = [{"system": _INTERACTION, "code": _SUBTYPE[row.action]}]
    if row.action in _ACTION:
        event["action"] = _ACTION[row.action]
    if row.resource_type:
        entity: dict = {"type": {"system": "http://hl7.org/fhir/resource-types", "code": row.resource_type}}
        if row.resource_id and row.resource_id.startswith(KEYED_PREFIX):  # not a resource: what was asked for
            entity["what"] = {"identifier": {"system": KEYED_NAME_SYSTEM, "value": row.resource_id}}
        elif row.resource_id:
            entity["what"] = {"reference": f"{row.resource_type}/{row.resource_id}"}
        entity["detail"] = [{"type": "action", "valueString": row.action}]
        event["entity"] = [entity]
    return event


def export(rows: Iterable[AuditRow], tz: ZoneInfo) -> Iterable[str]:
    """NDJSON lines, one AuditEvent each."""
    for row in rows:
        yield json.dumps(audit_event(row, tz), ensure_ascii=False, separators=(",", ":"))
