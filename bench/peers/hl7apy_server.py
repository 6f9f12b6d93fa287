#!/usr/bin/env python3
"""hl7apy's MLLP server (``hl7apy.mllp.MLLPServer``, socketserver threads) with a handler that parses the
message with hl7apy and answers with an ACK built by hl7apy (MSA-1 AA, MSA-2 = MSH-10). No storage.
hl7apy's server reads one message per connection and then closes it, so the driver runs with
``--reconnect`` (one connection per message) against it.

    python bench/peers/hl7apy_server.py --port 2575
"""

import argparse

from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message


class AckHandler(AbstractHandler):
    def reply(self):
        incoming = parse_message(self.incoming_message, find_groups=False)
        ack = Message("ACK", version=incoming.msh.msh_12.value)
        ack.msh.msh_3 = "HL7APY"
        ack.msh.msh_4 = "PEER"
        ack.msh.msh_9 = "ACK^" + incoming.msh.msh_9.msh_9_2.value + "^ACK"
        ack.msh.msh_10 = "A" + incoming.msh.msh_10.value[:19]
        ack.msh.msh_11 = "P"
        ack.msa.msa_1 = "AA"
        ack.msa.msa_2 = incoming.msh.msh_10.value
        return ack.to_mllp()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=2575)
    port = ap.parse_args().port
    server = MLLPServer("127.0.0.1", port, {"SIU^S12^SIU_S12": (AckHandler,)}, timeout=10)
    server.serve_forever()
