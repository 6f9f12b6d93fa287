"""What a platform asks about the answer's form, decided with the request's headers (before its body): the media
type and FHIR version (``Accept``, ``_format``, the ``fhirVersion`` MIME parameter: 406 for what is not served),
``_pretty``, ``Prefer`` (``return=minimal | representation | OperationOutcome``, ``handling=strict``) and the conditional
headers' places (``If-Match`` on PUT/PATCH, ``If-None-Match`` on reads).  A header or value the gateway would not
honour is refused (400/406), never dropped.

The gateway serves JSON only, FHIR R4 (4.0.1) by default and R4B (4.3.0) when asked with ``fhirVersion=4.3``: the
resources it serves (Slot, Schedule, Appointment, MedicationRequest, MedicationDispense, OperationOutcome,
Bundle, Parameters) are the same on the wire in both; what differs is the CapabilityStatement's ``fhirVersion``.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.outer.errors import FhirError

#: the FHIR versions served, by the fhirVersion MIME parameter's value (major.minor) -> the full version
FHIR_VERSIONS = {"4.0": "4.0.1", "4.3": "4.3.0"}
DEFAULT_VERSION = "4.0"
#: the names JSON goes by, in Accept and _format
_JSON = {"application/fhir+json", "application/json", "application/json+fhir", "json", "*/*", "application/*"}
PREFER_RETURN = ("minimal", "representation", "OperationOutcome")
WRITES = ("POST", "PUT", "PATCH")


@dataclass(frozen=True)
class AnswerForm:
    """How to answer: ``version`` (a key of FHIR_VERSIONS), ``asked_version`` (the client named it: echoed in the
    Content-Type), ``prefer_return`` (None: the default, the resource)."""

    version: str = DEFAULT_VERSION
    asked_version: bool = False
    prefer_return: str | None = None
    pretty: bool = False  # _pretty=true: indented JSON

    @property
    def fhir_version(self) -> str:
        return FHIR_VERSIONS[self.version]

    def content_type(self) -> bytes:
        version = f"; fhirVersion={self.version}" if self.asked_version else ""
        return f"application/fhir+json{version}; charset=utf-8".encode()


def versions() -> dict:
    """``GET [base]/$versions``: the FHIR versions served and the default."""
    return {"resourceType": "Parameters",
            "parameter": [*({"name": "version", "valueCode": v} for v in FHIR_VERSIONS),
                          {"name": "default", "valueCode": DEFAULT_VERSION}]}


def fhir_version_of(params: list[str], where: str, status: int) -> str | None:
    """The ``fhirVersion`` parameter among a media type's ``params`` (None: not given); ``status`` (406 or 415)
    for a version not served."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "fhirversion":
            value = value.strip().strip('"')
            short = ".".join(value.split(".")[:2])
            if short not in FHIR_VERSIONS or value not in (short, FHIR_VERSIONS[short]):
                raise FhirError(status, "not-supported", f"{where}: fhirVersion={value[:16]} is not served (served: "
                                                         f"{', '.join(FHIR_VERSIONS)})")
            return short
    return None


def _media(text: str) -> tuple[str, list[str], float]:
    kind, *params = [p.strip() for p in text.split(";")]
    q = 1.0
    for param in params:
        if param.lower().startswith("q="):
            try:
                q = float(param[2:])
            except ValueError:
                q = 0.0
    return kind.lower(), [p for p in params if not p.lower().startswith("q=")], q


def _accepted_version(accept: str, where: str) -> str | None | bool:
    """The version a JSON media range in ``accept`` asks (None: any); False when none of it is JSON."""
    ranges = sorted((_media(r) for r in accept.split(",") if r.strip()), key=lambda m: -m[2])
    json_ranges = [(kind, params) for kind, params, q in ranges if q > 0 and kind in _JSON]
    if not json_ranges:
        return False
    return fhir_version_of(json_ranges[0][1], where, 406)


def answer_form(request, query: dict[str, list[str]], method: str) -> AnswerForm:
    """The form of the answer to ``request`` (406 for a type or version not served, 400 for a Prefer or conditional
    header the gateway would not honour)."""
    version, asked = None, False
    formats = query.get("_format", [])
    if formats:
        # (an unescaped '+' in a query string reads as a space: application/fhir json)
        version = _accepted_version(formats[-1].replace(" ", "+"), "_format")
        if version is False:
            raise FhirError(406, "not-supported", f"_format={formats[-1][:40]}: only JSON is served "
                                                  f"(application/fhir+json)")
    else:
        accept = request.getHeader(b"accept")
        if accept:
            version = _accepted_version(accept.decode("latin-1"), "Accept")
            if version is False:
                raise FhirError(406, "not-supported", "Accept: only JSON is served (application/fhir+json); XML "
                                                      "is not")
    if version:
        asked = True
    prefer = _prefer(request.getHeader(b"prefer"))
    if request.getHeader(b"if-none-match") is not None and method in WRITES:
        raise FhirError(400, "not-supported", "If-None-Match is answered on reads only (conditional create is "
                                              "If-None-Exist)")
    if request.getHeader(b"if-match") is not None and method not in ("PUT", "PATCH"):
        raise FhirError(400, "not-supported", "If-Match applies to PUT and PATCH only")
    pretty = query.get("_pretty", ["false"])[-1]
    if pretty not in ("true", "false"):
        raise FhirError(400, "invalid", "_pretty must be true or false", "_pretty")
    return AnswerForm(version or DEFAULT_VERSION, asked, prefer, pretty == "true")


def _prefer(header: bytes | None) -> str | None:
    if header is None:
        return None
    wanted = None
    for preference in header.decode("latin-1").split(","):
        name, _, value = preference.strip().partition("=")
        value = value.strip().strip('"')
        if name == "return" and value in PREFER_RETURN:
            wanted = value
        elif not (name == "handling" and value == "strict") and name:
            raise FhirError(400, "not-supported", f"Prefer: {preference.strip()[:40]} is not supported (supported: "
                                                  f"return=minimal|representation|OperationOutcome, handling=strict)")
    return wanted


def etag_matches(header: bytes, etag: str) -> bool:
    """``If-None-Match`` (a list of ETags, or ``*``) names ``etag`` (weak comparison)."""
    tags = [t.strip() for t in header.decode("latin-1").split(",")]
    strip = lambda t: t[2:] if t.startswith("W/") else t  # noqa: E731
    return "*" in tags or strip(etag) in {strip(t) for t in tags}
