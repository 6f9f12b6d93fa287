"""E-prescriptions through the lock: the decisions (docs/prescriptions.md), in the domain's own terms.

Platform -> HIS (``direction='to_his'``): the outer gate reads a platform's MedicationRequest or transaction
Bundle into a `Submission` (adapters/outer/pharmacy.py, with adapters/maps/fhir_prescription.py, which
validates every field). :meth:`PrescriptionService.submit` verifies the prescriber's detached JWS over the
signed bytes it carries (opaque here: the canonical JSON of what the platform sent; the signer must be the
prescriber the prescription names), gives each item the gateway's id, and commits in one unit the
prescription (signed bytes, JWS, verification result, and its record: the `Prescription` as the domain's own
JSON), one row per item (its document, on hold) and an outbound *intent* (RDE^O11 or OMP^O09, no HL7 bytes yet)
addressed to the pharmacy's HIS endpoint. The inner gate writes the order from the record on the first send
(:meth:`PrescriptionService.encode`, through the `OrderWriter` port), so the outer gate never writes HL7 and
nothing reads the platform's request twice. The HIS's answer comes read (`HisAnswer.order`) and sets each
item's status; its dispensing comes as `Dispense` values and becomes dispense rows, and when every item is
dispensed the prescription is completed.

HIS -> outside pharmacies (``direction='released'``): a released `Prescription` (the inner gate read the
RDE^O11) is stored with its items; pharmacies list and claim them, one pharmacy per prescription (one UPDATE
decides, `Txn.claim_prescription`). The gateway signs each item's document with its own key on the first read
(outer gate only: the key never sits on the intranet side), and stores the signed document so every later read
serves the same bytes.

What readers are served (the FHIR resources) is written by the `PrescriptionDocuments` port from the decisions
made here; this module stores that text and never reads it. A refusal is `Refused` with a domain ``kind``: the
outer gate chooses its HTTP status. Time is the injected ``clock``'s.

Status of an item (as platforms see it): ``on-hold`` while the HIS has not answered, ``active`` once it
accepted, ``cancelled`` (with a reason) when it refused or the order could not be delivered, ``completed`` once
dispensed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import structlog
from twisted.internet import defer

from gateway.domain.ids import new_control_id, new_id
from gateway.domain.backlog import check_backlog
from gateway.domain.inbound import Verdict
from gateway.domain.model import HisAnswer
from gateway.domain.notifications import note_prescription
from gateway.domain.patients import order_key
from gateway.domain.ports import OrderWriter, PrescriptionDocuments
from gateway.domain.prescriptions import Dispense, Prescription, Submission
from gateway.domain.settle import SettlementWaiters
from gateway.domain.signatures import SignatureError, TrustStore, sign_release, verify_detached

log = structlog.get_logger("gateway.domain.prescribing")

SUBJECT = "prescription:"
WAITING = "waiting for the hospital pharmacy"
_SUBJECT_OIDS = {"serialNumber": ("SERIALNUMBER", "2.5.4.5"), "CN": ("CN", "2.5.4.3"),
                 "UID": ("UID", "0.9.2342.19200300.100.1.1")}


class Refused(Exception):
    """A prescription the gateway does not take, before anything of it is stored. ``kind`` names why:
    ``signature`` (unsigned, not verifiable here, or its signature refused: ``check`` names the failed check)
    or ``duplicate`` (its number was submitted by the platform before, with other content); ``text`` says it."""

    KINDS = ("signature", "duplicate")

    def __init__(self, kind: str, text: str, check: str = ""):
        if kind not in self.KINDS:
            raise ValueError(f"a refusal is one of {', '.join(self.KINDS)}, not {kind!r}")
        super().__init__(text)
        self.kind, self.text, self.check = kind, text, check


@dataclass(frozen=True)
class SignaturePolicy:
    trust: TrustStore | None
    required: bool = True
    signer_must_match_requester: bool = True
    id_attribute: str = "serialNumber"


def subject_attribute(rfc4514: str, attribute: str) -> str | None:
    """The value of ``attribute`` (serialNumber, CN, UID) in an RFC 4514 subject string."""
    names = _SUBJECT_OIDS[attribute]
    for part in rfc4514.split(","):
        key, _, value = part.partition("=")
        if key.strip().upper() in names:
            return value.strip()
    return None


class PrescriptionService:
    """Both gates' decisions about prescriptions; the outer gate uses submit/read/claim, the inner gate
    encode/on_answer/on_dead and apply_dispenses/apply_release."""

    def __init__(self, chamber, *, tz: ZoneInfo, order_type: str, documents: PrescriptionDocuments, peer: str,
                 clock, signatures: SignaturePolicy | None = None, writer: OrderWriter | None = None,
                 from_request: Callable[[bytes, list[str]], Prescription] | None = None,
                 release_signer=None, max_backlog: int = 1000, retry_after: int = 30):
        self.chamber = chamber
        self.max_backlog = max_backlog  # messages waiting for the pharmacy endpoint before Overloaded
        self.retry_after = retry_after
        self.tz = tz
        self.order_type = order_type  # the order intent's message type (RDE^O11 or OMP^O09)
        self.documents = documents
        self.peer = peer
        self.clock = clock
        self.signatures = signatures
        self.writer = writer  # the pharmacy endpoint's order writer (inner gate only)
        # (a request as stored, its items' ids) -> Prescription: the map the platform's request went through, for
        # prescriptions committed before chamber schema v6 kept the domain's record (inner gate only)
        self.from_request = from_request
        self.release_signer = release_signer  # (private key, [certificates]) (outer gate only)
        # waiters are woken by every commit (this process's or the other gate's) that may answer a prescription
        self._waiters = SettlementWaiters(clock, self._answered_among)
        self._stop_observing = chamber.observe(self._waiters.recheck)

    # ================================================================================== platform -> HIS
    def check_signature(self, signed: bytes, jws: str | None, requester_id: str) -> dict | None:
        """The verification result to store, or Refused (``signature``) naming the failed check."""
        policy = self.signatures
        if policy is None or (jws is None and not policy.required):
            return None
        if policy.trust is None:
            raise Refused("signature", "prescriptions cannot be verified: no prescriber CA is configured")
        try:
            check = verify_detached(jws, signed, policy.trust, datetime.fromtimestamp(self.clock.seconds(),
                                                                                       timezone.utc))
        except SignatureError as e:
            raise Refused("signature", f"the prescription's signature was refused: {e}", check=e.check) from None
        if policy.signer_must_match_requester:
            signer = subject_attribute(check.signer_subject, policy.id_attribute)
            if signer != requester_id:
                raise Refused("signature", f"signer: the signing certificate's {policy.id_attribute} does not "
                                           f"name the prescriber of this prescription", check="signer")
        return check.to_json()

    def submit(self, platform: str, submission: Submission) -> defer.Deferred:
        """Verify a platform's prescription, give its items the gateway's ids, and commit it with its order
        intent. Raises Refused (``signature``) before anything is stored; the Deferred fires with
        (PrescriptionRow, created: bool) after COMMIT, or fails with Refused (``duplicate``) or Overloaded."""
        ids = [new_id("m") for _ in submission.documents]
        prescription = replace(submission.prescription, items=tuple(
            replace(item, placer_id=item_id) for item, item_id in zip(submission.prescription.items, ids)))
        signature = self.check_signature(submission.signed, submission.jws, prescription.prescriber.id)
        payload = submission.signed
        record = json.dumps(prescription.to_json(), ensure_ascii=False)
        prescription_id = new_id("p")

        def work(tx):
            existing = tx.prescription_by_number("to_his", platform, prescription.number)
            if existing is not None:
                if bytes(existing.payload) != payload:
                    raise Refused("duplicate", f"prescription number {prescription.number} was already "
                                               f"submitted by this platform with other content")
                return existing, False
            check_backlog(tx, self.peer, self.max_backlog, self.retry_after)
            control_id = new_control_id()
            message_id = tx.add_message(
                direction="outbound", peer=self.peer, control_id=control_id, type=self.order_type,
                state="committed", body=b"", charset="", subject=SUBJECT + prescription_id,
                order_key=order_key(prescription.patient),
                detail=f"prescription of {len(ids)} item(s) from {platform}")
            tx.insert_prescription(id=prescription_id, direction="to_his", platform=platform,
                                   number=prescription.number, status="pending", payload=payload,
                                   jws=submission.jws, signature=json.dumps(signature) if signature else None,
                                   message_id=message_id, record=record)
            for seq, (item_id, document) in enumerate(zip(ids, submission.documents), start=1):
                tx.insert_medication_request(id=item_id, prescription_id=prescription_id, seq=seq,
                                             status="on-hold",
                                             resource=self.documents.item(document, item_id, "on-hold", WAITING))
            log.info("prescription.committed", prescription=prescription_id, items=len(ids), platform=platform,
                     signed=signature is not None)
            return tx.prescription(prescription_id), True

        return self.chamber.transact(work)

    # -- the inner gate's side of it --------------------------------------------------------------------
    def owns(self, message) -> bool:
        return (message.subject or "").startswith(SUBJECT)

    def encode(self, tx, message) -> tuple[bytes, str, str]:
        """The order of a prescription's intent, written from its record: (bytes, message type, charset)."""
        p = tx.prescription(message.subject[len(SUBJECT):])
        if p is None or self.writer is None:
            raise ValueError(f"message {message.id} cannot be encoded: no prescription or no pharmacy link here")
        prescription = (Prescription.from_json(json.loads(p.record)) if p.record is not None
                        else self._record_from_request(tx, p))
        now = datetime.fromtimestamp(tx.now, self.tz).replace(tzinfo=None)
        body = self.writer.write(prescription, control_id=message.control_id, now=now)
        return body, self.writer.message_type, self.writer.charset

    def _record_from_request(self, tx, p) -> Prescription:
        """A prescription committed before chamber schema v6 has no record: its order is written from the
        platform's request as stored, read once with the map it went through then (and the record kept), so an
        order still waiting at an upgrade goes out as it would have."""
        if self.from_request is None:
            raise ValueError(f"prescription {p.id} was committed before chamber schema v6 and no map of its "
                             f"request is wired here")
        prescription = self.from_request(bytes(p.payload), [i.id for i in tx.medication_requests_of(p.id)])
        tx.keep_prescription_record(p.id, json.dumps(prescription.to_json(), ensure_ascii=False))
        return prescription

    def on_answer(self, tx, message, answer: HisAnswer) -> None:
        if not self.owns(message):
            return
        p = tx.prescription(message.subject[len(SUBJECT):])
        if p is None or p.status != "pending":
            return
        order = answer.order
        if order is None:  # not readable as an answer to a pharmacy order: its MSA alone decides
            log.warning("prescription.answer_unreadable", prescription=p.id, code=answer.code)
        accepted = order.accepted if order is not None else answer.accepted
        reason = (order.reason if order is not None else answer.text) or "no reason given"
        fillers = {i.placer_id: i.filler_id for i in (order.items if order is not None else ())}
        for item in tx.medication_requests_of(p.id):
            if accepted:
                his_order = fillers.get(item.id, "")
                tx.update_medication_request(item.id, status="active", his_order=his_order or None,
                                             resource=self.documents.item(item.resource, item.id, "active",
                                                                          his_order=his_order))
            else:
                text = f"refused by the hospital pharmacy ({answer.code}): {reason}"
                tx.update_medication_request(item.id, status="cancelled",
                                             resource=self.documents.item(item.resource, item.id, "cancelled", text))
            note_prescription(tx, p.id, item.id, "active" if accepted else "refused")
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
            tx.update_medication_request(item.id, status="cancelled",
                                         resource=self.documents.item(item.resource, item.id, "cancelled", text))
            note_prescription(tx, p.id, item.id, "cancelled")
        tx.update_prescription(p.id, status="refused", outcome=text)

    # -- inbound from the HIS pharmacy (inside the transaction that records the message) -----------------
    def apply_dispenses(self, tx, control_id: str, dispenses: Sequence[Dispense]) -> Verdict:
        """What the HIS dispensed (message ``control_id``): recorded once each; an item with a dispense is
        completed, and its prescription once all are. A dispense for an item the gateway never sent refuses
        the whole message, nothing recorded."""
        targets = []
        for d in dispenses:
            request = tx.medication_request(d.placer_id) if d.placer_id else None
            if request is None:
                ref = f"MedicationRequest/{d.placer_id}" if d.placer_id else "(no ORC-2)"
                return Verdict("AE", f"unknown order {ref}: no such prescription item was sent")
            targets.append((request, d))
        added = 0
        touched: set[str] = set()
        for request, d in targets:
            dispense_id = new_id("d")
            if tx.add_dispense(id=dispense_id, medication_request=request.id,
                               prescription_id=request.prescription_id, his_dispense=d.his_dispense,
                               resource=self.documents.dispense(d, dispense_id), control_id=control_id):
                added += 1
                touched.add(request.prescription_id)
                note_prescription(tx, request.prescription_id, request.id, "dispensed")
        for prescription_id in touched:
            items = tx.medication_requests_of(prescription_id)
            done = 0
            for item in items:
                if tx.dispenses_for(item.id):
                    done += 1
                    if item.status != "completed":
                        tx.update_medication_request(item.id, status="completed",
                                                     resource=self.documents.item(item.resource, item.id,
                                                                                  "completed"))
                        note_prescription(tx, prescription_id, item.id, "completed")
            if done == len(items):
                tx.update_prescription(prescription_id, status="completed")
        return Verdict("AA", f"{added} dispense(s) recorded")

    def apply_release(self, tx, prescription: Prescription) -> Verdict:
        """A prescription the HIS released to outside pharmacies: stored once with its items (a number
        released before adds nothing)."""
        existing = tx.prescription_by_number("released", "", prescription.number)
        if existing is not None:
            return Verdict("AA", f"prescription {prescription.number} was released before")
        ids = [new_id("m") for _ in prescription.items]
        payload, documents = self.documents.released(prescription, ids)
        prescription_id = new_id("p")
        tx.insert_prescription(id=prescription_id, direction="released", platform="", number=prescription.number,
                               status="active", payload=payload)
        for seq, (item_id, document, item) in enumerate(zip(ids, documents, prescription.items), start=1):
            tx.insert_medication_request(id=item_id, prescription_id=prescription_id, seq=seq, status="active",
                                         resource=document, his_order=item.filler_id or None)
        log.info("prescription.released", prescription=prescription_id, items=len(ids))
        return Verdict("AA", f"released as {len(ids)} MedicationRequest(s)")

    # ================================================================================== reading (outer)
    def request_for(self, platform: str, request_id: str, *, pharmacy: bool):
        """(MedicationRequestRow, PrescriptionRow) this platform may see, else None (an item it may not see is
        answered as an unknown one: no probing)."""
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
        """Fires with an item's document as it is served: a released one signed by the gateway on its first
        read (with a release key: the outer gate), and stored signed."""
        if p.direction == "released" and self.release_signer is not None \
                and not self.documents.is_signed(item.resource):
            return self._sign_once(item.id)
        return defer.succeed(item.resource)

    def _sign_once(self, request_id: str) -> defer.Deferred:
        key, chain = self.release_signer

        def work(tx):
            item = tx.medication_request(request_id)
            if self.documents.is_signed(item.resource):
                return item.resource  # signed meanwhile
            signed = self.documents.signed(item.resource, lambda payload: sign_release(payload, key, chain))
            tx.update_medication_request(request_id, resource=signed)
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

    def dispenses(self, request_id: str) -> list[str]:
        """The documents of an item's dispenses, oldest first."""
        return [d.resource for d in self.chamber.read().dispenses_for(request_id)]

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
        """Fires True once the HIS answered (or the order was given up), False after ``timeout`` — at once when
        the order waits for a HIS endpoint the inner gate's probe found down."""
        if self.chamber.read().waiting_for_a_down_his(SUBJECT + prescription_id) is not None:
            return defer.succeed(False)
        return self._waiters.wait(prescription_id, timeout)

    def _answered_among(self, prescription_ids: list[str]) -> list[str]:
        reader = self.chamber.read()
        return [i for i in prescription_ids if (p := reader.prescription(i)) is not None and p.status != "pending"]

    def stop(self) -> None:
        self._stop_observing()
        self._waiters.stop(False)

