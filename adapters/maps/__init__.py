"""Pure maps between the wire and the domain, one module per message pair: FHIR <-> domain, domain <-> HL7.
No I/O, no Twisted, no chamber."""
