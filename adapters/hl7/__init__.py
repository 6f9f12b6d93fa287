"""HL7 v2 codec: a light ER7 (pipe-and-hat) reader/writer for the hot path (`er7`) and original-mode
acknowledgement building/reading (`ack`). Frames in, `Message` objects out; no networking here."""
