import json

import pytest
import requests

from tests.conformance import problems
from tests.e2e.harness import Lock


@pytest.fixture(scope="module")
def lock(tmp_path_factory):
    """One running HIS simulator + gateway for the tests of a module (each test uses its own slots)."""
    with Lock(tmp_path_factory.mktemp("lock")) as running:
        yield running


def _subsetted(resource: dict) -> bool:
    return any(t.get("code") == "SUBSETTED" for t in (resource.get("meta") or {}).get("tag", []))


@pytest.fixture(autouse=True)
def fhir_conformance(monkeypatch):
    """Every FHIR answer an end-to-end test receives through requests (and so through fhirpy's sync client and
    fhirclient) is checked against HL7's FHIR R4 JSON schema (tests/conformance); the test fails if one is not
    valid.  (A resource cut by _elements, tagged SUBSETTED, may lack required elements: not checked.)"""
    found: list[str] = []
    send = requests.Session.send

    def checked(self, request, **kw):
        response = send(self, request, **kw)
        if "fhir+json" in response.headers.get("content-type", "") and response.content:
            try:
                body = json.loads(response.content)
            except ValueError:
                found.append(f"{request.method} {request.url}: the answer is not JSON")
                return response
            if isinstance(body, dict) and not _subsetted(body) and not any(
                    _subsetted(e.get("resource") or {}) for e in body.get("entry") or []):
                found.extend(f"{request.method} {request.url}: {p}" for p in problems(body))
        return response

    monkeypatch.setattr(requests.Session, "send", checked)
    yield found
    assert not found, "answers that are not valid FHIR R4:\n" + "\n".join(found[:20])
