"""The outer gate: FHIR R4 over HTTPS for platforms (twisted.web): the site and its routes, HTTP limits,
access (mutual TLS, bearer tokens), OAuth2, rate limits, the CapabilityStatement, scheduling, IHE, pharmacy."""
