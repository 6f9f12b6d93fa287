"""What the outer gate says about itself: the CapabilityStatement (``GET [base]/metadata``: FHIR version, security,
resources, interactions, search parameters, the IHE operations) and the SMART configuration
(``GET [base]/.well-known/smart-configuration``: where the token endpoint is and what it takes; answered by
adapters/outer/oauth_http.py).  Documents only: no platform data, nothing read from the chamber.
"""

from __future__ import annotations

from typing import get_args

from adapters.maps.fhir_scheduling import FHIR_VERSION
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


def capability_statement(base: str, *, hospital_name: str, software_version: str, page_size: int,
                         token_url: str | None, subscriptions: bool = False) -> dict:
    """The CapabilityStatement of the gateway at ``base``; ``token_url``: the OAuth2 token endpoint (None: no
    bearer tokens)."""
    def sp(name, type_, doc):
        return {"name": name, "type": type_, "documentation": doc}

    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "kind": "instance",
        "publisher": hospital_name,
        "software": {"name": "gatewayd", "version": software_version},
        "implementation": {"description": f"{hospital_name} front-end gateway", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json"],
        "rest": [{
            "mode": "server",
            "documentation": "FHIR R4B (4.3.0), wire-compatible with R4 (4.0.1) for Slot, Schedule and "
                             "Appointment. Bookings are held in the gateway and confirmed by the HIS.",
            "security": _security(token_url),
            "resource": [
                {"type": "Slot", "interaction": [{"code": "read"}, {"code": "search-type"}],
                 "searchParam": [sp("start", "date", "slot start, with prefixes ge/gt/le/lt/eq"),
                                 sp("status", "token", "free | busy | busy-unavailable | busy-tentative"),
                                 sp("schedule", "reference", "Schedule/<id>"),
                                 sp("service-type", "token", "[system|]code"),
                                 sp("_count", "number", f"page size, at most {page_size}")]},
                {"type": "Schedule", "interaction": [{"code": "read"}, {"code": "search-type"}],
                 "searchParam": [sp("_id", "token", "schedule id")]},
                {"type": "Appointment",
                 "interaction": [{"code": "create"}, {"code": "read"}, {"code": "update"}, {"code": "patch"},
                                 {"code": "search-type"}],
                 "documentation": "create books the referenced Slot (201 booked, 409 refused, 202 pending); "
                                  "update or patch status to 'cancelled' cancels it. IHE ITI Scheduling: "
                                  "$find (ITI-115), $hold (ITI-116, the HIS is not told), $book (ITI-117, "
                                  "200 booked, 202 pending, 409 refused; status 'cancelled' cancels).",
                 "searchParam": [sp("status", "token", "appointment status"), sp("_id", "token", "id"),
                                 sp("patient", "token", "the patient's identifier, [system|]value "
                                                        "(also patient:identifier)"),
                                 sp("date", "date", "the appointment's start, with prefixes ge/gt/le/lt/eq")],
                 "operation": [{"name": name, "definition": url,
                                "documentation": doc} for name, url, doc in (
                     ("find", ihe.OPERATIONS["find"], "proposed Appointments for free slots (scope Slot.read)"),
                     ("hold", ihe.OPERATIONS["hold"], "hold a proposed appointment until outer.hold_expires "
                                                      "(scope Appointment.write)"),
                     ("book", ihe.OPERATIONS["book"], "book a held or proposed appointment through the HIS, "
                                                      "or cancel one (scope Appointment.write)"))]},
                *([subscription_capability()] if subscriptions else []),
            ],
        }],
    }
