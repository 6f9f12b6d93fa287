"""What the outer gate says about itself: the CapabilityStatement (``GET [base]/metadata``: FHIR version, security,
resources, interactions, search parameters, the IHE operations) and the SMART configuration
(``GET [base]/.well-known/smart-configuration``: where the token endpoint is and what it takes; answered by
adapters/outer/oauth_http.py).  Documents only: no platform data, nothing read from the chamber.
"""

from __future__ import annotations

from typing import get_args

from adapters.outer import ihe
from adapters.outer.oauth import ALGORITHMS as OAUTH_ALGORITHMS
from adapters.outer.subscriptions import capability_entry as subscription_capability
from gateway.config.outer import Scope

#: [base]/.well-known/smart-configuration, as path segments below the FHIR base
SMART_CONFIGURATION = (b".well-known", b"smart-configuration")


def smart_configuration(token_url: str) -> dict:
    """SMART App Launch 2.x discovery, as SMART Backend Services clients use it."""
    return {
        "token_endpoint": token_url,
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(OAUTH_ALGORITHMS),
        "scopes_supported": [f"system/{scope}" for scope in get_args(Scope)],
        "capabilities": ["client-confidential-asymmetric", "permission-v2"],
    }


def _security(token_url: str | None) -> dict:
    services = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                             "code": "Certificates"}]}]
    security = {"cors": False, "service": services,
                "description": "Mutual TLS: each platform presents the client certificate registered for it."}
    if token_url is not None:
        services.append({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                     "code": "SMART-on-FHIR"}]})
        security["extension"] = [{"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                                  "extension": [{"url": "token", "valueUri": token_url}]}]
        security["description"] += (" Or a bearer token from the token endpoint (SMART Backend Services: "
                                     "client credentials with a signed JWT assertion; discovery at "
                                     ".well-known/smart-configuration).")
    return security


def _sp(name, type_, doc):
    return {"name": name, "type": type_, "documentation": doc}


#: the search parameters each resource type's search takes (besides _count, _offset, _summary=count, _total,
#: _elements and _sort, which are result parameters, not search parameters)
SEARCH_PARAMS = {
    "Slot": [_sp("_id", "token", "slot id(s), comma-separated"),
             _sp("start", "date", "slot start, with prefixes eq/ge/gt/le/lt/sa/eb"),
             _sp("status", "token", "free | busy | busy-unavailable | busy-tentative | entered-in-error (free: not "
                                    "started yet)"),
             _sp("schedule", "reference", "Schedule/<id>"),
             _sp("service-type", "token", "[system|]code"),
             _sp("_lastUpdated", "date", "the slot's last change, with prefixes eq/ge/gt/le/lt/sa/eb and the value's "
                                         "precision; poll with ge<the latest meta.lastUpdated seen> and drop the "
                                         "(id, versionId) pairs already had")],
    "Schedule": [_sp("_id", "token", "schedule id(s)"),
                 _sp("actor", "reference", "Practitioner/<id>, PractitionerRole/<id>, HealthcareService/<id> or "
                                           "Location/<id>: the schedules of that doctor or department")],
    "Practitioner": [_sp("_id", "token", "the HIS's practitioner id(s)")],
    "PractitionerRole": [_sp("_id", "token", "<practitioner id>.<department code>"),
                         _sp("specialty", "token", "[system|]department code"),
                         _sp("practitioner", "reference", "Practitioner/<id>"),
                         _sp("location", "reference", "Location/<department code>"),
                         _sp("service", "reference", "HealthcareService/<department code>")],
    "HealthcareService": [_sp("_id", "token", "department code(s)")],
    "Location": [_sp("_id", "token", "department code(s)")],
    "Appointment": [_sp("_id", "token", "appointment id(s)"),
                    _sp("status", "token", "appointment status"),
                    _sp("patient", "reference", "only with the :identifier modifier: patient:identifier=[system|]"
                                                "value (patient=[system|]value is read the same way; the gateway "
                                                "keeps no Patient resources, so patient=Patient/<id> is refused)"),
                    _sp("date", "date", "the appointment's start, with prefixes eq/ge/gt/le/lt/sa/eb"),
                    _sp("_lastUpdated", "date", "the appointment's last change, as for Slot")],
    "MedicationRequest": [_sp("status", "token", "active: released prescriptions not yet claimed (outside "
                                                 "pharmacies, scope MedicationRequest.claim)"),
                          _sp("_lastUpdated", "date", "gt<instant> only")],
    "MedicationDispense": [_sp("prescription", "reference", "exactly one MedicationRequest id")],
}
#: the directory types' _revinclude of the roles that refer to them
DIRECTORY_REVINCLUDE = {"Practitioner": "practitioner", "HealthcareService": "service", "Location": "location"}
#: the sort keys of each search (_sort, - for descending)
SORTS = {"Slot": ["start"], "Appointment": ["date", "_lastUpdated"]}


def _interactions(*codes: str) -> list[dict]:
    return [{"code": c} for c in codes]


def capability_statement(base: str, *, hospital_name: str, software_version: str, page_size: int,
                         token_url: str | None, fhir_version: str = "4.0.1", prescriptions: bool = False,
                         subscriptions: bool = False) -> dict:
    """The CapabilityStatement of the gateway at ``base``, in FHIR ``fhir_version``; ``token_url``: the OAuth2
    token endpoint when some platform can get a token (None: no bearer tokens); ``prescriptions``: the
    prescription endpoints are served; ``subscriptions``: Subscription is (some platform has ``notify``)."""
    def searches(rtype: str) -> dict:
        out = {"searchParam": SEARCH_PARAMS[rtype]}
        if rtype in SORTS:
            out["documentation"] = f"_sort: {', '.join(SORTS[rtype])} (- for descending). "
        return out

    resources = [
        {"type": "Slot", "interaction": _interactions("read", "search-type"), **searches("Slot"),
         "searchInclude": ["Slot:schedule"]},
        {"type": "Schedule", "interaction": _interactions("read", "search-type"), **searches("Schedule")},
        {"type": "Appointment",
         "interaction": _interactions("create", "read", "vread", "update", "patch", "search-type",
                                      "history-instance", "history-type"),
         "versioning": "versioned", "readHistory": True, "updateCreate": False, "conditionalCreate": True,
         "conditionalRead": "not-supported", "conditionalUpdate": False, "conditionalDelete": "not-supported",
         **searches("Appointment"),
         "operation": [{"name": name, "definition": url, "documentation": doc} for name, url, doc in (
             ("find", ihe.OPERATIONS["find"], "proposed Appointments for free slots (scope Slot.read)"),
             ("hold", ihe.OPERATIONS["hold"], "hold a proposed appointment until outer.hold_expires "
                                              "(scope Appointment.write)"),
             ("book", ihe.OPERATIONS["book"], "book a held or proposed appointment through the HIS, "
                                              "or cancel one (scope Appointment.write)"))]},
    ]
    resources[0]["documentation"] = resources[0].get("documentation", "") + ("Chained: schedule.actor=Practitioner/<id> (or PractitionerRole, "
                                      "HealthcareService, Location): the slots of that doctor or department.")
    resources += [{"type": rtype, "interaction": _interactions("read", "search-type"), **searches(rtype),
                   "documentation": "read-only, from the schedules the HIS publishes",
                   **({"searchInclude": [f"PractitionerRole:{e}" for e in ("practitioner", "service", "location")]}
                      if rtype == "PractitionerRole" else
                      {"searchRevInclude": [f"PractitionerRole:{DIRECTORY_REVINCLUDE[rtype]}"]})}
                  for rtype in ("Practitioner", "PractitionerRole", "HealthcareService", "Location")]
    resources[2]["documentation"] = (
        resources[2].get("documentation", "") + "create books the referenced Slot (201 booked, 409 refused, 202 pending; "
        "conditional create with If-None-Exist: identifier=[system|]value); update or patch (JSON Patch, FHIRPath "
        "Patch, partial resource) may only set status to 'cancelled' (If-Match: 412 on another version); every "
        "version is kept (vread, history-instance). IHE ITI Scheduling: $find (ITI-115), $hold "
        "(ITI-116, the HIS is not told), $book (ITI-117, 200 booked, 202 pending, 409 refused; status "
        "'cancelled' cancels).")
    if prescriptions:
        resources += [
            {"type": "MedicationRequest", "interaction": _interactions("create", "read", "search-type"),
             "documentation": "create: one signed prescription (X-Prescription-Signature), or several in a "
                              "transaction Bundle; search and $claim: outside pharmacies.",
             **searches("MedicationRequest")},
            {"type": "MedicationDispense", "interaction": _interactions("search-type"),
             **searches("MedicationDispense")},
        ]
    if subscriptions:
        resources.append(subscription_capability())
    rest: dict = {
        "mode": "server",
        "documentation": "FHIR R4 (4.0.1) by default; R4B (4.3.0) with the MIME parameter fhirVersion=4.3 "
                         "(the resources served are the same in both). JSON only. Bookings are held in the gateway "
                         f"and confirmed by the HIS. Searches page with _count (at most {page_size}) and _offset, "
                         "give total on every page, and take _summary=count, _total, _elements and _sort.",
        "security": _security(token_url),
        "resource": resources,
    }
    if prescriptions:
        rest["interaction"] = [{"code": "transaction", "documentation": "a Bundle of signed MedicationRequests"}]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-12-07",
        "kind": "instance",
        "publisher": hospital_name,
        "software": {"name": "gatewayd", "version": software_version},
        "implementation": {"description": f"{hospital_name} front-end gateway", "url": base},
        "fhirVersion": fhir_version,
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json", "application/fhir+json"],
        "rest": [rest],
    }
