"""The outer gate's refusals as FHIR answers: :class:`FhirError` (a status, OperationOutcome issues and headers),
:func:`operation_outcome`, and what everything else a handler's call raises is answered (:func:`failure_answer`,
:func:`slot_refusals`): the domain's refusals, the maps' invalid resources, the chamber being unavailable, and,
for whatever no one expected, 500 without internals.  Every answer is ``(status, body, headers)``; the site
(adapters/outer/site.py) writes it.
"""

from __future__ import annotations

import re

import structlog

from adapters.maps.fhir_scheduling import InvalidResource
from gateway.chamber.errors import ChamberError
from gateway.domain.booking import PatientRequired
from gateway.domain.backlog import Overloaded
from gateway.domain.model import SlotUnavailable, SlotUnknown
from gateway.domain.patients import IdentifierRefused, PatientDetailMissing
from gateway.domain.quota import QuotaExhausted

log = structlog.get_logger("gateway.outer")

#: the media type of every FHIR answer, OperationOutcomes included
FHIR_JSON = b"application/fhir+json; charset=utf-8"
#: reason phrases twisted.web does not know (it would write "Unknown Status")
REASONS = {422: b"Unprocessable Content", 428: b"Precondition Required"}


class FhirError(Exception):
    """A refusal: answered with ``status``, an OperationOutcome of its issue (code, diagnostics, expression)
    and ``headers``."""

    def __init__(self, status: int, code: str, diagnostics: str, expression: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(diagnostics)
        self.status = status
        self.issues = [(code, diagnostics, expression)]
        self.headers = headers or {}


#: whitespace a FHIR string may not hold (its pattern allows only space, TAB, CR and LF) and other control
#: characters: what a request put in a parameter's name or value can carry into a refusal's text
_UNFIT = re.compile(r"[^ \t\r\n\S]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def fhir_text(text: str) -> str:
    """``text`` as a FHIR string: unfit characters written as \\uXXXX."""
    return _UNFIT.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def operation_outcome(issues, severity: str = "error") -> dict:
    out = []
    for code, diagnostics, expression in issues:
        issue = {"severity": severity, "code": code, "diagnostics": fhir_text(diagnostics) or code}
        if expression and fhir_text(expression).strip():
            issue["expression"] = [fhir_text(expression)]
        out.append(issue)
    return {"resourceType": "OperationOutcome", "issue": out}


def failure_answer(failure, request) -> tuple[int, dict, dict]:
    """The answer to a request whose handling failed (``failure``, a twisted Failure): a FhirError as it says,
    the domain's and the maps' refusals as the platform is told them, 503 while the chamber is unavailable, else
    500 (logged with the error's type, never answered with it)."""
    if failure.check(FhirError):
        e = failure.value
        return e.status, operation_outcome(e.issues), e.headers
    if failure.check(IdentifierRefused):
        e = failure.value
        return 422, operation_outcome([("code-invalid", str(e), e.element)]), {}
    if failure.check(PatientDetailMissing):
        e = failure.value
        return 422, operation_outcome([("required", str(e), e.element)]), {}
    if failure.check(PatientRequired):
        return 422, operation_outcome([("required", failure.getErrorMessage(), "Appointment.participant")]), {}
    if failure.check(InvalidResource):
        e = failure.value
        return e.status, operation_outcome(e.issues), {}
    if failure.check(Overloaded):
        e = failure.value
        return 503, operation_outcome([("transient", str(e), None)]), {"Retry-After": str(e.retry_after)}
    if failure.check(QuotaExhausted):
        return 409, operation_outcome([("business-rule", failure.getErrorMessage(), "Appointment.slot")]), {}
    if failure.check(ChamberError):
        log.error("outer.chamber_unavailable", error=failure.getErrorMessage())
        return 503, operation_outcome([("transient", "the gateway cannot store requests right now; nothing "
                                        "was recorded, try again later", None)]), {"Retry-After": "30"}
    log.error("outer.internal_error", method=request.method.decode("ascii", "replace"),
              error=failure.getErrorMessage(),
              error_type=failure.type.__name__)
    return 500, operation_outcome([("exception", "internal error; the request was not completed", None)]), {}


async def slot_refusals(pending):
    """Await a booking service call that takes a slot (book, hold, reschedule); its refusals as the
    platform is told them."""
    try:
        return await pending
    except SlotUnknown as e:
        raise FhirError(422, "not-found", str(e), "Appointment.slot") from None
    except SlotUnavailable as e:
        raise FhirError(409, "conflict", str(e), "Appointment.slot") from None
    except QuotaExhausted as e:
        raise FhirError(409, "business-rule", str(e), "Appointment.slot") from None
