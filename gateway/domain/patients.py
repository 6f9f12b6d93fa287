"""Which patient identifiers platforms may use, and how the HIS gets them (config ``patients.identifiers``).

A platform identifies a patient by identifier only (national ID card number, medical-record number, phone —
as the hospital configures).  :class:`IdentifierRules` decides, on the outer gate, which identifier systems
are accepted (a Patient with another system is refused before anything is stored), and, on the inner gate,
how each accepted identifier becomes a PID-3 repetition: CX.4 the assigning authority and CX.5 the type
code the HIS expects.  With no rules configured every system is accepted and written as it came (CX.4 the
system, CX.5 the platform's type code, else PT), as before the rules existed.

A refusal names the accepted systems, never the value; nothing here logs.

:func:`order_key` says which patient a message is about, for delivery in order per patient (the relay's
``ordering: patient``), without naming the patient.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace

from gateway.domain.model import Patient, SchedulingError


class IdentifierRefused(SchedulingError):
    """A patient identifier the hospital does not accept; ``element`` is the FHIR path at fault."""

    code = "identifier-refused"

    def __init__(self, text: str, element: str):
        super().__init__(text)
        self.element = element


class PatientDetailMissing(SchedulingError):
    """A detail of the patient the hospital requires (config ``patients.require``) is missing; ``element`` is
    the FHIR path of it."""

    code = "patient-detail-missing"

    def __init__(self, text: str, element: str):
        super().__init__(text)
        self.element = element


#: what ``patients.require`` may name: the Patient field, what it is, and its FHIR element
REQUIRABLE = {"birth_date": ("birth date", "Patient.birthDate"), "gender": ("administrative gender (sex)",
                                                                         "Patient.gender")}


@dataclass(frozen=True)
class IdentifierRule:
    system: str
    type_code: str
    assigning_authority: tuple[str, ...] = ()  # the HD's parts (CX.4); empty: the system
    name: str = ""
    value_pattern: str | None = None

    def label(self) -> str:
        return f"{self.system} ({self.name})" if self.name else self.system


class IdentifierRules:
    """The configured rules, by system; empty: every system accepted as it comes."""

    def __init__(self, rules: list[IdentifierRule] | tuple[IdentifierRule, ...] = (), required: tuple[str, ...] = ()):
        self._rules = {r.system: r for r in rules}
        self.required = tuple(required)  # Patient fields (REQUIRABLE) a booking must carry
        self._patterns = {r.system: re.compile(r.value_pattern) for r in rules if r.value_pattern is not None}

    @classmethod
    def from_config(cls, config) -> "IdentifierRules":
        """From ``GatewayConfig.patients`` (a :class:`gateway.config.model.PatientsConfig`)."""
        return cls([IdentifierRule(system=c.system, type_code=c.type, name=c.name or "",
                                   assigning_authority=tuple(c.assigning_authority.split("&"))
                                   if c.assigning_authority else (),
                                   value_pattern=c.value_pattern) for c in config.identifiers],
                   required=tuple(config.require))

    def accepted(self) -> str:
        return ", ".join(r.label() for r in self._rules.values())

    def check(self, patient: Patient) -> None:
        """Raise IdentifierRefused if ``patient`` carries an identifier the hospital does not accept, and
        PatientDetailMissing if it lacks a detail the hospital requires."""
        for name in self.required:
            if not getattr(patient, name):
                what, element = REQUIRABLE[name]
                raise PatientDetailMissing(f"this hospital needs the patient's {what} to book ({element})", element)
        if not self._rules:
            return
        for n, ident in enumerate(patient.identifiers):
            rule = self._rules.get(ident.system)
            if rule is None:
                shown = ident.system[:100] if ident.system else "none"
                raise IdentifierRefused(f"patient identifier system {shown!r} is not accepted here; the accepted "
                                        f"systems are: {self.accepted()}", f"Patient.identifier[{n}].system")
            pattern = self._patterns.get(ident.system)
            if pattern is not None and not pattern.fullmatch(ident.value):
                raise IdentifierRefused(f"the {rule.label()} identifier is not of the form this hospital "
                                        f"accepts", f"Patient.identifier[{n}].value")

    def for_his(self, patient: Patient) -> Patient:
        """``patient`` with its identifiers as PID-3 needs them: each rule's type code and assigning authority."""
        if not self._rules:
            return patient
        out = []
        for ident in patient.identifiers:
            rule = self._rules.get(ident.system)
            if rule is None:  # (accepted before the rules changed: written as it came)
                out.append(ident)
            else:
                out.append(replace(ident, type_code=rule.type_code,
                                   assigning_authority=rule.assigning_authority or (ident.system,)))
        return replace(patient, identifiers=tuple(out))


def order_key(patient: Patient) -> str:
    """Which patient a message is about, for ordering by patient: a hash, never the identifier itself (of the
    first identifier's system and value; with none, of the name and phone)."""
    first = patient.identifiers[0] if patient.identifiers else None
    text = f"{first.system}|{first.value}" if first else f"{patient.family}|{patient.given}|{patient.phone}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
