"""Interoperability and real-socket tests of the HL7 gate: peers nobody on this team wrote (python-hl7,
hl7apy), TLS on MLLP, MLLP release 2, and a running gatewayd under garbage and Chinese charsets."""
