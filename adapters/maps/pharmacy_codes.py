"""The pharmacy's vocabulary, shared by the FHIR map and the HL7 maps of prescriptions: pure data, no I/O.

The hospital's choices (`PharmacyProfile`, from the YAML ``pharmacy`` section: the order message, its drug
code systems and overrides), the HL7 coding-system names of FHIR code systems (`CODE_SYSTEMS`, HL7 table
0396), and HL7 table 0335 frequencies with their texts (`FREQUENCIES`, `frequency_text`): an HL7 TQ1-3
carries only the code, so the text is the same whichever side a prescription came from.
docs/pharmacy-profile.md is the profile these tables serve.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["CODE_SYSTEMS", "FREQUENCIES", "PharmacyProfile", "frequency_text"]

V2_0162 = "http://terminology.hl7.org/CodeSystem/v2-0162"
V2_0335 = "http://terminology.hl7.org/CodeSystem/v2-0335"
V3_GTS = "http://terminology.hl7.org/CodeSystem/v3-GTSAbbreviation"
UCUM = "http://unitsofmeasure.org"

#: FHIR code system URI -> HL7 coding system name (table 0396). Drug systems come from the profile.
CODE_SYSTEMS: dict[str, str] = {
    V2_0162: "HL70162",
    V2_0335: "HL70335",
    V3_GTS: "HL70335",
    UCUM: "UCUM",
    "http://snomed.info/sct": "SCT",
    "http://www.whocc.no/atc": "ATC",
}

#: HL7 table 0335 frequency -> FHIR Timing.repeat (frequency, period, periodUnit), and its display
FREQUENCIES: dict[str, tuple[int, int, str, str]] = {
    "QD": (1, 1, "d", "每日一次"),
    "BID": (2, 1, "d", "每日两次"),
    "TID": (3, 1, "d", "每日三次"),
    "QID": (4, 1, "d", "每日四次"),
    "QOD": (1, 2, "d", "隔日一次"),
    "QW": (1, 1, "wk", "每周一次"),
}


def frequency_text(code: str) -> str:
    """The display text of a table 0335 frequency code: ``BID`` -> 每日两次, ``Q8H`` -> 每8小时一次."""
    if code in FREQUENCIES:
        return FREQUENCIES[code][3]
    if code.startswith("Q") and code.endswith("H") and code[1:-1].isdigit():
        return f"每{code[1:-1]}小时一次"
    if code.startswith("Q") and code.endswith("D") and code[1:-1].isdigit():
        return f"每{code[1:-1]}日一次"
    return {"PRN": "必要时"}.get(code, code)


@dataclass(frozen=True)
class PharmacyProfile:
    """Per-hospital choices (from the YAML): the order message, and how drug codes reach the HIS.

    ``drug_systems``: FHIR code system URI -> HL7 coding system name, in order of preference (the hospital's
    local drug code system first). ``drug_codes``: ``(uri, code)`` of a platform's coding -> the code in the
    first of ``drug_systems``, used when no coding is already in a system the HIS knows."""

    message: str = "RDE"  # or "OMP"
    drug_systems: Mapping[str, str] = field(default_factory=lambda: {"urn:gatewayd:his:drug": "99HIS"})
    drug_codes: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def __post_init__(self):
        if self.message not in ("RDE", "OMP"):
            raise ValueError(f"pharmacy order message must be RDE or OMP, not {self.message!r}")
        if not self.drug_systems:
            raise ValueError("drug_systems needs at least the hospital's drug code system")

    def fhir_system(self, name: str) -> str:
        """The FHIR code system URI of an HL7 coding system name (the hospital's drug systems first)."""
        for uri, hl7 in self.drug_systems.items():
            if hl7 == name:
                return uri
        for uri, hl7 in CODE_SYSTEMS.items():
            if hl7 == name:
                return uri
        return ""
