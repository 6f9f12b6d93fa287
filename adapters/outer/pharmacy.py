"""The outer gate's prescription endpoints (docs/prescriptions.md): thin HTTP handling over
`gateway.domain.prescribing.PrescriptionService`, which makes the decisions. A platform's body is read once
into the domain's `Submission` (`adapters.maps.fhir_prescription`); what is served is the stored documents
(`adapters.maps.fhir_documents`); the domain's refusals become HTTP statuses here (`REFUSALS`).

- ``POST /MedicationRequest`` (one item; the prescriber's JWS in ``X-Prescription-Signature``) and ``POST /``
  with a transaction Bundle (several items; JWS in ``Bundle.signature`` or the header): 201 once the HIS
  pharmacy accepted, 422 when it refused, 202 + Location while it has not answered within
  ``outer.answer_within``; 403 naming the failed check for an unsigned, tampered or untrusted prescription.
- ``GET /MedicationRequest/{id}``, ``GET /MedicationDispense?prescription={id}``: the platform's own.
- ``GET /MedicationRequest?status=active&_lastUpdated=gt...`` and ``POST /MedicationRequest/{id}/$claim``:
  outside pharmacies (scope ``MedicationRequest.claim``) list and claim released prescriptions; exactly one
  pharmacy wins a prescription (409 for the others).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlencode

from adapters.maps.fhir_documents import served
from adapters.maps.fhir_prescription import NotCanonical, SubmissionReader
from adapters.outer.access import require_scope
from adapters.outer.errors import FhirError
from adapters.outer.intake import JsonLimits, json_body, require_method
from gateway.domain.prescribing import PrescriptionService, Refused

PHARMACY_TYPES = ("MedicationRequest", "MedicationDispense")
SIGNATURE_HEADER = b"x-prescription-signature"

#: a refused prescription's HTTP status and OperationOutcome issue code, by the domain's reason (Refused.kind)
REFUSALS = {"signature": (403, "security"), "duplicate": (409, "duplicate")}


@dataclass(frozen=True)
class Prescriptions:
    """What the prescription endpoints work with (gateway/service.py wires it): the domain's decisions and the
    reader of platforms' prescriptions."""

    service: PrescriptionService
    reader: SubmissionReader


