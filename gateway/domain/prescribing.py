"""E-prescriptions through the lock: the decisions (docs/prescriptions.md).

Platform -> HIS (``direction='to_his'``): the outer gate verifies the prescriber's detached JWS over the
canonical JSON of what the platform sent, maps it (`adapters.maps.fhir_prescription.prescription_from_fhir`, which
validates every field), and commits in one unit the prescription (signed bytes, JWS, verification result),
one row per item (the FHIR MedicationRequest as served) and an outbound *intent* (RDE^O11 or OMP^O09, no HL7
bytes yet) addressed to the pharmacy's HIS endpoint. The inner gate writes the HL7 on the first send
(:meth:`PrescriptionService.encode`), so the outer gate never writes HL7. The HIS's answer (RRE^O12/ORP^O10)
sets each item's status; its dispensing (RDS^O13) becomes MedicationDispense rows, and when every item is
dispensed the prescription is completed.

HIS -> outside pharmacies (``direction='released'``): an RDE^O11 marked RELEASE is stored as a prescription
with its items (FHIR MedicationRequests); pharmacies list and claim them, one pharmacy per prescription (one
UPDATE decides, `Txn.claim_prescription`). The gateway signs each served MedicationRequest with its own key
on the first read (outer gate only: the key never sits on the intranet side), and stores that signature so
every later read serves the same bytes.

Status of an item (FHIR MedicationRequest.status) as platforms see it:
``on-hold`` while the HIS has not answered, ``active`` once it accepted, ``cancelled`` (with statusReason)
when it refused or the order could not be delivered, ``completed`` once dispensed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable
from zoneinfo import ZoneInfo

import structlog
from twisted.internet import defer

from adapters.hl7.er7 import Hl7Error, Message
from adapters.maps.fhir_prescription import medication_dispense, medication_requests, prescription_from_fhir
from adapters.maps.pharmacy_codes import PharmacyProfile
from adapters.maps.rde_order import build_order, read_order_answer
from adapters.maps.rds_dispense import dispenses_from_rds, released_prescription
from gateway.domain.ids import new_control_id
from gateway.domain.inbound import Verdict
from gateway.domain.backlog import check_backlog
from gateway.domain.signatures import SignatureError, TrustStore, canonical_json, prescription_payload, sign_release, verify_detached

log = structlog.get_logger("gateway.domain.prescribing")

SUBJECT = "prescription:"
SIGNATURE_EXTENSION = "urn:gatewayd:prescription:signature"
CLAIMED_BY_TAG = "urn:gatewayd:prescription:claimed-by"
ORDER_TYPES = {"RDE": "RDE^O11", "OMP": "OMP^O09"}
_SUBJECT_OIDS = {"serialNumber": ("SERIALNUMBER", "2.5.4.5"), "CN": ("CN", "2.5.4.3"),
                 "UID": ("UID", "0.9.2342.19200300.100.1.1")}


class Refused(Exception):
    """A prescription the gateway does not take: HTTP ``status``, OperationOutcome ``code``, ``text``."""

    def __init__(self, status: int, code: str, text: str, check: str = ""):
        super().__init__(text)
        self.status, self.code, self.text, self.check = status, code, text, check


@dataclass(frozen=True)
class SignaturePolicy:
    trust: TrustStore | None
    required: bool = True
    signer_must_match_requester: bool = True
    id_attribute: str = "serialNumber"


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(10)


def subject_attribute(rfc4514: str, attribute: str) -> str | None:
    """The value of ``attribute`` (serialNumber, CN, UID) in an RFC 4514 subject string."""
    names = _SUBJECT_OIDS[attribute]
    for part in rfc4514.split(","):
        key, _, value = part.partition("=")
        if key.strip().upper() in names:
            return value.strip()
    return None


def medication_request_entries(body: dict) -> list[dict]:
    """The MedicationRequest resources of a submission, in entry order (the order of the mapping's items)."""
    if body.get("resourceType") == "MedicationRequest":
        return [body]
    return [e["resource"] for e in body.get("entry") or []
            if isinstance(e, dict) and isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") == "MedicationRequest"]


def with_status(resource: dict, status: str, reason: str | None = None) -> dict:
    out = dict(resource, status=status)
    if reason:
        out["statusReason"] = {"text": reason}
    else:
        out.pop("statusReason", None)
    return out


def verify_release(resource: dict, certificate_pems: bytes) -> bool:
    """What a pharmacy does (documented for them; used by tests): remove the signature extension, verify the
    JWS over the rest's canonical JSON against the gateway's certificate."""
    trust = TrustStore.from_pem(certificate_pems)
    ext = [e for e in resource.get("extension") or [] if e.get("url") == SIGNATURE_EXTENSION]
    if len(ext) != 1:
        return False
    verify_detached(ext[0]["valueString"], prescription_payload(_without_signature(resource)), trust,
                    datetime.now(timezone.utc))
    return True


def _without_signature(resource: dict) -> dict:
    out = {k: v for k, v in resource.items() if k != "extension"}
    rest = [e for e in resource.get("extension") or [] if e.get("url") != SIGNATURE_EXTENSION]
    if rest:
        out["extension"] = rest
    return out


class PrescriptionService:
    """Both gates' decisions about prescriptions; the outer gate uses submit/read/claim, the inner gate
    encode/on_answer/on_dead and the inbound deciders."""

    def __init__(self, chamber, *, tz: ZoneInfo, profile: PharmacyProfile, peer: str, clock,
                 signatures: SignaturePolicy | None = None, header=None, release_signer=None,
                 max_backlog: int = 1000, retry_after: int = 30):
        self.chamber = chamber
        self.max_backlog = max_backlog  # messages waiting for the pharmacy endpoint before 503 (outer.max_backlog)
        self.retry_after = retry_after
        self.tz = tz
        self.profile = profile
        self.peer = peer
        self.clock = clock
        self.signatures = signatures
        self.header = header  # Hl7Header of the pharmacy endpoint (inner gate only)
        self.release_signer = release_signer  # (private key, [certificates]) (outer gate only)
        self.message_type = ORDER_TYPES[profile.message]
        self._waiters: dict[str, list[defer.Deferred]] = {}
        self._stop_observing = chamber.observe(self._on_commit)

    # ================================================================================== platform -> HIS
    def check_signature(self, body: dict, jws: str | None, requester_id: str) -> dict | None:
        """The verification result to store, or Refused (403) naming the failed check."""
        policy = self.signatures
        if policy is None or (jws is None and not policy.required):
            return None
        if policy.trust is None:
            raise Refused(403, "security", "prescriptions cannot be verified: no prescriber CA is configured")
        try:
            payload = prescription_payload(body)
            check = verify_detached(jws, payload, policy.trust, datetime.now(timezone.utc))
        except SignatureError as e:
            raise Refused(403, "security", f"the prescription's signature was refused: {e}", check=e.check) from None
        except ValueError as e:
            raise Refused(400, "invalid", f"the prescription cannot be canonicalised: {e}") from None
        if policy.signer_must_match_requester:
            signer = subject_attribute(check.signer_subject, policy.id_attribute)
            if signer != requester_id:
                raise Refused(403, "security", f"signer: the signing certificate's {policy.id_attribute} does not "
                                               f"name the prescriber of this prescription", check="signer")
        return check.to_json()

    def submit(self, platform: str, body: dict, jws: str | None) -> defer.Deferred:
        """Verify, map, and commit a prescription with its order intent. Fires with (PrescriptionRow,
        created: bool) after COMMIT; fails with Refused or the mapping's InvalidPrescription."""
        entries = medication_request_entries(body)
        ids = [new_id("m") for _ in entries] or [new_id("m")]
        prescription = prescription_from_fhir(body, self.tz, self.profile, item_ids=ids)
        signature = self.check_signature(body, jws, prescription.prescriber.id)
        payload = prescription_payload(body)
        prescription_id = new_id("p")

        def work(tx):
            existing = tx.prescription_by_number("to_his", platform, prescription.number)
            if existing is not None:
                if bytes(existing.payload) != payload:
                    raise Refused(409, "duplicate", f"prescription number {prescription.number} was already "
                                                    f"submitted by this platform with other content")
                return existing, False
            check_backlog(tx, self.peer, self.max_backlog, self.retry_after)
            control_id = new_control_id()
            message_id = tx.add_message(
                direction="outbound", peer=self.peer, control_id=control_id, type=self.message_type,
                state="committed", body=b"", charset="", subject=SUBJECT + prescription_id,
                order_key=hashlib.sha256(f"{prescription.patient.identifiers[0].system}|"
                                         f"{prescription.patient.identifiers[0].value}".encode()).hexdigest()[:24],
                detail=f"prescription of {len(ids)} item(s) from {platform}")
            tx.insert_prescription(id=prescription_id, direction="to_his", platform=platform,
                                   number=prescription.number, status="pending", payload=payload, jws=jws,
                                   signature=json.dumps(signature) if signature else None, message_id=message_id)
            for seq, (item_id, resource) in enumerate(zip(ids, entries or [body]), start=1):
                served = with_status({k: v for k, v in resource.items() if k not in ("text",)}, "on-hold",
                                     "waiting for the hospital pharmacy")
                served["id"] = item_id
                tx.insert_medication_request(id=item_id, prescription_id=prescription_id, seq=seq,
                                             status="on-hold", resource=json.dumps(served, ensure_ascii=False))
            log.info("prescription.committed", prescription=prescription_id, items=len(ids), platform=platform,
                     signed=signature is not None)
            return tx.prescription(prescription_id), True

        return self.chamber.transact(work)

    # -- the inner gate's side of it --------------------------------------------------------------------
    def owns(self, message) -> bool:
        return (message.subject or "").startswith(SUBJECT)

    def encode(self, tx, message) -> tuple[bytes, str, str]:
        p = tx.prescription(message.subject[len(SUBJECT):])
        if p is None or self.header is None:
            raise ValueError(f"message {message.id} cannot be encoded: no prescription or no pharmacy link here")
        items = tx.medication_requests_of(p.id)
        prescription = prescription_from_fhir(json.loads(bytes(p.payload)), self.tz, self.profile,
                                              item_ids=[i.id for i in items])
        now = datetime.fromtimestamp(tx.now, self.tz).replace(tzinfo=None)
        body = build_order(prescription, header=self.header, control_id=message.control_id, now=now,
                           message=self.profile.message)
        return body, self.message_type, self.header.charset

    def on_answer(self, tx, message, answer) -> None:
        if not self.owns(message):
            return
        p = tx.prescription(message.subject[len(SUBJECT):])
        if p is None or p.status != "pending":
            return
        raw = answer.extra.get("message")
        try:
            order = read_order_answer(raw) if raw is not None else None
        except Hl7Error as e:
            order = None
            log.warning("prescription.answer_unreadable", prescription=p.id, error=str(e))
        accepted = order.accepted if order is not None else answer.accepted
        reason = (order.reason if order is not None else answer.text) or "no reason given"
        fillers = {i.placer_id.split("^")[0]: i for i in (order.items if order is not None else ())}
        for item in tx.medication_requests_of(p.id):
            resource = json.loads(item.resource)
            filler = fillers.get(item.id)
            if accepted:
                resource = with_status(resource, "active")
                if filler is not None and filler.filler_id:
                    resource.setdefault("identifier", []).append(
                        {"system": "urn:gatewayd:his:order", "value": filler.filler_id.split("^")[0]})
                tx.update_medication_request(item.id, status="active", resource=json.dumps(resource, ensure_ascii=False),
                                             his_order=filler.filler_id.split("^")[0] if filler and filler.filler_id else None)
            else:
                text = f"refused by the hospital pharmacy ({answer.code}): {reason}"
                resource = with_status(resource, "cancelled", text)
                tx.update_medication_request(item.id, status="cancelled", resource=json.dumps(resource, ensure_ascii=False))
        tx.update_prescription(p.id, status="active" if accepted else "refused",
                               outcome=None if accepted else f"{answer.code}: {reason}")
        log.info("prescription.answered", prescription=p.id, accepted=accepted, code=answer.code)

    def on_dead(self, tx, message, reason: str) -> None:
        if not self.owns(message):
            return
        p = tx.prescription(message.subject[len(SUBJECT):])
        if p is None or p.status != "pending":
            return
        text = f"the prescription did not reach the hospital pharmacy: {reason}"
        for item in tx.medication_requests_of(p.id):
            resource = with_status(json.loads(item.resource), "cancelled", text)
            tx.update_medication_request(item.id, status="cancelled", resource=json.dumps(resource, ensure_ascii=False))
        tx.update_prescription(p.id, status="refused", outcome=text)

    # -- inbound from the HIS pharmacy -------------------------------------------------------------------
    def decider(self, message: Message) -> Callable[[Any], Verdict]:
        """For an RDS^O13 or a released RDE^O11: read it now (Hl7Error with its location if it cannot be
        read) and return what applies it inside the transaction that records the message."""
        if message.message_code == "RDS":
            dispenses = [medication_dispense(d, self.tz, self.profile) for d in dispenses_from_rds(message, self.tz)]
            return lambda tx: self._apply_dispenses(tx, message.control_id, dispenses)
        if message.message_code == "RDE":
            prescription = released_prescription(message)
            return lambda tx: self._apply_release(tx, prescription)
        raise Hl7Error(200, f"this gateway does not take {message.type_name} messages", segment="MSH", field=9)

    def _apply_dispenses(self, tx, control_id: str, dispenses: list[dict]) -> Verdict:
        targets = []
        for d in dispenses:
            ref = (d.get("authorizingPrescription") or [{}])[0].get("reference", "")
            request = tx.medication_request(ref.split("/", 1)[1].split("^")[0]) if "/" in ref else None
            if request is None:
                return Verdict("AE", f"unknown order {ref or '(no ORC-2)'}: no such prescription item was sent")
            targets.append((request, d))
        added = 0
        touched: set[str] = set()
        for request, d in targets:
            resource = dict(d, id=new_id("d"))
            his_dispense = resource["identifier"][0]["value"]
            if tx.add_dispense(id=resource["id"], medication_request=request.id,
                               prescription_id=request.prescription_id, his_dispense=his_dispense,
                               resource=json.dumps(resource, ensure_ascii=False), control_id=control_id):
                added += 1
                touched.add(request.prescription_id)
        for prescription_id in touched:
            items = tx.medication_requests_of(prescription_id)
            done = 0
            for item in items:
                if tx.dispenses_for(item.id):
                    done += 1
                    if item.status != "completed":
                        resource = with_status(json.loads(item.resource), "completed")
                        tx.update_medication_request(item.id, status="completed",
                                                     resource=json.dumps(resource, ensure_ascii=False))
            if done == len(items):
                tx.update_prescription(prescription_id, status="completed")
        return Verdict("AA", f"{added} dispense(s) recorded")

    def _apply_release(self, tx, prescription) -> Verdict:
        existing = tx.prescription_by_number("released", "", prescription.number)
        if existing is not None:
            return Verdict("AA", f"prescription {prescription.number} was released before")
        ids = [new_id("m") for _ in prescription.items]
        resources = medication_requests(prescription, self.tz, ids, self.profile)
        prescription_id = new_id("p")
        tx.insert_prescription(id=prescription_id, direction="released", platform="", number=prescription.number,
                               status="active", payload=canonical_json(resources))
        for seq, (item_id, resource) in enumerate(zip(ids, resources), start=1):
            tx.insert_medication_request(id=item_id, prescription_id=prescription_id, seq=seq, status="active",
                                         resource=json.dumps(dict(resource, id=item_id), ensure_ascii=False),
                                         his_order=prescription.items[seq - 1].filler_id or None)
        log.info("prescription.released", prescription=prescription_id, items=len(ids))
        return Verdict("AA", f"released as {len(ids)} MedicationRequest(s)")

    # ================================================================================== reading (outer)
    def request_for(self, platform: str, request_id: str, *, pharmacy: bool):
        """(MedicationRequestRow, PrescriptionRow) this platform may see, else None (404: no probing)."""
        reader = self.chamber.read()
        item = reader.medication_request(request_id)
        p = reader.prescription(item.prescription_id) if item is not None else None
        if p is None:
            return None
        if p.direction == "to_his" and p.platform == platform:
            return item, p
        if p.direction == "released" and pharmacy and (p.status == "active" or p.claimed_by == platform):
            return item, p
        return None

    def served(self, item, p) -> defer.Deferred:
        """The resource as served: a released one signed by the gateway (once, then stored), claim in meta."""
        resource = json.loads(item.resource)
        if p.direction == "released":
            if p.claimed_by:
                resource["meta"] = {"tag": [{"system": CLAIMED_BY_TAG, "code": p.claimed_by}]}
            if self.release_signer is not None and not any(
                    e.get("url") == SIGNATURE_EXTENSION for e in resource.get("extension") or []):
                return self._sign_once(item.id).addCallback(lambda signed: dict(signed, **(
                    {"meta": resource["meta"]} if "meta" in resource else {})))
        return defer.succeed(resource)

    def _sign_once(self, request_id: str) -> defer.Deferred:
        key, chain = self.release_signer

        def work(tx):
            item = tx.medication_request(request_id)
            resource = json.loads(item.resource)
            if any(e.get("url") == SIGNATURE_EXTENSION for e in resource.get("extension") or []):
                return resource  # signed meanwhile
            jws = sign_release(prescription_payload(resource), key, chain)
            signed = copy.deepcopy(resource)
            signed.setdefault("extension", []).append({"url": SIGNATURE_EXTENSION, "valueString": jws})
            tx.update_medication_request(request_id, resource=json.dumps(signed, ensure_ascii=False))
            return signed

        return self.chamber.transact(work)

    def released(self, platform: str, after: float, limit: int) -> list:
        """Released items a pharmacy may fill: (item, prescription) pairs, oldest change first."""
        return self.released_page(platform, after, limit)[0]

    def released_page(self, platform: str, after: float, limit: int, after_id: str | None = None):
        """One page of :meth:`released`: whole prescriptions only (a prescription's items are never split
        between pages; one with more items than ``limit`` fills a page alone), and the cursor of the next
        page — (updated, id) of the last prescription on this one — or None when this is the last."""
        reader = self.chamber.read()
        if limit <= 0:
            return [], None
        out: list = []
        prescriptions = reader.released_prescriptions(platform, after, limit + 1, after_id)
        for n, p in enumerate(prescriptions):
            items = reader.medication_requests_of(p.id)
            if out and len(out) + len(items) > limit:
                last = prescriptions[n - 1]
                return out, (last.updated, last.id)
            out.extend((item, p) for item in items)
        return out, None  # (limit + 1 fetched cannot all fit: when they did, these were all there is)

    def dispenses(self, request_id: str) -> list[dict]:
        return [json.loads(d.resource) for d in self.chamber.read().dispenses_for(request_id)]

    def claim(self, platform: str, request_id: str) -> defer.Deferred:
        """Fires with (item, prescription, won: bool); exactly one pharmacy wins a prescription."""

        def work(tx):
            item = tx.medication_request(request_id)
            p = tx.prescription(item.prescription_id) if item is not None else None
            if p is None or p.direction != "released":
                return None
            won = tx.claim_prescription(p.id, platform) or p.claimed_by == platform
            return item, tx.prescription(p.id), won

        return self.chamber.transact(work)

    # ================================================================================== waiting
    def wait_settled(self, prescription_id: str, timeout: float) -> defer.Deferred:
        """Fires True once the HIS answered (or the order was given up), False after ``timeout``."""
        d: defer.Deferred = defer.Deferred()
        self._waiters.setdefault(prescription_id, []).append(d)
        call = self.clock.callLater(timeout, self._timed_out, prescription_id, d)
        d.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])
        self._on_commit()
        return d

    def _timed_out(self, prescription_id: str, d: defer.Deferred) -> None:
        waiters = self._waiters.get(prescription_id, [])
        if d in waiters:
            waiters.remove(d)
            if not waiters:
                self._waiters.pop(prescription_id, None)
        if not d.called:
            d.callback(False)

    def _on_commit(self) -> None:
        if not self._waiters:
            return
        reader = self.chamber.read()
        for prescription_id in list(self._waiters):
            p = reader.prescription(prescription_id)
            if p is not None and p.status != "pending":
                for d in self._waiters.pop(prescription_id, []):
                    if not d.called:
                        d.callback(True)

    def stop(self) -> None:
        self._stop_observing()
        for waiters in self._waiters.values():
            for d in waiters:
                if not d.called:
                    d.callback(False)
        self._waiters.clear()

