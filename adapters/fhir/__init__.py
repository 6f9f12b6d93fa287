"""The outer gate: FHIR R4 over HTTPS for platforms."""