class PharmacyApi:
    """The handlers of the prescription endpoints over ``prescriptions``."""

    def __init__(self, prescriptions: Prescriptions, *, answer_within: float, page_size: int,
                 json_limits: JsonLimits):
        self.rx = prescriptions.service
        self.reader = prescriptions.reader
        self.answer_within = answer_within
        self.page_size = page_size
        self.json_limits = json_limits

    def handler(self, parts, method, grant, platform, request, query, base, access):
        """A prescription request's route, method and scope, decided before its body is read: the handler that
        answers it, not called yet (as SchedulingApi.handler)."""
        access.resource_type = parts[0] if parts else "Bundle"
        if not parts:  # POST [base]: a transaction Bundle
            require_method(method, "POST")
            require_scope(grant, platform, "MedicationRequest.write")
            access.action = "prescribe"
            return lambda: self._submit(platform, request, base, access, bundle=True)
        rtype, rest = parts[0], parts[1:]
        if rtype == "MedicationDispense":
            require_method(method, "GET")
            require_scope(grant, platform, "MedicationDispense.read")
            if rest:
                raise FhirError(404, "not-supported", "read MedicationDispense by searching ?prescription=")
            return lambda: self._dispenses(platform, query, base, access)
        if len(rest) == 2 and rest[1] == "$claim":
            require_method(method, "POST")
            require_scope(grant, platform, "MedicationRequest.claim")
            access.action, access.resource_id = "claim", rest[0]
            return lambda: self._claim(platform, rest[0], access)
        if len(rest) > 1:
            raise FhirError(404, "not-supported", "history and other operations are not supported")
        if rest:
            require_method(method, "GET")
            pharmacy = "MedicationRequest.claim" in grant.scopes
            if not pharmacy:
                require_scope(grant, platform, "MedicationRequest.read")
            access.action, access.resource_id = "read", rest[0]
            return lambda: self._read(platform, rest[0], pharmacy, access)
        require_method(method, "GET", "POST")
        if method == "POST":
            require_scope(grant, platform, "MedicationRequest.write")
            access.action = "prescribe"
            return lambda: self._submit(platform, request, base, access, bundle=False)
        require_scope(grant, platform, "MedicationRequest.claim")
        access.action = "search"
        return lambda: self._released(platform, query, base, access)

    # -- platform -> HIS -------------------------------------------------------------------------------------
    async def _submit(self, platform, request, base, access, *, bundle: bool):
        body = json_body(request, self.json_limits)
        expected = "Bundle" if bundle else "MedicationRequest"
        if not isinstance(body, dict) or body.get("resourceType") != expected:
            raise FhirError(400, "invalid", f"expected a {expected} here", expression=expected)
        try:
            submission = self.reader.read(body, _signature(request, body))
        except NotCanonical:
            access.detail = "invalid"
            raise
        try:
            p, created = await self.rx.submit(platform, submission)
        except Refused as e:
            status, code = REFUSALS[e.kind]
            access.detail = e.check or code
            raise FhirError(status, code, e.text) from None
        access.patient_data = True
        if created:
            settled = await self.rx.wait_settled(p.id, self.answer_within)
            p = self.rx.chamber.read().prescription(p.id)
        else:
            settled = p.status != "pending"
        items = self.rx.chamber.read().medication_requests_of(p.id)
        if items:  # (a Bundle's record names its first MedicationRequest, not the Bundle)
            access.resource_type, access.resource_id = "MedicationRequest", items[0].id
        return self._submitted(p, items, base, created, settled, bundle)

    def _submitted(self, p, items, base, created, settled, bundle):
        resources = [json.loads(i.resource) for i in items]
        if p.status == "refused":
            raise FhirError(422, "business-rule", f"the hospital pharmacy did not take the prescription: "
                                                   f"{p.outcome or 'no reason given'}")
        status = 202 if not settled else (201 if created else 200)
        location = {"Location": f"{base}/MedicationRequest/{items[0].id}"} if items else {}
        if not bundle:
            return status, resources[0], location
        entries = [{"fullUrl": f"{base}/MedicationRequest/{r['id']}", "resource": r,
                    "response": {"status": {201: "201 Created", 200: "200 OK", 202: "202 Accepted"}[status],
                                 "location": f"MedicationRequest/{r['id']}"}} for r in resources]
        return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}, {}

    async def _read(self, platform, request_id, pharmacy, access):
        found = self.rx.request_for(platform, request_id, pharmacy=pharmacy)
        if found is None:
            raise FhirError(404, "not-found", f"MedicationRequest/{request_id} is not known")
        access.patient_data = True
        return 200, await self._served(*found), {}

    def _dispenses(self, platform, query, base, access):
        wanted = query.get("prescription") or []
        if len(wanted) != 1 or set(query) - {"prescription", "_count"}:
            raise FhirError(400, "invalid", "search MedicationDispense by exactly one ?prescription=<MedicationRequest "
                                            "id> (and _count)")
        request_id = wanted[0].removeprefix("MedicationRequest/")
        access.resource_type, access.resource_id = "MedicationRequest", request_id  # whose dispenses were read
        if self.rx.request_for(platform, request_id, pharmacy=False) is None:
            raise FhirError(404, "not-found", f"MedicationRequest/{request_id} is not known")
        access.patient_data = True
        found = [json.loads(d) for d in self.rx.dispenses(request_id)]
        return 200, _searchset(base, "MedicationDispense", found), {}

    # -- released prescriptions, outside pharmacies -----------------------------------------------------------
    async def _released(self, platform, query, base, access):
        allowed = {"status", "_lastUpdated", "_count", "_page"}
        if set(query) - allowed:
            raise FhirError(400, "not-supported", f"search parameters supported here: {', '.join(sorted(allowed))}")
        if query.get("status", ["active"]) != ["active"]:
            raise FhirError(400, "not-supported", "pharmacies search status=active (released, not yet claimed)")
        after = 0.0
        for value in query.get("_lastUpdated", []):
            if not value.startswith("gt"):
                raise FhirError(400, "invalid", "_lastUpdated supports gt<instant> only")
            try:
                after = datetime.fromisoformat(value[2:].replace("Z", "+00:00")).timestamp()
            except ValueError:
                raise FhirError(400, "invalid", f"_lastUpdated: {value[2:]!r} is not an instant") from None
        try:
            count = min(int((query.get("_count") or [str(self.page_size)])[0]), self.page_size)
        except ValueError:
            raise FhirError(400, "invalid", "_count must be a number") from None
        after_id = None
        if query.get("_page"):  # the cursor of a `next` link: (updated, id) of the previous page's last
            try:
                stamp, after_id = base64.urlsafe_b64decode(query["_page"][0].encode("ascii")).decode().split("|", 1)
                after = float(stamp)
            except (ValueError, UnicodeError):
                raise FhirError(400, "invalid", "_page is not a page of this search (use the next link as given)") from None
        pairs, more = self.rx.released_page(platform, after, max(count, 0), after_id)
        access.patient_data = bool(pairs)
        resources = []
        for item, p in pairs:
            resource = await self._served(item, p)
            meta = dict(resource.get("meta") or {})
            meta["lastUpdated"] = datetime.fromtimestamp(p.updated, timezone.utc).isoformat(timespec="microseconds")
            resources.append(dict(resource, meta=meta))  # (meta is outside the signed content)
        bundle = _searchset(base, "MedicationRequest", resources)
        if more is not None:
            # (more follow: the page's own count is not the search's total, and a cursor search keeps no count)
            del bundle["total"]
            cursor = base64.urlsafe_b64encode(f"{more[0]!r}|{more[1]}".encode()).decode("ascii")
            bundle["link"] = [{"relation": "next", "url": f"{base}/MedicationRequest?"
                               + urlencode({"status": "active", "_count": count, "_page": cursor})}]
        return 200, bundle, {}

    async def _claim(self, platform, request_id, access):
        result = await self.rx.claim(platform, request_id)
        if result is None:
            raise FhirError(404, "not-found", f"MedicationRequest/{request_id} is not a released prescription")
        item, p, won = result
        if not won:
            raise FhirError(409, "conflict", "this prescription was already claimed by another pharmacy")
        access.patient_data = True
        return 200, await self._served(item, p), {}

    async def _served(self, item, p) -> dict:
        """An item as it is served: its stored document (signed by the gateway if released), the claim shown."""
        return served(await self.rx.served(item, p), p.claimed_by)


def _signature(request, body: dict) -> str | None:
    """The prescriber's JWS: Bundle.signature (sigFormat application/jose, data = base64 of the JWS), else
    the X-Prescription-Signature header."""
    sig = body.get("signature") if body.get("resourceType") == "Bundle" else None
    if isinstance(sig, dict) and sig.get("data"):
        try:
            return base64.b64decode(sig["data"], validate=True).decode("ascii")
        except (binascii.Error, UnicodeDecodeError, TypeError):
            return "(Bundle.signature.data is not base64 of a JWS)"
    header = request.getHeader(SIGNATURE_HEADER)
    if not header:
        return None
    try:
        return header.decode("ascii").strip()  # (a JWS is base64url and dots)
    except UnicodeDecodeError:
        return "(X-Prescription-Signature is not ASCII text)"


def _searchset(base: str, rtype: str, resources: list[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"fullUrl": f"{base}/{rtype}/{r.get('id', '')}", "resource": r, "search": {"mode": "match"}}
                      for r in resources]}
