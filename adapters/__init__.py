"""Adapters: the edges of gatewayd that speak a wire protocol (HL7 v2 / MLLP, FHIR) and hand messages to the
gateway's services through small interfaces. Adapters never import the storage module."""
