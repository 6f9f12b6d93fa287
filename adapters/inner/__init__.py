"""The inner gate: HL7 v2 over MLLP to and from the HIS: framing, the listener, the client, the receiver that
hands messages to the domain, the HIS destination the relay delivers to, the slot poller."""
