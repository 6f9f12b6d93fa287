"""MLLP (Minimal Lower Layer Protocol, release 1): byte framing (`framing`), the listener that receives HL7
messages and answers each with the handler's ACK (`server`), and the sender that waits for the ACK whose
MSA-2 matches (`client`)."""
